"""The one narrow interface every storage adapter implements.

Theory of operation: the roster logic never talks SQL. For each request it opens one
transaction scoped to one user's roster (`RosterStore.transaction(user)`), reads and writes
`RosterRow`s through it, and the transaction commits when the block exits without an exception
(and rolls back otherwise). Every operation of the protocol touches the roster of exactly one
user, so a transaction never needs a second user's lock.

Rules every adapter keeps (the contract suite in tests/store_contract.py checks them):
- A transaction is atomic and isolated from every other process on the same database: two
  processes running read-modify-write on the same user's roster never lose an update (SQLite:
  BEGIN IMMEDIATE and a busy timeout; PostgreSQL: a row lock on the user's version row).
- The version is a text that changes whenever a row of that user changes, by this program or by
  anyone else writing the database (triggers), and never goes back to a value it had before,
  even after every row is deleted. `version()` inside a transaction that wrote something
  reflects those writes.
- An unreachable database raises `StoreUnavailable`, never a driver exception, and nothing is
  half-written.
- SQL is always parameterised.
- Scopes do not nest: one scope at a time per thread. An instance whose `threads_share` is
  true (a connection pool) runs the scopes of several threads at once; the program opens one
  instance per thread of any other.
- Every change is recorded by the database (triggers), stamped with the `origin` of the store
  that made it (the ejabberd node the program serves; nothing for other applications), so that
  `open_change_feed()` reports the changes of every other origin: other applications and other
  ejabberd nodes. A node's own changes are pushed by the responses that made them.
- Each change a feed reports carries where its read stood in the log (`OutsideChange.read_at`),
  and a transaction tells whether the log holds entries of its user committed after that
  (`RosterTxn.logged_after`, any origin): the notification's pushes then carry a partial
  version (roster.outside_changes; docs/changes.md).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

SUBSCRIPTIONS = ("none", "to", "from", "both")

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A storage failure the caller can report but not fix."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, restarting, locked for too long)."""


class RosterRow(NamedTuple):
    """What is stored about one contact in one user's roster.

    `in_roster` keeps "is this contact in the user's roster" apart from the subscription state:
    a stranger's subscription request is stored (with its text, to re-send at the next login)
    but is not a roster item, so it is never listed nor pushed.

    `request_elements` is the pending inbound request kept whole (RFC 6121 3.1.3: "the complete
    presence stanza ..., including any extended content"): each child element of the
    `subscribe` presence but show and priority, as the XML text the shim serialised, in order:
    its statuses with their xml:lang, then its extended content (a XEP-0172 nick, a XEP-0379
    preauth). `request_text` stays its status text (what ejabberd's `askmessage` holds). Only
    a store whose transactions say `keeps_request_elements` stores it; the others read () back.

    `groups` is a set kept as a tuple: adapters that can keep the order written do, and one
    that cannot (ejabberd's own schema) returns them in code point order (`put()` then returns
    the row as it reads back).

    A named tuple rather than a dataclass: a 5,000-item roster makes 5,000 of them per read,
    and a tuple is built five times faster. Adapters keep the values valid (`subscription` one
    of SUBSCRIPTIONS, `groups` a tuple) with CHECK constraints; `valid()` checks one row.
    """

    contact: str
    name: str = ""
    subscription: str = "none"
    pending_out: bool = False
    pending_in: bool = False
    approved: bool = False
    in_roster: bool = True
    groups: tuple[str, ...] = ()
    request_text: str = ""
    request_elements: tuple[str, ...] = ()

    def evolve(self, **changes) -> "RosterRow":
        return self._replace(**changes)

    def valid(self) -> "RosterRow":
        if self.subscription not in SUBSCRIPTIONS:
            raise ValueError(f"subscription {self.subscription!r} is not one of {SUBSCRIPTIONS}")
        if not isinstance(self.groups, tuple):
            raise ValueError("groups must be a tuple")
        if not isinstance(self.request_elements, tuple):
            raise ValueError("request_elements must be a tuple")
        return self


