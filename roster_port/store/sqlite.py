"""The SQLite adapter: every user's roster in one SQLite file, shared by all program processes.

Theory of operation
-------------------
ejabberd runs a pool of program processes; each one opens its own `SQLiteStore`, which holds one
connection to the same database file. The file is in WAL mode, so readers never wait for the
writer and the writer never waits for readers.

- `transaction(user)` runs `BEGIN IMMEDIATE`: it takes SQLite's single write lock *before* the
  first read, so a read-modify-write from one process can never interleave with another's (with
  a deferred BEGIN, two processes could both read, then one would fail to upgrade to a writer).
  Waiting for the lock is bounded by the busy timeout, and by what is left of the request's
  deadline (the scope's `timeout`); waiting longer is `StoreUnavailable`.
- `snapshot(user)` runs a deferred `BEGIN`: a consistent read that takes no write lock. Its
  `RosterTxn` refuses writes.
- Versions are kept by the database, not by this code: triggers on `roster_items` bump the
  user's counter in `roster_versions` on every INSERT, UPDATE and DELETE, so a write made by any
  other application in plain SQL moves the version too. The counter row is never deleted, so a
  version never comes back, even after every row of the user is gone.
- The schema is created and upgraded by sqlite-utils' `Migrations` (recorded in its
  `_sqlite_migrations` table). Pending migrations are applied inside one `BEGIN IMMEDIATE`
  transaction, so processes started together on a fresh file migrate it exactly once.
- Each scope first checks that the path still names the file the connection has open. A file
  that is gone (its directory removed or renamed, a volume unmounted) is `StoreUnavailable` until
  it is back; a file replaced by another one is reopened. (Replace a database together with its
  -wal and -shm files, or a stale log of the old file is read with the new one: that is SQLite's
  rule, not ours.)

What this module must never do
------------------------------
- Let a `sqlite3` exception escape: every driver error becomes `StoreUnavailable` (cannot reach
  the file, locked for too long, I/O failure, disk full) or `StoreError` (anything else).
- Commit a scope that raised, or leave a transaction open after a scope ends.
- Create a database file anywhere but at first open: after the file disappears, it never
  silently starts a new, empty one in its place.
- Build SQL from data: every value is a bound parameter.
- Write to stdout (it is the program's protocol channel); it only logs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from roster_port.store.base import (
    DEFAULT_ORIGIN,
    ChangeFeed,
    OutsideChange,
    RosterRow,
    RosterStore,
    RosterTxn,
    StoreError,
    StoreUnavailable,
    stored_elements,
    stored_groups,
    stored_text,
)

log = logging.getLogger(__name__)

# --- Schema ---------------------------------------------------------------------------------
# The migrations live in sqlite_schema.py, imported only when one is pending. Their names, in
# order, are listed here so that an up-to-date database is recognised without importing them.

MIGRATION_SET = "roster_port"
MIGRATION_NAMES = (
    "0001_roster_items",
    "0002_roster_versions",
    "0003_version_triggers",
    "0004_roster_changes",
    "0005_request_elements",
    "0006_roster_changes_by_user",
)


# --- Errors ---------------------------------------------------------------------------------

# Primary result codes that mean "the database cannot be used right now" rather than "this
# request or this program is wrong".
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,  # locked by another writer for longer than the busy timeout
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_READONLY,  # file or file system became read-only, file moved (DBMOVED)
    }
)
# Of those, the ones after which the connection itself is suspect and is reopened next time.
_RECONNECT_CODES = _UNAVAILABLE_CODES - {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


_SELECT_COLUMNS = (
    "contact, name, subscription, pending_out, pending_in, approved, in_roster, groups, "
    "request_text, request_elements"
)


# Group lists are cached parsed: a site has few distinct ones, and parsing JSON is most of
# reading a row. Two caches, bounded by what their keys may hold whatever the rows hold: short
# lists (most) in many entries, longer ones in fewer; longer still are parsed at each read.
# At 4 bytes a character (the costliest text), key and value: under 10 MB and 5 MB.
GROUPS_CACHE_SHORT = (4096, 256)  # (entries, characters of the JSON text)
GROUPS_CACHE_LONG = (256, 2048)


def _parse_groups(text: str) -> tuple[str, ...] | None:
    """The groups of a JSON text, or None when it is not a JSON list of texts UTF-8 can hold."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return None
    if type(value) is not list or not all(type(group) is str for group in value):
        return None
    if "\\u" in text and not all(_is_utf8(group) for group in value):
        return None  # a lone surrogate escape: json_valid takes it, no encoder does
    return tuple(value)


