"""What the shim adds on top of the program: pre-approval on the wire (raw XML, as xmpp 1.6.1
has no `approved`), stream features, and the safe answers when the program is not there."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import slixmpp

from ejabberd_harness import EjabberdServer

from roster_port.replay import read_transcript

pytestmark = pytest.mark.e2e


def test_pre_approval_is_pushed_and_honoured(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        features = alice.xmpp.features
        assert "rosterver" in features or any("rosterver" in f for f in features)

        # Alice pre-approves Bob: pushed with approved='true', nothing routed to Bob.
        alice.send_subscription(bob_jid, "subscribed")
        push = (await alice.wait_for(lambda c: c.pushes_for(bob_jid)))[-1]
        assert push.item.approved is True
        assert push.item.subscription == "none"
        roster = await alice.roster_get()
        assert roster.items[bob_jid].approved is True

        # Bob subscribes: answered at once by Alice's server, not shown to Alice.
        bob.send_subscription(alice_jid, "subscribe")
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribed"))
        await alice.wait_for(lambda c: any(p.item.subscription == "from"
                                           for p in c.pushes_for(bob_jid)))
        assert alice.presences_from(bob_jid, "subscribe") == []
        assert (await bob.roster_get()).items[alice_jid].subscription == "to"
        assert (await alice.roster_get()).items[bob_jid].subscription == "from"

    asyncio.run(scenario())


def test_no_program_gives_safe_answers_at_once(tmp_path: Path):
    from conftest import PASSWORD, _missing
    from xmpp_client import Client

    if _missing():
        pytest.skip(_missing())
    server = EjabberdServer(tmp_path / "ejabberd", command=str(tmp_path / "no-such-program"),
                            call_timeout_ms=3000)
    server.start()
    try:
        server.register("alice", "bob", password=PASSWORD)

        async def scenario():
            # Login works (roster_get and pending_in fall back to empty answers).
            alice = Client("alice@localhost/t", PASSWORD, server.c2s_port)
            await alice.connect()
            try:
                t0 = time.monotonic()
                with pytest.raises(slixmpp.exceptions.IqError) as err:
                    await alice.roster_get()
                assert time.monotonic() - t0 < 1.0, "unavailable must be answered at once"
                assert err.value.condition == "internal-server-error"
                assert err.value.etype == "wait"
            finally:
                alice.xmpp.disconnect()

        asyncio.run(scenario())
        log = server.log_path.read_text()
        assert "cannot start" in log and "no-such-program" in log
    finally:
        server.stop()


def test_stranger_subscribed_is_not_delivered_despite_mod_pubsub(ejabberd, users, connect):
    """mod_pubsub answers true on roster_in_subscription; the program's deliver=false wins.

    Bob's own server would keep his `subscribed` (a pre-approval, never routed), so it is
    routed inside ejabberd as a server without pre-approval would send it: it does reach
    Alice's roster_in_subscription hook, where the program answers "do not deliver".
    """
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        xml = f"<presence xmlns='jabber:client' from='{bob_jid}' to='{alice_jid}' type='subscribed'/>"
        ejabberd.rpc(                                        # Alice asked nothing
            f'El = rpc:call(Node, fxml_stream, parse_element, [<<"{xml}">>]), '
            "Pkt = rpc:call(Node, xmpp, decode, [El]), "
            "ok = rpc:call(Node, ejabberd_router, route, [Pkt])"
        )
        bob.send_subscription(alice_jid, "subscribe")       # a marker that is delivered
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "subscribe"))
        assert alice.presences_from(bob_jid, "subscribed") == []
        assert (await alice.roster_get()).items == {}        # a stranger's request is no item
        # The hook did run, and the program did say no: the shim's answer won over mod_pubsub's.
        answers = {
            (entry.worker, entry.message[1]): entry.message for entry in read_transcript(ejabberd.transcript_path)
            if entry.direction == "out" and entry.message[0] == 1
        }
        asked = [
            (entry.worker, entry.message[1]) for entry in read_transcript(ejabberd.transcript_path)
            if entry.direction == "in" and entry.message[2] == "in_subscription"
            and entry.message[3]["user"] == alice_jid and entry.message[3]["type"] == "subscribed"
        ]
        assert len(asked) == 1
        assert answers[asked[0]][3]["deliver"] is False

    asyncio.run(scenario())


def test_removed_account_unsubscribes_its_contacts(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        # Mutual subscription.
        alice.send_subscription(bob_jid, "subscribe")
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribe"))
        bob.send_subscription(alice_jid, "subscribed")
        bob.send_subscription(alice_jid, "subscribe")
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "subscribe"))
        alice.send_subscription(bob_jid, "subscribed")
        await alice.wait_for(lambda c: any(p.item.subscription == "both"
                                           for p in c.pushes_for(bob_jid)))
        await bob.disconnect()

        ejabberd.rpc('rpc:call(Node, ejabberd_auth, remove_user, '
                     '[<<"bob">>, <<"localhost">>])')
        # Bob's server cancels both directions for him; Alice's roster follows.
        await alice.wait_for(lambda c: any(p.item.subscription == "none"
                                           for p in c.pushes_for(bob_jid)), timeout=10)
        assert (await alice.roster_get()).items[bob_jid].subscription == "none"

    asyncio.run(scenario())
    # A new account of the same name starts with an empty roster.
    users("bob")

    async def fresh_bob():
        bob = await connect(bob_jid)
        assert (await bob.roster_get()).items == {}

    asyncio.run(fresh_bob())


def test_module_stop_gives_hooks_back(ejabberd):
    lookup = ('io:format("~p~n", [[rpc:call(Node, ets, lookup, [hooks, {H, <<"localhost">>}]) '
              '|| H <- [roster_get, roster_in_subscription, user_send_packet]]])')
    before = ejabberd.rpc(lookup)
    assert "mod_roster_port" in before and "get_user_roster_items" not in before
    ejabberd.rpc('ok = rpc:call(Node, gen_mod, stop_module_keep_config, '
                 '[<<"localhost">>, mod_roster_port])')
    after = ejabberd.rpc(lookup)
    assert "mod_roster_port" not in after
    assert "get_user_roster_items" in after and "mod_roster,in_subscription" in after.replace(" ", "")


def test_killed_program_is_restarted(ejabberd, users, connect):
    import subprocess

    (alice_jid,) = users("alice")
    config = str(ejabberd.workdir / "roster-port.toml")
    pids = subprocess.run(["pgrep", "-f", f"serve --config {config}"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == ejabberd.pool_size
    for pid in pids:
        subprocess.run(["kill", "-9", pid], check=True)

    deadline = time.monotonic() + 10
    while ejabberd.log_path.read_text().count("speaks protocol") < 2 * ejabberd.pool_size:
        assert time.monotonic() < deadline, "the programs were not restarted"
        time.sleep(0.1)
    assert ejabberd.log_path.read_text().count("exited with status 137") == ejabberd.pool_size

    async def scenario():
        alice = await connect(alice_jid)
        await alice.roster_set("bob@localhost", name="Bob")
        assert (await alice.roster_get()).items["bob@localhost"].name == "Bob"

    asyncio.run(scenario())


def test_pending_request_is_resent_at_first_available_presence(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        bob = await connect(bob_jid)
        bob.send_subscription(alice_jid, "subscribe", status="remember me")
        await bob.wait_for(lambda c: any(p.item.ask == "subscribe" for p in c.pushes_for(alice_jid)))

        # Alice was offline: the request is stored and comes with her first presence only.
        alice = await connect(alice_jid, available=False)
        await asyncio.sleep(0.5)
        assert alice.presences_from(bob_jid, "subscribe") == []
        alice.xmpp.send_presence()
        request = (await alice.wait_for(lambda c: c.presences_from(bob_jid, "subscribe")))[0]
        assert request.status == "remember me"
        # A stranger's request is not a roster item.
        assert bob_jid not in (await alice.roster_get()).items

    asyncio.run(scenario())


def test_remote_roster_access_only_when_the_hook_allows_it(ejabberd, users, connect):
    """An IQ to another user's roster is `forbidden` unless `roster_remote_access` (mod_privilege,
    XEP-0356) says yes; then the program is told (`remote_access: true`) and serves it."""
    import xml.etree.ElementTree as ET

    alice_jid, bob_jid = users("alice", "bob")
    ejabberd.store_execute(
        "INSERT INTO roster_items (user, contact, name, subscription) "
        "VALUES (?, 'carol@localhost', 'Carol', 'both')", (alice_jid,))

    async def get_alices_roster(bob) -> slixmpp.Iq:
        iq = bob.xmpp.Iq(stype="get", sto=alice_jid)
        iq.append(ET.Element("{jabber:iq:roster}query"))
        try:
            return await iq.send(timeout=10)
        except slixmpp.exceptions.IqError as exc:
            return exc.iq

    async def scenario():
        bob = await connect(bob_jid)
        refused = await get_alices_roster(bob)
        assert (refused["type"], refused["error"]["condition"]) == ("error", "forbidden")
        # What mod_privilege does for a privileged component: let this one through.
        await asyncio.to_thread(
            ejabberd.rpc,
            "ok = rpc:call(Node, ejabberd_hooks, add, [roster_remote_access, <<\"localhost\">>, "
            "fun(_Acc, _IQ) -> true end, 50])")
        served = await get_alices_roster(bob)
        assert served["type"] == "result", served
        items = served.xml.findall("{jabber:iq:roster}query/{jabber:iq:roster}item")
        assert [(i.get("jid"), i.get("subscription")) for i in items] == [
            ("carol@localhost", "both")]

    asyncio.run(scenario())
