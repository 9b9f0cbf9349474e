"""The RFC 6121 state machine, cell by cell, plus pre-approval and the states odd data holds.

The expected table here is a second transcription of RFC 6121's tables (and of
shared/reference/rfc6121-subscriptions.md), written independently of the one in
roster_port/subscription.py, so a typo in either shows up as a failing cell.
"""

from __future__ import annotations

import pytest

from roster_port.subscription import (
    EVENTS,
    PRESENCE_TYPES,
    STATES,
    Direction,
    Event,
    SubState,
    canonical,
    step,
)

D, AS, AU = "deliver", "auto subscribed", "auto unsubscribed"

# state: [out subscribe, out unsubscribe, out subscribed, out unsubscribed,
#         in subscribe, in unsubscribe, in subscribed, in unsubscribed]
# Each cell: (new state, flags). The pre-approval cells are listed as plain no-ops here and
# tested on their own below, with pre-approval off and on.
EXPECTED = {
    "N": [("N+PO",), ("N",), ("N",), ("N",), ("N+PI", D), ("N",), ("N",), ("N",)],
    "N+PO": [("N+PO",), ("N",), ("N+PO",), ("N+PO",), ("N+PO+PI", D), ("N+PO",), ("T", D), ("N", D)],
    "N+PI": [("N+PO+PI",), ("N+PI",), ("F",), ("N",), ("N+PI",), ("N", D, AU), ("N+PI",), ("N+PI",)],
    "N+PO+PI": [("N+PO+PI",), ("N+PI",), ("F+PO",), ("N+PO",), ("N+PO+PI",), ("N+PO", D, AU), ("T+PI", D), ("N+PI", D)],
    "T": [("T",), ("N",), ("T",), ("T",), ("T+PI", D), ("T",), ("T",), ("N", D)],
    "T+PI": [("T+PI",), ("N+PI",), ("B",), ("T",), ("T+PI",), ("T", D, AU), ("T+PI",), ("N+PI", D)],
    "F": [("F+PO",), ("F",), ("F",), ("N",), ("F", AS), ("N", D, AU), ("F",), ("F",)],
    "F+PO": [("F+PO",), ("F",), ("F+PO",), ("N+PO",), ("F+PO", AS), ("N+PO", D, AU), ("B", D), ("F", D)],
    "B": [("B",), ("F",), ("B",), ("T",), ("B", AS), ("T", D, AU), ("B",), ("F", D)],
}

COLUMNS = [Event(direction, kind) for direction in Direction for kind in PRESENCE_TYPES]
# `subscribed` with no request pending: a pre-approval, or, without pre-approval, ignored and
# not routed (RFC 6121 A.2: a `subscribed` that changes no state SHOULD NOT be routed). Every
# other outbound presence of the table is routed.
IGNORED_APPROVALS = {(state, Event(Direction.OUT, "subscribed")) for state in ("N", "N+PO", "T")}
CELLS = [
    pytest.param(state, event, cell, id=f"{state}-{event}")
    for state, row in EXPECTED.items()
    for event, cell in zip(COLUMNS, row, strict=True)
]


def test_the_table_has_every_state_and_event():
    assert set(STATES) == set(EXPECTED)
    assert list(EVENTS) == COLUMNS
    assert len(CELLS) == 72


@pytest.mark.parametrize("state, event, cell", CELLS)
def test_cell(state, event, cell):
    new_state, *flags = cell
    moved = step(SubState.from_name(state), event, pre_approval=False)
    assert moved.new == SubState.from_name(new_state)
    assert moved.deliver == (D in flags)
    expected_reply = "subscribed" if AS in flags else "unsubscribed" if AU in flags else None
    assert moved.auto_reply == expected_reply
    assert moved.route is ((state, event) not in IGNORED_APPROVALS)
    assert moved.changed == (new_state != state)


