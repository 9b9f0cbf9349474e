"""What the RFC 6121 cell tests, the scenario tests and the transcript recorder share.

- `World`: one running ejabberd (tests/e2e/ejabberd_harness.py) seen the way a person checking
  the server would see it: real slixmpp clients (`login`), the stored rows of the program's
  SQLite store (`row`, read-only), the requests the shim sent the program (`transcript`), and
  a presence routed by the server itself (`inject_presence`).
- `SCENARIOS`: the user-level scenarios, one coroutine each, run by tests/e2e/test_scenarios.py
  against a fresh server and recorded by tests/e2e/record_transcripts.py into
  tests/transcripts/<name>.msgpack. Each one asserts what the server did (raw roster gets,
  pushes, presences, stored rows), so recording a transcript also checks the behaviour.

Nothing here changes the harness: it only uses EjabberdServer's public API and files.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).parent))

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer  # noqa: E402
from xmpp_client import Client, Item, Presence, Push  # noqa: E402

PASSWORD = "secret"
SUBSCRIPTION_TYPES = ("subscribe", "subscribed", "unsubscribe", "unsubscribed")


def missing() -> str | None:
    """Why no ejabberd can be run here, or None. (The same test as tests/e2e/conftest.py's,
    without importing a module named `conftest`, which tests/conftest.py also is.)"""
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        return "ejabberd 23.01 is not installed (scripts/bootstrap installs it)"
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        return "the shim is not built (make -C erlang_shim)"
    return None


@dataclass(frozen=True)
class StoredRow:
    """One row of the program's roster_items table, as SQLite holds it."""

    subscription: str
    pending_out: bool
    pending_in: bool
    approved: bool
    in_roster: bool
    name: str
    groups: tuple[str, ...]
    request_text: str


