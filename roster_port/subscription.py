"""The RFC 6121 subscription state machine, as a table.

Theory of operation
-------------------
User U's stored item for contact C has a subscription state. A subscription presence between
U and C is an *event*: "out X" when U sends presence type X to C, "in X" when C's presence
type X reaches U. `step(state, event)` looks the pair up in `TABLE` and returns the new state
plus what U's server must do about the event: deliver the inbound presence to U's clients,
and/or answer C on U's behalf (an auto-reply).

Two rules keep this file honest:
1. Everything that decides a transition lives here: the table, pre-approval (RFC 6121
   section 3.4) and the odd states stored data can hold. The roster logic (roster.py) turns a
   step into pushes, routed presences and rows; it never looks at states itself.
2. This file does no I/O and knows nothing of JIDs, stores or ejabberd.

The table below is the one in RFC 6121 section A (and shared/reference/rfc6121-subscriptions.md),
row for row, so the two can be read side by side. Cell syntax: the new state, then in
parentheses the flags `deliver`, `auto subscribed`, `auto unsubscribed`, `pre-approve`.

The "auto unsubscribed" answers to an inbound unsubscribe are ejabberd 23.01's reading of
RFC 3921 (RFC 6121 only requires delivery); we behave like ejabberd by default and
`auto_unsubscribed=False` turns them off.

Routing: every outbound presence goes on to C (`Step.route`), except a `subscribed` with no
request pending (N, N+PO, T): a pre-approval when pre-approval is on, and ignored when it is off
(RFC 6121 A.2). ejabberd 23.01 routes that one too; here it is not, so that it can never reach a
C whose own request crosses it and be taken for the answer.

What no table can fix: presences that cross on the wire carry nothing that says which request
they answer, so a `subscribe` crossing C's `unsubscribed`, or C's `subscribed` crossing U's
`unsubscribe`, can leave U and C apart (tests/test_consistency.py, `RACES`, shows each case).

States that only admin commands or old data can produce (`to` with pending out, `from` with
pending in, `both` with either) are folded into the nearest RFC state by `canonical()` before
the look-up: a pending request in a direction that is already subscribed means nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace


class Direction(enum.Enum):
    OUT = "out"  # U sends to C
    IN = "in"  # C's presence reaches U


PRESENCE_TYPES = ("subscribe", "unsubscribe", "subscribed", "unsubscribed")


@dataclass(frozen=True)
class Event:
    direction: Direction
    presence_type: str

    def __post_init__(self) -> None:
        if self.presence_type not in PRESENCE_TYPES:
            raise ValueError(f"{self.presence_type!r} is not a subscription presence type")

    def __str__(self) -> str:
        return f"{self.direction.value} {self.presence_type}"


@dataclass(frozen=True)
class SubState:
    """Subscription state of one roster item: RFC 6121's N/T/F/B with pending flags.

    `approved` is the pre-approval flag of RFC 6121 section 3.4: U has already accepted a
    subscription request that C has not sent yet.
    """

    subscription: str = "none"
    pending_out: bool = False
    pending_in: bool = False
    approved: bool = False

    @property
    def has_to(self) -> bool:
        return self.subscription in ("to", "both")

    @property
    def has_from(self) -> bool:
        return self.subscription in ("from", "both")

    @property
    def name(self) -> str:
        """The RFC's short name: N, N+PO, T+PI, ..."""
        letter = {"none": "N", "to": "T", "from": "F", "both": "B"}[self.subscription]
        return letter + ("+PO" if self.pending_out else "") + ("+PI" if self.pending_in else "")

    @classmethod
    def from_name(cls, name: str, *, approved: bool = False) -> "SubState":
        letter, *flags = name.split("+")
        subscription = {"N": "none", "T": "to", "F": "from", "B": "both"}[letter]
        unknown = set(flags) - {"PO", "PI"}
        if unknown:
            raise ValueError(f"unknown state flags {unknown} in {name!r}")
        return cls(subscription, "PO" in flags, "PI" in flags, approved)


