"""The real `roster-port serve` process, spoken to over pipes as the shim does."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import msgpack
import pytest

from roster_port.client import ProgramProcess, ProgramError
from roster_port.framing import HEADER, encode_frame
from roster_port.messages import decode_message, encode_request

ALICE, BOB = "alice@example.com", "bob@example.com"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "roster-port.toml"
    path.write_text(
        '[store]\nbackend = "sqlite"\npath = "rosters.sqlite"\n'
        "[limits]\nmax_frame_bytes = 4096\n"
        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n'
    )
    return path


def rows(database) -> dict[tuple[str, str], tuple]:
    with sqlite3.connect(database) as connection:
        return {
            (user, contact): tuple(rest)
            for user, contact, *rest in connection.execute(
                "SELECT user, contact, subscription, pending_out, pending_in, in_roster FROM roster_items"
            )
        }


def test_a_full_handshake_ends_with_both_rows_right_in_the_file(config, tmp_path):
    with ProgramProcess(config) as program:
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bob"}]})
        # Alice asks; her server routes the request to Bob's, which delivers it.
        assert program.call("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe"})["route"]
        assert program.call("in_subscription", {"user": BOB, "contact": ALICE, "type": "subscribe", "status": "hi"})["deliver"]
        assert rows(tmp_path / "rosters.sqlite") == {
            (ALICE, BOB): ("none", 1, 0, 1),
            (BOB, ALICE): ("none", 0, 1, 0),  # a stranger's request: stored, not an item
        }
        # Bob approves and asks back; Alice approves.
        program.call("out_subscription", {"user": BOB, "contact": ALICE, "type": "subscribed"})
        assert program.call("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribed"})["deliver"]
        program.call("out_subscription", {"user": BOB, "contact": ALICE, "type": "subscribe"})
        program.call("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe"})
        program.call("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribed"})
        program.call("in_subscription", {"user": BOB, "contact": ALICE, "type": "subscribed"})
        assert program.close() == 0
    assert rows(tmp_path / "rosters.sqlite") == {
        (ALICE, BOB): ("both", 0, 0, 1),
        (BOB, ALICE): ("both", 0, 0, 1),
    }


def _ping_is_answered(program: ProgramProcess) -> None:
    assert program.call("ping", {})["effects"] == []


def test_bad_frames_get_errors_or_log_lines_and_the_next_request_is_answered(config, tmp_path):
    with ProgramProcess(config) as program:
        # Garbage with no readable id: a log line, and the stream goes on.
        program.write(encode_frame(b"\xc1 not msgpack"))
        _ping_is_answered(program)

        # Oversized: skipped as it streams by, answered from its first bytes.
        program.write(encode_frame(encode_request(901, "roster_get", {"user": ALICE, "pad": "x" * 10_000})))
        response = program.read_message()
        assert response[1] == 901 and response[2]["code"] == "frame_too_large"
        _ping_is_answered(program)

        # Ill-typed: a map instead of a request array; no id to answer, so a log line.
        program.write(encode_frame(msgpack.packb({"id": 902, "op": "ping"})))
        # Ill-typed args with a readable id.
        program.write(encode_frame(msgpack.packb([0, 903, "roster_get", ["not", "a", "map"]])))
        response = program.read_message()
        assert response[1] == 903 and response[2]["code"] == "bad_request"
        _ping_is_answered(program)
        assert program.close() == 0
    log = (tmp_path / "roster-port.log").read_text()
    assert "no request id" in log


def test_truncated_frame_gets_a_bad_frame_error(config):
    with ProgramProcess(config) as program:
        program.write(encode_frame(encode_request(900, "roster_get", {"user": ALICE})[:-4]))
        _, request_id, error, result = program.read_message()
        assert (request_id, error["code"], result) == (900, "bad_frame", None)
        _ping_is_answered(program)


def test_pipelined_requests_are_all_answered_before_exit_on_eof(config):
    program = ProgramProcess(config)
    burst = b"".join(
        encode_frame(encode_request(1000 + index, "jid_info", {"user": ALICE, "contact": f"c{index}@example.com"}))
        for index in range(300)
    )
    program.write(burst)
    program.process.stdin.close()
    out = program.process.stdout.read()  # everything the program ever wrote to stdout
    assert program.process.wait(10) == 0
    ids, offset = [], 0
    while offset < len(out):  # stdout holds frames and nothing else
        (length,) = HEADER.unpack_from(out, offset)
        message = decode_message(out[offset + HEADER.size : offset + HEADER.size + length])
        ids.append(message[1])
        offset += HEADER.size + length
    assert ids == list(range(1000, 1300))


def test_errors_are_replies(config):
    with ProgramProcess(config) as program:
        with pytest.raises(ProgramError) as caught:
            program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": "bad@@jid"}]})
        assert caught.value.error["stanza_error"]["condition"] == "jid-malformed"
        _ping_is_answered(program)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", *args], capture_output=True, text=True, timeout=30)


def test_check_says_what_it_would_serve(config):
    result = _run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "SQLite" in result.stdout and result.stdout.strip().endswith("ok")


def test_a_bad_config_is_refused_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[roster]\nversioning = 'yes'\n")
    result = _run_cli("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "versioning must be bool" in result.stderr
    assert result.stdout == ""
    missing = _run_cli("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_changes_made_outside_are_notified_and_own_changes_are_not(config, tmp_path):
    import time

    with ProgramProcess(config, hello=False) as program:
        hello = program.call("hello", {"protocols": [2], "shim": "test", "host": "example.com", "change_feed": True})
        assert hello["capabilities"]["notifications"] is True
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bob"}]})
        # Another application makes Carol Alice's friend in plain SQL, and renames Bob.
        started = time.monotonic()
        with sqlite3.connect(tmp_path / "rosters.sqlite") as outside:
            outside.execute(
                "INSERT INTO roster_items (user, contact, name, subscription) VALUES (?, ?, ?, ?)",
                (ALICE, "carol@example.com", "Carol", "both"),
            )
            outside.execute("UPDATE roster_items SET name = 'Robert' WHERE user = ? AND contact = ?", (ALICE, BOB))
        notification = program.read_message()
        assert time.monotonic() - started < 1.0
        assert notification[:2] == [2, "roster_changed"]
        params = notification[2]
        assert params["user"] == ALICE
        pushes = {effect["item"]["jid"]: effect["item"] for effect in params["effects"] if effect["type"] == "push"}
        assert pushes[BOB]["name"] == "Robert"
        assert pushes["carol@example.com"]["subscription"] == "both"
        assert {"type": "send_presence", "user": ALICE, "to": "carol@example.com"} in params["effects"]
        version = program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "get", "items": []})["ver"]
        assert {effect["ver"] for effect in params["effects"] if effect["type"] == "push"} == {version}

        # The program's own writes are pushed in their responses, never notified again.
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "subscription": "remove"}]})
        time.sleep(0.5)
        with sqlite3.connect(tmp_path / "rosters.sqlite") as outside:
            outside.execute("DELETE FROM roster_items WHERE user = ? AND contact = ?", (ALICE, "carol@example.com"))
        notification = program.read_message()
        assert notification[2]["effects"] == [
            {"type": "push", "user": ALICE, "ver": notification[2]["effects"][0]["ver"],
             "item": {"jid": "carol@example.com", "name": "", "subscription": "remove", "ask": None, "approved": False, "groups": []}},
            {"type": "send_unavailable", "user": ALICE, "to": "carol@example.com"},
        ]


def test_sigterm_stops_the_program_cleanly(config):
    import signal

    program = ProgramProcess(config)
    program.process.send_signal(signal.SIGTERM)
    assert program.process.wait(10) == 0


def test_a_change_made_through_another_node_is_notified_on_this_one(config):
    hello = {"protocols": [2], "shim": "test", "host": "example.com"}
    with ProgramProcess(config, hello=False) as node_a, ProgramProcess(config, hello=False) as node_b:
        node_a.call("hello", {**hello, "node": "ejabberd@a", "change_feed": True})
        node_b.call("hello", {**hello, "node": "ejabberd@b", "change_feed": True})
        result = node_a.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bob"}]})
        [push] = result["effects"]
        notification = node_b.read_message()
        assert notification == [2, "roster_changed", {"user": ALICE, "effects": [push]}]
        # Node A pushed its own change in the response: its feed stays quiet.
        node_b.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bobby"}]})
        assert node_a.read_message()[2]["effects"][0]["item"]["name"] == "Bobby"
        assert node_a.call("ping", {})["effects"] == []  # answered next: nothing else was waiting
