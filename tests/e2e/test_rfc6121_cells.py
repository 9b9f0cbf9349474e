"""Every cell of the RFC 6121 subscription table, driven by real presences through a real
ejabberd 23.01 with mod_roster_port and the real program on SQLite.

How each cell runs
------------------
User U and contact C are two fresh accounts on the same server (a new pair per cell), both
logged in and available with real slixmpp clients.

1. *Bringing U's item into the state*, by real stanzas only, no seeding: U adds C with a
   roster set (so C is an item of U's roster in every state, N+PI included), then U and C
   exchange the subscription presences that lead to the state (`PATHS`), e.g. B is
   U subscribe, C subscribed, C subscribe, U subscribed. After each step the test waits until
   the stored rows of both users are what the expected table says, and before the event it
   checks both rows (U's state, and C's mirror of it: U's T is C's F, and so on), so a cell
   never runs from a state it did not verify.
2. *The event*: "out X" is U's client sending presence X to C; "in X" is C's client sending
   X to U. Three "in subscribed" cells (U in N, N+PI, F) cannot be reached that way with a
   correct server: there C's own state (N, N+PO, T) makes C's `subscribed` a pre-approval, which
   C's server keeps (route=false). For those the presence is routed by ejabberd itself from
   C's JID to U (`ejabberd_router:route` over rpc), as a server without pre-approval would
   send it; C's roster is not involved.
3. *The server's view, compared with the expected table*: U's raw roster (an IQ get, not
   slixmpp's cache: subscription, ask, approved, name and groups kept), U's stored row
   (subscription, pending flags, approved, request text), whether the inbound presence was
   delivered to U's client, the pushes U's client received (exactly, and none for a cell that
   keeps the state), the auto-replies U's server sent C (the shim's `in_subscription` requests
   for C in the transcript: C's client may rightly not be shown them), the available /
   unavailable presence C gets when U gains / loses "from", and C's stored state afterwards.

The expected values come from `EXPECTED`, the table of shared/reference/rfc6121-subscriptions.md
copied here by hand (not imported from roster_port.subscription, which is what is under
test), and from `Pair`, a small model of what two servers following that table do: U's event,
the presence routed to C, C's auto-reply routed back.

Pre-approval (RFC 6121 3.4) adds `PRE_APPROVAL_CELLS`: from N, N+PO and T pre-approved
(U sent `subscribed` first: stored approved, pushed approved='true', not routed), C's
`subscribe` is answered `subscribed` for U and moves U to F, F+PO, B without being shown;
and `unsubscribed` withdraws a pre-approval.

All cells share one ejabberd and run concurrently (`CONCURRENCY` at a time); the module
fixture runs them all once and each test reports its own cell.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from ejabberd_harness import EjabberdServer
from scenarios import SUBSCRIPTION_TYPES, World, eventually, missing, quiet, wire

pytestmark = pytest.mark.e2e

# --- The expected table (shared/reference/rfc6121-subscriptions.md) ------------------------

_TABLE = """
N       | N+PO    | N    | N, pre-approve    | N    | N+PI (deliver)         | N                                 | N              | N
N+PO    | N+PO    | N    | N+PO, pre-approve | N+PO | N+PO+PI (deliver)      | N+PO                              | T (deliver)    | N (deliver)
N+PI    | N+PO+PI | N+PI | F                 | N    | N+PI                   | N (deliver, auto unsubscribed)    | N+PI           | N+PI
N+PO+PI | N+PO+PI | N+PI | F+PO              | N+PO | N+PO+PI                | N+PO (deliver, auto unsubscribed) | T+PI (deliver) | N+PI (deliver)
T       | T       | N    | T, pre-approve    | T    | T+PI (deliver)         | T                                 | T              | N (deliver)
T+PI    | T+PI    | N+PI | B                 | T    | T+PI                   | T (deliver, auto unsubscribed)    | T+PI           | N+PI (deliver)
F       | F+PO    | F    | F                 | N    | F (auto subscribed)    | N (deliver, auto unsubscribed)    | F              | F
F+PO    | F+PO    | F    | F+PO              | N+PO | F+PO (auto subscribed) | N+PO (deliver, auto unsubscribed) | B (deliver)    | F (deliver)
B       | B       | F    | B                 | T    | B (auto subscribed)    | T (deliver, auto unsubscribed)    | B              | F (deliver)
"""
EVENTS = [(d, t) for d in ("out", "in")
          for t in ("subscribe", "unsubscribe", "subscribed", "unsubscribed")]


@dataclass(frozen=True)
class Cell:
    new: str
    deliver: bool = False
    auto_reply: str | None = None
    pre_approve: bool = False


def _parse(text: str) -> dict[tuple[str, str, str], Cell]:
    table = {}
    for line in text.strip().splitlines():
        state, *cells = [c.strip() for c in line.split("|")]
        for (direction, ptype), cell in zip(EVENTS, cells, strict=True):
            new, _, flags = cell.replace(", pre-approve", " (pre-approve)").partition("(")
            flags = {f.strip() for f in flags.rstrip(")").split(",") if f.strip()}
            auto = [f.removeprefix("auto ") for f in flags if f.startswith("auto ")]
            table[(state, direction, ptype)] = Cell(new.strip(), "deliver" in flags,
                                                    auto[0] if auto else None,
                                                    "pre-approve" in flags)
    return table


EXPECTED = _parse(_TABLE)
STATES = tuple(dict.fromkeys(state for state, _, _ in EXPECTED))
assert len(EXPECTED) == 72 and len(STATES) == 9


# --- A model of two servers that follow the table -----------------------------------------


@dataclass(frozen=True)
class Side:
    """One user's stored state for the other: an RFC state name, approved, the request text."""

    state: str = "N"
    approved: bool = False
    text: str = ""

    @property
    def subscription(self) -> str:
        return {"N": "none", "T": "to", "F": "from", "B": "both"}[self.state[0]]

    @property
    def pending_out(self) -> bool:
        return "PO" in self.state

    @property
    def pending_in(self) -> bool:
        return "PI" in self.state

    @property
    def has_from(self) -> bool:
        return self.subscription in ("from", "both")

    def wire(self) -> tuple[str, str | None, bool]:
        """What a client sees: subscription, ask, approved."""
        return (self.subscription, "subscribe" if self.pending_out else None, self.approved)


