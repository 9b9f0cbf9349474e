"""Property: any interleaving of subscription traffic between users, once every presence in
flight has been delivered, leaves both sides of each pair consistent: U has a subscription *to*
C exactly when C has one *from* U.

The users' rosters live in a real SQLite file and change only through the roster logic, as the
program would change them; the "network" is a FIFO per ordered pair of users (XMPP delivers
stanzas between two entities in order), and hypothesis chooses when each presence arrives.
"""

from __future__ import annotations

import tempfile
from collections import deque
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from roster_port import roster
from roster_port.effects import RoutePresence
from roster_port.config import RosterPolicy
from roster_port.roster import Rules
from roster_port.store.base import RosterRow
from roster_port.store.sqlite import SQLiteStore
from roster_port.subscription import PRESENCE_TYPES, Direction, Event

USERS = ["anne@example.com", "bert@example.com", "cleo@example.org"]

send = st.tuples(st.just("send"), st.sampled_from(USERS), st.sampled_from(USERS), st.sampled_from(PRESENCE_TYPES))
remove = st.tuples(st.just("remove"), st.sampled_from(USERS), st.sampled_from(USERS), st.none())
deliver = st.tuples(st.just("deliver"), st.integers(0, 20), st.none(), st.none())
actions = st.lists(st.one_of(send, send, remove, deliver, deliver, deliver), max_size=40)

PAIRS = [(USERS[0], USERS[1]), (USERS[0], USERS[2]), (USERS[1], USERS[2])]
# For each pair, a consistent state at rest to start from, so that short scripts reach every
# cell of the table: who is subscribed to whom, and who has a request pending.
pair_state = st.fixed_dictionaries(
    {"a_to_b": st.booleans(), "b_to_a": st.booleans(), "a_asks": st.booleans(), "b_asks": st.booleans()}
)
initial_states = st.lists(pair_state, min_size=len(PAIRS), max_size=len(PAIRS))


def _subscription(has_to: bool, has_from: bool) -> str:
    return {(False, False): "none", (True, False): "to", (False, True): "from", (True, True): "both"}[
        (has_to, has_from)
    ]


class Network:
    def __init__(self, store: SQLiteStore, rules: Rules) -> None:
        self.store, self.rules = store, rules
        self.channels: dict[tuple[str, str], deque[str]] = {}

    def _route(self, outcome: roster.Outcome) -> None:
        for effect in outcome.effects:
            if isinstance(effect, RoutePresence):
                self.channels.setdefault((effect.sender, effect.to), deque()).append(effect.presence_type)

    def send(self, sender: str, receiver: str, presence_type: str) -> None:
        with self.store.transaction(sender) as txn:
            outcome = roster.subscription(txn, self.rules, receiver, Event(Direction.OUT, presence_type), None)
        if outcome.result["route"]:
            self.channels.setdefault((sender, receiver), deque()).append(presence_type)
        self._route(outcome)

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
        sender, receiver = busy[index % len(busy)]
        presence_type = self.channels[(sender, receiver)].popleft()
        with self.store.transaction(receiver) as txn:
            outcome = roster.subscription(txn, self.rules, sender, Event(Direction.IN, presence_type), None)
        self._route(outcome)
        return True

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

    def subscription(self, user: str, contact: str) -> str:
        with self.store.snapshot(user) as txn:
            row = txn.get(contact)
        return row.subscription if row else "none"


def _run(start, script, rules: Rules) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(str(Path(tmp) / "rosters.sqlite"))
        try:
            network = Network(store, rules)
            network.start_from(start)
            for action, first, second, presence_type in script:
                if action == "send" and first != second:
                    network.send(first, second, presence_type)
                elif action == "remove" and first != second:
                    network.remove(first, second)
                elif action == "deliver":
                    network.deliver(first)
            steps = 0
            while network.deliver(steps):
                steps += 1
                assert steps < 1000, "presences keep bouncing between the users"
            for user in USERS:
                for contact in USERS:
                    if user == contact:
                        continue
                    user_has_to = network.subscription(user, contact) in ("to", "both")
                    contact_has_from = network.subscription(contact, user) in ("from", "both")
                    assert user_has_to == contact_has_from, (user, contact)
        finally:
            store.close()


@settings(max_examples=150, deadline=None)
@given(initial_states, actions)
def test_both_sides_agree_once_everything_is_delivered(start, script):
    _run(start, script, Rules())


@settings(max_examples=60, deadline=None)
@given(initial_states, actions)
def test_both_sides_agree_without_pre_approval_or_auto_replies(start, script):
    _run(start, script, Rules(policy=RosterPolicy(pre_approval=False, auto_unsubscribed=False)))
