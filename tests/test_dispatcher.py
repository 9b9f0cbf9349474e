"""The dispatcher and the roster logic behind it, fed frames in-process over a real SQLite file."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from roster_port.config import Limits, RosterPolicy
from roster_port.dispatcher import OPERATIONS, Dispatcher
from roster_port.framing import Frame, OversizedFrame
from roster_port.messages import decode_message, encode_request
from roster_port.roster import Rules
from roster_port.store.sqlite import SQLiteStore

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.net"


class Session:
    """The shim's side of one program process, without the pipes."""

    def __init__(self, store: SQLiteStore, rules: Rules, *, greet: bool = True) -> None:
        self.dispatcher = Dispatcher(store, rules)
        self.ids = itertools.count(1)
        if greet:
            self.ok("hello", {"protocols": [2], "shim": "test", "host": "example.com"})

    def send(self, op: str, args: dict[str, Any]) -> list[Any]:
        request_id = next(self.ids)
        response = decode_message(self.dispatcher.handle(Frame(encode_request(request_id, op, args))))
        assert response[:2] == [1, request_id]
        return response

    def ok(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        _, _, error, result = self.send(op, args)
        assert error is None, error
        return result

    def error(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        _, _, error, result = self.send(op, args)
        assert result is None and error is not None
        return error

    def stanza_error(self, op: str, args: dict[str, Any]) -> str:
        error = self.error(op, args)
        assert error["code"] == "stanza_error", error
        return error["stanza_error"]["condition"]

    # Shorthands for what clients and hooks do.
    def get(self, user: str, ver: str | None = None) -> dict[str, Any]:
        return self.ok("roster_iq", {"user": user, "requester": user, "type": "get", "items": [], "ver": ver})

    def set(self, user: str, item: dict[str, Any]) -> dict[str, Any]:
        return self.ok("roster_iq", {"user": user, "requester": user, "type": "set", "items": [item]})

    def set_error(self, user: str, item: dict[str, Any], **extra: Any) -> str:
        args = {"user": user, "requester": user, "type": "set", "items": [item], **extra}
        return self.stanza_error("roster_iq", args)

    def out(self, user: str, contact: str, kind: str, status: str | None = None) -> dict[str, Any]:
        return self.ok("out_subscription", {"user": user, "contact": contact, "type": kind, "status": status})

    def inbound(self, user: str, contact: str, kind: str, status: str | None = None) -> dict[str, Any]:
        return self.ok("in_subscription", {"user": user, "contact": contact, "type": kind, "status": status})

    def item(self, user: str, contact: str) -> dict[str, Any] | None:
        return self.ok("store_get_item", {"user": user, "contact": contact})["item"]


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "rosters.sqlite"))
    yield store
    store.close()


@pytest.fixture
def session(store):
    return Session(store, Rules())


def session_with(store, **changes) -> Session:
    policy = {key: value for key, value in changes.items() if key in RosterPolicy.__dataclass_fields__}
    limits = {key: value for key, value in changes.items() if key in Limits.__dataclass_fields__}
    return Session(store, Rules(RosterPolicy(**policy), Limits(**limits)))


# --- Protocol ---------------------------------------------------------------------------------


def test_hello_comes_first(store):
    session = Session(store, Rules(), greet=False)
    assert session.error("roster_get", {"user": ALICE})["message"] == "hello first"
    result = session.ok("hello", {"protocols": [7, 2], "shim": "x", "host": "example.com"})
    assert result["protocol"] == 2
    assert result["capabilities"] == {"versioning": True, "pre_approval": True, "notifications": False}
    assert session.ok("roster_get", {"user": ALICE}) == {"items": [], "effects": []}


def test_hello_with_no_common_protocol_is_refused(store):
    session = Session(store, Rules(), greet=False)
    # Version 1 had no deadlines and one request at a time: a shim of then is refused.
    error = session.error("hello", {"protocols": [1, 3]})
    assert error["code"] == "unsupported_protocol" and "[2]" in error["message"]


def test_unknown_op_and_bad_arguments(session):
    assert session.error("frobnicate", {"user": ALICE})["code"] == "unknown_op"
    assert session.error("roster_get", {})["code"] == "bad_request"
    assert session.error("roster_get", {"user": "not a jid@"})["code"] == "bad_request"
    assert session.error("roster_get", {"user": "example.com"})["code"] == "bad_request"
    assert session.error("in_subscription", {"user": ALICE, "contact": BOB, "type": "probe"})["code"] == "bad_request"


