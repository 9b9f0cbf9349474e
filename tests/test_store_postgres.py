"""What only the PostgreSQL adapter does: migrations, triggers and NOTIFY seen from plain SQL, the
row lock, a server restarted under a running store.

The behaviour every adapter shares is checked by the contract suite (tests/store_contract.py).
Each test works in a fresh schema of the session's server (tests/pg_cluster.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import selectors
import threading
import time

import psycopg
import pytest

from roster_port.config import Config, ConfigError
from roster_port.store.base import OutsideChange, RosterRow, StoreError, StoreUnavailable
from roster_port.store import factory
from roster_port.store.pg_changes import install_change_log
from roster_port.store.postgres import MIGRATIONS, NOTIFY_CHANNEL, PostgresStore

pytestmark = pytest.mark.postgres

ALICE = "alice@example.com"
BOB = "bob@example.com"
CONNECT_TIMEOUT_S = 1.0


@pytest.fixture
def dsn(pg_server) -> str:
    """The DSN of a fresh, empty schema, dropped after the test."""
    schema = pg_server.create_schema()
    yield pg_server.dsn(schema)
    pg_server.drop_schema(schema)


@pytest.fixture
def open_store(dsn):
    """Opens PostgresStores on `dsn` and closes them after the test."""
    opened: list[PostgresStore] = []

    def open_(**options) -> PostgresStore:
        options.setdefault("connect_timeout_s", CONNECT_TIMEOUT_S)
        store = PostgresStore(dsn, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def outside_sql(dsn: str, query: str, parameters: tuple = ()) -> None:
    """Run one statement as another application would: its own connection, plain SQL."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(query, parameters)


def version(store: PostgresStore, user: str) -> str:
    with store.snapshot(user) as txn:
        return txn.version()


def put(store: PostgresStore, user: str, *rows: RosterRow) -> None:
    with store.transaction(user) as txn:
        for row in rows:
            txn.put(row)


def read_rows(store: PostgresStore, user: str) -> list[RosterRow]:
    with store.snapshot(user) as txn:
        return txn.rows()


# --- Schema and migrations ------------------------------------------------------------------


def applied_migrations(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(
            "SELECT number, name, applied_at FROM roster_port_migrations ORDER BY number"
        ).fetchall()


def test_opening_again_migrates_nothing_and_keeps_the_data(open_store, dsn):
    put(open_store(), ALICE, RosterRow("a@example.com"))
    applied = applied_migrations(dsn)
    assert [(number, name) for number, name, _ in applied] == [
        (migration.number, migration.name) for migration in MIGRATIONS]
    store = open_store()
    assert applied_migrations(dsn) == applied
    assert read_rows(store, ALICE) == [RosterRow("a@example.com")]
    assert version(store, ALICE) == "1"


def open_and_report(dsn: str, start, results) -> None:
    """Runs in another process: open a store on `dsn` at the same moment as the others."""
    try:
        start.wait(timeout=60)
        PostgresStore(dsn, connect_timeout_s=5).close()
        results.put("ok")
    except BaseException as exc:  # the parent only sees the queue
        results.put(repr(exc))


def test_processes_opening_a_fresh_database_together_migrate_it_once(dsn):
    # ejabberd starts its pool of program processes at once, on every node.
    processes_count = 4
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes_count), context.Queue()
    processes = [context.Process(target=open_and_report, args=(dsn, start, results))
                 for _ in range(processes_count)]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=60) for _ in processes]
    except queue.Empty:
        pytest.fail("a process neither opened the store nor reported an error in 60 s")
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert reports == ["ok"] * processes_count
    applied = applied_migrations(dsn)
    assert [number for number, _, _ in applied] == [migration.number for migration in MIGRATIONS]
    assert len({applied_at for _, _, applied_at in applied}) == 1  # all in one transaction


def test_a_read_only_store_refuses_a_database_whose_schema_is_not_current(dsn):
    with pytest.raises(StoreError, match="not current"):
        PostgresStore(dsn, read_only=True)
    with psycopg.connect(dsn) as connection:
        assert connection.execute("SELECT to_regclass('roster_items')").fetchone() == (None,)


