"""Property: any interleaving of subscription traffic between users, once every presence in
flight has been delivered, leaves both sides of each pair consistent: U has a subscription *to*
C exactly when C has one *from* U, except where the presences of that subscription raced in a
way RFC 6121 gives no server the means to resolve (see `RACES`; each race is shown, with its
documented outcome, by the example tests at the end).

The users' rosters live in a real SQLite file and change only through the roster logic, as the
program would change them; the "network" is a FIFO per ordered pair of users (XMPP delivers
stanzas between two entities in order), and hypothesis chooses when each presence arrives.
"""

from __future__ import annotations

import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roster_port import roster
from roster_port.config import RosterPolicy
from roster_port.effects import RoutePresence
from roster_port.roster import Rules
from roster_port.store.base import RosterRow
from roster_port.store.sqlite import SQLiteStore
from roster_port.subscription import PRESENCE_TYPES, Direction, Event

USERS = ["anne@example.com", "bert@example.com", "cleo@example.org"]
ANNE, BERT, CLEO = USERS

# Two different users, in order (an action of a user on herself would be a no-op).
two_users = st.sampled_from([(a, b) for a in USERS for b in USERS if a != b])
send = two_users.flatmap(lambda ab: st.tuples(st.just("send"), st.just(ab[0]), st.just(ab[1]), st.sampled_from(PRESENCE_TYPES)))
remove = two_users.map(lambda ab: ("remove", ab[0], ab[1], None))
deliver = st.tuples(st.just("deliver"), st.integers(0, 20), st.none(), st.none())
actions = st.lists(st.one_of(send, send, remove, deliver, deliver, deliver), max_size=40)

PAIRS = [(USERS[0], USERS[1]), (USERS[0], USERS[2]), (USERS[1], USERS[2])]
# For each pair, a consistent state at rest to start from, so that short scripts reach every
# cell of the table: who is subscribed to whom, and who has a request pending.
pair_state = st.fixed_dictionaries(
    {"a_to_b": st.booleans(), "b_to_a": st.booleans(), "a_asks": st.booleans(), "b_asks": st.booleans()}
)
initial_states = st.lists(pair_state, min_size=len(PAIRS), max_size=len(PAIRS))

PLAIN_RFC = Rules(policy=RosterPolicy(pre_approval=False, auto_unsubscribed=False))

# The races of RFC 6121 that no server can resolve. A subscription of S to P's presence is
# driven by S's subscribe / unsubscribe and P's subscribed / unsubscribed, and none of them
# says which earlier presence it answers. When one of these pairs crosses on the wire (each
# sent before the other arrived), each server takes the other's presence for an answer to
# its own latest one, and the two sides can end apart:
# - S's `subscribe` crossing P's `unsubscribed`: S's server reads the unsubscribed as the
#   denial of the request S just (re)sent (RFC 6121 3.2.3, A.3.4: N+PO or T -> N), while P's
#   server, having cancelled, takes the subscribe for a new request (3.1.3, A.3.1: N -> N+PI,
#   delivered) and, pre-approved or approved later, answers it `subscribed`, which S's
#   server, with no request pending any more, must ignore (3.1.6, A.3.3). S ends without
#   "to", P with "from".
# - P's `subscribed` crossing S's `unsubscribe`: S's server reads the subscribed (an approval
#   of an older request, or the auto-reply 3.1.3 sends to a repeated subscribe) as the answer
#   to the request S sent after the unsubscribe (3.1.6, A.3.3: N+PO -> T), while P's server
#   cancels (3.3.3, A.3.2: F -> N) and then sees the new request (N -> N+PI). S ends with
#   "to", P without "from". ejabberd's auto `unsubscribed` (the default here, not RFC 6121's)
#   usually repairs this one; the plain RFC does not.
# XMPP has no stanza ids that tie an answer to its request (RFC 6121 3.1.2 lets a server
# resend a request at will, and 3.1.3 answers repeats), so this is the protocol's, not a
# server's: the property checks every subscription whose presences did not race so, and the
# example tests below pin what happens when they do.
RACES = {("subscribe", "unsubscribed"), ("unsubscribe", "subscribed")}


def _subscription(has_to: bool, has_from: bool) -> str:
    return {(False, False): "none", (True, False): "to", (False, True): "from", (True, True): "both"}[
        (has_to, has_from)
    ]


@dataclass
class Flight:
    """One subscription presence on the network, with the clock ticks it was sent and arrived."""

    sender: str
    receiver: str
    presence_type: str
    sent_at: int
    delivered_at: int | None = None

    def crossed(self, other: "Flight") -> bool:
        """Each was sent before the other arrived (an undelivered one never arrives)."""
        never = float("inf")
        return self.sent_at < (other.delivered_at or never) and other.sent_at < (
            self.delivered_at or never
        )


