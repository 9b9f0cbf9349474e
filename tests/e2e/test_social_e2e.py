"""examples/social end to end: a social application's own tables are the XMPP rosters.

A real ejabberd 23.01 with mod_roster_port, the real program on `backend = "postgres_mapped"`
with examples/social/mapping.toml and the [roster] settings of examples/social/roster-port.toml,
on a fresh schema of the test PostgreSQL holding examples/social/schema.sql, roster-port's change
log (`roster-port install-change-log`) and examples/social/triggers.sql, exactly as the
example's README installs them. The XMPP domain is the application's, social.example; an XMPP account is
registered (in ejabberd's Mnesia) for each application user.

The tests judge the server's view only: raw roster IQ gets, the pushes and presences the
clients received, and the rows of the application's own tables (friendships, tags) read in
plain SQL, as the application itself would. The application's side is always plain SQL on its
own connection: nothing of roster-port is used to write it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import psycopg
import pytest
from slixmpp.exceptions import IqError

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer
from xmpp_client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "social"
DOMAIN = "social.example"
PASSWORD = "secret"
PEOPLE = {"alice": "Alice Liddell", "bob": "Bob Marley", "carol": "Carol King",
          "dave": "Dave Brubeck", "erin": "Erin Brockovich", "frank": "Frank Zappa",
          "grace": "Grace Hopper"}
# docs/changes.md: "a few milliseconds from commit to push on the node's clients (tests
# require under 1 s)".
FEED_DEADLINE = 1.0


def jid(username: str) -> str:
    return f"{username}@{DOMAIN}"


# --- The application's side: plain SQL on its own connection ---------------------------------


class App:
    def __init__(self, dsn: str):
        self.dsn = dsn

    def sql(self, query: str, parameters: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(query, parameters)
            return cursor.fetchall() if cursor.description else []

    def befriend(self, requester: str, addressee: str, status: str, message: str = "") -> None:
        self.sql("""
            INSERT INTO friendships (requester_id, addressee_id, status, message)
            SELECT r.id, a.id, %s, %s FROM users r, users a
            WHERE r.username = %s AND a.username = %s
        """, (status, message, requester, addressee))

    def tag(self, owner: str, friend: str, *tags: str) -> None:
        for label in tags:
            self.sql("""
                INSERT INTO tags (owner_id, friend_id, tag)
                SELECT o.id, f.id, %s FROM users o, users f
                WHERE o.username = %s AND f.username = %s
            """, (label, owner, friend))

    def friendships(self) -> set[tuple[str, str, str]]:
        return set(self.sql("""
            SELECT r.username, a.username, f.status FROM friendships f
            JOIN users r ON r.id = f.requester_id JOIN users a ON a.id = f.addressee_id
        """))

    def friendship(self, one: str, other: str) -> tuple[str, str, str, str] | None:
        """(requester, addressee, status, message) of the pair's row, whoever asked."""
        rows = self.sql("""
            SELECT r.username, a.username, f.status, f.message FROM friendships f
            JOIN users r ON r.id = f.requester_id JOIN users a ON a.id = f.addressee_id
            WHERE (r.username, a.username) IN ((%s, %s), (%s, %s))
        """, (one, other, other, one))
        assert len(rows) <= 1
        return rows[0] if rows else None


# --- Fixtures ---------------------------------------------------------------------------------


def example_roster_section(read_only: bool) -> str:
    """The [roster] table of examples/social/roster-port.toml, as TOML, with read_only set."""
    settings = tomllib.loads((EXAMPLE / "roster-port.toml").read_text(encoding="utf-8"))["roster"]
    # The example ships mutual_rows = true: scenario (b) depends on it.
    assert settings["mutual_rows"] is True
    settings["read_only"] = read_only
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())