def test_oversized_frame_gets_an_error_when_its_id_is_readable(session):
    head = encode_request(4242, "roster_get", {"user": ALICE})[:40]
    response = decode_message(session.dispatcher.handle(OversizedFrame(10**9, head)))
    assert response[1] == 4242 and response[2]["code"] == "frame_too_large"
    assert session.dispatcher.handle(OversizedFrame(10**9, b"\xff\xff")) is None


def test_every_operation_of_the_protocol_document_is_served():
    from pathlib import Path

    document = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for op in OPERATIONS:
        assert f"| `{op}` |" in document, f"{op} is not documented in docs/protocol.md"


# --- Roster IQ rules --------------------------------------------------------------------------


def test_add_update_and_remove_an_item(session):
    result = session.set(ALICE, {"jid": "Bob@Example.COM/phone", "name": "Bob", "groups": ["Work", "Friends"]})
    [push] = result["effects"]
    assert push == {
        "type": "push",
        "user": ALICE,
        "item": {"jid": BOB, "name": "Bob", "subscription": "none", "ask": None, "approved": False, "groups": ["Work", "Friends"]},
        "ver": "1",
    }
    assert session.set(ALICE, {"jid": BOB, "name": "Bob", "groups": ["Work", "Friends"]})["effects"] == []
    renamed = session.set(ALICE, {"jid": BOB, "name": "Robert", "groups": []})
    assert renamed["effects"][0]["item"]["name"] == "Robert" and renamed["effects"][0]["ver"] == "2"
    removed = session.set(ALICE, {"jid": BOB, "subscription": "remove"})
    assert [effect["type"] for effect in removed["effects"]] == ["push"]
    assert removed["effects"][0]["item"]["subscription"] == "remove"
    assert session.get(ALICE)["items"] == []


def test_a_set_never_changes_subscription_or_ask(session):
    session.out(ALICE, BOB, "subscribe")
    session.set(ALICE, {"jid": BOB, "name": "B", "subscription": "both", "groups": []})
    item = session.item(ALICE, BOB)
    assert item["subscription"] == "none" and item["ask"] == "out"


@pytest.mark.parametrize(
    "item, condition",
    [
        ({"jid": BOB, "ask": "subscribe"}, "bad-request"),
        ({"jid": BOB, "groups": ["a", "a"]}, "bad-request"),
        ({"jid": BOB, "groups": [""]}, "not-acceptable"),
        ({"jid": "bob@@example.com"}, "jid-malformed"),
        ({"jid": "bob@exa mple.com"}, "jid-malformed"),
        ({"jid": ""}, "jid-malformed"),
        ({"name": "no jid"}, "bad-request"),
        ({"jid": ALICE}, "not-allowed"),
        ({"jid": BOB, "subscription": "remove"}, "item-not-found"),
    ],
)
def test_bad_roster_sets(session, item, condition):
    assert session.set_error(ALICE, item) == condition
    assert session.get(ALICE)["items"] == []


def test_iq_shape_rules(session):
    base = {"user": ALICE, "requester": ALICE}
    assert session.stanza_error("roster_iq", {**base, "type": "get", "items": [{"jid": BOB}]}) == "bad-request"
    assert session.stanza_error("roster_iq", {**base, "type": "set", "items": []}) == "bad-request"
    two = [{"jid": BOB}, {"jid": CAROL}]
    assert session.stanza_error("roster_iq", {**base, "type": "set", "items": two}) == "bad-request"
    other = {"user": ALICE, "requester": BOB, "type": "get", "items": []}
    assert session.stanza_error("roster_iq", other) == "forbidden"
    assert session.ok("roster_iq", {**other, "remote_access": True})["items"] == []  # XEP-0356
    assert session.set_error(ALICE, {"jid": BOB}, access="deny") == "not-allowed"


def test_limits(store):
    session = session_with(store, max_items=2, max_name_length=5, max_groups=2, max_group_length=3)
    assert session.set_error(ALICE, {"jid": BOB, "name": "toolong"}) == "not-acceptable"
    assert session.set_error(ALICE, {"jid": BOB, "groups": ["a", "b", "c"]}) == "not-acceptable"
    assert session.set_error(ALICE, {"jid": BOB, "groups": ["abcd"]}) == "not-acceptable"
    session.set(ALICE, {"jid": BOB})
    session.set(ALICE, {"jid": CAROL})
    assert session.set_error(ALICE, {"jid": "dave@example.com"}) == "not-allowed"
    # A stranger's request is no item: it is kept and delivered, and has its own bound.
    assert session.inbound(ALICE, "eve@example.com", "subscribe")["deliver"] is True
    assert session.set(ALICE, {"jid": BOB, "name": "Bob"})["effects"]  # updates still work


