"""`roster-port replay`: a transcript recorded from a real program session replays without
differences, and a changed answer is reported. (Transcripts recorded by the shim from real
ejabberd sessions are replayed in tests/test_transcripts.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

import msgpack

from roster_port.client import ProgramProcess
from roster_port.replay import read_transcript, replay

ALICE, BOB = "alice@example.com", "bob@example.com"

SESSION = [
    ("hello", {"protocols": [2], "shim": "test", "host": "example.com"}),
    ("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bob", "groups": ["G"]}]}),
    ("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe", "status": None}),
    ("in_subscription", {"user": BOB, "contact": ALICE, "type": "subscribe", "status": "hi"}),
    ("out_subscription", {"user": BOB, "contact": ALICE, "type": "subscribed", "status": None}),
    ("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribed", "status": None}),
    ("roster_iq", {"user": ALICE, "requester": ALICE, "type": "get", "items": [], "ver": ""}),
    ("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": "bad@@x"}]}),
]


def record(tmp_path, worker: int = 0) -> bytes:
    """A transcript of SESSION as the shim writes it: [direction, worker, ms, message] values."""
    config = tmp_path / f"record{worker}.toml"
    config.write_text(f'[store]\npath = "record{worker}.sqlite"\n')
    out = b""
    with ProgramProcess(config, hello=False) as program:
        for index, (op, args) in enumerate(SESSION, start=1):
            now = int(time.time() * 1000)
            out += msgpack.packb(["in", worker, now, [0, index, op, args]])
            program.send(op, args, request_id=index)
            out += msgpack.packb(["out", worker, now, program.read_message()])
    return out


def test_a_recorded_session_replays_without_differences(tmp_path):
    transcript = tmp_path / "session.transcript"
    transcript.write_bytes(record(tmp_path))
    assert len(list(read_transcript(transcript))) == 2 * len(SESSION)
    count, differences = replay(transcript)
    assert (count, differences) == (len(SESSION), [])


def test_a_changed_answer_is_reported(tmp_path):
    entries = list(msgpack.Unpacker(__import__("io").BytesIO(record(tmp_path)), raw=False))
    for entry in entries:
        message = entry[3]
        if entry[0] == "out" and message[1] == 6:  # Alice learns Bob approved: deliver true
            message[3]["deliver"] = False
    transcript = tmp_path / "tampered.transcript"
    transcript.write_bytes(b"".join(msgpack.packb(entry) for entry in entries))
    result = subprocess.run(
        [sys.executable, "-m", "roster_port", "replay", str(transcript)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "request 5 in_subscription" in result.stdout
    assert '"deliver": false' in result.stdout and '"deliver": true' in result.stdout
    assert result.stdout.strip().endswith("8 requests replayed, 1 differences")
