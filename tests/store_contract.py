"""The store contract: what every storage adapter must do, checked through the interface only.

`StoreContract` is collected by tests/test_store_contract.py and runs once per adapter through
the parametrised `store_factory` fixture (tests/conftest.py). Nothing here may know which
adapter it is testing: an adapter that needs a special case needs a change of the contract
(roster_port/store/base.py), not an `if` here.

Group order is not significant (XMPP groups are a set): an adapter may return an item's groups
in code point order rather than in the order written (ejabberd's own schema keeps no order), so
the rows written here have their groups in code point order.

Two things the contract fixes that an adapter could easily get wrong:
- `rows()` is ordered by contact in code point order (Python's `sorted`), not by a locale's
  collation (PostgreSQL: `COLLATE "C"`).
- A version is opaque text: only "equal" and "different" mean anything, and a user never
  written has version "0".
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import selectors
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roster_port.store.base import (
    SUBSCRIPTIONS,
    ChangeFeed,
    OutsideChange,
    RosterRow,
    RosterStore,
    StoreError,
    StoreUnavailable,
)

ALICE = "alice@example.com"
BOB = "bob@example.com"

FULL_ROW = RosterRow(
    contact="zoë@例え.jp",
    name="Zoë 🦊 «Renard» — 狐",
    subscription="both",
    pending_out=True,
    pending_in=True,
    approved=True,
    in_roster=True,
    groups=tuple(f"group {index:02d} ✓" for index in range(40)),  # in code point order
    request_text="Hi! Let's connect — ça va ?\nsecond line",
)

# Contacts whose code point order differs from a typical locale's (punctuation, case, non-ASCII).
UNORDERED_CONTACTS = [
    "zed@example.com",
    "a-b@example.com",
    "ab@example.com",
    "a.c@example.com",
    "Ab@example.com",
    "éva@example.com",
    "eve@example.com",
    "10@example.com",
    "9@example.com",
    "ünal@example.com",
]


def read_rows(store: RosterStore, user: str) -> list[RosterRow]:
    with store.snapshot(user) as txn:
        return txn.rows()


def read_version(store: RosterStore, user: str) -> str:
    with store.snapshot(user) as txn:
        return txn.version()


def put_rows(store: RosterStore, user: str, *rows: RosterRow) -> str:
    """Write `rows` in one transaction; return the version it left."""
    with store.transaction(user) as txn:
        for row in rows:
            txn.put(row)
        return txn.version()


def feed_changes(feed: ChangeFeed, *, until: int, timeout: float = 5.0) -> list[OutsideChange]:
    """What `feed` reports, read as the server reads it (woken by its fileno, or polled),
    until `until` changes came or `timeout` passed (at least one read)."""
    changes: list[OutsideChange] = []
    deadline = time.monotonic() + timeout
    fileno = feed.fileno()
    with selectors.DefaultSelector() as selector:
        if fileno is not None:
            selector.register(fileno, selectors.EVENT_READ)
        while True:
            changes += feed.read()
            remaining = deadline - time.monotonic()
            if len(changes) >= until or remaining <= 0:
                return changes
            if fileno is not None:
                selector.select(remaining)
            else:
                threading.Event().wait(min(feed.poll_interval or remaining, remaining))


def logged_after(store: RosterStore, user: str, position: object | None) -> bool:
    with store.snapshot(user) as txn:
        return txn.logged_after(position)


class Boom(Exception):
    """Raised by a test inside a transaction to make it roll back."""


# --- Hypothesis strategies ------------------------------------------------------------------

# Any text XMPP can carry: no NUL, no lone surrogates (which are not UTF-8).
xmpp_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)

roster_rows = st.builds(
    RosterRow,
    contact=xmpp_text.filter(bool),
    name=xmpp_text,
    subscription=st.sampled_from(SUBSCRIPTIONS),
    pending_out=st.booleans(),
    pending_in=st.booleans(),
    approved=st.booleans(),
    in_roster=st.booleans(),
    # Sorted: group order is not kept by every adapter (see base.RosterRow).
    groups=st.lists(xmpp_text, max_size=8, unique=True).map(sorted).map(tuple),
    request_text=xmpp_text,
    request_elements=st.just(()),  # rows_with_requests below: not every store keeps them
)

_property_users = (f"property-{index}@example.com" for index in itertools.count())

# A pending request kept whole (RFC 6121 3.1.3; base.RosterRow.request_elements): what the shim
# sends of a subscribe with two status languages, a XEP-0172 nick and a XEP-0379 preauth.
WHOLE_REQUEST = RosterRow(
    contact="romeo@montague.lit",
    pending_in=True,
    in_roster=False,
    request_text="Let me in",
    request_elements=(
        "<status xml:lang='en'>Let me in</status>",
        "<status xml:lang='de'>Lass mich &lt;rein&gt; — bitte</status>",
        "<nick xmlns='http://jabber.org/protocol/nick'>Romeo 🌹</nick>",
        "<preauth xmlns='urn:xmpp:pars:0' token='8ZgnL2h6'/>",
    ),
)

rows_with_requests = st.builds(
    lambda row, elements: row.evolve(request_elements=tuple(elements)),
    roster_rows,
    st.lists(xmpp_text, max_size=5),
)


def as_kept(store: RosterStore, row: RosterRow) -> RosterRow:
    """`row` as `store` can keep it: a store that keeps no whole requests keeps their text."""
    with store.snapshot(ALICE) as txn:
        keeps = txn.keeps_request_elements
    return row if keeps else row.evolve(request_elements=())


# --- Concurrency worker (runs in other processes: must stay importable at module level) -----

COUNTER_CONTACT = "counter@example.com"


def increment_counter(opener: Callable[..., RosterStore], user: str, increments: int,
                      start: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue,
                      ) -> None:
    """Read-modify-write the number kept in the name of `user`'s counter row, `increments` times.

    Reports ("ok", [the version left by each write]) or ("error", repr) on `results`.
    """
    try:
        store = opener()
        try:
            start.wait(timeout=60)
            versions = []
            for _ in range(increments):
                with store.transaction(user) as txn:
                    row = txn.get(COUNTER_CONTACT) or RosterRow(COUNTER_CONTACT, name="0")
                    txn.put(row.evolve(name=str(int(row.name) + 1)))
                    versions.append(txn.version())
        finally:
            store.close()
        results.put(("ok", versions))
    except BaseException as exc:  # report everything: the parent only sees the queue
        results.put(("error", repr(exc)))


class StoreContract:
    """The contract suite. Every test gets a fresh, empty database."""

    # --- Round trips ------------------------------------------------------------------------

    def test_every_field_round_trips(self, store):
        put_rows(store, ALICE, FULL_ROW)
        with store.snapshot(ALICE) as txn:
            assert txn.get(FULL_ROW.contact) == FULL_ROW
            assert txn.rows() == [FULL_ROW]

    def test_default_row_round_trips(self, store):
        row = RosterRow("plain@example.com")
        put_rows(store, ALICE, row)
        with store.snapshot(ALICE) as txn:
            stored = txn.get(row.contact)
        assert stored == row
        assert stored.groups == ()

    def test_strangers_request_round_trips(self, store):
        request = RosterRow("stranger@example.com", pending_in=True, in_roster=False,
                            request_text="please add me")
        put_rows(store, ALICE, request)
        assert read_rows(store, ALICE) == [request]

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=st.lists(roster_rows, max_size=6, unique_by=lambda row: row.contact))
    def test_any_rows_round_trip(self, store, rows):
        user = next(_property_users)
        put_rows(store, user, *rows)
        with store.snapshot(user) as txn:
            assert txn.rows() == sorted(rows, key=lambda row: row.contact)
            assert txn.count() == sum(1 for row in rows if row.in_roster)
            assert txn.count_requests() == sum(1 for row in rows if not row.in_roster)
            for row in rows:
                assert txn.get(row.contact) == row

    def test_a_whole_request_round_trips_as_far_as_the_store_keeps_it(self, store):
        put_rows(store, ALICE, WHOLE_REQUEST)
        expected = as_kept(store, WHOLE_REQUEST)
        with store.snapshot(ALICE) as txn:
            assert txn.get(WHOLE_REQUEST.contact) == expected
            assert txn.rows() == [expected]
        # Its text is kept by every store, whole request or not.
        assert expected.request_text == "Let me in"

    def test_a_whole_request_is_replaced_by_a_newer_one_and_cleared_with_it(self, store):
        put_rows(store, ALICE, WHOLE_REQUEST)
        newer = WHOLE_REQUEST.evolve(request_text="", request_elements=(
            "<preauth xmlns='urn:xmpp:pars:0' token='newer'/>",))
        put_rows(store, ALICE, newer)
        assert read_rows(store, ALICE) == [as_kept(store, newer)]
        answered = newer.evolve(subscription="from", pending_in=False, in_roster=True,
                                request_elements=())
        put_rows(store, ALICE, answered)
        assert read_rows(store, ALICE) == [answered]

    def test_writing_only_a_whole_request_moves_the_version_where_it_is_kept(self, store):
        before = put_rows(store, ALICE, WHOLE_REQUEST.evolve(request_elements=()))
        after = put_rows(store, ALICE, WHOLE_REQUEST)
        with store.snapshot(ALICE) as txn:
            keeps = txn.keeps_request_elements
        # A store that keeps it changed a row; one that does not may still count a write.
        assert after != before or not keeps

    @settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(rows=st.lists(rows_with_requests, max_size=4, unique_by=lambda row: row.contact))
    def test_any_rows_with_whole_requests_round_trip(self, store, rows):
        user = next(_property_users)
        put_rows(store, user, *rows)
        expected = sorted((as_kept(store, row) for row in rows), key=lambda row: row.contact)
        with store.snapshot(user) as txn:
            assert txn.rows() == expected

    def test_put_replaces_the_row_of_the_same_contact(self, store):
        put_rows(store, ALICE, FULL_ROW)
        replacement = RosterRow(FULL_ROW.contact, name="renamed", subscription="to", groups=("x",))
        put_rows(store, ALICE, replacement)
        assert read_rows(store, ALICE) == [replacement]

    def test_get_of_a_missing_contact_is_none(self, store):
        with store.snapshot(ALICE) as txn:
            assert txn.get("nobody@example.com") is None
            assert txn.rows() == []
            assert txn.count() == 0

    def test_rows_are_ordered_by_contact_in_code_point_order(self, store):
        put_rows(store, ALICE, *(RosterRow(contact) for contact in UNORDERED_CONTACTS))
        assert [row.contact for row in read_rows(store, ALICE)] == sorted(UNORDERED_CONTACTS)

    def test_a_large_roster_round_trips(self, store):
        rows = [RosterRow(f"contact{index:05d}@example.com", name=f"Contact {index}",
                          subscription=SUBSCRIPTIONS[index % 4], groups=(f"g{index % 7}",))
                for index in reversed(range(5000))]
        put_rows(store, ALICE, *rows)
        with store.snapshot(ALICE) as txn:
            assert txn.count() == 5000
            assert txn.rows() == sorted(rows, key=lambda row: row.contact)

    def test_delete_removes_one_row(self, store):
        keep, drop = RosterRow("keep@example.com"), RosterRow("drop@example.com")
        put_rows(store, ALICE, keep, drop)
        with store.transaction(ALICE) as txn:
            txn.delete(drop.contact)
            assert txn.get(drop.contact) is None
        assert read_rows(store, ALICE) == [keep]

    def test_deleting_a_missing_row_is_not_an_error(self, store):
        with store.transaction(ALICE) as txn:
            txn.delete("nobody@example.com")
        assert read_rows(store, ALICE) == []

    def test_delete_all_removes_only_that_users_rows(self, store):
        put_rows(store, ALICE, RosterRow("a@example.com"), RosterRow("b@example.com"))
        put_rows(store, BOB, RosterRow("a@example.com"))
        with store.transaction(ALICE) as txn:
            txn.delete_all()
            assert txn.count() == 0
        assert read_rows(store, ALICE) == []
        assert read_rows(store, BOB) == [RosterRow("a@example.com")]

    def test_users_rosters_are_separate(self, store):
        put_rows(store, ALICE, RosterRow("same@example.com", name="Alice's"))
        put_rows(store, BOB, RosterRow("same@example.com", name="Bob's"))
        with store.transaction(BOB) as txn:
            txn.delete("same@example.com")
        assert read_rows(store, ALICE) == [RosterRow("same@example.com", name="Alice's")]
        assert read_rows(store, BOB) == []

    # --- Transactions -----------------------------------------------------------------------

    def test_an_exception_rolls_the_whole_transaction_back(self, store):
        put_rows(store, ALICE, RosterRow("kept@example.com"))
        version_before = read_version(store, ALICE)
        with pytest.raises(Boom):
            with store.transaction(ALICE) as txn:
                txn.put(RosterRow("new@example.com"))
                txn.put(RosterRow("kept@example.com", name="changed"))
                txn.delete_all()
                raise Boom
        assert read_rows(store, ALICE) == [RosterRow("kept@example.com")]
        assert read_version(store, ALICE) == version_before

    def test_a_rolled_back_first_write_leaves_nothing(self, store):
        with pytest.raises(Boom):
            with store.transaction(ALICE) as txn:
                txn.put(FULL_ROW)
                raise Boom
        assert read_rows(store, ALICE) == []
        assert read_version(store, ALICE) == "0"

    def test_another_instance_sees_committed_data(self, store_factory):
        writer, reader = store_factory.open(), store_factory.open()
        put_rows(writer, ALICE, FULL_ROW)
        assert read_rows(reader, ALICE) == [FULL_ROW]
        assert read_version(reader, ALICE) == read_version(writer, ALICE)

    def test_another_instance_does_not_see_uncommitted_writes(self, store_factory):
        writer, reader = store_factory.open(), store_factory.open()
        with store_factory.open().transaction(ALICE) as txn:
            txn.put(FULL_ROW)
            assert read_rows(reader, ALICE) == []
            assert read_version(reader, ALICE) == "0"
        assert read_rows(reader, ALICE) == [FULL_ROW]
        assert read_rows(writer, ALICE) == [FULL_ROW]

    def test_a_finished_transaction_cannot_be_used(self, store):
        with store.transaction(ALICE) as txn:
            pass
        with pytest.raises(StoreError):
            txn.put(FULL_ROW)
        assert read_rows(store, ALICE) == []

    def test_a_snapshot_refuses_writes(self, store):
        put_rows(store, ALICE, RosterRow("a@example.com"))
        with store.snapshot(ALICE) as txn:
            with pytest.raises(StoreError):
                txn.put(FULL_ROW)
            with pytest.raises(StoreError):
                txn.delete("a@example.com")
            with pytest.raises(StoreError):
                txn.delete_all()
        assert read_rows(store, ALICE) == [RosterRow("a@example.com")]

    # --- Versions ---------------------------------------------------------------------------

    def test_a_user_never_written_has_version_0(self, store):
        assert read_version(store, ALICE) == "0"
        with store.transaction(ALICE) as txn:
            assert txn.version() == "0"

    def test_reads_do_not_move_the_version(self, store):
        put_rows(store, ALICE, FULL_ROW)
        version = read_version(store, ALICE)
        with store.transaction(ALICE) as txn:
            txn.rows(), txn.get(FULL_ROW.contact), txn.count()
            assert txn.version() == version
        assert read_version(store, ALICE) == version

    def test_every_write_moves_the_version_to_a_value_never_seen_before(self, store):
        seen = [read_version(store, ALICE)]

        def write(change: Callable) -> None:
            with store.transaction(ALICE) as txn:
                change(txn)
            seen.append(read_version(store, ALICE))

        write(lambda txn: txn.put(RosterRow("a@example.com")))
        write(lambda txn: txn.put(RosterRow("b@example.com")))
        write(lambda txn: txn.put(RosterRow("a@example.com", name="renamed")))
        write(lambda txn: txn.put(RosterRow("a@example.com", subscription="from")))
        write(lambda txn: txn.delete("b@example.com"))
        write(lambda txn: txn.delete_all())
        # Back to exactly the rows of an earlier state: still a version never seen before.
        write(lambda txn: txn.put(RosterRow("a@example.com")))
        write(lambda txn: txn.delete_all())
        assert len(set(seen)) == len(seen), seen

    def test_version_inside_a_transaction_reflects_its_writes_and_is_what_commits(self, store):
        put_rows(store, ALICE, RosterRow("a@example.com"))
        before = read_version(store, ALICE)
        with store.transaction(ALICE) as txn:
            txn.put(RosterRow("b@example.com"))
            after_put = txn.version()
            assert after_put != before
            txn.delete("a@example.com")
            after_delete = txn.version()
            assert after_delete not in (before, after_put)
        assert read_version(store, ALICE) == after_delete

    def test_versions_of_different_users_are_independent(self, store):
        put_rows(store, ALICE, RosterRow("a@example.com"))
        bob_version = read_version(store, BOB)
        put_rows(store, ALICE, RosterRow("b@example.com"))
        with store.transaction(ALICE) as txn:
            txn.delete_all()
        assert read_version(store, BOB) == bob_version == "0"
        put_rows(store, BOB, RosterRow("a@example.com"))
        alice_version = read_version(store, ALICE)
        put_rows(store, BOB, RosterRow("c@example.com"))
        assert read_version(store, ALICE) == alice_version

    # --- Read-only stores -------------------------------------------------------------------

    def test_a_read_only_store_reads_but_refuses_every_write(self, store_factory):
        put_rows(store_factory.open(), ALICE, FULL_ROW)
        version = read_version(store_factory.open(), ALICE)
        read_only = store_factory.open(read_only=True)
        assert read_only.read_only is True
        assert read_rows(read_only, ALICE) == [FULL_ROW]
        writes = [
            lambda txn: txn.put(RosterRow("new@example.com")),
            lambda txn: txn.delete(FULL_ROW.contact),
            lambda txn: txn.delete_all(),
        ]
        for write in writes:
            with pytest.raises(StoreError):
                with read_only.transaction(ALICE) as txn:
                    write(txn)
        assert read_rows(read_only, ALICE) == [FULL_ROW]
        assert read_version(read_only, ALICE) == version

    # --- Concurrency ------------------------------------------------------------------------

    def test_concurrent_read_modify_write_from_many_processes_loses_no_update(
            self, store_factory):
        processes_count, increments = 4, 40
        store_factory.open().close()  # create the database before the race
        context = multiprocessing.get_context("spawn")
        start = context.Barrier(processes_count)
        results = context.Queue()
        processes = [
            context.Process(target=increment_counter,
                            args=(store_factory.opener, ALICE, increments, start, results))
            for _ in range(processes_count)
        ]
        for process in processes:
            process.start()
        try:
            reports = [results.get(timeout=60) for _ in processes]
        except queue.Empty:
            pytest.fail("a worker process neither finished nor reported an error in 60 s")
        finally:
            for process in processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
        errors = [detail for outcome, detail in reports if outcome != "ok"]
        assert not errors
        with store_factory.open().snapshot(ALICE) as txn:
            assert txn.get(COUNTER_CONTACT).name == str(processes_count * increments)
        versions = [version for _, worker_versions in reports for version in worker_versions]
        assert len(set(versions)) == processes_count * increments  # no version given twice

    # --- An unreachable database ------------------------------------------------------------

    def test_an_unreachable_database_raises_store_unavailable_until_it_is_back(
            self, store_factory):
        store = store_factory.open()
        put_rows(store, ALICE, RosterRow("a@example.com"))
        version = read_version(store, ALICE)
        with store_factory.unreachable():
            with pytest.raises(StoreUnavailable):
                with store.transaction(ALICE) as txn:
                    txn.put(RosterRow("b@example.com"))
            with pytest.raises(StoreUnavailable):
                read_rows(store, ALICE)
        # Back: nothing of the failed transaction was written, and the same store works again.
        assert read_rows(store, ALICE) == [RosterRow("a@example.com")]
        assert read_version(store, ALICE) == version
        put_rows(store, ALICE, RosterRow("b@example.com"))
        assert len(read_rows(store, ALICE)) == 2

    # --- The change log, as a feed's notification asks it (RosterTxn.logged_after) ----------

    def test_logged_after_tells_the_entries_committed_after_a_feeds_read(self, store_factory):
        store, other_node = store_factory.open(), store_factory.open()
        store.origin, other_node.origin = "ejabberd@a", "ejabberd@b"
        assert logged_after(store, ALICE, None) is False  # no position: nothing known
        feed = store.open_change_feed()
        if feed is None:  # no change log: nothing to tell, whatever is written
            put_rows(other_node, ALICE, RosterRow("a@example.com"))
            assert logged_after(store, ALICE, None) is False
            return
        try:
            feed_changes(feed, until=0)  # the feed reports what commits from now on
            put_rows(other_node, ALICE, RosterRow("a@example.com"))
            [change] = feed_changes(feed, until=1)
            assert change.read_at is not None
            assert logged_after(store, ALICE, change.read_at) is False  # it was read
            put_rows(other_node, ALICE, RosterRow("b@example.com"))  # committed after the read
            assert logged_after(store, ALICE, change.read_at) is True
            assert logged_after(store, BOB, change.read_at) is False  # per user
            [change] = feed_changes(feed, until=1)
            assert logged_after(store, ALICE, change.read_at) is False
            put_rows(store, ALICE, RosterRow("c@example.com"))  # this node's own, any origin
            assert feed_changes(feed, until=1, timeout=0.3) == []  # never reported
            assert logged_after(store, ALICE, change.read_at) is True
        finally:
            feed.close()

    def test_logged_after_tells_an_entry_uncommitted_at_the_read_committed_since(
            self, store_factory):
        store, node_b, node_c = (store_factory.open() for _ in range(3))
        store.origin, node_b.origin, node_c.origin = "ejabberd@a", "ejabberd@b", "ejabberd@c"
        feed = store.open_change_feed()
        if feed is None:
            pytest.skip("no change log: logged_after is always False (the test above)")
        try:
            feed_changes(feed, until=0)
            put_rows(node_c, BOB, RosterRow("a@example.com"))
            with node_b.transaction(ALICE) as txn:
                txn.put(RosterRow("late@example.com"))
                txn.count()  # the write sent (an adapter may hold it until the next statement)
                [change] = feed_changes(feed, until=1)
                assert change.user == BOB
                assert logged_after(store, ALICE, change.read_at) is False  # not committed
            assert logged_after(store, ALICE, change.read_at) is True
        finally:
            feed.close()

    def test_describe_is_one_line(self, store):
        description = store.describe()
        assert description and "\n" not in description
