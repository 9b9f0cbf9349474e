"""Two ejabberd nodes on one PostgreSQL store, end to end: real ejabberd 23.01 twice, the real
program on PostgreSQL (tests/pg_cluster.py), slixmpp clients on each node.

The two nodes are independent, NOT an ejabberd cluster: each is its own Erlang VM with its own
node name, Mnesia (accounts), c2s port and mod_roster_port pool, and the only thing they share
is the roster database: the roster state crosses nodes through the database and the change
feed only. (tests/e2e/test_cluster.py runs two nodes joined with `ejabberdctl join_cluster`.)

Both serve the same XMPP domain, `localhost`, with the same accounts registered on each: that
is what makes the test meaningful. One user can then have a resource on each node, and a
change made through one node must reach the user's resource on the other. (Two domains would
need s2s between the nodes, and the same user would never be on both.) As the nodes are not
clustered, a stanza sent on node A to a user whose session is on node B is not delivered
there (node A's session manager only knows its own sessions); but the roster hooks run on
node A for that user all the same, and they write the shared database, so each side's roster
ends right, and the other node's clients hear of the change from their node's change feed
(`roster_changed` notifications; the program stamps its writes with its node's name, so a
node is only notified of the other node's writes and of other applications').
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer
from xmpp_client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

PASSWORD = "secret"
# The change feed is woken by NOTIFY: a push on the other node follows within milliseconds.
FEED_DEADLINE = 2.0


@pytest.fixture
def two_nodes(tmp_path: Path, pg_server):
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        pytest.skip("ejabberd 23.01 is not installed (scripts/bootstrap installs it)")
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        pytest.skip("the shim is not built (make -C erlang_shim)")
    schema = pg_server.create_schema()
    # json.dumps of an ASCII text is a TOML basic string.
    store = f'backend = "postgres"\ndsn = {json.dumps(pg_server.dsn(schema))}\n'
    nodes = [EjabberdServer(tmp_path / name, store_section=store)
             for name in ("node-a", "node-b")]
    try:
        for node in nodes:
            node.start()
            node.register("alice", "bob", password=PASSWORD)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        pg_server.drop_schema(schema)


async def connect(server: EjabberdServer, user: str, resource: str) -> Client:
    client = Client(f"{user}@{server.host}/{resource}", PASSWORD, server.c2s_port, server.ip)
    await client.connect(available=True)
    return client


def test_a_handshake_across_nodes_ends_consistent_and_changes_reach_the_other_node(two_nodes):
    node_a, node_b = two_nodes
    alice, bob = f"alice@{node_a.host}", f"bob@{node_a.host}"

    async def scenario() -> None:
        alice_a = await connect(node_a, "alice", "on-a")
        alice_b = await connect(node_b, "alice", "on-b")
        bob_b = await connect(node_b, "bob", "on-b")
        clients = [alice_a, alice_b, bob_b]
        try:
            # Alice, on A, asks Bob. Node A's hooks write both rows (Alice: ask; Bob: a
            # pending request); Alice's resource on B hears of it through B's feed.
            alice_a.send_subscription(bob, "subscribe")
            await alice_a.wait_for(lambda c: any(p.item.ask == "subscribe"
                                                 for p in c.pushes_for(bob)))
            await alice_b.wait_for(lambda c: any(p.item.ask == "subscribe"
                                                 for p in c.pushes_for(bob)), FEED_DEADLINE)

            # Bob, on B, approves. Node B's hooks write both rows again; Alice's resource on
            # A hears of her new subscription through A's feed.
            bob_b.send_subscription(alice, "subscribed")
            await alice_a.wait_for(lambda c: any(p.item.subscription == "to"
                                                 for p in c.pushes_for(bob)), FEED_DEADLINE)
            await alice_b.wait_for(lambda c: any(p.item.subscription == "to"
                                                 for p in c.pushes_for(bob)), FEED_DEADLINE)

            # Consistent on both sides, whichever node is asked (raw roster gets).
            alice_on_a, alice_on_b = await alice_a.roster_get(), await alice_b.roster_get()
            assert alice_on_a == alice_on_b
            assert (alice_on_a.items[bob].subscription, alice_on_a.items[bob].ask) == ("to", None)
            bob_on_b = await bob_b.roster_get()
            assert (bob_on_b.items[alice].subscription, bob_on_b.items[alice].ask) == ("from", None)

            # A roster set by Alice's resource on A: pushed to her resource on B, same ver.
            await alice_a.roster_set(bob, name="Bobby", groups=("Friends",))
            [push] = await alice_b.wait_for(
                lambda c: [p for p in c.pushes_for(bob) if p.item.name == "Bobby"],
                FEED_DEADLINE)
            assert (push.item.subscription, push.item.groups) == ("to", ("Friends",))
            assert push.ver == (await alice_b.roster_get()).ver == (await alice_a.roster_get()).ver
            # ...and its result is current on both nodes: a roster get with that ver is empty.
            assert (await alice_b.roster_get(ver=push.ver)).items is None
            assert (await alice_a.roster_get(ver=push.ver)).items is None

            # A removal on B: pushed to A as a removal.
            await alice_b.roster_set(bob, subscription="remove")
            await alice_a.wait_for(lambda c: c.pushes_for(bob)[-1].item.subscription == "remove",
                                   FEED_DEADLINE)
            assert bob not in (await alice_a.roster_get()).items
        finally:
            for client in clients:
                await client.disconnect()

    asyncio.run(scenario())