@pytest.mark.parametrize("state", ["N", "N+PO", "N+PO+PI", "T+PI", "F", "B"])
def test_inbound_unsubscribe_auto_reply_can_be_turned_off(state):
    moved = step(SubState.from_name(state), Event(Direction.IN, "unsubscribe"), auto_unsubscribed=False)
    assert moved.auto_reply is None


# --- Pre-approval (RFC 6121 3.4) --------------------------------------------------------------

OUT_SUBSCRIBED = Event(Direction.OUT, "subscribed")
OUT_UNSUBSCRIBED = Event(Direction.OUT, "unsubscribed")
IN_SUBSCRIBE = Event(Direction.IN, "subscribe")


@pytest.mark.parametrize("state", ["N", "N+PO", "T"])
def test_out_subscribed_without_request_pre_approves_and_is_not_routed(state):
    moved = step(SubState.from_name(state), OUT_SUBSCRIBED)
    assert moved.new == SubState.from_name(state, approved=True)
    assert moved.route is False
    assert moved.changed


@pytest.mark.parametrize("state, after", [("N", "F"), ("N+PO", "F+PO"), ("T", "B")])
def test_subscribe_to_a_pre_approved_item_is_answered_for_the_user(state, after):
    moved = step(SubState.from_name(state, approved=True), IN_SUBSCRIBE)
    assert moved.new == SubState.from_name(after)  # the approval is used up
    assert moved.deliver is False
    assert moved.auto_reply == "subscribed"
    assert moved.gained_from


@pytest.mark.parametrize("state", ["N", "N+PO", "T"])
def test_out_unsubscribed_cancels_a_pre_approval(state):
    moved = step(SubState.from_name(state, approved=True), OUT_UNSUBSCRIBED)
    assert moved.new.approved is False
    assert step(moved.new, IN_SUBSCRIBE).deliver is True


@pytest.mark.parametrize("state", ["N", "N+PO", "T"])
def test_without_pre_approval_an_approval_nobody_asked_for_is_ignored_and_not_routed(state):
    """RFC 6121 A.2: a `subscribed` that changes no state SHOULD NOT be routed; 3.1.5 routes
    the approval of a pending request, and 3.4 makes a request-less one a pre-approval only on
    a server that offers pre-approval. Routed, it would reach a contact whose own `subscribe`
    is on its way (N+PO there) as the answer: the contact would be T while U, getting that
    subscribe next, is N+PI (the consistency property found it; ejabberd 23.01 routes it)."""
    moved = step(SubState.from_name(state), OUT_SUBSCRIBED, pre_approval=False)
    assert moved.new == SubState.from_name(state) and not moved.changed
    assert moved.route is False
    assert moved.deliver is False and moved.auto_reply is None
    # The contact's request, when it comes, is shown to U as usual.
    asked = step(moved.new, IN_SUBSCRIBE, pre_approval=False)
    assert asked.deliver is True and asked.new.pending_in and asked.auto_reply is None


@pytest.mark.parametrize("state", ["N+PI", "N+PO+PI", "T+PI"])
def test_without_pre_approval_the_approval_of_a_pending_request_is_routed(state):
    moved = step(SubState.from_name(state), OUT_SUBSCRIBED, pre_approval=False)
    assert moved.route is True and moved.gained_from


@pytest.mark.parametrize("state", ["N", "N+PO", "T"])
def test_a_pre_approval_survives_unrelated_events(state):
    approved = SubState.from_name(state, approved=True)
    assert step(approved, Event(Direction.IN, "unsubscribed")).new.approved
    assert step(approved, Event(Direction.OUT, "subscribe")).new.approved


# --- States only odd data can hold ------------------------------------------------------------

ALL_STORED_STATES = [
    SubState(subscription, pending_out, pending_in, approved)
    for subscription in ("none", "to", "from", "both")
    for pending_out in (False, True)
    for pending_in in (False, True)
    for approved in (False, True)
]