def test_rows_that_the_program_could_not_read_are_refused_by_the_schema(open_store, dsn):
    open_store()
    bad_rows = [
        "INSERT INTO roster_items (username, contact, subscription) VALUES ('u', 'c', 'maybe')",
        "INSERT INTO roster_items (username, contact, groups) VALUES ('u', 'c', '{a,NULL}')",
        "INSERT INTO roster_items (username, contact, groups) VALUES ('u', 'c', '{{a},{b}}')",
        "INSERT INTO roster_items (username, contact, groups) VALUES ('u', 'c', NULL)",
        "INSERT INTO roster_items (username, contact, name) VALUES ('u', 'c', NULL)",
    ]
    for query in bad_rows:
        with pytest.raises(psycopg.DatabaseError):
            outside_sql(dsn, query)


def test_contacts_are_ordered_in_code_point_order_whatever_the_databases_collation(
        open_store, pg_server):
    if pg_server.cluster is None:
        pytest.skip("the collation of a server we did not make is not known")
    # The throwaway cluster's default collation (ICU en-US) orders these otherwise: the
    # contract's ordering test is only meaningful because of that.
    contacts = ["a-c@example.com", "Ab@example.com", "ab@example.com", "éa@example.com",
                "eb@example.com"]
    with psycopg.connect(pg_server.dsn()) as connection:
        by_default_collation = [contact for (contact,) in connection.execute(
            "SELECT contact FROM unnest(%s::text[]) AS contact ORDER BY contact", (contacts,))]
    assert by_default_collation != sorted(contacts)
    store = open_store()
    put(store, ALICE, *(RosterRow(contact) for contact in contacts))
    assert [row.contact for row in read_rows(store, ALICE)] == sorted(contacts)


# --- Versions and notifications seen from outside -------------------------------------------


def listen(dsn: str) -> psycopg.Connection:
    listener = psycopg.connect(dsn, autocommit=True)
    listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
    return listener


def received(listener: psycopg.Connection, timeout: float = 0.5) -> list[tuple[str, str]]:
    """The (channel, payload) of every notification received within `timeout`."""
    return [(notify.channel, notify.payload) for notify in listener.notifies(timeout=timeout)]


@pytest.mark.parametrize("query, parameters", [
    ("INSERT INTO roster_items (username, contact) VALUES (%s, %s)", (ALICE, "new@example.com")),
    ("UPDATE roster_items SET name = 'Renamed outside' WHERE username = %s", (ALICE,)),
    ("DELETE FROM roster_items WHERE username = %s", (ALICE,)),
])
def test_an_outside_write_moves_the_version_and_notifies_the_user(open_store, dsn, query,
                                                                   parameters):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    before = version(store, ALICE)
    with listen(dsn) as listener:
        outside_sql(dsn, query, parameters)
        assert received(listener) == [(NOTIFY_CHANNEL, ALICE)]
    assert int(version(store, ALICE)) > int(before)


def test_moving_a_row_to_another_user_moves_and_notifies_both(open_store, dsn):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    put(store, BOB, RosterRow("b@example.com"))
    alice_before, bob_before = version(store, ALICE), version(store, BOB)
    with listen(dsn) as listener:
        outside_sql(dsn, "UPDATE roster_items SET username = %s WHERE username = %s",
                    (BOB, ALICE))
        assert sorted(received(listener)) == [(NOTIFY_CHANNEL, ALICE), (NOTIFY_CHANNEL, BOB)]
    assert version(store, ALICE) != alice_before
    assert version(store, BOB) != bob_before


def test_a_truncate_moves_every_version_and_notifies_anyone(open_store, dsn):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    put(store, BOB, RosterRow("b@example.com"))
    alice_before, bob_before = version(store, ALICE), version(store, BOB)
    with listen(dsn) as listener:
        outside_sql(dsn, "TRUNCATE roster_items")
        # "" for anyone's, and the users whose rows the change log logged as deleted.
        assert sorted(received(listener)) == [(NOTIFY_CHANNEL, ""), (NOTIFY_CHANNEL, ALICE),
                                              (NOTIFY_CHANNEL, BOB)]
    assert version(store, ALICE) != alice_before
    assert version(store, BOB) != bob_before


