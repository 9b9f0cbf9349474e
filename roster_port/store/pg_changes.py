"""The PostgreSQL change log and its feed: changes made outside this ejabberd node, woken by
LISTEN/NOTIFY. Shared by every PostgreSQL adapter (the default schema of postgres.py, an
operator's own schema) and by operators' own triggers.

Theory of operation
-------------------
The log. `install_change_log()` creates (idempotently) the table `roster_port_changes` and the
function `roster_port_log_change(p_username, p_contact, p_old_subscription, p_new_subscription)`.
Triggers call the function for every row that changes, whoever changes it: the default schema's
triggers on `roster_items` (postgres.py), or triggers an operator adds to their own tables
(docs/changes.md). The function inserts one entry, stamped with the `origin` of the transaction
(the setting `roster_port.origin`, empty for other applications), and runs
`pg_notify('roster_port_changes', p_username)`, which PostgreSQL delivers to the listeners when
(and only if) the transaction commits. Program processes set the origin to the ejabberd node
they serve, transaction-local, before they write (`set_origin()`).

The feed. `PostgresChangeFeed` has a connection of its own (autocommit, never a pooled one) that
LISTENs on the channel. A notification only wakes it: the entries themselves are read from the
table, so a notification lost while disconnected loses nothing. Each `read()`:

1. drains the notifications received; when the log's function sends the origins' wake-ups
   (`WAKE_CHANNEL`, installed by this module since migration 5 of postgres.py), the feed
   LISTENs there and stops at this step if every notification carries its own origin (its
   node's own writes, which it would read nothing for), unless it last read more than
   `READ_AT_LEAST_EVERY_S` ago (so that the snapshot P never lags far behind); with an older
   function it LISTENs on `roster_port_changes` and reads at every wake-up;
2. in one statement (one round trip; a statement sees one snapshot), takes that snapshot S
   (`pg_current_snapshot()`) and reads the entries not stamped with its own origin that were
   not visible in the previous read's snapshot P;
3. keeps S as the new P, and goes back to 2. if a notification arrived meanwhile (libpq may
   have read it off the socket during step 2, and the socket would not wake us again).

"Not visible in P" is exact, where "id greater than the last id read" is not: ids come from a
sequence when a row is inserted, not when its transaction commits, so a transaction holding
id 7 may commit after another one holding id 8 was read; "id > 8" would skip 7 forever. An
entry that P did not show belongs to a transaction that was in progress at P (its top-level
transaction id, `xact`, is in P's xip list) or that started after P (`xact` >= P's xmax).
Conversely, every entry matching that test was invisible in P, so nothing is reported twice
and no set of seen ids is kept. A transaction open for hours costs one index lookup per read
(its id stays in the xip list), never a re-read of everything since it began.

Reconnection. The loop of server.py registers `fileno()` once. A LISTEN connection that breaks
(database restarted, session terminated, network cut) is replaced by another one with another
socket, so `fileno()` is not the connection's socket: it is a selector of the feed's own
(epoll on Linux), which is readable when the socket is, and when the background reconnector
hands over a new connection. While disconnected, a thread tries to connect again (0.1 s, then
doubling up to 0.5 s, and at once when the store finds the database back: `retry_now()`) so
that the serving loop never waits for the database; the first read after it succeeded re-reads
from P: every entry committed meanwhile is reported. Transaction ids survive a restart (and a
failover to a physical replica); a database whose transaction ids went backwards (restored
from a dump into another cluster) is logged and read from its present snapshot on.

Resuming. A feed opened before its database could be reached (or set up: `ready`) has no P
yet: it connects later and reports the changes committed from then on. Changes committed
before that, while someone may already have read and kept rosters, are never reported; so
after that first connection, after every reconnection, and after the ids went backwards,
`take_resumed()` says so once, and the server tells the shim to drop every cache
(`feed_resumed`, docs/protocol.md).

Pruning. Entries are kept `RETENTION` (a day) so that the feeds of several ejabberd nodes each
read them; every `PRUNE_EVERY_S` a feed deletes the oldest ones past that age, at most
`PRUNE_BATCH` per read.

What this module must never do
------------------------------
- Raise out of `read()`: a database error is logged, the feed reconnects, nothing is lost.
- Report an entry twice, skip one committed after its id was passed, or report an entry of its
  own origin (those changes were pushed by the responses that made them).
- Build SQL from data: values are bound parameters, identifiers go through `psycopg.sql`.
- Show the password of the DSN (in logs or errors).
- Write to stdout (it is the program's protocol channel); it only logs.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from roster_port.store.base import ChangeFeed, OutsideChange

log = logging.getLogger(__name__)

CHANNEL = "roster_port_changes"
# The feeds' wake-ups: one notification per origin and transaction, the origin as payload
# ('' for other applications), so that a feed can tell the wake-ups of its own node's writes,
# which it would read nothing for, from the others'. CHANNEL (the user as payload) stays as
# it is, for whoever else listens.
WAKE_CHANNEL = "roster_port_change_origins"
ORIGIN_SETTING = "roster_port.origin"
ORIGIN_USER_SETTING = "roster_port.origin_user"
# pg_advisory_xact_lock key held while installing: "rp_chlog" in ASCII, as a (positive) bigint.
INSTALL_LOCK_KEY = int.from_bytes(b"rp_chlog", "big")

# For the program's write transactions: the entries its writes log for the transaction's user
# carry its origin. Local to the transaction (is_local = true): nothing leaks to the next user
# of a pooled connection.
SET_ORIGIN_SQL = (
    "SELECT set_config('roster_port.origin', %s, true), "
    "set_config('roster_port.origin_user', %s, true)"
)


def set_origin(cursor: psycopg.Connection | psycopg.Cursor, origin: str, user: str) -> None:
    """Stamp the change-log entries of `user`'s rows written by the transaction open on
    `cursor` with `origin`.

    Only `user`'s: in an operator's schema one row may serve two people (a friendship), and a
    write to one roster then changes the other's too. That other entry stays unstamped, so every
    node's feed reports it, this one included, and the other person's sessions hear of it.
    Call it inside the write transaction, before its first write (it is `SET LOCAL`).
    """
    cursor.execute(SET_ORIGIN_SQL, (origin, user))


def install_change_log(cursor: psycopg.Connection | psycopg.Cursor,
                       schema: str | sql.Identifier | None = None) -> None:
    """Create the change log and `roster_port_log_change()` in `schema` if missing.

    Idempotent (CREATE ... IF NOT EXISTS, CREATE OR REPLACE): adapters call it in their setup
    every time. Run it inside a transaction: it takes an advisory lock so that processes
    installing at the same moment wait for each other. `schema` defaults to the connection's
    current schema; the function is pinned to it, so that it finds its table whatever the
    search_path of the application whose trigger calls it.
    """
    if schema is None:
        name = cursor.execute("SELECT current_schema()").fetchone()[0]
        if name is None:
            raise psycopg.ProgrammingError("no schema of the search_path exists")
        schema = sql.Identifier(name)
    elif isinstance(schema, str):
        schema = sql.Identifier(schema)
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (INSTALL_LOCK_KEY,))
    for statement in change_log_statements(schema):
        cursor.execute(statement)


def change_log_statements(schema: sql.Identifier) -> list[sql.Composed]:
    """The DDL of the change log in `schema`: what install_change_log() runs (after its lock),
    and what `roster-port install-change-log --print-sql` shows a DBA."""
    return [
        sql.SQL("""
        CREATE TABLE IF NOT EXISTS {schema}.roster_port_changes (
            id bigserial PRIMARY KEY,
            username text NOT NULL,
            contact text NOT NULL,
            old_subscription text,
            new_subscription text,
            origin text,
            xact xid8 NOT NULL DEFAULT pg_current_xact_id(),
            recorded_at timestamptz NOT NULL DEFAULT now()
        )
    """).format(schema=schema),
        # The feed reads by transaction id: "xact >= xmax OR xact = ANY(xip)".
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS roster_port_changes_xact ON {schema}.roster_port_changes (xact)"
        ).format(schema=schema),
        # A notification asks the same of one user's entries (logged_after_query): without
        # it, every entry after the read is visited for each user of a batch.
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS roster_port_changes_username_xact"
            " ON {schema}.roster_port_changes (username, xact)"
        ).format(schema=schema),
        sql.SQL("""
        CREATE OR REPLACE FUNCTION {schema}.roster_port_log_change(
            p_username text, p_contact text, p_old_subscription text, p_new_subscription text)
        RETURNS void
        LANGUAGE plpgsql SET search_path = {schema} AS $$
        DECLARE
            v_origin text := nullif(current_setting({setting}, true), '');
            v_origin_user text := nullif(current_setting({user_setting}, true), '');
        BEGIN
            -- A program's transaction stamps its own user's entries only (see set_origin).
            IF v_origin_user IS NOT NULL AND v_origin_user IS DISTINCT FROM p_username THEN
                v_origin := NULL;
            END IF;
            INSERT INTO roster_port_changes
                (username, contact, old_subscription, new_subscription, origin)
            VALUES (p_username, p_contact, p_old_subscription, p_new_subscription, v_origin);
            -- Delivered at commit, once per user and transaction (the server folds duplicates).
            PERFORM pg_notify({channel}, p_username);
            -- The feeds' wake-up, once per origin and transaction.
            PERFORM pg_notify({wake_channel}, left(coalesce(v_origin, ''), 1000));
        END
        $$
    """).format(schema=schema, setting=sql.Literal(ORIGIN_SETTING),
                    user_setting=sql.Literal(ORIGIN_USER_SETTING), channel=sql.Literal(CHANNEL),
                    wake_channel=sql.Literal(WAKE_CHANNEL)),
    ]


def change_log_grants(schema: sql.Identifier, *, program_roles: list[str] = (),
                      writer_roles: list[str] = ()) -> list[sql.Composed]:
    """GRANTs for the roles that use the log but do not own it.

    The function runs with the rights of whoever's transaction calls it (it is not SECURITY
    DEFINER), so a *writer*, any role whose writes fire a trigger that logs (the program's
    own role included: its writes fire the operator's triggers), needs INSERT on the table
    and USAGE on its sequence; the *program* also reads the log (SELECT) and prunes it
    (DELETE). LISTEN needs no privilege; EXECUTE on functions is PUBLIC's by default.
    """
    table = sql.SQL("{}.roster_port_changes").format(schema)
    sequence = sql.SQL("{}.roster_port_changes_id_seq").format(schema)
    statements = []
    for role, rights in ([(r, "SELECT, INSERT, DELETE") for r in program_roles]
                         + [(r, "INSERT") for r in writer_roles if r not in program_roles]):
        statements.append(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, sql.Identifier(role)))
        statements.append(sql.SQL("GRANT " + rights + " ON {} TO {}").format(table, sql.Identifier(role)))
        statements.append(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(sequence, sql.Identifier(role)))
    return statements


TRIGGERS_THAT_LOG = """
    SELECT c.relnamespace::regnamespace::text, c.relname, t.tgname, t.tgenabled <> 'D'
    FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid
    JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE NOT t.tgisinternal AND p.prosrc ILIKE '%%roster_port_log_change%%'
    ORDER BY 1, 2, 3
"""


def triggers_that_log(cursor: psycopg.Connection | psycopg.Cursor) -> list[tuple[str, str, str, bool]]:
    """(schema, table, trigger, enabled) of every trigger whose function calls
    roster_port_log_change(): the tables whose changes made outside XMPP reach the feed."""
    return [tuple(row) for row in cursor.execute(TRIGGERS_THAT_LOG).fetchall()]


# The feed's read (see _read_entries): this statement's snapshot S, and the entries not
# stamped with the feed's origin that the previous snapshot P (xmax, xip) did not show.
_READ_ENTRIES = """
    SELECT pg_snapshot_xmax(s)::text,
           ARRAY(SELECT pg_snapshot_xip(s)::text),
           coalesce((SELECT json_agg(json_build_array(username, contact, old_subscription,
                                                      new_subscription,
                                                      extract(epoch FROM recorded_at))
                                     ORDER BY id)
                     FROM roster_port_changes
                     WHERE (xact >= %s::text::xid8 OR xact = ANY(%s::text[]::xid8[]))
                       AND origin IS DISTINCT FROM %s), '[]'::json)
    FROM pg_current_snapshot() AS s
"""


class SnapshotPosition(NamedTuple):
    """Where a read of PostgresChangeFeed stood: its snapshot (xmax, xip). An entry was not
    committed yet there iff its `xact` is >= xmax or in xip (the module docstring)."""

    xmax: int
    xip: tuple[int, ...]


# For RosterTxn.logged_after: an entry of the user that the transaction sees but a read's
# snapshot did not (whatever its origin). The `xact` index finds the few entries since then.
_LOGGED_AFTER = """
    SELECT EXISTS (SELECT 1 FROM roster_port_changes
                   WHERE (xact >= %s::text::xid8 OR xact = ANY(%s::text[]::xid8[]))
                     AND username = %s)
"""


def logged_after_query(user: str, position: object | None) -> tuple[str, tuple] | None:
    """The statement (and its parameters) telling whether the change log holds entries of
    `user` not committed yet at `position`; None for a position no PostgresChangeFeed made."""
    if not isinstance(position, SnapshotPosition):
        return None
    return _LOGGED_AFTER, (str(position.xmax), [str(xid) for xid in position.xip], user)


class PostgresChangeFeed(ChangeFeed):
    """Entries of `roster_port_changes` not stamped with `origin`, woken by LISTEN/NOTIFY.

    `connection_options` are psycopg.connect keyword arguments added to the DSN's (keepalives,
    timeouts); the feed forces autocommit. See the module docstring.
    """

    RETENTION = "1 day"
    PRUNE_EVERY_S = 600.0
    PRUNE_BATCH = 10_000
    # Reconnection: soon, and never more than half a second after the database is back (the
    # store that opened the feed also tells it to try at once when it finds it back).
    RECONNECT_FIRST_DELAY_S = 0.1
    RECONNECT_MAX_DELAY_S = 0.5
    PASSES = 3  # reads in one read() while notifications keep coming
    # Wake-ups of the feed's own origin only are not read for, unless the last read is older.
    READ_AT_LEAST_EVERY_S = 1.0

    def __init__(self, dsn: str, *, origin: str, dsn_shown: str = "PostgreSQL",
                 connect_timeout_s: float = 2.0,
                 connection_options: dict[str, Any] | None = None,
                 ready: Callable[[], bool] | None = None) -> None:
        self.origin = origin
        self.dsn_shown = dsn_shown
        self._dsn = dsn
        self._connection_options = {
            "connect_timeout": max(2, int(connect_timeout_s + 0.999)),
            **(connection_options or {}),
            "autocommit": True,
        }
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_closed = False
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._connection: psycopg.Connection | None = None
        self._socket: int | None = None
        # Handed over by the reconnector thread; guarded by _lock.
        self._lock = threading.Lock()
        self._handed_over: psycopg.Connection | None = None
        self._reconnector: threading.Thread | None = None
        self._closing = threading.Event()
        self._retry_now = threading.Event()
        # Whether the database is set up for the feed (the store's migrations ran): not
        # connected to before.
        self._ready = ready
        # Started reading again after a time without a connection (take_resumed).
        self._resumed = False
        # The previous read's snapshot: its xmax and its xip list (None: no snapshot yet).
        self._xmax: int | None = None
        self._xip: list[int] = []
        self._next_prune = time.monotonic() + self.PRUNE_EVERY_S
        # Whether the connection LISTENs on WAKE_CHANNEL (the log's function sends it).
        self._origin_wakeups = False
        self._must_read = True  # connected anew, or notifications still coming: read
        self._last_read = 0.0
        if ready is not None and not ready():
            log.warning("change feed on %s: the database is not set up yet; connecting once it "
                        "is", self.dsn_shown)
            self._start_reconnector()
            return
        try:
            self._adopt(self._connect())
        except psycopg.Error as exc:
            log.warning("change feed on %s: cannot connect (%s); retrying in the background",
                        self.dsn_shown, _one_line(exc))
            self._start_reconnector()

    # --- ChangeFeed -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._selector.fileno()

    def take_resumed(self) -> bool:
        resumed, self._resumed = self._resumed, False
        return resumed

    def retry_now(self) -> None:
        """Have a disconnected feed try to connect at once (the database is back)."""
        self._retry_now.set()

    def read(self) -> list[OutsideChange]:
        try:
            return self._read()
        except Exception:  # noqa: BLE001 - a bug must not stop the serving loop
            log.exception("change feed on %s: unexpected error; reconnecting", self.dsn_shown)
            self._disconnect()
            self._start_reconnector()
            return []

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._retry_now.set()
        self._disconnect()
        reconnector = self._reconnector
        if reconnector is not None:
            reconnector.join(timeout=0.1)  # it closes what it connects after this
        with self._lock:
            handed_over, self._handed_over = self._handed_over, None
            if handed_over is not None:
                handed_over.close()
            self._pipe_closed = True
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    # --- Reading ----------------------------------------------------------------------------

    def _read(self) -> list[OutsideChange]:
        self._drain_wake_pipe()
        changes: list[OutsideChange] = []
        try:
            if self._connection is None:
                with self._lock:
                    connection, self._handed_over = self._handed_over, None
                if connection is None:
                    return []  # the reconnector is at work
                self._adopt(connection)
                # Whatever was read meanwhile, without a feed reading, may be stale.
                self._resumed = True
                log.info("change feed on %s: reconnected; reading what was logged meanwhile",
                         self.dsn_shown)
            wanted = self._drain_notifications()
            if (wanted or self._must_read
                    or time.monotonic() - self._last_read >= self.READ_AT_LEAST_EVERY_S):
                self._must_read = False
                for _ in range(self.PASSES):
                    changes += self._read_entries()
                    self._last_read = time.monotonic()
                    if not self._drain_notifications():
                        break
                else:
                    # Still notified: read again after the serving loop had its turn (a busy
                    # database must not keep it from serving requests).
                    self._must_read = True
                    self._wake()
            if time.monotonic() >= self._next_prune:
                self._prune()
        except psycopg.Error as exc:
            log.warning("change feed on %s: connection lost (%s); reconnecting, and then "
                        "reading what was logged meanwhile", self.dsn_shown, _one_line(exc))
            self._disconnect()
            self._start_reconnector()
        return changes

    def _drain_notifications(self) -> int:
        """The notifications received that call for a read (not only our own origin's)."""
        assert self._connection is not None
        if not self._origin_wakeups:
            return sum(1 for _ in self._connection.notifies(timeout=0))
        return sum(1 for notify in self._connection.notifies(timeout=0)
                   if notify.payload != self.origin)

    def _read_entries(self) -> list[OutsideChange]:
        """The entries not visible in the previous snapshot; then this one becomes it.

        One statement, one round trip: a statement runs in one snapshot (autocommit, READ
        COMMITTED), which is both the snapshot S it returns and the one its entries are read in.
        """
        assert self._connection is not None
        if self._xmax is None:  # the first snapshot: changes from now on
            self._xmax, self._xip = self._current_snapshot(self._connection)
            return []
        xmax, xip, records = self._connection.execute(
            _READ_ENTRIES, (str(self._xmax), [str(xid) for xid in self._xip], self.origin),
        ).fetchone()
        xmax = int(xmax)
        if xmax < self._xmax:
            log.warning("change feed on %s: transaction ids went backwards (%d after %d): "
                        "another database? reading its changes from now on",
                        self.dsn_shown, xmax, self._xmax)
            records = []
            self._resumed = True  # what it logged before now is never reported
        self._xmax, self._xip = xmax, [int(xid) for xid in xip]
        # Every entry reported was committed in this snapshot (the statement read them in it).
        read_at = SnapshotPosition(self._xmax, tuple(self._xip))
        return [OutsideChange(user, contact, old, new,
                              float(at) if isinstance(at, (int, float)) else None, read_at)
                for user, contact, old, new, at in records]

    @staticmethod
    def _current_snapshot(connection: psycopg.Connection) -> tuple[int, list[int]]:
        xmax, xip = connection.execute(
            "SELECT pg_snapshot_xmax(s)::text, "
            "ARRAY(SELECT pg_snapshot_xip(s)::text) FROM pg_current_snapshot() AS s"
        ).fetchone()
        return int(xmax), [int(xid) for xid in xip]

    def _prune(self) -> None:
        assert self._connection is not None
        try:
            cursor = self._connection.execute(
                "DELETE FROM roster_port_changes WHERE id IN "
                "(SELECT id FROM roster_port_changes ORDER BY id LIMIT %s) "
                "AND recorded_at < now() - %s::interval",
                (self.PRUNE_BATCH, self.RETENTION),
            )
        except psycopg.Error as exc:
            if self._connection.broken:
                raise
            # No DELETE privilege, another node's prune holding the rows: not a reason to stop.
            log.warning("change feed on %s: pruning the change log failed: %s", self.dsn_shown,
                        _one_line(exc))
            self._next_prune = time.monotonic() + self.PRUNE_EVERY_S
            return
        deleted = cursor.rowcount
        if deleted:
            log.info("change feed on %s: pruned %d entries older than %s", self.dsn_shown,
                     deleted, self.RETENTION)
        # A full batch: more to prune, at the next read.
        self._next_prune = time.monotonic() + (0 if deleted >= self.PRUNE_BATCH
                                               else self.PRUNE_EVERY_S)

    # --- Connections ------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        connection = psycopg.connect(self._dsn, **self._connection_options)
        try:
            # Statement and lock timeouts bound a prune waiting for another node's prune.
            connection.execute("SELECT set_config('lock_timeout', '2s', false), "
                               "set_config('statement_timeout', '30s', false)")
            # The origins' wake-ups, if the log's function (of the schema the feed reads)
            # sends them; the users' channel otherwise.
            origin_wakeups = connection.execute(
                "SELECT coalesce((SELECT position(%s in prosrc) > 0 FROM pg_proc WHERE oid = "
                "to_regprocedure('roster_port_log_change(text, text, text, text)')), false)",
                (WAKE_CHANNEL,)).fetchone()[0]
            channel = WAKE_CHANNEL if origin_wakeups else CHANNEL
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            connection.close()
            raise
        return connection

    def _adopt(self, connection: psycopg.Connection) -> None:
        if self._xmax is None:
            # The feed reports the changes committed from now on (it is LISTENing already).
            try:
                self._xmax, self._xip = self._current_snapshot(connection)
            except BaseException:
                connection.close()
                raise
        try:
            # Which channel _connect chose.
            self._origin_wakeups = connection.execute(
                "SELECT %s = ANY(ARRAY(SELECT pg_listening_channels()))",
                (WAKE_CHANNEL,)).fetchone()[0]
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._must_read = True  # entries may have been logged while disconnected
        self._socket = connection.fileno()
        self._selector.register(self._socket, selectors.EVENT_READ)
        # Read at once: entries may have been logged while disconnected.
        self._wake()

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if self._socket is not None:
            try:
                self._selector.unregister(self._socket)
            except (KeyError, ValueError):
                pass
            self._socket = None
        if connection is not None:
            try:
                connection.close()
            except psycopg.Error as exc:
                log.debug("closing the change feed's connection: %s", _one_line(exc))

    def _start_reconnector(self) -> None:
        if self._closing.is_set() or (self._reconnector is not None
                                      and self._reconnector.is_alive()):
            return
        self._reconnector = threading.Thread(target=self._reconnect, name="roster-port feed",
                                             daemon=True)
        self._reconnector.start()

    def _reconnect(self) -> None:
        """In the reconnector thread: connect and LISTEN, then hand the connection over."""
        delay = self.RECONNECT_FIRST_DELAY_S
        failures = 0
        while True:
            self._retry_now.wait(delay)
            self._retry_now.clear()
            if self._closing.is_set():
                return
            if self._ready is not None and not self._ready():
                continue  # the store tells us (retry_now) when it has set the database up
            try:
                connection = self._connect()
            except psycopg.Error as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("change feed on %s: cannot reconnect yet (%s)", self.dsn_shown,
                                _one_line(exc))
                delay = min(delay * 2, self.RECONNECT_MAX_DELAY_S)
                continue
            with self._lock:
                if not self._closing.is_set():
                    self._handed_over, connection = connection, None
            if connection is not None:  # closed meanwhile
                connection.close()
            self._wake()
            return

    def _wake(self) -> None:
        # Under the lock: close() closes the pipe under it, and a number reused for another
        # file after that must never be written to.
        with self._lock:
            if self._pipe_closed:
                return
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # full: a wake is pending anyway

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
