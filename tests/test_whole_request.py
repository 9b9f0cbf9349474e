"""A subscription request kept whole (RFC 6121 3.1.3: "the complete presence stanza comprising
the subscription request, including any extended content"): the program's side.

The shim sends an inbound subscribe's statuses (with their xml:lang) and extended content as
`request_elements` (docs/protocol.md); the program keeps them, bounded, with the pending
request, and answers them in `pending_in`. Over a real SQLite file (the dispatcher), and the
migrations of existing SQLite and PostgreSQL databases. What every adapter keeps of a whole
request is in the contract suite (tests/store_contract.py).
"""

from __future__ import annotations

import logging
import sqlite3

import psycopg
import pytest
import sqlite_utils

from roster_port.config import ConfigError, parse_config
from roster_port.roster import PENDING_ELEMENTS_BYTES, Rules
from roster_port.store import postgres
from roster_port.store.base import RosterRow
from roster_port.store.postgres import MIGRATIONS, PostgresStore
from roster_port.store.sqlite import SQLiteStore
from roster_port.store.sqlite_schema import SCHEMA
from test_dispatcher import ALICE, BOB, CAROL, Session, session_with

ELEMENTS = [
    "<status xml:lang='en'>Let me in</status>",
    "<status xml:lang='de'>Lass mich rein</status>",
    "<nick xmlns='http://jabber.org/protocol/nick'>Bob 🌹</nick>",
    "<preauth xmlns='urn:xmpp:pars:0' token='8ZgnL2h6'/>",
]


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "rosters.sqlite"))
    yield store
    store.close()


@pytest.fixture
def session(store):
    return Session(store, Rules())


def subscribe(session: Session, contact: str, elements, status: str | None = "Let me in",
              **extra) -> dict:
    args = {"user": ALICE, "contact": contact, "type": "subscribe", "status": status, **extra}
    if elements is not None:
        args["request_elements"] = elements
    return session.ok("in_subscription", args)


def pending(session: Session) -> dict[str, dict]:
    return {request["from"]: request
            for request in session.ok("pending_in", {"user": ALICE})["requests"]}


def version(store, user: str = ALICE) -> str:
    with store.snapshot(user) as txn:
        return txn.version()


def test_a_request_is_kept_whole_and_answered_at_login(session):
    assert subscribe(session, BOB, ELEMENTS)["deliver"] is True
    assert pending(session)[BOB] == {"from": BOB, "status": "Let me in",
                                     "request_elements": ELEMENTS}


def test_a_repeated_request_keeps_the_first_and_writes_nothing(session, store):
    """A repeat moves neither the version nor the change log: every node's feed would push an
    unchanged item for it, and a remote server could make one write per stanza."""
    subscribe(session, BOB, ELEMENTS)
    newer = ["<preauth xmlns='urn:xmpp:pars:0' token='newer'/>"]
    before = version(store)
    assert subscribe(session, BOB, newer, status="again") == {"deliver": False, "effects": []}
    assert pending(session)[BOB] == {"from": BOB, "status": "Let me in",
                                     "request_elements": ELEMENTS}
    assert version(store) == before
    # The journal sending the same presence again (its answer lost) changes nothing either.
    subscribe(session, BOB, newer, status=None, replay=True)
    assert version(store) == before


def test_without_request_elements_the_text_is_kept_as_before(session):
    # An older shim sends no request_elements: a repeat without text keeps the stored text.
    subscribe(session, BOB, None, status="first")
    subscribe(session, BOB, None, status=None)
    assert pending(session)[BOB] == {"from": BOB, "status": "first"}


def test_an_answered_request_forgets_its_elements(session):
    subscribe(session, BOB, ELEMENTS)
    session.out(ALICE, BOB, "subscribed")  # approved: from, nothing pending in
    assert BOB not in pending(session)
    with session.dispatcher.store.snapshot(ALICE) as txn:
        assert txn.get(BOB).request_elements == ()
    # Denied: the stranger's request is gone with its elements.
    subscribe(session, CAROL, ELEMENTS)
    session.out(ALICE, CAROL, "unsubscribed")
    with session.dispatcher.store.snapshot(ALICE) as txn:
        assert txn.get(CAROL) is None


def test_an_outbound_request_keeps_nothing(session):
    session.ok("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe",
                                    "status": "hi", "request_elements": ELEMENTS})
    with session.dispatcher.store.snapshot(ALICE) as txn:
        row = txn.get(BOB)
    assert row.pending_out and row.request_elements == () and row.request_text == ""


# --- Bounds: a remote server may send any request ---------------------------------------------


def test_at_most_max_request_elements_are_kept(session, caplog):
    many = [f"<nick xmlns='http://jabber.org/protocol/nick'>{index}</nick>" for index in range(40)]
    with caplog.at_level(logging.WARNING):
        assert subscribe(session, BOB, many)["deliver"] is True
    assert pending(session)[BOB]["request_elements"] == many[:32]
    assert "without 8 of its 40 elements" in caplog.text


def test_an_element_over_the_byte_bound_is_dropped_whole(store, caplog):
    session = session_with(store, max_request_bytes=1000)
    huge = "<nick xmlns='http://jabber.org/protocol/nick'>" + "n" * 2000 + "</nick>"
    fits = "<nick xmlns='http://jabber.org/protocol/nick'>" + "m" * 600 + "</nick>"
    with caplog.at_level(logging.WARNING):
        # Delivered all the same: the live stanza is the shim's, untouched.
        assert subscribe(session, BOB, [ELEMENTS[0], huge, fits, fits, ELEMENTS[3]])["deliver"]
    # In order, whole, within the bound: the second `fits` would go over it.
    assert pending(session)[BOB]["request_elements"] == [ELEMENTS[0], fits, ELEMENTS[3]]
    assert "without 2 of its 5 elements" in caplog.text
    # Bytes of UTF-8, not characters.
    subscribe(session, CAROL, ["é" * 600])
    assert "request_elements" not in pending(session)[CAROL]


