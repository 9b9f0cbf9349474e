"""One slow user never delays another: the executor, deadlines, and the real program held up
by a lock another application holds (SQLite's write lock; a PostgreSQL row lock).

Nothing here waits for a fixed time: a test holds a lock, sends requests, and waits for the
answers it expects (with a generous bound, so that a regression fails instead of hanging).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from roster_port.client import ProgramProcess
from roster_port.dispatcher import Answer, Dispatcher, Job
from roster_port.executor import PerKeyExecutor
from roster_port.framing import Frame
from roster_port.messages import decode_message, encode_request
from roster_port.roster import Rules

ALICE, BOB = "alice@example.com", "bob@example.com"
OTHERS = [f"user{index:02d}@example.com" for index in range(12)]
HELLO = {"protocols": [2], "shim": "test", "host": "example.com"}
WAIT_S = 30  # bound on waiting for an answer that must come


# --- The executor ------------------------------------------------------------------------------


def test_one_keys_jobs_run_in_order_and_other_keys_run_meanwhile():
    release_a = threading.Event()
    done: list[tuple[str, int]] = []
    done_lock = threading.Lock()
    all_b_done = threading.Event()

    def run(job):
        key, number = job
        if job == ("a", 0):
            assert release_a.wait(WAIT_S)
        with done_lock:
            done.append(job)
            if sum(1 for k, _ in done if k == "b") == 20:
                all_b_done.set()

    executor = PerKeyExecutor(run, threads=2, max_in_flight=100, max_per_key=50)
    try:
        for number in range(5):
            assert executor.submit("a", ("a", number))
        for number in range(20):
            assert executor.submit("b", ("b", number))
        # a's first job holds one thread; b's twenty run on the other, in order.
        assert all_b_done.wait(WAIT_S)
        assert [job for job in done if job[0] == "a"] == []
        release_a.set()
        assert executor.drain(WAIT_S)
        assert [n for k, n in done if k == "a"] == list(range(5))
        assert [n for k, n in done if k == "b"] == list(range(20))
    finally:
        release_a.set()
        executor.stop(WAIT_S)


def test_admission_is_bounded_in_all_and_per_key_and_never_blocks():
    release = threading.Event()
    executor = PerKeyExecutor(lambda job: release.wait(WAIT_S), threads=1, max_in_flight=5,
                              max_per_key=3)
    try:
        assert [executor.submit("a", n) for n in range(4)] == [True, True, True, False]
        assert [executor.submit("b", n) for n in range(3)] == [True, True, False]  # 5 in all
        assert executor.counts()[0] == 5
        release.set()
        assert executor.drain(WAIT_S)
        assert executor.submit("a", 9) and executor.drain(WAIT_S)
    finally:
        release.set()
        executor.stop(WAIT_S)


def test_stop_drops_what_has_not_started_and_waits_for_what_runs():
    started, release = threading.Event(), threading.Event()
    ran = []

    def run(job):
        ran.append(job)
        started.set()
        release.wait(WAIT_S)

    executor = PerKeyExecutor(run, threads=1, max_in_flight=10, max_per_key=10)
    for n in range(4):
        executor.submit("a", n)
    assert started.wait(WAIT_S)
    threading.Timer(0.05, release.set).start()
    assert executor.stop(WAIT_S) == 3
    assert ran == [0] and executor.counts() == (0, 0)
    assert not executor.submit("a", 5)


# --- Deadlines in the dispatcher ---------------------------------------------------------------


def _greeted(store) -> Dispatcher:
    dispatcher = Dispatcher(store, Rules())
    dispatcher.handle(Frame(encode_request(1, "hello", HELLO)))
    return dispatcher


def test_a_request_whose_deadline_passed_is_answered_timeout_and_changes_nothing(store):
    dispatcher = _greeted(store)
    args = {"user": ALICE, "type": "set", "items": [{"jid": BOB, "name": "Bob"}], "timeout_ms": 500}
    job = dispatcher.accept(Frame(encode_request(2, "roster_iq", args)), now=100.0)
    assert isinstance(job, Job) and job.deadline == pytest.approx(100.5)
    _, request_id, error, result = decode_message(dispatcher.run(job, store, now=100.5))
    assert (request_id, error["code"], result) == (2, "timeout", None)
    with store.snapshot(ALICE) as txn:
        assert txn.rows() == []
    # Within its deadline the same request is carried out.
    _, _, error, result = decode_message(dispatcher.run(job, store, now=100.499))
    assert error is None and [e["type"] for e in result["effects"]] == ["push"]


@pytest.mark.parametrize("timeout_ms", [-1, 1.5, "5000", True])
def test_a_timeout_ms_that_is_no_count_of_milliseconds_is_a_bad_request(store, timeout_ms):
    dispatcher = _greeted(store)
    answer = dispatcher.accept(Frame(encode_request(3, "roster_get", {"user": ALICE, "timeout_ms": timeout_ms})), 0.0)
    assert isinstance(answer, Answer)
    assert decode_message(answer.payload)[2]["code"] == "bad_request"


def test_ping_and_hello_are_answered_without_the_store(store):
    dispatcher = _greeted(store)
    dispatcher.status = lambda: {"in_flight": 7, "running": 4}
    answer = dispatcher.accept(Frame(encode_request(4, "ping", {"timeout_ms": 0})), 0.0)
    assert isinstance(answer, Answer)
    assert decode_message(answer.payload)[3] == {"effects": [], "in_flight": 7, "running": 4}


# --- The real program, held up by another application's lock -----------------------------------


class Reader:
    """The program's answers as they come, by id, read by a thread of the test."""

    def __init__(self, program: ProgramProcess) -> None:
        self.program = program
        self.answers: dict[int, list] = {}
        self.order: list[int] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.program.read_message(timeout=3600)
            except (EOFError, OSError, TimeoutError, ValueError):
                return
            if message[0] == 1:
                with self._cond:
                    self.answers[message[1]] = message
                    self.order.append(message[1])
                    self._cond.notify_all()

    def wait_for(self, ids, timeout: float = WAIT_S) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: all(i in self.answers for i in ids), timeout), (
                f"not answered: {[i for i in ids if i not in self.answers]}")

    def ping_until(self, counts: dict[str, int], timeout: float = WAIT_S) -> bool:
        """Ping until a ping reports `counts` (a worker writes its answer before it frees its
        request's place, so the counts of a ping that crossed that answer are one late)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ping = self.program.send("ping", {})
            self.wait_for([ping])
            if self.answers[ping][2] is None and self.answers[ping][3] == {"effects": [], **counts}:
                return True
        return False

    def has(self, request_id: int) -> bool:
        with self._cond:
            return request_id in self.answers


@contextlib.contextmanager
def write_lock_held(database) -> Iterator[None]:
    """Another application holds SQLite's write lock on `database` until the block ends."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _sqlite_config(tmp_path, *, busy_timeout_ms: int, extra: str = "") -> str:
    path = tmp_path / "roster-port.toml"
    path.write_text(
        f'[store]\nbackend = "sqlite"\npath = "rosters.sqlite"\nbusy_timeout_ms = {busy_timeout_ms}\n'
        f'{extra}[log]\nlevel = "debug"\nfile = "roster-port.log"\n')
    return str(path)