def test_a_transaction_notifies_once_per_user_at_commit_only(open_store, dsn):
    store = open_store()
    with listen(dsn) as listener:
        with store.transaction(ALICE) as txn:
            txn.put(RosterRow("a@example.com"))
            txn.put(RosterRow("b@example.com"))
            txn.delete("a@example.com")
            assert received(listener, timeout=0.2) == []  # not before the commit
        assert received(listener) == [(NOTIFY_CHANNEL, ALICE)]
        with pytest.raises(ZeroDivisionError):
            with store.transaction(ALICE) as txn:
                txn.put(RosterRow("c@example.com"))
                raise ZeroDivisionError
        assert received(listener, timeout=0.2) == []  # rolled back: nothing to tell


def test_the_version_is_a_counter_kept_after_every_row_is_deleted(open_store, dsn):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"), RosterRow("b@example.com"))
    assert version(store, ALICE) == "2"
    with store.transaction(ALICE) as txn:
        txn.delete_all()
    assert version(store, ALICE) == "4"  # one per deleted row; the counter row stays
    with psycopg.connect(dsn) as connection:
        assert connection.execute("SELECT counter FROM roster_versions WHERE username = %s",
                                  (ALICE,)).fetchone() == (4,)


def test_version_and_count_inside_a_transaction_follow_its_writes(open_store, dsn):
    # The version comes with the lock and is read again after a write; a get of a missing
    # contact brings the count along (postgres.py, _PostgresTxn): neither may go stale.
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    with store.transaction(ALICE) as txn:
        assert txn.version() == "1"
        assert txn.get("b@example.com") is None
        assert txn.count() == 1
        txn.put(RosterRow("b@example.com"))
        assert (txn.version(), txn.count()) == ("2", 2)
        assert txn.get("a@example.com") == RosterRow("a@example.com")
        txn.delete("a@example.com")
        assert (txn.version(), txn.count()) == ("3", 1)
        txn.delete("nobody@example.com")  # nothing deleted: the version stays
        assert txn.version() == "3"
        assert txn.get("c@example.com") is None
        assert txn.count() == 1
    assert version(store, ALICE) == "3"
    with store.snapshot(ALICE) as txn:
        assert (txn.version(), txn.count()) == ("3", 1)