class TranscriptTail:
    """Reads the shim's transcript (msgpack values appended as the shim goes) incrementally.

    The shim writes from a gen_server cast, so the newest record may be missing or half
    written: feeding an Unpacker only what is on disk and iterating stops at the last whole
    value, and the rest comes with the next poll.
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        self.unpacker.feed(data)
        for direction, _worker, _ts, message in self.unpacker:
            if direction == "in" and message and message[0] == 0:
                self.requests.append((message[2], message[3]))

    def count(self, op: str, **args: Any) -> int:
        """How many `op` requests the shim sent with these argument values."""
        self.poll()
        return sum(
            1
            for name, sent in self.requests
            if name == op and all(sent.get(k) == v for k, v in args.items())
        )


class World:
    """A running server plus the clients logged into it; `close()` logs them all out."""

    def __init__(self, server: EjabberdServer):
        self.server = server
        self.clients: list[Client] = []
        self.transcript = TranscriptTail(server.transcript_path)
        self._db: sqlite3.Connection | None = None

    def jid(self, name: str) -> str:
        return f"{name}@{self.server.host}"

    def register(self, *names: str) -> list[str]:
        self.server.register(*names, password=PASSWORD)
        return [self.jid(n) for n in names]

    async def login(self, name: str, resource: str = "test", available: bool = True) -> Client:
        client = Client(f"{self.jid(name)}/{resource}", PASSWORD, self.server.c2s_port,
                        self.server.ip)
        # SCRAM's 4096 rounds of PBKDF2 in slixmpp cost ~0.1 s of CPU per login; the cell
        # tests log in 150+ clients on two cores. PLAIN over loopback proves the same login.
        client.xmpp.plugin["feature_mechanisms"].use_mech = "PLAIN"
        # 30 s, not 10: the cells log in 40 clients at a time, and on two shared cores under
        # other test runs a login was seen to take over 10 s ("no session within 10 s").
        await client.connect(available=available, timeout=30)
        self.clients.append(client)
        return client

    async def logout(self, client: Client) -> None:
        """Ends the session and waits until the server has dropped it."""
        disconnected = asyncio.Event()
        client.xmpp.add_event_handler("disconnected", lambda _: disconnected.set())
        client.xmpp.disconnect()
        try:
            await asyncio.wait_for(disconnected.wait(), 5)
        except asyncio.TimeoutError:
            pass
        if client in self.clients:
            self.clients.remove(client)
        # ejabberd closes the session (sm unregister) a moment after the stream end.
        await asyncio.sleep(0.3)

    async def drop(self, *clients: Client) -> None:
        """Disconnects clients without waiting for the server to notice."""
        for client in clients:
            client.xmpp.disconnect()
            if client in self.clients:
                self.clients.remove(client)
        await asyncio.sleep(0)

    async def close(self) -> None:
        for client in list(self.clients):
            try:
                client.xmpp.disconnect()
            except Exception:  # noqa: BLE001 - the stream may be gone already
                pass
        self.clients.clear()
        await asyncio.sleep(0.1)
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the store ------------------------------------------------------------------------

    def _store(self) -> sqlite3.Connection:
        if self._db is None:
            # Read-only: the tests look at the store, never write it behind the program.
            self._db = sqlite3.connect(f"file:{self.server.store_path}?mode=ro", uri=True,
                                       timeout=10)
        return self._db

    def row(self, user: str, contact: str) -> StoredRow | None:
        """The stored row of `user`'s roster for `contact` (None: no row at all)."""
        found = self._store().execute(
            "SELECT subscription, pending_out, pending_in, approved, in_roster, name, groups,"
            " request_text FROM roster_items WHERE user = ? AND contact = ?",
            (user, contact),
        ).fetchone()
        if found is None:
            return None
        sub, po, pi, approved, in_roster, name, groups, text = found
        return StoredRow(sub, bool(po), bool(pi), bool(approved), bool(in_roster), name,
                         tuple(json.loads(groups)), text)

    def rows(self, user: str) -> dict[str, StoredRow]:
        contacts = [c for (c,) in self._store().execute(
            "SELECT contact FROM roster_items WHERE user = ?", (user,))]
        return {c: self.row(user, c) for c in contacts}

    # -- the server itself ----------------------------------------------------------------

    def inject_presence(self, from_jid: str, to_jid: str, ptype: str) -> None:
        """Routes `<presence type=ptype>` from `from_jid` to `to_jid` inside ejabberd, as if it
        came from the contact's server (ejabberd_router:route), bypassing the sender's roster.

        Used where the sender's own server, being correct, would not let the presence out (a
        `subscribed` that is a pre-approval for the sender) but the receiver's cell must still
        be driven: a server without pre-approval would send it."""
        xml = (f"<presence xmlns='jabber:client' from='{from_jid}' to='{to_jid}' "
               f"type='{ptype}'/>")
        self.server.rpc(
            f'El = rpc:call(Node, fxml_stream, parse_element, [<<"{xml}">>]), '
            "Pkt = rpc:call(Node, xmpp, decode, [El]), "
            "ok = rpc:call(Node, ejabberd_router, route, [Pkt])"
        )


# -- waiting for the server ------------------------------------------------------------------


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Polls `check()` until it returns a truthy value; fails with `what` after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        await asyncio.sleep(0.02)


async def quiet(*clients: Client, settle: float = 0.3) -> None:
    """Lets whatever is still in flight arrive before a test asserts that something did NOT
    happen: one IQ round trip per client (its c2s process has handled what came before),
    then a short pause for chained presences (auto-replies, resent presences)."""
    await asyncio.gather(*(c.roster_get() for c in clients))
    await asyncio.sleep(settle)


def subscription_presences(client: Client, from_jid: str) -> list[str]:
    """Types of the subscription presences from `from_jid` that reached `client`, in order."""
    return [p.type for p in client.presences
            if p.from_jid == from_jid and p.type in SUBSCRIPTION_TYPES]