def canonical(state: SubState) -> SubState:
    """Fold a state that only odd data can hold into the RFC state it means."""
    return replace(
        state,
        pending_out=state.pending_out and not state.has_to,
        pending_in=state.pending_in and not state.has_from,
        # A pre-approval is only kept while C has no subscription and no request pending.
        approved=state.approved and not state.has_from and not state.pending_in,
    )


@dataclass(frozen=True)
class Cell:
    new_state: str
    deliver: bool = False
    auto_reply: str | None = None  # presence type U's server sends to C on U's behalf
    pre_approve: bool = False


_COLUMNS = tuple(
    Event(direction, presence_type)
    for direction in (Direction.OUT, Direction.IN)
    for presence_type in PRESENCE_TYPES
)

_TABLE_TEXT = """
state   | out subscribe | out unsubscribe | out subscribed   | out unsubscribed | in subscribe            | in unsubscribe                         | in subscribed   | in unsubscribed
N       | N+PO          | N               | N (pre-approve)  | N                | N+PI (deliver)          | N                                      | N               | N
N+PO    | N+PO          | N               | N+PO (pre-approve) | N+PO           | N+PO+PI (deliver)       | N+PO                                   | T (deliver)     | N (deliver)
N+PI    | N+PO+PI       | N+PI            | F                | N                | N+PI                    | N (deliver, auto unsubscribed)         | N+PI            | N+PI
N+PO+PI | N+PO+PI       | N+PI            | F+PO             | N+PO             | N+PO+PI                 | N+PO (deliver, auto unsubscribed)      | T+PI (deliver)  | N+PI (deliver)
T       | T             | N               | T (pre-approve)  | T                | T+PI (deliver)          | T                                      | T               | N (deliver)
T+PI    | T+PI          | N+PI            | B                | T                | T+PI                    | T (deliver, auto unsubscribed)         | T+PI            | N+PI (deliver)
F       | F+PO          | F               | F                | N                | F (auto subscribed)     | N (deliver, auto unsubscribed)         | F               | F
F+PO    | F+PO          | F               | F+PO             | N+PO             | F+PO (auto subscribed)  | N+PO (deliver, auto unsubscribed)      | B (deliver)     | F (deliver)
B       | B             | F               | B                | T                | B (auto subscribed)     | T (deliver, auto unsubscribed)         | B               | F (deliver)
"""

_FLAGS = {"deliver", "auto subscribed", "auto unsubscribed", "pre-approve"}


def _parse_cell(text: str) -> Cell:
    state, _, flag_text = text.partition("(")
    flags = {flag.strip() for flag in flag_text.rstrip(")").split(",") if flag.strip()}
    if flags - _FLAGS:
        raise ValueError(f"unknown flags {flags - _FLAGS} in cell {text!r}")
    auto = [flag.removeprefix("auto ") for flag in flags if flag.startswith("auto ")]
    return Cell(
        new_state=state.strip(),
        deliver="deliver" in flags,
        auto_reply=auto[0] if auto else None,
        pre_approve="pre-approve" in flags,
    )


def _parse_table(text: str) -> dict[tuple[str, Event], Cell]:
    header, *rows = [line for line in text.strip().splitlines()]
    columns = [column.strip() for column in header.split("|")[1:]]
    if columns != [str(event) for event in _COLUMNS]:
        raise ValueError(f"table columns {columns} are not {list(map(str, _COLUMNS))}")
    table = {}
    for row in rows:
        state, *cells = [cell.strip() for cell in row.split("|")]
        for event, cell in zip(_COLUMNS, cells, strict=True):
            table[(state, event)] = _parse_cell(cell)
    return table


TABLE: dict[tuple[str, Event], Cell] = _parse_table(_TABLE_TEXT)
STATES: tuple[str, ...] = tuple(dict.fromkeys(state for state, _ in TABLE))
EVENTS: tuple[Event, ...] = _COLUMNS


# When the stored state shows an inbound presence applied already, so that one changing nothing
# is delivered all the same with `mutual_rows` or `replayed` (step()). A row of RFC 6121 A.3's
# "deliver" cells, read backwards: the state each delivered presence leaves.
APPLIED: dict[str, Callable[[SubState], bool]] = {
    "subscribe": lambda state: state.pending_in,  # C's request is pending
    "subscribed": lambda state: state.has_to,  # U is subscribed to C
    "unsubscribe": lambda state: not state.has_from and not state.pending_in,  # C has no sub
    "unsubscribed": lambda state: not state.has_to and not state.pending_out,  # U has none
}