# --- Values as read back ----------------------------------------------------------------------
# Other applications write the same tables in plain SQL, and a schema cannot check everything
# (SQLite keeps a blob in a TEXT column; a JSON array may hold anything). A reader never fails
# on what it finds: a value of the wrong shape is repaired, with a log line naming the row.


def stored_text(value: object, user: str, contact: object, column: str) -> str:
    """A text column as read: text as it is; anything else repaired (logged)."""
    if type(value) is str:
        return value
    if value is None:
        text = ""
    elif isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", errors="replace")
    elif isinstance(value, (int, float)):
        text = str(value)
    else:
        text = ""
    log.warning("%s: stored row of %r: %s is %s, not text; read as %r",
                user, contact, column, type(value).__name__, text[:64])
    return text


def stored_groups(value: object, user: str, contact: object) -> tuple[str, ...]:
    """A groups value as read: a list of texts as it is; otherwise its texts kept (logged)."""
    if isinstance(value, (list, tuple)) and all(type(group) is str for group in value):
        return tuple(value)
    # Never recurse into the value: it may be nested as deep as its writer liked.
    groups = tuple(group for group in value if type(group) is str) if isinstance(
        value, (list, tuple)) else ()
    log.warning("%s: stored row of %r: groups are not a list of text (%s); read as %r",
                user, contact, type(value).__name__, groups[:8])
    return groups


def stored_elements(value: object, user: str, contact: object) -> tuple[str, ...]:
    """A request_elements value as read: a list of texts as it is; otherwise its texts kept
    (logged). The shim parses each again before it delivers it, and drops what does not."""
    if isinstance(value, (list, tuple)) and all(type(element) is str for element in value):
        return tuple(value)
    elements = tuple(element for element in value if type(element) is str) if isinstance(
        value, (list, tuple)) else ()
    log.warning("%s: stored row of %r: request_elements are not a list of text (%s); read "
                "as %d elements", user, contact, type(value).__name__, len(elements))
    return elements


class RosterTxn(abc.ABC):
    """One user's roster inside one open transaction."""

    user: str
    # Whether `put` stores a row's `request_elements` (and reads give them back). A store that
    # cannot (an operator's schema, ejabberd's) keeps the request's text only, and its rows
    # read back with `request_elements` empty: the roster logic then never writes a row for
    # them alone.
    keeps_request_elements: bool = False

    @abc.abstractmethod
    def rows(self) -> list[RosterRow]:
        """Every row of the user, strangers' pending requests included, ordered by contact."""

    @abc.abstractmethod
    def get(self, contact: str) -> RosterRow | None:
        """The row for `contact` (a normalised bare JID), or None."""

    @abc.abstractmethod
    def put(self, row: RosterRow) -> RosterRow | None:
        """Insert or replace the row for `row.contact`.

        An adapter that cannot store every state exactly (an operator's own schema, where a
        friendship may be mutual only) returns the row as it now reads back, which is what
        gets pushed; the others return None.
        """

    @abc.abstractmethod
    def delete(self, contact: str) -> None:
        """Delete the row for `contact`; deleting a missing row is not an error."""

    @abc.abstractmethod
    def delete_all(self) -> None:
        """Delete every row of the user (the version keeps moving forward)."""

    @abc.abstractmethod
    def count(self) -> int:
        """How many roster items (`in_roster` rows) the user has: the roster size limit."""

    def count_requests(self) -> int:
        """How many strangers' pending requests (rows not `in_roster`) the user has.

        They have a bound of their own: anyone on any server can mint JIDs to send requests
        from, and they must never fill the user's own roster. Adapters may count in SQL.
        """
        return sum(1 for row in self.rows() if not row.in_roster)

    @abc.abstractmethod
    def version(self) -> str:
        """The user's roster version as it stands inside this transaction."""

    def logged_after(self, position: object | None) -> bool:
        """Whether the change log holds entries for this user that this transaction sees but
        that were not committed yet at `position`, whatever their origin (this node's own
        included): a change-feed read position, as `OutsideChange.read_at` carries it.

        The notification of a feed's batch asks it: a version read now that counts such an
        entry counts a change the batch does not push (roster.outside_changes). A store
        without a change log has no feed and nothing to tell: False, which keeps the version
        as read; so does a position no feed of this store made (None among them).
        """
        return False

    def holds(self, contact: str) -> bool:
        """Whether the store can keep anything about `contact` in this roster at all.

        True for the program's own schemas. An operator's schema may keep only its own members
        (docs/mappings.md: a `user_id` statement that is NULL for anyone else); whatever the
        answer, `put()` reads back what was really kept, and that is what counts.
        """
        return True


