"""The real `roster-port serve` while its store is down or locked, spoken to over pipes as the
shim does: started while PostgreSQL is down, PostgreSQL stopped and started under it, a
mapping that does not fit, SQLite locked by another process for longer than a request's
deadline.

What must hold: hello and ping are answered whatever the store does; a request is answered
`store_unavailable` quickly (well within its `timeout_ms`) while the database is down, and by
its deadline while it is locked; the first request after the database accepts connections
again succeeds (the figure is printed: `-s` shows it); the change feed reads again and tells
the shim to drop its cache (`feed_resumed`); nothing acknowledged is lost.

The outages are real: the throwaway cluster is stopped with pg_ctl (tests/pg_cluster.py), and
SQLite's write lock is held by another connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo
import pytest

import pg_cluster
from roster_port.client import ProgramProcess
from roster_port.store.base import StoreUnavailable
from roster_port.store.sqlite import SQLiteChangeFeed, SQLiteStore
from test_concurrency import write_lock_held

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "social"
HELLO = {"protocols": [2], "shim": "test", "host": "example.com"}
TIMEOUT_MS = 5000  # the shim's default call_timeout
# While the database is down a request is answered at once (a refused connection, a few ms),
# not after the pool's timeout (connect_timeout_s = 1 below): this bound tells the two apart,
# with room for a loaded machine.
FAST_S = 0.9
# The target is 1 s from the moment the database accepts connections; asserted generously.
RECOVERY_BOUND_S = 5.0
WAIT_S = 30  # bound on waiting for what must come


class Shim:
    """The shim's side of one program process: calls with their answer times, and the
    notifications that came meanwhile."""

    def __init__(self, program: ProgramProcess) -> None:
        self.program = program
        self.notifications: list[list] = []

    def call(self, op: str, args: dict, timeout_ms: int = TIMEOUT_MS) -> tuple[dict | None, dict | None, float]:
        started = time.monotonic()
        request_id = self.program.send(op, {**args, "timeout_ms": timeout_ms})
        while True:
            message = self.program.read_message(timeout=WAIT_S)
            if message[0] == 2:
                self.notifications.append(message)
                continue
            assert message[1] == request_id, message
            return message[2], message[3], time.monotonic() - started

    def ok(self, op: str, args: dict) -> dict:
        error, result, _ = self.call(op, args)
        assert error is None, error
        return result

    def wait_for_notification(self, name: str, timeout: float = WAIT_S) -> list:
        """The first notification called `name` (read while pinging), or a failed test."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.notifications:
                if message[1] == name:
                    self.notifications.remove(message)
                    return message
            self.next_message(min(0.1, max(0.0, deadline - time.monotonic())))
        pytest.fail(f"no {name} notification within {timeout} s")

    def next_message(self, timeout: float) -> None:
        """Read what the program writes within `timeout`: only notifications are expected."""
        try:
            message = self.program.read_message(timeout=timeout)
        except TimeoutError:
            return
        assert message[0] == 2, message
        self.notifications.append(message)


def config_file(tmp_path: Path, store: str, extra: str = "") -> Path:
    path = tmp_path / "roster-port.toml"
    path.write_text(f"[store]\n{store}{extra}"
                    '[log]\nlevel = "debug"\nfile = "roster-port.log"\n', encoding="utf-8")
    return path


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "roster-port.log").read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def cluster(pg_server):
    if pg_server.cluster is None:
        pytest.skip("the server of ROSTER_PORT_TEST_PG_DSN is not ours to stop")
    yield pg_server.cluster
    if not pg_server.cluster.running:  # a test that failed half-way
        pg_server.cluster.start()


@pytest.fixture
def schema(pg_server):
    name = pg_server.create_schema()
    yield name
    pg_server.drop_schema(name)


# --- The three ways of storing rosters in PostgreSQL ------------------------------------------

ALICE, BOB = "alice@example.com", "bob@example.com"
SOCIAL_ALICE, SOCIAL_BOB = "alice@social.example", "bob@social.example"


def native_backend(dsn: str) -> tuple[str, str, str]:
    return f'backend = "postgres"\ndsn = {json.dumps(dsn)}\n', ALICE, BOB


def ejabberd_backend(dsn: str) -> tuple[str, str, str]:
    pg_cluster.load_ejabberd_schema(dsn)
    return (f'backend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\nmapping = "ejabberd"\n',
            ALICE, BOB)


def social_backend(dsn: str) -> tuple[str, str, str]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
        connection.execute("INSERT INTO users (username, display_name) "
                           "VALUES ('alice', 'Alice'), ('bob', 'Bob')")
    mapping = json.dumps(str(EXAMPLE / "mapping.toml"))
    return (f'backend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\nmapping = {mapping}\n',
            SOCIAL_ALICE, SOCIAL_BOB)