def _until_a_backend_waits_for_a_lock(dsn: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as watcher:
        while watcher.execute("SELECT count(*) FROM pg_stat_activity "
                              "WHERE wait_event_type = 'Lock'").fetchone()[0] == 0:
            assert time.monotonic() < deadline, "the waiter never waited for the lock"


def test_a_transaction_waiting_for_the_lock_reads_what_the_holder_committed(open_store, dsn):
    # The lock and the version come from one statement, sent with the scope's first read: the
    # reads after it must see the holder's writes, the version must be the holder's last.
    holder, waiter = open_store(), open_store()
    put(holder, ALICE, RosterRow("a@example.com", name="old"))
    seen: list = []
    entered = threading.Event()

    def wait_for_the_lock() -> None:
        entered.wait(timeout=10)
        with waiter.transaction(ALICE) as txn:
            seen.append((txn.get("a@example.com"), txn.count(), txn.version()))

    thread = threading.Thread(target=wait_for_the_lock)
    thread.start()
    with holder.transaction(ALICE) as txn:
        txn.put(RosterRow("a@example.com", name="new"))
        txn.put(RosterRow("b@example.com"))
        entered.set()
        _until_a_backend_waits_for_a_lock(dsn)  # the waiter is blocked on the lock meanwhile
    thread.join(timeout=10)
    assert seen == [(RosterRow("a@example.com", name="new"), 2, "3")]


def test_a_scope_that_runs_no_statement_sends_nothing(open_store, dsn):
    store = open_store()
    with store.transaction(ALICE):
        pass
    with psycopg.connect(dsn) as connection:  # not even the counter row was made
        assert connection.execute("SELECT count(*) FROM roster_versions").fetchone() == (0,)
    assert version(store, ALICE) == "0"


# --- Locks and concurrency ------------------------------------------------------------------


def test_two_stores_doing_read_modify_write_on_one_user_lose_no_update(open_store):
    # Two stores, as two ejabberd nodes would have, each used from its own thread.
    increments = 30
    stores = [open_store(), open_store()]
    versions: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def increment(store: PostgresStore) -> None:
        try:
            start.wait(timeout=10)
            for _ in range(increments):
                with store.transaction(ALICE) as txn:
                    row = txn.get("counter") or RosterRow("counter", name="0")
                    txn.put(row.evolve(name=str(int(row.name) + 1)))
                    versions.append(txn.version())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=increment, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures
    with stores[0].snapshot(ALICE) as txn:
        assert txn.get("counter").name == str(len(stores) * increments)
    assert len(set(versions)) == len(stores) * increments


def test_a_lock_held_too_long_gives_store_unavailable_and_only_for_that_user(open_store):
    holder, waiter = open_store(), open_store(lock_timeout_ms=200)
    put(holder, ALICE, RosterRow("a@example.com"))
    with holder.transaction(ALICE) as txn:
        txn.put(RosterRow("b@example.com"))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
            with waiter.transaction(ALICE) as other:
                other.put(RosterRow("c@example.com"))
        assert time.monotonic() - started < 2
        put(waiter, BOB, RosterRow("a@example.com"))  # another user does not wait
        assert read_rows(waiter, ALICE) == [RosterRow("a@example.com")]  # snapshots never wait
    put(waiter, ALICE, RosterRow("c@example.com"))
    assert len(read_rows(waiter, ALICE)) == 3


def test_a_transaction_the_server_aborted_is_never_reported_as_committed(open_store):
    store = open_store()
    with pytest.raises(StoreError, match="rolled back"):
        with store.transaction(ALICE) as txn:
            txn.put(RosterRow("a@example.com"))
            with pytest.raises(psycopg.errors.DivisionByZero):
                txn._connection.execute("SELECT 1 / 0")  # the caller goes on regardless
    assert read_rows(store, ALICE) == []
    put(store, ALICE, RosterRow("b@example.com"))  # the store is fine afterwards
    assert read_rows(store, ALICE) == [RosterRow("b@example.com")]


def test_a_scope_inside_another_in_the_same_thread_is_an_error(open_store):
    store = open_store()
    with store.transaction(ALICE) as txn:
        txn.put(RosterRow("a@example.com"))
        with pytest.raises(StoreError, match="already open"):
            with store.snapshot(BOB):
                pass
    assert version(store, ALICE) == "1"


# --- The server going away ------------------------------------------------------------------


@pytest.fixture
def cluster(pg_server):
    if pg_server.cluster is None:
        pytest.skip("the server of ROSTER_PORT_TEST_PG_DSN is not ours to restart")
    yield pg_server.cluster
    if not pg_server.cluster.running:  # a test that failed half-way
        pg_server.cluster.start()


def test_a_restart_while_idle_goes_unnoticed(open_store, cluster):
    store = open_store(pool_min=2, pool_max=2)
    put(store, ALICE, RosterRow("a@example.com"))
    cluster.restart()
    # Every pooled connection died: each is found out at BEGIN and exchanged for a new one.
    put(store, ALICE, RosterRow("b@example.com"))
    assert len(read_rows(store, ALICE)) == 2


def test_a_server_stopped_mid_use_gives_store_unavailable_then_the_same_store_works(
        open_store, cluster):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    before = version(store, ALICE)
    with pytest.raises(StoreUnavailable):
        with store.transaction(ALICE) as txn:
            txn.put(RosterRow("half@example.com"))
            cluster.stop()
            txn.put(RosterRow("written@example.com"))
    try:
        for operation in (lambda: read_rows(store, ALICE),
                          lambda: put(store, ALICE, RosterRow("b@example.com"))):
            started = time.monotonic()
            # Whichever finds it first: the pool (its reconnect failed) or a probe.
            with pytest.raises(StoreUnavailable,
                               match="(cannot|could not) connect.*unreachable for"):
                operation()
            # At once (a refused connection), not after the pool's timeout (connect_timeout_s).
            assert time.monotonic() - started < CONNECT_TIMEOUT_S / 2
    finally:
        cluster.start()
    # Back: nothing of the interrupted transaction was written; the same instance works.
    assert read_rows(store, ALICE) == [RosterRow("a@example.com")]
    assert version(store, ALICE) == before
    put(store, ALICE, RosterRow("b@example.com"))
    assert len(read_rows(store, ALICE)) == 2


def test_opening_while_the_server_is_down_gives_store_unavailable(dsn, cluster):
    cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            PostgresStore(dsn, connect_timeout_s=CONNECT_TIMEOUT_S)
        assert time.monotonic() - started < CONNECT_TIMEOUT_S + 1.5
    finally:
        cluster.start()


def test_a_store_waiting_for_its_database_opens_fails_fast_and_sets_it_up_once_back(
        dsn, cluster):
    cluster.stop()
    try:
        started = time.monotonic()
        store = PostgresStore(dsn, connect_timeout_s=CONNECT_TIMEOUT_S, wait_for_database=True)
        try:
            assert time.monotonic() - started < CONNECT_TIMEOUT_S
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="cannot connect"):
                    read_rows(store, ALICE)
                assert time.monotonic() - started < CONNECT_TIMEOUT_S / 2
        except BaseException:
            store.close()
            raise
    finally:
        cluster.start()
    try:
        # The first scope after the server is back sets the database up and is served.
        put(store, ALICE, RosterRow("a@example.com"))
        assert read_rows(store, ALICE) == [RosterRow("a@example.com")]
        assert [number for number, _, _ in applied_migrations(dsn)] == [
            migration.number for migration in MIGRATIONS]
    finally:
        store.close()