@dataclass(frozen=True)
class OutsideChange:
    """A row changed by someone other than this node's program (an application, psql, the
    program serving another ejabberd node)."""

    user: str
    contact: str
    old_subscription: str | None  # None: there was no row
    new_subscription: str | None  # None: there is no row any more
    # When its entry was recorded in the change log (seconds since the epoch, the database's
    # clock), for the change-feed lag metric; None when the feed does not know.
    recorded_at: float | None = field(default=None, compare=False)
    # Where the feed's read that reported it stood in the log (opaque: only a transaction of
    # the same store reads it, `RosterTxn.logged_after`); every change of one read() carries
    # the same one. None when the feed does not know.
    read_at: object | None = field(default=None, compare=False)


class ChangeFeed(abc.ABC):
    """Reports `OutsideChange`s, oldest first, each once, from the moment it is opened.

    A feed is either woken by a file descriptor (`fileno()`, e.g. a PostgreSQL LISTEN
    connection) or polled every `poll_interval` seconds (e.g. SQLite's data_version).
    """

    poll_interval: float | None = None

    def fileno(self) -> int | None:
        return None

    @abc.abstractmethod
    def read(self) -> list[OutsideChange]:
        """The changes since the last read (possibly none)."""

    def take_resumed(self) -> bool:
        """True once after the feed started reading again after a time it could not (it had
        no connection, at open or since a loss): whoever trusts a cache of reads because the
        feed reports every change must drop it, since reads made meanwhile had no such
        guarantee. Asked after each read()."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release the feed's own connection."""


DEFAULT_ORIGIN = "roster-port"


class RosterStore(abc.ABC):
    """A database holding every user's roster. One instance per program process."""

    read_only: bool = False
    origin: str = DEFAULT_ORIGIN  # set from the shim's hello: the ejabberd node served
    # Whether threads may run scopes on this one instance at the same time (a connection pool).
    # If not, the program opens one instance per thread.
    threads_share: bool = True

    @abc.abstractmethod
    def transaction(self, user: str, *, timeout: float | None = None
                    ) -> contextlib.AbstractContextManager[RosterTxn]:
        """Open an atomic read-modify-write scope on `user`'s roster.

        `timeout`: the seconds its caller can still wait (what is left of a request's
        deadline). Whatever the scope waits for (a lock another process holds, a connection)
        is bounded by it as well as by the store's own bounds, and then raises
        StoreUnavailable; None: the store's own bounds only.
        """

    def snapshot(self, user: str, *, timeout: float | None = None
                 ) -> contextlib.AbstractContextManager[RosterTxn]:
        """A read-only scope: adapters may make it cheaper than `transaction`."""
        return self.transaction(user, timeout=timeout)

    def open_change_feed(self) -> ChangeFeed | None:
        """A feed of changes made outside this program, or None if the store has none."""
        return None

    def set_failure_handler(self, handler: Callable[[StoreError], None]) -> None:
        """Have `handler` called (from any thread) if the store finds, after it opened, that it
        can never serve as configured: a database it was waiting for turns out not to fit
        (a mapping naming a missing table). Called at once if that is known already. Stores
        that check everything when they open never call it."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs and `roster-port check`: what this store is and where."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. The store is not used afterwards."""


@contextlib.contextmanager
def unavailable_on(*exception_types: type[BaseException]) -> Iterator[None]:
    """Turn a driver's connection errors into StoreUnavailable, keeping the cause."""
    try:
        yield
    except exception_types as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
