"""What only the PostgreSQL adapter does: migrations, triggers and NOTIFY seen from plain SQL, the
row lock, a server restarted under a running store.

The behaviour every adapter shares is checked by the contract suite (tests/store_contract.py).
Each test works in a fresh schema of the session's server (tests/pg_cluster.py).
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

import psycopg
import pytest

from roster_port.config import Config, ConfigError
from roster_port.store.base import RosterRow, StoreError, StoreUnavailable
from roster_port.store import factory
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
        assert received(listener) == [(NOTIFY_CHANNEL, "")]
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
            with pytest.raises(StoreUnavailable, match="no connection within"):
                operation()
            assert time.monotonic() - started < CONNECT_TIMEOUT_S + 1.5
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
