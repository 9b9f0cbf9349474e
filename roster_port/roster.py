"""Roster semantics: one function per operation, in RFC 6121's own words.

Theory of operation
-------------------
Each function receives one user's roster inside an open store transaction (`RosterTxn`) and
the site's rules, reads and writes `RosterRow`s, and returns an `Outcome`: the result map the
shim turns into a hook answer or an IQ result, and the effects it must carry out (pushes,
routed presences). Refusals are `StanzaError`s, XMPP errors as values the dispatcher sends back.

What this module must never do: I/O of its own (the transaction is its only window on the
world), decide a subscription transition itself (that is subscription.step's job), or touch a
second user's roster (every operation is about the roster of `txn.user` only: the contact's
side of a subscription is changed when the routed presence reaches the contact's own hooks).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .config import Limits, RosterPolicy
from .effects import Effect, Push, RoutePresence, SendPresence, SendUnavailable
from .jid import InvalidJID, bare_jid
from .store.base import OutsideChange, RosterRow, RosterTxn
from .subscription import Direction, Event, SubState, step

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rules:
    """The site's policy and limits, as the configuration gives them."""

    policy: RosterPolicy = RosterPolicy()
    limits: Limits = Limits()


@dataclass
class Outcome:
    result: dict[str, Any] = field(default_factory=dict)
    effects: list[Effect] = field(default_factory=list)


# --- Wire forms -----------------------------------------------------------------------------


def wire_item(row: RosterRow, subscription: str | None = None) -> dict[str, Any]:
    """The item as a client sees it (`<item/>` of jabber:iq:roster)."""
    return {
        "jid": row.contact,
        "name": row.name,
        "subscription": subscription or row.subscription,
        "ask": "subscribe" if row.pending_out else None,
        "approved": row.approved,
        "groups": list(row.groups),
    }


_ASK_OF_PENDING = {
    (False, False): "none",
    (True, False): "out",
    (False, True): "in",
    (True, True): "both",
}


def ask_of(row: RosterRow) -> str:
    """ejabberd's `ask` value (none/in/out/both) for the pending flags of a row."""
    return _ASK_OF_PENDING[(row.pending_out, row.pending_in)]


def stored_record(row: RosterRow) -> dict[str, Any]:
    """The row as mod_roster's storage API sees it (`#roster{}`), plus what `#roster{}` cannot
    hold (`approved`, `in_roster`), so that writing a record back unchanged changes nothing."""
    return {
        "jid": row.contact,
        "name": row.name,
        "subscription": row.subscription,
        "ask": ask_of(row),
        "groups": list(row.groups),
        "askmessage": row.request_text,
        "approved": row.approved,
        "in_roster": row.in_roster,
    }


# ejabberd's legacy ask values: `subscribe` is a pending outbound request, `unsubscribe` none.
_PENDING_OF_ASK = {
    "none": (False, False),
    "out": (True, False),
    "in": (False, True),
    "both": (True, True),
    "subscribe": (True, False),
    "unsubscribe": (False, False),
}