def test_a_scope_waits_for_a_lock_no_longer_than_its_callers_timeout(open_store, dsn):
    store = open_store(lock_timeout_ms=600_000)
    put(store, ALICE, RosterRow("a@example.com"))
    with psycopg.connect(dsn) as holder:  # another application, in a transaction
        holder.execute("SELECT 1 FROM roster_versions WHERE username = %s FOR UPDATE", (ALICE,))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="LockNotAvailable"):
            with store.transaction(ALICE, timeout=0.3) as txn:
                txn.put(RosterRow("b@example.com"))
        assert time.monotonic() - started < 1.5
        holder.rollback()
    # The setting was the transaction's only: the next scope waits as configured again.
    with store.transaction(ALICE) as txn:
        assert txn.rows() == [RosterRow("a@example.com")]


def test_a_mapping_found_not_to_fit_once_its_database_is_back_is_reported(dsn, cluster):
    from roster_port.store.base import StoreError
    from roster_port.store.mapped import MappedPostgresStore

    # ejabberd's mapping, on a schema without ejabberd's tables.
    with pytest.raises(StoreError, match="rosterusers"):
        MappedPostgresStore(dsn, mapping="ejabberd", connect_timeout_s=CONNECT_TIMEOUT_S)
    cluster.stop()
    try:
        store = MappedPostgresStore(dsn, mapping="ejabberd", connect_timeout_s=CONNECT_TIMEOUT_S,
                                    wait_for_database=True)
    finally:
        cluster.start()
    reported: queue.Queue = queue.Queue()
    try:
        store.set_failure_handler(reported.put)
        failure = reported.get(timeout=10)
        assert isinstance(failure, StoreError) and not isinstance(failure, StoreUnavailable)
        assert "rosterusers" in str(failure)
        with pytest.raises(StoreError, match="rosterusers"):
            read_rows(store, ALICE)
        # A handler set later hears of it at once.
        store.set_failure_handler(reported.put)
        assert reported.get(timeout=1) is failure
    finally:
        store.close()


# --- Configuration and description ----------------------------------------------------------


def test_describe_never_shows_the_password(dsn):
    store = PostgresStore(dsn + " password=s3cret-word", connect_timeout_s=CONNECT_TIMEOUT_S)
    try:
        description = store.describe()
    finally:
        store.close()
    assert "s3cret-word" not in description
    assert "PostgreSQL" in description and "\n" not in description


def test_the_factory_opens_a_postgres_store(dsn):
    store = factory.open_store(Config(store={"backend": "postgres", "dsn": dsn, "pool_max": 2,
                                             "connect_timeout_s": 1.5}))
    try:
        assert isinstance(store, PostgresStore)
        assert (store.pool_min, store.pool_max, store.connect_timeout_s) == (1, 2, 1.5)
    finally:
        store.close()


@pytest.mark.parametrize("options, message", [
    ({}, r"\[store\]\.dsn must be"),
    ({"dsn": ""}, r"\[store\]\.dsn must be"),
    ({"dsn": "host=x password = 'unterminated"}, "not a valid PostgreSQL connection string"),
    ({"dsn": "host=x", "pool_min": 0}, r"\[store\]\.pool_min must be a positive integer"),
    ({"dsn": "host=x", "pool_max": "4"}, r"\[store\]\.pool_max must be a positive integer"),
    ({"dsn": "host=x", "pool_min": 3, "pool_max": 2}, "must not exceed"),
    ({"dsn": "host=x", "connect_timeout_s": 0}, "connect_timeout_s must be a positive"),
    ({"dsn": "host=x", "connect_timeout_s": True}, "connect_timeout_s must be a positive"),
    ({"dsn": "host=x", "path": "roster.db"}, "unknown keys"),
])
def test_the_factory_refuses_bad_options_clearly(options, message):
    with pytest.raises(ConfigError, match=message) as raised:
        factory.open_store(Config(store={"backend": "postgres", **options}))
    assert "unterminated" not in str(raised.value)  # never echo a piece of the DSN


