"""mod_roster's own API on the program's store, end to end: ejabberdctl's roster commands
(mod_admin_extra) and XEP-0227 export / import (ejabberd_piefxis) with `db_type: port`, a real
ejabberd 23.01, the real program on SQLite and slixmpp clients. These commands call
mod_roster, which reads and writes through mod_roster_port's storage callbacks (`store_*`).

(`add_rosteritem` is covered by test_feed_and_cache.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ejabberd_harness import EjabberdServer
from scenarios import eventually

pytestmark = pytest.mark.e2e

_CODE = "ctl-exit-code:"


def ctl(server: EjabberdServer, *args: str) -> tuple[int, str]:
    """Runs `ejabberdctl ARGS...` in the server (ejabberd_ctl:process/1, what the ejabberdctl
    script calls); returns its exit code and what it printed."""
    argv = ", ".join(json.dumps(a) for a in args)  # JSON strings are Erlang strings here
    out = server.rpc(
        f"Code = rpc:call(Node, ejabberd_ctl, process, [[{argv}]]), "
        f"io:format(\"~n{_CODE}~p~n\", [Code])")
    text, _, code = out.rpartition(_CODE)
    return int(code.strip()), text.strip()


def rows(server: EjabberdServer, user: str) -> dict[str, tuple]:
    """The store's rows of `user`: {contact: (name, subscription, pending_out, pending_in,
    in_roster, groups, request_text)}."""
    return {c: (n, s, po, pi, r, json.loads(g), t) for c, n, s, po, pi, r, g, t in
            server.store_query(
                "SELECT contact, name, subscription, pending_out, pending_in, in_roster, "
                "groups, request_text FROM roster_items WHERE user = ?", (user,))}


def seed(server: EjabberdServer, user: str) -> None:
    """One row of each kind, written behind ejabberd's back; returns once the change feed
    has reported them (a client logging in later gets no push of them, and the rows are
    not a change in flight while the test runs)."""
    server.store_execute_reported(
        "INSERT INTO roster_items (user, contact, name, subscription, pending_out, pending_in, "
        "in_roster, groups, request_text) VALUES "
        "(?, 'bob@localhost', 'Bob', 'both', 0, 0, 1, '[\"Friends\",\"Work\"]', ''), "
        "(?, 'carol@localhost', 'Carol', 'to', 0, 1, 1, '[]', 'let me see'), "
        "(?, 'dave@localhost', '', 'none', 1, 0, 1, '[\"Later\"]', ''), "
        "(?, 'erin@example.org', 'Erin', 'from', 0, 0, 1, '[]', ''), "
        "(?, 'eve@localhost', '', 'none', 0, 1, 0, '[]', 'hello?')",
        (user,) * 5)


def test_delete_rosteritem_removes_the_row_and_pushes(ejabberd, users, connect):
    alice_jid, bob_jid, carol_jid = users("alice", "bob", "carol")
    seed(ejabberd, alice_jid)

    async def scenario():
        alice = await connect(alice_jid)
        assert bob_jid in (await alice.roster_get()).items
        code, out = await asyncio.to_thread(
            ctl, ejabberd, "delete_rosteritem", "alice", "localhost", "bob", "localhost")
        assert (code, out) == (0, "")
        # The removal is pushed twice: the program's push, and mod_roster's own (see the
        # shim's README); both before the command returns.
        def removals(c):
            return [p for p in c.pushes_for(bob_jid) if p.item.subscription == "remove"]

        await alice.wait_for(lambda c: len(removals(c)) >= 2)
        roster = await alice.roster_get()
        assert bob_jid not in roster.items and carol_jid in roster.items
        # Every push of the removal carries the store's version (store_current_id: true): the
        # roster get after it is current. (The removal's pushes only: a push of the seeded rows
        # by the change feed, had one come after the login, rightly carries its own version.)
        assert [p.ver for p in removals(alice)] == [roster.ver] * len(removals(alice))
        assert (await alice.roster_get(ver=roster.ver)).items is None

    asyncio.run(scenario())
    assert bob_jid not in rows(ejabberd, alice_jid)
    assert carol_jid in rows(ejabberd, alice_jid)
    # Deleting what is not there is no error (mod_roster's semantics).
    assert ctl(ejabberd, "delete_rosteritem", "alice", "localhost", "bob", "localhost")[0] == 0


def test_get_rosteritems_of_the_store(ejabberd, users, connect):
    """`ejabberdctl get_roster` runs the roster_get hook: roster items as the store holds them
    (subscription, pending out as ask=subscribe, name, groups), never a stranger's request."""
    (alice_jid,) = users("alice")
    seed(ejabberd, alice_jid)
    code, out = ctl(ejabberd, "get_roster", "alice", "localhost")
    assert code == 0
    got = sorted(tuple(line.split("\t")) for line in out.splitlines() if line.strip())
    assert got == sorted([
        ("bob@localhost", "Bob", "both", "undefined", "Friends"),
        ("bob@localhost", "Bob", "both", "undefined", "Work"),
        ("carol@localhost", "Carol", "to", "undefined", ""),
        ("dave@localhost", "", "none", "subscribe", "Later"),
        ("erin@example.org", "Erin", "from", "undefined", ""),
    ])

    # A change made in the store behind ejabberd's back shows in get_roster once the change
    # feed has reported it (the shim's read cache holds the earlier answer until then).
    ejabberd.store_execute(
        "UPDATE roster_items SET subscription = 'both', name = 'Caroline' "
        "WHERE user = ? AND contact = 'carol@localhost'", (alice_jid,))

    def caroline_listed() -> bool:
        _, out = ctl(ejabberd, "get_roster", "alice", "localhost")
        return "carol@localhost\tCaroline\tboth\tundefined\t" in out.splitlines()

    async def scenario():
        await eventually(caroline_listed, timeout=10.0, what="the change in get_roster")
        # What a client sees is the same roster.
        alice = await connect(alice_jid)
        roster = await alice.roster_get()
        assert {j: (i.subscription, i.ask) for j, i in roster.items.items()} == {
            "bob@localhost": ("both", None), "carol@localhost": ("both", None),
            "dave@localhost": ("none", "subscribe"), "erin@example.org": ("from", None)}

    asyncio.run(scenario())