def row_from_record(record: dict[str, Any], old: RosterRow | None) -> RosterRow:
    """A stored record from mod_roster's API, validated, as a row. Raises bad-request.

    `old` is the row stored for the contact, if any. What a record leaves out keeps its stored
    value: `approved` (ejabberd's `#roster{}` has no field for it), and `in_roster`, which for
    a record that is only an inbound request (none, ask in, no name, no group: what a
    stranger's request reads as) stays as stored, so a read written back is no new item.
    """
    if not isinstance(record, dict):
        raise errors.bad_request("item must be a map")
    contact = contact_jid(record.get("jid"))
    ask = record.get("ask") or "none"
    if type(ask) is not str or ask not in _PENDING_OF_ASK:
        raise errors.bad_request(f"unknown ask value {errors.shown(ask)}")
    subscription = record.get("subscription") or "none"
    if type(subscription) is not str or subscription not in ("none", "to", "from", "both"):
        raise errors.bad_request(f"unknown subscription {errors.shown(subscription)}")
    pending_out, pending_in = _PENDING_OF_ASK[ask]
    request_text = _text(record.get("askmessage"), "askmessage")
    # `#roster{}` cannot hold the request's extended content: a record that keeps the stored
    # request (still pending in, the same text) keeps it, any other loses it.
    keeps_request = (old is not None and old.pending_in and pending_in
                     and old.request_text == request_text)
    name = _text(record.get("name"), "name")
    groups = tuple(_groups(record.get("groups")))
    approved = _flag(record, "approved", old.approved if old else False)
    only_a_request = (subscription, pending_out, pending_in, name, groups) == (
        "none", False, True, "", ())
    kept_in_roster = (old.in_roster if old else False) if only_a_request else True
    return RosterRow(
        contact=contact,
        name=name,
        subscription=subscription,
        pending_out=pending_out,
        pending_in=pending_in,
        approved=approved,
        in_roster=_flag(record, "in_roster", kept_in_roster),
        groups=groups,
        request_text=request_text,
        request_elements=old.request_elements if keeps_request else (),
    )


def _flag(record: dict[str, Any], key: str, default: bool) -> bool:
    value = record.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise errors.bad_request(f"{key} must be true or false")
    return value


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise errors.bad_request(f"{what} must be text")
    return value


def _groups(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(group, str) for group in value):
        raise errors.bad_request("groups must be a list of text")
    return value


def contact_jid(value: Any) -> str:
    """A contact's normalised bare JID, or a bad-request naming what is wrong."""
    if not isinstance(value, str):
        raise errors.bad_request("jid is missing")
    try:
        return bare_jid(value)
    except InvalidJID as exc:
        raise errors.StanzaError("modify", "jid-malformed", f"invalid JID {errors.shown(value)}: {exc}") from None


def state_of(row: RosterRow) -> SubState:
    return SubState(row.subscription, row.pending_out, row.pending_in, row.approved)


def _version(txn: RosterTxn, rules: Rules) -> str | None:
    return txn.version() if rules.policy.versioning else None


# What a partial version ends with. No store's version does: the native stores' are decimal
# counters, a mapped store's derived one a hex digest (an operator's `version` statement must
# not end with it: docs/protocol.md), and the shim's own marks begin with "+".
PARTIAL_VERSION_MARK = "~partial"


def partial_version(ver: str) -> str:
    """`ver` marked as counting changes not pushed yet: a client holding it gets the whole
    roster at its next get, since no store's version, hence no get's answer, is ever equal."""
    return ver + PARTIAL_VERSION_MARK


# --- Roster gets ------------------------------------------------------------------------------


def roster_get(txn: RosterTxn, rules: Rules) -> Outcome:
    """The items of the roster (the `roster_get` hook): never a stranger's pending request."""
    return Outcome({"items": [wire_item(row) for row in txn.rows() if row.in_roster]})


def roster_query(txn: RosterTxn, rules: Rules, client_ver: str | None) -> Outcome:
    """An IQ get: the whole roster, or nothing when the client's version is current."""
    ver = _version(txn, rules)
    if ver is not None and client_ver == ver:
        return Outcome({"items": None, "ver": ver})
    return Outcome({"items": roster_get(txn, rules).result["items"], "ver": ver})


# --- Roster sets ------------------------------------------------------------------------------