def wire(item: Item) -> tuple[str, str | None, bool]:
    return (item.subscription, item.ask, item.approved)


# -- the scenarios -----------------------------------------------------------------------------
#
# Each takes a World whose server is fresh (empty store) and registers its own accounts.
# They assert the server's view at every step; tests/e2e/test_scenarios.py runs them, and
# tests/e2e/record_transcripts.py runs them to record tests/transcripts/<name>.msgpack.

Scenario = Callable[[World], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


async def _pushed(client: Client, jid: str, count: int) -> list[Push]:
    """Waits for the `count`-th push about `jid` and returns them all."""
    return await client.wait_for(lambda c: len(c.pushes_for(jid)) >= count and c.pushes_for(jid),
                                 timeout=10)


async def _presence(client: Client, jid: str, ptype: str, count: int = 1) -> list[Presence]:
    return await client.wait_for(
        lambda c: len(c.presences_from(jid, ptype)) >= count and c.presences_from(jid, ptype),
        timeout=10)


@scenario
async def login_and_roster_get(world: World) -> None:
    """Login; roster get without ver, with the current ver (empty result), with an old ver."""
    alice_jid, bob_jid = world.register("alice", "bob")
    alice = await world.login("alice")

    first = await alice.roster_get()
    assert first.items == {}, "a new account has an empty roster"
    assert first.ver is not None, "versioning is on: a get without ver still returns one"

    # The client's ver is current: an empty result, no items re-sent (RFC 6121 2.6.3).
    unchanged = await alice.roster_get(ver=first.ver)
    assert unchanged.items is None

    await alice.roster_set(bob_jid, name="Bob", groups=("Friends",))
    push = (await _pushed(alice, bob_jid, 1))[0]

    # An old ver (and the empty ver a client sends on its first login) gets the full roster
    # and the version the last push carried.
    for old in (first.ver, ""):
        full = await alice.roster_get(ver=old)
        assert full.items is not None and set(full.items) == {bob_jid}
        assert full.ver == push.ver
        assert full.ver != first.ver
    plain = await alice.roster_get()
    assert plain.items[bob_jid].name == "Bob" and plain.items[bob_jid].groups == ("Friends",)
    assert (await alice.roster_get(ver=plain.ver)).items is None

    # A second login sees the stored roster: the store, not the session, is the truth.
    await world.logout(alice)
    again = await world.login("alice", resource="again")
    after = await again.roster_get(ver=first.ver)
    assert after.items is not None and after.items[bob_jid].name == "Bob"
    assert (await again.roster_get(ver=after.ver)).items is None


@scenario
async def add_rename_regroup_remove(world: World) -> None:
    """Roster sets: add an item, rename it, move it between groups, remove it."""
    alice_jid, bob_jid, carol_jid = world.register("alice", "bob", "carol")
    alice = await world.login("alice")
    bob = await world.login("bob")

    await alice.roster_set(bob_jid, name="Bob", groups=("Friends",))
    add = (await _pushed(alice, bob_jid, 1))[-1]
    assert (add.item.subscription, add.item.name, add.item.groups) == ("none", "Bob", ("Friends",))
    await alice.roster_set(carol_jid, name="Carol")
    await _pushed(alice, carol_jid, 1)

    await alice.roster_set(bob_jid, name="Robert", groups=("Friends",))
    rename = (await _pushed(alice, bob_jid, 2))[-1]
    assert (rename.item.name, rename.item.groups) == ("Robert", ("Friends",))

    await alice.roster_set(bob_jid, name="Robert", groups=("Work", "Chess"))
    regroup = (await _pushed(alice, bob_jid, 3))[-1]
    assert regroup.item.name == "Robert" and set(regroup.item.groups) == {"Work", "Chess"}
    assert len({add.ver, rename.ver, regroup.ver}) == 3, "every change moves the version"

    roster = await alice.roster_get()
    assert set(roster.items) == {bob_jid, carol_jid}
    assert roster.items[bob_jid].name == "Robert"
    assert set(roster.items[bob_jid].groups) == {"Work", "Chess"}
    assert roster.ver == regroup.ver, "the roster's version is the last push's"

    # Setting the same name and groups again changes nothing: no push, same version.
    await alice.roster_set(bob_jid, name="Robert", groups=("Work", "Chess"))
    await quiet(alice)
    assert len(alice.pushes_for(bob_jid)) == 3
    assert (await alice.roster_get()).ver == roster.ver

    await alice.roster_set(bob_jid, subscription="remove")
    removal = (await _pushed(alice, bob_jid, 4))[-1]
    assert removal.item.subscription == "remove"
    roster = await alice.roster_get()
    assert set(roster.items) == {carol_jid}
    assert world.row(alice_jid, bob_jid) is None, "a removed item leaves no row"
    # Bob was never subscribed either way: removing him told him nothing.
    await quiet(alice, bob)
    assert subscription_presences(bob, alice_jid) == []
    assert bob.pushes == []


@scenario
async def subscription_handshake_both_directions(world: World) -> None:
    """Alice subscribes to Bob and Bob approves; then Bob subscribes to Alice and she approves."""
    alice_jid, bob_jid = world.register("alice", "bob")
    alice = await world.login("alice")
    bob = await world.login("bob")

    # Alice -> Bob: her item gets ask='subscribe', Bob is asked with her text.
    alice.send_subscription(bob_jid, "subscribe", status="Alice here")
    asked = (await _pushed(alice, bob_jid, 1))[-1]
    assert wire(asked.item) == ("none", "subscribe", False)
    request = (await _presence(bob, alice_jid, "subscribe"))[0]
    assert request.status == "Alice here"
    # A stranger's request is stored with its text, but is not an item of Bob's roster.
    assert alice_jid not in (await bob.roster_get()).items
    assert world.row(bob_jid, alice_jid).pending_in
    assert world.row(bob_jid, alice_jid).request_text == "Alice here"

    bob.send_subscription(alice_jid, "subscribed")
    assert wire((await _pushed(alice, bob_jid, 2))[-1].item) == ("to", None, False)
    assert wire((await _pushed(bob, alice_jid, 1))[-1].item) == ("from", None, False)
    await _presence(alice, bob_jid, "subscribed")
    # Bob gained a subscriber: his current presence goes to Alice at once.
    await _presence(alice, bob_jid, "available")

    # Bob -> Alice.
    bob.send_subscription(alice_jid, "subscribe")
    assert wire((await _pushed(bob, alice_jid, 2))[-1].item) == ("from", "subscribe", False)
    await _presence(alice, bob_jid, "subscribe")
    alice.send_subscription(bob_jid, "subscribed")
    assert wire((await _pushed(alice, bob_jid, 4))[-1].item) == ("both", None, False)
    assert wire((await _pushed(bob, alice_jid, 3))[-1].item) == ("both", None, False)
    await _presence(bob, alice_jid, "subscribed")
    await _presence(bob, alice_jid, "available")

    a, b = (await alice.roster_get()).items, (await bob.roster_get()).items
    assert wire(a[bob_jid]) == ("both", None, False)
    assert wire(b[alice_jid]) == ("both", None, False)
    assert world.row(alice_jid, bob_jid).request_text == ""


@scenario
async def subscription_denied(world: World) -> None:
    """Bob refuses Alice's request: her pending ask is dropped, his stored request forgotten."""
    alice_jid, bob_jid = world.register("alice", "bob")
    alice = await world.login("alice")
    bob = await world.login("bob")

    alice.send_subscription(bob_jid, "subscribe", status="may I?")
    await _pushed(alice, bob_jid, 1)
    await _presence(bob, alice_jid, "subscribe")

    bob.send_subscription(alice_jid, "unsubscribed")
    denied = (await _pushed(alice, bob_jid, 2))[-1]
    assert wire(denied.item) == ("none", None, False)
    await _presence(alice, bob_jid, "unsubscribed")
    assert wire((await alice.roster_get()).items[bob_jid]) == ("none", None, False)
    # Bob never had Alice in his roster: the denied request leaves nothing behind, and he
    # gets no push for a stranger.
    assert world.row(bob_jid, alice_jid) is None
    assert (await bob.roster_get()).items == {}
    await quiet(alice, bob)
    assert bob.pushes == []
    assert alice.presences_from(bob_jid, "available") == []


@scenario
async def subscription_cancelled(world: World) -> None:
    """Cancel a pending request; unsubscribe from a contact; revoke a contact's subscription."""
    alice_jid, bob_jid = world.register("alice", "bob")
    alice = await world.login("alice")
    bob = await world.login("bob")

    # A request withdrawn before Bob answers: Bob's stored request goes away.
    alice.send_subscription(bob_jid, "subscribe", status="first try")
    await _presence(bob, alice_jid, "subscribe")
    assert world.row(bob_jid, alice_jid).pending_in
    alice.send_subscription(bob_jid, "unsubscribe")
    await alice.wait_for(lambda c: wire(c.pushes_for(bob_jid)[-1].item) == ("none", None, False))
    await _presence(bob, alice_jid, "unsubscribe")
    assert world.row(bob_jid, alice_jid) is None

    # Mutual subscription, then Alice unsubscribes from Bob's presence (she keeps "from").
    alice.send_subscription(bob_jid, "subscribe")
    await _presence(bob, alice_jid, "subscribe", count=2)
    bob.send_subscription(alice_jid, "subscribed")
    bob.send_subscription(alice_jid, "subscribe")
    await _presence(alice, bob_jid, "subscribe")
    alice.send_subscription(bob_jid, "subscribed")
    await alice.wait_for(lambda c: c.pushes_for(bob_jid)[-1].item.subscription == "both")
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "both")

    alice.send_subscription(bob_jid, "unsubscribe")
    await alice.wait_for(lambda c: c.pushes_for(bob_jid)[-1].item.subscription == "from")
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "to")
    await _presence(bob, alice_jid, "unsubscribe")
    # Bob's server answers the unsubscribe for him (ejabberd's way); for Alice, now in "from",
    # that answer changes nothing and is not shown (RFC 6121 table: F, in unsubscribed).
    await eventually(lambda: world.transcript.count(
        "in_subscription", user=alice_jid, contact=bob_jid, type="unsubscribed"),
        what="Bob's server answering unsubscribed")
    await _presence(alice, bob_jid, "unavailable")
    await quiet(alice)
    assert "unsubscribed" not in subscription_presences(alice, bob_jid)

    # Alice revokes Bob's subscription to her: both end with none, items kept.
    alice.send_subscription(bob_jid, "unsubscribed")
    await alice.wait_for(lambda c: c.pushes_for(bob_jid)[-1].item.subscription == "none")
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "none")
    await _presence(bob, alice_jid, "unsubscribed")
    await _presence(bob, alice_jid, "unavailable")
    assert wire((await alice.roster_get()).items[bob_jid]) == ("none", None, False)
    assert wire((await bob.roster_get()).items[alice_jid]) == ("none", None, False)