@dataclass
class Pair:
    """U and C's states and what the servers did: pushes, deliveries, routed presences."""

    u: Side = field(default_factory=Side)
    c: Side = field(default_factory=Side)
    pushes: dict[str, list] = field(default_factory=lambda: {"u": [], "c": []})
    delivered: dict[str, list] = field(default_factory=lambda: {"u": [], "c": []})
    arrived: Counter = field(default_factory=Counter)  # (receiver, type): in_subscription asks
    available: Counter = field(default_factory=Counter)  # receiver of a gained "from"
    unavailable: Counter = field(default_factory=Counter)  # receiver of a lost "from"

    def _set(self, who: str, new: Side) -> None:
        old = getattr(self, who)
        if new.has_from or new.pending_in:
            new = replace(new, approved=False)  # a pre-approval only lives before a request
        if not new.pending_in:
            new = replace(new, text="")
        if new != old:
            if (new.state, new.approved) != (old.state, old.approved):
                self.pushes[who].append(new.wire())
            setattr(self, who, new)
        other = "c" if who == "u" else "u"
        if new.has_from and not old.has_from:
            self.available[other] += 1
        elif old.has_from and not new.has_from:
            self.unavailable[other] += 1

    def send(self, sender: str, ptype: str, status: str = "", via_roster: bool = True) -> None:
        """`sender` ("u" or "c") sends presence `ptype` to the other one."""
        receiver = "c" if sender == "u" else "u"
        if via_roster:  # a client's presence: the sender's own server applies "out" first
            me: Side = getattr(self, sender)
            cell = EXPECTED[(me.state, "out", ptype)]
            if cell.pre_approve:
                self._set(sender, replace(me, approved=True))
                return  # a pre-approval is not routed
            self._set(sender, replace(me, state=cell.new,
                                      approved=me.approved and ptype != "unsubscribed"))
        self.arrived[(receiver, ptype)] += 1
        them: Side = getattr(self, receiver)
        if ptype == "subscribe" and them.approved and not them.pending_in:
            # Pre-approved: answered for the receiver as if the request had arrived and been
            # approved at once (N -> F, N+PO -> F+PO, T -> B), and not shown.
            asked = EXPECTED[(them.state, "in", "subscribe")].new
            self._set(receiver, replace(them, state=EXPECTED[(asked, "out", "subscribed")].new))
            self.send(receiver, "subscribed", via_roster=False)
            return
        cell = EXPECTED[(them.state, "in", ptype)]
        text = them.text if them.pending_in else status
        self._set(receiver, replace(them, state=cell.new, text=text))
        if cell.deliver:
            self.delivered[receiver].append(ptype)
        if cell.auto_reply:
            self.send(receiver, cell.auto_reply, via_roster=False)

    def c_would_keep(self, ptype: str) -> bool:
        """C's server would not route C's `ptype`: it is a pre-approval for C."""
        return EXPECTED[(self.c.state, "out", ptype)].pre_approve