class Network:
    def __init__(self, store: SQLiteStore, rules: Rules) -> None:
        self.store, self.rules = store, rules
        self.channels: dict[tuple[str, str], deque[Flight]] = {}
        self.flights: list[Flight] = []
        self.clock = 0

    def _queue(self, sender: str, receiver: str, presence_type: str) -> None:
        self.clock += 1
        flight = Flight(sender, receiver, presence_type, self.clock)
        self.flights.append(flight)
        self.channels.setdefault((sender, receiver), deque()).append(flight)

    def _route(self, outcome: roster.Outcome) -> None:
        for effect in outcome.effects:
            if isinstance(effect, RoutePresence):
                self._queue(effect.sender, effect.to, effect.presence_type)

    def send(self, sender: str, receiver: str, presence_type: str) -> bool:
        """`sender`'s client sends the presence; returns whether its server routed it."""
        with self.store.transaction(sender) as txn:
            outcome = roster.subscription(txn, self.rules, receiver, Event(Direction.OUT, presence_type), None)
        if outcome.result["route"]:
            self._queue(sender, receiver, presence_type)
        self._route(outcome)
        return outcome.result["route"]

    def remove(self, user: str, contact: str) -> None:
        with self.store.transaction(user) as txn:
            row = txn.get(contact)
            if row is None or not row.in_roster:
                return
            outcome = roster.roster_set(txn, self.rules, {"jid": contact, "subscription": "remove"})
        self._route(outcome)

    def deliver(self, index: int) -> bool:
        busy = [pair for pair, queue in self.channels.items() if queue]
        if not busy:
            return False
        self.deliver_next(*busy[index % len(busy)])
        return True

    def deliver_next(self, sender: str, receiver: str) -> str:
        """Delivers the oldest presence from `sender` to `receiver`; returns its type."""
        flight = self.channels[(sender, receiver)].popleft()
        self.clock += 1
        flight.delivered_at = self.clock
        with self.store.transaction(receiver) as txn:
            outcome = roster.subscription(txn, self.rules, sender, Event(Direction.IN, flight.presence_type), None)
        self._route(outcome)
        return flight.presence_type

    def deliver_all(self) -> None:
        steps = 0
        while self.deliver(steps):
            steps += 1
            assert steps < 1000, "presences keep bouncing between the users"

    def in_flight(self) -> list[tuple[str, str, str]]:
        return [(f.sender, f.receiver, f.presence_type) for q in self.channels.values() for f in q]

    def raced(self) -> set[tuple[str, str]]:
        """(S, P) for each subscription of S to P's presence whose presences raced (`RACES`)."""
        raced = set()
        for mine in self.flights:  # S's subscribe / unsubscribe to P
            for theirs in self.flights:  # P's answer to S
                if (
                    (theirs.sender, theirs.receiver) == (mine.receiver, mine.sender)
                    and (mine.presence_type, theirs.presence_type) in RACES
                    and mine.crossed(theirs)
                ):
                    raced.add((mine.sender, mine.receiver))
        return raced

    def start_from(self, pairs) -> None:
        for (a, b), state in zip(PAIRS, pairs, strict=True):
            a_asks = state["a_asks"] and not state["a_to_b"]
            b_asks = state["b_asks"] and not state["b_to_a"]
            for user, contact, has_to, has_from, asks, asked in (
                (a, b, state["a_to_b"], state["b_to_a"], a_asks, b_asks),
                (b, a, state["b_to_a"], state["a_to_b"], b_asks, a_asks),
            ):
                row = RosterRow(contact, subscription=_subscription(has_to, has_from), pending_out=asks, pending_in=asked)
                with self.store.transaction(user) as txn:
                    txn.put(row)

    def row(self, user: str, contact: str) -> RosterRow | None:
        with self.store.snapshot(user) as txn:
            return txn.get(contact)

    def subscription(self, user: str, contact: str) -> str:
        row = self.row(user, contact)
        return row.subscription if row else "none"

    def state(self, user: str, contact: str) -> str:
        """The RFC's name of `user`'s state for `contact`: N, N+PO, T+PI, ..."""
        row = self.row(user, contact) or RosterRow(contact)
        letter = {"none": "N", "to": "T", "from": "F", "both": "B"}[row.subscription]
        return letter + ("+PO" if row.pending_out else "") + ("+PI" if row.pending_in else "")

    def disagreements(self) -> set[tuple[str, str]]:
        """(U, C) where U's "to" and C's "from" differ."""
        return {
            (user, contact)
            for user in USERS
            for contact in USERS
            if user != contact
            and (self.subscription(user, contact) in ("to", "both"))
            != (self.subscription(contact, user) in ("from", "both"))
        }