def test_read_only_refuses_changes_and_still_reads(store):
    Session(store, Rules()).set(ALICE, {"jid": BOB, "name": "Bob"})
    session = session_with(store, read_only=True)
    assert session.set_error(ALICE, {"jid": CAROL}) == "not-allowed"
    assert session.out(ALICE, BOB, "subscribe") == {"route": False, "effects": []}
    assert session.inbound(ALICE, CAROL, "subscribe") == {"deliver": False, "effects": []}
    assert [item["jid"] for item in session.get(ALICE)["items"]] == [BOB]


# --- Versioning -------------------------------------------------------------------------------


def test_versioning(session):
    first = session.get(ALICE, ver="")
    assert first["items"] == [] and first["ver"] == "0"
    assert session.get(ALICE, ver="0") == {"items": None, "ver": "0", "effects": []}
    session.set(ALICE, {"jid": BOB})
    changed = session.get(ALICE, ver="0")
    assert changed["ver"] != "0" and [item["jid"] for item in changed["items"]] == [BOB]
    assert session.get(ALICE, ver=changed["ver"])["items"] is None
    # Removing everything never brings an old version back.
    session.set(ALICE, {"jid": BOB, "subscription": "remove"})
    assert session.get(ALICE)["ver"] not in ("0", changed["ver"])


def test_versioning_off(store):
    session = session_with(store, versioning=False)
    assert session.get(ALICE, ver="0") == {"items": [], "ver": None, "effects": []}
    assert session.set(ALICE, {"jid": BOB})["effects"][0]["ver"] is None


# --- Subscriptions through the roster ---------------------------------------------------------


def test_a_strangers_request_is_stored_but_is_not_an_item(session):
    assert session.inbound(ALICE, BOB, "subscribe", "let me in")["deliver"] is True
    assert session.get(ALICE)["items"] == []
    assert session.ok("pending_in", {"user": ALICE})["requests"] == [{"from": BOB, "status": "let me in"}]
    assert session.ok("jid_info", {"user": ALICE, "contact": BOB})["ask"] == "in"
    # Denied: the request is forgotten, nothing was ever pushed.
    assert session.out(ALICE, BOB, "unsubscribed") == {"route": True, "effects": []}
    assert session.item(ALICE, BOB) is None
    assert session.ok("pending_in", {"user": ALICE})["requests"] == []


def test_a_strangers_request_withdrawn_is_forgotten(session):
    session.inbound(ALICE, BOB, "subscribe")
    result = session.inbound(ALICE, BOB, "unsubscribe")
    assert result["deliver"] is True
    assert result["effects"] == [{"type": "route_presence", "from": ALICE, "to": BOB, "presence_type": "unsubscribed", "status": None}]
    assert session.item(ALICE, BOB) is None


def test_approving_a_stranger_adds_the_item(session):
    session.inbound(ALICE, BOB, "subscribe")
    result = session.out(ALICE, BOB, "subscribed")
    assert [effect["type"] for effect in result["effects"]] == ["push", "send_presence"]
    assert result["effects"][0]["item"]["subscription"] == "from"
    assert [item["jid"] for item in session.get(ALICE)["items"]] == [BOB]


def test_an_item_with_a_pending_request_stays_visible_and_its_changes_are_pushed(session):
    """RFC 6121, unlike ejabberd 23.01: an item the user added is listed in every state."""
    session.set(ALICE, {"jid": BOB, "name": "Bob"})
    session.out(ALICE, BOB, "subscribe")
    session.inbound(ALICE, BOB, "subscribe")  # N+PO+PI
    result = session.inbound(ALICE, BOB, "unsubscribed")  # -> N+PI: the ask goes away
    [push] = [effect for effect in result["effects"] if effect["type"] == "push"]
    assert push["item"]["subscription"] == "none" and push["item"]["ask"] is None
    assert [item["jid"] for item in session.get(ALICE)["items"]] == [BOB]


def test_subscribing_to_oneself_changes_nothing(session):
    assert session.out(ALICE, ALICE, "subscribe") == {"route": True, "effects": []}
    assert session.inbound(ALICE, ALICE, "subscribe") == {"deliver": False, "effects": []}
    assert session.ok("store_get_roster", {"user": ALICE})["items"] == []


