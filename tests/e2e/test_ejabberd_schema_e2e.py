"""Switching a live site from stock mod_roster_sql to roster-port and back, with no migration.

The ejabberd mapping (roster_port/mappings/ejabberd.toml) claims to read and write ejabberd
23.01's own tables exactly as mod_roster_sql does. Here the rows are not written by a test
fixture but by ejabberd itself:

1. A stock ejabberd 23.01 (mod_roster `db_type: sql`, `sql_type: pgsql`, no mod_roster_port)
   on a database created with ejabberd's own pg.sql from the Debian package; real clients build
   rosters: items with groups, a full two-way subscription handshake, pending requests.
2. The same node (same Mnesia accounts) restarted with mod_roster_port and the program on
   `backend = "postgres_mapped"`, `mapping = "ejabberd"`, on the same database: the clients see
   exactly the rosters stock ejabberd served (raw roster gets), pending requests included, and
   go on: a pending request is answered, a new handshake is made.
3. Back to stock mod_roster_sql: stock ejabberd serves exactly what roster-port wrote.

The second test does the same with ejabberd's new schema (`new_sql_schema: true`, pg.new.sql,
`mapping = "ejabberd-new"`) on one node serving two virtual hosts from one database, with the
same localparts on both hosts: each host's rosters, versions, pushes and change feed apart.

ejabberd's pg.sql creates unqualified tables (and ejabberd 23.01 has no option for a search
path), so each test gets a database of its own, which ejabberd reaches as the `public` schema.

Groups are compared as sets: RFC 6121 groups have no order, and stock ejabberd itself returns
an item's groups in the reverse of their rostergroups rows' order while the mapping returns
them in row order.
"""

from __future__ import annotations

import asyncio
import time
import contextlib
import json
import re
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from roster_port.store.pg_changes import install_change_log

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer
from pg_cluster import ejabberd_pg_sql
from xmpp_client import Client, Item

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PASSWORD = "secret"
HOST = "localhost"
USERS = ("alice", "bob", "carol", "dave")


def jid(username: str) -> str:
    """The bare JID of a user of HOST; a bare JID (a user of another host) as it is."""
    return username if "@" in username else f"{username}@{HOST}"


@pytest.fixture
def ejabberd_database(pg_server):
    """A fresh database holding ejabberd's pg.sql, unchanged; dropped afterwards."""
    with fresh_database(pg_server, ejabberd_pg_sql()) as dsn:
        yield dsn


@contextlib.contextmanager
def fresh_database(pg_server, schema_sql: str):
    """A database of its own holding `schema_sql` (ejabberd's, unchanged); dropped after."""
    name = f"ejabberd_{uuid.uuid4().hex[:12]}"
    with pg_server.connect(pg_server.admin_dsn) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'")
                      .format(sql.Identifier(name)))
    dsn = make_conninfo(pg_server.admin_dsn, dbname=name)
    try:
        with pg_server.connect(dsn) as connection:
            connection.execute(schema_sql)
        yield dsn
    finally:
        with pg_server.connect(pg_server.admin_dsn) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))


def stock_then_port_node(workdir: Path, database: str, mapping: str, **options) -> EjabberdServer:
    """One ejabberd node, first configured as stock ejabberd on `database`; the test switches
    `roster_backend` between "sql" (stock) and "port" (roster-port, `mapping`) and restarts it."""
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        pytest.skip("ejabberd 23.01 is not installed (scripts/bootstrap installs it)")
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        pytest.skip("the shim is not built (make -C erlang_shim)")
    parts = conninfo_to_dict(database)
    return EjabberdServer(
        workdir, roster_backend="sql",
        # ejabberd's own SQL connection (p1_pgsql) to the same database as the program's.
        sql={"type": "pgsql", "server": parts["host"], "port": int(parts["port"]),
             "database": parts["dbname"], "username": parts["user"],
             "password": parts.get("password", "")},
        store_section=('backend = "postgres_mapped"\n'
                       f"dsn = {json.dumps(database)}\n"
                       f"mapping = {json.dumps(mapping)}\n"),
        **options,
    )


