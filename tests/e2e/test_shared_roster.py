"""mod_shared_roster with roster-port (issue 11): a real ejabberd 23.01 with mod_shared_roster
loaded, its groups made through its own API (mod_shared_roster:create_group/3,
add_user_to_group/3, remove_user_from_group/3 over rpc), real slixmpp clients.

- Group members see each other in roster gets (subscription both, the group's label as group),
  with versions: a get with the current ver is answered empty; a membership change, which
  writes nothing to the program's store, gives the full roster with a new ver.
- A member who renames a shared contact or puts it in a group gets one push, whose item a
  later get agrees with; the label shows once. A push's ver is never answered "current" while
  shared groups show anything (a relabelled group, which mod_shared_roster pushes nothing for,
  would otherwise stay stale in a caching client for good).
- A contact outside any shared group: the subscription handshake and an outgoing
  `unsubscribed` end exactly as on a server without mod_shared_roster (mod_shared_roster
  23.01's own handler turns the `unsubscribed` into an `unsubscribe` as well).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PASSWORD, _missing, run
from ejabberd_harness import EjabberdServer
from xmpp_client import Client


@pytest.fixture
def shared(tmp_path: Path):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    server = EjabberdServer(tmp_path / "ejabberd", shared_roster=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def srg(server: EjabberdServer, *calls: str) -> None:
    """Runs mod_shared_roster API calls (Erlang expressions with Host bound) in one rpc, and
    checks that each answered as it does on success."""
    body = ", ".join(f"rpc:call(Node, mod_shared_roster, {c})" for c in calls)
    out = server.rpc(f'Host = <<"{server.host}">>, io:format("~p~n", [[{body}]])')
    results = out.strip()
    assert "error" not in results and "badrpc" not in results, results


def create_group(name: str, label: str, displayed: tuple[str, ...] = ()) -> str:
    shown = ", ".join(f'<<"{g}">>' for g in displayed or (name,))
    return (f'create_group, [Host, <<"{name}">>, [{{label, <<"{label}">>}}, '
            f'{{displayed_groups, [{shown}]}}]]')


def add_member(user: str, group: str) -> str:
    return f'add_user_to_group, [Host, {{<<"{user}">>, Host}}, <<"{group}">>]'


def remove_member(user: str, group: str) -> str:
    return f'remove_user_from_group, [Host, {{<<"{user}">>, Host}}, <<"{group}">>]'


async def login(server: EjabberdServer, *names: str) -> list[Client]:
    clients = []
    for name in names:
        client = Client(f"{name}@{server.host}/test", PASSWORD, server.c2s_port, server.ip)
        await client.connect()
        clients.append(client)
    return clients


async def logout(clients: list[Client]) -> None:
    for client in clients:
        await client.disconnect()


def test_members_see_each_other_and_versions_follow_membership(shared):
    host = shared.host
    shared.register("alice", "bob", "carol", "dave")
    srg(shared, create_group("team", "Team"), add_member("alice", "team"),
        add_member("bob", "team"), add_member("carol", "team"))

    async def scenario():
        alice, dave = await login(shared, "alice", "dave")
        first = await alice.roster_get()
        assert set(first.items) == {f"bob@{host}", f"carol@{host}"}
        for item in first.items.values():
            assert (item.subscription, item.ask, item.groups) == ("both", None, ("Team",))
        assert (await dave.roster_get()).items == {}
        assert first.ver
        # The current ver: an empty result.
        assert (await alice.roster_get(first.ver)).items is None

        # dave joins while alice is online: nothing written to the program's store.
        srg(shared, add_member("dave", "team"))
        await alice.wait_for(lambda c: c.pushes_for(f"dave@{host}"))
        joined = await alice.roster_get(first.ver)
        assert joined.items is not None and set(joined.items) == {
            f"bob@{host}", f"carol@{host}", f"dave@{host}"}
        assert joined.items[f"dave@{host}"].subscription == "both"
        assert joined.ver and joined.ver != first.ver
        assert (await alice.roster_get(joined.ver)).items is None
        assert set((await dave.roster_get()).items) == {
            f"alice@{host}", f"bob@{host}", f"carol@{host}"}

        # dave leaves: the full roster again, without him. It is the first roster again, and
        # so is its ver (a version names a composed roster, whatever led to it).
        srg(shared, remove_member("dave", "team"))
        left = await alice.roster_get(joined.ver)
        assert left.items == first.items
        assert left.ver == first.ver
        assert (await alice.roster_get(left.ver)).items is None
        assert (await dave.roster_get()).items == {}
        await logout([alice, dave])

    run(scenario())


def test_a_user_outside_every_group_keeps_the_programs_roster_and_ver(shared):
    """mod_shared_roster loaded, the user in no group: gets and pushes are the program's."""
    host = shared.host
    shared.register("erin", "frank")

    async def scenario():
        (erin,) = await login(shared, "erin")
        await erin.roster_set(f"frank@{host}", name="Frank", groups=("Pals",))
        (push,) = await erin.wait_for(lambda c: c.pushes_for(f"frank@{host}"))
        got = await erin.roster_get()
        assert got.ver == push.ver and "+" not in got.ver
        assert got.items == {f"frank@{host}": push.item}
        assert (push.item.subscription, push.item.groups) == ("none", ("Pals",))
        assert (await erin.roster_get(got.ver)).items is None
        await logout([erin])

    run(scenario())


