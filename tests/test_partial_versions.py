"""A change committed between the change feed's read and its notification (RFC 6121 2.6).

The feed reads a batch (change A); before the batch's `roster_changed` notification opens its
transaction, change B of the same user commits (another application, another node, or this
node itself). The version read then counts B, which the batch does not push: a client that
kept it would be told "current" at its next get and never see B. So the batch's pushes carry
a partial version (no get answers it as current), and the next batch, B's, the real one.

Driven deterministically, as server.py does it but step by step: the feed's read(), a commit,
then the dispatcher's notification(). Real SQLite files and real PostgreSQL (the native schema,
and an operator's schema through a mapping with the change log: examples/social).
"""

from __future__ import annotations

import selectors
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from roster_port import roster
from roster_port.dispatcher import Dispatcher
from roster_port.messages import decode_message
from roster_port.roster import Rules
from roster_port.store.base import ChangeFeed, OutsideChange, RosterRow, RosterStore
from roster_port.store.mapped import MappedPostgresStore
from roster_port.store.pg_changes import install_change_log
from roster_port.store.postgres import PostgresStore
from roster_port.store.sqlite import SQLiteStore

SOCIAL = Path(__file__).resolve().parent.parent / "examples" / "social"
THIS_NODE = "ejabberd@a"


@dataclass
class World:
    """One database, the store of this node, and the other writers of one user's roster."""

    store: RosterStore
    user: str
    contacts: list[str]  # whom `outside` and `own` may add, in order
    outside: Callable[[str], None]  # another application or node adds a contact, committed
    other_stores: list[RosterStore]
    feeds: list[ChangeFeed] = field(default_factory=list)

    def own(self, contact: str) -> None:
        """This node's own write (pushed by its response; the feed never reports it)."""
        with self.store.transaction(self.user) as txn:
            txn.put(RosterRow(contact, pending_out=True))


def _sqlite_world(tmp_path: Path) -> Iterator[World]:
    path = str(tmp_path / "roster.db")
    store = SQLiteStore(path)
    store.origin = THIS_NODE
    other_node = SQLiteStore(path)
    other_node.origin = "ejabberd@b"
    user = "alice@example.com"

    def outside(contact: str) -> None:
        if contact.startswith("bob"):  # another ejabberd node's program
            with other_node.transaction(user) as txn:
                txn.put(RosterRow(contact, subscription="both"))
        else:  # another application, in plain SQL
            with sqlite3.connect(path) as connection:
                connection.execute("INSERT INTO roster_items (user, contact, subscription) "
                                   "VALUES (?, ?, 'both')", (user, contact))
            connection.close()

    yield World(store, user, [f"{name}@example.com" for name in
                              ("bob", "carol", "dave", "erin", "frank")], outside, [other_node])


def _postgres_world(pg_server) -> Iterator[World]:
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    try:
        store = PostgresStore(dsn, connect_timeout_s=1.0)
        store.origin = THIS_NODE
        other_node = PostgresStore(dsn, connect_timeout_s=1.0)
        other_node.origin = "ejabberd@b"
        user = "alice@example.com"

        def outside(contact: str) -> None:
            if contact.startswith("bob"):
                with other_node.transaction(user) as txn:
                    txn.put(RosterRow(contact, subscription="both"))
            else:
                with psycopg.connect(dsn, autocommit=True) as connection:
                    connection.execute("INSERT INTO roster_items (username, contact, "
                                       "subscription) VALUES (%s, %s, 'both')", (user, contact))

        yield World(store, user, [f"{name}@example.com" for name in
                                  ("bob", "carol", "dave", "erin", "frank")], outside,
                    [other_node])
    finally:
        pg_server.drop_schema(schema)


def _social_world(pg_server) -> Iterator[World]:
    """The operator's own tables (examples/social), its triggers logging every change."""
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    try:
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute((SOCIAL / "schema.sql").read_text(encoding="utf-8"))
            for username in ("alice", "bob", "carol", "dave", "erin", "frank"):
                connection.execute("INSERT INTO users (username, display_name) VALUES (%s, %s)",
                                   (username, username.title()))
        with psycopg.connect(dsn) as connection:
            install_change_log(connection)
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute((SOCIAL / "triggers.sql").read_text(encoding="utf-8"))
        store = MappedPostgresStore(dsn, mapping=str(SOCIAL / "mapping.toml"),
                                    connect_timeout_s=1.0)
        store.origin = THIS_NODE

        def outside(contact: str) -> None:  # the application: a friendship accepted
            with psycopg.connect(dsn, autocommit=True) as connection:
                connection.execute("""
                    INSERT INTO friendships (requester_id, addressee_id, status, message)
                    SELECT r.id, a.id, 'accepted', '' FROM users r, users a
                    WHERE r.username = 'alice' AND a.username = %s
                """, (contact.split("@")[0],))

        yield World(store, "alice@social.example",
                    [f"{name}@social.example" for name in ("bob", "carol", "dave", "erin",
                                                           "frank")], outside, [])
    finally:
        pg_server.drop_schema(schema)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("postgres_mapped_social", marks=pytest.mark.postgres)])
def world(request, tmp_path: Path) -> Iterator[World]:
    if request.param == "sqlite":
        worlds = _sqlite_world(tmp_path)
    else:
        server = request.getfixturevalue("pg_server")
        worlds = (_postgres_world if request.param == "postgres" else _social_world)(server)
    made = next(worlds)
    try:
        yield made
    finally:
        for feed in made.feeds:
            feed.close()
        for store in [made.store, *made.other_stores]:
            store.close()
        worlds.close()


