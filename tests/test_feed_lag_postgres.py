"""The change feed's entries carry when they were recorded (for the change-feed lag metric,
roster_port/metrics.py), on PostgreSQL: the change log's `recorded_at`, the database's clock."""

from __future__ import annotations

import time

import pytest

from test_store_postgres import dsn, feed_of, feed_reads, open_store, outside_sql  # noqa: F401

pytestmark = pytest.mark.postgres

ALICE = "alice@example.com"


def test_an_outside_change_carries_its_recording_time(open_store, feed_of, dsn):  # noqa: F811
    feed = feed_of(open_store())
    before = time.time()
    outside_sql(dsn, "INSERT INTO roster_items (username, contact, subscription) "
                     "VALUES (%s, %s, 'both')", (ALICE, "bob@example.com"))
    (change,) = feed_reads(feed)
    assert change.user == ALICE and change.new_subscription == "both"
    # Same host, same clock: recorded between the moment before the write and now.
    assert before - 1 <= change.recorded_at <= time.time() + 1
