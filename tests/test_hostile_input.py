"""Hostile input, one test per defect found (issue 8): frames, requests, stanza texts and rows
written by other applications that once crashed or bloated the program.

Memory is measured with tracemalloc (every Python object the decoder or a reader builds is
traced), never with wall-clock time.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
import tracemalloc

import msgpack
import pytest

from roster_port.client import ProgramProcess
from roster_port.framing import Frame, encode_frame
from roster_port.messages import decode_message, encode_request
from roster_port.roster import Rules
from roster_port.store.sqlite import SQLiteStore
from test_concurrency import write_lock_held
from test_dispatcher import ALICE, BOB, CAROL, Session, session_with
from test_store_sqlite import outside_sql

@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "rosters.sqlite")


@pytest.fixture
def store(db_path):
    store = SQLiteStore(db_path)
    yield store
    store.close()


def nested_arrays(depth: int) -> bytes:
    return b"\x91" * depth + b"\x90"


# --- 1. Frames that ended serve() -----------------------------------------------------------


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "roster-port.toml"
    path.write_text('[store]\npath = "rosters.sqlite"\n[log]\nfile = "roster-port.log"\n')
    return path


def test_a_deeply_nested_frame_and_an_array_as_map_key_cost_no_answer_and_no_process(config, tmp_path):
    with ProgramProcess(config) as program:
        # [0, 101, "roster_iq", {"user": ..., "pad": [[[...]]]}]: 500 arrays deep, ~540 bytes.
        nested = (b"\x94\x00\x65" + msgpack.packb("roster_iq") + b"\x82" + msgpack.packb("user")
                  + msgpack.packb(ALICE) + msgpack.packb("pad") + nested_arrays(500))
        set_bob = encode_request(100, "roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                                    "items": [{"jid": BOB, "name": "Bob"}]})
        # One read holds: a write, the nested frame, a map keyed by an array, a ping.
        program.write(encode_frame(set_bob) + encode_frame(nested)
                      + encode_frame(bytes.fromhex("81910101")) + encode_frame(encode_request(102, "ping", {})))
        answers = {message[1]: message for message in (program.read_message() for _ in range(3))}
        assert answers[100][2] is None and answers[100][3]["effects"]  # the write kept its answer
        assert answers[101][2]["code"] == "bad_frame"
        assert answers[102][2] is None
        assert program.call("roster_get", {"user": ALICE})["items"][0]["jid"] == BOB
        assert program.close() == 0
    assert "no request id" in (tmp_path / "roster-port.log").read_text()


def test_an_exception_anywhere_in_the_dispatcher_costs_one_answer_at_most(store, monkeypatch):
    session = Session(store, Rules())
    monkeypatch.setattr("roster_port.dispatcher.decode_request",
                        lambda payload: (_ for _ in ()).throw(RecursionError("deep")))
    assert session.dispatcher.handle(Frame(encode_request(7, "ping", {}))) is None


# --- 2. Stored rows no reader may crash on --------------------------------------------------


def test_groups_nested_a_thousand_deep_by_another_application_are_repaired_with_a_log_line(
        store, db_path, caplog):
    session = Session(store, Rules())
    feed = store.open_change_feed()
    try:
        session.set(ALICE, {"jid": BOB, "name": "Bob", "groups": ["Friends"]})
        deep = "[" * 1000 + "]" * 1000  # a JSON array: the table's CHECK lets it through
        outside_sql(db_path, "UPDATE roster_items SET groups = ? WHERE user = ? AND contact = ?",
                    (f'["Friends", {deep}]', ALICE, BOB))
        outside_sql(db_path, "INSERT INTO roster_items (user, contact, name, groups) VALUES (?, ?, ?, ?)",
                    (ALICE, CAROL, b"\xff\x00blob", '["Friends", 5, ["x"]]'))
        items = {item["jid"]: item for item in session.get(ALICE)["items"]}
        assert items[BOB]["groups"] == []
        assert items[CAROL]["groups"] == ["Friends"]  # the texts it held are kept
        assert isinstance(items[CAROL]["name"], str)
        # The change feed reads the same rows: it reports them instead of dying.
        notifications = session.dispatcher.notifications(feed.read())
        assert len(notifications) == 1
        pushed = [effect["item"]["jid"] for effect in decode_message(notifications[0])[2]["effects"]]
        assert sorted(pushed) == [BOB, CAROL]
    finally:
        feed.close()
    assert f"{ALICE}: stored row of '{BOB}': groups are not readable JSON" in caplog.text
    assert f"{ALICE}: stored row of '{CAROL}': groups are not a list of text" in caplog.text
    assert f"{ALICE}: stored row of '{CAROL}': name is bytes, not text" in caplog.text


def test_a_change_log_entry_with_a_blob_user_is_skipped(store, db_path):
    feed = store.open_change_feed()
    try:
        outside_sql(db_path, "INSERT INTO roster_items (user, contact) VALUES (?, ?)", (b"\x00", "c@d"))
        assert feed.read() == []
    finally:
        feed.close()


# --- 3. Strangers' requests and the roster size limit ---------------------------------------


def test_strangers_requests_never_take_the_users_own_roster_away(store):
    session = session_with(store, max_items=5, max_pending_requests=5)
    for index in range(6):
        delivered = session.inbound(ALICE, f"stranger{index}@spam.example", "subscribe")["deliver"]
        assert delivered is (index < 5)  # the sixth is over the requests' own bound: dropped
    assert len(session.ok("pending_in", {"user": ALICE})["requests"]) == 5
    # The user's own roster is untouched by them: a set, and a subscription to a new contact.
    assert session.set(ALICE, {"jid": BOB, "name": "Bob"})["effects"]
    assert session.out(ALICE, CAROL, "subscribe")["route"] is True
    for index in range(3):
        session.set(ALICE, {"jid": f"friend{index}@example.com"})
    assert session.set_error(ALICE, {"jid": "sixth@example.com"}) == "not-allowed"
    # A full roster still answers requests: approving one would add a sixth item, so it is not
    # applied, and the request stays.
    assert session.out(ALICE, "stranger0@spam.example", "subscribed")["route"] is False
    assert len(session.ok("pending_in", {"user": ALICE})["requests"]) == 5


# --- 4. Texts that are stored are bounded ---------------------------------------------------


def test_a_7_mib_subscription_request_text_is_cut_to_the_limit(store):
    session = Session(store, Rules())
    status = "x" * (7 * 1024 * 1024)
    assert session.inbound(ALICE, BOB, "subscribe", status=status)["deliver"] is True
    [request] = session.ok("pending_in", {"user": ALICE})["requests"]
    assert request["status"] == "x" * 1024
    # The storage API keeps a request's text as the presence path does (an XEP-0227 import of
    # stock ejabberd's data must not lose the item); tabs and line breaks are XML, and stay.
    record = {"jid": CAROL, "askmessage": "y" * 1025, "ask": "in"}
    session.ok("store_set_item", {"user": ALICE, "item": record})
    assert session.item(ALICE, CAROL)["askmessage"] == "y" * 1024
    session.inbound(ALICE, "dave@example.com", "subscribe", status="line one\n\tline two\x00")
    assert {r["from"]: r["status"] for r in session.ok("pending_in", {"user": ALICE})["requests"]}[
        "dave@example.com"] == "line one\n\tline two"


# --- 5. Caches keyed by what remote parties send --------------------------------------------


def test_reading_rows_with_long_group_lists_keeps_no_copy_of_them(store, db_path):
    # Longer than any group list the caches keep (sqlite.GROUPS_CACHE_LONG): the issue saw
    # 0.5 MB ones kept for good.
    groups = [json.dumps([f"{index}-{'g' * 3000}"] + [f"h{n}" for n in range(100)])
              for index in range(40)]
    connection = sqlite3.connect(db_path)
    with connection:
        connection.executemany("INSERT INTO roster_items (user, contact, groups) VALUES (?, ?, ?)",
                               [(ALICE, f"c{index}@example.com", text) for index, text in enumerate(groups)])
    connection.close()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            with store.snapshot(ALICE) as txn:
                assert len(txn.rows()) == 40
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 64 * 1024, f"{kept} bytes kept after the rows were dropped"


# --- 6. Control characters in names and groups ----------------------------------------------


@pytest.mark.parametrize("item", [
    {"jid": BOB, "name": "Bob\x00"},
    {"jid": BOB, "name": "line\nbreak"},
    {"jid": BOB, "groups": ["Friends\x07"]},
    {"jid": BOB, "groups": ["\x85"]},
])
def test_control_characters_in_names_and_groups_are_refused_and_nothing_is_stored(session_store, item):
    session = session_store
    assert session.set_error(ALICE, item) == "bad-request"
    assert session.ok("store_get_roster", {"user": ALICE})["items"] == []
    record = {**item, "subscription": "both"}
    assert session.stanza_error("store_set_item", {"user": ALICE, "item": record}) == "bad-request"
    assert session.ok("store_get_roster", {"user": ALICE})["items"] == []


@pytest.fixture
def session_store(store):
    return Session(store, Rules())


# --- 7. Wrong types in mod_roster's storage API ---------------------------------------------


@pytest.mark.parametrize("change", [
    {"approved": "false"}, {"approved": 0}, {"ask": [1]}, {"subscription": ["both"]},
    {"in_roster": "yes"},
])
def test_wrong_types_in_a_stored_record_are_bad_requests(session_store, change):
    record = {"jid": BOB, "name": "Bob", "subscription": "none", "ask": "none", **change}
    assert session_store.stanza_error("store_set_item", {"user": ALICE, "item": record}) == "bad-request"
    assert session_store.item(ALICE, BOB) is None


def test_a_record_without_approved_keeps_the_pre_approval(session_store):
    session = session_store
    session.out(ALICE, BOB, "subscribed")  # pre-approved (RFC 6121 3.4)
    assert session.item(ALICE, BOB)["approved"] is True
    # What the shim makes of ejabberd's #roster{} (an admin renaming the item): no `approved`.
    record = {key: value for key, value in session.item(ALICE, BOB).items()
              if key not in ("approved", "in_roster")}
    session.ok("store_set_item", {"user": ALICE, "item": {**record, "name": "Bob"}})
    assert session.item(ALICE, BOB)["approved"] is True
    assert session.item(ALICE, BOB)["name"] == "Bob"


# --- 8. A stranger's request read and written back through the storage API ------------------


@pytest.mark.parametrize("through", ["program", "ejabberd's #roster{}"])
def test_a_strangers_request_written_back_unchanged_stays_a_request(session_store, through):
    session = session_store
    session.inbound(ALICE, BOB, "subscribe", status="hi")
    record = session.item(ALICE, BOB)
    if through != "program":  # #roster{} has neither field: the shim sends neither
        record = {key: value for key, value in record.items() if key not in ("approved", "in_roster")}
    result = session.ok("store_set_item", {"user": ALICE, "item": record})
    assert result["effects"] == []  # nothing to push: no item
    assert session.ok("roster_get", {"user": ALICE})["items"] == []
    assert session.ok("pending_in", {"user": ALICE})["requests"] == [{"from": BOB, "status": "hi"}]


# --- 9. The cost of decoding is bounded before the op is known ------------------------------


def array16(items: bytes, count: int) -> bytes:
    return b"\xdc" + count.to_bytes(2, "big") + items


@pytest.mark.parametrize("filler", [b"\x90", b"\x80", b"\xa2ab", b"\xca\x00\x00\x00\x00"],
                         ids=["empty arrays", "empty maps", "short texts", "floats"])
def test_a_2_mib_frame_of_small_objects_costs_a_bounded_few_mib_to_refuse(store, filler):
    # Each byte or few of the frame would be an object of 30 to 60 bytes: arrays of 1,024
    # of them, in an array of as many of those as 2 MiB holds.
    inner = array16(filler * 1024, 1024)
    count = min(1024, (2 * 1024 * 1024) // len(inner))
    payload = (b"\x94\x00\x09" + msgpack.packb("ping") + b"\x81" + msgpack.packb("pad")
               + array16(inner * count, count))
    session = Session(store, Rules())
    gc.collect()
    tracemalloc.start()
    try:
        response = session.dispatcher.handle(Frame(payload))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _, request_id, error, _ = decode_message(response)
    assert (request_id, error["code"]) == (9, "bad_frame")
    assert peak < 8 * 1024 * 1024, f"refusing a {len(payload)}-byte frame peaked at {peak} bytes"


def test_an_array_announcing_four_billion_entries_is_refused_before_any_is_read(store):
    session = Session(store, Rules())
    payload = b"\x94\x00\x09" + msgpack.packb("ping") + b"\xdd\xff\xff\xff\xff"
    _, request_id, error, _ = decode_message(session.dispatcher.handle(Frame(payload)))
    assert (request_id, error["code"]) == (9, "bad_frame")


# --- 10. stdout hygiene whatever descriptors the process starts with ------------------------


def test_with_stderr_closed_at_start_no_descriptor_but_the_frames_one_is_the_protocol_pipe(tmp_path):
    config = tmp_path / "roster-port.toml"
    config.write_text('[store]\npath = "rosters.sqlite"\n')  # logs to stderr, which is closed
    process = subprocess.Popen(
        [sys.executable, "-m", "roster_port", "serve", "--config", str(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(2))
    try:
        process.stdin.write(encode_frame(encode_request(1, "hello", {"protocols": [2]})))
        process.stdin.flush()
        header = process.stdout.read(4)  # hello answered: the descriptors are set up
        assert len(header) == 4
        protocol_pipe = f"pipe:[{os.fstat(process.stdout.fileno()).st_ino}]"
        fds = {int(fd): os.readlink(f"/proc/{process.pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{process.pid}/fd")}
        assert fds[1] != protocol_pipe and fds[2] != protocol_pipe, fds
        assert [fd for fd, target in fds.items() if target == protocol_pipe and fd > 2] != []
    finally:
        process.stdin.close()
        assert process.wait(timeout=30) == 0
        process.stdout.close()


# --- Found on the way: answers held for one write are bounded -------------------------------


def test_answers_held_for_one_write_are_bounded_whatever_one_read_asks_for(tmp_path):
    # 64 KiB of roster_get requests may ask for thousands of large rosters: each answer is
    # written as soon as it is made, none is held for a later write.
    from roster_port.server import FrameWriter

    fd = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    try:
        writer, answer = FrameWriter(fd, lambda: None), b"x" * (1 << 17)
        for index in range(10):
            writer.add(answer)
            assert os.fstat(fd).st_size == (index + 1) * (len(answer) + 4)
    finally:
        os.close(fd)


def test_more_groups_than_a_request_may_carry_is_refused_at_start():
    from roster_port.config import ConfigError, parse_config
    from roster_port.messages import MAX_CONTAINER_LEN

    assert parse_config({"limits": {"max_groups": MAX_CONTAINER_LEN}}).limits.max_groups == MAX_CONTAINER_LEN
    with pytest.raises(ConfigError, match="max_groups must be at most"):
        parse_config({"limits": {"max_groups": MAX_CONTAINER_LEN + 1}})


def test_a_sigterm_while_a_request_is_stuck_ends_the_program_between_whole_frames(tmp_path):
    # Issue 8: the handlers that contain a request's failure swallowed a TERM. Issue 9 review:
    # a TERM raised wherever the main thread was could cut a frame in two. Now the handler only
    # sets a flag: the program stops between frames, gives the running request a grace time,
    # and exits 0 with nothing on stdout but whole frames.
    import signal

    config = tmp_path / "roster-port.toml"
    config.write_text('[store]\nbackend = "sqlite"\npath = "rosters.sqlite"\nbusy_timeout_ms = 600000\n'
                      '[log]\nlevel = "debug"\nfile = "roster-port.log"\n')
    program = ProgramProcess(str(config), hello=False)
    try:
        program.call("hello", {"protocols": [2], "host": "example.com"})
        with write_lock_held(tmp_path / "rosters.sqlite"):  # the write below waits for it
            program.send("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                       "items": [{"jid": BOB, "name": "Bob"}]})
            # Until a worker has taken the write up (it then waits for the lock).
            deadline = time.monotonic() + 30
            while program.call("ping", {})["running"] != 1:
                assert time.monotonic() < deadline, "the write was never taken up"
            program.process.send_signal(signal.SIGTERM)
            assert program.process.wait(timeout=60) == 0
        rest = program.process.stdout.read()  # whatever it wrote after the ping's answer
        offset = 0
        while offset < len(rest):  # whole frames only
            (length,) = struct.unpack_from(">I", rest, offset)
            assert offset + 4 + length <= len(rest), "a frame was cut"
            decode_message(rest[offset + 4:offset + 4 + length])
            offset += 4 + length
        log = (tmp_path / "roster-port.log").read_text()
        assert "stopped by SIGTERM" in log and "still running" in log
    finally:
        program.kill()


# --- Found in review: text that no encoder can write, stored by another application ---------


def test_a_lone_surrogate_escape_in_groups_and_text_that_is_not_utf8_are_read_past(store, db_path, caplog):
    session = Session(store, Rules())
    feed = store.open_change_feed()
    try:
        session.set(ALICE, {"jid": BOB, "name": "Bob", "groups": ["Friends"]})
        # json_valid takes a lone surrogate escape; a CAST makes text of bytes that are no UTF-8.
        outside_sql(db_path, "UPDATE roster_items SET groups = ? WHERE user = ? AND contact = ?",
                    ('["Friends", "\\ud800"]', ALICE, BOB))
        outside_sql(db_path, "INSERT INTO roster_items (user, contact, name) "
                             "VALUES (?, ?, CAST(x'ff41' AS TEXT))", (ALICE, CAROL))
        items = {item["jid"]: item for item in session.get(ALICE)["items"]}
        assert items[BOB]["groups"] == ["Friends"]
        assert items[CAROL]["name"] == "\ufffdA"
        outside_sql(db_path, "INSERT INTO roster_items (user, contact) VALUES (CAST(x'ff41' AS TEXT), ?)",
                    (CAROL,))
        changes = feed.read()
        assert {change.user for change in changes} == {ALICE, "\ufffdA"}
        notifications = session.dispatcher.notifications(changes)  # this host's users only
        assert [decode_message(n)[2]["user"] for n in notifications] == [ALICE]
        # A later change is still reported: the feed did not stop at the undecodable entry.
        outside_sql(db_path, "DELETE FROM roster_items WHERE user = ? AND contact = ?", (ALICE, CAROL))
        assert [change.contact for change in feed.read()] == [CAROL]
    finally:
        feed.close()
    assert "holds text that is not UTF-8" in caplog.text


# --- Found in review: answers the shim could not read, hellos of the wrong types ------------


def test_an_answer_over_the_shims_frame_limit_is_refused_not_sent(store):
    # The shim reads a frame over its max_frame_bytes as garbage and restarts the program.
    session = Session(store, Rules(), greet=False)
    session.ok("hello", {"protocols": [2], "host": "example.com", "max_frame_bytes": 2048})
    for index in range(40):
        session.set(ALICE, {"jid": f"friend{index}@example.com", "name": "x" * 40})
    error = session.error("roster_get", {"user": ALICE})
    assert error["code"] == "response_too_large" and "max_frame_bytes (2048)" in error["message"]
    assert session.ok("roster_get", {"user": BOB}) == {"items": [], "effects": []}


@pytest.mark.parametrize("offered", [[True], [2.0], ["2"]])
def test_a_hello_offering_no_integer_version_is_refused(store, offered):
    session = Session(store, Rules(), greet=False)
    assert session.error("hello", {"protocols": offered})["code"] == "unsupported_protocol"
    assert session.error("ping", {})["code"] == "bad_request"  # not greeted
