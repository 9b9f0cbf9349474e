"""The shim's change feed, read cache, restarts and administration, end to end: a real
ejabberd 23.01 with mod_roster_port, the real program on SQLite, slixmpp clients, and plain
SQL on the store file standing for another application."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import msgpack
import pytest

from ejabberd_harness import EjabberdServer

pytestmark = pytest.mark.e2e

# The program polls SQLite's data_version every 0.2 s; a push must follow within this.
FEED_DEADLINE = 1.0


def hooks_view(server: EjabberdServer, user: str, contact: str) -> tuple[str, dict[str, str]]:
    """What ejabberd's own callers get: roster_get_jid_info(user, contact) as "sub ask groups",
    and the roster_get hook's items as {jid: "sub name"}."""
    host = server.host
    out = server.rpc(
        f"{{S, A, G}} = rpc:call(Node, ejabberd_hooks, run_fold, [roster_get_jid_info, "
        f"<<\"{host}\">>, {{none, none, []}}, [<<\"{user}\">>, <<\"{host}\">>, "
        f"{{<<\"{contact}\">>, <<\"{host}\">>, <<>>}}]]), "
        f"Items = rpc:call(Node, ejabberd_hooks, run_fold, [roster_get, <<\"{host}\">>, [], "
        f"[{{<<\"{user}\">>, <<\"{host}\">>}}]]), "
        "io:format(\"jid_info ~s ~s ~s~n\", [S, A, lists:join(\",\", G)]), "
        "[io:format(\"item ~s@~s ~s ~s~n\", [element(5, element(2, I)), element(6, element(2, I)), "
        "element(5, I), element(3, I)]) || I <- Items]"
    )
    jid_info = ""
    items: dict[str, str] = {}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "jid_info":
            jid_info = rest.strip()
        elif kind == "item":
            jid, _, view = rest.partition(" ")
            items[jid] = view.strip()
    return jid_info, items


def requests(server: EjabberdServer, op: str, user: str) -> int:
    """How many `op` requests about `user` the shim sent (from the transcript)."""
    time.sleep(0.2)  # the transcript writer is a process of its own
    with open(server.transcript_path, "rb") as f:
        return sum(1 for direction, _, _, message in msgpack.Unpacker(f, raw=False)
                   if direction == "in" and message[0] == 0 and message[2] == op
                   and message[3].get("user") == user)


def test_rows_changed_in_sql_reach_the_client_the_cache_and_ver(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        before = await alice.roster_get()

        # Bob's probe is answered only when Alice's jid_info says bob has "from". It is
        # not: no answer. This also loads Alice's roster into the shim's cache.
        bob.send_subscription(alice_jid, "probe")
        await asyncio.sleep(0.5)
        assert bob.presences_from(alice_jid, "available") == []
        assert hooks_view(ejabberd, "alice", "bob") == ("none none", {})

        # INSERT behind ejabberd's back: pushed to Alice, Bob gets her presence ("from").
        t0 = time.monotonic()
        ejabberd.store_execute(
            "INSERT INTO roster_items (user, contact, name, subscription, groups) "
            "VALUES (?, ?, 'Bob', 'from', '[\"SQL\"]')", (alice_jid, bob_jid))
        push = (await alice.wait_for(lambda c: c.pushes_for(bob_jid), FEED_DEADLINE))[-1]
        assert time.monotonic() - t0 < FEED_DEADLINE
        assert (push.item.subscription, push.item.name, push.item.groups) == ("from", "Bob", ("SQL",))
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "available"))
        seen = len(bob.presences_from(alice_jid, "available"))

        roster = await alice.roster_get()
        assert roster.items[bob_jid].subscription == "from"
        assert roster.ver == push.ver and roster.ver != before.ver
        assert (await alice.roster_get(ver=roster.ver)).items is None
        assert bob_jid in (await alice.roster_get(ver=before.ver)).items
        # The cache dropped what it had: jid_info and roster_get say "from" now...
        assert hooks_view(ejabberd, "alice", "bob") == ("from none SQL", {bob_jid: "from Bob"})
        # ...and so does ejabberd_c2s: Bob's probe is answered.
        bob.send_subscription(alice_jid, "probe")
        await bob.wait_for(lambda c: len(c.presences_from(alice_jid, "available")) > seen)

        # UPDATE: pushed; losing "from" sends Bob "unavailable"; probes go unanswered again.
        t0 = time.monotonic()
        ejabberd.store_execute(
            "UPDATE roster_items SET subscription = 'none', name = 'Robert' "
            "WHERE user = ? AND contact = ?", (alice_jid, bob_jid))
        await alice.wait_for(lambda c: c.pushes_for(bob_jid)[-1].item.name == "Robert",
                             FEED_DEADLINE)
        assert time.monotonic() - t0 < FEED_DEADLINE
        assert alice.pushes_for(bob_jid)[-1].item.subscription == "none"
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "unavailable"))
        seen = len(bob.presences_from(alice_jid, "available"))
        bob.send_subscription(alice_jid, "probe")
        await asyncio.sleep(0.5)
        assert len(bob.presences_from(alice_jid, "available")) == seen
        updated = await alice.roster_get()
        assert updated.items[bob_jid].name == "Robert"
        assert updated.ver == alice.pushes_for(bob_jid)[-1].ver != roster.ver
        assert hooks_view(ejabberd, "alice", "bob") == ("none none SQL", {bob_jid: "none Robert"})

        # DELETE: pushed as a removal.
        t0 = time.monotonic()
        ejabberd.store_execute("DELETE FROM roster_items WHERE user = ?", (alice_jid,))
        await alice.wait_for(lambda c: c.pushes_for(bob_jid)[-1].item.subscription == "remove",
                             FEED_DEADLINE)
        assert time.monotonic() - t0 < FEED_DEADLINE
        deleted = await alice.roster_get()
        assert deleted.items == {}
        assert deleted.ver == alice.pushes_for(bob_jid)[-1].ver != updated.ver
        assert hooks_view(ejabberd, "alice", "bob") == ("none none", {})

    asyncio.run(scenario())


