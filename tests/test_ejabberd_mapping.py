"""The packaged `ejabberd` mapping: rosters that ejabberd 23.01's mod_roster_sql wrote, served
unchanged by roster-port, and written back so that stock ejabberd reads them correctly.

The database is made by ejabberd's own pg.sql, loaded from Debian's ejabberd package at test
time (/usr/share/ejabberd/sql/pg.sql, the default single-host schema). Its roster rows are
inserted exactly as mod_roster_sql 23.01 writes them (its roster_subscribe/update_roster: an
upsert of rosterusers with server 'N', subscribe '', type 'item', the B/T/F/N subscription and
O/I/B/N ask letters, then one rostergroups row per group; roster_version written with
store_current_id), not by a running ejabberd. The program is the real `roster-port serve`,
driven over pipes as the shim drives it.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from pg_cluster import load_ejabberd_schema
from roster_port.client import ProgramProcess

pytestmark = pytest.mark.postgres

HOST = "example.com"
ALICE, BOB, CAROL, DAVE, EVE = (f"{name}@{HOST}" for name in ("alice", "bob", "carol", "dave", "eve"))

# mod_roster_sql 23.01, decode_subscription/1 and decode_ask/1: what stock ejabberd reads.
EJABBERD_SUBSCRIPTION = {"B": "both", "T": "to", "F": "from", "N": "none", "": "none"}
EJABBERD_ASK = {"S": "subscribe", "U": "unsubscribe", "B": "both", "O": "out", "I": "in",
                "N": "none", "": "none"}


@pytest.fixture
def dsn(pg_server) -> str:
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    load_ejabberd_schema(dsn)
    yield dsn
    pg_server.drop_schema(schema)


def sql(dsn: str, query: str, parameters: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(query, parameters)
        return cursor.fetchall() if cursor.description else []


def ejabberd_writes_item(dsn: str, user: str, contact: str, *, nick: str = "", subscription: str,
                         ask: str, askmessage: str = "", groups: tuple[str, ...] = ()) -> None:
    """What mod_roster_sql:update_roster/4 does for one #roster{} (letters as record_to_row)."""
    username = user.split("@")[0]
    sql(dsn, """
        INSERT INTO rosterusers (username, jid, nick, subscription, ask, askmessage, server,
                                 subscribe, "type")
        VALUES (%s, %s, %s, %s, %s, %s, 'N', '', 'item')
        ON CONFLICT (username, jid) DO UPDATE SET nick = excluded.nick,
            subscription = excluded.subscription, ask = excluded.ask,
            askmessage = excluded.askmessage, server = 'N', subscribe = '', "type" = 'item'
    """, (username, contact, nick, subscription, ask, askmessage))
    sql(dsn, "DELETE FROM rostergroups WHERE username = %s AND jid = %s", (username, contact))
    for group in groups:
        sql(dsn, "INSERT INTO rostergroups (username, jid, grp) VALUES (%s, %s, %s)",
            (username, contact, group))
    # store_current_id: true writes a new version with every change (a sha1 hex).
    sql(dsn, """INSERT INTO roster_version (username, version) VALUES (%s, md5(random()::text))
                ON CONFLICT (username) DO UPDATE SET version = excluded.version""", (username,))


def as_ejabberd_reads(dsn: str, user: str) -> dict[str, tuple]:
    """The roster as mod_roster_sql:get_roster/2 decodes it: {jid: (nick, sub, ask, groups)}."""
    username = user.split("@")[0]
    items = {}
    for jid, nick, subscription, ask, askmessage in sql(dsn, """
            SELECT jid, nick, subscription, ask, askmessage FROM rosterusers
            WHERE username = %s""", (username,)):
        groups = sorted(group for (group,) in sql(
            dsn, "SELECT grp FROM rostergroups WHERE username = %s AND jid = %s", (username, jid)))
        items[jid] = (nick, EJABBERD_SUBSCRIPTION[subscription.strip()],
                      EJABBERD_ASK[ask.strip()], askmessage, groups)
    return items


def stored_version(dsn: str, user: str) -> str | None:
    rows = sql(dsn, "SELECT version FROM roster_version WHERE username = %s", (user.split("@")[0],))
    return rows[0][0] if rows else None