def test_process_rosteritems_lists_and_deletes_in_the_store(ejabberd, users, connect):
    """`ejabberdctl process_rosteritems` (mod_roster's backend callback, Mnesia syntax):
    list, then delete, the rows that match, across the users of the hosts served."""
    alice_jid, bob_jid = users("alice", "bob")
    seed(ejabberd, alice_jid)
    ejabberd.store_execute_reported(
        "INSERT INTO roster_items (user, contact, name, subscription) VALUES "
        "(?, 'alice@localhost', 'Alice', 'both'), (?, 'dave@localhost', '', 'none')",
        (bob_jid, bob_jid))

    code, out = ctl(ejabberd, "process_rosteritems", "list", "none:to", "any", "any", "any")
    assert code == 0
    pairs = set(re.findall(r"(\S+@\S+)\t(\S+@\S+)", out))
    assert pairs == {(alice_jid, "carol@localhost"), (alice_jid, "dave@localhost"),
                     (alice_jid, "eve@localhost"), (bob_jid, "dave@localhost")}
    assert len(rows(ejabberd, alice_jid)) == 5  # list changes nothing

    _, out = ctl(ejabberd, "process_rosteritems", "list", "any", "in", "alice@localhost", "any")
    assert set(re.findall(r"(\S+@\S+)\t(\S+@\S+)", out)) == {
        (alice_jid, "carol@localhost"), (alice_jid, "eve@localhost")}
    _, out = ctl(ejabberd, "process_rosteritems", "list", "any", "any", "any", "*@example.org")
    assert set(re.findall(r"(\S+@\S+)\t(\S+@\S+)", out)) == {(alice_jid, "erin@example.org")}

    async def scenario():
        alice = await connect(alice_jid)
        code, out = await asyncio.to_thread(
            ctl, ejabberd, "process_rosteritems", "delete", "none", "out", "any", "dave@*")
        assert code == 0
        assert set(re.findall(r"(\S+@\S+)\t(\S+@\S+)", out)) == {(alice_jid, "dave@localhost")}
        push = (await alice.wait_for(lambda c: c.pushes_for("dave@localhost")))[0]
        assert push.item.subscription == "remove"
        assert "dave@localhost" not in (await alice.roster_get()).items

    asyncio.run(scenario())
    assert set(rows(ejabberd, alice_jid)) == {
        "bob@localhost", "carol@localhost", "erin@example.org", "eve@localhost"}
    # Bob's dave is "none" without ask: not matched by "out".
    assert set(rows(ejabberd, bob_jid)) == {"alice@localhost", "dave@localhost"}


