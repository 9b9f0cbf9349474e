"""The program's own metrics (roster_port/metrics.py) and the `metrics` request: in-process on
the dispatcher over a real SQLite file, and over pipes with the real `roster-port serve`."""

from __future__ import annotations

import sqlite3
import time

import pytest

from roster_port.client import ProgramError, ProgramProcess
from roster_port.dispatcher import OPERATIONS
from roster_port.metrics import OPS, ProgramMetrics
from roster_port.store.base import OutsideChange

ALICE, BOB = "alice@example.com", "bob@example.com"


def samples(families) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a `metrics` answer."""
    found = {}
    for family in families:
        assert set(family) == {"name", "type", "help", "samples"}
        assert family["name"].startswith("roster_port_program_")
        assert family["type"] in {"counter", "gauge", "histogram"}
        for name, labels, value in family["samples"]:
            assert not name.endswith("_created")
            found[(name, tuple(sorted(labels.items())))] = value
    return found


def test_every_operation_has_its_own_op_label():
    assert set(OPERATIONS) <= OPS


def test_lag_is_measured_from_the_entry_and_never_negative():
    metrics = ProgramMetrics()
    metrics.notified("roster_changed", [OutsideChange(ALICE, BOB, None, "both", recorded_at=100.0),
                                        OutsideChange(ALICE, BOB, "both", None, recorded_at=103.0),
                                        OutsideChange(ALICE, BOB, None, "to")],
                     now=102.0)
    found = samples(metrics.families())
    assert found[("roster_port_program_outside_changes_total", ())] == 3
    # 2 s, and -1 s (clock skew) counted as 0; the change without a time has no lag.
    assert found[("roster_port_program_change_feed_lag_seconds_count", ())] == 2
    assert found[("roster_port_program_change_feed_lag_seconds_sum", ())] == 2.0
    assert found[("roster_port_program_change_feed_lag_seconds_bucket", (("le", "0.01"),))] == 1
    assert found[("roster_port_program_notifications_total", (("name", "roster_changed"),))] == 1


def test_labels_stay_within_fixed_sets():
    metrics = ProgramMetrics()
    metrics.error("a made-up op from a frame", "a made-up code")
    metrics.notified("a made-up notification")
    found = samples(metrics.families())
    assert found[("roster_port_program_errors_total", (("kind", "other"), ("op", "other")))] == 1
    assert found[("roster_port_program_notifications_total", (("name", "other"),))] == 1


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "roster-port.toml"
    path.write_text(
        '[store]\nbackend = "sqlite"\npath = "rosters.sqlite"\n'
        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n'
    )
    return path


def test_the_metrics_request_over_pipes(config, tmp_path):
    with ProgramProcess(config, hello=False) as program:
        with pytest.raises(ProgramError) as refused:
            program.call("metrics", {})
        assert refused.value.code == "bad_request"  # hello first, as for any request
        program.call("hello", {"protocols": [2], "shim": "test", "host": "example.com",
                               "change_feed": True})
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                   "items": [{"jid": BOB, "name": "Bob"}]})
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "get", "items": []})
        with pytest.raises(ProgramError):  # a stanza error: Bob may not read Alice's roster
            program.call("roster_iq", {"user": ALICE, "requester": BOB, "type": "get",
                                       "items": []})
        with pytest.raises(ProgramError):
            program.call("no_such_op", {"user": ALICE})
        # An outside change, notified: its lag is measured.
        with sqlite3.connect(tmp_path / "rosters.sqlite") as outside:
            outside.execute("UPDATE roster_items SET name = 'Robert' WHERE user = ? AND contact = ?",
                            (ALICE, BOB))
        notification = program.read_message(timeout=10)
        assert notification[:2] == [2, "roster_changed"]
        started = time.monotonic()
        result = program.call("metrics", {"timeout_ms": 1000})
        # Answered by the reading loop, like a ping.
        assert time.monotonic() - started < 1.0
        assert result["effects"] == []
        found = samples(result["families"])
    iq = (("op", "roster_iq"),)
    assert found[("roster_port_program_requests_total", iq)] == 3
    assert found[("roster_port_program_request_duration_seconds_count", iq)] == 3
    assert found[("roster_port_program_request_duration_seconds_bucket", (("le", "+Inf"), ("op", "roster_iq")))] == 3
    assert found[("roster_port_program_errors_total", (("kind", "stanza_error"), ("op", "roster_iq")))] == 1
    assert found[("roster_port_program_errors_total", (("kind", "unknown_op"), ("op", "other")))] == 1
    assert found[("roster_port_program_errors_total", (("kind", "bad_request"), ("op", "metrics")))] == 1
    assert found[("roster_port_program_requests_running", iq)] == 0
    # The executor counts a request as held until its thread is done with it, a moment after
    # its answer is written: 0 or 1 here.
    assert found[("roster_port_program_requests_held", ())] in (0, 1)
    assert found[("roster_port_program_outside_changes_total", ())] == 1
    assert found[("roster_port_program_change_feed_lag_seconds_count", ())] == 1
    # Recorded by SQLite's clock a moment ago: well under a minute, never negative.
    assert 0 <= found[("roster_port_program_change_feed_lag_seconds_sum", ())] < 60