@pytest.fixture
def program(tmp_path, dsn):
    config = tmp_path / "roster-port.toml"
    config.write_text(
        f'[store]\nbackend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\nmapping = "ejabberd"\n'
        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n', encoding="utf-8")
    with ProgramProcess(config) as process:
        yield process


def roster(program: ProgramProcess, user: str) -> dict[str, dict]:
    return {item["jid"]: item for item in program.call("roster_get", {"user": user})["items"]}


def test_rosters_ejabberd_wrote_are_served_unchanged(dsn, program):
    ejabberd_writes_item(dsn, ALICE, BOB, nick="Bob", subscription="B", ask="N",
                         groups=("Friends", "Work"))
    ejabberd_writes_item(dsn, ALICE, CAROL, nick="Carol", subscription="T", ask="N")
    ejabberd_writes_item(dsn, ALICE, DAVE, subscription="N", ask="O", groups=("Pending",))
    ejabberd_writes_item(dsn, ALICE, EVE, subscription="N", ask="I", askmessage="let me in")
    ejabberd_writes_item(dsn, ALICE, "old@example.org", subscription="F", ask="S")  # legacy ask

    items = roster(program, ALICE)
    assert items[BOB] == {"jid": BOB, "name": "Bob", "subscription": "both", "ask": None,
                          "approved": False, "groups": ["Friends", "Work"]}
    assert items[CAROL]["subscription"] == "to"
    assert items[DAVE]["subscription"] == "none" and items[DAVE]["ask"] == "subscribe"
    assert items["old@example.org"]["subscription"] == "from"
    assert items["old@example.org"]["ask"] == "subscribe"
    # none + pending in is a stranger's request, as ejabberd shows it: not listed, re-sent.
    assert EVE not in items
    assert program.call("pending_in", {"user": ALICE})["requests"] == [
        {"from": EVE, "status": "let me in"}]
    assert program.call("jid_info", {"user": ALICE, "contact": BOB}) == {
        "subscription": "both", "ask": "none", "groups": ["Friends", "Work"], "effects": []}
    assert program.call("jid_info", {"user": ALICE, "contact": EVE})["ask"] == "in"
    stored = {item["jid"]: item for item in
              program.call("store_get_roster", {"user": ALICE})["items"]}
    assert stored[EVE]["ask"] == "in" and stored[EVE]["askmessage"] == "let me in"


def test_versions_come_from_ejabberds_table_and_move_with_anyones_write(dsn, program):
    def query(ver):
        return program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "get",
                                          "items": [], "ver": ver})

    assert query(None)["ver"] == "0"
    ejabberd_writes_item(dsn, ALICE, BOB, subscription="B", ask="N")
    first = query("0")
    assert first["ver"] != "0" and stored_version(dsn, ALICE) in first["ver"]
    assert query(first["ver"])["items"] is None
    # An administrator's plain SQL, which moves no version row: the version moves anyway.
    sql(dsn, "UPDATE rosterusers SET nick = 'Bobby' WHERE username = 'alice'")
    second = query(first["ver"])
    assert second["items"] is not None and second["ver"] != first["ver"]
    # roster-port's own write moves ejabberd's stored version too (store_current_id readers).
    before = stored_version(dsn, ALICE)
    program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                               "items": [{"jid": BOB, "name": "Robert"}]})
    assert stored_version(dsn, ALICE) != before


def test_a_handshake_updates_ejabberds_rows_so_that_stock_ejabberd_reads_them_back(dsn, program):
    ejabberd_writes_item(dsn, ALICE, BOB, nick="Bob", subscription="N", ask="N", groups=("Friends",))
    program.call("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe",
                                      "status": "hi"})
    program.call("in_subscription", {"user": BOB, "contact": ALICE, "type": "subscribe",
                                     "status": "hi"})
    assert as_ejabberd_reads(dsn, ALICE) == {BOB: ("Bob", "none", "out", "", ["Friends"])}
    assert as_ejabberd_reads(dsn, BOB) == {ALICE: ("", "none", "in", "hi", [])}
    # Bob's row is a stranger's request: roster-port marks it in a column ejabberd never reads.
    assert sql(dsn, """SELECT server, subscribe, "type" FROM rosterusers
                       WHERE username = 'bob'""") == [("N", "", "request")]

    program.call("out_subscription", {"user": BOB, "contact": ALICE, "type": "subscribed",
                                      "status": None})
    program.call("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribed",
                                     "status": None})
    program.call("out_subscription", {"user": BOB, "contact": ALICE, "type": "subscribe",
                                      "status": None})
    program.call("in_subscription", {"user": ALICE, "contact": BOB, "type": "subscribe",
                                     "status": None})
    program.call("out_subscription", {"user": ALICE, "contact": BOB, "type": "subscribed",
                                      "status": None})
    program.call("in_subscription", {"user": BOB, "contact": ALICE, "type": "subscribed",
                                     "status": None})
    assert as_ejabberd_reads(dsn, ALICE) == {BOB: ("Bob", "both", "none", "", ["Friends"])}
    assert as_ejabberd_reads(dsn, BOB) == {ALICE: ("", "both", "none", "", [])}
    assert sql(dsn, """SELECT username, subscription, ask, server, subscribe, "type"
                       FROM rosterusers ORDER BY username""") == [
        ("alice", "B", "N", "N", "", "item"), ("bob", "B", "N", "N", "", "item")]
    assert roster(program, BOB)[ALICE]["subscription"] == "both"


def test_remove_and_remove_user_delete_ejabberds_rows_and_groups(dsn, program):
    ejabberd_writes_item(dsn, ALICE, BOB, subscription="B", ask="N", groups=("a", "b"))
    ejabberd_writes_item(dsn, ALICE, CAROL, subscription="N", ask="N", groups=("c",))
    ejabberd_writes_item(dsn, BOB, ALICE, subscription="B", ask="N")
    result = program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                        "items": [{"jid": CAROL, "subscription": "remove"}]})
    assert result["effects"][0]["item"]["subscription"] == "remove"
    assert set(as_ejabberd_reads(dsn, ALICE)) == {BOB}
    assert sql(dsn, "SELECT jid FROM rostergroups WHERE username = 'alice' ORDER BY grp") == [
        (BOB,), (BOB,)]
    program.call("remove_user", {"user": ALICE})
    assert as_ejabberd_reads(dsn, ALICE) == {}
    assert sql(dsn, "SELECT count(*) FROM rostergroups WHERE username = 'alice'") == [(0,)]
    assert set(as_ejabberd_reads(dsn, BOB)) == {ALICE}