@pytest.mark.parametrize("state", ALL_STORED_STATES, ids=lambda s: f"{s.name}{'+A' if s.approved else ''}")
def test_every_stored_combination_has_an_answer_for_every_event(state):
    for event in EVENTS:
        for pre_approval in (False, True):
            moved = step(state, event, pre_approval=pre_approval)
            assert canonical(moved.new) == moved.new
            assert moved.new.name in STATES


def test_to_with_pending_out_is_treated_as_to():
    assert canonical(SubState("to", pending_out=True)) == SubState("to")
    assert canonical(SubState("from", pending_in=True)) == SubState("from")
    assert step(SubState("both", True, True), Event(Direction.OUT, "unsubscribe")).new == SubState("from")


@pytest.mark.parametrize(
    "state, event",
    [(state, IN_SUBSCRIBE) for state in ("N+PI", "N+PO+PI", "T+PI")]
    + [(state, Event(Direction.IN, "subscribed")) for state in ("T", "T+PI", "B")],
)
def test_with_mutual_rows_a_repeat_is_delivered(state, event):
    repeated = step(SubState.from_name(state), event)
    assert repeated.deliver is False and not repeated.changed
    mutual = step(SubState.from_name(state), event, mutual_rows=True)
    assert mutual.deliver is True and mutual.new == repeated.new


# --- Rows read into two rosters (mutual_rows) ---------------------------------------------------
# With one row read into two rosters (a friendship, or a directed follows row: the follower's
# `to`, the followee's `from`), the contact's own write has already moved the user's state when
# the contact's presence arrives, so the table sees a repeat. Per inbound column, the states
# whose unchanged cell is then delivered as well (written from RFC 6121 A.3's delivered cells:
# the state each leaves), every other part of every cell as in EXPECTED.
MUTUAL_ALSO_DELIVERED = {
    "subscribe": {"N+PI", "N+PO+PI", "T+PI"},  # the request is pending already
    "subscribed": {"T", "T+PI", "B"},  # the user is subscribed already
    "unsubscribe": {"N", "N+PO", "T"},  # the contact has no subscription, no request left
    "unsubscribed": {"N", "N+PI", "F"},  # the user has no subscription, no request out left
}
MUTUAL_CELLS = [
    pytest.param(state, event, cell, id=f"mutual-{state}-{event}")
    for state, row in EXPECTED.items()
    for event, cell in zip(COLUMNS, row, strict=True)
    if event.direction is Direction.IN
]


@pytest.mark.parametrize("state, event, cell", MUTUAL_CELLS)
def test_cell_with_mutual_rows(state, event, cell):
    new_state, *flags = cell
    moved = step(SubState.from_name(state), event, pre_approval=False, mutual_rows=True)
    also = state in MUTUAL_ALSO_DELIVERED[event.presence_type]
    assert moved.new == SubState.from_name(new_state)
    assert moved.deliver == (D in flags or also)
    expected_reply = "subscribed" if AS in flags else "unsubscribed" if AU in flags else None
    assert moved.auto_reply == expected_reply
    if also:
        # Delivered only: the contact's write changed the row, and its push and presences
        # come with that change (the change feed), never a second time from here.
        assert not moved.changed and not moved.lost_from and not moved.gained_from


def test_mutual_rows_delivers_the_cancellations_of_a_follows_pair():
    """A and B follow each other (B both ways). B unsubscribes: B's write removed the row
    B->A, so A reads T when the unsubscribe arrives; B's unsubscribed removed A->B: A reads F."""
    unsubscribe, unsubscribed = Event(Direction.IN, "unsubscribe"), Event(Direction.IN, "unsubscribed")
    for event, state_after_contact_write in ((unsubscribe, "T"), (unsubscribed, "F")):
        plain = step(SubState.from_name(state_after_contact_write), event)
        assert plain.deliver is False  # the bug: dropped as a repeat
        mutual = step(SubState.from_name(state_after_contact_write), event, mutual_rows=True)
        assert mutual.deliver is True and mutual.auto_reply is None and not mutual.changed