def test_losing_from_sends_unavailable(session):
    session.inbound(ALICE, BOB, "subscribe")
    session.out(ALICE, BOB, "subscribed")
    result = session.out(ALICE, BOB, "unsubscribed")
    assert {"type": "send_unavailable", "user": ALICE, "to": BOB} in result["effects"]


def test_pre_approval(session):
    result = session.out(ALICE, BOB, "subscribed")
    assert result["route"] is False
    assert result["effects"][0]["item"]["approved"] is True
    answered = session.inbound(ALICE, BOB, "subscribe")
    assert answered["deliver"] is False
    types = [(effect["type"], effect.get("presence_type")) for effect in answered["effects"]]
    assert types == [("push", None), ("route_presence", "subscribed"), ("send_presence", None)]
    assert session.item(ALICE, BOB)["subscription"] == "from"


def test_removing_an_item_cancels_both_directions(session):
    session.set(ALICE, {"jid": BOB})
    session.out(ALICE, BOB, "subscribe")
    session.inbound(ALICE, BOB, "subscribed")
    session.inbound(ALICE, BOB, "subscribe")
    session.out(ALICE, BOB, "subscribed")  # both
    result = session.set(ALICE, {"jid": BOB, "subscription": "remove"})
    kinds = [(effect["type"], effect.get("presence_type")) for effect in result["effects"]]
    assert kinds == [
        ("push", None),
        ("send_unavailable", None),
        ("route_presence", "unsubscribe"),
        ("route_presence", "unsubscribed"),
    ]


def test_remove_user_cancels_everything_and_forgets_the_roster(session):
    session.set(ALICE, {"jid": BOB})
    session.out(ALICE, BOB, "subscribe")
    session.inbound(ALICE, CAROL, "subscribe")
    result = session.ok("remove_user", {"user": ALICE})
    assert result["effects"] == [
        {"type": "route_presence", "from": ALICE, "to": BOB, "presence_type": "unsubscribe", "status": None},
        {"type": "route_presence", "from": ALICE, "to": CAROL, "presence_type": "unsubscribed", "status": None},
    ]
    assert session.ok("store_get_roster", {"user": ALICE})["items"] == []


# --- mod_roster's storage API -----------------------------------------------------------------


def test_store_operations_write_what_the_admin_says(session):
    record = {"jid": BOB, "name": "Bob", "subscription": "both", "ask": "none", "groups": ["G"], "askmessage": "", "approved": False}
    result = session.ok("store_set_item", {"user": ALICE, "item": record})
    assert result["effects"][0]["item"]["subscription"] == "both"
    assert session.item(ALICE, BOB) == {**record, "in_roster": True}
    assert session.ok("store_read_version", {"user": ALICE})["ver"] == result["ver"]
    legacy = {**record, "jid": CAROL, "subscription": "to", "ask": "subscribe"}
    session.ok("store_set_item", {"user": ALICE, "item": legacy})
    # Stored as given (a legacy "to" with a pending out); the state machine folds it when used.
    assert session.item(ALICE, CAROL)["ask"] == "out"
    deleted = session.ok("store_del_item", {"user": ALICE, "contact": BOB})
    assert deleted["effects"][0]["item"]["subscription"] == "remove"
    session.ok("store_remove_user", {"user": ALICE})
    assert session.ok("store_get_roster", {"user": ALICE})["items"] == []


def test_remove_user_leaves_a_read_only_roster_alone(store):
    Session(store, Rules()).set(ALICE, {"jid": BOB, "name": "Bob"})
    session = session_with(store, read_only=True)
    assert session.ok("remove_user", {"user": ALICE}) == {"effects": []}
    assert [item["jid"] for item in session.get(ALICE)["items"]] == [BOB]


def test_a_repeated_request_keeps_its_first_text_or_brings_a_missing_one(session):
    session.inbound(ALICE, BOB, "subscribe", "first")
    session.inbound(ALICE, BOB, "subscribe", "second")
    assert session.item(ALICE, BOB)["askmessage"] == "first"  # the table's cell: no change
    session.inbound(ALICE, CAROL, "subscribe")
    session.inbound(ALICE, CAROL, "subscribe", "now with a text")
    assert session.item(ALICE, CAROL)["askmessage"] == "now with a text"


# --- Replayed subscription presences (the shim's journal) -------------------------------------


def replayed(session: Session, op: str, user: str, contact: str, kind: str) -> dict[str, Any]:
    """A presence the shim sends again because it never got the first answer."""
    return session.ok(op, {"user": user, "contact": contact, "type": kind, "status": None,
                           "replay": True})