def _add(program: ProgramProcess, user: str, contact: str, **extra) -> int:
    return program.send("roster_iq", {"user": user, "requester": user, "type": "set",
                                      "items": [{"jid": contact, "name": "x"}], **extra})


def test_sqlite_readers_are_answered_while_one_writer_waits_for_another_process(tmp_path):
    config = _sqlite_config(tmp_path, busy_timeout_ms=60_000)
    with ProgramProcess(config, hello=False) as program:
        program.call("hello", HELLO)
        for user in OTHERS:  # rosters to read, written before the lock is taken
            program.call("roster_iq", {"user": user, "requester": user, "type": "set",
                                       "items": [{"jid": BOB, "name": "Bob"}]})
        reader = Reader(program)
        with write_lock_held(tmp_path / "rosters.sqlite"):
            stuck = _add(program, ALICE, BOB)
            # Alice's next request waits behind hers, and its deadline passes meanwhile.
            queued = program.send("roster_get", {"user": ALICE, "timeout_ms": 1})
            reads = [program.send("roster_get", {"user": user, "timeout_ms": 60_000}) for user in OTHERS]
            reader.wait_for(reads)
            for request_id in reads:
                assert reader.answers[request_id][2] is None
                assert [i["jid"] for i in reader.answers[request_id][3]["items"]] == [BOB]
            # Answered by the reading loop, workers busy or not: the stuck write and the request
            # queued behind it are all that is left.
            assert reader.ping_until({"in_flight": 2, "running": 1})
            assert not reader.has(stuck) and not reader.has(queued)
        reader.wait_for([stuck, queued])
        assert reader.answers[stuck][2] is None  # it got the lock once the other let go
        assert reader.answers[queued][2]["code"] == "timeout"
        assert reader.order.index(stuck) < reader.order.index(queued)  # one user's, in order