@pytest.fixture
def app(pg_server, tmp_path):
    """A fresh schema loaded as examples/social/README.md says: the application's tables, the
    change log (roster_port_log_change()), then the application's triggers calling it."""
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    with psycopg.connect(dsn) as connection:
        connection.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
    config = tmp_path / "install-change-log.toml"
    config.write_text(f'[store]\nbackend = "postgres_mapped"\ndsn = {json.dumps(dsn)}\n'
                      f'mapping = "{EXAMPLE / "mapping.toml"}"\n')
    installed = subprocess.run([sys.executable, "-m", "roster_port", "install-change-log",
                                "--config", str(config)], capture_output=True, text=True,
                               timeout=60)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    with psycopg.connect(dsn) as connection:
        connection.execute((EXAMPLE / "triggers.sql").read_text(encoding="utf-8"))
        for username, display_name in PEOPLE.items():
            connection.execute("INSERT INTO users (username, display_name) VALUES (%s, %s)",
                               (username, display_name))
    try:
        yield App(dsn)
    finally:
        pg_server.drop_schema(schema)


@pytest.fixture
def social_server(tmp_path: Path, app: App):
    """`social_server(read_only=False)` starts ejabberd + mod_roster_port + the program on the
    application's schema, with an XMPP account for every application user."""
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        pytest.skip("ejabberd 23.01 is not installed (scripts/bootstrap installs it)")
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        pytest.skip("the shim is not built (make -C erlang_shim)")
    servers: list[EjabberdServer] = []

    def start(read_only: bool = False) -> EjabberdServer:
        store = ('backend = "postgres_mapped"\n'
                 f"dsn = {json.dumps(app.dsn)}\n"
                 f"mapping = {json.dumps(str(EXAMPLE / 'mapping.toml'))}\n")
        server = EjabberdServer(tmp_path / f"ejabberd-{len(servers)}", host=DOMAIN,
                                store_section=store,
                                roster_section=example_roster_section(read_only))
        servers.append(server)
        server.start()
        server.register(*PEOPLE, password=PASSWORD)
        return server

    yield start
    for server in servers:
        server.stop()


class Session:
    """The clients of one test, logged out at the end."""

    def __init__(self, server: EjabberdServer):
        self.server = server
        self.clients: list[Client] = []

    async def login(self, username: str, available: bool = True) -> Client:
        client = Client(f"{jid(username)}/test", PASSWORD, self.server.c2s_port, self.server.ip)
        # PLAIN over loopback: the same login as SCRAM without slixmpp's PBKDF2 CPU cost.
        client.xmpp.plugin["feature_mechanisms"].use_mech = "PLAIN"
        await client.connect(available=available)
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            try:
                client.xmpp.disconnect()
            except Exception:  # noqa: BLE001 - the stream may be gone already
                pass
        await asyncio.sleep(0.1)


def run_session(server: EjabberdServer, scenario) -> None:
    async def main() -> None:
        session = Session(server)
        try:
            await scenario(session)
        finally:
            await session.close()

    asyncio.run(main())


def wire(item) -> tuple:
    return (item.subscription, item.ask, item.name, item.groups)


async def eventually(check, timeout: float = 5.0, what: str = ""):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


class Since:
    """What clients receive from now on, within a deadline counted from now: taken just before
    an action, so that a push arriving while the test waits on another client still counts,
    and every wait is bounded by the time since the action itself."""

    def __init__(self, *clients: Client, seconds: float):
        self.start = asyncio.get_running_loop().time()
        self.seconds = seconds
        self.pushes = {id(c): len(c.pushes) for c in clients}
        self.presences = {id(c): len(c.presences) for c in clients}

    def _remaining(self) -> float:
        return max(0.0, self.start + self.seconds - asyncio.get_running_loop().time())

    async def push(self, client: Client, contact: str, predicate=lambda item: True):
        """The first push for `contact` received since, for which `predicate` holds."""
        found = await client.wait_for(
            lambda c: [p for p in c.pushes[self.pushes[id(client)]:]
                       if p.item.jid == contact and predicate(p.item)], self._remaining())
        return found[0]

    async def presence(self, client: Client, sender: str, ptype: str):
        found = await client.wait_for(
            lambda c: [p for p in c.presences[self.presences[id(client)]:]
                       if p.from_jid == sender and p.type == ptype], self._remaining())
        return found[0]


# --- (a) Reading: the roster is the application's friend list --------------------------------