# How U and C reach each state, from U having C as a plain item: (sender, presence type).
PATHS: dict[str, list[tuple[str, str]]] = {
    "N": [],
    "N+PO": [("u", "subscribe")],
    "N+PI": [("c", "subscribe")],
    "N+PO+PI": [("u", "subscribe"), ("c", "subscribe")],
    "T": [("u", "subscribe"), ("c", "subscribed")],
    "T+PI": [("u", "subscribe"), ("c", "subscribed"), ("c", "subscribe")],
    "F": [("c", "subscribe"), ("u", "subscribed")],
    "F+PO": [("c", "subscribe"), ("u", "subscribed"), ("u", "subscribe")],
    "B": [("u", "subscribe"), ("c", "subscribed"), ("c", "subscribe"), ("u", "subscribed")],
}


@dataclass(frozen=True)
class Case:
    state: str
    direction: str  # "out": U sends; "in": C sends (or the server routes, see the docstring)
    ptype: str
    pre_approved: bool = False  # U sent `subscribed` (a pre-approval) before the event

    @property
    def id(self) -> str:
        prefix = f"{self.state}+approved" if self.pre_approved else self.state
        return f"{prefix} {self.direction} {self.ptype}"

    def path(self) -> list[tuple[str, str]]:
        return PATHS[self.state] + ([("u", "subscribed")] if self.pre_approved else [])


TABLE_CELLS = [Case(state, d, t) for state in STATES for d, t in EVENTS]
PRE_APPROVAL_CELLS = [
    # The request a pre-approval answers, from each state it can be given in.
    Case("N", "in", "subscribe", pre_approved=True),
    Case("N+PO", "in", "subscribe", pre_approved=True),
    Case("T", "in", "subscribe", pre_approved=True),
    # Withdrawn, kept, repeated, and no effect on the other direction's answer.
    Case("N", "out", "unsubscribed", pre_approved=True),
    Case("N", "out", "subscribe", pre_approved=True),
    Case("N", "out", "subscribed", pre_approved=True),
    Case("T", "in", "unsubscribed", pre_approved=True),
]
CASES = TABLE_CELLS + PRE_APPROVAL_CELLS
CONCURRENCY = 20
REQUEST_TEXT = "let me see you"


# --- Running one cell ------------------------------------------------------------------------


def _stored(world: World, user: str, contact: str) -> tuple:
    """(state name, approved, request text) of the stored row; no row is plain N."""
    row = world.row(user, contact)
    if row is None:
        return ("N", False, "")
    name = {"none": "N", "to": "T", "from": "F", "both": "B"}[row.subscription]
    name += ("+PO" if row.pending_out else "") + ("+PI" if row.pending_in else "")
    return (name, row.approved, row.request_text)


def _side(side: Side) -> tuple:
    return (side.state, side.approved, side.text)


async def _wait_rows(world: World, u_jid: str, c_jid: str, model: Pair, what: str) -> None:
    expected = (_side(model.u), _side(model.c))
    try:
        await eventually(lambda: (_stored(world, u_jid, c_jid), _stored(world, c_jid, u_jid))
                         == expected, timeout=15, what=what)
    except AssertionError:
        raise AssertionError(
            f"{what}: stored rows (U, C) are "
            f"{(_stored(world, u_jid, c_jid), _stored(world, c_jid, u_jid))}, "
            f"expected {expected}") from None