@contextmanager
def network(rules: Rules, start=None) -> Iterator[Network]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(str(Path(tmp) / "rosters.sqlite"))
        try:
            net = Network(store, rules)
            net.start_from(start or [pair() for _ in PAIRS])
            yield net
        finally:
            store.close()


def _run(start, script, rules: Rules) -> None:
    with network(rules, start) as net:
        for action, first, second, presence_type in script:
            if action == "send" and first != second:
                net.send(first, second, presence_type)
            elif action == "remove" and first != second:
                net.remove(first, second)
            elif action == "deliver":
                net.deliver(first)
        net.deliver_all()
        # Only the subscriptions whose presences raced (RACES: RFC 6121 cannot tell a stale
        # answer from a new one there) may end apart; every other one must agree.
        assert net.disagreements() - net.raced() == set()


@settings(max_examples=400, deadline=None)
@given(initial_states, actions)
def test_both_sides_agree_once_everything_is_delivered(start, script):
    _run(start, script, Rules())


@settings(max_examples=400, deadline=None)
@given(initial_states, actions)
def test_both_sides_agree_without_pre_approval_or_auto_replies(start, script):
    _run(start, script, PLAIN_RFC)


# --- The races, one by one, with what RFC 6121 makes of them -------------------------------------


def pair(a_to_b=False, b_to_a=False, a_asks=False, b_asks=False) -> dict[str, bool]:
    return {"a_to_b": a_to_b, "b_to_a": b_to_a, "a_asks": a_asks, "b_asks": b_asks}


def start(**pairs: dict[str, bool]) -> list[dict[str, bool]]:
    """Initial states by pair name: anne_bert, anne_cleo, bert_cleo (the rest: N both ways)."""
    names = ["anne_bert", "anne_cleo", "bert_cleo"]
    assert set(pairs) <= set(names)
    return [pairs.get(name, pair()) for name in names]


@pytest.mark.parametrize("rules", [Rules(), PLAIN_RFC], ids=["pre-approval", "plain RFC"])
@pytest.mark.parametrize("in_time", [False, True], ids=["crossing", "in time"])
def test_a_repeated_subscribe_crossing_a_cancellation(rules, in_time):
    """Anne is subscribed to Bert and repeats her subscribe; Bert removes her (unsubscribed)
    and approves her again. Crossing, Bert's server sees a new request after the cancellation
    and approves it (pre-approved, or by Bert's client), Anne's server sees the cancellation
    after her request and must ignore the approval, which answers nothing pending (RFC 6121
    3.1.6): Anne ends without "to", Bert with "from"."""
    with network(rules, start(anne_bert=pair(a_to_b=True))) as net:
        assert net.send(ANNE, BERT, "subscribe")  # T stays T; a subscribe is always routed
        if in_time:
            assert net.deliver_next(ANNE, BERT) == "subscribe"  # B's F answers it: subscribed
        net.remove(BERT, ANNE)  # unsubscribed
        if rules.policy.pre_approval:
            assert not net.send(BERT, ANNE, "subscribed")  # a pre-approval, kept by Bert's server
        if not in_time:
            assert net.deliver_next(ANNE, BERT) == "subscribe"
            if not rules.policy.pre_approval:
                assert net.state(BERT, ANNE) == "N+PI"  # shown to Bert as a new request
                assert net.send(BERT, ANNE, "subscribed")  # Bert approves it: routed
        net.deliver_all()
        if in_time:
            assert net.raced() == set() and net.disagreements() == set()
            assert net.state(ANNE, BERT) == "N"
        else:
            assert net.raced() == {(ANNE, BERT)}
            assert (net.state(ANNE, BERT), net.state(BERT, ANNE)) == ("N", "F")
            assert net.disagreements() == {(ANNE, BERT)}


@pytest.mark.parametrize("rules", [Rules(), PLAIN_RFC], ids=["pre-approval", "plain RFC"])
def test_a_repeated_request_crossing_its_denial(rules):
    """Bert's request to Cleo is pending; Cleo removes him (unsubscribed, denying it) while
    Bert sends it again, and Cleo then approves him. Bert's server takes the denial for the
    answer to the repeat (N+PO -> N), Cleo's server takes the repeat for a new request, so
    the approval reaches a Bert with nothing pending and is ignored (RFC 6121 3.1.6)."""
    with network(rules, start(bert_cleo=pair(a_asks=True))) as net:
        assert (net.state(BERT, CLEO), net.state(CLEO, BERT)) == ("N+PO", "N+PI")
        net.remove(CLEO, BERT)  # unsubscribed
        assert net.send(BERT, CLEO, "subscribe")  # the repeat
        if rules.policy.pre_approval:
            assert not net.send(CLEO, BERT, "subscribed")  # pre-approves the next request
        assert net.deliver_next(CLEO, BERT) == "unsubscribed"
        assert net.state(BERT, CLEO) == "N"
        assert net.deliver_next(BERT, CLEO) == "subscribe"
        if not rules.policy.pre_approval:
            assert net.send(CLEO, BERT, "subscribed")  # Cleo approves the request she sees
        net.deliver_all()
        assert net.raced() == {(BERT, CLEO)}
        assert (net.state(BERT, CLEO), net.state(CLEO, BERT)) == ("N", "F")


