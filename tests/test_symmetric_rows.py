"""Rows read into two rosters (mutual_rows), and a store that cannot hold an item, on a real
PostgreSQL with the examples of examples/social.

The dispatcher runs in-process, as the serving loop runs it, on a real MappedPostgresStore and
its real change feed: each test sees the answers the shim would get (results, effects) and the
`roster_changed` notifications the feed makes of rows a contact's write changed. The
application's rows are read in plain SQL.

- follows: examples/social/follows.sql and follows-mapping.toml, directed rows (each row is the
  follower's `to` and the followee's `from`), with its triggers on the change log.
- friendships: examples/social/schema.sql and mapping.toml, one row for two people.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import psycopg
import pytest

from roster_port.config import RosterPolicy
from roster_port.dispatcher import Dispatcher
from roster_port.framing import Frame
from roster_port.messages import decode_message, encode_request
from roster_port.roster import Rules
from roster_port.store.mapped import MappedPostgresStore
from roster_port.store.pg_changes import install_change_log

pytestmark = pytest.mark.postgres

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "social"
DOMAIN = "social.example"
PEOPLE = {"alice": "Alice Liddell", "bob": "Bob Marley", "carol": "Carol King"}
ALICE, BOB, CAROL = (f"{name}@{DOMAIN}" for name in PEOPLE)
STRANGER = "stranger@elsewhere.example"  # no user of the application: user_id is NULL
NODE = "ejabberd@test"
MAPPINGS = {"follows": EXAMPLE / "follows-mapping.toml", "friendships": EXAMPLE / "mapping.toml"}


def app_sql(dsn: str, query: str, parameters: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(query, parameters)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def dsn(pg_server) -> str:
    """The application's schema, both relationship tables, the change log and the example's
    triggers, as examples/social/README.md installs them."""
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    with psycopg.connect(dsn) as connection:
        connection.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
        connection.execute((EXAMPLE / "follows.sql").read_text(encoding="utf-8"))
        install_change_log(connection)
        connection.execute((EXAMPLE / "triggers.sql").read_text(encoding="utf-8"))
        connection.execute((EXAMPLE / "follows-triggers.sql").read_text(encoding="utf-8"))
        for username, display_name in PEOPLE.items():
            connection.execute("INSERT INTO users (username, display_name) VALUES (%s, %s)",
                               (username, display_name))
    yield dsn
    pg_server.drop_schema(schema)


class Shim:
    """The shim's side of one program process on the example's store, with its change feed."""

    def __init__(self, dsn: str, mapping: Path) -> None:
        self.store = MappedPostgresStore(dsn, mapping=str(mapping), connect_timeout_s=5)
        rules = Rules(RosterPolicy(mutual_rows=True, pre_approval=False))
        self.dispatcher = Dispatcher(self.store, rules)
        self.ids = itertools.count(1)
        self.call("hello", {"protocols": [2], "shim": "test", "host": DOMAIN, "node": NODE,
                            "change_feed": True})
        assert self.dispatcher.feed is not None

    def send(self, op: str, args: dict[str, Any]) -> tuple[Any, Any]:
        request_id = next(self.ids)
        response = decode_message(self.dispatcher.handle(Frame(encode_request(request_id, op,
                                                                              args))))
        assert response[:2] == [1, request_id]
        return response[2], response[3]

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        error, result = self.send(op, args)
        assert error is None, error
        return result

    def out(self, user: str, contact: str, kind: str, status: str | None = None) -> dict:
        return self.call("out_subscription", {"user": user, "contact": contact, "type": kind,
                                              "status": status})

    def inbound(self, user: str, contact: str, kind: str, status: str | None = None) -> dict:
        return self.call("in_subscription", {"user": user, "contact": contact, "type": kind,
                                             "status": status})

    def get(self, user: str) -> dict[str, Any]:
        result = self.call("roster_iq", {"user": user, "requester": user, "type": "get",
                                         "items": []})
        return {"ver": result["ver"], "items": {item["jid"]: item for item in result["items"]}}

    def notified(self) -> dict[str, list[dict]]:
        """The effects of the roster_changed notifications for what the feed reports now."""
        by_user: dict[str, list[dict]] = {}
        for payload in self.dispatcher.notifications(self.dispatcher.feed.read()):
            _, _, params = decode_message(payload)[:3]
            by_user.setdefault(params["user"], []).extend(params["effects"])
        return by_user

    def close(self) -> None:
        self.dispatcher.close()
        self.store.close()


@pytest.fixture
def shim(dsn, request):
    shim = Shim(dsn, MAPPINGS[getattr(request, "param", "follows")])
    yield shim
    shim.close()


def pushes(effects: list[dict], user: str) -> list[dict]:
    return [effect for effect in effects if effect["type"] == "push" and effect["user"] == user]


def follows(dsn: str) -> set[tuple[str, str, str]]:
    return set(app_sql(dsn, """
        SELECT r.username, e.username, f.state FROM follows f
        JOIN users r ON r.id = f.follower_id JOIN users e ON e.id = f.followee_id
    """))


def make_mutual(shim: Shim) -> None:
    """Alice and Bob follow each other, by the XMPP handshake both ways."""
    for one, other in ((ALICE, BOB), (BOB, ALICE)):
        shim.out(one, other, "subscribe")
        shim.inbound(other, one, "subscribe")
        shim.out(other, one, "subscribed")
        shim.inbound(one, other, "subscribed")
    assert shim.get(ALICE)["items"][BOB]["subscription"] == "both"
    assert shim.get(BOB)["items"][ALICE]["subscription"] == "both"
    shim.notified()  # what the handshake made the feed report: not this test's subject


# --- Symmetric rows: the contact's cancellations ------------------------------------------------


def test_follows_unsubscribe_is_delivered_and_its_consequences_come_once(dsn, shim):
    make_mutual(shim)
    assert follows(dsn) == {("alice", "bob", "accepted"), ("bob", "alice", "accepted")}

    # Bob stops following Alice: his write removes the row bob->alice, which is Alice's `from`.
    sent = shim.out(BOB, ALICE, "unsubscribe")
    assert sent["route"] is True
    assert follows(dsn) == {("alice", "bob", "accepted")}
    assert [push["item"]["subscription"] for push in pushes(sent["effects"], BOB)] == ["from"]
    # Alice's side of that row: reported by the change feed, once: a push of her item as it now
    # is, and her unavailable to Bob (she lost `from`: RFC 6121 3.3.3, as mod_roster does).
    notified = shim.notified()
    assert set(notified) == {ALICE}
    [push] = pushes(notified[ALICE], ALICE)
    assert push["item"]["jid"] == BOB and push["item"]["subscription"] == "to"
    assert [e for e in notified[ALICE] if e["type"] != "push"] == [
        {"type": "send_unavailable", "user": ALICE, "to": BOB}]
    # The unsubscribe reaches Alice's hooks: delivered (the RFC table, seeing "to" already, would
    # drop it as a repeat), and nothing else: no second push, no second unavailable.
    received = shim.inbound(ALICE, BOB, "unsubscribe")
    assert received == {"deliver": True, "effects": []}
    assert shim.notified() == {}
    # The push carried the version a later get answers.
    after = shim.get(ALICE)
    assert after["ver"] == push["ver"] and after["items"][BOB]["subscription"] == "to"


def test_follows_unsubscribed_is_delivered_and_its_consequences_come_once(dsn, shim):
    make_mutual(shim)
    # Bob cancels Alice's subscription to him: the row alice->bob, Alice's `to`, goes.
    sent = shim.out(BOB, ALICE, "unsubscribed")
    assert follows(dsn) == {("bob", "alice", "accepted")}
    # Bob lost `from`: his unavailable goes to Alice, from his own answer.
    assert {"type": "send_unavailable", "user": BOB, "to": ALICE} in sent["effects"]
    notified = shim.notified()
    [push] = pushes(notified[ALICE], ALICE)
    assert push["item"]["subscription"] == "from"
    assert [e for e in notified[ALICE] if e["type"] != "push"] == []  # Alice keeps `from`
    assert shim.inbound(ALICE, BOB, "unsubscribed") == {"deliver": True, "effects": []}
    assert shim.notified() == {}
    assert shim.get(ALICE)["ver"] == push["ver"]


def test_a_withdrawn_request_is_delivered_and_the_dropped_item_pushed_as_removed(dsn, shim):
    asked = shim.out(ALICE, BOB, "subscribe", "hi")
    [push] = pushes(asked["effects"], ALICE)
    assert push["item"]["ask"] == "subscribe" and shim.get(ALICE)["ver"] == push["ver"]
    assert shim.inbound(BOB, ALICE, "subscribe", "hi")["deliver"] is True
    shim.notified()

    # Alice withdraws: the row alice->bob goes, and with it everything between them.
    withdrawn = shim.out(ALICE, BOB, "unsubscribe")
    assert follows(dsn) == set()
    # Her item cannot stay (the schema holds no item without a follow): it is pushed removed,
    # with the version a get now answers, rather than left on her clients.
    [push] = pushes(withdrawn["effects"], ALICE)
    assert push["item"]["subscription"] == "remove"
    assert shim.get(ALICE) == {"ver": push["ver"], "items": {}}
    # Bob finds no row left for Alice: her unsubscribe is delivered all the same, so that his
    # clients drop the request they show.
    assert shim.inbound(BOB, ALICE, "unsubscribe") == {"deliver": True, "effects": []}
    assert shim.call("pending_in", {"user": BOB})["requests"] == []


def test_a_strangers_cancellation_is_no_repeat_and_is_not_delivered(dsn, shim):
    # With mutual_rows a cancellation that changes nothing is delivered when the contact's own
    # write may have made it so; a contact the store holds nothing of wrote nothing here.
    for kind in ("unsubscribe", "unsubscribed", "subscribed"):
        assert shim.inbound(ALICE, STRANGER, kind) == {"deliver": False, "effects": []}


# --- A store that cannot hold an item ----------------------------------------------------------


@pytest.mark.parametrize("shim", ["follows", "friendships"], indirect=True)
def test_a_roster_set_the_store_cannot_hold_fails_and_leaves_nothing(dsn, shim):
    before = shim.get(ALICE)
    for contact in (STRANGER, "nobody@social.example"):  # remote; local but no user
        error, result = shim.send("roster_iq", {
            "user": ALICE, "requester": ALICE, "type": "set",
            "items": [{"jid": contact, "name": "X", "groups": ["Friends"]}]})
        assert result is None and error["code"] == "stanza_error"
        assert error["stanza_error"]["type"] == "cancel"
        assert error["stanza_error"]["condition"] == "not-allowed"
        assert contact in error["stanza_error"]["text"]
        assert "cannot hold" in error["stanza_error"]["text"]
    # A user of the application with no relationship either way: the schemas hold no such
    # item. The put's tags were written before the row read back as nothing: rolled back.
    error, result = shim.send("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                            "items": [{"jid": CAROL, "groups": ["Friends"]}]})
    assert result is None and error["stanza_error"]["condition"] == "not-allowed"
    assert app_sql(dsn, "SELECT count(*) FROM tags") == [(0,)]
    assert shim.get(ALICE) == before  # same items, same version
    assert shim.notified() == {}  # nothing was written, so nothing is reported


@pytest.mark.parametrize("shim", ["follows", "friendships"], indirect=True)
def test_subscriptions_with_a_contact_the_store_cannot_hold(dsn, shim):
    before = shim.get(ALICE)
    # Outbound: refused (the shim answers the user's client an error presence and routes
    # nothing), rather than routing a request whose state nothing records.
    error, result = shim.send("out_subscription", {"user": ALICE, "contact": STRANGER,
                                                   "type": "subscribe", "status": "hi"})
    assert result is None and error["stanza_error"]["condition"] == "not-allowed"
    assert STRANGER in error["stanza_error"]["text"]
    # Inbound: a request nobody could accept is not delivered, and declined for the user.
    assert shim.inbound(ALICE, STRANGER, "subscribe", "let me in") == {
        "deliver": False, "effects": [{"type": "route_presence", "from": ALICE, "to": STRANGER,
                                       "presence_type": "unsubscribed", "status": None}]}
    assert shim.call("pending_in", {"user": ALICE})["requests"] == []
    # Cancellations change nothing and go on as before.
    assert shim.out(ALICE, STRANGER, "unsubscribe")["route"] is True
    assert shim.get(ALICE) == before


def test_every_push_carries_the_version_a_later_get_answers(dsn, shim):
    """A walk through a follows pair's life: after each step, each push's ver is the get's."""
    steps = [
        ("out", ALICE, BOB, "subscribe"), ("in", BOB, ALICE, "subscribe"),
        ("out", BOB, ALICE, "subscribed"), ("in", ALICE, BOB, "subscribed"),
        ("set", ALICE, BOB, ["Band"]), ("out", BOB, ALICE, "subscribe"),
        ("in", ALICE, BOB, "subscribe"), ("out", ALICE, BOB, "subscribed"),
        ("in", BOB, ALICE, "subscribed"), ("out", ALICE, BOB, "unsubscribe"),
        ("in", BOB, ALICE, "unsubscribe"), ("out", BOB, ALICE, "unsubscribed"),
        ("in", ALICE, BOB, "unsubscribed"), ("set", BOB, ALICE, ["x"]),
    ]
    seen = 0
    for kind, user, contact, what in steps:
        if kind == "set":
            effects = shim.call("roster_iq", {"user": user, "requester": user, "type": "set",
                                              "items": [{"jid": contact, "groups": what}]})
            effects = effects["effects"]
        else:
            effects = (shim.out if kind == "out" else shim.inbound)(user, contact, what)["effects"]
        for owner, notified in shim.notified().items():
            effects = effects + [e for e in notified if e["user"] == owner]
        for push in (e for e in effects if e["type"] == "push"):
            seen += 1
            assert shim.get(push["user"])["ver"] == push["ver"], (kind, user, what, push)
    assert seen >= 10


@pytest.mark.parametrize("shim", ["follows", "friendships"], indirect=True)
def test_an_administrators_item_the_store_cannot_hold_is_refused(dsn, shim):
    """mod_roster's storage API (add_rosteritem, XEP-0227 import): the same refusal."""
    before = shim.get(ALICE)
    error, result = shim.send("store_set_item", {"user": ALICE, "item": {
        "jid": STRANGER, "name": "X", "subscription": "both", "ask": "none",
        "groups": ["Friends"]}})
    assert result is None and error["stanza_error"]["condition"] == "not-allowed"
    assert shim.get(ALICE) == before and app_sql(dsn, "SELECT count(*) FROM tags") == [(0,)]
