"""The program's own metrics: what only the program sees, kept with prometheus_client.

The shim asks each of its programs for these with the `metrics` request (docs/protocol.md),
labels each program's samples with its worker (a pool has several programs, each counting
from its own start), adds its own figures and serves them all in the Prometheus text format
(erlang_shim/README.md, "Metrics"). So the program never listens
on a port of its own, and its answer is structured data (`families()`), not text.

Kept here (all names under `roster_port_program_`; the shim refuses an answer that uses the
few it renders itself under that prefix, such as `roster_port_program_up`):
- requests run, by op; their handling time, from the moment a worker thread takes them up
  to their answer (the shim's own histogram has the whole round trip, waiting included);
  those running now, by op; those held (queued and running) by the executor;
- errors by op and kind: the protocol's error codes (`timeout`: the deadline passed before
  the request started), refusals before a request runs (`overloaded`, `bad_request`...)
  included;
- store errors by kind (`unavailable`: the database could not be reached; `error`);
- the change feed: outside changes notified, and the lag of each, from the moment its entry
  was recorded in the change log (the database's clock: PostgreSQL's `now()`, the start of
  the writing transaction; SQLite's `julianday('now')` at the write) to the moment its
  notification is written (this host's clock: a skew between the two shows as lag, and a
  negative lag counts as 0); failed reads of the feed; notifications by name.

Bounds: the `op` label is one of OPS or `other` (never an op a frame names), `kind` one of
the protocol's codes or `other`; no label ever holds a user, a JID or anything a client sent.
Every process has its own registry (never prometheus_client's global one): tests may make
several dispatchers in one process, and a program's figures are its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The requests the dispatcher serves (dispatcher.OPERATIONS) and those it answers itself.
OPS = frozenset({
    "hello", "ping", "metrics", "roster_get", "roster_iq", "in_subscription",
    "out_subscription", "jid_info", "pending_in", "remove_user", "store_get_roster",
    "store_get_item", "store_set_item", "store_del_item", "store_remove_user",
    "store_read_version",
})
# docs/protocol.md, "Errors".
ERROR_CODES = frozenset({
    "bad_frame", "frame_too_large", "bad_request", "unknown_op", "stanza_error",
    "unsupported_protocol", "store_unavailable", "timeout", "overloaded",
    "response_too_large", "internal",
})
NOTIFICATIONS = frozenset({"roster_changed", "feed_resumed"})
# Seconds; the shim's histogram has the same bounds (roster_port_metrics.erl).
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def op_label(op: Any) -> str:
    return op if isinstance(op, str) and op in OPS else "other"


def code_label(code: Any) -> str:
    return code if isinstance(code, str) and code in ERROR_CODES else "other"


class ProgramMetrics:
    """One program's figures. Thread-safe (prometheus_client's metrics are)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("roster_port_program_requests", "Requests run by the program, "
                                "by op", ["op"], registry=r)
        self.errors = Counter("roster_port_program_errors", "Requests the program answered "
                              "with an error, by op and error code", ["op", "kind"], registry=r)
        self.handling = Histogram("roster_port_program_request_duration_seconds",
                                  "Time from a worker thread taking a request up to its answer",
                                  ["op"], buckets=HANDLING_BUCKETS, registry=r)
        self.running = Gauge("roster_port_program_requests_running", "Requests being run now, "
                             "by op", ["op"], registry=r)
        self.held = Gauge("roster_port_program_requests_held", "Requests held by the program "
                          "(queued for a worker thread or running)", registry=r)
        self.store_errors = Counter("roster_port_program_store_errors", "Store failures, by "
                                    "kind (unavailable: the database could not be reached)",
                                    ["kind"], registry=r)
        self.outside_changes = Counter("roster_port_program_outside_changes", "Rows changed "
                                       "outside XMPP, notified to the shim", registry=r)
        self.feed_lag = Histogram("roster_port_program_change_feed_lag_seconds", "Time from "
                                  "an outside change's entry in the change log to its "
                                  "notification", buckets=LAG_BUCKETS, registry=r)
        self.feed_errors = Counter("roster_port_program_change_feed_errors", "Reads of the "
                                   "change feed that failed", registry=r)
        self.notifications = Counter("roster_port_program_notifications", "Notifications "
                                     "written, by name", ["name"], registry=r)

    # -- what the dispatcher and the server count ------------------------------------------

    @contextmanager
    def handling_of(self, op: str) -> Iterator[None]:
        label = op_label(op)
        running = self.running.labels(label)
        running.inc()
        started = time.monotonic()
        try:
            yield
        finally:
            running.dec()
            self.handling.labels(label).observe(time.monotonic() - started)
            self.requests.labels(label).inc()

    def error(self, op: Any, code: Any) -> None:
        self.errors.labels(op_label(op), code_label(code)).inc()

    def store_error(self, unavailable: bool) -> None:
        self.store_errors.labels("unavailable" if unavailable else "error").inc()

    def notified(self, name: str, changes: Iterable[Any] = (), now: float | None = None) -> None:
        """A notification was made: `changes` are the OutsideChanges it reports (their
        `recorded_at`, seconds since the epoch, when the feed knows it)."""
        self.notifications.labels(name if name in NOTIFICATIONS else "other").inc()
        now = time.time() if now is None else now
        for change in changes:
            self.outside_changes.inc()
            recorded_at = getattr(change, "recorded_at", None)
            if isinstance(recorded_at, (int, float)) and math.isfinite(recorded_at):
                self.feed_lag.observe(max(0.0, now - recorded_at))

    def feed_error(self) -> None:
        self.feed_errors.inc()

    def watch_held(self, held: Callable[[], int]) -> None:
        """Read at each collection: how many requests the executor holds."""
        self.held.set_function(lambda: float(held()))

    # -- the `metrics` answer ----------------------------------------------------------------

    def families(self) -> list[dict[str, Any]]:
        """Every family as the `metrics` answer carries it (docs/protocol.md): name, type,
        help, and samples [name, labels, value]. Creation timestamps (`_created`) are left
        out (the shim sums samples over programs; a sum of timestamps means nothing), and so
        is any value that is not finite (msgpack would carry it, the shim refuses it)."""
        answer = []
        for family in self.registry.collect():
            samples = [[s.name, dict(s.labels), float(s.value)] for s in family.samples
                       if not s.name.endswith("_created") and math.isfinite(s.value)]
            answer.append({"name": family.name, "type": family.type,
                           "help": family.documentation, "samples": samples})
        return answer