_short_groups = functools.lru_cache(maxsize=GROUPS_CACHE_SHORT[0])(_parse_groups)
_long_groups = functools.lru_cache(maxsize=GROUPS_CACHE_LONG[0])(_parse_groups)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _groups_from_json(value: object, user: str, contact: object) -> tuple[str, ...]:
    if type(value) is str:
        if len(value) <= GROUPS_CACHE_SHORT[1]:
            groups = _short_groups(value)
        elif len(value) <= GROUPS_CACHE_LONG[1]:
            groups = _long_groups(value)
        else:
            groups = _parse_groups(value)
        if groups is not None:
            return groups
    # Not a list of texts: the CHECK lets any JSON array through, and a blob past it.
    try:
        parsed = json.loads(value) if isinstance(value, (str, bytes)) else value
    except (ValueError, RecursionError) as exc:
        log.warning("%s: stored row of %r: groups are not readable JSON (%s); read as ()",
                    user, contact, type(exc).__name__)
        return ()
    if isinstance(parsed, list):
        parsed = [group for group in parsed if type(group) is not str or _is_utf8(group)]
    return stored_groups(parsed, user, contact)


def _is_decoding_error(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and str(exc).startswith(
        "Could not decode to UTF-8")


def _lenient_text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def _elements_from_json(value: object, user: str, contact: object) -> tuple[str, ...]:
    if value == "[]":  # most rows: no pending request kept whole
        return ()
    try:
        parsed = json.loads(value) if isinstance(value, (str, bytes)) else value
    except (ValueError, RecursionError) as exc:
        log.warning("%s: stored row of %r: request_elements are not readable JSON (%s); "
                    "read as ()", user, contact, type(exc).__name__)
        return ()
    if isinstance(parsed, list):
        parsed = [element for element in parsed if type(element) is not str or _is_utf8(element)]
    return stored_elements(parsed, user, contact)


def _row_from_record(record: tuple, user: str) -> RosterRow:
    (contact, name, subscription, pending_out, pending_in, approved, in_roster, groups, text,
     elements) = record
    if not (type(contact) is str and type(name) is str and type(text) is str):
        contact = stored_text(contact, user, contact, "contact")
        name = stored_text(name, user, contact, "name")
        text = stored_text(text, user, contact, "request_text")
    return RosterRow(
        contact,
        name,
        subscription,
        bool(pending_out),
        bool(pending_in),
        bool(approved),
        bool(in_roster),
        _groups_from_json(groups, user, contact),
        text,
        _elements_from_json(elements, user, contact),
    )


class _SQLiteTxn(RosterTxn):
    """One user's roster inside one open SQLite transaction of `store`'s connection."""

    keeps_request_elements = True

    def __init__(self, store: "SQLiteStore", connection: sqlite3.Connection, user: str,
                 refuse_writes_because: str | None) -> None:
        self.user = user
        self._store = store
        self._connection = connection
        self._refuse_writes_because = refuse_writes_because
        self._open = True
        self._own_changes_after: int | None = None  # roster_changes.id before our first write

    def _execute(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        if not self._open:
            raise StoreError(f"the transaction on {self.user!r} is over; open a new one")
        with self._store._translated_errors():
            return self._connection.execute(sql, parameters)

    def _check_writable(self, operation: str) -> None:
        if self._refuse_writes_because is not None:
            raise StoreError(f"{operation} refused: {self._refuse_writes_because}")
        if self._own_changes_after is None:
            self._own_changes_after = self._execute(
                "SELECT coalesce(max(id), 0) FROM roster_changes"
            ).fetchone()[0]

    def _stamp_own_changes(self) -> None:
        """Stamp the change-log entries this transaction's writes made with our origin: we hold
        the write lock (BEGIN IMMEDIATE), so every entry after the mark is ours."""
        if self._own_changes_after is not None:
            self._execute(
                "UPDATE roster_changes SET origin = ? WHERE id > ? AND user = ?",
                (self._store.origin, self._own_changes_after, self.user),
            )

    def _records(self, sql: str, parameters: tuple) -> list[tuple]:
        """All records of a read of rows, whatever bytes other applications stored as text."""
        try:
            with self._store._translated_errors(ignore=_is_decoding_error):
                return self._execute(sql, parameters).fetchall()
        except sqlite3.OperationalError:
            pass
        # A TEXT value that is not UTF-8 (a CAST of a blob, say): read it with U+FFFD for
        # what cannot be decoded, rather than not at all.
        log.warning("%s: a stored row holds text that is not UTF-8; read with U+FFFD in it",
                    self.user)
        self._connection.text_factory = _lenient_text
        try:
            return self._execute(sql, parameters).fetchall()
        finally:
            self._connection.text_factory = str

    def rows(self) -> list[RosterRow]:
        records = self._records(
            f"SELECT {_SELECT_COLUMNS} FROM roster_items WHERE user = ? ORDER BY contact",
            (self.user,),
        )
        return [_row_from_record(record, self.user) for record in records]

    def get(self, contact: str) -> RosterRow | None:
        records = self._records(
            f"SELECT {_SELECT_COLUMNS} FROM roster_items WHERE user = ? AND contact = ?",
            (self.user, contact),
        )
        return _row_from_record(records[0], self.user) if records else None

    def put(self, row: RosterRow) -> None:
        self._check_writable("put")
        # An upsert rather than INSERT OR REPLACE: REPLACE deletes and re-inserts, which would
        # fire two version triggers and, with recursive triggers off, skip the delete one.
        self._execute(
            """
            INSERT INTO roster_items (user, contact, name, subscription, pending_out, pending_in,
                                      approved, in_roster, groups, request_text,
                                      request_elements)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (user, contact) DO UPDATE SET
                name = excluded.name,
                subscription = excluded.subscription,
                pending_out = excluded.pending_out,
                pending_in = excluded.pending_in,
                approved = excluded.approved,
                in_roster = excluded.in_roster,
                groups = excluded.groups,
                request_text = excluded.request_text,
                request_elements = excluded.request_elements
            """,
            (
                self.user,
                row.contact,
                row.name,
                row.subscription,
                int(row.pending_out),
                int(row.pending_in),
                int(row.approved),
                int(row.in_roster),
                json.dumps(list(row.groups), ensure_ascii=False, separators=(",", ":")),
                row.request_text,
                json.dumps(list(row.request_elements), ensure_ascii=False,
                           separators=(",", ":")),
            ),
        )

    def delete(self, contact: str) -> None:
        self._check_writable("delete")
        self._execute(
            "DELETE FROM roster_items WHERE user = ? AND contact = ?", (self.user, contact)
        )

    def delete_all(self) -> None:
        self._check_writable("delete_all")
        self._execute("DELETE FROM roster_items WHERE user = ?", (self.user,))

    def count(self) -> int:
        return self._execute(
            "SELECT count(*) FROM roster_items WHERE user = ? AND in_roster", (self.user,)
        ).fetchone()[0]

    def count_requests(self) -> int:
        return self._execute(
            "SELECT count(*) FROM roster_items WHERE user = ? AND NOT in_roster", (self.user,)
        ).fetchone()[0]

    def version(self) -> str:
        record = self._execute(
            "SELECT counter FROM roster_versions WHERE user = ?", (self.user,)
        ).fetchone()
        return "0" if record is None else str(record[0])

    def logged_after(self, position: object | None) -> bool:
        if not isinstance(position, SQLiteFeedPosition):
            return False
        # Writers take turns (BEGIN IMMEDIATE), so ids grow in commit order: "after the last
        # id read" is exactly "not committed yet at that read". A range of the primary key.
        return self._execute(
            "SELECT EXISTS (SELECT 1 FROM roster_changes WHERE id > ? AND user = ?)",
            (position.last_id, self.user),
        ).fetchone()[0] == 1


_turns_lock = threading.Lock()
_turns: dict[str, threading.Lock] = {}


def _writer_turns(path: str) -> threading.Lock:
    """The lock this process's writers of `path` take turns on (SQLiteStore._writer_turn)."""
    with _turns_lock:
        return _turns.setdefault(path, threading.Lock())


class SQLiteStore(RosterStore):
    """Rosters in one SQLite file (WAL mode), through one connection per instance.

    The instance may be handed from thread to thread, but is used by one thread at a time: a
    lock serialises scopes, and a scope opened inside another one on the same instance is an
    error (SQLite has one transaction per connection). Threads that run at the same time open
    an instance each: their reads run side by side (WAL), their writes take turns.
    """

    threads_share = False  # one connection: the program opens one store per thread

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000, read_only: bool = False) -> None:
        if busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be >= 0, not {busy_timeout_ms}")
        self.path = str(Path(path).absolute())
        self.busy_timeout_ms = busy_timeout_ms
        self.read_only = read_only
        self.origin = DEFAULT_ORIGIN
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._file_identity: tuple[int, int] | None = None
        self._busy_timeout_set = busy_timeout_ms  # the connection's, as last set
        self._closed = False
        # Only the first open may create the file; see the module docstring.
        self._connect(may_create=not read_only)
        log.info("opened %s", self.describe())

    # --- RosterStore ------------------------------------------------------------------------

    def transaction(self, user: str, *, timeout: float | None = None
                    ) -> contextlib.AbstractContextManager[RosterTxn]:
        if self.read_only:
            # A read-only connection cannot take the write lock; nothing will be written anyway.
            return self._scope(user, "BEGIN", f"the store {self.path} is opened read-only",
                               timeout)
        return self._scope(user, "BEGIN IMMEDIATE", None, timeout)

    def snapshot(self, user: str, *, timeout: float | None = None
                 ) -> contextlib.AbstractContextManager[RosterTxn]:
        return self._scope(user, "BEGIN", "a snapshot is read-only; use transaction() to write",
                           timeout)

    def describe(self) -> str:
        access = "read-only" if self.read_only else "read-write"
        return (
            f"SQLite database {self.path} (WAL, synchronous=NORMAL, "
            f"busy timeout {self.busy_timeout_ms} ms, {access})"
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()

    # --- Outside changes --------------------------------------------------------------------

    def open_change_feed(self) -> ChangeFeed:
        return SQLiteChangeFeed(self.path, origin=self.origin, busy_timeout_ms=self.busy_timeout_ms)

    def data_version(self) -> int:
        """SQLite's `PRAGMA data_version` for this store's connection.

        For detecting changes made by others: the number moves whenever *another* connection
        (another program process, or any other application) commits to the database, and does
        not move for this store's own commits. Poll it between requests; when it moved, compare
        the users' versions to find which rosters changed behind this process's back. Only
        compare values from one connection: after the store reopens its file, the number
        restarts from an unrelated value (which reads as "something may have changed", a
        harmless false alarm).
        """
        with self._lock:
            connection = self._usable_connection()
            with self._translated_errors():
                return connection.execute("PRAGMA data_version").fetchone()[0]

    # --- Scopes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scope(self, user: str, begin: str, refuse_writes_because: str | None,
               timeout: float | None = None) -> Iterator[RosterTxn]:
        wait_ms = self._wait_ms(timeout)
        with self._lock, self._writer_turn(begin == "BEGIN IMMEDIATE", wait_ms):
            connection = self._usable_connection()
            if connection.in_transaction:
                raise StoreError("a transaction is already open on this store (no nesting)")
            with self._translated_errors():
                self._set_busy_timeout(connection, wait_ms)
                connection.execute(begin)
            txn = _SQLiteTxn(self, connection, user, refuse_writes_because)
            try:
                yield txn
            except BaseException:
                txn._open = False
                self._rollback(connection)
                raise
            try:
                txn._stamp_own_changes()
                with self._translated_errors():
                    connection.execute("COMMIT")
            except StoreError:
                self._rollback(connection)
                raise
            finally:
                txn._open = False

    def _wait_ms(self, timeout: float | None) -> int:
        """How long a scope may wait for the write lock: the busy timeout, or less when its
        caller's deadline comes first (so that it is answered by then, not after). Rounded
        down to 100 ms steps above 100 ms, so that requests with about the same deadline leave
        the connection's busy timeout as it is."""
        if timeout is None:
            return self.busy_timeout_ms
        wait_ms = max(0, int(timeout * 1000))
        if wait_ms >= 100:
            wait_ms -= wait_ms % 100
        return min(self.busy_timeout_ms, wait_ms)

    def _set_busy_timeout(self, connection: sqlite3.Connection, wait_ms: int) -> None:
        if wait_ms != self._busy_timeout_set:
            # An int of ours, not data (a PRAGMA takes no bound parameter).
            connection.execute(f"PRAGMA busy_timeout = {int(wait_ms)}")
            self._busy_timeout_set = wait_ms

    @contextlib.contextmanager
    def _writer_turn(self, writes: bool, wait_ms: int) -> Iterator[None]:
        """Writers of this process take turns on a lock of their own before BEGIN IMMEDIATE.

        SQLite has one writer at a time anyway; without this, the threads of one process would
        compete for it through the busy handler, which sleeps (up to 100 ms a try) instead of
        handing the lock over at commit: a write would wait milliseconds behind another one of
        a microsecond. Other processes still meet at SQLite's lock and its busy timeout. The
        wait here is bounded by the same busy timeout (or the caller's deadline: `wait_ms`).
        """
        if not writes:
            yield
            return
        turn = _writer_turns(self.path)
        if not turn.acquire(timeout=wait_ms / 1000):
            raise StoreUnavailable(
                f"{self.path}: another request of this process has held the write lock for "
                f"{wait_ms} ms (the busy timeout, or what was left of the request's deadline)")
        try:
            yield
        finally:
            turn.release()

    def _rollback(self, connection: sqlite3.Connection) -> None:
        # Never mask the error being raised: a failed rollback (the file just vanished, say)
        # still leaves nothing committed, which is all the caller needs.
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed on %s: %s; reopening next time", self.path, exc)
            self._disconnect()

    @contextlib.contextmanager
    def _translated_errors(self, ignore=lambda exc: False) -> Iterator[None]:
        """Turn sqlite3 errors into StoreUnavailable / StoreError (keeping the cause), but
        those `ignore` says, which pass through as they are."""
        try:
            yield
        except sqlite3.Error as exc:
            if ignore(exc):
                raise
            code = _primary_code(exc)
            # Bounded: some messages quote a whole stored value.
            detail = (f"{self.path}: {getattr(exc, 'sqlite_errorname', type(exc).__name__)}: "
                      f"{str(exc)[:200]}")
            if code in _UNAVAILABLE_CODES:
                if code in _RECONNECT_CODES:
                    self._disconnect()
                log.warning("SQLite database unavailable: %s", detail)
                raise StoreUnavailable(detail) from exc
            raise StoreError(detail) from exc

    # --- Connection -------------------------------------------------------------------------

    def _usable_connection(self) -> sqlite3.Connection:
        """The open connection, after checking that the path still names its file."""
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        if self._connection is not None:
            identity = self._current_file_identity()
            if identity != self._file_identity:
                log.warning("%s was replaced by another file; reopening it", self.path)
                self._disconnect()
        if self._connection is None:
            self._connect(may_create=False)
        assert self._connection is not None
        return self._connection

    def _current_file_identity(self) -> tuple[int, int]:
        try:
            status = os.stat(self.path)
        except OSError as exc:
            self._disconnect()
            raise StoreUnavailable(
                f"the SQLite database {self.path} cannot be reached ({exc.strerror}); "
                "was its directory moved or its volume unmounted?"
            ) from exc
        return status.st_dev, status.st_ino

    def _connect(self, *, may_create: bool) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise StoreUnavailable(
                f"the directory {directory} of the SQLite database {self.path} does not exist"
            )
        if not may_create and not os.path.exists(self.path):
            why = "a read-only store never creates it" if self.read_only else (
                "it was there before; a new empty one is not created in its place")
            raise StoreUnavailable(f"the SQLite database {self.path} does not exist ({why})")
        mode = "ro" if self.read_only else ("rwc" if may_create else "rw")
        with self._translated_errors():
            connection = sqlite3.connect(
                f"{Path(self.path).as_uri()}?mode={mode}",
                uri=True,
                timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock instead
            )
            try:
                self._prepare(connection)
            except BaseException:
                connection.close()
                raise
        self._connection = connection
        self._busy_timeout_set = self.busy_timeout_ms  # sqlite3.connect's `timeout`
        self._file_identity = self._current_file_identity()

    def _prepare(self, connection: sqlite3.Connection) -> None:
        # (The busy timeout is already set: sqlite3.connect's `timeout` is sqlite3_busy_timeout.)
        connection.execute("PRAGMA recursive_triggers = OFF")
        if self.read_only:
            connection.execute("PRAGMA query_only = ON")  # a second guard below our own
        elif connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._switch_to_wal(connection)
        connection.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; no fsync per commit
        self._migrate(connection)

    def _switch_to_wal(self, connection: sqlite3.Connection) -> None:
        """WAL mode is persistent (stored in the file, for every later connection).

        Switching needs the file's exclusive lock, and SQLite answers SQLITE_BUSY at once,
        without its busy handler, when another connection holds the write lock of a file still
        in rollback mode: exactly what a pool of processes opening a fresh file together meets
        (one of them is switching or migrating). So wait for it here, as the busy timeout would.
        """
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        delay = 0.001
        while True:
            try:
                if connection.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal":
                    return
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) != sqlite3.SQLITE_BUSY:
                    raise
            if time.monotonic() >= deadline:
                raise StoreUnavailable(
                    f"{self.path}: could not switch to WAL mode within "
                    f"{self.busy_timeout_ms} ms (the file stays locked by another process)")
            if delay == 0.001:
                log.info("%s is locked by another process; waiting to switch it to WAL mode",
                         self.path)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @staticmethod
    def _pending_migrations(connection: sqlite3.Connection) -> list[str]:
        """The migrations not applied yet (sqlite-utils records them in _sqlite_migrations)."""
        has_log = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'"
        ).fetchone()
        applied = set()
        if has_log:
            applied = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,)
                )
            }
        return [name for name in MIGRATION_NAMES if name not in applied]

    def _migrate(self, connection: sqlite3.Connection) -> None:
        pending = self._pending_migrations(connection)
        if not pending:
            return
        if self.read_only:
            raise StoreError(
                f"the schema of {self.path} is not current (missing {', '.join(pending)}); "
                "open it read-write once to migrate it"
            )
        import sqlite_utils

        from .sqlite_schema import SCHEMA

        db = sqlite_utils.Database(connection, recursive_triggers=False, execute_plugins=False)
        # One write lock around "what is pending" and "apply it": processes started together
        # on a fresh file wait for each other, and only the first one migrates.
        db.execute("BEGIN IMMEDIATE")
        try:
            applied_now = [migration.name for migration in SCHEMA.pending(db)]
            SCHEMA.apply(db)
            db.execute("COMMIT")
        except BaseException:
            db.rollback()
            raise
        if applied_now:
            log.info("migrated %s: applied %s", self.path, ", ".join(applied_now))

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._file_identity = None
        if connection is not None:
            try:
                connection.close()
            except sqlite3.Error as exc:  # closing a connection to a vanished file
                log.debug("closing %s: %s", self.path, exc)


