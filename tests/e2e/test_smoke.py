"""Smoke test: two real clients, a real ejabberd with mod_roster_port, the real program.

Judged on the server's view: raw roster gets and the pushes and presences each client got.
"""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.e2e


def test_add_subscribe_approve_and_versioning(ejabberd, users, connect):
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)

        # Fresh accounts: empty rosters, with a version.
        empty = await alice.roster_get()
        assert empty.items == {}
        assert empty.ver is not None

        # A adds B by a roster set: pushed to A, nothing to B.
        await alice.roster_set(bob_jid, name="Bob", groups=("Friends",))
        push = (await alice.wait_for(lambda c: c.pushes_for(bob_jid)))[-1]
        assert push.item.subscription == "none"
        assert push.item.name == "Bob"
        assert push.item.groups == ("Friends",)
        assert push.ver is not None

        # A subscribes to B: A's item gets ask=subscribe, B gets the request.
        alice.send_subscription(bob_jid, "subscribe", status="it's me")
        await alice.wait_for(lambda c: any(p.item.ask == "subscribe" for p in c.pushes_for(bob_jid)))
        request = (await bob.wait_for(lambda c: c.presences_from(alice_jid, "subscribe")))[0]
        assert request.status == "it's me"

        # B approves: A now has "to", B has "from".
        bob.send_subscription(alice_jid, "subscribed")
        await alice.wait_for(lambda c: any(p.item.subscription == "to" for p in c.pushes_for(bob_jid)))
        await bob.wait_for(lambda c: any(p.item.subscription == "from" for p in c.pushes_for(alice_jid)))
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "subscribed"))

        a_roster = await alice.roster_get()
        b_roster = await bob.roster_get()
        assert a_roster.items[bob_jid].subscription == "to"
        assert a_roster.items[bob_jid].ask is None
        assert a_roster.items[bob_jid].name == "Bob"
        assert b_roster.items[alice_jid].subscription == "from"

        # B gained "from" on... no: A is subscribed to B, so B's presence reaches A.
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "available"))

        # Versioning: the current ver gives an empty result, an old one the full roster.
        assert a_roster.ver is not None and a_roster.ver != empty.ver
        same = await alice.roster_get(ver=a_roster.ver)
        assert same.items is None
        old = await alice.roster_get(ver=empty.ver)
        assert old.items is not None and bob_jid in old.items
        assert old.ver == a_roster.ver
        # The last push carried the current version.
        assert alice.pushes[-1].ver == a_roster.ver

    asyncio.run(scenario())
