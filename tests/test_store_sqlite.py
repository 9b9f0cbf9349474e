"""What only the SQLite adapter does: its schema, WAL, triggers seen from plain SQL, its file.

The behaviour every adapter shares is checked by the contract suite (tests/store_contract.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlite_utils

from roster_port.store.base import RosterRow, StoreError, StoreUnavailable
from roster_port.store.sqlite import MIGRATION_NAMES, SQLiteStore
from roster_port.store.sqlite_schema import SCHEMA

ALICE = "alice@example.com"
BOB = "bob@example.com"


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "roster.db")


@pytest.fixture
def open_store(db_path):
    """Opens SQLiteStores (on `db_path` unless told otherwise) and closes them after the test."""
    opened: list[SQLiteStore] = []

    def open_(path: str = db_path, **options) -> SQLiteStore:
        store = SQLiteStore(path, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def outside_sql(db_path: str, sql: str, parameters: tuple = ()) -> None:
    """Run one statement as another application would: plain sqlite3, its own connection."""
    connection = sqlite3.connect(db_path)
    try:
        with connection:
            connection.execute(sql, parameters)
    finally:
        connection.close()


def version(store: SQLiteStore, user: str) -> str:
    with store.snapshot(user) as txn:
        return txn.version()


def put(store: SQLiteStore, user: str, *rows: RosterRow) -> None:
    with store.transaction(user) as txn:
        for row in rows:
            txn.put(row)


# --- Schema and migrations ------------------------------------------------------------------


def applied_migrations(db_path: str) -> list[str]:
    connection = sqlite3.connect(db_path)
    try:
        return [name for (name,) in connection.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = ? ORDER BY id",
            (SCHEMA.name,))]
    finally:
        connection.close()


def test_opening_again_migrates_nothing_and_keeps_the_data(open_store, db_path):
    put(open_store(), ALICE, RosterRow("a@example.com"))
    fresh = sqlite_utils.Database(memory=True, execute_plugins=False)
    expected = [migration.name for migration in SCHEMA.pending(fresh)]
    assert applied_migrations(db_path) == expected
    store = open_store()
    assert applied_migrations(db_path) == expected
    with store.snapshot(ALICE) as txn:
        assert txn.rows() == [RosterRow("a@example.com")]
        assert txn.version() == "1"


def open_and_report(db_path: str, start, results) -> None:
    """Runs in another process: open a store on `db_path` at the same moment as the others."""
    try:
        start.wait(timeout=60)
        SQLiteStore(db_path).close()
        results.put("ok")
    except BaseException as exc:  # the parent only sees the queue
        results.put(repr(exc))


def test_processes_opening_a_fresh_file_together_migrate_it_once(db_path):
    # ejabberd starts its pool of program processes at once, on a file that may not exist yet.
    processes_count = 4
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes_count), context.Queue()
    processes = [context.Process(target=open_and_report, args=(db_path, start, results))
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
    assert len(applied_migrations(db_path)) == len(set(applied_migrations(db_path))) == len(MIGRATION_NAMES)


def test_opening_waits_for_another_process_holding_the_write_lock_before_wal(db_path):
    # What the pool meets on a fresh file: one process holds the write lock while the file is
    # still in rollback mode (it is switching or migrating), and SQLite answers the others'
    # switch to WAL with SQLITE_BUSY at once, without the busy timeout. They must wait.
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE other_application (x)")
    met_the_lock_or_done = threading.Event()
    opened: list[object] = []

    def open_store() -> None:
        try:
            opened.append(SQLiteStore(db_path, busy_timeout_ms=30_000))
        except StoreError as exc:
            opened.append(exc)
        met_the_lock_or_done.set()

    class OnWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting to switch it to WAL" in record.getMessage():
                met_the_lock_or_done.set()

    logger = logging.getLogger("roster_port.store.sqlite")
    handler, level = OnWaiting(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    opener = threading.Thread(target=open_store)
    try:
        opener.start()
        assert met_the_lock_or_done.wait(timeout=60)
    finally:
        other.execute("COMMIT")  # the other process is done: the opener goes on
        other.close()
        opener.join(timeout=60)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(opened) == 1 and isinstance(opened[0], SQLiteStore), opened
    opened[0].close()
    assert applied_migrations(db_path) == list(MIGRATION_NAMES)


def test_the_database_is_in_wal_mode_with_synchronous_normal(open_store, db_path):
    store = open_store()
    connection = sqlite3.connect(db_path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        connection.close()
    assert store._connection.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL


def test_rows_that_the_program_could_not_read_are_refused_by_the_schema(open_store, db_path):
    open_store()
    bad_rows = [
        "INSERT INTO roster_items (user, contact, subscription) VALUES ('u', 'c', 'maybe')",
        "INSERT INTO roster_items (user, contact, groups) VALUES ('u', 'c', 'not json')",
        "INSERT INTO roster_items (user, contact, groups) VALUES ('u', 'c', '{\"a\": 1}')",
        "INSERT INTO roster_items (user, contact, pending_in) VALUES ('u', 'c', 2)",
        "INSERT INTO roster_items (user, contact, name) VALUES ('u', 'c', NULL)",
    ]
    for sql in bad_rows:
        with pytest.raises(sqlite3.IntegrityError):
            outside_sql(db_path, sql)


# --- Versions seen from outside -------------------------------------------------------------


def test_the_version_is_a_counter_of_row_changes(open_store):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"), RosterRow("b@example.com"))
    assert version(store, ALICE) == "2"
    with store.transaction(ALICE) as txn:
        txn.delete_all()
    assert version(store, ALICE) == "4"  # one per deleted row; the counter row stays


def test_an_outside_update_moves_the_version_and_data_version(open_store, db_path):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    before_version, before_data_version = version(store, ALICE), store.data_version()
    outside_sql(db_path, "UPDATE roster_items SET name = ? WHERE user = ? AND contact = ?",
                ("Renamed outside", ALICE, "a@example.com"))
    assert store.data_version() != before_data_version
    assert version(store, ALICE) != before_version
    with store.snapshot(ALICE) as txn:
        assert txn.get("a@example.com").name == "Renamed outside"


def test_own_commits_do_not_move_data_version(open_store):
    store = open_store()
    before = store.data_version()
    put(store, ALICE, RosterRow("a@example.com"))
    assert store.data_version() == before


@pytest.mark.parametrize("sql, parameters", [
    ("INSERT INTO roster_items (user, contact) VALUES (?, ?)", (ALICE, "new@example.com")),
    ("INSERT OR REPLACE INTO roster_items (user, contact, name) VALUES (?, ?, 'x')",
     (ALICE, "a@example.com")),
    ("DELETE FROM roster_items WHERE user = ?", (ALICE,)),
])
def test_outside_inserts_replaces_and_deletes_move_the_version(open_store, db_path, sql,
                                                                parameters):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    before = version(store, ALICE)
    outside_sql(db_path, sql, parameters)
    assert int(version(store, ALICE)) > int(before)


def test_moving_a_row_to_another_user_moves_both_versions(open_store, db_path):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    put(store, BOB, RosterRow("b@example.com"))
    alice_before, bob_before = version(store, ALICE), version(store, BOB)
    outside_sql(db_path, "UPDATE roster_items SET user = ? WHERE user = ?", (BOB, ALICE))
    assert version(store, ALICE) != alice_before
    assert version(store, BOB) != bob_before


# --- The file and its connection ------------------------------------------------------------


def test_a_missing_directory_is_a_clear_error_at_open(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StoreUnavailable, match="directory .*/no/such/dir .*does not exist"):
        SQLiteStore(str(missing / "roster.db"))
    assert not missing.exists()


def test_a_read_only_store_never_creates_the_file(db_path):
    with pytest.raises(StoreUnavailable, match="does not exist"):
        SQLiteStore(db_path, read_only=True)
    assert not os.path.exists(db_path)


def test_a_read_only_store_opens_a_database_no_one_else_has_open(db_path):
    writer = SQLiteStore(db_path)
    put(writer, ALICE, RosterRow("a@example.com"))
    writer.close()  # the last connection to close removes the -wal and -shm files
    read_only = SQLiteStore(db_path, read_only=True)
    try:
        with read_only.snapshot(ALICE) as txn:
            assert txn.rows() == [RosterRow("a@example.com")]
    finally:
        read_only.close()


def test_a_read_only_store_refuses_a_database_whose_schema_is_not_current(db_path):
    sqlite3.connect(db_path).close()  # an empty database file
    with pytest.raises(StoreError, match="not current"):
        SQLiteStore(db_path, read_only=True)


def test_a_writer_holding_the_lock_too_long_gives_store_unavailable(open_store, db_path):
    store = open_store(busy_timeout_ms=50)
    put(store, ALICE, RosterRow("a@example.com"))
    other_writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        other_writer.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable, match="SQLITE_BUSY"):
            with store.transaction(ALICE) as txn:
                txn.put(RosterRow("b@example.com"))
        with store.snapshot(ALICE) as txn:  # WAL: readers do not wait for the writer
            assert txn.rows() == [RosterRow("a@example.com")]
    finally:
        other_writer.close()
    put(store, ALICE, RosterRow("b@example.com"))


def test_a_deleted_file_is_unavailable_and_never_recreated_empty(open_store, db_path):
    store = open_store()
    put(store, ALICE, RosterRow("a@example.com"))
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            with store.snapshot(ALICE) as txn:
                txn.rows()
    assert not os.path.exists(db_path)


def test_a_file_replaced_by_another_is_reopened(open_store, db_path, tmp_path):
    store = open_store()
    put(store, ALICE, RosterRow("old@example.com"))
    restored_path = str(tmp_path / "restored.db")
    restored = open_store(restored_path)
    put(restored, ALICE, RosterRow("restored@example.com"))
    restored.close()
    # As an operator restores a backup: the file and no stale write-ahead log of the old one.
    os.replace(restored_path, db_path)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.remove(db_path + suffix)
    with store.snapshot(ALICE) as txn:
        assert txn.rows() == [RosterRow("restored@example.com")]


def test_a_path_with_uri_special_characters_works(open_store, tmp_path):
    directory = tmp_path / "odd ?name#with%20chars"
    directory.mkdir()
    store = open_store(str(directory / "roster.db"))
    put(store, ALICE, RosterRow("a@example.com"))
    assert (directory / "roster.db").exists()


def test_a_scope_inside_another_on_the_same_store_is_an_error(open_store):
    store = open_store()
    with store.transaction(ALICE) as txn:
        txn.put(RosterRow("a@example.com"))
        with pytest.raises(StoreError, match="already open"):
            with store.snapshot(BOB):
                pass
    assert version(store, ALICE) == "1"


def test_the_store_can_be_used_from_another_thread(open_store):
    store = open_store()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            put(store, ALICE, RosterRow("a@example.com"))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert not failures
    assert version(store, ALICE) == "1"


def test_a_closed_store_refuses_work(db_path):
    store = SQLiteStore(db_path)
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        with store.snapshot(ALICE):
            pass


def test_the_migration_names_known_without_sqlite_utils_are_the_migrations():
    fresh = sqlite_utils.Database(memory=True, execute_plugins=False)
    assert tuple(migration.name for migration in SCHEMA.pending(fresh)) == MIGRATION_NAMES


def test_a_current_database_is_served_without_importing_sqlite_utils(db_path, tmp_path):
    """sqlite-utils (and what it imports) is most of a program process's memory."""
    SQLiteStore(db_path).close()  # migrates
    script = (
        "import sys\n"
        "from roster_port.store.sqlite import SQLiteStore\n"
        f"store = SQLiteStore({db_path!r})\n"
        "with store.transaction('a@example.com') as txn: txn.rows()\n"
        "store.close()\n"
        "assert 'sqlite_utils' not in sys.modules, 'sqlite_utils was imported'\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