def roster_set(txn: RosterTxn, rules: Rules, item: dict[str, Any]) -> Outcome:
    """An IQ set of one item: add or update name and groups, or remove (RFC 6121 2.3, 2.5)."""
    if rules.policy.read_only:
        raise errors.not_allowed("this roster is managed by another application")
    contact = contact_jid(item.get("jid"))
    if contact == txn.user:
        raise errors.not_allowed("a user's own JID cannot be a roster item")
    if item.get("ask") is not None:
        raise errors.bad_request("a roster set must not carry ask")
    if item.get("subscription") == "remove":
        return _remove_item(txn, rules, contact)
    name = _text(item.get("name"), "name")
    groups = _groups(item.get("groups"))
    _check_limits(rules.limits, name, groups)

    row = txn.get(contact)
    if row is None or not row.in_roster:
        if why := _full(txn, rules, request=False):
            raise errors.not_allowed(why)
        row = row or RosterRow(contact, in_roster=False)
    updated = row.evolve(name=name, groups=tuple(groups), in_roster=True)
    if updated == row:
        return Outcome()
    stored = txn.put(updated) or updated
    if not stored.in_roster:
        # The store kept no item (an operator's schema that holds its members only, or no
        # relationship without a request): answered with an error, and the transaction, with
        # whatever part of the write the store did keep, is rolled back. A success pushed as
        # "none" with the old version would leave a ghost item in every client caching by it.
        raise cannot_hold(contact, "roster item")
    return Outcome(effects=[Push(txn.user, wire_item(stored), _version(txn, rules))])


def cannot_hold(contact: str, what: str) -> errors.StanzaError:
    """The refusal of a change the store keeps nothing of (RFC 6120 8.3.3.9 not-allowed, type
    cancel: no retry or other form of the request can succeed; RFC 6121 2.2 answers a roster
    that can take no more items the same way)."""
    return errors.not_allowed(f"{contact} cannot be a {what} here: the operator's roster "
                              "store cannot hold this contact")


def _kept_nothing(stored: RosterRow) -> bool:
    """Whether `put()` read back no row at all (what a store that kept nothing returns)."""
    return not stored.in_roster and state_of(stored) == SubState()


# Characters no name, group or request text may hold: C0 and C1 controls and DEL (NUL among
# them), and the two noncharacters XML 1.0 forbids. A client could not show them, and
# ejabberd's XML encoder would refuse most of them in a roster result.
_FORBIDDEN_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ufffe\uffff]")
# A request text is a presence's status, which XML lets hold tabs and line breaks.
_FORBIDDEN_IN_REQUEST_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")


def _check_text(text: str, what: str) -> None:
    if (found := _FORBIDDEN_CHARACTERS.search(text)) is not None:
        raise errors.bad_request(f"{what} contains the control character U+{ord(found[0]):04X}")


def _full(txn: RosterTxn, rules: Rules, *, request: bool) -> str | None:
    """Why one more roster item (or, `request`, stranger's request) is over its limit, or None.

    Each has its own bound: anyone on any server can mint JIDs to send requests from, and
    they must never take room from the user's own roster.
    """
    if request:
        if txn.count_requests() >= rules.limits.max_pending_requests:
            return f"{rules.limits.max_pending_requests} strangers' requests pending already"
    elif txn.count() >= rules.limits.max_items:
        return f"the roster is full ({rules.limits.max_items} items)"
    return None


def _check_limits(limits: Limits, name: str, groups: list[str] | tuple[str, ...]) -> None:
    if len(name) > limits.max_name_length:
        raise errors.not_acceptable(f"name is longer than {limits.max_name_length} characters")
    _check_text(name, "name")
    if len(set(groups)) != len(groups):
        raise errors.bad_request("an item may not list the same group twice")
    if len(groups) > limits.max_groups:
        raise errors.not_acceptable(f"an item may be in at most {limits.max_groups} groups")
    for group in groups:
        if not group:
            raise errors.not_acceptable("a group name may not be empty")
        if len(group) > limits.max_group_length:
            raise errors.not_acceptable(
                f"group name is longer than {limits.max_group_length} characters"
            )
        _check_text(group, "group name")