# --- The change log and its feed (pg_changes.py) --------------------------------------------


def feed_reads(feed, *, until: int = 1, timeout: float = 2.0) -> list[OutsideChange]:
    """What `feed` reports, as server.py reads it (woken by its fileno), until `until` changes
    came or `timeout` passed."""
    changes: list[OutsideChange] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(feed.fileno(), selectors.EVENT_READ)
        while len(changes) < until and (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining):
                changes += feed.read()
    return changes


def quiet(feed, wait: float = 0.3) -> list[OutsideChange]:
    """Whatever the feed reports within `wait` (expected: nothing)."""
    return feed_reads(feed, until=1, timeout=wait)


@pytest.fixture
def feed_of(open_store):
    feeds = []

    def open_(store: PostgresStore):
        feed = store.open_change_feed()
        feeds.append(feed)
        return feed

    yield open_
    for feed in feeds:
        feed.close()


def test_the_feed_reports_outside_writes_and_never_its_own_origins(open_store, feed_of, dsn):
    store = open_store()
    store.origin = "ejabberd@a"
    put(store, ALICE, RosterRow("bob@example.com", subscription="to"))
    feed = feed_of(store)
    assert quiet(feed) == []  # what was there before it opened is not news
    put(store, ALICE, RosterRow("bob@example.com", subscription="both"))  # our own write
    outside_sql(dsn, "INSERT INTO roster_items (username, contact, subscription) "
                     "VALUES (%s, %s, 'from')", (ALICE, "carol@example.com"))
    outside_sql(dsn, "UPDATE roster_items SET subscription = 'none' WHERE contact = %s",
                ("bob@example.com",))
    outside_sql(dsn, "DELETE FROM roster_items WHERE contact = %s", ("carol@example.com",))
    assert feed_reads(feed, until=3) == [
        OutsideChange(ALICE, "carol@example.com", None, "from"),
        OutsideChange(ALICE, "bob@example.com", "both", "none"),
        OutsideChange(ALICE, "carol@example.com", "from", None),
    ]
    assert quiet(feed) == []  # each once