BACKENDS = {"postgres": native_backend, "ejabberd_mapping": ejabberd_backend,
            "social_mapping": social_backend}


def start_and_measure(cluster, admin_dsn: str, shim: Shim, op: str, args: dict
                      ) -> tuple[float, float, int]:
    """Start the stopped cluster while sending `op` until it succeeds. Returns (how long after
    the server first accepted a connection the first success came, the longest answer of the
    failures before it, how many there were); every failure must be store_unavailable."""
    accepted_at: list[float] = []
    done = threading.Event()

    def watch() -> None:  # the moment the server accepts connections
        while not done.is_set():
            try:
                psycopg.connect(admin_dsn, connect_timeout=2).close()
            except psycopg.Error:
                done.wait(0.005)  # the poll's interval
                continue
            accepted_at.append(time.monotonic())
            return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    starter = threading.Thread(target=cluster.start, daemon=True)
    starter.start()
    slowest, failures = 0.0, 0
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            error, _, took = shim.call(op, args)
            answered = time.monotonic()
            if error is None:
                break
            assert error["code"] == "store_unavailable", error
            slowest, failures = max(slowest, took), failures + 1
            assert answered < deadline, "no success after the server was started"
            shim.next_message(0.02)  # the next request a moment later (and notifications)
    finally:
        starter.join(WAIT_S)
        done.set()
        watcher.join(WAIT_S)
    assert cluster.running and accepted_at
    return answered - accepted_at[0], slowest, failures


def outage(shim: Shim, op: str, args: dict, seconds: float) -> tuple[float, int]:
    """Requests sent for `seconds` while the database is down: every one answered
    store_unavailable; returns the longest answer and the count."""
    slowest, count = 0.0, 0
    end = time.monotonic() + seconds
    while time.monotonic() < end or count < 3:
        error, result, took = shim.call(op, args)
        assert result is None and error["code"] == "store_unavailable", (error, result)
        slowest, count = max(slowest, took), count + 1
        shim.next_message(0.05)
    return slowest, count


# --- PostgreSQL down when the program starts --------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_a_program_started_while_postgresql_is_down_serves_as_soon_as_it_is_up(
        backend, pg_server, schema, cluster, tmp_path):
    store, user, contact = BACKENDS[backend](pg_server.dsn(schema))
    config = config_file(tmp_path, store, "connect_timeout_s = 1.0\n")
    cluster.stop()
    with ProgramProcess(config, hello=False) as program:
        shim = Shim(program)
        hello = shim.ok("hello", HELLO)
        assert hello["capabilities"] == {"versioning": True, "pre_approval": True,
                                         "notifications": False}
        assert shim.ok("ping", {})["effects"] == []
        slowest, count = outage(shim, "roster_get", {"user": user}, 1.0)
        assert slowest < FAST_S
        lag, slowest_after, _ = start_and_measure(cluster, pg_server.admin_dsn, shim,
                                                  "roster_get", {"user": user})
        print(f"\n{backend}: started with PostgreSQL down: {count} requests answered "
              f"store_unavailable in {max(slowest, slowest_after) * 1000:.0f} ms at most; "
              f"first success {lag * 1000:.0f} ms after the server accepted connections")
        assert max(slowest, slowest_after) < FAST_S
        assert lag < RECOVERY_BOUND_S
        # Set up (migrated, or the mapping checked) and serving, without a restart.
        shim.ok("out_subscription", {"user": user, "contact": contact, "type": "subscribe",
                                     "status": None})
        [item] = shim.ok("roster_get", {"user": user})["items"]
        assert item["jid"] == contact and item["ask"] == "subscribe"
        assert program.process.poll() is None
    assert "Traceback" not in log_of(tmp_path)