class SQLiteFeedPosition(NamedTuple):
    """Where a read of SQLiteChangeFeed stood: the last `roster_changes.id` it had read
    (any origin's)."""

    last_id: int


class SQLiteChangeFeed(ChangeFeed):
    """Changes not made by this node's program processes, read from `roster_changes`: those of
    other applications, and those of the program processes serving other ejabberd nodes.

    Polled: `PRAGMA data_version` on the feed's own connection moves whenever any other
    connection commits, so a poll that finds it unchanged costs one pragma and no query.
    Entries are kept for `RETENTION_DAYS` so that several readers (one per ejabberd node on the
    same host) each see every change; the feed prunes older ones now and then.
    """

    poll_interval = 0.2
    RETENTION_DAYS = 1.0
    PRUNE_EVERY = 3000  # polls (about ten minutes)
    BATCH = 5000
    # The feed is read by the serving loop, which answers pings: it never waits long for a
    # lock another process holds (only the prune needs the write lock; it is tried again at
    # the next prune).
    BUSY_TIMEOUT_MS = 100

    def __init__(self, path: str, *, origin: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.origin = origin
        self._connection = sqlite3.connect(
            f"{Path(path).as_uri()}?mode=rw", uri=True,
            timeout=min(busy_timeout_ms, self.BUSY_TIMEOUT_MS) / 1000,
            isolation_level=None, check_same_thread=False,
        )
        # Another application may store any bytes as text; the feed must read past them.
        self._connection.text_factory = _lenient_text
        self._after = self._connection.execute(
            "SELECT coalesce(max(id), 0) FROM roster_changes"
        ).fetchone()[0]
        self._data_version = None
        self._polls = 0

    def read(self) -> list[OutsideChange]:
        try:
            data_version = self._connection.execute("PRAGMA data_version").fetchone()[0]
            if data_version == self._data_version:
                return []
            records = self._connection.execute(
                "SELECT id, user, contact, old_subscription, new_subscription, origin, "
                "(recorded_at - 2440587.5) * 86400.0 "
                "FROM roster_changes WHERE id > ? ORDER BY id LIMIT ?",
                (self._after, self.BATCH),
            ).fetchall()
            if len(records) < self.BATCH:  # else: more to read at the next poll
                self._data_version = data_version
        except sqlite3.Error as exc:
            log.warning("change feed on %s: %s; retrying at the next poll", self.path, exc)
            return []
        if records:
            self._after = records[-1][0]
        self._polls += 1
        if self._polls % self.PRUNE_EVERY == 0:
            self._prune()
        changes = []
        read_at = SQLiteFeedPosition(self._after)
        for entry_id, user, contact, old, new, origin, recorded_at in records:
            if origin == self.origin:
                continue
            if type(user) is not str or type(contact) is not str:
                # Written by another application's UPDATE of the key columns to non-text.
                log.warning("change feed on %s: entry %s names no user and contact (%r, %r); "
                            "skipped", self.path, entry_id, user, contact)
                continue
            changes.append(OutsideChange(user, contact, old, new,
                                         recorded_at if type(recorded_at) is float else None,
                                         read_at))
        return changes

    def _prune(self) -> None:
        # Apart from the read: a prune that fails (the write lock held elsewhere) loses none
        # of the entries just read.
        try:
            self._connection.execute(
                "DELETE FROM roster_changes WHERE recorded_at < julianday('now') - ?",
                (self.RETENTION_DAYS,),
            )
        except sqlite3.Error as exc:
            log.warning("change feed on %s: pruning the change log failed (%s); trying again "
                        "at the next prune", self.path, exc)

    def close(self) -> None:
        self._connection.close()
