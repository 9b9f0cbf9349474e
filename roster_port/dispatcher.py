"""The dispatcher: a request frame in, a response frame out.

Theory of operation
-------------------
`Dispatcher.accept(event, now)` takes one framing event (a frame, or an oversized frame that
was skipped) and decodes the request. What needs no store (hello, ping, a request refused
before its op runs) is answered there and then (`Answer`); anything else becomes a `Job`: the
request, the user it is about (the key that orders it), the operation and its deadline.
`Dispatcher.run(job, store, now)` then opens one store transaction on the user, runs the roster
function the `OPERATIONS` table names for the op, and encodes the response: the result with its
effects, or an error. A job whose deadline has passed is answered `timeout` without touching
the store; otherwise the store waits (for a lock, a connection) no longer than what is left of
the deadline (`_store_timeout`), so that a store held up answers `store_unavailable` while the
shim still waits. `handle(event)` does both in one go (the serial path of tests and tools).

Neither raises: every failure becomes an error response (or, when no request id can be read, a
log line and no response). The dispatcher knows nothing of threads or pipes: the stdio loop
(server.py) decides where jobs run, and guarantees that one user's jobs run one at a time in
the order accepted. The clock is an argument, so deadlines are tested without waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import PROTOCOL_VERSIONS, __version__, roster
from .errors import ProtocolError, StanzaError, shown
from .framing import Frame, FrameEvent, OversizedFrame
from .jid import InvalidJID, bare_jid
from .metrics import ProgramMetrics
from .messages import (
    Request,
    RequestError,
    decode_request,
    encode_error,
    encode_notification,
    encode_response,
    recover_id,
)
from .roster import Outcome, Rules
from .store.base import ChangeFeed, OutsideChange, RosterStore, RosterTxn, StoreError, StoreUnavailable
from .subscription import PRESENCE_TYPES, Direction, Event

log = logging.getLogger(__name__)

Handler = Callable[[RosterTxn, Rules, dict[str, Any]], Outcome]


@dataclass(frozen=True)
class Operation:
    handler: Handler
    # Whether the request opens a read-modify-write transaction (a lock on the user's roster)
    # rather than a snapshot: a bool, or a function of the args when it depends on them.
    writes: bool | Callable[[dict[str, Any]], bool]
    # A subscription presence: the shim has routed it (or dropped it and delivers it later),
    # so it is applied even after its deadline and even beyond a user's admission bound.
    # Refusing it would leave the pair subscribed on one side only; run late, its effects
    # are carried out by the shim as for any late answer.
    must_run: bool = False

    def writes_for(self, args: dict[str, Any]) -> bool:
        return self.writes(args) if callable(self.writes) else self.writes


def _text_arg(args: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = args.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError("bad_request", f"argument {key!r} must be text")
    return value


def _contact_arg(args: dict[str, Any]) -> str:
    _text_arg(args, "contact")
    return roster.contact_jid(args["contact"])


def _presence_type_arg(args: dict[str, Any]) -> str:
    presence_type = _text_arg(args, "type")
    if presence_type not in PRESENCE_TYPES:
        raise ProtocolError("bad_request", f"type must be one of {PRESENCE_TYPES}")
    return presence_type


def _request_elements_arg(args: dict[str, Any]) -> list[Any] | None:
    """An inbound subscribe's request whole (docs/protocol.md), or None when the shim sent
    none. Not a list: logged and taken as a request without elements, since refusing the
    presence would lose the request; its entries are bounded by roster.subscription."""
    elements = args.get("request_elements")
    if elements is None or isinstance(elements, list):
        return elements
    log.warning("request_elements of a subscription from %s is %s, not a list: ignored",
                shown(args.get("contact")), type(elements).__name__)
    return []


def _subscription_handler(direction: Direction) -> Handler:
    def handle(txn: RosterTxn, rules: Rules, args: dict[str, Any]) -> Outcome:
        event = Event(direction, _presence_type_arg(args))
        replay = args.get("replay", False)
        if type(replay) is not bool:
            raise ProtocolError("bad_request", "replay must be true or false")
        # An outbound request is routed as it came (the shim keeps it in its journal); only
        # the contact's server keeps it.
        elements = _request_elements_arg(args) if direction is Direction.IN else None
        return roster.subscription(
            txn, rules, _contact_arg(args), event, _text_arg(args, "status", optional=True),
            elements=elements, replayed=replay,
        )

    return handle


def _roster_iq(txn: RosterTxn, rules: Rules, args: dict[str, Any]) -> Outcome:
    """The jabber:iq:roster rules a client expects (RFC 6121 2.1.5, 2.3.3)."""
    iq_type = _text_arg(args, "type")
    items = args.get("items") or []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ProtocolError("bad_request", "items must be a list of maps")
    requester = _text_arg(args, "requester", optional=True)
    if requester is not None and requester != txn.user and args.get("remote_access") is not True:
        raise StanzaError("auth", "forbidden", "a user may only read and change their own roster")
    if iq_type == "get":
        if items:
            raise StanzaError("modify", "bad-request", "a roster get carries no items")
        return roster.roster_query(txn, rules, _text_arg(args, "ver", optional=True))
    if iq_type != "set":
        raise ProtocolError("bad_request", "type must be get or set")
    if len(items) != 1:
        raise StanzaError("modify", "bad-request", "a roster set carries exactly one item")
    if args.get("access", "allow") != "allow":
        raise StanzaError("cancel", "not-allowed", "roster changes are not allowed for this user")
    return roster.roster_set(txn, rules, items[0])


def _store_set_item(txn: RosterTxn, rules: Rules, args: dict[str, Any]) -> Outcome:
    item = args.get("item")
    if not isinstance(item, dict):
        raise ProtocolError("bad_request", "argument 'item' must be a map")
    return roster.store_set_item(txn, rules, item)


OPERATIONS: dict[str, Operation] = {
    "roster_get": Operation(lambda txn, rules, args: roster.roster_get(txn, rules), writes=False),
    # A roster get only reads: no lock, so it never waits for (nor delays) a write.
    "roster_iq": Operation(_roster_iq, writes=lambda args: args.get("type") != "get"),
    "in_subscription": Operation(_subscription_handler(Direction.IN), writes=True, must_run=True),
    "out_subscription": Operation(_subscription_handler(Direction.OUT), writes=True,
                                  must_run=True),
    "jid_info": Operation(
        lambda txn, rules, args: roster.jid_info(txn, rules, _contact_arg(args)), writes=False
    ),
    "pending_in": Operation(
        lambda txn, rules, args: roster.pending_requests(txn, rules), writes=False
    ),
    "remove_user": Operation(lambda txn, rules, args: roster.remove_user(txn, rules), writes=True),
    "store_get_roster": Operation(
        lambda txn, rules, args: roster.store_get_roster(txn, rules), writes=False
    ),
    "store_get_item": Operation(
        lambda txn, rules, args: roster.store_get_item(txn, rules, _contact_arg(args)),
        writes=False,
    ),
    "store_set_item": Operation(_store_set_item, writes=True),
    "store_del_item": Operation(
        lambda txn, rules, args: roster.store_del_item(txn, rules, _contact_arg(args)),
        writes=True,
    ),
    "store_remove_user": Operation(
        lambda txn, rules, args: roster.store_remove_user(txn, rules), writes=True
    ),
    "store_read_version": Operation(
        lambda txn, rules, args: roster.store_read_version(txn, rules), writes=False
    ),
}


# What a request's store scope is given of its deadline: a little less, so that the answer
# is written before the shim stops waiting (the program counts from when it read the frame).
ANSWER_MARGIN_S = 0.05
# Even a request with almost no time left may run what needs no waiting.
MIN_STORE_TIMEOUT_S = 0.01


def _store_timeout(deadline: float | None, now: float) -> float | None:
    """How long the store may wait for a job (a lock, a connection): what is left of its
    deadline; None (the store's own bounds) without one, or past it (work that must run)."""
    if deadline is None or now >= deadline:
        return None
    return max(MIN_STORE_TIMEOUT_S, deadline - now - ANSWER_MARGIN_S)


def _deadline(args: dict[str, Any], now: float) -> float | None:
    """When the shim stops waiting for the answer: `timeout_ms` after `now` (the moment the
    frame was read), or None for a request without one (tools, tests)."""
    timeout_ms = args.get("timeout_ms")
    if timeout_ms is None:
        return None
    if type(timeout_ms) is not int or timeout_ms < 0:
        raise ProtocolError("bad_request", "timeout_ms must be a non-negative integer")
    return now + timeout_ms / 1000


def _head_of(event: FrameEvent) -> str:
    raw = event.head if isinstance(event, OversizedFrame) else event.payload
    return raw[:32].hex()


@dataclass(frozen=True)
class Job:
    """A request to run in a store transaction on `user`'s roster."""

    request: Request
    user: str  # normalised: the key that orders a user's jobs
    operation: Operation
    deadline: float | None  # on the clock given to accept(); None: no deadline


@dataclass(frozen=True)
class Answer:
    """A request answered without the store (or a frame that gets no answer: None)."""

    payload: bytes | None


class Dispatcher:
    def __init__(self, store: RosterStore, rules: Rules) -> None:
        self.store = store
        self.rules = rules
        self.greeted = False
        self.host: str | None = None  # the virtual host the shim serves, from its hello
        self.origin: str | None = None  # the ejabberd node, from the hello: stamps our writes
        self.feed: ChangeFeed | None = None  # opened when the shim's hello asks for changes
        # The largest frame the shim reads (from its hello): no answer may be longer.
        self.max_response_bytes: int | None = None
        # What a ping reports besides "the loop reads and answers" (the server's counts).
        self.status: Callable[[], dict[str, Any]] = dict
        # This program's own figures, for the shim's `metrics` request (metrics.py).
        self.metrics = ProgramMetrics()

    def handle(self, event: FrameEvent, now: float = 0.0) -> bytes | None:
        """The response payload for one framing event, or None when there is none to send:
        accept() and run() in one go, on the dispatcher's own store."""
        accepted = self.accept(event, now)
        if isinstance(accepted, Answer):
            return accepted.payload
        return self.run(accepted, self.store, now)

    def accept(self, event: FrameEvent, now: float) -> Answer | Job:
        try:
            return self._accept(event, now)
        except Exception:  # noqa: BLE001 - nothing a frame holds may end the process
            log.exception("a frame could not be answered (first bytes %s)", _head_of(event))
            return Answer(None)

    def _accept(self, event: FrameEvent, now: float) -> Answer | Job:
        if isinstance(event, OversizedFrame):
            request_id = recover_id(event.head)
            message = f"frame of {event.length} bytes is over the limit"
            return Answer(self._refuse(request_id, ProtocolError("frame_too_large", message),
                                       event.head))
        assert isinstance(event, Frame)
        try:
            request = decode_request(event.payload)
        except RequestError as exc:
            return Answer(self._refuse(exc.request_id, exc.error, event.payload))
        try:
            deadline = _deadline(request.args, now)
            if request.op == "hello":
                return Answer(self._response(request, self._hello(request.args)))
            if not self.greeted:
                raise ProtocolError("bad_request", "hello first")
            if request.op == "ping":
                return Answer(self._response(request, {"effects": [], **self.status()}))
            if request.op == "metrics":
                return Answer(self._response(request, {"effects": [],
                                                       "families": self.metrics.families()}))
            operation = OPERATIONS.get(request.op)
            if operation is None:
                raise ProtocolError("unknown_op", f"unknown op {shown(request.op)}")
            return Job(request, self._user(request.args), operation, deadline)
        except Exception as exc:  # noqa: BLE001 - see _error()
            return Answer(self._error(request, exc))

    def run(self, job: Job, store: RosterStore, now: float) -> bytes | None:
        """The response to `job`, run in one transaction of `store` (a store of the same
        database as the dispatcher's: each thread may have its own connection)."""
        request = job.request
        with self.metrics.handling_of(request.op):
            return self._run(job, store, now)

    def _run(self, job: Job, store: RosterStore, now: float) -> bytes | None:
        request = job.request
        try:
            if job.deadline is not None and now >= job.deadline and not job.operation.must_run:
                # The shim has given up on it: doing it now would only surprise the user.
                raise ProtocolError("timeout", "the deadline passed before the request could "
                                    "start; nothing was done")
            if self.origin is not None and store.origin != self.origin:
                store.origin = self.origin
            writes = job.operation.writes_for(request.args)
            timeout = _store_timeout(job.deadline, now)
            with (store.transaction if writes else store.snapshot)(job.user,
                                                                   timeout=timeout) as txn:
                outcome = job.operation.handler(txn, self.rules, request.args)
            result = {**outcome.result, "effects": [effect.to_wire() for effect in outcome.effects]}
            return self._response(request, result)
        except Exception as exc:  # noqa: BLE001 - see _error()
            return self._error(request, exc)

    def failed(self, job: Job, exc: Exception) -> bytes:
        """The error response for a job that could not be run (its thread has no store)."""
        return self._error(job.request, exc)

    def overloaded(self, job: Job, why: str) -> bytes:
        """The answer to a job the server has no room for (nothing was done)."""
        log.warning("request %d (%s) for %s refused: %s", job.request.id, job.request.op,
                    job.user, why)
        self.metrics.error(job.request.op, "overloaded")
        return encode_error(job.request.id, ProtocolError("overloaded", why).to_wire())

    def _response(self, request: Request, result: dict[str, Any]) -> bytes:
        response = encode_response(request.id, result)
        if self.max_response_bytes is not None and len(response) > self.max_response_bytes:
            # The shim would take a longer frame for garbage and restart us: refuse.
            raise ProtocolError(
                "response_too_large",
                f"the answer is {len(response)} bytes, over the shim's max_frame_bytes "
                f"({self.max_response_bytes}); raise it, or lower [limits]")
        return response

    def _error(self, request: Request, exc: Exception) -> bytes:
        """The error response for what serving `request` raised: every exception becomes one."""
        response = self._error_response(request, exc)
        code = ("stanza_error" if isinstance(exc, StanzaError) else
                exc.code if isinstance(exc, ProtocolError) else
                "store_unavailable" if isinstance(exc, StoreUnavailable) else "internal")
        self.metrics.error(request.op, code)
        if isinstance(exc, StoreError):
            self.metrics.store_error(unavailable=isinstance(exc, StoreUnavailable))
        return response

    def _error_response(self, request: Request, exc: Exception) -> bytes:
        if isinstance(exc, ProtocolError):
            level = logging.ERROR if exc.code == "response_too_large" else (
                logging.WARNING if exc.code == "timeout" else logging.DEBUG)
            log.log(level, "request %d (%s) refused: %s", request.id, request.op, exc.message)
            return encode_error(request.id, exc.to_wire())
        if isinstance(exc, StanzaError):
            log.debug("request %d (%s) refused: %s", request.id, request.op, exc)
            return encode_error(request.id, exc.to_wire())
        if isinstance(exc, StoreUnavailable):
            log.error("request %d (%s): store unavailable: %s", request.id, request.op, exc)
            return encode_error(request.id, ProtocolError("store_unavailable", str(exc)).to_wire())
        if isinstance(exc, StoreError):
            log.error("request %d (%s): store error: %s", request.id, request.op, exc)
            return encode_error(request.id, ProtocolError("internal", str(exc)).to_wire())
        # A bug must cost one request, not the process.
        log.error("request %d (%s) failed", request.id, request.op, exc_info=exc)
        error = ProtocolError("internal", f"{type(exc).__name__}: {exc}"[:300])
        return encode_error(request.id, error.to_wire())

    def _refuse(self, request_id: int | None, error: ProtocolError, raw: bytes) -> bytes | None:
        if request_id is None:
            log.warning("%s: %s (no request id; first bytes %s)", error.code, error.message, raw[:32].hex())
            return None
        log.warning("request %d: %s: %s", request_id, error.code, error.message)
        self.metrics.error(None, error.code)  # the op is unknown: `other`
        return encode_error(request_id, error.to_wire())

    def changes_by_user(self, changes: list[OutsideChange]) -> dict[str, list[OutsideChange]]:
        """The outside changes this process reports, by user, in the order read."""
        by_user: dict[str, list[OutsideChange]] = {}
        for change in changes:
            # Each virtual host has a pool, and each pool a feed: report this host's users only.
            if self.host is None or change.user.endswith("@" + self.host):
                by_user.setdefault(change.user, []).append(change)
        return by_user

    def notification(self, user: str, changes: list[OutsideChange], store: RosterStore) -> bytes | None:
        """The `roster_changed` notification for `user`'s rows other applications changed,
        read in one snapshot of `store` (run in the user's order, like a request of the user:
        a notification never carries an older state than a response written before it). Its
        pushes' version is partial when that snapshot shows changes committed after the
        feed's read of `changes` (roster.outside_changes)."""
        try:
            with store.snapshot(user) as txn:
                effects = roster.outside_changes(txn, self.rules, changes)
            params = {"user": user, "effects": [effect.to_wire() for effect in effects]}
            payload = encode_notification("roster_changed", params)
        except StoreError as exc:
            log.error("changes to %s made outside XMPP not pushed: %s", user, exc)
            self.metrics.store_error(unavailable=isinstance(exc, StoreUnavailable))
            return None
        except Exception:  # noqa: BLE001 - one user's rows must not stop the feed
            log.exception("changes to %r made outside XMPP not pushed", user)
            return None
        if self.max_response_bytes is not None and len(payload) > self.max_response_bytes:
            log.error("changes to %s made outside XMPP not pushed: a notification of %d "
                      "bytes, over the shim's max_frame_bytes", user, len(payload))
            return None
        log.info("%s: %d rows changed outside XMPP", user, len(changes))
        self.metrics.notified("roster_changed", changes)
        return payload

    def feed_resumed(self) -> bytes:
        """The `feed_resumed` notification: the feed reads again after a time it could not
        (at start, or after losing its connection), so whatever the shim read and kept
        meanwhile may miss a change the feed will never report: it drops every cache."""
        log.info("the change feed reads again; telling the shim to drop what it cached")
        self.metrics.notified("feed_resumed")
        return encode_notification("feed_resumed", {"effects": []})

    def notifications(self, changes: list[OutsideChange]) -> list[bytes]:
        """Every notification for `changes`, on the dispatcher's own store (the serial path)."""
        payloads = (self.notification(user, user_changes, self.store)
                    for user, user_changes in self.changes_by_user(changes).items())
        return [payload for payload in payloads if payload is not None]

    def close(self) -> None:
        if self.feed is not None:
            self.feed.close()
            self.feed = None

    @staticmethod
    def _user(args: dict[str, Any]) -> str:
        user = _text_arg(args, "user")
        try:
            normalised = bare_jid(user)
        except InvalidJID as exc:
            raise ProtocolError("bad_request", f"invalid user {shown(user)}: {exc}") from None
        if "@" not in normalised:
            raise ProtocolError("bad_request", f"user {shown(user)} has no localpart")
        return normalised

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        offered = args.get("protocols")
        if not isinstance(offered, list):
            raise ProtocolError("bad_request", "hello needs 'protocols', a list of versions")
        common = [version for version in offered
                  if type(version) is int and version in PROTOCOL_VERSIONS]
        if not common:
            raise ProtocolError(
                "unsupported_protocol",
                f"this program speaks protocol versions {list(PROTOCOL_VERSIONS)}, "
                f"the shim offered {offered[:8]}",
            )
        self.host = args["host"] if isinstance(args.get("host"), str) else None
        limit = args.get("max_frame_bytes")
        self.max_response_bytes = limit if type(limit) is int and limit > 0 else None
        if isinstance(args.get("node"), str) and args["node"]:
            self.origin = self.store.origin = args["node"]
        if args.get("change_feed") and self.feed is None:
            # Opened before the answer, so that a shim may trust a cache from the answer on:
            # every change made after it will be notified.
            self.feed = self.store.open_change_feed()
            if self.feed is None:
                log.warning("the shim asked for outside changes; %s has none", self.store.describe())
                if self.rules.policy.mutual_rows:
                    # docs/mappings.md, "Rows read into two rosters".
                    log.warning("mutual_rows is on but there is no change log: a contact's "
                                "write to a shared row reaches this user's clients at their "
                                "next roster fetch, without its presences")
        self.greeted = True  # only now: a feed that failed to open fails the hello
        log.info("hello from shim %s for %s: protocol %d", args.get("shim"), args.get("host"), max(common))
        policy = self.rules.policy
        return {
            "protocol": max(common),
            "program": __version__,
            "capabilities": {
                "versioning": policy.versioning,
                "pre_approval": policy.pre_approval,
                "notifications": self.feed is not None,
            },
            "effects": [],
        }