def test_a_replayed_inbound_subscribe_already_applied_is_delivered_again(session):
    assert session.inbound(ALICE, BOB, "subscribe", "hi")["deliver"] is True  # N -> N+PI
    # Its answer was lost: sent again, the state shows it applied. Delivered all the same (the
    # first delivery went with the answer); a plain repeat is not.
    assert replayed(session, "in_subscription", ALICE, BOB, "subscribe") == {
        "deliver": True, "effects": []}  # a stranger's request: no item to push
    assert session.inbound(ALICE, BOB, "subscribe")["deliver"] is False
    assert session.ok("pending_in", {"user": ALICE})["requests"] == [{"from": BOB, "status": "hi"}]


def test_a_replayed_inbound_subscribed_already_applied_is_delivered_with_its_push(session):
    session.set(ALICE, {"jid": BOB, "name": "Bob"})
    session.out(ALICE, BOB, "subscribe")
    first = session.inbound(ALICE, BOB, "subscribed")  # N+PO -> T
    assert first["deliver"] is True
    [push] = first["effects"]
    again = replayed(session, "in_subscription", ALICE, BOB, "subscribed")
    # The push of the first answer was lost with it: the item as it stands, same version.
    assert again == {"deliver": True, "effects": [push]}
    assert session.inbound(ALICE, BOB, "subscribed") == {"deliver": False, "effects": []}
    assert session.item(ALICE, BOB)["subscription"] == "to"


def test_a_replayed_inbound_presence_not_applied_yet_is_applied_as_the_first_time(session):
    session.out(ALICE, BOB, "subscribe")
    result = replayed(session, "in_subscription", ALICE, BOB, "subscribed")
    assert result["deliver"] is True
    assert [effect["item"]["subscription"] for effect in result["effects"]] == ["to"]
    # An unsubscribed whose answer was lost, replayed: applied already, delivered again with
    # the item as it stands (the client kept showing `to`); a plain repeat is not.
    assert session.inbound(ALICE, BOB, "unsubscribed")["deliver"] is True  # T -> N
    again = replayed(session, "in_subscription", ALICE, BOB, "unsubscribed")
    assert again["deliver"] is True
    assert [effect["item"]["subscription"] for effect in again["effects"]] == ["none"]
    assert session.inbound(ALICE, BOB, "unsubscribed")["deliver"] is False


def test_a_replayed_inbound_unsubscribe_already_applied_is_delivered_again(session):
    session.set(ALICE, {"jid": BOB, "name": "Bob"})
    session.out(ALICE, BOB, "subscribe")
    session.inbound(ALICE, BOB, "subscribe")
    session.out(ALICE, BOB, "subscribed")  # F
    assert session.inbound(ALICE, BOB, "unsubscribe")["deliver"] is True  # F -> N
    again = replayed(session, "in_subscription", ALICE, BOB, "unsubscribe")
    assert again["deliver"] is True
    assert session.item(ALICE, BOB)["subscription"] == "none"
    # Not from a state that never had the subscription: a stranger's repeat stays dropped.
    assert replayed(session, "in_subscription", ALICE, "carol@example.com", "subscribed")[
        "deliver"] is False


def test_replayed_outbound_presences_already_applied_are_routed_again(session):
    # Applied again, an outbound presence changes nothing and goes on to the contact as the
    # first time: only the pre-approval cases are not routed, replayed or not.
    assert session.out(ALICE, BOB, "subscribe")["route"] is True
    assert replayed(session, "out_subscription", ALICE, BOB, "subscribe") == {
        "route": True, "effects": []}
    session.inbound(ALICE, CAROL, "subscribe")
    assert session.out(ALICE, CAROL, "subscribed")["route"] is True  # N+PI -> F
    assert replayed(session, "out_subscription", ALICE, CAROL, "subscribed")["route"] is True
    assert session.out(ALICE, CAROL, "unsubscribed")["route"] is True  # F -> N
    assert replayed(session, "out_subscription", ALICE, CAROL, "unsubscribed")["route"] is True
    dave = "dave@example.org"
    assert session.out(ALICE, dave, "subscribed")["route"] is False  # a pre-approval
    assert replayed(session, "out_subscription", ALICE, dave, "subscribed")["route"] is False


def test_replay_must_be_a_boolean(session):
    error = session.error("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe",
                                              "replay": "yes"})
    assert error["code"] == "bad_request" and "replay" in error["message"]
