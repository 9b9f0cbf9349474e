"""The packaged `ejabberd-new` mapping: ejabberd 23.01's new SQL schema (`new_sql_schema: true`,
pg.new.sql), where one database holds the rosters of several virtual hosts, keyed by
`server_host`. Rosters that mod_roster_sql wrote are served unchanged, written back so that
stock ejabberd reads them correctly, and each host's rosters stay apart: the same localpart on
two hosts is two users, with two rosters, two versions and two change feeds.

The database is made by ejabberd's own pg.new.sql from Debian's ejabberd package, unchanged.
Roster rows are inserted as mod_roster_sql 23.01 writes them with the new schema (the upsert of
rosterusers keyed by (server_host, username, jid), then one rostergroups row per group,
roster_version with store_current_id), not by a running ejabberd (the e2e test
tests/e2e/test_ejabberd_schema_e2e.py has stock ejabberd write them). The program is the real
`roster-port serve` (and `roster-port check`), driven over pipes as the shim drives it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pg_cluster import load_ejabberd_schema
from roster_port.client import ProgramProcess
from roster_port.store.pg_changes import install_change_log

pytestmark = pytest.mark.postgres

HOST_A, HOST_B = "a.example", "b.example"
ALICE_A, ALICE_B = f"alice@{HOST_A}", f"alice@{HOST_B}"
BOB_A, BOB_B = f"bob@{HOST_A}", f"bob@{HOST_B}"
CAROL = "carol@elsewhere.example"

# mod_roster_sql 23.01, decode_subscription/1 and decode_ask/1: what stock ejabberd reads.
EJABBERD_SUBSCRIPTION = {"B": "both", "T": "to", "F": "from", "N": "none", "": "none"}
EJABBERD_ASK = {"S": "subscribe", "U": "unsubscribe", "B": "both", "O": "out", "I": "in",
                "N": "none", "": "none"}

DOCS_MAPPINGS = Path(__file__).resolve().parents[1] / "docs" / "mappings.md"


def schema_dsn(pg_server, *, new_schema: bool):
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    load_ejabberd_schema(dsn, new_schema=new_schema)
    return schema, dsn


@pytest.fixture
def dsn(pg_server) -> str:
    schema, dsn = schema_dsn(pg_server, new_schema=True)
    yield dsn
    pg_server.drop_schema(schema)


def sql(dsn: str, query: str, parameters: tuple = ()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(query, parameters)
        return cursor.fetchall() if cursor.description else []


def split(user: str) -> tuple[str, str]:
    username, _, host = user.partition("@")
    return username, host


def ejabberd_writes_item(dsn: str, user: str, contact: str, *, nick: str = "", subscription: str,
                         ask: str, askmessage: str = "", groups: tuple[str, ...] = ()) -> None:
    """What mod_roster_sql:update_roster/4 does for one #roster{} with new_sql_schema: true."""
    username, host = split(user)
    sql(dsn, """
        INSERT INTO rosterusers (username, server_host, jid, nick, subscription, ask, askmessage,
                                 server, subscribe, "type")
        VALUES (%s, %s, %s, %s, %s, %s, %s, 'N', '', 'item')
        ON CONFLICT (server_host, username, jid) DO UPDATE SET nick = excluded.nick,
            subscription = excluded.subscription, ask = excluded.ask,
            askmessage = excluded.askmessage, server = 'N', subscribe = '', "type" = 'item'
    """, (username, host, contact, nick, subscription, ask, askmessage))
    sql(dsn, "DELETE FROM rostergroups WHERE server_host = %s AND username = %s AND jid = %s",
        (host, username, contact))
    for group in groups:
        sql(dsn, "INSERT INTO rostergroups (username, server_host, jid, grp) VALUES (%s, %s, %s, %s)",
            (username, host, contact, group))
    sql(dsn, """INSERT INTO roster_version (username, server_host, version)
                VALUES (%s, %s, md5(random()::text))
                ON CONFLICT (server_host, username) DO UPDATE SET version = excluded.version""",
        (username, host))