def _request_text(status: str | None, limits: Limits) -> str:
    """A subscription request's text as kept: a remote server may send any size, and refusing
    it would lose the request, so it is cut to the limit, and control characters go."""
    if not status:
        return ""
    text = status[: limits.max_status_length]
    if _FORBIDDEN_IN_REQUEST_TEXT.search(text):
        return _FORBIDDEN_IN_REQUEST_TEXT.sub("", text)
    return text


def _request_elements(elements: list[Any], limits: Limits, user: str, contact: str
                      ) -> tuple[str, ...]:
    """A subscription request's elements as kept: a remote server may send any number and
    size, and refusing them would lose the request, so at most `max_request_elements` are
    kept, in order, and an element that is no text or would take the total over
    `max_request_bytes` (UTF-8) is dropped whole (never cut: half an element is no XML)."""
    kept: list[str] = []
    room = limits.max_request_bytes
    dropped = max(0, len(elements) - limits.max_request_elements)
    for element in elements[: limits.max_request_elements]:
        size = len(element.encode("utf-8", errors="replace")) if type(element) is str else None
        if size is None or size > room or _FORBIDDEN_IN_REQUEST_TEXT.search(element):
            dropped += 1
            continue
        kept.append(element)
        room -= size
    if dropped:
        log.warning("%s: the subscription request of %s is kept without %d of its %d elements "
                    "(over [limits] max_request_bytes/max_request_elements, or not text)",
                    user, contact, dropped, len(elements))
    return tuple(kept)


def _cancel_both_directions(user: str, row: RosterRow) -> list[Effect]:
    """What U sends C when C leaves U's roster: cancel U's subscription and C's (RFC 6121 2.5.2)."""
    effects: list[Effect] = []
    if row.subscription in ("from", "both"):
        effects.append(SendUnavailable(user, row.contact))
    if row.subscription in ("to", "both") or row.pending_out:
        effects.append(RoutePresence(user, row.contact, "unsubscribe"))
    if row.subscription in ("from", "both") or row.pending_in:
        effects.append(RoutePresence(user, row.contact, "unsubscribed"))
    return effects


def _remove_item(txn: RosterTxn, rules: Rules, contact: str) -> Outcome:
    row = txn.get(contact)
    if row is None or not row.in_roster:
        raise errors.StanzaError("cancel", "item-not-found", f"{contact} is not in the roster")
    txn.delete(contact)
    push = Push(txn.user, wire_item(row, subscription="remove"), _version(txn, rules))
    return Outcome(effects=[push, *_cancel_both_directions(txn.user, row)])


# --- Subscriptions ----------------------------------------------------------------------------