@pytest.mark.parametrize("auto_unsubscribed", [False, True], ids=["plain RFC", "ejabberd's auto-reply"])
def test_an_approval_crossing_a_cancellation_and_a_new_request(auto_unsubscribed):
    """Cleo is subscribed to Anne; she repeats her subscribe, removes Anne (unsubscribe) and
    asks again. Anne's server answers the repeat `subscribed` (RFC 6121 3.1.3, she is in F),
    and that answer crosses the unsubscribe: Cleo's server takes it for the answer to the new
    request (3.1.6: N+PO -> T) while Anne's cancels and shows the new request (N -> N+PI).
    With ejabberd's auto `unsubscribed` Anne's server also answers the unsubscribe, which
    arrives after the `subscribed` and takes Cleo back to N: the subscription agrees again
    (though Cleo's request is no longer pending on her side)."""
    rules = Rules(policy=RosterPolicy(pre_approval=False, auto_unsubscribed=auto_unsubscribed))
    with network(rules, start(anne_cleo=pair(b_to_a=True))) as net:
        assert (net.state(CLEO, ANNE), net.state(ANNE, CLEO)) == ("T", "F")
        assert net.send(CLEO, ANNE, "subscribe")  # a repeat: T stays T, routed
        net.remove(CLEO, ANNE)  # unsubscribe
        assert net.send(CLEO, ANNE, "subscribe")  # a new request: N+PO
        assert net.deliver_next(CLEO, ANNE) == "subscribe"  # answered `subscribed` for Anne
        net.deliver_all()
        assert net.raced() == {(CLEO, ANNE)}
        if auto_unsubscribed:
            assert (net.state(CLEO, ANNE), net.state(ANNE, CLEO)) == ("N", "N+PI")
            assert net.disagreements() == set()
        else:
            assert (net.state(CLEO, ANNE), net.state(ANNE, CLEO)) == ("T", "N+PI")
            assert net.disagreements() == {(CLEO, ANNE)}


# --- Not races: an approval nobody asked for is not routed ---------------------------------------


@pytest.mark.parametrize("rules", [Rules(), PLAIN_RFC], ids=["pre-approval", "plain RFC"])
def test_an_approval_sent_before_the_request_arrives(rules):
    """Anne asks Cleo; Cleo sends `subscribed` before Anne's subscribe reaches her. With no
    request pending it is a pre-approval (RFC 6121 3.4) or, without pre-approval, ignored (A.2:
    a `subscribed` that changes no state is not routed): it must never reach Anne as the
    answer, or Anne would be T while Cleo, seeing the request next, is N+PI."""
    with network(rules) as net:
        assert net.send(ANNE, CLEO, "subscribe")
        assert not net.send(CLEO, ANNE, "subscribed")
        assert net.in_flight() == [(ANNE, CLEO, "subscribe")]
        net.deliver_all()
        if rules.policy.pre_approval:  # answered for Cleo
            assert (net.state(ANNE, CLEO), net.state(CLEO, ANNE)) == ("T", "F")
        else:  # Cleo is asked, and her answer is the one that counts
            assert (net.state(ANNE, CLEO), net.state(CLEO, ANNE)) == ("N+PO", "N+PI")
            assert net.send(CLEO, ANNE, "subscribed")
            net.deliver_all()
            assert (net.state(ANNE, CLEO), net.state(CLEO, ANNE)) == ("T", "F")
        assert net.raced() == set() and net.disagreements() == set()


@pytest.mark.parametrize("rules", [Rules(), PLAIN_RFC], ids=["pre-approval", "plain RFC"])
def test_an_approval_sent_before_the_contact_asks(rules):
    """Anne sends `subscribed` to Cleo, then Cleo asks: the same, seen from the other side."""
    with network(rules) as net:
        assert not net.send(ANNE, CLEO, "subscribed")
        assert net.send(CLEO, ANNE, "subscribe")
        net.deliver_all()
        expected = ("F", "T") if rules.policy.pre_approval else ("N+PI", "N+PO")
        assert (net.state(ANNE, CLEO), net.state(CLEO, ANNE)) == expected
        assert net.disagreements() == set()