def test_elements_that_are_not_text_are_dropped_and_the_request_kept(session, caplog):
    with caplog.at_level(logging.WARNING):
        subscribe(session, BOB, [ELEMENTS[2], 7, None, ["x"], "a\x00b", ELEMENTS[3]])
        subscribe(session, CAROL, {"not": "a list"})
    assert pending(session)[BOB]["request_elements"] == [ELEMENTS[2], ELEMENTS[3]]
    assert pending(session)[CAROL] == {"from": CAROL, "status": "Let me in"}
    assert "is dict, not a list" in caplog.text


def test_a_pending_in_answer_carries_a_bounded_total_of_elements(session, caplog):
    big = ["<nick xmlns='http://jabber.org/protocol/nick'>" + "n" * 16000 + "</nick>"]
    count = PENDING_ELEMENTS_BYTES // 16000 + 20
    for index in range(count):
        subscribe(session, f"spam{index:04d}@example.net", big)
    with caplog.at_level(logging.WARNING):
        requests = session.ok("pending_in", {"user": ALICE})["requests"]
    # Every request is re-sent; those past the budget with their text only.
    assert len(requests) == count
    whole = [request for request in requests if "request_elements" in request]
    assert sum(len(request["request_elements"][0]) for request in whole) <= PENDING_ELEMENTS_BYTES
    assert count - len(whole) >= 20
    assert all(request["status"] == "Let me in" for request in requests)
    assert "re-sent with their text only" in caplog.text


def test_the_bounds_are_configurable_within_the_protocols():
    limits = parse_config({"limits": {"max_request_bytes": 4096, "max_request_elements": 8}}).limits
    assert (limits.max_request_bytes, limits.max_request_elements) == (4096, 8)
    with pytest.raises(ConfigError, match="max_request_elements"):
        parse_config({"limits": {"max_request_elements": 5000}})


# --- The storage API (ejabberdctl, XEP-0227): #roster{} has no place for the elements ------


def test_a_stored_record_written_back_keeps_the_whole_request(session):
    subscribe(session, BOB, ELEMENTS)
    record = session.item(ALICE, BOB)
    session.ok("store_set_item", {"user": ALICE, "item": record})
    assert pending(session)[BOB]["request_elements"] == ELEMENTS
    # A record with another text is another request: its elements are not the stored ones.
    session.ok("store_set_item", {"user": ALICE, "item": {**record, "askmessage": "other"}})
    assert pending(session)[BOB] == {"from": BOB, "status": "other"}


# --- Migrations of existing databases -------------------------------------------------------


def test_an_existing_sqlite_database_is_migrated_and_keeps_its_requests(tmp_path):
    path = str(tmp_path / "old.sqlite")
    SCHEMA.apply(sqlite_utils.Database(path), stop_before="0005_request_elements")
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("INSERT INTO roster_items (user, contact, pending_in, in_roster, "
                           "request_text) VALUES (?, ?, 1, 0, 'old request')", (ALICE, BOB))
    connection.close()
    store = SQLiteStore(path)
    try:
        with store.snapshot(ALICE) as txn:
            assert txn.get(BOB) == RosterRow(BOB, pending_in=True, in_roster=False,
                                             request_text="old request")
        whole = RosterRow(CAROL, pending_in=True, in_roster=False,
                          request_elements=tuple(ELEMENTS))
        with store.transaction(ALICE) as txn:
            txn.put(whole)
        with store.snapshot(ALICE) as txn:
            assert txn.get(CAROL) == whole
    finally:
        store.close()
    # Another application's garbage in the column is refused by its CHECK.
    connection = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError):
        with connection:
            connection.execute("UPDATE roster_items SET request_elements = '{}'")
    connection.close()


@pytest.mark.postgres
def test_an_existing_postgres_database_is_migrated_and_keeps_its_requests(pg_server,
                                                                          monkeypatch):
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    try:
        with monkeypatch.context() as patched:
            # The database as the release before this column left it.
            patched.setattr(postgres, "MIGRATIONS", [m for m in MIGRATIONS
                                                     if m.name != "request_elements"])
            old = PostgresStore(dsn)
            with old.snapshot(ALICE) as txn:  # reached and migrated
                assert txn.version() == "0"
            old.close()
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute("INSERT INTO roster_items (username, contact, pending_in, "
                               "in_roster, request_text) VALUES (%s, %s, true, false, "
                               "'old request')", (ALICE, BOB))
        store = PostgresStore(dsn)
        try:
            with store.snapshot(ALICE) as txn:
                assert txn.get(BOB) == RosterRow(BOB, pending_in=True, in_roster=False,
                                                 request_text="old request")
            whole = RosterRow(CAROL, pending_in=True, in_roster=False,
                              request_elements=tuple(ELEMENTS))
            with store.transaction(ALICE) as txn:
                txn.put(whole)
            with store.snapshot(ALICE) as txn:
                assert txn.get(CAROL) == whole
        finally:
            store.close()
        with psycopg.connect(dsn, autocommit=True) as connection:
            applied = [name for (name,) in connection.execute(
                "SELECT name FROM roster_port_migrations ORDER BY number")]
            assert "request_elements" in applied and applied[-1] == "change_log_by_user"
            with pytest.raises(psycopg.errors.CheckViolation):
                connection.execute("UPDATE roster_items SET request_elements = "
                                   "ARRAY[NULL]::text[]")
    finally:
        pg_server.drop_schema(schema)