def test_another_nodes_writes_are_reported_and_the_origin_is_transaction_local(
        open_store, feed_of, dsn):
    node_a, node_b = open_store(), open_store(pool_min=1, pool_max=1)
    node_a.origin, node_b.origin = "ejabberd@a", "ejabberd@b"
    feed_a = feed_of(node_a)
    put(node_b, ALICE, RosterRow("bob@example.com"))
    assert feed_reads(feed_a) == [OutsideChange(ALICE, "bob@example.com", None, "none")]
    # node_b's only connection goes back to the pool: the next writer, in plain SQL on it,
    # is not stamped (SET LOCAL ended with the transaction).
    with node_b._pool.connection() as connection:
        connection.execute("INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                           (BOB, "x@example.com"))
    assert feed_reads(feed_a) == [OutsideChange(BOB, "x@example.com", None, "none")]
    with psycopg.connect(dsn) as connection:
        origins = connection.execute(
            "SELECT contact, origin FROM roster_port_changes ORDER BY id").fetchall()
    assert origins == [("bob@example.com", "ejabberd@b"), ("x@example.com", None)]


def test_an_entry_whose_transaction_commits_after_a_later_one_was_read_is_reported(
        open_store, feed_of, dsn):
    # Ids come from a sequence at INSERT, not at COMMIT: "id > last id read" would skip `early`.
    feed = feed_of(open_store())
    with psycopg.connect(dsn) as early, psycopg.connect(dsn) as late:
        early.execute("INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                      (ALICE, "early@example.com"))
        late.execute("INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                     (BOB, "late@example.com"))
        late.commit()
        assert feed_reads(feed) == [OutsideChange(BOB, "late@example.com", None, "none")]
        early.commit()
        assert feed_reads(feed) == [OutsideChange(ALICE, "early@example.com", None, "none")]
    with psycopg.connect(dsn) as connection:
        ids = dict(connection.execute("SELECT contact, id FROM roster_port_changes").fetchall())
    assert ids["early@example.com"] < ids["late@example.com"]  # the case this test is about
    assert quiet(feed) == []


def test_a_row_moved_and_a_truncate_are_logged_as_removals_and_additions(open_store, feed_of,
                                                                          dsn):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com", subscription="both"))
    feed = feed_of(store)
    outside_sql(dsn, "UPDATE roster_items SET username = %s", (BOB,))
    assert feed_reads(feed, until=2) == [OutsideChange(ALICE, "a@example.com", "both", None),
                                         OutsideChange(BOB, "a@example.com", None, "both")]
    outside_sql(dsn, "TRUNCATE roster_items")
    assert feed_reads(feed) == [OutsideChange(BOB, "a@example.com", "both", None)]


def test_an_operators_own_trigger_feeds_the_change_log(open_store, feed_of, dsn):
    # The SQL of docs/changes.md, on a table of the operator's own.
    feed = feed_of(open_store())
    with psycopg.connect(dsn, autocommit=True) as connection:
        install_change_log(connection)  # again: idempotent
        connection.execute(DOCS_FRIENDSHIPS_SQL)
        connection.execute("INSERT INTO friendships VALUES ('alice@example.com', "
                           "'bob@example.com', 'both')")
        connection.execute("DELETE FROM friendships")
    assert feed_reads(feed, until=2) == [OutsideChange(ALICE, BOB, None, "both"),
                                         OutsideChange(ALICE, BOB, "both", None)]


DOCS_FRIENDSHIPS_SQL = """
CREATE TABLE friendships (owner text, friend text, state text);

CREATE FUNCTION friendships_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM roster_port_log_change(OLD.owner, OLD.friend, OLD.state, NULL);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM roster_port_log_change(NEW.owner, NEW.friend, NULL, NEW.state);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER friendships_log_change AFTER INSERT OR UPDATE OR DELETE ON friendships
FOR EACH ROW EXECUTE FUNCTION friendships_log_change();
"""


def test_the_feed_prunes_entries_older_than_a_day(open_store, feed_of, dsn):
    store = open_store()
    feed = feed_of(store)
    outside_sql(dsn, "INSERT INTO roster_port_changes (username, contact, recorded_at) "
                     "VALUES ('old@example.com', 'x@example.com', now() - interval '25 hours')")
    outside_sql(dsn, "INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                (ALICE, "new@example.com"))
    feed._next_prune = 0  # due
    assert feed_reads(feed, until=2) == [
        OutsideChange("old@example.com", "x@example.com", None, None),
        OutsideChange(ALICE, "new@example.com", None, "none")]
    with psycopg.connect(dsn) as connection:
        left = connection.execute("SELECT username FROM roster_port_changes").fetchall()
    assert left == [(ALICE,)]


def test_a_feed_whose_session_is_cut_reconnects_and_reports_what_was_logged_meanwhile(
        open_store, feed_of, dsn, caplog):
    caplog.set_level(logging.INFO, logger="roster_port.store.pg_changes")
    feed = feed_of(open_store())
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = 'roster-port feed'")
        # Written before the feed finds out: its notification goes to no one.
        admin.execute("INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                      (ALICE, "meanwhile@example.com"))
    assert feed_reads(feed, timeout=5) == [
        OutsideChange(ALICE, "meanwhile@example.com", None, "none")]
    assert "reconnected" in caplog.text
    outside_sql(dsn, "INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                (ALICE, "after@example.com"))
    assert feed_reads(feed) == [OutsideChange(ALICE, "after@example.com", None, "none")]


def test_a_feed_survives_a_server_restart_and_reads_on(open_store, feed_of, dsn, cluster):
    feed = feed_of(open_store())
    cluster.stop()
    try:
        # Woken by the broken connection; read() never raises, and reports nothing yet.
        assert feed_reads(feed, timeout=1.5) == []
    finally:
        cluster.start()
    outside_sql(dsn, "INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                (ALICE, "after-restart@example.com"))
    assert feed_reads(feed, timeout=10) == [
        OutsideChange(ALICE, "after-restart@example.com", None, "none")]