def subscription(
    txn: RosterTxn,
    rules: Rules,
    contact: str,
    event: Event,
    status: str | None,
    *,
    elements: list[Any] | None = None,
    replayed: bool = False,
) -> Outcome:
    """A subscription presence between U (`txn.user`) and `contact`, in either direction.

    The result says, for an inbound presence, whether to deliver it to U's clients and, for an
    outbound one, whether it may go on to the contact (a pre-approval may not).

    `elements`: an inbound `subscribe`'s request whole (its statuses with their languages, its
    extended content), kept with the pending request when the store can; None when the shim
    sent none (an older shim: the request's text only, as before).

    `replayed`: the shim sends the presence again because it never got the first answer, which
    may have been applied (subscription.step). An inbound one that the stored state shows
    applied is delivered all the same, with a push of the item as it stands: the first
    answer's push went with it. An outbound one needs nothing: applied again, it changes
    nothing and is routed as the first time.
    """
    answer_key = "deliver" if event.direction is Direction.IN else "route"
    if contact == txn.user:
        # A subscription to oneself means nothing (RFC 6121 3: a user's server handles its own
        # presence); never store the user in their own roster.
        return Outcome({answer_key: event.direction is Direction.OUT})
    if rules.policy.read_only:
        # The application owns relationships: nothing changes, nothing is delivered.
        return Outcome({answer_key: False})
    stored = txn.get(contact)
    row = stored if stored is not None else RosterRow(contact, in_roster=False)
    moved = step(
        state_of(row),
        event,
        pre_approval=rules.policy.pre_approval,
        auto_unsubscribed=rules.policy.auto_unsubscribed,
        # Only a contact the store holds can have written a row this roster reads: a stranger's
        # unsubscribe is no repeat of anything (and a store holding no stranger shows no
        # stranger's request pending either).
        mutual_rows=rules.policy.mutual_rows and (stored is not None or txn.holds(contact)),
        replayed=replayed,
    )
    new = moved.new
    if stored is None and new != SubState() and not txn.holds(contact):
        return _not_held(txn, contact, event)  # known before writing: nothing to roll back
    in_roster = row.in_roster or (
        # U acting on C (asking, approving, pre-approving) makes C an item of U's roster.
        event.direction is Direction.OUT
        and (new.subscription != "none" or new.pending_out or new.approved)
    )
    becomes_an_item = in_roster and not row.in_roster
    if becomes_an_item or (stored is None and new != SubState()):  # a new item, or request
        if why := _full(txn, rules, request=not becomes_an_item):
            log.warning("%s: %s; %s with %s not applied", txn.user, why, event, contact)
            return Outcome({answer_key: False})
    inbound_request = event == Event(Direction.IN, "subscribe")
    if not new.pending_in:
        request_text, request_elements = "", ()
    elif not moved.old.pending_in or (
        inbound_request and (status or elements)
        and not row.request_text and not row.request_elements
    ):
        # A new request, kept as it came; or a repeat bringing what the stored request lacks
        # (with mutual rows, the contact's own write stored the request before its presence
        # arrived). Any other repeat keeps the first request, as ejabberd and Prosody do: it
        # writes nothing, so a contact (or a hostile server) repeating its subscribe moves
        # neither the roster's version nor any node's change feed.
        request_text = _request_text(status, rules.limits)
        request_elements = (
            _request_elements(elements, rules.limits, txn.user, contact)
            if inbound_request and elements is not None and txn.keeps_request_elements else ())
    else:
        request_text, request_elements = row.request_text, row.request_elements
    updated = row.evolve(
        subscription=new.subscription,
        pending_out=new.pending_out,
        pending_in=new.pending_in,
        approved=new.approved,
        in_roster=in_roster,
        request_text=request_text,
        request_elements=request_elements,
    )

    effects: list[Effect] = []
    if updated != row:
        if not updated.in_roster and new == SubState():
            txn.delete(contact)  # a stranger's request, denied or withdrawn: forget it
        else:
            updated = txn.put(updated) or updated
            if new != SubState() and _kept_nothing(updated):
                # The store keeps nothing of a request or subscription with this contact.
                return _not_held(txn, contact, event)
        if updated.in_roster and moved.changed:
            effects.append(Push(txn.user, wire_item(updated), _version(txn, rules)))
        elif row.in_roster and not updated.in_roster:
            # A cancellation the store keeps as no row at all: the item is gone.
            effects.append(Push(txn.user, wire_item(updated, "remove"), _version(txn, rules)))
    if replayed and moved.deliver and not moved.changed and updated.in_roster:
        # Applied the first time (only the replay rule delivers what changes no state).
        effects.append(Push(txn.user, wire_item(updated), _version(txn, rules)))
    if moved.auto_reply:
        effects.append(RoutePresence(txn.user, contact, moved.auto_reply))
    if moved.gained_from:
        effects.append(SendPresence(txn.user, contact))
    elif moved.lost_from:
        effects.append(SendUnavailable(txn.user, contact))
    answer = moved.deliver if event.direction is Direction.IN else moved.route
    return Outcome({answer_key: answer}, effects)