@scenario
async def pre_approval(world: World) -> None:
    """Alice approves Bob before he asks; his later request is answered at once for her."""
    alice_jid, bob_jid, carol_jid = world.register("alice", "bob", "carol")
    alice = await world.login("alice")
    bob = await world.login("bob")
    carol = await world.login("carol")
    assert "preapproval" in alice.xmpp.features, \
        f"the server advertises pre-approval: {alice.xmpp.features}"

    alice.send_subscription(bob_jid, "subscribed")
    pre = (await _pushed(alice, bob_jid, 1))[-1]
    assert wire(pre.item) == ("none", None, True)
    assert (await alice.roster_get()).items[bob_jid].approved
    await quiet(alice, bob)
    assert subscription_presences(bob, alice_jid) == [], "a pre-approval is not routed"
    assert world.row(bob_jid, alice_jid) is None

    bob.send_subscription(alice_jid, "subscribe")
    await _presence(bob, alice_jid, "subscribed")
    assert wire((await _pushed(alice, bob_jid, 2))[-1].item) == ("from", None, False)
    assert wire((await _pushed(bob, alice_jid, 2))[-1].item) == ("to", None, False)
    await _presence(bob, alice_jid, "available")
    await quiet(alice, bob)
    assert subscription_presences(alice, bob_jid) == [], "Alice is not asked again"

    # A pre-approval withdrawn (out unsubscribed) no longer answers for her.
    alice.send_subscription(carol_jid, "subscribed")
    await _pushed(alice, carol_jid, 1)
    alice.send_subscription(carol_jid, "unsubscribed")
    cleared = (await _pushed(alice, carol_jid, 2))[-1]
    assert wire(cleared.item) == ("none", None, False)
    carol.send_subscription(alice_jid, "subscribe")
    await _presence(alice, carol_jid, "subscribe")
    await quiet(alice, carol)
    assert "subscribed" not in subscription_presences(carol, alice_jid)
    assert (await carol.roster_get()).items[alice_jid].ask == "subscribe"