async def run_cell(world: World, case: Case, index: int) -> list[str]:
    """Runs one cell; returns what differs from the expected table (empty: the cell holds)."""
    u_name, c_name = f"u{index}", f"c{index}"
    u_jid, c_jid = world.jid(u_name), world.jid(c_name)
    u = await world.login(u_name)
    c = await world.login(c_name)
    clients = {"u": u, "c": c}
    targets = {"u": c_jid, "c": u_jid}

    # 1. Into the state, by real stanzas; every step is checked in the store.
    await u.roster_set(c_jid, name="C", groups=("cells",))
    await u.wait_for(lambda cl: cl.pushes_for(c_jid), timeout=10)
    setup_pushes = len(u.pushes)
    model = Pair()
    for sender, ptype in case.path():
        status = REQUEST_TEXT if ptype == "subscribe" else ""
        model.send(sender, ptype, status)
        clients[sender].send_subscription(targets[sender], ptype, status=status or None)
        await _wait_rows(world, u_jid, c_jid, model, f"setup step {sender} {ptype}")
    # The stored rows are visible as soon as the program commits, before the shim carries out
    # the answer's effects (pushes, the presence delivered, U's presence resent to C), often in
    # another process than the one quiet() syncs with (C's c2s routing to U). Wait for all of
    # the setup's effects the cell checks, so that none lands after the snapshot below and is
    # counted as the event's (seen under load: a setup push or delivery past quiet()'s 0.3 s).
    await _setup_settled(world, u, c, u_jid, c_jid, model, setup_pushes)
    await quiet(u, c)

    # 2. The event. Snapshot what the clients and the shim saw so far.
    u_pushes, u_presences = len(u.pushes), len(u.presences)
    c_presences = len(c.presences)
    arrived_before = {(who, t): world.transcript.count(
        "in_subscription", user=jid, contact=other, type=t)
        for who, jid, other in (("u", u_jid, c_jid), ("c", c_jid, u_jid))
        for t in SUBSCRIPTION_TYPES}
    # From here on the model records only what the event does.
    model = Pair(u=model.u, c=model.c)
    event_status = "event text" if case.ptype == "subscribe" else ""
    if case.direction == "out":
        model.send("u", case.ptype, event_status)
        u.send_subscription(c_jid, case.ptype, status=event_status or None)
    elif model.c_would_keep(case.ptype):
        model.send("c", case.ptype, event_status, via_roster=False)
        await asyncio.to_thread(world.inject_presence, c_jid, u_jid, case.ptype)
    else:
        model.send("c", case.ptype, event_status)
        c.send_subscription(u_jid, case.ptype, status=event_status or None)

    # 3. Wait for everything expected to have happened, then let stragglers arrive.
    problems: list[str] = []
    try:
        await _wait_rows(world, u_jid, c_jid, model, "after the event")
        await u.wait_for(lambda cl: len(cl.pushes) - u_pushes >= len(model.pushes["u"]),
                         timeout=10)
        await u.wait_for(lambda cl: len(subscription_presences_since(cl, c_jid, u_presences))
                         >= len(model.delivered["u"]), timeout=10)
        for (who, t), n in model.arrived.items():
            jid, other = (u_jid, c_jid) if who == "u" else (c_jid, u_jid)
            await eventually(lambda: world.transcript.count(
                "in_subscription", user=jid, contact=other, type=t)
                - arrived_before[(who, t)] >= n, what=f"{t} routed to {who}")
        if model.available["c"]:
            await c.wait_for(lambda cl: _since(cl, u_jid, "available", c_presences))
        if model.unavailable["c"]:
            await c.wait_for(lambda cl: _since(cl, u_jid, "unavailable", c_presences))
    except AssertionError as exc:
        problems.append(f"waiting: {exc}")
    await quiet(u, c)

    # U's raw roster: the item is kept in every state, with the table's wire form.
    roster = await u.roster_get()
    item = (roster.items or {}).get(c_jid)
    if item is None:
        problems.append(f"U's roster get has no item for C: {roster.items}")
    else:
        if wire(item) != model.u.wire():
            problems.append(f"U's roster get: {wire(item)}, expected {model.u.wire()}")
        if (item.name, item.groups) != ("C", ("cells",)):
            problems.append(f"name/groups changed: {(item.name, item.groups)}")

    # Stored rows, both sides.
    row = world.row(u_jid, c_jid)
    if _stored(world, u_jid, c_jid) != _side(model.u):
        problems.append(f"U's stored row {_stored(world, u_jid, c_jid)}, "
                        f"expected {_side(model.u)}")
    if row is not None and not row.in_roster:
        problems.append("U's item for C is no longer a roster item")
    if _stored(world, c_jid, u_jid) != _side(model.c):
        problems.append(f"C's stored row {_stored(world, c_jid, u_jid)}, "
                        f"expected {_side(model.c)}")

    # Pushes to U: exactly the changes, in the wire form, each with a version.
    got_pushes = [wire(p.item) for p in u.pushes[u_pushes:]]
    if got_pushes != model.pushes["u"]:
        problems.append(f"pushes to U {got_pushes}, expected {model.pushes['u']}")
    if any(p.ver is None for p in u.pushes[u_pushes:]):
        problems.append("a push without ver")
    if u.pushes[u_pushes:] and u.pushes[-1].ver != roster.ver:
        problems.append(f"last push ver {u.pushes[-1].ver} != roster ver {roster.ver}")

    # Delivered to U's client: the subscription presences from C, in order.
    got_delivered = subscription_presences_since(u, c_jid, u_presences)
    if got_delivered != model.delivered["u"]:
        problems.append(f"delivered to U {got_delivered}, expected {model.delivered['u']}")

    # What reached each server as an inbound subscription presence (routed, auto-replies).
    for who, jid, other in (("u", u_jid, c_jid), ("c", c_jid, u_jid)):
        for t in SUBSCRIPTION_TYPES:
            got = world.transcript.count("in_subscription", user=jid, contact=other,
                                         type=t) - arrived_before[(who, t)]
            if got != model.arrived[(who, t)]:
                problems.append(f"{t} reaching {who.upper()}'s server: {got}, "
                                f"expected {model.arrived[(who, t)]}")

    # U's presence to C follows "from": resent when gained, unavailable when lost.
    for ptype, expected in (("available", model.available["c"]),
                            ("unavailable", model.unavailable["c"])):
        got = len(_since(c, u_jid, ptype, c_presences))
        if bool(got) != bool(expected):
            problems.append(f"C got {got} {ptype} from U, expected {expected}")
    await world.drop(u, c)  # frees two sessions for the cells still waiting
    return problems