def _not_held(txn: RosterTxn, contact: str, event: Event) -> Outcome:
    """A subscription presence whose new state the store keeps nothing of (a contact outside an
    operator's membership): it must not take effect on one side only.

    Outbound, the user's client gets an error presence (StanzaError: the shim answers it, routes
    nothing) and the transaction is rolled back. Inbound, it is not delivered: the user could
    not accept a request nothing records. A request is declined on the user's behalf
    (`unsubscribed`), so that the contact's server does not keep it pending for good.
    """
    if event.direction is Direction.OUT:
        raise cannot_hold(contact, "contact for subscriptions")
    log.info("%s: %s from %s not delivered: the store cannot hold this contact",
             txn.user, event, contact)
    effects: list[Effect] = []
    if event.presence_type == "subscribe":
        effects.append(RoutePresence(txn.user, contact, "unsubscribed"))
    return Outcome({"deliver": False}, effects)


def jid_info(txn: RosterTxn, rules: Rules, contact: str) -> Outcome:
    """`roster_get_jid_info`: subscription, ask and groups of one contact."""
    row = txn.get(contact)
    if row is None:
        return Outcome({"subscription": "none", "ask": "none", "groups": []})
    return Outcome(
        {"subscription": row.subscription, "ask": ask_of(row), "groups": list(row.groups)}
    )


# What one pending_in answer carries of the requests' elements in all: up to
# max_pending_requests requests of max_request_bytes each would not fit in a frame the shim
# reads, and an answer it cannot take would deliver no request at all. Past it, requests go
# with their text only (logged).
PENDING_ELEMENTS_BYTES = 2 * 1024 * 1024


def pending_requests(txn: RosterTxn, rules: Rules) -> Outcome:
    """Inbound requests U has not answered, to re-send at U's first available presence, each
    as it came when the store kept it whole (`request_elements`), otherwise with its text."""
    requests = []
    room = PENDING_ELEMENTS_BYTES
    cut = 0
    for row in txn.rows():
        if not row.pending_in:
            continue
        request: dict[str, Any] = {"from": row.contact, "status": row.request_text}
        if row.request_elements:
            size = sum(len(element.encode("utf-8", errors="replace"))
                       for element in row.request_elements)
            if size <= room:
                request["request_elements"] = list(row.request_elements)
                room -= size
            else:
                cut += 1
        requests.append(request)
    if cut:
        log.warning("%s: %d pending requests re-sent with their text only: their elements "
                    "would take the answer over %d bytes", txn.user, cut, PENDING_ELEMENTS_BYTES)
    return Outcome({"requests": requests})


def remove_user(txn: RosterTxn, rules: Rules) -> Outcome:
    """The account is gone: cancel every subscription both ways, then drop the roster."""
    if rules.policy.read_only:
        # The application owns relationships: deleting the XMPP account leaves them alone.
        log.info("%s: account removed; read-only roster left as it is", txn.user)
        return Outcome()
    effects = [
        effect
        for row in txn.rows()
        for effect in _cancel_both_directions(txn.user, row)
        if not isinstance(effect, SendUnavailable)  # the user's sessions are already gone
    ]
    txn.delete_all()
    return Outcome(effects=effects)


# --- Changes made outside XMPP ---------------------------------------------------------------