@dataclass(frozen=True)
class Step:
    """What one event does to one roster item."""

    old: SubState
    new: SubState
    deliver: bool  # deliver the inbound presence to U's clients
    auto_reply: str | None  # presence type to send to C on U's behalf, if any
    route: bool  # for outbound events: whether U's presence may go on to C

    @property
    def changed(self) -> bool:
        return self.new != self.old

    @property
    def gained_from(self) -> bool:
        return self.new.has_from and not self.old.has_from

    @property
    def lost_from(self) -> bool:
        return self.old.has_from and not self.new.has_from


def step(
    state: SubState,
    event: Event,
    *,
    pre_approval: bool = True,
    auto_unsubscribed: bool = True,
    mutual_rows: bool = False,
    replayed: bool = False,
) -> Step:
    """Apply `event` to the item in `state`. Total: every stored state and event has an answer.

    `replayed`: the shim sends an inbound presence again because it never got the first answer
    (docs/protocol.md, `replay`); one the stored state shows applied already is delivered.

    `mutual_rows` is for operators' schemas where one row is read into two rosters (one
    friendship row for two people, or a directed `follows` row, which is the follower's `to`
    and the followee's `from`): there the contact's own write has already changed the user's
    state when the contact's presence reaches the user (a subscribe made the request pending, a
    subscribed granted the subscription, an unsubscribe took `from` away, an unsubscribed took
    `to` away), and the table would drop it as a repeat; with `mutual_rows` it is delivered all
    the same (APPLIED), so the user's clients see the request, approval or cancellation live.
    """
    old = canonical(state)
    cell = TABLE[(old.name, event)]
    new = SubState.from_name(cell.new_state, approved=old.approved)
    deliver, auto_reply, route = cell.deliver, cell.auto_reply, True

    if cell.pre_approve:
        # `subscribed` with no request pending (N, N+PO, T) is never routed. With pre-approval
        # it is U's own state, and C learns of it by subscribing. Without pre-approval the
        # server ignores it: RFC 6121 A.2 says a `subscribed` that changes no state SHOULD NOT
        # be routed (3.1.5 approves a *pending* request; 3.4 makes a request-less one a
        # pre-approval, and only for a server that offers it). Routed, it would reach C as an
        # approval: a C whose own `subscribe` is on its way (N+PO, crossing it) would take it
        # for the answer and move to T while U, receiving that subscribe next, is N+PI.
        # ejabberd 23.01 routes it (its c2s routes every subscription presence).
        route = False
        if pre_approval:
            new = replace(new, approved=True)
    elif event == Event(Direction.OUT, "unsubscribed"):
        new = replace(new, approved=False)
    elif event == Event(Direction.IN, "subscribe") and old.approved and not old.pending_in:
        # RFC 6121 3.4: C asks for what U pre-approved. Answer for U, as if U had approved now.
        approval = TABLE[(new.name, Event(Direction.OUT, "subscribed"))]
        new = SubState.from_name(approval.new_state)
        deliver, auto_reply = False, "subscribed"

    if (mutual_rows or replayed) and not deliver and event.direction is Direction.IN and new == old:
        # The stored state, unchanged by the presence, shows it applied already (APPLIED).
        # With `mutual_rows` the contact's own write did it: it changed the row this roster
        # reads too. With `replayed` our first answer did, and its delivery went with that
        # answer. Either way it is delivered, as the contact sent it (a client shown a presence
        # twice loses nothing; one never shown it keeps a stale request or subscription on
        # screen), and nothing else happens: the push and the presences that change implies
        # belong to the write that made it (for the contact's write, the change feed reports
        # it to this user's sessions: docs/mappings.md, "Rows read into two rosters").
        deliver = APPLIED[event.presence_type](new)
    if auto_reply == "unsubscribed" and not auto_unsubscribed:
        auto_reply = None
    return Step(old=old, new=canonical(new), deliver=deliver, auto_reply=auto_reply, route=route)