@pytest.mark.postgres
def test_the_feed_of_a_program_started_while_postgresql_is_down_says_when_it_reads(
        pg_server, schema, cluster, tmp_path):
    dsn = pg_server.dsn(schema)
    config = config_file(tmp_path, native_backend(dsn)[0], "connect_timeout_s = 1.0\n")
    cluster.stop()
    with ProgramProcess(config, hello=False) as program:
        shim = Shim(program)
        hello = shim.ok("hello", {**HELLO, "node": "ejabberd@a", "change_feed": True})
        # It will report changes once it can: the shim may keep a cache, and is told to drop
        # it when the feed reads (whatever was read before may miss a change).
        assert hello["capabilities"]["notifications"] is True
        start_and_measure(cluster, pg_server.admin_dsn, shim, "roster_get", {"user": ALICE})
        started = time.monotonic()
        assert shim.wait_for_notification("feed_resumed", RECOVERY_BOUND_S) == [
            2, "feed_resumed", {"effects": []}]
        print(f"\nfeed_resumed {(time.monotonic() - started) * 1000:.0f} ms after the first "
              "success")
        with psycopg.connect(dsn, autocommit=True) as outside:
            outside.execute("INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                            (ALICE, BOB))
        [_, _, params] = shim.wait_for_notification("roster_changed", 2.0)
        assert params["user"] == ALICE and params["effects"][0]["item"]["jid"] == BOB


# --- PostgreSQL stopped and started under a running program -----------------------------------


@pytest.mark.postgres
def test_postgresql_stopped_under_a_program_fails_requests_fast_and_recovers_at_once(
        pg_server, schema, cluster, tmp_path):
    dsn = pg_server.dsn(schema)
    config = config_file(tmp_path, native_backend(dsn)[0], "connect_timeout_s = 1.0\n")
    with ProgramProcess(config, hello=False) as program:
        shim = Shim(program)
        shim.ok("hello", {**HELLO, "node": "ejabberd@a", "change_feed": True})
        shim.ok("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                              "items": [{"jid": BOB, "name": "Bob"}]})
        cluster.stop()
        # Long enough for a feed reconnecting with a growing back-off to fall behind.
        set_bob = {"user": ALICE, "requester": ALICE, "type": "set",
                   "items": [{"jid": BOB, "name": "Robert"}]}
        slowest, count = outage(shim, "roster_iq", set_bob, 4.0)
        assert slowest < FAST_S, f"a request took {slowest:.2f} s to fail"
        assert shim.ok("ping", {})["effects"] == []
        lag, slowest_after, _ = start_and_measure(cluster, pg_server.admin_dsn, shim,
                                                  "roster_get", {"user": ALICE})
        # A change made outside as soon as the server is back is notified.
        changed = time.monotonic()
        with psycopg.connect(dsn, autocommit=True) as outside:
            outside.execute("UPDATE roster_items SET name = 'Bobby' WHERE username = %s",
                            (ALICE,))
        [_, _, params] = shim.wait_for_notification("roster_changed", RECOVERY_BOUND_S)
        notified = time.monotonic() - changed
        shim.wait_for_notification("feed_resumed", RECOVERY_BOUND_S)
        print(f"\nPostgreSQL stopped for about 4 s: {count} requests answered store_unavailable "
              f"in {max(slowest, slowest_after) * 1000:.0f} ms at most; first success "
              f"{lag * 1000:.0f} ms after the server accepted connections; an outside change "
              f"notified {notified * 1000:.0f} ms after it was made")
        assert max(slowest, slowest_after) < FAST_S
        assert lag < RECOVERY_BOUND_S
        assert notified < 2.0  # the feed reconnects within 0.5 s of the server's return
        assert params["effects"][0]["item"]["name"] == "Bobby"
        # Nothing that failed was written; what was acknowledged before is there.
        [item] = shim.ok("roster_get", {"user": ALICE})["items"]
        assert (item["jid"], item["name"]) == (BOB, "Bobby")
    assert "Traceback" not in log_of(tmp_path)


# --- A store that is misconfigured rather than down --------------------------------------------


@pytest.mark.postgres
def test_a_mapping_that_does_not_fit_ends_the_program_with_a_clear_line(
        pg_server, schema, cluster, tmp_path):
    # ejabberd's mapping on a schema without ejabberd's tables: reached, and it cannot serve.
    dsn = pg_server.dsn(schema)
    config = config_file(tmp_path, f'backend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\n'
                                   'mapping = "ejabberd"\n', "connect_timeout_s = 1.0\n")
    with ProgramProcess(config, hello=False) as program:
        assert program.process.wait(WAIT_S) == 1
    text = log_of(tmp_path)
    assert "cannot serve rosters" in text and "rosterusers" in text and "Traceback" not in text
    # The same, found once a database that was down comes back.
    (tmp_path / "roster-port.log").unlink()
    cluster.stop()
    with ProgramProcess(config, hello=False) as program:
        shim = Shim(program)
        shim.ok("hello", HELLO)
        error, _, _ = shim.call("roster_get", {"user": ALICE})
        assert error["code"] == "store_unavailable"
        cluster.start()
        assert program.process.wait(WAIT_S) == 1
    text = log_of(tmp_path)
    assert "cannot serve rosters" in text and "rosterusers" in text and "Traceback" not in text


@pytest.mark.postgres
def test_a_database_that_does_not_exist_yet_is_waited_for(pg_server, tmp_path):
    # Refused for a missing database (or a bad password: libpq says which, with no SQLSTATE)
    # is treated as unreachable: put right, it is served without a restart.
    name = f"roster_port_later_{int(time.monotonic() * 1000) % 10**9}"
    dsn = make_conninfo(pg_server.admin_dsn, dbname=name)
    config = config_file(tmp_path, native_backend(dsn)[0])
    try:
        with ProgramProcess(config, hello=False) as program:
            shim = Shim(program)
            shim.ok("hello", HELLO)
            error, _, took = shim.call("roster_get", {"user": ALICE})
            assert error["code"] == "store_unavailable" and f'"{name}" does not exist' in error["message"]
            assert took < FAST_S
            with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            deadline = time.monotonic() + WAIT_S
            while (answer := shim.call("roster_get", {"user": ALICE}))[0] is not None:
                assert answer[0]["code"] == "store_unavailable" and time.monotonic() < deadline
                shim.next_message(0.02)
            assert answer[1]["items"] == []
    finally:
        with psycopg.connect(pg_server.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- SQLite locked by another process -----------------------------------------------------------


def test_sqlite_locked_longer_than_a_request_deadline_answers_by_the_deadline(tmp_path):
    # A busy timeout far longer than the shim waits: the deadline bounds the wait instead.
    config = config_file(tmp_path, 'backend = "sqlite"\npath = "rosters.sqlite"\n'
                                   'busy_timeout_ms = 60000\n')
    with ProgramProcess(config, hello=False) as program:
        shim = Shim(program)
        shim.ok("hello", HELLO)
        shim.ok("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                              "items": [{"jid": BOB, "name": "Bob"}]})
        with write_lock_held(tmp_path / "rosters.sqlite"):
            answers = {}
            for op, args in [
                ("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                               "items": [{"jid": "carol@example.com"}]}),
                ("in_subscription", {"user": ALICE, "contact": "dave@example.com",
                                     "type": "subscribe", "status": None}),
            ]:
                error, _, took = shim.call(op, args, timeout_ms=500)
                answers[op] = took
                assert error["code"] == "store_unavailable" and "locked" in error["message"]
                # By the deadline (not the 60 s busy timeout), give or take a loaded machine.
                assert took < 0.5 + 1.0
            assert shim.ok("ping", {})["effects"] == []
            # Reads need no write lock (WAL): served meanwhile.
            assert [item["jid"] for item in shim.ok("roster_get", {"user": ALICE})["items"]] == [BOB]
        print(f"\nSQLite locked: answered store_unavailable after "
              f"{', '.join(f'{op} {took * 1000:.0f} ms' for op, took in answers.items())} "
              "(timeout_ms 500)")
        # Nothing acknowledged lost, nothing refused written; the store serves on.
        assert [item["jid"] for item in shim.ok("roster_get", {"user": ALICE})["items"]] == [BOB]
        assert shim.ok("pending_in", {"user": ALICE})["requests"] == []
        shim.ok("in_subscription", {"user": ALICE, "contact": "dave@example.com",
                                    "type": "subscribe", "status": None})
        assert shim.ok("pending_in", {"user": ALICE})["requests"] == [
            {"from": "dave@example.com", "status": ""}]


def test_a_sqlite_scope_waits_for_the_write_lock_no_longer_than_its_timeout(tmp_path):
    store = SQLiteStore(str(tmp_path / "rosters.sqlite"), busy_timeout_ms=60_000)
    try:
        with write_lock_held(tmp_path / "rosters.sqlite"):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                with store.transaction(ALICE, timeout=0.3):
                    pass
            assert time.monotonic() - started < 1.0
            with store.snapshot(ALICE, timeout=0.3) as txn:  # readers never wait (WAL)
                assert txn.rows() == []
        with store.transaction(ALICE, timeout=0.3) as txn:  # the busy timeout is back
            assert txn.rows() == []
    finally:
        store.close()


def test_the_sqlite_feed_never_holds_the_serving_loop_for_a_locked_prune(tmp_path):
    # The feed is read by the loop that answers pings: its prune must not wait the busy
    # timeout for a lock another process holds, and the entries read with it are not lost.
    path = str(tmp_path / "rosters.sqlite")
    store = SQLiteStore(path, busy_timeout_ms=60_000)
    feed = SQLiteChangeFeed(path, origin="ejabberd@a", busy_timeout_ms=60_000)
    try:
        feed._polls = SQLiteChangeFeed.PRUNE_EVERY - 1  # the next read prunes
        with sqlite3.connect(path) as outside:
            outside.execute("INSERT INTO roster_items (user, contact) VALUES (?, ?)", (ALICE, BOB))
        with write_lock_held(path):
            started = time.monotonic()
            changes = feed.read()
            assert time.monotonic() - started < 1.0
        assert [(change.user, change.contact) for change in changes] == [(ALICE, BOB)]
    finally:
        feed.close()
        store.close()