def outside_changes(txn: RosterTxn, rules: Rules, changes: list[OutsideChange]) -> list[Effect]:
    """What U's clients and contacts must learn of rows another application changed.

    `changes` are about `txn.user`, oldest first, as one read of the change feed reported
    them; `txn` shows the rows as they are now. Each contact touched is pushed once, as it
    stands now (or removed), and the presence consequences follow from the subscription before
    the first change and after the last.

    The pushes carry the version read now, unless it may count a change this batch does not
    push: one committed after the feed's read (`txn.logged_after`: another application's or
    node's, pushed by a later batch, or this node's own, pushed by its response, maybe after
    this). A client keeping that version would be told "current" at its next get and miss the
    change for good, so the pushes then carry it marked partial (`partial_version`), which no
    get answers as current; the later push carries a version of its own.
    """
    first_old: dict[str, str | None] = {}
    for change in changes:
        first_old.setdefault(change.contact, change.old_subscription)
    # Read before asking the log: whatever the version counts, the log shows too.
    ver = _version(txn, rules)
    if ver is not None and changes and txn.logged_after(changes[-1].read_at):
        ver = partial_version(ver)
    effects: list[Effect] = []
    for contact, old_subscription in first_old.items():
        row = txn.get(contact)
        if row is not None and row.in_roster:
            effects.append(Push(txn.user, wire_item(row), ver))
        elif old_subscription is not None:
            gone = RosterRow(contact)
            effects.append(Push(txn.user, wire_item(gone, subscription="remove"), ver))
        had_from = old_subscription in ("from", "both")
        has_from = row is not None and row.subscription in ("from", "both")
        if has_from and not had_from:
            effects.append(SendPresence(txn.user, contact))
        elif had_from and not has_from:
            effects.append(SendUnavailable(txn.user, contact))
    return effects


# --- mod_roster's storage API (admin commands, XEP-0227) ------------------------------------


def store_get_roster(txn: RosterTxn, rules: Rules) -> Outcome:
    return Outcome({"items": [stored_record(row) for row in txn.rows()]})


def store_get_item(txn: RosterTxn, rules: Rules, contact: str) -> Outcome:
    row = txn.get(contact)
    return Outcome({"item": stored_record(row) if row else None})


def store_set_item(txn: RosterTxn, rules: Rules, record: dict[str, Any]) -> Outcome:
    """Write an item as an administrator gives it: any state, no state machine, no routing."""
    if rules.policy.read_only:
        raise errors.not_allowed("this roster is managed by another application")
    if not isinstance(record, dict):
        raise errors.bad_request("item must be a map")
    old = txn.get(contact_jid(record.get("jid")))
    row = row_from_record(record, old)
    _check_limits(rules.limits, row.name, row.groups)
    # Kept as a request's text is on the presence path, so that what an export holds (stock
    # ejabberd's, or rows stored before a lower limit) can be imported, and read back as is.
    row = row._replace(request_text=_request_text(row.request_text, rules.limits))
    if row.contact == txn.user:
        raise errors.not_allowed("a user's own JID cannot be a roster item")
    if (row.in_roster and not (old and old.in_roster)) or old is None:  # a new item, or request
        if why := _full(txn, rules, request=not row.in_roster):
            raise errors.not_allowed(why)
    if old == row:
        return Outcome({"ver": _version(txn, rules)})
    stored = txn.put(row) or row
    if row.in_roster and not stored.in_roster:
        raise cannot_hold(row.contact, "roster item")  # rolled back, as for a roster set
    ver = _version(txn, rules)
    if stored.in_roster:
        return Outcome({"ver": ver}, [Push(txn.user, wire_item(stored), ver)])
    if old is not None and old.in_roster:
        return Outcome({"ver": ver}, [Push(txn.user, wire_item(stored, "remove"), ver)])
    return Outcome({"ver": ver})  # a stranger's request: no item to push


def store_del_item(txn: RosterTxn, rules: Rules, contact: str) -> Outcome:
    if rules.policy.read_only:
        raise errors.not_allowed("this roster is managed by another application")
    row = txn.get(contact)
    if row is None:
        return Outcome({"ver": _version(txn, rules)})
    txn.delete(contact)
    ver = _version(txn, rules)
    effects = [Push(txn.user, wire_item(row, subscription="remove"), ver)] if row.in_roster else []
    return Outcome({"ver": ver}, effects)


def store_remove_user(txn: RosterTxn, rules: Rules) -> Outcome:
    txn.delete_all()
    return Outcome()


def store_read_version(txn: RosterTxn, rules: Rules) -> Outcome:
    return Outcome({"ver": _version(txn, rules)})