@pytest.fixture
def server(tmp_path: Path, ejabberd_database: str):
    node = stock_then_port_node(tmp_path / "ejabberd", ejabberd_database, "ejabberd", host=HOST)
    try:
        yield node
    finally:
        node.stop()


def restart_as(node: EjabberdServer, roster_backend: str) -> None:
    # The same EjabberdServer keeps its node name, hence its Mnesia spool: the accounts
    # registered under stock ejabberd are still there.
    node.stop()
    node.roster_backend = roster_backend
    node.start()


def view(item: Item) -> tuple:
    """What a client can see of an item, groups as a set (they have no order). An item without
    a name has no name attribute (None), from stock ejabberd as from roster-port."""
    return (item.subscription, item.ask, item.name, frozenset(item.groups), item.approved)


def rows(dsn: str, table: str) -> set[tuple]:
    with psycopg.connect(dsn) as connection:
        if table == "rosterusers":
            return set(connection.execute(
                "SELECT username, jid, nick, subscription, ask, askmessage FROM rosterusers"))
        return set(connection.execute("SELECT username, jid, grp FROM rostergroups"))


class Clients:
    """Logs every user in (available), as the phases need, and out again."""

    def __init__(self, node: EjabberdServer):
        self.node = node
        self.by_name: dict[str, Client] = {}

    async def login(self, *names: str) -> list[Client]:
        for name in names:
            client = Client(f"{jid(name)}/test", PASSWORD, self.node.c2s_port, self.node.ip)
            client.xmpp.plugin["feature_mechanisms"].use_mech = "PLAIN"
            await client.connect(available=True)
            self.by_name[name] = client
        return [self.by_name[name] for name in names]

    async def rosters(self) -> dict[str, dict[str, tuple]]:
        """Every logged-in user's roster, by raw roster get: the server's view."""
        return {name: {contact: view(item)
                       for contact, item in (await client.roster_get()).items.items()}
                for name, client in self.by_name.items()}

    async def requests_at_login(self) -> dict[str, set[tuple[str, str | None]]]:
        """The subscription requests each user was sent since login: (from, text)."""
        # Stored requests are sent by the c2s_self_presence hook, in the session's process,
        # while it handles the available presence: a roster get sent after that presence is
        # answered by the same process after it, so once it is answered they have all come.
        for client in self.by_name.values():
            await client.roster_get()
        return {name: {(p.from_jid, p.status) for p in client.presences if p.type == "subscribe"}
                for name, client in self.by_name.items()}

    async def logout(self) -> None:
        for client in self.by_name.values():
            client.xmpp.disconnect()
        self.by_name.clear()
        # Until ejabberd has closed the sessions (the next phase may restart it or log in
        # again with the same resources).
        deadline = time.monotonic() + 10
        while self.node.rpc("io:format(\"~p~n\", [rpc:call(Node, ejabberd_sm, "
                            "connected_users_number, [])])").strip().splitlines()[-1] != "0":
            assert time.monotonic() < deadline, "sessions still open 10 s after logout"
            await asyncio.sleep(0.05)


async def wait_for(client: Client, contact: str, predicate, timeout: float = 5.0) -> None:
    await client.wait_for(lambda c: c.pushes_for(contact)
                          and predicate(c.pushes_for(contact)[-1].item), timeout)


