"""Rosters read from and written to the operator's own PostgreSQL tables, through SQL the operator
writes: the roster is a *view* of the application's data, never a copy of it.

Theory of operation
-------------------
A *mapping* (a TOML file, or an inline table; docs/mappings.md) gives one parameterised SQL
statement per operation of `RosterTxn`, and optionally a *status map* between the application's
own relationship words and RFC 6121 states:

    [statements]
    lock_user  = "SELECT 1 FROM users WHERE id = %(user_id)s FOR UPDATE"
    rows       = "SELECT ... AS contact, ... AS status FROM friendships ... ORDER BY ..."
    get        = "... the same, for %(contact)s only ..."
    put        = ["INSERT ... ON CONFLICT ... DO UPDATE ...", "DELETE FROM tags ...", ...]
    delete     = "..."
    delete_all = "..."
    count      = "SELECT count(*) ..."        # optional: the roster items of rows() otherwise
    count_requests = "SELECT count(*) ..."    # optional: the strangers' requests of rows()
    version    = "SELECT version FROM ..."    # optional: an md5 of the rows otherwise
    bump_version = "UPDATE ... "              # optional: run after every write
    user_id    = "SELECT id FROM users WHERE username = %(local)s AND %(domain)s = 'x.org'"
    jid_of     = "SELECT username || '@x.org' FROM users WHERE id = %(id)s"

Every statement is a string, or a list of strings run in order, with psycopg's *named*
placeholders (`%(user)s`); values are always bound by the driver, never formatted into SQL
(`PARAMETERS` lists them). A reading statement returns columns *by name* (`ROW_COLUMNS`): the
contact's bare JID (or id, turned into a JID by `jid_of`), name, groups, and the state, either as
RFC columns (`subscription`, `pending_out`/`pending_in` or `ask`, `approved`, `in_roster`) or as
one `status` word looked up in `[status.read]`. A write gets the row's fields and the word
`[status.write]` gives for its RFC state as `%(status)s`.

- `MappedPostgresStore` is a `PostgresStore` (same pool, error mapping, BEGIN/COMMIT/ROLLBACK,
  timeouts) whose schema is not its own: it never creates or migrates a table. At open it checks
  the database's encoding and validates the mapping against the database (`_validate`): every
  statement is planned by `EXPLAIN` (never executed) inside a READ ONLY transaction that is
  rolled back, and every reading statement is also run once there, so an unknown table or
  column, a misspelt parameter, a missing cast or an unknown result column is refused at open
  with the statement's name, not at a user's first login.
- `transaction(user)` begins READ COMMITTED and runs `lock_user`, which must serialise
  read-modify-write on that user's roster across processes (`FOR UPDATE` on the user's row, or
  `pg_advisory_xact_lock`), bounded by `lock_timeout_ms`. `snapshot(user)` is REPEATABLE READ,
  READ ONLY and takes no lock.
- `put()` runs the `put` statement(s), then reads the row back with `get`: a mapping may not be
  able to hold every state (one friendship row for two people cannot say "I am subscribed to
  you but you are not to me"), and the program pushes what the database now says. It returns
  None when the row reads back exactly as given, the row read back otherwise, and a non-item
  none-state row when the row does not read back at all (the mapping stored nothing; the
  roster logic then refuses the change rather than push it: docs/mappings.md, "A store that
  cannot hold an item"). `holds()` says beforehand that a contact whose `user_id` is NULL
  cannot be stored at all.
- Versions come from the database. With a `version` statement it is whatever that statement
  returns (NULL: "0"); `bump_version` runs after every write so that the version moves even
  when the rows come back to an earlier state. Without one, the version is derived from the
  rows as read inside the transaction ("0" for no row, an md5 of the ordered rows otherwise):
  deterministic, it moves whoever changes the rows, but a roster that comes back to exactly an
  earlier content gets that content's version back (harmless to a client, whose cached roster
  is then current; it breaks only the "never reused" rule of the store contract).
- Changes made outside XMPP: the operator's triggers call `roster_port_log_change()` (the change
  log of pg_changes.py, which must be installed in that database); write transactions stamp
  their entries with the store's origin, and `open_change_feed()` returns the log's feed when
  the log exists, None otherwise.
- A mapping without write statements is accepted only for a read-only store (`[roster]
  read_only = true`); such a store refuses writes with StoreError and says so in describe().

What this module must never do
------------------------------
- Build SQL from data or from the mapping's values: statements are the operator's text, used
  as-is; every value is a bound parameter; no identifier ever comes from a request.
- Create, alter or migrate anything in the operator's database, or run a write statement while
  validating a mapping.
- Let a psycopg exception escape (PostgresStore's translation applies to every statement),
  commit a scope that raised, or show the DSN's password.
- Reject stored data: a status word the map does not know is logged and the row is skipped
  (not served), never an error for the whole roster.
- Write to stdout (the protocol channel); it only logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .base import SUBSCRIPTIONS, RosterRow, RosterTxn, StoreError, stored_groups, stored_text
from .pg_changes import logged_after_query, set_origin
from .postgres import _BEGIN_SNAPSHOT, _BEGIN_WRITE, _SET_LOCK_TIMEOUT, PostgresStore, _one_line

log = logging.getLogger(__name__)


class MappingError(ValueError):
    """The mapping cannot be used; the message names the file, the key and what is wrong."""


# --- The mapping ----------------------------------------------------------------------------

READ_STATEMENTS = ("rows", "get")
WRITE_STATEMENTS = ("lock_user", "put", "delete", "delete_all")
OPTIONAL_STATEMENTS = ("count", "count_requests", "version", "bump_version", "user_id", "jid_of")
STATEMENTS = READ_STATEMENTS + WRITE_STATEMENTS + OPTIONAL_STATEMENTS
# Statements that only read, run once for real at validation (in a READ ONLY transaction).
SINGLE_VALUE_STATEMENTS = ("count", "count_requests", "version", "user_id", "jid_of")

# The named parameters each statement may use (psycopg placeholders: %(name)s).
_USER_PARAMETERS = ("user", "user_local", "user_domain", "user_id", "origin")
_CONTACT_PARAMETERS = ("contact", "contact_local", "contact_domain", "contact_id")
_ROW_PARAMETERS = ("name", "groups", "subscription", "ask", "pending_out", "pending_in",
                   "approved", "in_roster", "request_text", "status", "state")
_JID_PARAMETERS = ("jid", "local", "domain")
PARAMETERS: dict[str, tuple[str, ...]] = {
    "lock_user": _USER_PARAMETERS,
    "rows": _USER_PARAMETERS,
    "get": _USER_PARAMETERS + _CONTACT_PARAMETERS,
    "put": _USER_PARAMETERS + _CONTACT_PARAMETERS + _ROW_PARAMETERS,
    "delete": _USER_PARAMETERS + _CONTACT_PARAMETERS,
    "delete_all": _USER_PARAMETERS,
    "count": _USER_PARAMETERS,
    "count_requests": _USER_PARAMETERS,
    "version": _USER_PARAMETERS,
    "bump_version": _USER_PARAMETERS,
    "user_id": _JID_PARAMETERS,
    "jid_of": ("id",),
}

# Columns a `rows` / `get` statement may return (by name).
ROW_COLUMNS = ("contact", "contact_id", "name", "groups", "request_text", "status",
               "subscription", "ask", "pending_out", "pending_in", "approved", "in_roster")

# RFC 6121 states by their short names (roster_port.subscription.SubState.name).
STATE_NAMES = ("N", "N+PO", "N+PI", "N+PO+PI", "T", "T+PI", "F", "F+PO", "B")
_LETTERS = {"N": "none", "T": "to", "F": "from", "B": "both"}
HIDDEN = "hidden"

# ejabberd's ask words (none/in/out/both, and the legacy subscribe/unsubscribe).
_PENDING_OF_ASK = {
    "none": (False, False), "in": (False, True), "out": (True, False), "both": (True, True),
    "subscribe": (True, False), "unsubscribe": (False, False),
}
_ASK_OF_PENDING = {pending: ask for ask, pending in list(_PENDING_OF_ASK.items())[:4]}


@dataclass(frozen=True)
class StateSpec:
    """What a status word means for the user: an RFC state, whether it is a roster item."""

    subscription: str
    pending_out: bool = False
    pending_in: bool = False
    approved: bool = False
    in_roster: bool = True


def parse_state(text: str, where: str) -> StateSpec:
    """"N+PO", "B", "N+PI+approved"... as a StateSpec (MappingError otherwise)."""
    letter, *flags = [part.strip() for part in text.split("+")]
    if letter not in _LETTERS or set(flags) - {"PO", "PI", "approved"} or len(set(flags)) != len(flags):
        raise MappingError(f"{where}: {text!r} is not an RFC 6121 state name "
                           f"(one of {', '.join(STATE_NAMES)}, optionally +approved)")
    return StateSpec(_LETTERS[letter], "PO" in flags, "PI" in flags, "approved" in flags)


def state_name(row: RosterRow) -> str:
    letter = {value: key for key, value in _LETTERS.items()}[row.subscription]
    return letter + ("+PO" if row.pending_out else "") + ("+PI" if row.pending_in else "")


@dataclass(frozen=True)
class Mapping:
    """A validated mapping (its statements still have to prepare on the database)."""

    source: str
    statements: dict[str, tuple[str, ...]]
    status_read: dict[str, StateSpec | None] = field(default_factory=dict)  # None: hidden
    status_write: dict[str, str] = field(default_factory=dict)  # state name -> word
    description: str = ""

    @property
    def writable(self) -> bool:
        return all(name in self.statements for name in WRITE_STATEMENTS)

    @property
    def has_status(self) -> bool:
        return bool(self.status_read)


def load_mapping(spec: str | Mapping | dict[str, Any], base_dir: Path | None = None) -> Mapping:
    """A mapping from a packaged name ("ejabberd"), a file path, or an inline table."""
    if isinstance(spec, Mapping):
        return spec
    if isinstance(spec, dict):
        return parse_mapping(spec, source="[store.mapping]")
    if not isinstance(spec, str) or not spec:
        raise MappingError("[store].mapping must name a packaged mapping (e.g. \"ejabberd\"), "
                           "a mapping file, or be an inline table")
    if "/" not in spec and not spec.endswith(".toml"):
        resource = importlib.resources.files("roster_port.mappings") / f"{spec}.toml"
        if not resource.is_file():
            packaged = sorted(item.name.removesuffix(".toml")
                              for item in importlib.resources.files("roster_port.mappings").iterdir()
                              if item.name.endswith(".toml"))
            raise MappingError(f"no packaged mapping {spec!r} (packaged: {packaged}; a file "
                               "name ends in .toml)")
        text, source = resource.read_text(encoding="utf-8"), f"packaged mapping {spec!r}"
    else:
        path = Path(spec)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MappingError(f"cannot read the mapping {path}: {exc.strerror}") from None
        source = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{source}: not valid TOML: {exc}") from None
    return parse_mapping(data, source=source)


def parse_mapping(data: dict[str, Any], *, source: str) -> Mapping:
    unknown = set(data) - {"description", "statements", "status"}
    if unknown:
        raise MappingError(f"{source}: unknown keys {sorted(unknown)}; known: description, "
                           "statements, status")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise MappingError(f"{source}: description must be text")
    raw_statements = data.get("statements")
    if not isinstance(raw_statements, dict):
        raise MappingError(f"{source}: [statements] is missing (a table of SQL statements)")
    unknown = set(raw_statements) - set(STATEMENTS)
    if unknown:
        raise MappingError(f"{source}: [statements] has unknown keys {sorted(unknown)}; known: "
                           f"{', '.join(STATEMENTS)}")
    statements: dict[str, tuple[str, ...]] = {}
    for name, value in raw_statements.items():
        parts = (value,) if isinstance(value, str) else value
        if (not isinstance(parts, (list, tuple)) or not parts
                or not all(isinstance(part, str) and part.strip() for part in parts)):
            raise MappingError(f"{source}: statements.{name} must be an SQL statement or a "
                               "non-empty list of them")
        if name in READ_STATEMENTS + SINGLE_VALUE_STATEMENTS and len(parts) != 1:
            raise MappingError(f"{source}: statements.{name} reads: it must be one statement")
        statements[name] = tuple(parts)
    missing = [name for name in READ_STATEMENTS if name not in statements]
    if missing:
        raise MappingError(f"{source}: [statements] lacks {', '.join(missing)}")
    partial = [name for name in WRITE_STATEMENTS if name in statements]
    if partial and len(partial) != len(WRITE_STATEMENTS):
        lacking = [name for name in WRITE_STATEMENTS if name not in statements]
        raise MappingError(f"{source}: [statements] has {', '.join(partial)} but lacks "
                           f"{', '.join(lacking)}: give every write statement, or none for a "
                           "read-only roster")
    if "bump_version" in statements and "version" not in statements:
        raise MappingError(f"{source}: statements.bump_version needs a version statement")

    status = data.get("status", {})
    if not isinstance(status, dict) or set(status) - {"read", "write"}:
        raise MappingError(f"{source}: [status] may only hold [status.read] and [status.write]")
    status_read: dict[str, StateSpec | None] = {}
    for word, meaning in status.get("read", {}).items():
        where = f"{source}: status.read.{word}"
        if meaning == HIDDEN:
            status_read[word] = None
        elif isinstance(meaning, str):
            status_read[word] = parse_state(meaning, where)
        elif isinstance(meaning, dict):
            if set(meaning) - {"state", "in_roster"} or not isinstance(meaning.get("state"), str):
                raise MappingError(f"{where}: a table needs state = \"...\" and may have "
                                   "in_roster = true|false")
            in_roster = meaning.get("in_roster", True)
            if not isinstance(in_roster, bool):
                raise MappingError(f"{where}.in_roster must be true or false")
            spec = parse_state(meaning["state"], where)
            status_read[word] = StateSpec(spec.subscription, spec.pending_out, spec.pending_in,
                                          spec.approved, in_roster)
        else:
            raise MappingError(f"{where}: an RFC state name, \"hidden\", or "
                               "{ state = ..., in_roster = ... }")
    status_write: dict[str, str] = {}
    for state, word in status.get("write", {}).items():
        parse_state(state, f"{source}: status.write")
        if "approved" in state.split("+"):
            raise MappingError(f"{source}: status.write keys are the RFC states "
                               f"{', '.join(STATE_NAMES)} (approval travels as %(approved)s)")
        if not isinstance(word, str):
            raise MappingError(f"{source}: status.write.{state} must be a word (text)")
        status_write[state] = word
    if bool(status_read) != bool(status_write) and "put" in statements:
        raise MappingError(f"{source}: give both [status.read] and [status.write], or neither")
    if status_write:
        missing = [state for state in STATE_NAMES if state not in status_write]
        if missing:
            raise MappingError(f"{source}: [status.write] must name a word for every state the "
                               f"program may store; missing {', '.join(missing)}")
    return Mapping(source, statements, status_read, status_write, description)


# --- JIDs and rows --------------------------------------------------------------------------


def split_jid(jid: str) -> tuple[str, str]:
    """(localpart, domainpart) of a bare JID; a JID without localpart has ''."""
    local, at, domain = jid.partition("@")
    return (local, domain) if at else ("", jid)


def _row_digest(rows: list[RosterRow]) -> str:
    if not rows:
        return "0"
    text = json.dumps([list(row) for row in rows], ensure_ascii=False, separators=(",", ":"))
    return hashlib.md5(text.encode("utf-8")).hexdigest()


class _MappedTxn(RosterTxn):
    """One user's roster inside one open transaction, through the mapping's statements."""

    def __init__(self, store: "MappedPostgresStore", connection: psycopg.Connection, user: str,
                 refuse_writes_because: str | None) -> None:
        self.user = user
        self._store = store
        self._mapping = store.mapping
        self._connection = connection
        self._refuse_writes_because = refuse_writes_because
        self._open = True
        self._user_parameters: dict[str, Any] | None = None
        self._ids: dict[str, Any] = {}
        self._jids: dict[Any, str | None] = {}
        self._rows: list[RosterRow] | None = None  # cached for a derived version until a write

    # --- Statements -------------------------------------------------------------------------

    def _run(self, name: str, parameters: dict[str, Any]) -> psycopg.Cursor | None:
        if not self._open:
            raise StoreError(f"the transaction on {self.user!r} is over; open a new one")
        cursor = None
        for part in self._mapping.statements[name]:
            with self._store._translated_errors(self._connection):
                try:
                    cursor = self._connection.execute(part, parameters)
                except KeyError as exc:  # a placeholder the statement names, we do not give
                    raise StoreError(f"mapping {self._mapping.source}: statements.{name} uses "
                                     f"an unknown parameter {exc}") from None
        return cursor

    def _single(self, name: str, parameters: dict[str, Any]) -> Any:
        cursor = self._run(name, parameters)
        record = cursor.fetchone() if cursor is not None and cursor.description else None
        return None if record is None else record[0]

    def _id_of(self, jid: str) -> Any:
        if "user_id" not in self._mapping.statements:
            return None
        if jid not in self._ids:
            local, domain = split_jid(jid)
            self._ids[jid] = self._single("user_id", {"jid": jid, "local": local, "domain": domain})
        return self._ids[jid]

    def _jid_of(self, identifier: Any) -> str | None:
        if identifier not in self._jids:
            self._jids[identifier] = self._single("jid_of", {"id": identifier})
        return self._jids[identifier]

    def user_parameters(self) -> dict[str, Any]:
        if self._user_parameters is None:
            local, domain = split_jid(self.user)
            self._user_parameters = {"user": self.user, "user_local": local,
                                     "user_domain": domain, "user_id": self._id_of(self.user),
                                     "origin": self._store.origin}
        return self._user_parameters

    def _contact_parameters(self, contact: str) -> dict[str, Any]:
        local, domain = split_jid(contact)
        return {**self.user_parameters(), "contact": contact, "contact_local": local,
                "contact_domain": domain, "contact_id": self._id_of(contact)}

    def _check_writable(self, operation: str) -> None:
        if self._refuse_writes_because is not None:
            raise StoreError(f"{operation} refused: {self._refuse_writes_because}")

    def _wrote(self) -> None:
        self._rows = None
        if "bump_version" in self._mapping.statements:
            self._run("bump_version", self.user_parameters())

    # --- Rows -------------------------------------------------------------------------------

    def _read(self, cursor: psycopg.Cursor) -> list[RosterRow]:
        names = [column.name for column in cursor.description]
        rows = []
        for record in cursor:
            row = self._store.row_from(dict(zip(names, record)), self)
            if row is not None:
                rows.append(row)
        return rows

    def rows(self) -> list[RosterRow]:
        rows = self._read(self._run("rows", self.user_parameters()))
        rows.sort(key=lambda row: row.contact)  # code point order, whatever the SQL said
        self._rows = rows
        return list(rows)

    def get(self, contact: str) -> RosterRow | None:
        rows = self._read(self._run("get", self._contact_parameters(contact)))
        rows = [row for row in rows if row.contact == contact]
        if len(rows) > 1:
            log.warning("%s: the get statement returned %d rows for %s; using the first",
                        self.user, len(rows), contact)
        return rows[0] if rows else None

    def holds(self, contact: str) -> bool:
        """False for a contact the mapping's `user_id` finds no id for (not a member): the
        documented convention for a schema that keeps its own members only."""
        return "user_id" not in self._mapping.statements or self._id_of(contact) is not None

    def put(self, row: RosterRow) -> RosterRow | None:
        self._check_writable("put")
        row.valid()
        state = state_name(row)
        parameters = {
            **self._contact_parameters(row.contact),
            "name": row.name,
            "groups": list(row.groups),
            "subscription": row.subscription,
            "ask": _ASK_OF_PENDING[(row.pending_out, row.pending_in)],
            "pending_out": row.pending_out,
            "pending_in": row.pending_in,
            "approved": row.approved,
            "in_roster": row.in_roster,
            "request_text": row.request_text,
            "state": state,
            "status": self._mapping.status_write.get(state),
        }
        self._run("put", parameters)
        self._wrote()
        stored = self.get(row.contact)
        if stored == row:
            return None
        if stored is None:
            # The mapping kept nothing of it (e.g. no relationship word for this state).
            stored = RosterRow(row.contact, in_roster=False)
        log.debug("%s: %s stored as %s reads back as %s", self.user, row.contact, state,
                  state_name(stored))
        return stored

    def delete(self, contact: str) -> None:
        self._check_writable("delete")
        self._run("delete", self._contact_parameters(contact))
        self._wrote()

    def delete_all(self) -> None:
        self._check_writable("delete_all")
        self._run("delete_all", self.user_parameters())
        self._wrote()

    def count(self) -> int:
        if "count" in self._mapping.statements:
            return int(self._single("count", self.user_parameters()) or 0)
        return sum(1 for row in self.rows() if row.in_roster)

    def count_requests(self) -> int:
        if "count_requests" in self._mapping.statements:
            return int(self._single("count_requests", self.user_parameters()) or 0)
        return super().count_requests()

    def version(self) -> str:
        if "version" in self._mapping.statements:
            value = self._single("version", self.user_parameters())
            return "0" if value is None or value == "" else str(value)
        rows = self._rows if self._rows is not None else self.rows()
        return _row_digest(rows)

    def logged_after(self, position: object | None) -> bool:
        # Without the change log there is no feed either, and nothing to ask.
        query = logged_after_query(self.user, position) if self._store._has_change_log else None
        if query is None:
            return False
        if not self._open:
            raise StoreError(f"the transaction on {self.user!r} is over; open a new one")
        with self._store._translated_errors(self._connection):
            return self._connection.execute(*query).fetchone()[0]


# --- The store ------------------------------------------------------------------------------


class MappedPostgresStore(PostgresStore):
    """Rosters as a view of the operator's tables, through the statements of a mapping.

    `mapping` is a `Mapping`, a packaged mapping's name ("ejabberd"), a file path (relative to
    `base_dir`) or an inline table. `read_only` opens the store read-only: required when the
    mapping has no write statements. The other options are PostgresStore's.
    """

    def __init__(self, dsn: str, *, mapping: str | Mapping | dict[str, Any],
                 base_dir: str | None = None, read_only: bool = False, **options: Any) -> None:
        self.mapping = load_mapping(mapping, Path(base_dir) if base_dir else None)
        if not self.mapping.writable and not read_only:
            raise MappingError(
                f"{self.mapping.source} has no write statements ({', '.join(WRITE_STATEMENTS)}): "
                "such a mapping serves read-only rosters only; set [roster] read_only = true")
        self._unknown_words: set[str] = set()
        self._has_change_log = False  # known once set up
        super().__init__(dsn, read_only=read_only, **options)

    # --- RosterStore ------------------------------------------------------------------------

    def transaction(self, user: str, *, timeout: float | None = None
                    ) -> contextlib.AbstractContextManager[RosterTxn]:
        if self.read_only:
            because = ("the store is opened read-only" if self.mapping.writable else
                       f"the mapping {self.mapping.source} has no write statements (read-only)")
            return self._mapped_scope(user, _BEGIN_SNAPSHOT, lock=False,
                                      refuse_writes_because=because, timeout=timeout)
        return self._mapped_scope(user, _BEGIN_WRITE, lock=True, refuse_writes_because=None,
                                  timeout=timeout)

    def snapshot(self, user: str, *, timeout: float | None = None
                 ) -> contextlib.AbstractContextManager[RosterTxn]:
        return self._mapped_scope(user, _BEGIN_SNAPSHOT, lock=False,
                                  refuse_writes_because="a snapshot is read-only; use transaction()",
                                  timeout=timeout)

    def open_change_feed(self):
        """The change log's feed (pg_changes.py) when the operator's database has the log.

        The operator's own triggers call roster_port_log_change() (examples/social/triggers.sql);
        without the log there is nothing to read, and changes made outside XMPP reach clients at
        their next roster fetch. Whether there is one is known from the set-up: a store still
        waiting for its database has no feed (the shim then keeps no cache for this process).
        """
        if not self._set_up_done:
            log.warning("%s cannot be reached yet, so whether it has a change log is not known: "
                        "this process reports no changes made outside XMPP", self.dsn_shown)
            return None
        if not self._has_change_log:
            log.warning("%s has no change log (roster_port_changes): changes made outside XMPP "
                        "are not pushed; see docs/mappings.md", self.dsn_shown)
            return None
        return super().open_change_feed()

    def describe(self) -> str:
        if self.mapping.writable:
            access = "read-only" if self.read_only else "read-write"
        else:
            access = "read-only: the mapping has no write statements"
        version = ("version from the database" if "version" in self.mapping.statements
                   else "version derived from the rows")
        return (f"PostgreSQL database {self.dsn_shown} through the mapping {self.mapping.source} "
                f"({access}; {version}; pool of {self.pool_min} to {self.pool_max} connections, "
                f"connect timeout {self.connect_timeout_s:g} s, lock timeout "
                f"{self.lock_timeout_ms} ms)")

    # --- Scopes -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mapped_scope(self, user: str, begin: str, *, lock: bool,
                      refuse_writes_because: str | None,
                      timeout: float | None) -> Iterator[RosterTxn]:
        with self._one_scope_in_thread():
            connection = self._begin(begin, self._connection_deadline(timeout))
            txn = _MappedTxn(self, connection, user, refuse_writes_because)
            try:
                if lock:
                    if (lock_timeout := self._lock_timeout_within(timeout)) is not None:
                        with self._translated_errors(connection):
                            connection.execute(_SET_LOCK_TIMEOUT, (lock_timeout,))
                    txn._run("lock_user", txn.user_parameters())
                    # Change-log entries the operator's triggers make for this transaction's
                    # writes carry our origin (pg_changes.py); harmless without a change log.
                    with self._translated_errors(connection):
                        set_origin(connection, self.origin, user)
                yield txn
            except BaseException:
                txn._open = False
                self._rollback(connection)
                raise
            txn._open = False
            self._commit(connection)

    # --- Rows -------------------------------------------------------------------------------

    def row_from(self, record: dict[str, Any], txn: _MappedTxn) -> RosterRow | None:
        """A record of a reading statement as a row; None to skip it (hidden, unknown)."""
        contact = record.get("contact")
        if contact is None and record.get("contact_id") is not None:
            contact = txn._jid_of(record["contact_id"])
        if not contact or type(contact) is not str:
            log.warning("%s: a row without contact JID skipped (%r)", txn.user,
                        {key: repr(value)[:64] for key, value in record.items()})
            return None
        if "status" in record:
            word = record["status"]
            if word not in self.mapping.status_read:
                if word not in self._unknown_words:
                    self._unknown_words.add(word)
                    log.warning("status %r is not in [status.read] of %s: such rows are not "
                                "served", word, self.mapping.source)
                return None
            spec = self.mapping.status_read[word]
            if spec is None:
                return None
        else:
            subscription = record.get("subscription") or "none"
            if subscription not in SUBSCRIPTIONS:
                log.warning("%s: %s has subscription %r; read as none", txn.user, contact,
                            subscription)
                subscription = "none"
            if "ask" in record:
                pending_out, pending_in = _PENDING_OF_ASK.get(record["ask"] or "none",
                                                              (False, False))
            else:
                pending_out = bool(record.get("pending_out"))
                pending_in = bool(record.get("pending_in"))
            spec = StateSpec(subscription, pending_out, pending_in)
        approved = record["approved"] if record.get("approved") is not None else spec.approved
        in_roster = record["in_roster"] if record.get("in_roster") is not None else spec.in_roster
        name, groups, text = record.get("name"), record.get("groups"), record.get("request_text")
        return RosterRow(
            contact=contact,
            name=name if type(name) is str else stored_text(name, txn.user, contact, "name"),
            subscription=spec.subscription,
            pending_out=spec.pending_out,
            pending_in=spec.pending_in,
            approved=bool(approved),
            in_roster=bool(in_roster),
            groups=() if groups is None else stored_groups(groups, txn.user, contact),
            request_text=text if type(text) is str else stored_text(text, txn.user, contact,
                                                                    "request_text"),
        )

    # --- Opening: no schema of our own, a mapping to validate -------------------------------

    def _set_up(self, connection: psycopg.Connection) -> None:
        """No schema of our own to migrate: check the mapping against the database instead."""
        self._validate(connection)
        self._has_change_log = connection.execute(
            "SELECT to_regclass('roster_port_changes') IS NOT NULL").fetchone()[0]

    def _validate(self, connection: psycopg.Connection) -> None:
        """Plan every statement, run every reading one, in a READ ONLY transaction rolled back.

        Raises StoreError listing every statement that does not prepare, with the reason.
        """
        samples = sample_parameters(self.mapping, self.origin)
        problems: list[str] = []
        connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        for name, parts in self.mapping.statements.items():
            parameters = {key: samples[key] for key in PARAMETERS[name]}
            for index, part in enumerate(parts):
                label = f"statements.{name}" + (f"[{index}]" if len(parts) > 1 else "")
                problem = self._check_statement(connection, name, part, parameters)
                if problem:
                    problems.append(f"{label}: {problem}")
        connection.execute("ROLLBACK")
        if problems:
            raise StoreError(f"the mapping {self.mapping.source} does not fit the database "
                             f"{self.dsn_shown}: " + "; ".join(problems))

    def _check_statement(self, connection: psycopg.Connection, name: str, text: str,
                         parameters: dict[str, Any]) -> str | None:
        connection.execute("SAVEPOINT roster_port_check")
        try:
            try:
                # Planned, never executed: no write happens, not even to a trigger.
                connection.execute("EXPLAIN " + text, parameters)
                if name in READ_STATEMENTS + SINGLE_VALUE_STATEMENTS:
                    cursor = connection.execute(text, parameters)
                    return self._check_columns(name, cursor)
            except KeyError as exc:
                return (f"uses the parameter {exc}, which it is not given (it may use: "
                        f"{', '.join(PARAMETERS[name])})")
            except psycopg.OperationalError:
                raise
            except psycopg.Error as exc:
                if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
                    return f"writes, but {name} must only read"
                sqlstate = f" [{exc.sqlstate}]" if exc.sqlstate else ""
                return f"does not prepare{sqlstate}: {_one_line(exc)}"
            return None
        finally:
            connection.execute("ROLLBACK TO SAVEPOINT roster_port_check")

    def _check_columns(self, name: str, cursor: psycopg.Cursor) -> str | None:
        columns = [column.name for column in cursor.description or ()]
        if name in SINGLE_VALUE_STATEMENTS:
            return None if len(columns) == 1 else f"must return one column, not {columns}"
        unknown = set(columns) - set(ROW_COLUMNS)
        if unknown:
            return (f"returns unknown columns {sorted(unknown)} (known: {', '.join(ROW_COLUMNS)};"
                    " rename with AS)")
        if "contact" not in columns and not ("contact_id" in columns
                                             and "jid_of" in self.mapping.statements):
            return "must return contact (a bare JID), or contact_id with a jid_of statement"
        if "status" in columns:
            if not self.mapping.has_status:
                return "returns status, but the mapping has no [status.read]"
            if {"subscription", "ask", "pending_out", "pending_in"} & set(columns):
                return "returns status and RFC state columns: one or the other"
        elif "subscription" not in columns:
            return "must return status (with [status.read]) or subscription"
        if "ask" in columns and {"pending_out", "pending_in"} & set(columns):
            return "returns ask and pending_out/pending_in: one or the other"
        return None


def sample_parameters(mapping: Mapping, origin: str) -> dict[str, Any]:
    """A value for every parameter of every statement: a user and contact of a domain that
    cannot exist (RFC 2606), for planning statements without touching real rows."""
    user, contact = "roster-port-check@check.invalid", "contact@check.invalid"
    return {"jid": user, "local": "roster-port-check", "domain": "check.invalid", "id": None,
            "user": user, "user_local": "roster-port-check", "user_domain": "check.invalid",
            "user_id": None, "origin": origin,
            "contact": contact, "contact_local": "contact", "contact_domain": "check.invalid",
            "contact_id": None,
            "name": "check", "groups": [], "subscription": "none", "ask": "none",
            "pending_out": False, "pending_in": False, "approved": False, "in_roster": True,
            "request_text": "", "status": next(iter(mapping.status_write.values()), None),
            "state": "N"}


def tables_read(mapping: Mapping, connection: psycopg.Connection) -> list[str]:
    """The tables (schema.name) the mapping's reading statements read, from their plans:
    where the operator's triggers must log changes for them to be pushed."""
    samples = sample_parameters(mapping, "")
    tables: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Relation Name" in node:
                tables.add(f"{node.get('Schema', '?')}.{node['Relation Name']}")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for name in READ_STATEMENTS:
        for part in mapping.statements.get(name, ()):
            parameters = {key: samples[key] for key in PARAMETERS[name]}
            plan = connection.execute("EXPLAIN (VERBOSE, FORMAT JSON) " + part,
                                      parameters).fetchone()[0]
            walk(plan)
    return sorted(tables)