def test_a_users_xmpp_roster_is_the_applications_friend_list(app, social_server):
    app.befriend("alice", "bob", "accepted")
    app.befriend("carol", "alice", "accepted")
    app.befriend("alice", "dave", "requested", "hi Dave")    # Alice asked, no answer yet
    app.befriend("erin", "alice", "requested", "hi Alice")   # Erin asked Alice
    app.befriend("frank", "alice", "blocked")
    app.befriend("grace", "alice", "declined")
    app.tag("alice", "bob", "music", "Friends")
    app.tag("bob", "alice", "wonderland")
    server = social_server()

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        items = (await alice.roster_get()).items
        # Accepted friendships, whoever asked, are "both", named by the application's display
        # names, grouped by Alice's own tags (served in code point order by the mapping).
        assert wire(items[jid("bob")]) == ("both", None, "Bob Marley", ("Friends", "music"))
        assert wire(items[jid("carol")]) == ("both", None, "Carol King", ())
        # A request Alice sent is an item, asking.
        assert wire(items[jid("dave")]) == ("none", "subscribe", "Dave Brubeck", ())
        # Erin's request to Alice is not an item; blocked and declined are nowhere.
        assert set(items) == {jid("bob"), jid("carol"), jid("dave")}
        # ...but Erin's request is delivered to Alice at login, with the text she wrote.
        [request] = await alice.wait_for(lambda c: c.presences_from(jid("erin"), "subscribe"))
        assert request.status == "hi Alice"

        # The other side of the same rows: Bob's tags are his, Frank sees no Alice at all.
        bob = await session.login("bob")
        assert wire((await bob.roster_get()).items[jid("alice")]) == (
            "both", None, "Alice Liddell", ("wonderland",))
        frank = await session.login("frank")
        assert (await frank.roster_get()).items == {}
        grace = await session.login("grace")
        assert (await grace.roster_get()).items == {}

    run_session(server, scenario)


# --- (b) Writing: an XMPP handshake becomes the application's friendship ----------------------


def test_an_xmpp_subscription_handshake_writes_the_friendship_requested_then_accepted(
        app, social_server):
    server = social_server()
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        bob = await session.login("bob")

        asked = Since(alice, bob, seconds=5)
        alice.send_subscription(bob_jid, "subscribe", status="hello Bob")
        # Alice's client is pushed the row as it reads back: Bob, by his application name,
        # asked for.
        push = await asked.push(alice, bob_jid)
        assert wire(push.item) == ("none", "subscribe", "Bob Marley", ())
        # One friendship row, Alice the requester. (Its `message` is checked by
        # test_the_text_of_a_request_is_kept_in_the_friendship_row, a known bug.)
        await eventually(lambda: app.friendship("alice", "bob"), what="the friendship row")
        assert app.friendship("alice", "bob")[:3] == ("alice", "bob", "requested")
        # Bob is asked live. Alice's write already made the request pending in Bob's roster
        # (one row for both), so without mutual_rows the RFC table would drop
        # his inbound subscribe as a repeat: this is what the example's setting is for.
        request = await asked.presence(bob, alice_jid, "subscribe")
        assert request.status == "hello Bob"
        # A request to answer is not an item of Bob's roster.
        assert alice_jid not in (await bob.roster_get()).items

        approved = Since(alice, bob, seconds=5)
        bob.send_subscription(alice_jid, "subscribed")
        # An accepted friendship is "both" for both people, at once (the row cannot hold
        # "from" alone).
        await approved.push(bob, alice_jid, lambda i: i.subscription == "both")
        await approved.push(alice, bob_jid, lambda i: i.subscription == "both")
        # Bob gained a subscriber: his presence goes to Alice.
        await approved.presence(alice, bob_jid, "available")
        # Bob's write already made Alice's item "both", and the RFC table drops an inbound
        # subscribed for "both" as a repeat; mutual_rows delivers it, so her client sees the
        # approval itself, not only the push.
        await approved.presence(alice, bob_jid, "subscribed")
        await eventually(lambda: app.friendship("alice", "bob")[2] == "accepted",
                         what="the friendship accepted")
        assert app.friendships() == {("alice", "bob", "accepted")}

        # The server's view, by raw gets, on both sides.
        assert wire((await alice.roster_get()).items[bob_jid]) == (
            "both", None, "Bob Marley", ())
        assert wire((await bob.roster_get()).items[alice_jid]) == (
            "both", None, "Alice Liddell", ())
        # Nobody was pushed anything but "both" after the approval.
        assert alice.pushes_for(bob_jid)[-1].item.subscription == "both"
        assert bob.pushes_for(alice_jid)[-1].item.subscription == "both"

        # A client's roster set becomes the user's tags on that friend.
        await alice.roster_set(bob_jid, name="ignored", groups=("Friends",))
        assert app.sql("""
            SELECT t.tag FROM tags t JOIN users o ON o.id = t.owner_id
            JOIN users f ON f.id = t.friend_id WHERE o.username = 'alice' AND f.username = 'bob'
        """) == [("Friends",)]
        # The name belongs to the application: the set's name does not stick.
        assert wire((await alice.roster_get()).items[bob_jid]) == (
            "both", None, "Bob Marley", ("Friends",))

    run_session(server, scenario)