def test_jid_info_is_answered_from_one_roster_load(ejabberd, users, connect):
    """The hot path costs one store_get_roster per user until the roster changes."""
    alice_jid, bob_jid = users("alice", "bob")
    # Each waits until the feed's notification of its rows has come and gone (it drops the
    # user's cached load: one arriving after the count below would cost a second load).
    ejabberd.store_execute_reported(
        "INSERT INTO roster_items (user, contact, subscription, pending_out, groups) "
        "VALUES (?, ?, 'both', 0, '[\"G\"]'), (?, 'carol@localhost', 'to', 0, '[]'), "
        "(?, 'dave@localhost', 'none', 0, '[]')",
        (alice_jid, bob_jid, alice_jid, alice_jid))
    # A stranger's pending request is no roster item, but jid_info reports it (ask "in").
    ejabberd.store_execute_reported(
        "INSERT INTO roster_items (user, contact, pending_in, in_roster) "
        "VALUES (?, 'eve@localhost', 1, 0)", (alice_jid,))
    loads = requests(ejabberd, "store_get_roster", alice_jid)

    host = ejabberd.host
    out = ejabberd.rpc(
        "[io:format(\"~s ~p~n\", [C, rpc:call(Node, ejabberd_hooks, run_fold, "
        f"[roster_get_jid_info, <<\"{host}\">>, {{none, none, []}}, [<<\"alice\">>, "
        f"<<\"{host}\">>, {{C, <<\"{host}\">>, <<>>}}]])]) "
        "|| _ <- lists:seq(1, 10), C <- [<<\"bob\">>, <<\"carol\">>, <<\"eve\">>, <<\"zed\">>]]")
    answers = set(out.splitlines())
    assert answers == {'bob {both,none,[<<"G">>]}', "carol {to,none,[]}", "eve {none,in,[]}",
                       "zed {none,none,[]}"}
    assert requests(ejabberd, "store_get_roster", alice_jid) == loads + 1
    assert requests(ejabberd, "jid_info", alice_jid) == 0

    async def change():
        alice = await connect(alice_jid)
        await alice.roster_set("carol@localhost", name="Carol", groups=("New",))

    asyncio.run(change())
    # The write dropped the load: the next answer comes from a new one.
    assert hooks_view(ejabberd, "alice", "carol")[0] == "to none New"
    assert requests(ejabberd, "store_get_roster", alice_jid) >= loads + 2
    assert requests(ejabberd, "jid_info", alice_jid) == 0