def test_rosters_written_by_stock_ejabberd_are_served_by_roster_port_and_back(
        server: EjabberdServer, ejabberd_database: str):
    # --- 1. Stock ejabberd on PostgreSQL builds the rosters -----------------------------------
    server.start()
    server.register(*USERS, password=PASSWORD)

    async def stock_builds_rosters() -> tuple[dict, dict]:
        clients = Clients(server)
        alice, bob, carol = await clients.login("alice", "bob", "carol")
        # Items with groups and names, set by the clients.
        await alice.roster_set(jid("bob"), name="Bob", groups=("Friends", "Work"))
        await alice.roster_set(jid("carol"), name="Carol", groups=("Family",))
        await bob.roster_set(jid("alice"), name="Alice", groups=("Friends",))
        # A full handshake both ways between Alice and Bob.
        alice.send_subscription(jid("bob"), "subscribe", status="hi Bob")
        await bob.wait_for(lambda c: c.presences_from(jid("alice"), "subscribe"))
        bob.send_subscription(jid("alice"), "subscribed")
        await wait_for(alice, jid("bob"), lambda i: i.subscription == "to")
        bob.send_subscription(jid("alice"), "subscribe")
        await alice.wait_for(lambda c: c.presences_from(jid("bob"), "subscribe"))
        alice.send_subscription(jid("bob"), "subscribed")
        await wait_for(alice, jid("bob"), lambda i: i.subscription == "both")
        await wait_for(bob, jid("alice"), lambda i: i.subscription == "both")
        # Pending, unanswered: Alice asks Carol (who does not answer); Dave, offline all along
        # and unknown to Alice, asks Alice (his request is stored in Alice's rows).
        alice.send_subscription(jid("carol"), "subscribe", status="hi Carol")
        await carol.wait_for(lambda c: c.presences_from(jid("alice"), "subscribe"))
        await wait_for(alice, jid("carol"), lambda i: i.ask == "subscribe")
        await clients.logout()
        (dave,) = await clients.login("dave")
        dave.send_subscription(jid("alice"), "subscribe", status="I'm Dave")
        await wait_for(dave, jid("alice"), lambda i: i.ask == "subscribe")
        await clients.logout()

        # What stock ejabberd serves, read back by fresh sessions, and the requests it
        # re-sends at login.
        await clients.login(*USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        await clients.logout()
        return seen

    stock_rosters, stock_requests = asyncio.run(stock_builds_rosters())
    # The stock server really built what the test means (else comparing proves little).
    assert stock_rosters["alice"] == {
        jid("bob"): ("both", None, "Bob", frozenset({"Friends", "Work"}), False),
        jid("carol"): ("none", "subscribe", "Carol", frozenset({"Family"}), False),
    }
    assert stock_rosters["bob"] == {
        jid("alice"): ("both", None, "Alice", frozenset({"Friends"}), False)}
    assert stock_rosters["dave"] == {jid("alice"): ("none", "subscribe", None, frozenset(), False)}
    assert stock_rosters["carol"] == {}
    assert stock_requests["alice"] == {(jid("dave"), "I'm Dave")}
    assert stock_requests["carol"] == {(jid("alice"), "hi Carol")}
    # ...in ejabberd's own tables, in its own letters.
    stored = rows(ejabberd_database, "rosterusers")
    assert ("alice", jid("bob"), "Bob", "B", "N", "") in stored
    assert ("alice", jid("carol"), "Carol", "N", "O", "") in stored
    assert ("alice", jid("dave"), "", "N", "I", "I'm Dave") in stored

    # --- 2. roster-port on the same tables: the same rosters, and it goes on ------------------
    restart_as(server, "port")

    async def roster_port_serves_and_writes() -> tuple[dict, dict, dict]:
        clients = Clients(server)
        await clients.login(*USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        alice, bob, carol, dave = (clients.by_name[n] for n in USERS)

        # Carol answers the request Alice made under stock ejabberd.
        carol.send_subscription(jid("alice"), "subscribed")
        await wait_for(alice, jid("carol"), lambda i: (i.subscription, i.ask) == ("to", None))
        await wait_for(carol, jid("alice"), lambda i: i.subscription == "from")
        # A new handshake: Bob asks Carol, who approves.
        bob.send_subscription(jid("carol"), "subscribe", status="hi Carol, Bob here")
        [request] = await carol.wait_for(lambda c: c.presences_from(jid("bob"), "subscribe"))
        assert request.status == "hi Carol, Bob here"
        carol.send_subscription(jid("bob"), "subscribed")
        await wait_for(bob, jid("carol"), lambda i: i.subscription == "to")
        # A new item with groups.
        await carol.roster_set(jid("bob"), name="Bobby", groups=("Band", "Friends"))
        await wait_for(carol, jid("bob"), lambda i: i.name == "Bobby")
        after = await clients.rosters()
        await clients.logout()
        return seen + (after,)

    port_rosters, port_requests, port_after = asyncio.run(roster_port_serves_and_writes())
    assert port_rosters == stock_rosters
    assert port_requests == stock_requests
    assert port_after["alice"][jid("carol")] == ("to", None, "Carol", frozenset({"Family"}), False)
    assert port_after["carol"] == {
        jid("alice"): ("from", None, None, frozenset(), False),
        jid("bob"): ("from", None, "Bobby", frozenset({"Band", "Friends"}), False)}
    assert port_after["bob"][jid("carol")] == ("to", None, None, frozenset(), False)
    # Written in ejabberd's letters, in ejabberd's tables.
    stored = rows(ejabberd_database, "rosterusers")
    assert ("alice", jid("carol"), "Carol", "T", "N", "") in stored
    assert ("carol", jid("bob"), "Bobby", "F", "N", "") in stored
    assert ("bob", jid("carol"), "", "T", "N", "") in stored
    assert {("carol", jid("bob"), "Band"), ("carol", jid("bob"), "Friends")} <= rows(
        ejabberd_database, "rostergroups")

    # --- 3. Back to stock ejabberd: it reads what roster-port wrote --------------------------
    restart_as(server, "sql")

    async def stock_reads_back() -> tuple[dict, dict]:
        clients = Clients(server)
        await clients.login(*USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        await clients.logout()
        return seen

    stock_again, stock_requests_again = asyncio.run(stock_reads_back())
    assert stock_again == port_after
    # Only Dave's request to Alice is still unanswered.
    assert stock_requests_again == {"alice": {(jid("dave"), "I'm Dave")}, "bob": set(),
                                    "carol": set(), "dave": set()}


# --- The new schema: new_sql_schema: true, two virtual hosts on one database -----------------

HOST_A, HOST_B = "a.example", "b.example"
# The same localparts on both hosts: four accounts, four rosters.
ALICE_A, BOB_A, ALICE_B, BOB_B = (f"{user}@{host}" for host in (HOST_A, HOST_B)
                                  for user in ("alice", "bob"))
TWO_HOST_USERS = (ALICE_A, BOB_A, ALICE_B, BOB_B)


@pytest.fixture
def ejabberd_new_database(pg_server):
    """A fresh database holding ejabberd's pg.new.sql, unchanged; dropped afterwards."""
    with fresh_database(pg_server, ejabberd_pg_sql(new_schema=True)) as dsn:
        yield dsn


@pytest.fixture
def two_host_server(tmp_path: Path, ejabberd_new_database: str):
    node = stock_then_port_node(tmp_path / "ejabberd", ejabberd_new_database, "ejabberd-new",
                                host=HOST_A, extra_hosts=(HOST_B,), new_sql_schema=True)
    try:
        yield node
    finally:
        node.stop()


def new_schema_rows(dsn: str) -> set[tuple]:
    with psycopg.connect(dsn) as connection:
        return set(connection.execute(
            "SELECT server_host, username, jid, nick, subscription, ask FROM rosterusers"))


def install_documented_change_log(dsn: str) -> None:
    """The change log and docs/mappings.md's triggers for the new schema, as an operator
    installs them: changes made in SQL are then pushed live, each to its own host."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "mappings.md").read_text("utf-8")
    [triggers] = [block for block in re.findall(r"```sql\n(.*?)```", docs, re.S)
                  if "rosterusers_log_change" in block]
    with psycopg.connect(dsn) as connection:
        install_change_log(connection.cursor())
        connection.execute(triggers)


async def handshake(asker: Client, approver: Client) -> None:
    asker.send_subscription(approver.bare, "subscribe")
    await approver.wait_for(lambda c: c.presences_from(asker.bare, "subscribe"))
    approver.send_subscription(asker.bare, "subscribed")
    await wait_for(asker, approver.bare, lambda i: i.subscription in ("to", "both"))


def test_two_virtual_hosts_on_the_new_schema_stock_fills_roster_port_serves_stock_reads_back(
        two_host_server: EjabberdServer, ejabberd_new_database: str):
    server, database = two_host_server, ejabberd_new_database
    # --- 1. Stock ejabberd, new_sql_schema: true, two hosts, one database ----------------------
    server.start()
    for host in (HOST_A, HOST_B):
        server.register("alice", "bob", password=PASSWORD, host=host)

    async def stock_builds_rosters() -> tuple[dict, dict]:
        clients = Clients(server)
        alice_a, bob_a, alice_b, bob_b = await clients.login(*TWO_HOST_USERS)
        # The same localparts, different rosters: A's Alice and Bob are friends both ways.
        await alice_a.roster_set(BOB_A, name="Bob", groups=("Friends",))
        await handshake(alice_a, bob_a)
        await handshake(bob_a, alice_a)
        await wait_for(alice_a, BOB_A, lambda i: i.subscription == "both")
        # B's Alice names her Bob otherwise and asks him; he does not answer yet.
        await alice_b.roster_set(BOB_B, name="Bob of B", groups=("Family",))
        alice_b.send_subscription(BOB_B, "subscribe", status="B here")
        await bob_b.wait_for(lambda c: c.presences_from(ALICE_B, "subscribe"))
        await wait_for(alice_b, BOB_B, lambda i: i.ask == "subscribe")
        # Across the hosts: B's Alice follows A's Alice.
        await handshake(alice_b, alice_a)
        await clients.logout()
        await clients.login(*TWO_HOST_USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        await clients.logout()
        return seen

    stock_rosters, stock_requests = asyncio.run(stock_builds_rosters())
    assert stock_rosters == {
        ALICE_A: {BOB_A: ("both", None, "Bob", frozenset({"Friends"}), False),
                  ALICE_B: ("from", None, None, frozenset(), False)},
        BOB_A: {ALICE_A: ("both", None, None, frozenset(), False)},
        ALICE_B: {BOB_B: ("none", "subscribe", "Bob of B", frozenset({"Family"}), False),
                  ALICE_A: ("to", None, None, frozenset(), False)},
        BOB_B: {},
    }
    assert stock_requests == {ALICE_A: set(), BOB_A: set(), ALICE_B: set(),
                              BOB_B: {(ALICE_B, "B here")}}
    # ...in ejabberd's new schema: one database, rows keyed by host.
    stored = new_schema_rows(database)
    assert (HOST_A, "alice", BOB_A, "Bob", "B", "N") in stored
    assert (HOST_B, "alice", BOB_B, "Bob of B", "N", "O") in stored
    assert (HOST_B, "bob", ALICE_B, "", "N", "I") in stored

    # --- 2. roster-port (mapping ejabberd-new) on the same tables, both hosts ------------------
    server.stop()
    install_documented_change_log(database)
    restart_as(server, "port")

    async def roster_port_serves_and_writes() -> tuple[dict, dict, dict]:
        clients = Clients(server)
        await clients.login(*TWO_HOST_USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        alice_a, bob_a, alice_b, bob_b = (clients.by_name[user] for user in TWO_HOST_USERS)
        version_b = (await alice_b.roster_get()).ver

        # A write on host A: A's Alice renames her Bob. B's Alice (same localpart) is not
        # pushed, and her version does not move.
        await alice_a.roster_set(BOB_A, name="Robert", groups=("Work",))
        await wait_for(alice_a, BOB_A, lambda i: i.name == "Robert")
        assert (await alice_b.roster_get(version_b)).items is None
        # B's Bob answers the request B's Alice made under stock ejabberd.
        bob_b.send_subscription(ALICE_B, "subscribed")
        await wait_for(alice_b, BOB_B, lambda i: (i.subscription, i.ask) == ("to", None))
        await wait_for(bob_b, ALICE_B, lambda i: i.subscription == "from")

        # Changes made in SQL (an administrator's), through each host's change feed: each
        # reaches its own user's sessions, once.
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute("UPDATE rosterusers SET nick = 'Admin A' WHERE server_host = %s "
                          "AND username = 'alice' AND jid = %s", (HOST_A, BOB_A))
            admin.execute("UPDATE rosterusers SET nick = 'Admin B' WHERE server_host = %s "
                          "AND username = 'alice' AND jid = %s", (HOST_B, BOB_B))
            await wait_for(alice_a, BOB_A, lambda i: i.name == "Admin A")
            await wait_for(alice_b, BOB_B, lambda i: i.name == "Admin B")
            # One more change on each host, after: a feed reporting the other host's change
            # would have sent it before this one, and a roster get answered after the push
            # comes after anything sent to that session before it.
            admin.execute("UPDATE rosterusers SET nick = 'Admin A 2' WHERE server_host = %s "
                          "AND username = 'alice' AND jid = %s", (HOST_A, BOB_A))
            admin.execute("UPDATE rosterusers SET nick = 'Admin B 2' WHERE server_host = %s "
                          "AND username = 'alice' AND jid = %s", (HOST_B, BOB_B))
        await wait_for(alice_a, BOB_A, lambda i: i.name == "Admin A 2")
        await wait_for(alice_b, BOB_B, lambda i: i.name == "Admin B 2")
        await alice_a.roster_get()
        await alice_b.roster_get()
        for client, own, other, name in ((alice_a, BOB_A, BOB_B, "Admin A"),
                                         (alice_b, BOB_B, BOB_A, "Admin B")):
            names = [push.item.name for push in client.pushes_for(own)]
            assert names.count(name) == 1 and names.count(f"{name} 2") == 1, names
            assert client.pushes_for(other) == [], client.pushes
        # Neither Bob was pushed anything of Alice's rosters.
        assert bob_a.pushes == [] and {p.item.jid for p in bob_b.pushes} == {ALICE_B}
        after = await clients.rosters()
        await clients.logout()
        return seen + (after,)

    port_rosters, port_requests, port_after = asyncio.run(roster_port_serves_and_writes())
    assert port_rosters == stock_rosters
    assert port_requests == stock_requests
    assert port_after[ALICE_A][BOB_A] == ("both", None, "Admin A 2", frozenset({"Work"}), False)
    assert port_after[ALICE_B] == {
        BOB_B: ("to", None, "Admin B 2", frozenset({"Family"}), False),
        ALICE_A: ("to", None, None, frozenset(), False)}
    assert port_after[BOB_B] == {ALICE_B: ("from", None, None, frozenset(), False)}
    assert port_after[BOB_A] == stock_rosters[BOB_A]
    stored = new_schema_rows(database)
    assert (HOST_A, "alice", BOB_A, "Admin A 2", "B", "N") in stored
    assert (HOST_B, "alice", BOB_B, "Admin B 2", "T", "N") in stored
    assert (HOST_B, "bob", ALICE_B, "", "F", "N") in stored

    # --- 3. Back to stock ejabberd: it reads what roster-port wrote, host by host --------------
    restart_as(server, "sql")

    async def stock_reads_back() -> tuple[dict, dict]:
        clients = Clients(server)
        await clients.login(*TWO_HOST_USERS)
        seen = await clients.rosters(), await clients.requests_at_login()
        await clients.logout()
        return seen

    stock_again, stock_requests_again = asyncio.run(stock_reads_back())
    assert stock_again == port_after
    assert stock_requests_again == {user: set() for user in TWO_HOST_USERS}
