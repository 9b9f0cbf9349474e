"""The PostgreSQL adapter: every user's roster in one PostgreSQL database, shared by all program
processes of all ejabberd nodes.

Theory of operation
-------------------
Each program process opens its own `PostgresStore`, which holds a small psycopg_pool
`ConnectionPool` (one connection is enough for a single-threaded process; a few more let threads
share the store). Connections are in autocommit mode: every scope issues its own BEGIN and
COMMIT, so an idle pooled connection never holds a transaction.

- `transaction(user)` runs `BEGIN ISOLATION LEVEL READ COMMITTED`, then locks the user's row in
  `roster_versions`, creating it if missing, in one statement that also returns the version and
  stamps the origin (`INSERT ... ON CONFLICT DO UPDATE SET counter = counter RETURNING ...`,
  `_LOCK_USER`). Both go in one round trip with the scope's first statement (`_PostgresTxn`);
  a scope that runs no statement sends nothing. That row lock serialises every
  read-modify-write on one user's roster across processes and nodes, whichever of them comes
  first; users never wait for each other. Once the lock is held, each READ COMMITTED statement
  sees everything committed before, so nothing read inside the scope is stale. Waiting for the
  lock is bounded by `lock_timeout`; waiting longer is `StoreUnavailable`.
- `snapshot(user)` runs `BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY` (in one round trip
  with its first read): one consistent view for the whole scope (rows and version agree), no
  lock, never waits for a writer. Its `RosterTxn` refuses writes, and so does the server.
- Versions are kept by the database, not by this code: a trigger on `roster_items` bumps the
  user's counter in `roster_versions` on every INSERT, UPDATE and DELETE (and every user's on a
  TRUNCATE), so a write made by any other application in plain SQL moves the version too. The
  counter row is never deleted, so a version never comes back, even after every row of the user
  is gone. A user never written has no counter, or a counter of 0: version "0".
- The same trigger runs `pg_notify('roster_port_changes', <username>)` (`NOTIFY_CHANNEL`), so a
  process that LISTENs on the channel learns, at commit, whose roster changed, including changes
  made outside XMPP; a TRUNCATE notifies an empty payload, meaning "anyone's".
- Every change of a row is also logged in `roster_port_changes` by other triggers (migration 4,
  through `roster_port_log_change()`, see pg_changes.py; since migration 5 the function also
  wakes the feeds with the entry's origin), and each write transaction stamps its
  entries with the store's `origin` (set_origin()'s settings, transaction-local) in the
  statement that takes the user's lock. `open_change_feed()` returns a `PostgresChangeFeed`:
  a connection of its own, outside the pool, LISTENing on the channel and reading the entries
  of every other origin.
- Rows are ordered by contact in code point order: `username` and `contact` are
  `COLLATE "C"` (byte order of UTF-8, which is code point order), whatever the database's
  locale, and the primary key (username, contact) returns a roster in that order.
- The schema is created and upgraded by the numbered steps of `MIGRATIONS`, recorded in
  `roster_port_migrations`. Pending steps are applied in one transaction holding an advisory
  lock, so processes started together on a fresh database migrate it exactly once. Tables and
  functions go to the connection's current schema (the first of its search_path that exists);
  the trigger functions are pinned to it, so they work whatever search_path the application
  writing the table has.

Failures. A connection that died while idle in the pool (server restarted, session
terminated) is found out by the scope's BEGIN, before anything was done on it, and exchanged
for another one (the pool discards broken connections and connects again on demand). A
connection lost in the middle of a scope rolls it back on the server: nothing is half-written.
(If the connection is lost during COMMIT itself, the transaction may or may not have
committed, atomically either way; the scope raises `StoreUnavailable`.)

When no new connection can be made (the pool's attempt failed: `reconnect_failed`; or none
came in time while not all were busy) the store is *unreachable*: every scope raises
`StoreUnavailable` at once, saying why, instead of waiting for the pool's timeout; a thread of
the store (`_probe`) tries a connection of its own every PROBE_EVERY_S, and at once when a
scope asks (the scope waits for that try, PROBE_WAIT_S at most), and the store is usable
again the moment one succeeds: the first request after the database is back is served. The
same holds from the start with `wait_for_database`: a database unreachable at open is set up
(migrated, or a mapping checked) by the first try that reaches it. Other waits are bounded by
`connect_timeout_s` (the pool's, libpq's connect_timeout, TCP's user timeout for
unacknowledged data) and `lock_timeout_ms`, and each by what the scope's caller has left
(its `timeout`). A connection refused for a bad password or a missing database is taken as
unreachable too (libpq gives no SQLSTATE to tell them apart), and logged with libpq's reason.

What this module must never do
------------------------------
- Let a psycopg exception escape: every driver error becomes `StoreUnavailable` (cannot reach
  the database, connection lost, lock or statement timeout, a server that cannot write now) or
  `StoreError` (anything else).
- Commit a scope that raised, or one whose transaction the server already aborted; or leave a
  transaction open on a connection it returns to the pool.
- Build SQL from data: every value is a bound parameter; identifiers go through `psycopg.sql`.
- Show the password of the DSN (in `describe()`, logs or errors).
- Write to stdout (it is the program's protocol channel); it only logs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import psycopg_pool
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus

from roster_port.store.base import (
    SUBSCRIPTIONS,
    DEFAULT_ORIGIN,
    ChangeFeed,
    RosterRow,
    RosterStore,
    RosterTxn,
    StoreError,
    StoreUnavailable,
)
from roster_port.store.pg_changes import (
    CHANNEL,
    SET_ORIGIN_SQL,
    PostgresChangeFeed,
    install_change_log,
    logged_after_query,
)

log = logging.getLogger(__name__)

# psycopg_pool logs every request for a connection at INFO: one line per roster request. Its
# warnings (why a connection attempt failed) are what matters; keep those unless someone chose
# a level for that logger explicitly.
_pool_log = logging.getLogger("psycopg.pool")
if _pool_log.level == logging.NOTSET:
    _pool_log.setLevel(logging.WARNING)

NOTIFY_CHANNEL = CHANNEL  # pg_changes.py owns it: the change log notifies on it too

# pg_advisory_xact_lock key held while migrating: "roster_p" in ASCII, as a (positive) bigint.
MIGRATION_LOCK_KEY = int.from_bytes(b"roster_p", "big")

# Session settings of every connection, besides the configured lock timeout.
# A process that stops in the middle of a scope (a debugger, SIGSTOP) must not hold a user's
# lock forever: the server ends such a session. Scopes last milliseconds.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000
# Dead peers on an idle connection are found by TCP keepalives (unless the DSN says otherwise).
KEEPALIVE_SETTINGS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 5,
                      "keepalives_count": 3}

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED, READ WRITE"
_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"


def parse_dsn(dsn: str) -> dict[str, str]:
    """The parameters of `dsn` (a libpq connection string or URI), or ValueError."""
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's message may quote a piece of the string, which may be the password.
        raise ValueError("not a valid PostgreSQL connection string or URI "
                         "(libpq cannot parse it)") from None


def dsn_without_password(dsn: str) -> str:
    """`dsn` as keyword=value pairs without the password (for logs), or ValueError."""
    parameters = parse_dsn(dsn)
    parameters.pop("password", None)
    return make_conninfo(**parameters)


# --- Schema ---------------------------------------------------------------------------------
#
# Migrations are append-only: a released step is never edited, a schema change is a new step.
# Each step runs inside the migrating transaction, given the connection and the schema the
# tables go to.


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    apply: Callable[[psycopg.Connection, sql.Identifier], None]


MIGRATIONS: list[Migration] = []


def _migration(number: int, name: str):
    def register(apply: Callable[[psycopg.Connection, sql.Identifier], None]):
        assert number == len(MIGRATIONS) + 1, "migrations are numbered 1, 2, 3... in order"
        MIGRATIONS.append(Migration(number, name, apply))
        return apply

    return register


_SUBSCRIPTION_LIST = sql.SQL(", ").join(sql.Literal(state) for state in SUBSCRIPTIONS)


@_migration(1, "roster_items")
def _create_roster_items(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # The CHECKs keep other applications writing this table in plain SQL from storing rows that
    # the program could not read back. Groups are an array in the row: no join to read them.
    connection.execute(sql.SQL("""
        CREATE TABLE roster_items (
            username text COLLATE "C" NOT NULL,
            contact text COLLATE "C" NOT NULL,
            name text NOT NULL DEFAULT '',
            subscription text NOT NULL DEFAULT 'none'
                CONSTRAINT roster_items_subscription_is_known
                CHECK (subscription IN ({subscriptions})),
            pending_out boolean NOT NULL DEFAULT false,
            pending_in boolean NOT NULL DEFAULT false,
            approved boolean NOT NULL DEFAULT false,
            in_roster boolean NOT NULL DEFAULT true,
            groups text[] NOT NULL DEFAULT '{{}}'
                CONSTRAINT roster_items_groups_is_a_list_of_text
                CHECK (cardinality(groups) = 0
                       OR (array_ndims(groups) = 1 AND array_position(groups, NULL) IS NULL)),
            request_text text NOT NULL DEFAULT '',
            PRIMARY KEY (username, contact)
        )
    """).format(subscriptions=_SUBSCRIPTION_LIST))


@_migration(2, "roster_versions")
def _create_roster_versions(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    connection.execute("""
        CREATE TABLE roster_versions (
            username text COLLATE "C" PRIMARY KEY,
            counter bigint NOT NULL DEFAULT 0 CHECK (counter >= 0)
        )
    """)


@_migration(3, "version_triggers")
def _create_version_triggers(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # `SET search_path`: the functions run with the privileges and search_path of whoever writes
    # roster_items; pinned to our schema, they find roster_versions from any application.
    connection.execute(sql.SQL("""
        CREATE FUNCTION roster_port_bump_version(changed_user text) RETURNS void
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        BEGIN
            -- An upsert, so the first write of a user creates the counter row.
            INSERT INTO roster_versions AS versions (username, counter) VALUES (changed_user, 1)
            ON CONFLICT (username) DO UPDATE SET counter = versions.counter + 1;
            -- Sent at commit, once per user and transaction (the server folds duplicates).
            PERFORM pg_notify({channel}, changed_user);
        END
        $$
    """).format(schema=schema, channel=sql.Literal(NOTIFY_CHANNEL)))
    connection.execute(sql.SQL("""
        CREATE FUNCTION roster_items_bump_versions() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') THEN
                PERFORM roster_port_bump_version(OLD.username);
            END IF;
            -- An UPDATE that moves a row to another user changes that user's roster too.
            IF TG_OP = 'INSERT'
               OR (TG_OP = 'UPDATE' AND NEW.username IS DISTINCT FROM OLD.username) THEN
                PERFORM roster_port_bump_version(NEW.username);
            END IF;
            RETURN NULL;
        END
        $$
    """).format(schema=schema))
    connection.execute("""
        CREATE TRIGGER roster_items_bump_versions
        AFTER INSERT OR UPDATE OR DELETE ON roster_items
        FOR EACH ROW EXECUTE FUNCTION roster_items_bump_versions()
    """)
    # TRUNCATE fires no row trigger: every user's version moves (those without rows too, which
    # is harmless: a version only has to change, never to stay).
    connection.execute(sql.SQL("""
        CREATE FUNCTION roster_items_truncated() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        BEGIN
            UPDATE roster_versions SET counter = counter + 1;
            PERFORM pg_notify({channel}, '');
            RETURN NULL;
        END
        $$
    """).format(schema=schema, channel=sql.Literal(NOTIFY_CHANNEL)))
    connection.execute("""
        CREATE TRIGGER roster_items_truncated
        AFTER TRUNCATE ON roster_items
        FOR EACH STATEMENT EXECUTE FUNCTION roster_items_truncated()
    """)


@_migration(4, "change_log")
def _create_change_log(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # Every change of a row, by anyone, is logged (pg_changes.py): the program stamps the
    # entries of its own transactions with its origin (in _LOCK_USER), other
    # applications' have none, and PostgresChangeFeed reports those not of its own node.
    install_change_log(connection, schema)
    connection.execute(sql.SQL("""
        CREATE FUNCTION roster_items_log_changes() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                PERFORM roster_port_log_change(NEW.username, NEW.contact, NULL,
                                               NEW.subscription);
            ELSIF TG_OP = 'DELETE' THEN
                PERFORM roster_port_log_change(OLD.username, OLD.contact, OLD.subscription,
                                               NULL);
            ELSIF NEW.username IS DISTINCT FROM OLD.username
                  OR NEW.contact IS DISTINCT FROM OLD.contact THEN
                -- A row moved to another user or contact: one gone, another one new.
                PERFORM roster_port_log_change(OLD.username, OLD.contact, OLD.subscription,
                                               NULL);
                PERFORM roster_port_log_change(NEW.username, NEW.contact, NULL,
                                               NEW.subscription);
            ELSE
                PERFORM roster_port_log_change(OLD.username, OLD.contact, OLD.subscription,
                                               NEW.subscription);
            END IF;
            RETURN NULL;
        END
        $$
    """).format(schema=schema))
    connection.execute("""
        CREATE TRIGGER roster_items_log_changes
        AFTER INSERT OR UPDATE OR DELETE ON roster_items
        FOR EACH ROW EXECUTE FUNCTION roster_items_log_changes()
    """)
    # TRUNCATE fires no row trigger: log every row as deleted before they go.
    connection.execute(sql.SQL("""
        CREATE FUNCTION roster_items_log_truncate() RETURNS trigger
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        BEGIN
            PERFORM roster_port_log_change(username, contact, subscription, NULL)
            FROM roster_items;
            RETURN NULL;
        END
        $$
    """).format(schema=schema))
    connection.execute("""
        CREATE TRIGGER roster_items_log_truncate
        BEFORE TRUNCATE ON roster_items
        FOR EACH STATEMENT EXECUTE FUNCTION roster_items_log_truncate()
    """)


@_migration(5, "change_log_origin_wakeups")
def _wake_feeds_by_origin(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # roster_port_log_change() also notifies the feeds' channel with the entry's origin, so a
    # feed is not woken to read for its own node's writes (pg_changes.py, WAKE_CHANNEL).
    install_change_log(connection, schema)


@_migration(6, "request_elements")
def _add_request_elements(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # A pending inbound request kept whole (RFC 6121 3.1.3): its statuses with their languages
    # and its extended content, one XML text each (base.RosterRow). Existing rows read as
    # requests without elements, their text kept, which is what they held.
    # The column with a constant default is a change of the catalogue only. The constraint is
    # added NOT VALID: checked for every row written from now on, while validating it would
    # scan the whole table under the ALTER's exclusive lock (every existing row holds the
    # default '{}', which it accepts).
    connection.execute(
        "ALTER TABLE roster_items ADD COLUMN request_elements text[] NOT NULL DEFAULT '{}'")
    connection.execute("""
        ALTER TABLE roster_items ADD CONSTRAINT roster_items_request_elements_is_a_list_of_text
            CHECK (cardinality(request_elements) = 0
                   OR (array_ndims(request_elements) = 1
                       AND array_position(request_elements, NULL) IS NULL)) NOT VALID
    """)



@_migration(7, "change_log_by_user")
def _index_changes_by_user(connection: psycopg.Connection, schema: sql.Identifier) -> None:
    # The index logged_after's statement uses (pg_changes.change_log_statements).
    install_change_log(connection, schema)

# --- Errors ---------------------------------------------------------------------------------

# Besides OperationalError (connection failures, lock and statement timeouts, shutdowns): the
# server cannot take writes right now (a standby, e.g. the old primary after a failover).
_UNAVAILABLE_SQLSTATES = frozenset({"25006"})  # read_only_sql_transaction


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- Rows -----------------------------------------------------------------------------------

_SELECT_COLUMNS = sql.SQL(
    "contact, name, subscription, pending_out, pending_in, approved, in_roster, groups, "
    "request_text, request_elements"
)


def _row_from_record(record: tuple) -> RosterRow:
    (contact, name, subscription, pending_out, pending_in, approved, in_roster, groups, text,
     elements) = record
    return RosterRow(
        contact=contact,
        name=name,
        subscription=subscription,
        pending_out=pending_out,
        pending_in=pending_in,
        approved=approved,
        in_roster=in_roster,
        groups=tuple(groups),
        request_text=text,
        request_elements=tuple(elements),
    )


# The statements of a scope, as text made once (not composed at every call).
_SELECT_ROWS = sql.SQL(
    'SELECT {} FROM roster_items WHERE username = %s ORDER BY contact COLLATE "C"'
).format(_SELECT_COLUMNS).as_string(None)
_SELECT_ROW = sql.SQL(
    "SELECT {} FROM roster_items WHERE username = %s AND contact = %s"
).format(_SELECT_COLUMNS).as_string(None)
# In a write scope, `get` reads the row or, when there is none, the number of rows (what
# `count` would read next, to check the roster size limit before a new item): one round trip
# where two were. The count is computed only when the row is missing (a one-time filter).
_SELECT_ROW_OR_COUNT = sql.SQL("""
    SELECT {columns}, NULL::bigint, NULL::bigint FROM roster_items
    WHERE username = %(user)s AND contact = %(contact)s
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           counts.items, counts.requests
    FROM (SELECT count(*) FILTER (WHERE in_roster) AS items,
                 count(*) FILTER (WHERE NOT in_roster) AS requests
          FROM roster_items WHERE username = %(user)s) AS counts
    WHERE NOT EXISTS (SELECT FROM roster_items
                      WHERE username = %(user)s AND contact = %(contact)s)