def as_ejabberd_reads(dsn: str, user: str) -> dict[str, tuple]:
    """The roster as mod_roster_sql:get_roster/2 decodes it for one host:
    {jid: (nick, subscription, ask, askmessage, groups)}."""
    username, host = split(user)
    items = {}
    for jid, nick, subscription, ask, askmessage in sql(dsn, """
            SELECT jid, nick, subscription, ask, askmessage FROM rosterusers
            WHERE server_host = %s AND username = %s""", (host, username)):
        groups = sorted(group for (group,) in sql(
            dsn, "SELECT grp FROM rostergroups WHERE server_host = %s AND username = %s "
                 "AND jid = %s", (host, username, jid)))
        items[jid] = (nick, EJABBERD_SUBSCRIPTION[subscription.strip()],
                      EJABBERD_ASK[ask.strip()], askmessage, groups)
    return items


def stored_version(dsn: str, user: str) -> str | None:
    username, host = split(user)
    rows = sql(dsn, "SELECT version FROM roster_version WHERE server_host = %s AND username = %s",
               (host, username))
    return rows[0][0] if rows else None


def write_config(path: Path, dsn: str, mapping: str = "ejabberd-new") -> Path:
    path.write_text(
        f'[store]\nbackend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\n'
        f'mapping = {json.dumps(mapping)}\nconnect_timeout_s = 1.0\n'
        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n', encoding="utf-8")
    return path


@pytest.fixture
def config(tmp_path, dsn) -> Path:
    return write_config(tmp_path / "roster-port.toml", dsn)


@pytest.fixture
def program(config):
    with ProgramProcess(config) as process:
        yield process


def roster(program: ProgramProcess, user: str) -> dict[str, dict]:
    return {item["jid"]: item for item in program.call("roster_get", {"user": user})["items"]}


def query(program: ProgramProcess, user: str, ver: str | None) -> dict:
    return program.call("roster_iq", {"user": user, "requester": user, "type": "get",
                                      "items": [], "ver": ver})


def subscription_handshake(program: ProgramProcess, user: str, contact: str) -> None:
    """`user` asks `contact`, who approves: what the shim sends for the two hooks of each."""
    program.call("out_subscription", {"user": user, "contact": contact, "type": "subscribe",
                                      "status": "hi"})
    program.call("in_subscription", {"user": contact, "contact": user, "type": "subscribe",
                                     "status": "hi"})
    program.call("out_subscription", {"user": contact, "contact": user, "type": "subscribed",
                                      "status": None})
    program.call("in_subscription", {"user": user, "contact": contact, "type": "subscribed",
                                     "status": None})


# --- Served as stock ejabberd wrote them, each host its own ---------------------------------


def test_the_same_localpart_on_two_hosts_has_two_rosters_served_as_ejabberd_wrote_them(
        dsn, program):
    ejabberd_writes_item(dsn, ALICE_A, BOB_A, nick="Bob", subscription="B", ask="N",
                         groups=("Friends", "Work"))
    ejabberd_writes_item(dsn, ALICE_A, CAROL, subscription="N", ask="I", askmessage="from A")
    ejabberd_writes_item(dsn, ALICE_B, BOB_B, nick="Bob of B", subscription="T", ask="N",
                         groups=("B only",))
    # The same contact JID in both rosters, with different names and states.
    ejabberd_writes_item(dsn, ALICE_B, BOB_A, nick="Bob from A", subscription="N", ask="O")
    ejabberd_writes_item(dsn, ALICE_B, "old@example.org", subscription="F", ask="S")  # legacy

    assert roster(program, ALICE_A) == {BOB_A: {
        "jid": BOB_A, "name": "Bob", "subscription": "both", "ask": None, "approved": False,
        "groups": ["Friends", "Work"]}}
    items_b = roster(program, ALICE_B)
    assert set(items_b) == {BOB_B, BOB_A, "old@example.org"}
    assert items_b[BOB_B] == {"jid": BOB_B, "name": "Bob of B", "subscription": "to",
                              "ask": None, "approved": False, "groups": ["B only"]}
    assert (items_b[BOB_A]["name"], items_b[BOB_A]["subscription"], items_b[BOB_A]["ask"]) == (
        "Bob from A", "none", "subscribe")
    assert (items_b["old@example.org"]["subscription"], items_b["old@example.org"]["ask"]) == (
        "from", "subscribe")
    # A's stranger's request is A's only, as ejabberd shows it (not listed, re-sent at login).
    assert program.call("pending_in", {"user": ALICE_A})["requests"] == [
        {"from": CAROL, "status": "from A"}]
    assert program.call("pending_in", {"user": ALICE_B})["requests"] == []
    assert program.call("jid_info", {"user": ALICE_A, "contact": BOB_A})["subscription"] == "both"
    assert program.call("jid_info", {"user": ALICE_B, "contact": BOB_A})["subscription"] == "none"
    # A user with rows on another host only has none here.
    assert roster(program, BOB_A) == {} and query(program, BOB_A, None)["ver"] == "0"


def test_a_write_through_one_host_never_shows_on_the_other(dsn, program):
    ejabberd_writes_item(dsn, ALICE_A, BOB_A, nick="Bob", subscription="B", ask="N",
                         groups=("Friends",))
    ejabberd_writes_item(dsn, ALICE_B, BOB_A, nick="Bob", subscription="B", ask="N",
                         groups=("Friends",))
    stock_b, version_b = as_ejabberd_reads(dsn, ALICE_B), query(program, ALICE_B, None)["ver"]
    stored_b = stored_version(dsn, ALICE_B)

    # Rename and regroup (same contact JID on both hosts), add, handshake, remove: all on A.
    program.call("roster_iq", {"user": ALICE_A, "requester": ALICE_A, "type": "set",
                               "items": [{"jid": BOB_A, "name": "Robert", "groups": ["Work"]}]})
    program.call("roster_iq", {"user": ALICE_A, "requester": ALICE_A, "type": "set",
                               "items": [{"jid": CAROL, "name": "Carol"}]})
    subscription_handshake(program, ALICE_A, BOB_B)
    assert as_ejabberd_reads(dsn, ALICE_A) == {
        BOB_A: ("Robert", "both", "none", "", ["Work"]),
        CAROL: ("Carol", "none", "none", "", []),
        BOB_B: ("", "to", "none", "", [])}
    # bob@b.example's side of the handshake is on host B, under his own name only.
    assert as_ejabberd_reads(dsn, BOB_B) == {ALICE_A: ("", "from", "none", "", [])}
    program.call("roster_iq", {"user": ALICE_A, "requester": ALICE_A, "type": "set",
                               "items": [{"jid": BOB_A, "subscription": "remove"}]})
    assert BOB_A not in as_ejabberd_reads(dsn, ALICE_A)

    # alice@b.example: rows, groups and version as they were, for stock ejabberd and for us.
    assert as_ejabberd_reads(dsn, ALICE_B) == stock_b
    assert stored_version(dsn, ALICE_B) == stored_b
    assert query(program, ALICE_B, version_b)["items"] is None

    # Deleting the account on A keeps B's account's roster whole.
    program.call("remove_user", {"user": ALICE_A})
    assert as_ejabberd_reads(dsn, ALICE_A) == {}
    assert sql(dsn, "SELECT count(*) FROM rostergroups WHERE server_host = %s AND username = "
               "'alice'", (HOST_A,)) == [(0,)]
    assert as_ejabberd_reads(dsn, ALICE_B) == stock_b
    assert query(program, ALICE_B, version_b)["items"] is None


def test_versions_are_per_host_and_move_with_anyones_write_on_that_host(dsn, program):
    assert query(program, ALICE_A, None)["ver"] == "0"
    ejabberd_writes_item(dsn, ALICE_A, BOB_A, subscription="B", ask="N")
    ejabberd_writes_item(dsn, ALICE_B, BOB_A, subscription="B", ask="N")
    first_a, first_b = query(program, ALICE_A, "0")["ver"], query(program, ALICE_B, "0")["ver"]
    assert stored_version(dsn, ALICE_A) in first_a and stored_version(dsn, ALICE_B) in first_b
    assert first_a != first_b
    # An administrator's SQL on host A's rows: A's version moves, B's does not.
    sql(dsn, "UPDATE rosterusers SET nick = 'Bobby' WHERE server_host = %s AND username = "
             "'alice'", (HOST_A,))
    second_a = query(program, ALICE_A, first_a)
    assert second_a["items"] is not None and second_a["ver"] != first_a
    assert query(program, ALICE_B, first_b)["items"] is None
    # roster-port's own write on B moves B's stored version (store_current_id readers), not A's.
    before_a, before_b = stored_version(dsn, ALICE_A), stored_version(dsn, ALICE_B)
    program.call("roster_iq", {"user": ALICE_B, "requester": ALICE_B, "type": "set",
                               "items": [{"jid": BOB_A, "name": "Robert"}]})
    assert stored_version(dsn, ALICE_B) != before_b
    assert stored_version(dsn, ALICE_A) == before_a
    assert query(program, ALICE_A, second_a["ver"])["items"] is None
    assert sql(dsn, "SELECT server_host FROM roster_version WHERE username = 'alice' "
                    "ORDER BY server_host") == [(HOST_A,), (HOST_B,)]


def test_a_handshake_writes_ejabberds_rows_on_the_users_host_as_stock_reads_them(dsn, program):
    ejabberd_writes_item(dsn, ALICE_A, BOB_A, nick="Bob", subscription="N", ask="N",
                         groups=("Friends",))
    program.call("out_subscription", {"user": ALICE_A, "contact": BOB_A, "type": "subscribe",
                                      "status": "hi"})
    program.call("in_subscription", {"user": BOB_A, "contact": ALICE_A, "type": "subscribe",
                                     "status": "hi"})
    assert as_ejabberd_reads(dsn, ALICE_A) == {BOB_A: ("Bob", "none", "out", "", ["Friends"])}
    assert as_ejabberd_reads(dsn, BOB_A) == {ALICE_A: ("", "none", "in", "hi", [])}
    assert sql(dsn, """SELECT server_host, server, subscribe, "type" FROM rosterusers
                       WHERE username = 'bob'""") == [(HOST_A, "N", "", "request")]
    program.call("out_subscription", {"user": BOB_A, "contact": ALICE_A, "type": "subscribed",
                                      "status": None})
    program.call("in_subscription", {"user": ALICE_A, "contact": BOB_A, "type": "subscribed",
                                     "status": None})
    subscription_handshake(program, BOB_A, ALICE_A)
    assert as_ejabberd_reads(dsn, ALICE_A) == {BOB_A: ("Bob", "both", "none", "", ["Friends"])}
    assert as_ejabberd_reads(dsn, BOB_A) == {ALICE_A: ("", "both", "none", "", [])}
    assert sql(dsn, """SELECT username, server_host, subscription, ask, server, subscribe, "type"
                       FROM rosterusers ORDER BY username""") == [
        ("alice", HOST_A, "B", "N", "N", "", "item"), ("bob", HOST_A, "B", "N", "N", "", "item")]
    # Groups are written with the host too (stock's reads filter on it).
    assert sql(dsn, "SELECT username, server_host, jid, grp FROM rostergroups") == [
        ("alice", HOST_A, BOB_A, "Friends")]


# --- roster-port check: the mapping against the real schema ----------------------------------


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_check_accepts_the_new_mapping_on_pg_new_sql_and_refuses_either_mapping_on_the_other_schema(
        pg_server, tmp_path, dsn):
    fits = run_check(write_config(tmp_path / "new-on-new.toml", dsn))
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "through the mapping packaged mapping 'ejabberd-new' (read-write" in fits.stdout
    assert fits.stdout.rstrip().endswith("ok")

    # The old mapping on the new schema: its upserts have no unique index to land on.
    old_on_new = run_check(write_config(tmp_path / "old-on-new.toml", dsn, mapping="ejabberd"))
    assert old_on_new.returncode == 1
    assert re.search(r"statements\.put\[0\]: does not prepare \[42P10\]", old_on_new.stdout)
    assert "bump_version" in old_on_new.stdout

    # The new mapping on the old schema (pg.sql): no server_host column.
    schema, old_dsn = schema_dsn(pg_server, new_schema=False)
    try:
        new_on_old = run_check(write_config(tmp_path / "new-on-old.toml", old_dsn))
    finally:
        pg_server.drop_schema(schema)
    assert new_on_old.returncode == 1
    assert "statements.rows: does not prepare [42703]: column g.server_host does not exist" in (
        new_on_old.stdout)
    assert "Traceback" not in new_on_old.stdout + new_on_old.stderr


# --- The change feed: each host's programs report their own host's users ---------------------


def documented_triggers() -> str:
    """The SQL block of docs/mappings.md that installs the triggers for ejabberd's new schema."""
    text = DOCS_MAPPINGS.read_text(encoding="utf-8")
    blocks = [block for block in re.findall(r"```sql\n(.*?)```", text, re.S)
              if "rosterusers_log_change" in block]
    assert len(blocks) == 1, "docs/mappings.md must hold the rosterusers triggers once"
    return blocks[0]


def next_message(program: ProgramProcess, timeout: float) -> list | None:
    """The next message the program writes within `timeout` seconds, or None. (Not a select()
    on its stdout: two messages may come in one read, the second then waits in the client.)"""
    try:
        return program.read_message(timeout=timeout)
    except TimeoutError:
        return None


def program_of_host(config: Path, host: str) -> ProgramProcess:
    """A program as the feed worker of `host`'s pool says hello to it; once a ping is answered
    its feed reports every change committed after."""
    program = ProgramProcess(config, hello=False)
    hello = program.call("hello", {"protocols": [2], "shim": "test", "host": host,
                                   "node": "ejabberd@node1", "change_feed": True})
    assert hello["capabilities"]["notifications"] is True
    assert program.call("ping", {})["effects"] == []
    return program


def test_changes_made_in_sql_are_notified_to_their_own_hosts_programs_only(dsn, config):
    with psycopg.connect(dsn, autocommit=True) as connection:
        with connection.transaction():
            install_change_log(connection.cursor())
        connection.execute(documented_triggers())
    ejabberd_writes_item(dsn, ALICE_A, BOB_A, nick="Bob", subscription="B", ask="N")
    ejabberd_writes_item(dsn, ALICE_B, BOB_A, nick="Bob", subscription="B", ask="N")
    with program_of_host(config, HOST_A) as on_a, program_of_host(config, HOST_B) as on_b:
        # Alternating hosts, each change its own transaction. Each feed reads the log in
        # commit order, so a change of the other host reported by mistake would come before
        # that feed's last change: read each feed up to its last change, all of it its own.
        # (Changes of one user read in one go are folded into one notification.)
        sql(dsn, "UPDATE rosterusers SET nick = 'B-Bob' WHERE server_host = %s AND username = "
                 "'alice'", (HOST_B,))
        sql(dsn, "UPDATE rosterusers SET nick = 'A-Bob' WHERE server_host = %s AND username = "
                 "'alice'", (HOST_A,))
        sql(dsn, "UPDATE rosterusers SET nick = 'B-Bob 2' WHERE server_host = %s AND username = "
                 "'alice'", (HOST_B,))
        sql(dsn, "INSERT INTO rostergroups (username, server_host, jid, grp) "
                 "VALUES ('alice', %s, %s, 'Regrouped')", (HOST_A, BOB_A))
        deadline = time.monotonic() + 5.0
        for program, user, last in ((on_a, ALICE_A, ("A-Bob", ["Regrouped"])),
                                    (on_b, ALICE_B, ("B-Bob 2", []))):
            pushed = None
            while pushed != last:
                notification = next_message(program, max(0.0, deadline - time.monotonic()))
                assert notification is not None, f"{user}: {last} not notified within 5 s"
                assert notification[:2] == [2, "roster_changed"]
                assert notification[2]["user"] == user
                [push] = [effect for effect in notification[2]["effects"]
                          if effect["type"] == "push"]
                assert push["user"] == user and push["item"]["jid"] == BOB_A
                pushed = (push["item"]["name"], push["item"]["groups"])
        for program in (on_a, on_b):
            program.send("ping", {})
            assert next_message(program, 5.0)[0] == 1, "a notification came before the answer"

        # roster-port's own write on host A is in its response, notified to neither feed.
        program_a_result = on_a.call("roster_iq", {
            "user": ALICE_A, "requester": ALICE_A, "type": "set",
            "items": [{"jid": BOB_A, "name": "Own write"}]})
        assert program_a_result["effects"][0]["type"] == "push"
        for program in (on_a, on_b):
            program.send("ping", {})
            assert next_message(program, 5.0)[0] == 1, "own write notified"
