"""Rows read into two rosters, and a store that cannot hold an item, end to end.

A real ejabberd 23.01 with mod_roster_port, the real program on `backend = "postgres_mapped"`
with [roster] mutual_rows = true, on a fresh schema of the test PostgreSQL holding
examples/social: schema.sql, follows.sql (directed follows: each row is the follower's `to` and
the followee's `from`), roster-port's change log and the example's triggers. Served through
follows-mapping.toml, or mapping.toml (one friendship row for two people). Real slixmpp
clients; the application's rows are read and written in plain SQL.

"Exactly once" is judged up to a marker: a change the application makes afterwards in SQL,
pushed to the same user through the change feed. The program runs a user's requests and
notifications in order, so once the marker's push is in, everything the earlier change made
for that user has been sent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest
from slixmpp.exceptions import IqError

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer
from roster_port.store.pg_changes import install_change_log
from test_social_e2e import (DOMAIN, EXAMPLE, PASSWORD, PEOPLE, App, Session, Since, jid,
                             run_session)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

ROSTER = "versioning = true\npre_approval = false\nmutual_rows = true\n"
STRANGER = "stranger@elsewhere.example"  # no user of the application: user_id is NULL
NON_MEMBER = "nobody"  # an XMPP account on the domain that is no user of the application
MAPPINGS = {"follows": EXAMPLE / "follows-mapping.toml", "friendships": EXAMPLE / "mapping.toml"}
DEADLINE = 5.0


class Follows(App):
    def follow(self, follower: str, followee: str, state: str = "accepted") -> None:
        self.sql("""
            INSERT INTO follows (follower_id, followee_id, state)
            SELECT r.id, e.id, %s FROM users r, users e WHERE r.username = %s AND e.username = %s
        """, (state, follower, followee))

    def follows(self) -> set[tuple[str, str, str]]:
        return set(self.sql("""
            SELECT r.username, e.username, f.state FROM follows f
            JOIN users r ON r.id = f.follower_id JOIN users e ON e.id = f.followee_id
        """))


@pytest.fixture
def app(pg_server):
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    with psycopg.connect(dsn) as connection:
        connection.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
        connection.execute((EXAMPLE / "follows.sql").read_text(encoding="utf-8"))
        install_change_log(connection)
        connection.execute((EXAMPLE / "triggers.sql").read_text(encoding="utf-8"))
        connection.execute((EXAMPLE / "follows-triggers.sql").read_text(encoding="utf-8"))
        for username, display_name in PEOPLE.items():
            connection.execute("INSERT INTO users (username, display_name) VALUES (%s, %s)",
                               (username, display_name))
    try:
        yield Follows(dsn)
    finally:
        pg_server.drop_schema(schema)


@pytest.fixture
def server(tmp_path: Path, app: Follows):
    """`server("follows" | "friendships")`: ejabberd + the program on that mapping."""
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        pytest.skip("ejabberd 23.01 is not installed (scripts/bootstrap installs it)")
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        pytest.skip("the shim is not built (make -C erlang_shim)")
    started: list[EjabberdServer] = []

    def start(mapping: str) -> EjabberdServer:
        store = ('backend = "postgres_mapped"\n'
                 f"dsn = {json.dumps(app.dsn)}\n"
                 f"mapping = {json.dumps(str(MAPPINGS[mapping]))}\n")
        ejabberd = EjabberdServer(tmp_path / "ejabberd", host=DOMAIN, store_section=store,
                                  roster_section=ROSTER)
        started.append(ejabberd)
        ejabberd.start()
        ejabberd.register(*PEOPLE, NON_MEMBER, password=PASSWORD)
        return ejabberd

    yield start
    for ejabberd in started:
        ejabberd.stop()


# What a cancellation may bring about; presences of type available are left out: the ones
# exchanged at login may still be arriving, and are no consequence of it.
SUBSCRIPTION_TYPES = ("subscribe", "subscribed", "unsubscribe", "unsubscribed")


def sent_by(presences, sender: str, types) -> list[str]:
    return [p.type for p in presences if p.from_jid == sender and p.type in types]


async def second_resource(session: Session, username: str):
    """Another session of the same account (resource "two")."""
    from xmpp_client import Client

    client = Client(f"{jid(username)}/two", PASSWORD, session.server.c2s_port, session.server.ip)
    client.xmpp.plugin["feature_mechanisms"].use_mech = "PLAIN"
    await client.connect()
    session.clients.append(client)
    return client


def record_presence_errors(client) -> list[tuple[str, str, str]]:
    """(from, condition, text) of every error presence the client receives."""
    errors: list[tuple[str, str, str]] = []

    def on_error(presence) -> None:
        errors.append((presence["from"].bare, presence["error"]["condition"],
                       presence["error"]["text"]))
        client._changed.set()

    client.xmpp.add_event_handler("presence_error", on_error)
    return errors


async def marker(app: Follows, since_clients, user_client, owner: str, friend: str):
    """A tag the application adds in SQL on `owner`'s item for `friend`: pushed through the
    change feed, after everything the program sent `owner` before."""
    change = Since(*since_clients, seconds=DEADLINE)
    app.tag(owner, friend, "marker")
    return await change.push(user_client, jid(friend), lambda item: "marker" in item.groups)


# --- Symmetric rows: a follows pair's cancellations ----------------------------------------------


def test_follows_unsubscribe_reaches_the_user_with_its_consequences_once(app, server):
    app.follow("alice", "bob")
    app.follow("bob", "alice")
    ejabberd = server("follows")
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        alice2 = await second_resource(session, "alice")
        bob = await session.login("bob")
        assert (await alice.roster_get()).items[bob_jid].subscription == "both"
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "available"))
        await bob.wait_for(lambda c: len(c.presences_from(alice_jid, "available")) >= 2)
        clients = (alice, alice2, bob)
        before = {id(c): (len(c.pushes), len(c.presences)) for c in clients}

        change = Since(*clients, seconds=DEADLINE)
        bob.send_subscription(alice_jid, "unsubscribe")
        # Each of Alice's clients sees Bob's unsubscribe (the RFC table alone would drop it:
        # Bob's write already took her `from`) and a push of her item as it now is.
        for client in (alice, alice2):
            await change.presence(client, bob_jid, "unsubscribe")
            push = await change.push(client, bob_jid)
            assert push.item.subscription == "to"
        # Alice lost a subscriber: each of her resources goes unavailable for Bob.
        await bob.wait_for(lambda c: len(c.presences_from(alice_jid, "unavailable")) >= 2,
                           DEADLINE)
        assert app.follows() == {("alice", "bob", "accepted")}

        await marker(app, clients, alice, "alice", "bob")
        await marker(app, clients, bob, "bob", "alice")
        for client in (alice, alice2):
            pushes = client.pushes[before[id(client)][0]:]
            presences = client.presences[before[id(client)][1]:]
            assert [p.item.subscription for p in pushes if "marker" not in p.item.groups] == ["to"]
            assert sent_by(presences, bob_jid, SUBSCRIPTION_TYPES) == ["unsubscribe"]
        # One unavailable per resource of Alice's, not one more.
        presences = bob.presences[before[id(bob)][1]:]
        assert sent_by(presences, alice_jid, ("unavailable",)) == ["unavailable"] * 2
        # Bob's own client: one push, "from".
        assert [p.item.subscription for p in bob.pushes[before[id(bob)][0]:]
                if "marker" not in p.item.groups] == ["from"]
        # Every push carried the version a get answers now (the marker's is the last).
        assert (await alice.roster_get()).ver == alice.pushes[-1].ver
        assert (await bob.roster_get()).ver == bob.pushes[-1].ver
        assert (await alice.roster_get()).items[bob_jid].subscription == "to"

    run_session(ejabberd, scenario)


def test_follows_unsubscribed_reaches_the_user_with_its_consequences_once(app, server):
    app.follow("alice", "bob")
    app.follow("bob", "alice")
    ejabberd = server("follows")
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        bob = await session.login("bob")
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "available"))
        clients = (alice, bob)
        before = {id(c): (len(c.pushes), len(c.presences)) for c in clients}

        change = Since(*clients, seconds=DEADLINE)
        bob.send_subscription(alice_jid, "unsubscribed")
        await change.presence(alice, bob_jid, "unsubscribed")
        push = await change.push(alice, bob_jid)
        assert push.item.subscription == "from"
        # Bob lost a subscriber: his unavailable reaches Alice.
        await change.presence(alice, bob_jid, "unavailable")
        assert app.follows() == {("bob", "alice", "accepted")}

        await marker(app, clients, alice, "alice", "bob")
        presences = alice.presences[before[id(alice)][1]:]
        assert sent_by(presences, bob_jid, SUBSCRIPTION_TYPES) == ["unsubscribed"]
        assert sent_by(presences, bob_jid, ("unavailable",)) == ["unavailable"]
        assert [p.item.subscription for p in alice.pushes[before[id(alice)][0]:]
                if "marker" not in p.item.groups] == ["from"]
        assert (await alice.roster_get()).ver == alice.pushes[-1].ver
        assert (await alice.roster_get()).items[bob_jid].subscription == "from"

    run_session(ejabberd, scenario)


# --- A store that cannot hold an item ------------------------------------------------------------


@pytest.mark.parametrize("mapping", ["follows", "friendships"])
def test_what_the_store_cannot_hold_is_refused_and_nothing_is_pushed(app, server, mapping):
    ejabberd = server(mapping)
    alice_jid, bob_jid = jid("alice"), jid("bob")

    async def scenario(session: Session) -> None:
        alice = await session.login("alice")
        bob = await session.login("bob")
        errors = record_presence_errors(alice)
        before = await alice.roster_get()
        assert before.items == {}

        # A roster set of a contact the operator's store cannot hold: an error, no push.
        for contact in (STRANGER, jid(NON_MEMBER)):
            with pytest.raises(IqError) as refused:
                await alice.roster_set(contact, name="X", groups=("Friends",))
            error = refused.value.iq["error"]
            assert (error["type"], error["condition"]) == ("cancel", "not-allowed")
            assert contact in error["text"] and "cannot hold" in error["text"]
        assert await alice.roster_get() == before  # same items, same version
        assert await alice.roster_get(ver=before.ver) == type(before)(ver=None, items=None)

        # A subscription request to such a contact: refused with an error presence, not routed
        # (nothing would record it).
        alice.send_subscription(STRANGER, "subscribe", status="hello?")
        await alice.wait_for(lambda c: [e for e in errors if e[0] == STRANGER], DEADLINE)
        assert [e[1] for e in errors if e[0] == STRANGER] == ["not-allowed"]
        # A local account the application does not know is refused on its own side.
        nobody = await session.login(NON_MEMBER)
        nobody_errors = record_presence_errors(nobody)
        nobody.send_subscription(alice_jid, "subscribe")
        await nobody.wait_for(lambda c: nobody_errors, DEADLINE)
        assert nobody_errors[0][:2] == (alice_jid, "not-allowed")

        # The marker: a relationship the application makes in SQL, pushed by the feed. Up to
        # it, Alice was pushed nothing, and she was shown no request.
        change = Since(alice, bob, seconds=DEADLINE)
        if mapping == "follows":
            app.follow("alice", "bob")
        else:
            app.befriend("alice", "bob", "accepted")
        push = await change.push(alice, bob_jid)
        assert [p.item.jid for p in alice.pushes] == [bob_jid]
        assert alice.presences_from(jid(NON_MEMBER), "subscribe") == []
        assert (await alice.roster_get()).ver == push.ver
        assert set((await alice.roster_get()).items) == {bob_jid}
        assert app.sql("SELECT count(*) FROM tags") == [(0,)]

    run_session(ejabberd, scenario)
