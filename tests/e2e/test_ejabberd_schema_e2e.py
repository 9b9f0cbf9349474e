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

ejabberd's pg.sql creates unqualified tables (and ejabberd 23.01 has no option for a search
path), so each test gets a database of its own, which ejabberd reaches as the `public` schema.

Groups are compared as sets: RFC 6121 groups have no order, and stock ejabberd itself returns
an item's groups in the reverse of their rostergroups rows' order while the mapping returns
them in row order.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer
from pg_cluster import ejabberd_pg_sql
from xmpp_client import Client, Item

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PASSWORD = "secret"
HOST = "localhost"
USERS = ("alice", "bob", "carol", "dave")


def jid(username: str) -> str:
    return f"{username}@{HOST}"


@pytest.fixture
def ejabberd_database(pg_server):
    """A fresh database holding ejabberd's pg.sql, unchanged; dropped afterwards."""
    schema_sql = ejabberd_pg_sql()
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


@pytest.fixture
def server(tmp_path: Path, ejabberd_database: str):
    """One ejabberd node, first configured as stock ejabberd on the database; the test switches
    `roster_backend` between "sql" (stock) and "port" (roster-port) and restarts it."""
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        pytest.skip("ejabberd 23.01 is not installed (scripts/bootstrap installs it)")
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        pytest.skip("the shim is not built (make -C erlang_shim)")
    parts = conninfo_to_dict(ejabberd_database)
    node = EjabberdServer(
        tmp_path / "ejabberd", host=HOST, roster_backend="sql",
        # ejabberd's own SQL connection (p1_pgsql) to the same database as the program's.
        sql={"type": "pgsql", "server": parts["host"], "port": int(parts["port"]),
             "database": parts["dbname"], "username": parts["user"],
             "password": parts.get("password", "")},
        store_section=('backend = "postgres_mapped"\n'
                       f"dsn = {json.dumps(ejabberd_database)}\n"
                       'mapping = "ejabberd"\n'),
    )
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
        await asyncio.sleep(0.5)  # they come right after the available presence
        return {name: {(p.from_jid, p.status) for p in client.presences if p.type == "subscribe"}
                for name, client in self.by_name.items()}

    async def logout(self) -> None:
        for client in self.by_name.values():
            client.xmpp.disconnect()
        self.by_name.clear()
        await asyncio.sleep(0.3)


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
