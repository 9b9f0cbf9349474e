"""Transcripts recorded by the shim from real ejabberd sessions replay without differences.

tests/transcripts/<scenario>.msgpack are recorded by tests/e2e/record_transcripts.py from the
scenarios of tests/e2e/scenarios.py (real ejabberd 23.01, real slixmpp clients, an empty store),
whose assertions checked the behaviour while it was recorded. Here each one is replayed with
`roster_port.replay.replay()` against a fresh store by one program process: every response must
be the recorded one. No ejabberd needed; a change to the program that alters any answer a real
session got shows up here as a difference.

Versions are per-user counters, deterministic from an empty store, and requests of different
users (the only ones whose recorded order can vary between workers) touch different rosters.
The one value replay normalises, and why, is in roster_port/replay.py's docstring.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from roster_port.replay import read_transcript, replay

TRANSCRIPTS = Path(__file__).parent / "transcripts"
# One per scenario of tests/e2e/scenarios.py (tests/e2e/test_scenarios.py checks the list).
SCENARIOS = (
    "add_rename_regroup_remove",
    "login_and_roster_get",
    "pre_approval",
    "remove_user",
    "request_while_offline",
    "subscription_cancelled",
    "subscription_denied",
    "subscription_handshake_both_directions",
    "two_resources",
)


@pytest.mark.parametrize("name", SCENARIOS)
def test_transcript_replays_without_differences(name):
    path = TRANSCRIPTS / f"{name}.msgpack"
    assert path.is_file(), f"{path} is missing: run tests/e2e/record_transcripts.py {name}"
    entries = list(read_transcript(path))
    ops = {entry.message[2] for entry in entries if entry.direction == "in"}
    # A transcript of a real session has the handshake and real roster work, not just hellos.
    assert "hello" in ops and len(ops - {"hello", "ping"}) >= 2, f"{path} holds only {ops}"
    count, found = replay(path)
    assert count > 0
    assert found == [], "\n".join(d.describe() for d in found)


def test_every_transcript_is_checked():
    """A transcript recorded for a new scenario must be added to SCENARIOS above."""
    on_disk = {p.stem for p in TRANSCRIPTS.glob("*.msgpack")}
    assert on_disk == set(SCENARIOS)