async def _setup_settled(world: World, u, c, u_jid: str, c_jid: str, model: Pair,
                         setup_pushes: int) -> None:
    await u.wait_for(lambda cl: len(cl.pushes) - setup_pushes >= len(model.pushes["u"]),
                     timeout=10)
    await u.wait_for(lambda cl: len(subscription_presences_since(cl, c_jid, 0))
                     >= len(model.delivered["u"]), timeout=10)
    for (who, t), n in model.arrived.items():
        jid, other = (u_jid, c_jid) if who == "u" else (c_jid, u_jid)
        await eventually(lambda: world.transcript.count(
            "in_subscription", user=jid, contact=other, type=t) >= n,
            what=f"setup: {t} routed to {who}")
    if model.available["c"]:
        await c.wait_for(lambda cl: _since(cl, u_jid, "available", 0))


def subscription_presences_since(client, from_jid: str, start: int) -> list[str]:
    return [p.type for p in client.presences[start:]
            if p.from_jid == from_jid and p.type in SUBSCRIPTION_TYPES]


def _since(client, from_jid: str, ptype: str, start: int) -> list:
    return [p for p in client.presences[start:] if p.from_jid == from_jid and p.type == ptype]


# --- The fixture and the tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cell_results(tmp_path_factory) -> dict[str, list[str]]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    server = EjabberdServer(tmp_path_factory.mktemp("rfc6121") / "ejabberd")
    server.start()
    try:
        names = [f"{p}{i}" for i in range(len(CASES)) for p in ("u", "c")]
        server.register(*names)
        started = time.monotonic()
        results = asyncio.run(_run_all(server))
        print(f"{len(CASES)} cells in {time.monotonic() - started:.1f} s")
        return results
    finally:
        server.stop()


async def _run_all(server: EjabberdServer) -> dict[str, list[str]]:
    world = World(server)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int, case: Case) -> tuple[str, list[str]]:
        async with gate:
            try:
                return case.id, await run_cell(world, case, index)
            except Exception as exc:  # noqa: BLE001 - reported as the cell's failure
                return case.id, [f"{type(exc).__name__}: {exc}"]

    try:
        return dict(await asyncio.gather(*(one(i, c) for i, c in enumerate(CASES))))
    finally:
        await world.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cell(cell_results, case):
    problems = cell_results[case.id]
    assert not problems, f"cell {case.id}:\n  " + "\n  ".join(problems)