@pytest.mark.parametrize("groups, shown", [(("Friends",), ("Friends", "Team")),
                                           (("Team",), ("Team",))])
def test_renaming_a_shared_contact_gives_one_push_and_a_get_agrees(shared, groups, shown):
    host = shared.host
    shared.register("alice", "bob")
    srg(shared, create_group("team", "Team"), add_member("alice", "team"),
        add_member("bob", "team"))

    async def scenario():
        alice, bob = await login(shared, "alice", "bob")
        before = await alice.roster_get()
        assert before.items[f"bob@{host}"].groups == ("Team",)
        result = await alice.roster_set(f"bob@{host}", name="Bobby", groups=groups)
        assert result["type"] == "result"
        # Every push of the set is routed before its result: a get answered after it
        # comes after them all.
        after = await alice.roster_get()
        pushes = alice.pushes_for(f"bob@{host}")
        assert len(pushes) == 1, pushes
        (push,) = pushes
        assert (push.item.subscription, push.item.ask, push.item.name) == ("both", None, "Bobby")
        assert set(push.item.groups) == set(shown) and len(push.item.groups) == len(shown)
        assert after.items[f"bob@{host}"] == push.item
        assert after.ver != before.ver and (await alice.roster_get(after.ver)).items is None
        # A push's ver is never answered "current" while shared groups show anything: the
        # shim cannot know what of them the client saw (see the relabelling test below); a
        # get with it is the full roster, which agrees with the push.
        assert push.ver != after.ver
        assert (await alice.roster_get(push.ver)).items == after.items
        # bob's view of alice is unchanged, and nothing was pushed to him.
        assert (await bob.roster_get()).items[f"alice@{host}"].subscription == "both"
        assert bob.pushes == []
        await logout([alice, bob])

    run(scenario())