@scenario
async def request_while_offline(world: World) -> None:
    """Bob asks while Alice is offline; she gets the request, with its text, at login."""
    alice_jid, bob_jid = world.register("alice", "bob")
    bob = await world.login("bob")
    bob.send_subscription(alice_jid, "subscribe", status="remember me")
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)
                       and c.pushes_for(alice_jid)[-1].item.ask == "subscribe")
    await eventually(lambda: world.row(alice_jid, bob_jid), what="Alice's stored request")

    # Connected but not yet available: the request waits for her first available presence.
    alice = await world.login("alice", available=False)
    await asyncio.sleep(0.3)
    assert subscription_presences(alice, bob_jid) == []
    alice.xmpp.send_presence()
    request = (await _presence(alice, bob_jid, "subscribe"))[0]
    assert request.status == "remember me"
    assert bob_jid not in (await alice.roster_get()).items

    alice.send_subscription(bob_jid, "subscribed")
    assert wire((await _pushed(alice, bob_jid, 1))[-1].item) == ("from", None, False)
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "to")
    await _presence(bob, alice_jid, "available")
    # Answered: not re-sent at the next login.
    again = await world.login("alice", resource="second")
    await quiet(again)
    assert subscription_presences(again, bob_jid) == []


@scenario
async def remove_user(world: World) -> None:
    """Alice's account is deleted: the contacts she shared subscriptions with are told."""
    alice_jid, bob_jid, carol_jid = world.register("alice", "bob", "carol")
    alice = await world.login("alice")
    bob = await world.login("bob")
    carol = await world.login("carol")

    # Alice and Bob: both. Carol subscribed to Alice (Carol: to, Alice: from).
    alice.send_subscription(bob_jid, "subscribe")
    await _presence(bob, alice_jid, "subscribe")
    bob.send_subscription(alice_jid, "subscribed")
    bob.send_subscription(alice_jid, "subscribe")
    await _presence(alice, bob_jid, "subscribe")
    alice.send_subscription(bob_jid, "subscribed")
    carol.send_subscription(alice_jid, "subscribe")
    await _presence(alice, carol_jid, "subscribe")
    alice.send_subscription(carol_jid, "subscribed")
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)
                       and c.pushes_for(alice_jid)[-1].item.subscription == "both")
    await carol.wait_for(lambda c: c.pushes_for(alice_jid)
                         and c.pushes_for(alice_jid)[-1].item.subscription == "to")
    await world.logout(alice)
    bob_before, carol_before = len(bob.pushes), len(carol.pushes)

    world.server.rpc('rpc:call(Node, ejabberd_auth, remove_user, '
                     f'[<<"alice">>, <<"{world.server.host}">>])')

    # Bob loses both directions, Carol her "to"; their items stay, with subscription none.
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "none")
    await carol.wait_for(lambda c: c.pushes_for(alice_jid)[-1].item.subscription == "none")
    await _presence(bob, alice_jid, "unsubscribe")
    await _presence(bob, alice_jid, "unsubscribed")
    await _presence(carol, alice_jid, "unsubscribed")
    assert wire((await bob.roster_get()).items[alice_jid]) == ("none", None, False)
    assert wire((await carol.roster_get()).items[alice_jid]) == ("none", None, False)
    assert len(bob.pushes) > bob_before and len(carol.pushes) > carol_before
    assert world.rows(alice_jid) == {}, "the deleted account's roster is gone"
    await quiet(carol)
    assert "unsubscribe" not in subscription_presences(carol, alice_jid), \
        "Alice had no subscription to Carol to cancel"

    # A new account of the same name starts empty.
    world.register("alice")
    fresh = await world.login("alice", resource="new")
    assert (await fresh.roster_get()).items == {}