def open_feed(world: World) -> ChangeFeed:
    feed = world.store.open_change_feed()
    assert feed is not None
    world.feeds.append(feed)
    read_user_changes(feed, world.user, until=0)  # the first read sets where it starts
    return feed


def read_user_changes(feed: ChangeFeed, user: str, *, until: int,
                      timeout: float = 5.0) -> list[OutsideChange]:
    """The user's changes the feed reports, read as server.py reads it (woken by its fileno,
    or polled), until `until` of them came or `timeout` passed. Each read() is one batch: the
    changes returned are those of the reads that reported any."""
    changes: list[OutsideChange] = []
    deadline = time.monotonic() + timeout
    fileno = feed.fileno()
    with selectors.DefaultSelector() as selector:
        if fileno is not None:
            selector.register(fileno, selectors.EVENT_READ)
        while True:
            changes += [change for change in feed.read() if change.user == user]
            remaining = deadline - time.monotonic()
            if len(changes) >= until or remaining <= 0:
                return changes
            if fileno is not None:
                selector.select(remaining)
            else:
                threading.Event().wait(min(feed.poll_interval, remaining))


def pushed_versions(dispatcher: Dispatcher, world: World,
                    changes: list[OutsideChange]) -> dict[str, str]:
    """The `ver` of each push of the notification for `changes`, by contact."""
    payload = dispatcher.notification(world.user, changes, world.store)
    assert payload is not None
    _, name, params = decode_message(payload)
    assert name == "roster_changed"
    return {effect["item"]["jid"]: effect["ver"]
            for effect in params["effects"] if effect["type"] == "push"}


def current_version(world: World) -> str:
    with world.store.snapshot(world.user) as txn:
        return txn.version()


def get_with(world: World, ver: str) -> list | None:
    """What a roster get with `ver` is answered: None when `ver` is current."""
    with world.store.snapshot(world.user) as txn:
        return roster.roster_query(txn, Rules(), ver).result["items"]


def test_a_change_committed_after_the_feeds_read_is_not_counted_by_the_batchs_push(world):
    dispatcher = Dispatcher(world.store, Rules())
    feed = open_feed(world)
    bob, carol = world.contacts[0], world.contacts[1]
    world.outside(bob)  # change A
    changes_a = read_user_changes(feed, world.user, until=1)
    assert [change.contact for change in changes_a] == [bob]
    world.outside(carol)  # change B: committed after the read, before the notification

    [(contact, ver_a)] = pushed_versions(dispatcher, world, changes_a).items()
    assert contact == bob
    assert ver_a != current_version(world)  # it would count carol's change, not pushed yet
    assert ver_a == roster.partial_version(current_version(world))
    assert carol in [item["jid"] for item in get_with(world, ver_a)]  # a whole roster

    changes_b = read_user_changes(feed, world.user, until=1)
    assert [change.contact for change in changes_b] == [carol]
    assert pushed_versions(dispatcher, world, changes_b) == {carol: current_version(world)}
    assert get_with(world, current_version(world)) is None  # current


def test_this_nodes_own_write_committed_meanwhile_makes_the_push_partial_too(world):
    # Its response pushes it, maybe after the feed's push: a client must not keep a version
    # counting it from a push that does not carry it.
    dispatcher = Dispatcher(world.store, Rules())
    feed = open_feed(world)
    bob, dave = world.contacts[0], world.contacts[2]
    world.outside(bob)
    changes = read_user_changes(feed, world.user, until=1)
    world.own(dave)
    [(contact, ver)] = pushed_versions(dispatcher, world, changes).items()
    assert contact == bob
    assert ver != current_version(world)
    assert ver == roster.partial_version(current_version(world))


def test_when_nothing_raced_the_push_carries_the_version_as_read(world):
    dispatcher = Dispatcher(world.store, Rules())
    feed = open_feed(world)
    bob, carol = world.contacts[0], world.contacts[1]
    world.outside(bob)
    world.outside(carol)
    changes = read_user_changes(feed, world.user, until=2)
    assert sorted(change.contact for change in changes) == [bob, carol]
    now = current_version(world)
    assert pushed_versions(dispatcher, world, changes) == {bob: now, carol: now}
    assert get_with(world, now) is None


@pytest.mark.postgres
def test_the_question_of_each_notification_is_one_lookup_in_an_index(tmp_path, request):
    """Review: without an index of the log by user, logged_after walked every entry after the
    read for each user of a batch (a bulk change of N users cost N x N). The plans say the
    question is answered from the index, in both logs."""
    path = tmp_path / "plan.sqlite"
    SQLiteStore(str(path)).close()
    with sqlite3.connect(path) as db:
        plan = " ".join(str(row) for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT EXISTS (SELECT 1 FROM roster_changes WHERE id > ? AND user = ?)",
            (0, "alice@example.com")))
    assert "roster_changes_by_user" in plan, plan

    server = request.getfixturevalue("pg_server")
    schema = server.create_schema()
    try:
        with psycopg.connect(server.dsn(schema), autocommit=True) as connection:
            install_change_log(connection)
            connection.execute("SET enable_seqscan = off")  # an empty table: ask for the index
            indexes = [row[0] for row in connection.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'roster_port_changes'")]
            assert "roster_port_changes_username_xact" in indexes
            plan = " ".join(row[0] for row in connection.execute(
                "EXPLAIN SELECT 1 FROM roster_port_changes WHERE username = 'alice@example.com'"
                " AND (xact >= '5'::xid8 OR xact = ANY(ARRAY['3']::xid8[]))"))
            assert "roster_port_changes_username_xact" in plan, plan
    finally:
        server.drop_schema(schema)