def test_a_request_to_an_offline_user_is_a_requested_friendship_delivered_at_login(
        app, social_server):
    server = social_server()
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        asked = Since(alice, seconds=5)
        alice.send_subscription(bob_jid, "subscribe", status="are you there?")
        await asked.push(alice, bob_jid, lambda i: i.ask == "subscribe")
        await eventually(lambda: app.friendship("alice", "bob"), what="the friendship row")
        assert app.friendship("alice", "bob")[:3] == ("alice", "bob", "requested")

        # Bob logs in later: the stored request (the application's row) is delivered to him
        # at his first available presence, and he can accept it.
        bob = await session.login("bob")
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribe"), 5)
        approved = Since(alice, bob, seconds=5)
        bob.send_subscription(alice_jid, "subscribed")
        await approved.push(alice, bob_jid, lambda i: i.subscription == "both")
        await eventually(lambda: app.friendship("alice", "bob")[2] == "accepted",
                         what="the friendship accepted")

    run_session(server, scenario)


def test_the_text_of_a_request_is_kept_in_the_friendship_row_and_sent_at_login(
        app, social_server):
    server = social_server()
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        asked = Since(alice, seconds=5)
        alice.send_subscription(bob_jid, "subscribe", status="are you there?")
        await asked.push(alice, bob_jid, lambda i: i.ask == "subscribe")
        await eventually(lambda: app.friendship("alice", "bob"), what="the friendship row")
        # The application shows the request with its message on the web site too.
        await eventually(lambda: app.friendship("alice", "bob")[3] == "are you there?",
                         timeout=2, what="the request's text in friendships.message")
        bob = await session.login("bob")
        [request] = await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribe"), 5)
        assert request.status == "are you there?"

    run_session(server, scenario)


# --- (c) The application's own changes reach the online clients ------------------------------