@scenario
async def two_resources(world: World) -> None:
    """Alice is logged in twice: each push and each delivered request reaches both sessions."""
    alice_jid, bob_jid = world.register("alice", "bob")
    phone = await world.login("alice", resource="phone")
    desk = await world.login("alice", resource="desk")
    bob = await world.login("bob")

    await phone.roster_set(bob_jid, name="Bob", groups=("Friends",))
    for session in (phone, desk):
        push = (await _pushed(session, bob_jid, 1))[-1]
        assert (push.item.name, push.item.groups) == ("Bob", ("Friends",))

    phone.send_subscription(bob_jid, "subscribe")
    for session in (phone, desk):
        assert wire((await _pushed(session, bob_jid, 2))[-1].item) == ("none", "subscribe", False)
    bob.send_subscription(alice_jid, "subscribed")
    for session in (phone, desk):
        assert wire((await _pushed(session, bob_jid, 3))[-1].item) == ("to", None, False)
        await _presence(session, bob_jid, "subscribed")
        await _presence(session, bob_jid, "available")

    bob.send_subscription(alice_jid, "subscribe", status="hi both")
    for session in (phone, desk):
        assert (await _presence(session, bob_jid, "subscribe"))[0].status == "hi both"
        await _pushed(session, bob_jid, 4)  # to -> to + pending in is a change of the item
    desk.send_subscription(bob_jid, "subscribed")
    for session in (phone, desk):
        assert wire((await _pushed(session, bob_jid, 5))[-1].item) == ("both", None, False)
    # Bob now sees both of Alice's sessions.
    await bob.wait_for(lambda c: len(c.presences_from(alice_jid, "available")) >= 2)

    await desk.roster_set(bob_jid, subscription="remove")
    for session in (phone, desk):
        assert (await _pushed(session, bob_jid, 6))[-1].item.subscription == "remove"
    # Both sessions' pushes agree, and with the server.
    assert [p.ver for p in phone.pushes_for(bob_jid)] == [p.ver for p in desk.pushes_for(bob_jid)]
    assert [wire(p.item) for p in phone.pushes] == [wire(p.item) for p in desk.pushes]
    final = await desk.roster_get()
    assert final.items == {} and final.ver == desk.pushes[-1].ver
    # Removing a "both" item cancels both ways, as seen from Bob.
    await bob.wait_for(lambda c: c.pushes_for(alice_jid)
                       and c.pushes_for(alice_jid)[-1].item.subscription == "none")
    await _presence(bob, alice_jid, "unsubscribe")
    await _presence(bob, alice_jid, "unsubscribed")
    await bob.wait_for(lambda c: len(c.presences_from(alice_jid, "unavailable")) >= 2)
