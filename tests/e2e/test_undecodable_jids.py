"""Rows with a contact JID that ejabberd cannot parse, end to end: a real ejabberd 23.01 with
mod_roster_port, the real program on SQLite and slixmpp clients.

Another application writing the store can leave a contact that ejabberd's jid:decode/1 refuses
(a bracketed domain that is no IPv6 literal, a NUL, an empty localpart, a part over 1023
bytes). The program serves the row as it is; the shim must skip that one item, request or
effect, with one warning line naming the user and (a bounded, escaped view of) the JID, and
serve everything else: the roster IQ, the roster_get hook (login broadcast, ejabberdctl),
jid_info (probes, directed presences), pending requests, mod_roster's storage API and the
change feed's pushes."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from ejabberd_harness import EjabberdServer

pytestmark = pytest.mark.e2e

BAD_JIDS = [
    "x@[<script>' or 1=1; --]",
    "x@[a b\x00c]",
    "a\x00b@localhost",
    "@example.com",
    "a" * 1024 + "@localhost",  # localpart over 1023 bytes
]

# What a line of ejabberd's log shows when something went wrong rather than being skipped.
CRASH_MARKERS = ("crashed when running", "Failed to process iq", "cannot carry out effect",
                 "CRASH REPORT", "crash_report", "terminated abnormally")


def ctl(server: EjabberdServer, *args: str) -> tuple[int, list[str]]:
    """Runs `ejabberdctl ARGS...` in the server (ejabberd_ctl:process/1, as
    test_admin_and_xep0227.ctl does); returns its exit code and the lines it printed with a
    tab. OTP's logger also forwards the server's log events of the call (the shim's warnings)
    to the calling node, where they are printed too, possibly after the exit code."""
    argv = ", ".join(json.dumps(a) for a in args)  # JSON strings are Erlang strings here
    out = server.rpc(
        f"Code = rpc:call(Node, ejabberd_ctl, process, [[{argv}]]), "
        "io:format(\"~nctl-exit-code:~p~n\", [Code])")
    code = re.search(r"^ctl-exit-code:(-?\d+)$", out, re.MULTILINE)
    assert code, out
    return int(code.group(1)), [line for line in out.splitlines() if "\t" in line]


def shown(jid: str) -> str:
    """The shim's view of a JID in its log (roster_port_wire:printable/1): at most 100 bytes,
    quoted, bytes outside printable ASCII escaped as \\xNN, `"` and `\\` escaped."""
    raw = jid.encode()

    def byte(b: int) -> str:
        if b in (0x22, 0x5C):
            return "\\" + chr(b)
        return chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}"

    text = '"' + "".join(byte(b) for b in raw[:100]) + '"'
    return text + (f"... ({len(raw)} bytes)" if len(raw) > 100 else "")


def skipped(user: str, jid: str) -> str:
    """The end of the shim's warning line for `jid` skipped in a request about `user`."""
    return f"for {user}: ejabberd cannot parse the JID {shown(jid)}"


def insert(server: EjabberdServer, user: str, rows: list[tuple[str, str, str]]) -> None:
    """Roster items written behind ejabberd's back, one transaction each."""
    for contact, name, subscription in rows:
        server.store_execute(
            "INSERT INTO roster_items (user, contact, name, subscription) VALUES (?, ?, ?, ?)",
            (user, contact, name, subscription))


def log_lines(server: EjabberdServer) -> list[str]:
    return server.log_path.read_text(errors="replace").splitlines()


def wait_until_logged(server: EjabberdServer, texts: list[str], timeout: float = 15.0) -> None:
    for text in texts:
        server.wait_for_log(text, 1, 0, timeout)


def assert_no_crash(server: EjabberdServer) -> None:
    erlang_out = (server.workdir / "erlang.out").read_text(errors="replace").splitlines()
    crashes = [line for line in log_lines(server) + erlang_out
               if any(marker in line for marker in CRASH_MARKERS)]
    assert crashes == []


def assert_bounded(server: EjabberdServer) -> None:
    """No line shows more than 100 bytes of the long JID, nor a raw NUL."""
    text = server.log_path.read_text(errors="replace")
    assert "a" * 101 not in text
    assert "\x00" not in text


def seed_with_bad_rows(server: EjabberdServer, user: str) -> None:
    """Valid items of `user` next to one item per undecodable JID; waits until the change
    feed's push of every bad row has been skipped (the notifications have been handled)."""
    insert(server, user, [("bob@localhost", "Bob", "both"), ("carol@localhost", "Carol", "to")])
    insert(server, user, [(jid, "Bad", "both") for jid in BAD_JIDS])
    wait_until_logged(server, [f"skipped a push effect {skipped(user, jid)}" for jid in BAD_JIDS])


def test_a_roster_get_serves_every_valid_item(ejabberd, users, connect):
    alice_jid, bob_jid, carol_jid = users("alice", "bob", "carol")
    seed_with_bad_rows(ejabberd, alice_jid)

    async def scenario():
        alice = await connect(alice_jid)
        for _ in range(2):  # asked of the program, then answered from the shim's cache
            roster = await alice.roster_get()
            assert {j: (i.name, i.subscription) for j, i in roster.items.items()} == {
                bob_jid: ("Bob", "both"), carol_jid: ("Carol", "to")}
        assert (await alice.roster_get(ver=roster.ver)).items is None

    asyncio.run(scenario())
    wait_until_logged(ejabberd, [f"skipped a roster_iq item {skipped(alice_jid, jid)}"
                                 for jid in BAD_JIDS])
    assert_bounded(ejabberd)
    assert_no_crash(ejabberd)


def test_ejabberdctl_reads_every_valid_item(ejabberd, users):
    """ejabberdctl get_roster (the roster_get hook) and process_rosteritems (mod_roster's
    storage API: store_get_roster rows as #roster{})."""
    alice_jid, bob_jid, carol_jid = users("alice", "bob", "carol")
    seed_with_bad_rows(ejabberd, alice_jid)

    code, lines = ctl(ejabberd, "get_roster", "alice", "localhost")
    assert code == 0
    assert sorted(tuple(line.split("\t")) for line in lines) == [
        (bob_jid, "Bob", "both", "undefined", ""), (carol_jid, "Carol", "to", "undefined", "")]

    code, lines = ctl(ejabberd, "process_rosteritems", "list", "any", "any", "any", "any")
    assert code == 0
    assert sorted(line.split("\t") for line in lines) == [
        [alice_jid, bob_jid], [alice_jid, carol_jid]]

    wait_until_logged(ejabberd, [f"skipped a roster_get item {skipped(alice_jid, jid)}"
                                 for jid in BAD_JIDS]
                      + [f"skipped a store_get_roster row {skipped(alice_jid, jid)}"
                         for jid in BAD_JIDS])
    assert_bounded(ejabberd)
    assert_no_crash(ejabberd)


def test_presences_and_jid_info_with_bad_rows(ejabberd, users, connect):
    """Alice's login (roster_get broadcast, pending requests re-sent), Bob's probe and Alice's
    directed presence (jid_info, from the shim's load of her whole store) all work, and
    nothing crashes."""
    alice_jid, bob_jid, carol_jid, dave_jid = users("alice", "bob", "carol", "dave")
    seed_with_bad_rows(ejabberd, alice_jid)
    insert(ejabberd, bob_jid, [(alice_jid, "Alice", "both")])
    # Strangers' pending requests: one from a JID ejabberd cannot parse, one from Dave.
    for contact, text in (("y@[a b]", "bad"), (dave_jid, "let me in")):
        ejabberd.store_execute(
            "INSERT INTO roster_items (user, contact, pending_in, in_roster, request_text) "
            "VALUES (?, ?, 1, 0, ?)", (alice_jid, contact, text))

    async def scenario():
        bob = await connect(bob_jid)
        carol = await connect(carol_jid)
        alice = await connect(alice_jid)
        # Login: Alice's presence reaches Bob ("both"), Dave's request reaches Alice.
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "available"))
        request = (await alice.wait_for(lambda c: c.presences_from(dave_jid, "subscribe")))[0]
        assert request.status == "let me in"
        assert alice.presences_from("y@[a b]", "subscribe") == []

        # Bob's probe: answered because jid_info says Bob has "from".
        bob.presences.clear()
        bob.send_subscription(alice_jid, "probe")
        await bob.wait_for(lambda c: c.presences_from(alice_jid, "available"))
        # A directed presence to Carol (no subscription: jid_info "none", kept in pres_a).
        alice.xmpp.send_presence(pto=carol_jid, pstatus="hi Carol")
        await carol.wait_for(lambda c: c.presences_from(alice_jid, "available"))
        # Alice's roster still serves.
        assert set((await alice.roster_get()).items) == {bob_jid, carol_jid}

    asyncio.run(scenario())
    wait_until_logged(
        ejabberd, [f"skipped a pending_in request {skipped(alice_jid, 'y@[a b]')}"]
        + [f"skipped a store_get_roster row {skipped(alice_jid, jid)}" for jid in BAD_JIDS])
    assert_bounded(ejabberd)
    assert_no_crash(ejabberd)


def test_a_change_behind_ejabberds_back_is_pushed_next_to_a_bad_one(ejabberd, users, connect):
    """The change feed's pushes: the bad row's push is skipped, the valid one reaches the
    online client, and the roster get after it serves it."""
    alice_jid, bob_jid = users("alice", "bob")

    async def scenario():
        alice = await connect(alice_jid)
        await alice.roster_get()
        for contact, name in ((BAD_JIDS[0], "Bad"), (bob_jid, "Bob")):
            await asyncio.to_thread(insert, ejabberd, alice_jid, [(contact, name, "to")])
        push = (await alice.wait_for(lambda c: c.pushes_for(bob_jid), 10))[-1]
        assert (push.item.name, push.item.subscription) == ("Bob", "to")
        await asyncio.to_thread(ejabberd.wait_for_log,
                                f"skipped a push effect {skipped(alice_jid, BAD_JIDS[0])}")
        assert set((await alice.roster_get()).items) == {bob_jid}
        assert [p.item.jid for p in alice.pushes] == [bob_jid]

    asyncio.run(scenario())
    assert_no_crash(ejabberd)