""").format(columns=_SELECT_COLUMNS).as_string(None)
_UPSERT_ROW = """
    INSERT INTO roster_items AS items (username, contact, name, subscription,
                                       pending_out, pending_in, approved, in_roster,
                                       groups, request_text, request_elements)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::text[], %s, %s::text[])
    ON CONFLICT (username, contact) DO UPDATE SET
        name = excluded.name,
        subscription = excluded.subscription,
        pending_out = excluded.pending_out,
        pending_in = excluded.pending_in,
        approved = excluded.approved,
        in_roster = excluded.in_roster,
        groups = excluded.groups,
        request_text = excluded.request_text,
        request_elements = excluded.request_elements
"""
_DELETE_ROW = "DELETE FROM roster_items WHERE username = %s AND contact = %s"
_DELETE_ROWS = "DELETE FROM roster_items WHERE username = %s"
_COUNT_ROWS = ("SELECT count(*) FILTER (WHERE in_roster), count(*) FILTER (WHERE NOT in_roster) "
               "FROM roster_items WHERE username = %s")
_READ_VERSION = "SELECT counter FROM roster_versions WHERE username = %s"
# Takes the user's lock and reads the version, in one statement: the upsert creates the counter
# row if missing (counter 0: version "0", so that there is a row to lock even for a user never
# written) or, if it exists, locks it (waiting for a transaction holding it) and returns its
# latest committed counter, which no one else can move until this transaction ends (the triggers
# of any writer, ours or another application's, need that lock). `SET counter = counter` leaves
# the value alone. The same statement stamps the change-log entries of this transaction's writes
# with our origin (set_origin's settings, transaction-local).
_LOCK_USER = ("INSERT INTO roster_versions AS versions (username) VALUES (%s) "
              "ON CONFLICT (username) DO UPDATE SET counter = versions.counter "
              "RETURNING counter, set_config('roster_port.origin', %s, true), "
              "set_config('roster_port.origin_user', %s, true)")
assert "set_config('roster_port.origin', %s, true)" in SET_ORIGIN_SQL  # same setting names
# Before the COMMIT of a scope that handed out a version it counted (see _PostgresTxn): fails
# (division by zero, SQLSTATE 22012) unless the counter is what the scope counted, which makes
# the COMMIT after it in the same pipeline a no-op and the transaction roll back.
_CHECK_COUNTER = ("SELECT 1 / (SELECT count(*) FROM roster_versions "
                  "WHERE username = %s AND counter = %s)::int")
_COUNTER_MOVED_SQLSTATE = "22012"
# The triggers of migrations 3 and 4: with no other trigger on roster_items or
# roster_versions, every row changed adds exactly 1 to its user's counter.
_OUR_TRIGGERS = ("roster_items_bump_versions", "roster_items_truncated",
                 "roster_items_log_changes", "roster_items_log_truncate")


class _PostgresTxn(RosterTxn):
    """One user's roster inside one open transaction on one pooled connection.

    Statements and round trips are what a scope costs. The scope's opening statements (BEGIN,
    and for a write scope the user's lock, one statement that also reads the version and sets
    the origin) are not sent on their own but in one pipeline with the scope's first statement;
    a `get()` of a missing contact in a write scope brings the count along. A scope that runs
    no statement at all sends nothing, not even BEGIN.

    Writes and the version. Under the user's lock only this transaction moves the counter, and
    the version triggers (migration 3) add exactly 1 per row inserted, updated or deleted: so
    `version()` in a write scope is the locked counter plus the rows this scope changed, with
    no statement. A `put()` after the scope's first statement is not sent at once but held
    (an upsert always changes exactly one row), and goes in one pipeline with whatever the
    scope sends next: its next read, or its COMMIT. A put or delete that fails therefore raises
    at that statement or at the end of the scope, and the whole transaction rolls back either
    way. Whenever a version counted so was handed out, the COMMIT's pipeline first checks it
    against the counter the triggers left (`_CHECK_COUNTER`): a trigger someone added that
    moves the counter too makes the transaction roll back with StoreError, never commit with
    a version other than what the database holds.
    """

    keeps_request_elements = True

    def __init__(self, store: "PostgresStore", connection: psycopg.Connection, user: str,
                 refuse_writes_because: str | None, opening: list[tuple[str, tuple]],
                 lock_user: bool, deadline: float) -> None:
        self.user = user
        self._store = store
        self._connection = connection
        self._deadline = deadline  # for another connection, if this one turns out dead
        self._refuse_writes_because = refuse_writes_because
        self._open = True
        self._opening = opening  # not sent yet; sent with the first statement
        self._lock_user = lock_user
        self._begun = False  # BEGIN sent: the scope ends with COMMIT or ROLLBACK
        self._counter: int | None = None  # the version as it stands in this transaction
        # The numbers of items and of strangers' requests, once read (under the user's lock,
        # only this scope changes them; every write forgets them).
        self._count: tuple[int, int] | None = None
        self._held: list[tuple[str, tuple]] = []  # writes not sent yet (see the class doc)
        self._wrote = False  # the counter moved by this scope's writes (counted, not read)
        self._check_counter = False  # a counted version was handed out: check it at COMMIT

    def _execute(self, query: str, parameters: tuple | dict = (), *,
                 writes: bool = False) -> psycopg.Cursor:
        """Run `query` (after the opening statements, if not sent yet: in one round trip)."""
        if not self._open:
            raise StoreError(f"the transaction on {self.user!r} is over; open a new one")
        if self._opening:
            cursor = self._open_with(query, parameters)
        elif self._held:
            cursor = self._send_held(query, parameters)
        else:
            with self._store._translated_errors(self._connection):
                cursor = self._connection.execute(query, parameters)
        if writes:
            # The triggers added 1 per row changed (and the count may have changed).
            self._moved(cursor.rowcount)
        return cursor

    def _moved(self, rows: int) -> None:
        self._count = None
        if not self._store._versions_counted:
            self._counter = None  # read again when asked
            return
        if rows:
            assert self._counter is not None  # writes run under the lock, which read it
            self._counter += rows
            self._wrote = True

    def _send_held(self, query: str, parameters: tuple | dict) -> psycopg.Cursor:
        """The held writes and `query` in one pipeline (one round trip)."""
        held, self._held = self._held, []
        connection = self._connection
        with self._store._translated_errors(connection):
            with connection.pipeline():
                for held_query, held_parameters in held:
                    connection.execute(held_query, held_parameters)
                cursor = connection.execute(query, parameters)
        return cursor

    def _closing_statements(self) -> list[tuple[str, tuple]]:
        """What goes in one pipeline with the COMMIT: the held writes, and the check of a
        counted version that was handed out."""
        statements, self._held = self._held, []
        if self._check_counter:
            statements.append((_CHECK_COUNTER, (self.user, self._counter)))
        return statements

    def _open_with(self, query: str, parameters: tuple | dict) -> psycopg.Cursor:
        """The opening statements and `query` in one pipeline (one round trip).

        A pooled connection may have died while idle (server restarted, session terminated):
        it is found out here, before anything was done on the server (there was no COMMIT in
        the pipeline, so nothing of it stays), and another connection takes over, as `_begin`
        does. After at most pool_max of them the pool connects afresh, or times out.
        """
        store = self._store
        for attempt in itertools.count(1):
            connection = self._connection
            try:
                self._begun = True
                with connection.pipeline():
                    lock = None
                    for opening_query, opening_parameters in self._opening:
                        lock = connection.execute(opening_query, opening_parameters)
                    cursor = connection.execute(query, parameters)
            except psycopg.Error as exc:
                if connection.broken and attempt <= store.pool_max:
                    log.info("a pooled connection to %s was lost while idle (%s); "
                             "taking another", store.dsn_shown, _one_line(exc))
                    self._begun = False
                    replacement = store._getconn(self._deadline)
                    store._pool.putconn(connection)  # broken: the pool discards it
                    self._connection = replacement
                    continue
                raise store._store_error(exc, connection) from exc
            break
        self._opening = []
        if self._lock_user:
            self._counter = _counter_of(lock)
        return cursor

    def _check_writable(self, operation: str) -> None:
        if self._refuse_writes_because is not None:
            raise StoreError(f"{operation} refused: {self._refuse_writes_because}")

    def rows(self) -> list[RosterRow]:
        cursor = self._execute(_SELECT_ROWS, (self.user,))
        return [_row_from_record(record) for record in cursor]

    def get(self, contact: str) -> RosterRow | None:
        if not self._lock_user:
            record = self._execute(_SELECT_ROW, (self.user, contact)).fetchone()
            return None if record is None else _row_from_record(record)
        record = self._execute(_SELECT_ROW_OR_COUNT,
                               {"user": self.user, "contact": contact}).fetchone()
        if record[0] is None:  # no such row: the counts of the others came instead
            self._count = tuple(record[-2:])
            return None
        return _row_from_record(record[:-2])

    def put(self, row: RosterRow) -> None:
        self._check_writable("put")
        # An upsert: one UPDATE of an existing row (one version bump), never delete + insert.
        parameters = (
            self.user,
            row.contact,
            row.name,
            row.subscription,
            row.pending_out,
            row.pending_in,
            row.approved,
            row.in_roster,
            list(row.groups),
            row.request_text,
            list(row.request_elements),
        )
        if self._opening or not self._open:
            # The scope's first statement (or a finished scope: _execute says so).
            self._execute(_UPSERT_ROW, parameters, writes=True)
            return
        # Held until the next statement or the COMMIT: it changes exactly one row.
        self._held.append((_UPSERT_ROW, parameters))
        self._moved(1)

    def delete(self, contact: str) -> None:
        self._check_writable("delete")
        self._execute(_DELETE_ROW, (self.user, contact), writes=True)

    def delete_all(self) -> None:
        self._check_writable("delete_all")
        self._execute(_DELETE_ROWS, (self.user,), writes=True)

    def count(self) -> int:
        return self._counts()[0]

    def count_requests(self) -> int:
        return self._counts()[1]

    def _counts(self) -> tuple[int, int]:
        if self._count is None:
            self._count = tuple(self._execute(_COUNT_ROWS, (self.user,)).fetchone())
        return self._count

    def version(self) -> str:
        if self._counter is None:
            # A snapshot (no lock), or nothing run yet: read it (with the opening statements,
            # if not sent yet).
            self._counter = _counter_of(self._execute(_READ_VERSION, (self.user,)))
        elif self._wrote:
            if not self._open:
                raise StoreError(f"the transaction on {self.user!r} is over; open a new one")
            self._check_counter = True  # counted: checked against the table at COMMIT
        return str(self._counter)

    def logged_after(self, position: object | None) -> bool:
        query = logged_after_query(self.user, position)
        return query is not None and self._execute(*query).fetchone()[0]


def _counter_of(cursor: psycopg.Cursor) -> int:
    record = cursor.fetchone()
    return 0 if record is None else record[0]


# While the database is unreachable the store tries a connection of its own this often, and
# at once when a scope asks; a scope waits that long at most for the try, then gives
# StoreUnavailable (a server that is down refuses in a millisecond; one that does not answer
# at all would otherwise hold every request for the whole connect timeout).
PROBE_EVERY_S = 0.25
PROBE_WAIT_S = 0.5
# A scope waits for a pooled connection in slices this long, so that it gives up as soon as
# the store finds the database unreachable rather than at the end of the pool's timeout.
_GETCONN_SLICE_S = 0.05
# A write scope with less time left than the lock timeout waits that long at most.
_SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', %s, true)"


class PostgresStore(RosterStore):
    """Rosters in one PostgreSQL database, through a small pool of connections per instance.

    `dsn` is a libpq connection string or URI. `connect_timeout_s` bounds how long an operation
    waits for the server before `StoreUnavailable`; `lock_timeout_ms` how long a transaction
    waits for another one holding the same user's lock. Keep their sum under the shim's
    call_timeout. Threads may share an instance; a scope opened inside another one in the same
    thread is an error, as with every adapter.

    `wait_for_database`: a database that cannot be reached at open is not an error: the store
    opens, its scopes raise StoreUnavailable at once, and it sets the database up (migrations,
    a mapping's check) as soon as a connection succeeds (what `roster-port serve` wants). A
    database that can be reached and does not fit is a StoreError at open either way; found
    later, it is reported to the failure handler (set_failure_handler).
    """

    def __init__(self, dsn: str, *, pool_min: int = 1, pool_max: int = 4,
                 connect_timeout_s: float = 2.0, lock_timeout_ms: int = 2000,
                 read_only: bool = False, wait_for_database: bool = False) -> None:
        if not 1 <= pool_min <= pool_max:
            raise ValueError(f"need 1 <= pool_min <= pool_max, not {pool_min} and {pool_max}")
        if not connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, not {connect_timeout_s}")
        if lock_timeout_ms <= 0:  # 0 would mean "wait forever" to PostgreSQL
            raise ValueError(f"lock_timeout_ms must be > 0, not {lock_timeout_ms}")
        dsn_parameters = parse_dsn(dsn)
        self.pool_min, self.pool_max = pool_min, pool_max
        self.connect_timeout_s = connect_timeout_s
        self.lock_timeout_ms = lock_timeout_ms
        self.read_only = read_only
        self.origin = DEFAULT_ORIGIN
        self.dsn_shown = dsn_without_password(dsn)
        self._dsn = dsn  # for the change feed's own connection; never shown
        self._dsn_parameters = dsn_parameters
        self._closed = False
        self._scopes_in_thread = threading.local()
        self._versions_counted = False  # until _set_up has seen the triggers
        # Reachability ("Failures" in the module doc), guarded by _state but for the Event.
        self._state = threading.Condition()
        self._usable = threading.Event()  # set up, and not found unreachable since
        self._set_up_done = False
        self._unreachable_because = ""
        self._unreachable_since = 0.0
        self._prober: threading.Thread | None = None
        self._probe_now = threading.Event()
        self._probes_started = 0
        self._probes_done = 0  # the number of the last try that ended
        self._failure: StoreError | None = None
        self._on_failure: Callable[[StoreError], None] | None = None
        self._feeds: weakref.WeakSet[PostgresChangeFeed] = weakref.WeakSet()
        self._pool = psycopg_pool.ConnectionPool(
            dsn,
            open=False,
            min_size=pool_min,
            max_size=pool_max,
            kwargs=self._connection_options(dsn_parameters),
            configure=self._configure_connection,
            # How long a request waits for a connection at most (see _getconn).
            timeout=connect_timeout_s,
            # No background retries with growing back-off (1 s, 2 s, 4 s...): that would keep
            # the store unavailable for up to the last delay after the server is back. A failed
            # connection attempt is given up at once, and tells the store (reconnect_failed),
            # which tries on its own until one succeeds (_probe).
            reconnect_timeout=0,
            reconnect_failed=self._pool_cannot_connect,
            num_workers=1,  # a single-threaded process needs no parallel connection attempts
            name=f"roster-port {dsn_parameters.get('dbname', '')}".rstrip(),
        )
        try:
            self._set_up_on_a_new_connection()
            unreachable = None
        except StoreUnavailable as exc:
            if not wait_for_database:
                raise
            unreachable = str(exc)
        self._pool.open(wait=False)
        if unreachable is None:
            self._usable.set()
            log.info("opened %s", self.describe())
        else:
            log.warning("%s: %s; answering store_unavailable until a connection succeeds "
                        "(tried every %g s), then setting the database up", self.describe(),
                        unreachable, PROBE_EVERY_S)
            self._mark_unreachable(unreachable)

    # --- RosterStore ------------------------------------------------------------------------

    def transaction(self, user: str, *, timeout: float | None = None
                    ) -> contextlib.AbstractContextManager[RosterTxn]:
        if self.read_only:
            return self._scope(user, _BEGIN_SNAPSHOT, lock_user=False,
                               refuse_writes_because="the store is opened read-only",
                               timeout=timeout)
        return self._scope(user, _BEGIN_WRITE, lock_user=True, refuse_writes_because=None,
                           timeout=timeout)

    def snapshot(self, user: str, *, timeout: float | None = None
                 ) -> contextlib.AbstractContextManager[RosterTxn]:
        return self._scope(user, _BEGIN_SNAPSHOT, lock_user=False,
                           refuse_writes_because="a snapshot is read-only; use transaction()",
                           timeout=timeout)

    def open_change_feed(self) -> ChangeFeed:
        """Changes not stamped with this store's origin, from the feed's own connection.

        Opened while the database is not set up yet (unreachable since the store opened), the
        feed connects once it is, and then says it resumed (ChangeFeed.take_resumed)."""
        options = self._connection_options(self._dsn_parameters)
        options.pop("autocommit", None)
        if "application_name" in options:  # ours, not the DSN's
            options["application_name"] = "roster-port feed"
        feed = PostgresChangeFeed(self._dsn, origin=self.origin, dsn_shown=self.dsn_shown,
                                  connect_timeout_s=self.connect_timeout_s,
                                  connection_options=options, ready=self._is_set_up)
        self._feeds.add(feed)  # told to connect at once when the database is back
        return feed

    def set_failure_handler(self, handler: Callable[[StoreError], None]) -> None:
        with self._state:
            self._on_failure = handler
            failure = self._failure
        if failure is not None:
            handler(failure)

    def describe(self) -> str:
        access = "read-only" if self.read_only else "read-write"
        return (
            f"PostgreSQL database {self.dsn_shown} (pool of {self.pool_min} to {self.pool_max} "
            f"connections, connect timeout {self.connect_timeout_s:g} s, "
            f"lock timeout {self.lock_timeout_ms} ms, {access})"
        )

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            self._probe_now.set()
            self._state.notify_all()
        self._pool.close(timeout=self.connect_timeout_s + 1)

    # --- Scopes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scope(self, user: str, begin: str, *, lock_user: bool,
               refuse_writes_because: str | None, timeout: float | None) -> Iterator[RosterTxn]:
        with self._one_scope_in_thread():
            # BEGIN (and the lock) go with the scope's first statement (_PostgresTxn).
            opening = [(begin, ())]
            if lock_user:
                if (lock_timeout := self._lock_timeout_within(timeout)) is not None:
                    opening.append((_SET_LOCK_TIMEOUT, (lock_timeout,)))
                opening.append((_LOCK_USER, (user, self.origin, user)))
            deadline = self._connection_deadline(timeout)
            connection = self._getconn(deadline)
            txn = _PostgresTxn(self, connection, user, refuse_writes_because, opening,
                               lock_user, deadline)
            try:
                yield txn
            except BaseException:
                txn._open = False
                self._rollback(txn._connection)
                raise
            txn._open = False
            if txn._begun:
                self._commit(txn._connection, txn._closing_statements(), user)
            else:  # no statement ran: nothing to commit
                self._give_back(txn._connection)

    @contextlib.contextmanager
    def _one_scope_in_thread(self) -> Iterator[None]:
        """Refuse a scope on a closed store, or inside another scope of the same thread."""
        if self._closed:
            raise StoreError(f"the store on {self.dsn_shown} is closed")
        if getattr(self._scopes_in_thread, "open", False):
            # Another connection would serve it, but a transaction on the same user would wait
            # for its own lock; no adapter nests scopes.
            raise StoreError("a transaction is already open on this store (no nesting)")
        self._scopes_in_thread.open = True
        try:
            yield
        finally:
            self._scopes_in_thread.open = False

    def _begin(self, begin: str, deadline: float) -> psycopg.Connection:
        """A connection from the pool with the scope's transaction begun.

        The caller gives the connection back through `_commit` or `_rollback`.
        """
        # A pooled connection may have died while idle (server restarted, session terminated);
        # BEGIN finds it out before anything was done on it, so another connection can safely
        # take over. The pool discards each broken one, so after at most pool_max of them it
        # connects afresh (or times out: the server is down).
        for attempt in itertools.count(1):
            connection = self._getconn(deadline)
            try:
                connection.execute(begin)
            except psycopg.Error as exc:
                self._pool.putconn(connection)
                if connection.broken and attempt <= self.pool_max:
                    log.info("a pooled connection to %s was lost while idle (%s); "
                             "taking another", self.dsn_shown, _one_line(exc))
                    continue
                raise self._store_error(exc, connection) from exc
            except BaseException:
                self._pool.putconn(connection)
                raise
            break
        return connection

    def _commit(self, connection: psycopg.Connection,
                statements: list[tuple[str, tuple]] | None = None, user: str = "") -> None:
        """COMMIT, after `statements` (held writes, a check) in the same pipeline."""
        # On a transaction the server aborted (a statement failed and the caller went on),
        # COMMIT would answer ROLLBACK without an error: never report that as a success.
        if connection.info.transaction_status == TransactionStatus.INERROR:
            self._rollback(connection)
            raise StoreError("a statement of the transaction failed, so it was rolled back; "
                             "nothing was written")
        if not statements:
            try:
                with self._translated_errors(connection):
                    connection.execute("COMMIT")
            finally:
                self._give_back(connection)
            return
        try:
            with connection.pipeline():
                for query, parameters in statements:
                    connection.execute(query, parameters)
                connection.execute("COMMIT")
        except psycopg.Error as exc:
            # A statement failed: the COMMIT after it did nothing; roll back.
            error = self._store_error(exc, connection)
            if (exc.sqlstate == _COUNTER_MOVED_SQLSTATE
                    and statements[-1][0] is _CHECK_COUNTER):
                log.error("the version of %s moved other than by its rows' triggers (a "
                          "trigger added to roster_items?); the write was rolled back, and "
                          "versions are read from the table from now on", user)
                self._versions_counted = False  # read from now on, as with other triggers at open
                error = StoreError(f"PostgreSQL {self.dsn_shown}: the version of {user} moved "
                                   "other than by the triggers of roster-port's schema; "
                                   "nothing was written")
            self._rollback(connection)
            raise error from exc
        except BaseException:
            self._rollback(connection)
            raise
        self._give_back(connection)

    def _rollback(self, connection: psycopg.Connection) -> None:
        # Never mask the error being raised: if the rollback fails, the connection is closed,
        # which rolls back on the server as well, and the pool replaces it.
        try:
            if connection.info.transaction_status in (TransactionStatus.INTRANS,
                                                      TransactionStatus.INERROR):
                connection.execute("ROLLBACK")
        except psycopg.Error as exc:
            log.warning("rollback failed on %s: %s; dropping the connection", self.dsn_shown,
                        _one_line(exc))
            connection.close()
        finally:
            self._give_back(connection)

    def _give_back(self, connection: psycopg.Connection) -> None:
        if connection.info.transaction_status not in (TransactionStatus.IDLE,
                                                      TransactionStatus.UNKNOWN):
            # Not supposed to happen; the pool would roll back itself, but say so.
            log.warning("a connection to %s came back in a transaction; dropping it",
                        self.dsn_shown)
            connection.close()
        self._pool.putconn(connection)  # a closed or broken connection is discarded

    # --- Errors -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translated_errors(self, connection: psycopg.Connection | None) -> Iterator[None]:
        """Turn psycopg errors into StoreUnavailable / StoreError (keeping the cause)."""
        try:
            yield
        except psycopg.Error as exc:
            raise self._store_error(exc, connection) from exc

    def _store_error(self, exc: psycopg.Error, connection: psycopg.Connection | None
                     ) -> StoreError:
        sqlstate = f" [{exc.sqlstate}]" if exc.sqlstate else ""
        detail = f"PostgreSQL {self.dsn_shown}: {type(exc).__name__}{sqlstate}: {_one_line(exc)}"
        lost = connection is not None and (connection.broken or connection.closed)
        cannot_write_now = exc.sqlstate in _UNAVAILABLE_SQLSTATES
        if isinstance(exc, psycopg.OperationalError) or lost or cannot_write_now:
            if cannot_write_now and connection is not None:
                # Drop the connection to a standby: the next one may reach the new primary
                # (with a DSN listing the hosts and target_session_attrs=read-write).
                connection.close()
            log.warning("PostgreSQL database unavailable: %s", detail)
            return StoreUnavailable(detail)
        return StoreError(detail)

    # --- Connections and schema -------------------------------------------------------------

    def _connection_options(self, dsn_parameters: dict) -> dict:
        """libpq options of every connection, added to (or, for ours, replacing) the DSN's."""
        options: dict = {
            "autocommit": True,  # scopes issue BEGIN and COMMIT themselves
            "client_encoding": "UTF8",
            # libpq counts whole seconds (and 2 at least).
            "connect_timeout": max(2, math.ceil(self.connect_timeout_s)),
        }
        defaults = {
            "application_name": "roster-port",
            # Data sent and not acknowledged for that long: the peer is gone (Linux).
            "tcp_user_timeout": math.ceil(self.connect_timeout_s * 1000),
            **KEEPALIVE_SETTINGS,
        }
        options.update({key: value for key, value in defaults.items()
                        if key not in dsn_parameters})
        return options

    def _configure_connection(self, connection: psycopg.Connection) -> None:
        """Session settings of each new connection (runs in autocommit: leaves no transaction)."""
        connection.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{self.lock_timeout_ms}ms", f"{IDLE_IN_TRANSACTION_TIMEOUT_MS}ms"),
        )

    def _connect_alone(self) -> psycopg.Connection:
        """A connection of its own (outside the pool, configured as the pool's are), or
        StoreUnavailable saying why not."""
        try:
            connection = psycopg.connect(self._dsn, **self._connection_options(self._dsn_parameters))
        except psycopg.Error as exc:
            # Bad passwords and missing databases too: libpq gives no SQLSTATE to tell them
            # from a server that is down, and they are put right without a restart.
            raise StoreUnavailable(f"PostgreSQL {self.dsn_shown}: cannot connect: "
                                   f"{_one_line(exc)}") from exc
        try:
            with self._translated_errors(connection):
                self._configure_connection(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    def _set_up_on_a_new_connection(self) -> None:
        """Make the database ready to serve (the migrations, or a mapping's check), on a
        connection of its own: StoreUnavailable if it cannot be reached, StoreError if it can
        and does not fit."""
        connection = self._connect_alone()
        try:
            with self._translated_errors(connection):
                encoding = connection.execute("SHOW server_encoding").fetchone()[0]
                if encoding != "UTF8":
                    raise StoreError(
                        f"the PostgreSQL database {self.dsn_shown} is encoded in {encoding}; "
                        "rosters need UTF8 (CREATE DATABASE ... ENCODING 'UTF8')")
                self._set_up(connection)
        finally:
            connection.close()  # which rolls back what a step that failed halfway left open
        self._set_up_done = True

    # --- Reachability -----------------------------------------------------------------------

    def _is_set_up(self) -> bool:
        return self._set_up_done

    def _connection_deadline(self, timeout: float | None) -> float:
        """When a scope stops waiting for a connection: after the connect timeout, or the
        time its caller has left if that is shorter."""
        wait = self.connect_timeout_s if timeout is None else min(self.connect_timeout_s, timeout)
        return time.monotonic() + wait

    def _lock_timeout_within(self, timeout: float | None) -> str | None:
        """The lock timeout of a write scope whose caller has less time left than the
        configured one (a setting local to its transaction), or None."""
        if timeout is None or timeout * 1000 >= self.lock_timeout_ms:
            return None
        return f"{max(1, int(timeout * 1000))}ms"

    def _getconn(self, deadline: float) -> psycopg.Connection:
        """A pooled connection by `deadline` (on time.monotonic()); StoreUnavailable when there
        is none by then, or at once when the database is found unreachable."""
        started = time.monotonic()
        while True:
            self._wait_until_usable(deadline)
            remaining = deadline - time.monotonic()
            try:
                return self._pool.getconn(timeout=max(0.001, min(remaining, _GETCONN_SLICE_S)))
            except psycopg_pool.PoolClosed as exc:
                raise StoreError(f"the store on {self.dsn_shown} is closed") from exc
            except psycopg_pool.PoolTimeout as exc:
                if time.monotonic() < deadline:
                    continue  # one more slice, if the database was not found unreachable
                detail = (f"PostgreSQL {self.dsn_shown}: no connection within the connect "
                          f"timeout ({self.connect_timeout_s:g} s) or the request's deadline")
                if (self._pool.get_stats().get("pool_size", 0) < self.pool_max
                        and time.monotonic() - started >= self.connect_timeout_s):
                    # Not every connection is busy, and a whole connect timeout went by: new
                    # ones cannot be made. (A request with less time left than that proves
                    # nothing: the pool may be making one.)
                    self._mark_unreachable(detail)
                log.warning("PostgreSQL database unavailable: %s", detail)
                raise StoreUnavailable(detail) from exc

    def _wait_until_usable(self, deadline: float) -> None:
        """Return at once while the database is reachable. Otherwise have a connection tried
        now, wait for that try (at most PROBE_WAIT_S, and not past `deadline`), and raise
        StoreUnavailable unless it succeeded."""
        if self._usable.is_set():
            return
        with self._state:
            wanted = self._probes_started + 1  # a try that starts from now on
            self._probe_now.set()
            self._state.wait_for(
                lambda: (self._usable.is_set() or self._closed or self._failure is not None
                         or self._probes_done >= wanted),
                timeout=max(0.0, min(PROBE_WAIT_S, deadline - time.monotonic())))
            if self._usable.is_set():
                return
            if self._closed:
                raise StoreError(f"the store on {self.dsn_shown} is closed")
            if self._failure is not None:
                raise StoreError(str(self._failure))
            since = time.monotonic() - self._unreachable_since
            raise StoreUnavailable(f"{self._unreachable_because} (unreachable for {since:.1f} s; "
                                   f"tried every {PROBE_EVERY_S:g} s and at each request)")

    def _pool_cannot_connect(self, pool: psycopg_pool.ConnectionPool) -> None:
        # The pool's reconnect_failed: in one of its threads.
        self._mark_unreachable(f"PostgreSQL {self.dsn_shown}: the pool could not connect (the "
                               "psycopg.pool warnings in the log say why)", vague=True)

    def _mark_unreachable(self, reason: str, vague: bool = False) -> None:
        """Scopes fail fast from now on, until a connection of the prober succeeds. A `vague`
        reason (the pool's, which does not say why) never replaces one already known."""
        with self._state:
            if self._closed or self._failure is not None:
                return
            if not (vague and not self._usable.is_set() and self._unreachable_because):
                self._unreachable_because = reason
            if self._usable.is_set() or not self._unreachable_since:
                self._usable.clear()
                self._unreachable_since = time.monotonic()
                if self._set_up_done:
                    log.warning("%s; answering store_unavailable until a connection succeeds "
                                "(tried every %g s and at each request)", reason, PROBE_EVERY_S)
            if self._prober is None:
                self._prober = threading.Thread(target=self._probe, daemon=True,
                                                name="roster-port store probe")
                self._prober.start()

    def _probe(self) -> None:
        """The prober thread: while the database is unreachable, try a connection every
        PROBE_EVERY_S or when a scope asks; set the database up if it never was; then let the
        scopes through, and tell the change feeds to connect at once."""
        logged = time.monotonic()
        while True:
            self._probe_now.wait(PROBE_EVERY_S)
            with self._state:
                if self._closed:
                    self._prober = None
                    return
                self._probe_now.clear()
                self._probes_started += 1
                number = self._probes_started
            was_set_up = self._set_up_done
            try:
                if was_set_up:
                    try:
                        self._connect_alone().close()
                    except StoreError as exc:  # served before: never a reason to stop now
                        raise StoreUnavailable(str(exc)) from exc
                else:
                    self._set_up_on_a_new_connection()
            except StoreUnavailable as exc:
                with self._state:
                    self._unreachable_because = str(exc)
                    self._probes_done = number
                    self._state.notify_all()
                if time.monotonic() - logged >= 30:
                    logged = time.monotonic()
                    log.warning("%s (unreachable for %.0f s)", exc,
                                logged - self._unreachable_since)
                continue
            except Exception as exc:  # noqa: BLE001 - StoreError: reachable, and does not fit
                failure = exc if isinstance(exc, StoreError) else StoreError(
                    f"setting up {self.dsn_shown} failed: {type(exc).__name__}: {exc}")
                if not isinstance(exc, StoreError):
                    log.exception("setting up %s failed", self.dsn_shown)
                with self._state:
                    self._failure = failure
                    self._probes_done = number
                    self._prober = None
                    self._state.notify_all()
                    handler = self._on_failure
                log.error("%s can be reached and cannot be served: %s", self.dsn_shown, failure)
                if handler is not None:
                    handler(failure)
                return
            with self._state:
                self._probes_done = number
                self._prober = None
                if not self._closed:
                    self._usable.set()
                self._state.notify_all()
                feeds = list(self._feeds)
            log.warning("PostgreSQL %s reachable again after %.1f s; serving", self.dsn_shown,
                        time.monotonic() - self._unreachable_since)
            if not was_set_up:
                log.info("opened %s", self.describe())
            for feed in feeds:
                feed.retry_now()
            return

    def _set_up(self, connection: psycopg.Connection) -> None:
        """Make the database ready to serve: here, apply the pending migrations."""
        self._migrate(connection)
        self._versions_counted = self._only_our_triggers(connection)
        if not self._versions_counted:
            log.info("%s has triggers of its own on roster_items or roster_versions: versions "
                     "are read after each write, not counted", self.dsn_shown)

    @staticmethod
    def _only_our_triggers(connection: psycopg.Connection) -> bool:
        """Whether the version triggers are the only ones that can move a counter (then a
        write scope counts its version, see _PostgresTxn)."""
        others = connection.execute(
            "SELECT count(*) FROM pg_trigger "
            "WHERE tgrelid IN ('roster_items'::regclass, 'roster_versions'::regclass) "
            "AND NOT tgisinternal AND tgname <> ALL(%s)", (list(_OUR_TRIGGERS),)).fetchone()[0]
        return others == 0

    def _migrate(self, connection: psycopg.Connection) -> None:
        pending = self._pending_migrations(connection)
        if not pending:  # the usual case: no lock, no DDL
            return
        if self.read_only:
            raise StoreError(
                f"the schema of {self.dsn_shown} is not current (missing "
                f"{', '.join(migration.name for migration in pending)}); "
                "open it read-write once to migrate it")
        schema_name = connection.execute("SELECT current_schema()").fetchone()[0]
        if schema_name is None:
            raise StoreError(f"no schema of the search_path of {self.dsn_shown} exists to "
                             "create the tables in")
        schema = sql.Identifier(schema_name)
        with connection.transaction():
            # One lock around "what is pending" and "apply it": processes started together on
            # a fresh database wait for each other, and only the first one migrates.
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            connection.execute("""
                CREATE TABLE IF NOT EXISTS roster_port_migrations (
                    number integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
            """)
            applied_now = []
            for migration in self._pending_migrations(connection):
                migration.apply(connection, schema)
                connection.execute(
                    "INSERT INTO roster_port_migrations (number, name) VALUES (%s, %s)",
                    (migration.number, migration.name))
                applied_now.append(migration.name)
        if applied_now:
            log.info("migrated %s (schema %s): applied %s", self.dsn_shown, schema_name,
                     ", ".join(applied_now))

    @staticmethod
    def _pending_migrations(connection: psycopg.Connection) -> list[Migration]:
        exists = connection.execute(
            "SELECT to_regclass('roster_port_migrations') IS NOT NULL").fetchone()[0]
        applied = set()
        if exists:
            applied = {number for (number,) in connection.execute(
                "SELECT number FROM roster_port_migrations")}
        newer = applied - {migration.number for migration in MIGRATIONS}
        if newer:
            log.warning("the database has migrations this version does not know: %s "
                        "(a newer roster-port migrated it)", sorted(newer))
        return [migration for migration in MIGRATIONS if migration.number not in applied]