async def _handshake_then_unsubscribed(server: EjabberdServer) -> dict:
    """alice (a group member, when there are groups) and erin (in no group) subscribe to each
    other (both), then alice cancels erin's subscription to her (unsubscribed)."""
    host = server.host
    alice_jid, erin_jid = f"alice@{host}", f"erin@{host}"
    alice, erin = await login(server, "alice", "erin")

    def pushed(client, jid, subscription):
        return lambda c: [p for p in c.pushes_for(jid) if p.item.subscription == subscription]

    erin.send_subscription(alice_jid, "subscribe")
    await alice.wait_for(lambda c: c.presences_from(erin_jid, "subscribe"))
    alice.send_subscription(erin_jid, "subscribed")
    await erin.wait_for(pushed(erin, alice_jid, "to"))
    alice.send_subscription(erin_jid, "subscribe")
    await erin.wait_for(lambda c: c.presences_from(alice_jid, "subscribe"))
    erin.send_subscription(alice_jid, "subscribed")
    await alice.wait_for(pushed(alice, erin_jid, "both"))
    shaken = {"alice": (await alice.roster_get()).items.get(erin_jid),
              "erin": (await erin.roster_get()).items.get(alice_jid)}
    alice.pushes.clear()
    erin.pushes.clear()
    erin.presences.clear()
    alice.send_subscription(erin_jid, "unsubscribed")
    await erin.wait_for(lambda c: c.presences_from(alice_jid, "unsubscribed"))
    await erin.wait_for(pushed(erin, alice_jid, "from"))
    # Round trips after everything the unsubscribed caused on both sides (alice's own pushes
    # are routed before her presence leaves; erin's before his roster get is answered).
    after = {"alice": (await alice.roster_get()).items.get(erin_jid),
             "erin": (await erin.roster_get()).items.get(alice_jid)}
    outcome = {
        "handshake": {k: v and (v.subscription, v.ask) for k, v in shaken.items()},
        "after": {k: v and (v.subscription, v.ask) for k, v in after.items()},
        "alice_pushes": [(p.item.subscription, p.item.ask) for p in alice.pushes],
        "erin_pushes": [(p.item.subscription, p.item.ask) for p in erin.pushes],
        "erin_presences": sorted(p.type for p in erin.presences
                                 if p.from_jid == alice_jid
                                 and p.type not in ("available", "unavailable")),
    }
    await logout([alice, erin])
    return outcome


def test_a_contact_outside_the_groups_subscribes_and_is_unsubscribed_as_without_it(
        shared, tmp_path):
    """Regression (issue 11): mod_shared_roster 23.01's roster_out_subscription handler also
    cancelled alice's own subscription to erin (mod_roster's state machine, run on the
    program's store) when she sent him `unsubscribed`."""
    shared.register("alice", "bob", "erin")
    srg(shared, create_group("team", "Team"), add_member("alice", "team"),
        add_member("bob", "team"))
    with_groups = run(_handshake_then_unsubscribed(shared))

    plain = EjabberdServer(tmp_path / "plain")
    plain.start()
    try:
        plain.register("alice", "erin")
        without = run(_handshake_then_unsubscribed(plain))
    finally:
        plain.stop()

    # RFC 6121 3.2.1: only erin's subscription to alice ends; alice keeps hers (one push each).
    assert without == {"handshake": {"alice": ("both", None), "erin": ("both", None)},
                       "after": {"alice": ("to", None), "erin": ("from", None)},
                       "alice_pushes": [("to", None)], "erin_pushes": [("from", None)],
                       "erin_presences": ["unsubscribed"]}
    assert with_groups == without


def test_a_push_after_a_relabelling_never_declares_a_stale_roster_current(shared):
    """Found by review: the group is relabelled (mod_shared_roster 23.01 pushes nothing for
    set_group_opts), then an unrelated contact is renamed, which is pushed. A client that
    reconnects with that push's ver must get the full roster, with the new label."""
    host = shared.host
    shared.register("alice", "bob", "frank")
    srg(shared, create_group("team", "Team"), add_member("alice", "team"),
        add_member("bob", "team"))

    async def scenario():
        (alice,) = await login(shared, "alice")
        first = await alice.roster_get()
        assert first.items[f"bob@{host}"].groups == ("Team",)
        srg(shared, 'set_group_opts, [Host, <<"team">>, [{label, <<"Crew">>}, '
                    '{displayed_groups, [<<"team">>]}]]')
        await alice.roster_set(f"frank@{host}", name="Frank")
        (push,) = await alice.wait_for(lambda c: c.pushes_for(f"frank@{host}"))
        again = await alice.roster_get(push.ver)
        assert again.items is not None, "a roster showing the old label was declared current"
        assert again.items[f"bob@{host}"].groups == ("Crew",)
        await logout([alice])

    run(scenario())