def test_the_applications_sql_changes_are_pushed_to_online_clients_within_a_second(
        app, social_server):
    app.befriend("alice", "bob", "accepted")
    server = social_server()
    alice_jid, bob_jid, carol_jid = jid("alice"), jid("bob"), jid("carol")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        bob = await session.login("bob")
        carol = await session.login("carol")
        assert set((await alice.roster_get()).items) == {bob_jid}

        # The web site accepts a friendship: both people's clients are pushed "both".
        change = Since(alice, bob, carol, seconds=FEED_DEADLINE)
        app.befriend("carol", "alice", "accepted")
        push = await change.push(alice, carol_jid)
        assert wire(push.item) == ("both", None, "Carol King", ())
        push = await change.push(carol, alice_jid)
        assert wire(push.item) == ("both", None, "Alice Liddell", ())
        # Each gained a subscriber: their presences are exchanged, as for an XMPP approval.
        await change.presence(alice, carol_jid, "available")
        await change.presence(carol, alice_jid, "available")
        # The push carried the version a roster get now answers.
        assert (await alice.roster_get()).ver == alice.pushes_for(carol_jid)[-1].ver

        # A tag added in the mobile app: a group of Alice's item, and only of hers.
        change = Since(alice, bob, carol, seconds=FEED_DEADLINE)
        app.tag("alice", "carol", "Singers")
        push = await change.push(alice, carol_jid)
        assert wire(push.item) == ("both", None, "Carol King", ("Singers",))

        # Carol blocks Alice: the friendship disappears from both rosters.
        change = Since(alice, bob, carol, seconds=FEED_DEADLINE)
        app.sql("""
            UPDATE friendships SET status = 'blocked'
            WHERE requester_id = (SELECT id FROM users WHERE username = 'carol')
              AND addressee_id = (SELECT id FROM users WHERE username = 'alice')
        """)
        assert (await change.push(alice, carol_jid)).item.subscription == "remove"
        assert (await change.push(carol, alice_jid)).item.subscription == "remove"
        # Each lost a subscriber: they see each other go offline.
        await change.presence(alice, carol_jid, "unavailable")
        await change.presence(carol, alice_jid, "unavailable")

        # An administrator deletes the Alice-Bob friendship row outright.
        change = Since(alice, bob, carol, seconds=FEED_DEADLINE)
        app.sql("""
            DELETE FROM friendships
            WHERE requester_id = (SELECT id FROM users WHERE username = 'alice')
              AND addressee_id = (SELECT id FROM users WHERE username = 'bob')
        """)
        assert (await change.push(alice, bob_jid)).item.subscription == "remove"
        assert (await change.push(bob, alice_jid)).item.subscription == "remove"
        await change.presence(alice, bob_jid, "unavailable")
        await change.presence(bob, alice_jid, "unavailable")
        # Nothing else was pushed to anyone along the way: one push per roster changed.
        assert [p.item.jid for p in carol.pushes] == [alice_jid, alice_jid]
        assert [p.item.jid for p in bob.pushes] == [alice_jid]

        # The server's view agrees with the application's: nobody is in anyone's roster.
        assert (await alice.roster_get()).items == {}
        assert (await bob.roster_get()).items == {}
        assert (await carol.roster_get()).items == {}

    run_session(server, scenario)


# --- (d) Read-only: only the application changes friendships ---------------------------------


def test_read_only_refuses_roster_sets_and_still_serves_reads(app, social_server):
    app.befriend("alice", "bob", "accepted")
    app.tag("alice", "bob", "music")
    server = social_server(read_only=True)
    alice_jid, bob_jid, carol_jid = jid("alice"), jid("bob"), jid("carol")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        carol = await session.login("carol")
        before = await alice.roster_get()
        assert wire(before.items[bob_jid]) == ("both", None, "Bob Marley", ("music",))

        for change in ({"name": "B", "groups": ("Work",)}, {"subscription": "remove"}):
            with pytest.raises(IqError) as refused:
                await alice.roster_set(bob_jid, **change)
            assert refused.value.iq["error"]["condition"] == "not-allowed"
        with pytest.raises(IqError) as refused:
            await alice.roster_set(carol_jid, name="Carol")
        assert refused.value.iq["error"]["condition"] == "not-allowed"

        # A subscription request changes nothing and reaches nobody.
        alice.send_subscription(carol_jid, "subscribe", status="friends?")
        await asyncio.sleep(0.5)
        assert carol.presences_from(alice_jid, "subscribe") == []
        assert app.friendships() == {("alice", "bob", "accepted")}
        assert app.sql("SELECT count(*) FROM tags")[0][0] == 1

        # Reads work, and nothing moved.
        after = await alice.roster_get()
        assert after == before
        assert alice.pushes == []
        assert (await alice.roster_get(ver=before.ver)).items is None

        # The application itself still changes friendships, and the clients hear of it.
        change = Since(alice, seconds=FEED_DEADLINE)
        app.befriend("carol", "alice", "accepted")
        push = await change.push(alice, carol_jid)
        assert wire(push.item) == ("both", None, "Carol King", ())

    run_session(server, scenario)