def test_repeated_roster_gets_are_answered_from_the_cache(ejabberd, users, connect):
    """One roster_iq per user until the roster changes; the answers stay exact."""
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        await alice.roster_set(bob_jid, name="Bob")
        asked = requests(ejabberd, "roster_iq", alice_jid)
        first = await alice.roster_get()
        for _ in range(5):
            again = await alice.roster_get()
            assert again.items == first.items and again.ver == first.ver
        assert requests(ejabberd, "roster_iq", alice_jid) == asked + 1
        # A change drops the cached answer: the next get is the program's, with a new ver.
        await alice.roster_set(bob_jid, name="Robert")
        changed = await alice.roster_get()
        assert changed.items[bob_jid].name == "Robert" and changed.ver != first.ver

    asyncio.run(scenario())


def test_cache_off_still_serves(tmp_path: Path):
    from conftest import PASSWORD, _missing
    from xmpp_client import Client

    if _missing():
        pytest.skip(_missing())
    with EjabberdServer(tmp_path / "ejabberd", cache=False) as server:
        server.register("alice", password=PASSWORD)
        server.store_execute(
            "INSERT INTO roster_items (user, contact, subscription) "
            "VALUES ('alice@localhost', 'bob@localhost', 'to')")
        assert hooks_view(server, "alice", "bob")[0] == "to none"
        assert hooks_view(server, "alice", "bob")[0] == "to none"
        assert requests(server, "jid_info", "alice@localhost") == 2
        assert requests(server, "store_get_roster", "alice@localhost") == 0

        async def scenario():
            alice = Client("alice@localhost/t", PASSWORD, server.c2s_port)
            await alice.connect()
            try:
                assert (await alice.roster_get()).items["bob@localhost"].subscription == "to"
            finally:
                alice.xmpp.disconnect()

        asyncio.run(scenario())


def test_rosters_survive_an_ejabberd_restart(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def before():
        alice = await connect(alice_jid)
        await alice.roster_set(bob_jid, name="Bob", groups=("Friends",))
        alice.send_subscription(bob_jid, "subscribe")
        await alice.wait_for(lambda c: any(p.item.ask == "subscribe" for p in c.pushes_for(bob_jid)))
        return (await alice.roster_get()).ver

    ver = asyncio.run(before())
    ejabberd.stop()
    deadline = time.monotonic() + 5
    while ejabberd.program_pids():
        assert time.monotonic() < deadline, "the programs did not exit with ejabberd"
        time.sleep(0.1)
    ejabberd.start()

    async def after():
        alice = await connect(alice_jid, resource="again")
        roster = await alice.roster_get()
        item = roster.items[bob_jid]
        assert (item.name, item.groups, item.subscription, item.ask) == (
            "Bob", ("Friends",), "none", "subscribe")
        assert roster.ver == ver
        assert (await alice.roster_get(ver=ver)).items is None

    asyncio.run(after())


def test_ejabberdctl_add_rosteritem_reaches_store_and_client(ejabberd, users, connect):
    alice_jid, carol_jid = users("alice", "carol")

    async def scenario():
        alice = await connect(alice_jid)
        # What `ejabberdctl add_rosteritem alice localhost carol localhost Carol Friends both`
        # runs in the server.
        out = ejabberd.rpc(
            "io:format(\"~p~n\", [rpc:call(Node, ejabberd_ctl, process, [[\"add_rosteritem\", "
            "\"alice\", \"localhost\", \"carol\", \"localhost\", \"Carol\", \"Friends\", "
            "\"both\"]])])")
        assert out.strip() == "0"
        push = (await alice.wait_for(lambda c: c.pushes_for(carol_jid)))[-1]
        assert (push.item.subscription, push.item.name, push.item.groups) == (
            "both", "Carol", ("Friends",))
        roster = await alice.roster_get()
        assert roster.items[carol_jid].subscription == "both"
        # The push carries the version the write answered (the shim does not ask again): the
        # one a get then gives.
        assert push.ver is not None and push.ver == roster.ver

    asyncio.run(scenario())
    rows = ejabberd.store_query(
        "SELECT name, subscription, groups, in_roster FROM roster_items "
        "WHERE user = ? AND contact = ?", (alice_jid, carol_jid))
    assert [(n, s, json.loads(g), r) for n, s, g, r in rows] == [("Carol", "both", ["Friends"], 1)]