def test_a_subscription_presence_queued_past_its_deadline_is_still_applied(tmp_path):
    # Found in review: the shim has routed the presence (or will deliver it); refusing it as
    # `timeout` would leave the pair subscribed on one side only.
    config = _sqlite_config(tmp_path, busy_timeout_ms=60_000)
    with ProgramProcess(config, hello=False) as program:
        program.call("hello", HELLO)
        reader = Reader(program)
        with write_lock_held(tmp_path / "rosters.sqlite"):
            stuck = _add(program, ALICE, "carol@example.com")
            presence = program.send("out_subscription", {"user": ALICE, "contact": BOB,
                                                         "type": "subscribe", "timeout_ms": 1})
            read = program.send("roster_get", {"user": ALICE, "timeout_ms": 1})
            assert reader.ping_until({"in_flight": 3, "running": 1})
        reader.wait_for([stuck, presence, read])
        assert reader.answers[read][2]["code"] == "timeout"  # a read: nothing is lost
        assert reader.answers[presence][2] is None and reader.answers[presence][3]["route"] is True
    with sqlite3.connect(tmp_path / "rosters.sqlite") as db:
        assert db.execute("SELECT pending_out FROM roster_items WHERE user = ? AND contact = ?",
                          (ALICE, BOB)).fetchall() == [(1,)]


def test_writes_of_many_threads_all_go_through(tmp_path):
    config = _sqlite_config(tmp_path, busy_timeout_ms=60_000, extra="[serve]\nthreads = 8\n")
    with ProgramProcess(config, hello=False) as program:
        program.call("hello", HELLO)
        reader = Reader(program)
        ids = [_add(program, user, f"c{n}@example.com") for n in range(10) for user in OTHERS]
        reader.wait_for(ids)
        assert [reader.answers[i][2] for i in ids] == [None] * len(ids)
        gets = {user: program.send("roster_get", {"user": user}) for user in OTHERS}
        reader.wait_for(list(gets.values()))
        for user, request_id in gets.items():
            items = reader.answers[request_id][3]["items"]
            assert sorted(item["jid"] for item in items) == sorted(f"c{n}@example.com" for n in range(10))


def test_a_flood_of_one_users_requests_is_refused_beyond_its_bound_and_others_are_served(tmp_path):
    config = _sqlite_config(tmp_path, busy_timeout_ms=60_000,
                            extra="[serve]\nmax_in_flight = 50\nmax_in_flight_per_user = 10\n")
    with ProgramProcess(config, hello=False) as program:
        program.call("hello", HELLO)
        reader = Reader(program)
        with write_lock_held(tmp_path / "rosters.sqlite"):
            flood = [_add(program, ALICE, f"c{n}@example.com") for n in range(15)]
            others = [program.send("roster_get", {"user": user}) for user in OTHERS]
            reader.wait_for(others + flood[10:])
            assert [reader.answers[i][2]["code"] for i in flood[10:]] == ["overloaded"] * 5
            assert all(reader.answers[i][2] is None for i in others)
        reader.wait_for(flood[:10])
        assert all(reader.answers[i][2] is None for i in flood[:10])


@pytest.mark.postgres
def test_postgres_other_users_writes_are_answered_while_one_users_row_is_locked(tmp_path, pg_server):
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    try:
        path = tmp_path / "roster-port.toml"
        path.write_text(f'[store]\nbackend = "postgres"\ndsn = {json.dumps(dsn)}\n'
                        'lock_timeout_ms = 600000\n'
                        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n')
        with ProgramProcess(str(path), hello=False) as program:
            program.call("hello", HELLO)
            program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                       "items": [{"jid": BOB, "name": "Bob"}]})
            reader = Reader(program)
            with psycopg.connect(dsn) as holder:  # the operator's application, in a transaction
                holder.execute("SELECT 1 FROM roster_versions WHERE username = %s FOR UPDATE", (ALICE,))
                stuck = _add(program, ALICE, "carol@example.com")
                writes = [_add(program, user, BOB, timeout_ms=60_000) for user in OTHERS]
                reader.wait_for(writes)
                assert all(reader.answers[i][2] is None for i in writes)
                assert reader.ping_until({"in_flight": 1, "running": 1})
                assert not reader.has(stuck)
                holder.rollback()
            reader.wait_for([stuck])
            assert reader.answers[stuck][2] is None  # it got the lock once the other let go
    finally:
        pg_server.drop_schema(schema)