def test_export_piefxis_contains_the_stores_rosters(ejabberd, users, tmp_path: Path):
    alice_jid, bob_jid = users("alice", "bob")
    seed(ejabberd, alice_jid)
    ejabberd.store_execute_reported(
        "INSERT INTO roster_items (user, contact, name, subscription, groups) "
        "VALUES (?, 'alice@localhost', 'Alice', 'both', '[\"Friends\"]')", (bob_jid,))

    for command, extra in (("export_piefxis", ()), ("export_piefxis_host", ("localhost",))):
        out_dir = tmp_path / command
        out_dir.mkdir()
        code, out = ctl(ejabberd, command, str(out_dir), *extra)
        assert code == 0, out
        exported = exported_users(out_dir)
        assert set(exported) == {"alice", "bob"}
        items, presences = exported["alice"]
        assert items == {
            "bob@localhost": ("Bob", "both", None, ("Friends", "Work")),
            "carol@localhost": ("Carol", "to", None, ()),
            "dave@localhost": (None, "none", "subscribe", ("Later",)),
            "erin@example.org": ("Erin", "from", None, ()),
        }
        # Pending inbound requests (carol's, and a stranger's that is no roster item) are
        # exported as subscribe presences with their text.
        assert presences == {"carol@localhost": "let me see", "eve@localhost": "hello?"}
        assert exported["bob"] == ({"alice@localhost": ("Alice", "both", None, ("Friends",))},
                                   {})


def exported_users(out_dir: Path) -> dict[str, tuple[dict, dict]]:
    """{user: ({contact: (name, subscription, ask, groups)}, {from: status})} of every
    <user/> in the XEP-0227 files of `out_dir`."""
    pie, roster, client = "{urn:xmpp:pie:0}", "{jabber:iq:roster}", "{jabber:client}"
    found: dict[str, tuple[dict, dict]] = {}
    for path in sorted(out_dir.glob("*.xml")):
        for user in ET.parse(path).getroot().iter(f"{pie}user"):
            items = {i.get("jid"): (i.get("name") or None, i.get("subscription", "none"),
                                    i.get("ask"),
                                    tuple(g.text or "" for g in i.findall(f"{roster}group")))
                     for i in user.iter(f"{roster}item")}
            presences = {p.get("from"): (p.findtext(f"{client}status") or "")
                         for p in user.iter(f"{client}presence") if p.get("type") == "subscribe"}
            found[user.get("name")] = (items, presences)
    return found


PIEFXIS = """<?xml version='1.0' encoding='UTF-8'?>
<server-data xmlns='urn:xmpp:pie:0'>
  <host jid='localhost'>
    <user name='zoe' password='secret'>
      <query xmlns='jabber:iq:roster'>
        <item jid='alice@localhost' name='Alice' subscription='both'><group>Imported</group></item>
        <item jid='yann@example.org' subscription='to'/>
        <item jid='xavier@localhost' name='X' subscription='none'/>
      </query>
      <presence xmlns='jabber:client' from='walt@localhost' type='subscribe'>
        <status>please</status>
      </presence>
    </user>
  </host>
</server-data>
"""


def test_import_piefxis_writes_rosters_into_the_store(ejabberd, users, connect, tmp_path: Path):
    users("alice")
    path = tmp_path / "import.xml"
    path.write_text(PIEFXIS)
    code, out = ctl(ejabberd, "import_piefxis", str(path))
    assert code == 0, out
    zoe = "zoe@localhost"
    stored = rows(ejabberd, zoe)
    assert stored["alice@localhost"][:6] == ("Alice", "both", 0, 0, 1, ["Imported"])
    assert stored["yann@example.org"][:6] == ("", "to", 0, 0, 1, [])
    assert stored["xavier@localhost"][:6] == ("X", "none", 0, 0, 1, [])

    async def scenario():
        client = await connect(zoe)  # the import created the account
        roster = await client.roster_get()
        assert {j: (i.name, i.subscription, i.ask, i.groups) for j, i in roster.items.items()} == {
            "alice@localhost": ("Alice", "both", None, ("Imported",)),
            "yann@example.org": (None, "to", None, ()),
            "xavier@localhost": ("X", "none", None, ())}
        # The imported pending request is routed to zoe like any inbound subscribe: stored
        # as a stranger's request, re-sent at her first available presence.
        await client.wait_for(lambda c: c.presences_from("walt@localhost", "subscribe"))

    asyncio.run(scenario())
    assert rows(ejabberd, zoe)["walt@localhost"][1:5] == ("none", 0, 1, 0)
