"""Subscription presences are applied on both sides or on neither, end to end: the shim's
journal (erlang_shim/src/roster_port_journal.erl) against a real ejabberd 23.01, the real
program on SQLite and real slixmpp clients.

Each test breaks one step of a presence's way (the program frozen, the store locked by another
application, ejabberd restarted) and checks what RFC 6121 asks: the contact never gets a
presence that the sender's own store does not hold, and once the fault is over each presence
is applied on both sides, in the order it was sent.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
from pathlib import Path

import pytest

from conftest import PASSWORD, _missing
from ejabberd_harness import EjabberdServer, roster_port_command
from test_concurrency import write_lock_held
from xmpp_client import Client

pytestmark = pytest.mark.e2e

CALL_TIMEOUT_MS = 1500


def journal(server: EjabberdServer) -> dict[str, int]:
    out = server.rpc('io:format("~p~n", [rpc:call(Node, roster_port_journal, status, '
                     f'[<<"{server.host}">>])])')
    return {key: int(value) for key, value in re.findall(r"(\w+) => (\d+)", out)}


async def until_journal(server: EjabberdServer, predicate, timeout: float = 30.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status = await asyncio.to_thread(journal, server)
        if status and predicate(status):
            return status
        if loop.time() > deadline:
            raise AssertionError(f"journal never satisfied the condition: {status}")


async def journalled(server: EjabberdServer, offset: int = 0) -> None:
    """Until the journal has logged a presence it could not carry out at once (its first
    failed run: the presence is held, and will be retried; logged at once, the first time)."""
    await asyncio.to_thread(server.wait_for_log, "not carried out at once", 1, offset, 30)


async def until(condition, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(condition):
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")


def sent_to_program(server: EjabberdServer, op: str) -> list[dict]:
    """The args of every `op` request the shim wrote to a program, from the transcript."""
    import msgpack

    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(server.transcript_path.read_bytes())
    return [message[3] for direction, _worker, _ts, message in unpacker
            if direction == "in" and message[0] == 0 and message[2] == op]


def rows(server: EjabberdServer) -> dict[tuple[str, str], tuple[str, int, int]]:
    return {(user, contact): (sub, out, inn) for user, contact, sub, out, inn in server.store_query(
        "SELECT user, contact, subscription, pending_out, pending_in FROM roster_items")}


@pytest.fixture
def server(tmp_path: Path):
    if _missing():
        pytest.skip(_missing())
    # One program serves both users; long waits for the lock, so that the store's busy
    # timeout is not what ends a request.
    node = EjabberdServer(tmp_path / "ejabberd", pool_size=1, call_timeout_ms=CALL_TIMEOUT_MS)
    try:
        node.start()
        node.register("alice", "bob", password=PASSWORD)
        yield node
    finally:
        node.stop()


def clients(server: EjabberdServer) -> tuple[Client, Client]:
    return (Client("alice@localhost/t", PASSWORD, server.c2s_port),
            Client("bob@localhost/t", PASSWORD, server.c2s_port))


def test_subscribe_to_a_frozen_program_reaches_the_contact_only_once_applied(server):
    """Before the journal, alice's subscribe was routed once its call timed out although
    alice's store never changed (the frozen program was then killed): bob held a request that
    alice's roster did not show."""

    async def scenario():
        alice, bob = clients(server)
        await alice.connect()
        await bob.connect()
        try:
            [pid] = server.program_pids()
            os.kill(pid, signal.SIGSTOP)
            alice.send_subscription("bob@localhost", "subscribe", status="hi")
            # alice's call has timed out: the presence is journalled, not routed.
            await journalled(server)
            assert bob.presences_from("alice@localhost", "subscribe") == []
            assert sent_to_program(server, "in_subscription") == []
            # Frozen until the shim kills it as hung and starts another.
            await until(lambda: server.program_pids() not in ([], [pid]))
            # The journal carries the presence out, on both sides.
            await until_journal(server, lambda s: s["pending"] == 0)
            request = (await bob.wait_for(
                lambda c: c.presences_from("alice@localhost", "subscribe"), 10))[0]
            assert request.status == "hi"
            await alice.wait_for(lambda c: any(p.item.ask == "subscribe"
                                               for p in c.pushes_for("bob@localhost")))
        finally:
            alice.xmpp.disconnect()
            bob.xmpp.disconnect()

    asyncio.run(scenario())
    assert rows(server) == {("alice@localhost", "bob@localhost"): ("none", 1, 0),
                            ("bob@localhost", "alice@localhost"): ("none", 0, 1)}


def test_a_pre_approval_is_never_routed_when_the_program_does_not_answer(server):
    """alice's `subscribed` with no request from bob is a pre-approval (RFC 6121 3.4): it must
    not reach bob. Before the journal, a call that timed out routed it all the same, and bob's
    client took it for an approval."""

    async def scenario():
        alice, bob = clients(server)
        await alice.connect()
        await bob.connect()
        try:
            with write_lock_held(server.store_path):
                alice.send_subscription("bob@localhost", "subscribed")
                await journalled(server)
            await until_journal(server, lambda s: s["pending"] == 0)
            # A presence after it, through the same way, arrives: so would the approval.
            alice.send_subscription("bob@localhost", "subscribe")
            await bob.wait_for(lambda c: c.presences_from("alice@localhost", "subscribe"))
            assert bob.presences_from("alice@localhost", "subscribed") == []
            # Nor did it reach bob's server (which ignores it as long as bob asked nothing,
            # but takes it for the answer to a request of bob's that crosses it).
            assert [(a["contact"], a["type"]) for a in sent_to_program(server, "in_subscription")
                    if a["user"] == "bob@localhost"] == [("alice@localhost", "subscribe")]
        finally:
            alice.xmpp.disconnect()
            bob.xmpp.disconnect()

    asyncio.run(scenario())
    assert rows(server)[("bob@localhost", "alice@localhost")] == ("none", 0, 1)


def test_presences_sent_while_no_program_runs_are_applied_in_order(tmp_path: Path):
    """alice and bob are `both`; while no program can start (a wrapper refuses to while a flag
    file exists), alice unsubscribes and subscribes again. Neither reaches bob before alice's
    own store has it; once a program runs, both are applied on both sides, in order. Before the
    journal, both were routed at once and kept on both sides in the worker's memory; replayed,
    bob's automatic `unsubscribed` (his server's answer to the old unsubscribe) was carried out
    after alice's newer subscribe and cancelled it."""
    if _missing():
        pytest.skip(_missing())
    workdir = tmp_path / "ejabberd"
    workdir.mkdir()
    flag = workdir / "program-down"
    wrapper = workdir / "roster-port-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"if [ -e '{flag}' ]; then echo 'roster-port wrapper: down on purpose' >&2; exit 75; fi\n"
        f"exec '{roster_port_command()}' serve --config '{workdir / 'roster-port.toml'}'\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    server = EjabberdServer(workdir, command=str(wrapper), pool_size=1,
                            call_timeout_ms=CALL_TIMEOUT_MS)
    server.start()
    try:
        server.wait_for_log("speaks protocol", 1)
        server.register("alice", "bob", password=PASSWORD)

        async def scenario():
            alice, bob = clients(server)
            await alice.connect()
            await bob.connect()
            try:
                await make_both(alice, bob)
                flag.touch()
                offset = server.log_size()
                [pid] = server.program_pids()
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(server.wait_for_log, f"program (os pid {pid}) ", 1, offset)
                alice.send_subscription("bob@localhost", "unsubscribe")
                alice.send_subscription("bob@localhost", "subscribe", status="again")
                await journalled(server, offset)
                await until_journal(server, lambda s: s["pending"] == 2)
                assert bob.presences_from("alice@localhost", "unsubscribe") == []
                flag.unlink()
                await until_journal(server, lambda s: s["pending"] == 0)
                await bob.wait_for(lambda c: c.presences_from("alice@localhost", "unsubscribe"))
                request = (await bob.wait_for(lambda c: [
                    p for p in c.presences_from("alice@localhost", "subscribe")
                    if p.status == "again"]))[0]
                assert request.status == "again"
            finally:
                alice.xmpp.disconnect()
                bob.xmpp.disconnect()

        asyncio.run(scenario())
        # alice lost `to` and asks again; bob lost `from` and holds her new request.
        assert rows(server) == {("alice@localhost", "bob@localhost"): ("from", 1, 0),
                                ("bob@localhost", "alice@localhost"): ("to", 0, 1)}
    finally:
        server.stop()


async def make_both(alice: Client, bob: Client) -> None:
    """alice and bob subscribe to each other, through the ordinary path."""
    alice.send_subscription(bob.bare, "subscribe")
    await bob.wait_for(lambda c: c.presences_from(alice.bare, "subscribe"))
    bob.send_subscription(alice.bare, "subscribed")
    bob.send_subscription(alice.bare, "subscribe")
    await alice.wait_for(lambda c: c.presences_from(bob.bare, "subscribe"))
    alice.send_subscription(bob.bare, "subscribed")
    await bob.wait_for(lambda c: any(p.item.subscription == "both"
                                     for p in c.pushes_for(alice.bare)))
    await alice.wait_for(lambda c: any(p.item.subscription == "both"
                                       for p in c.pushes_for(bob.bare)))


def test_journalled_presences_survive_an_ejabberd_restart(server):
    """With the store locked, alice subscribes to bob and ejabberd is restarted: the presence
    was kept in the worker's memory and lost (the RAM queue), now it is applied once ejabberd
    is back, and bob gets the request at his next login."""

    async def before_restart():
        alice, _ = clients(server)
        await alice.connect()
        try:
            alice.send_subscription("bob@localhost", "subscribe", status="after the restart")
            await journalled(server)
        finally:
            alice.xmpp.disconnect()

    with write_lock_held(server.store_path):
        asyncio.run(before_restart())
        server.stop()
    server.start()

    async def after_restart():
        await until_journal(server, lambda s: s["pending"] == 0)
        _, bob = clients(server)
        await bob.connect()
        try:
            request = (await bob.wait_for(
                lambda c: c.presences_from("alice@localhost", "subscribe"), 10))[0]
            assert request.status == "after the restart"
        finally:
            bob.xmpp.disconnect()

    asyncio.run(after_restart())
    assert rows(server) == {("alice@localhost", "bob@localhost"): ("none", 1, 0),
                            ("bob@localhost", "alice@localhost"): ("none", 0, 1)}


def test_removing_a_contact_costs_the_hook_one_call_timeout_at_most(tmp_path: Path):
    """alice removes bob, with whom she is `both`, while the program serving bob is frozen.
    alice's own program applies it at once; its effects route `unsubscribe` and
    `unsubscribed` to bob, whose roster_in_subscription runs in alice's c2s process. Each of
    those calls waited a whole call_timeout, so alice's IQ was answered after 3 of them; now
    the calls nested in one hook share its deadline, alice is answered within one, and bob's
    side is journalled and applied once his program is back."""
    if _missing():
        pytest.skip(_missing())
    call_timeout = 3.0
    server = EjabberdServer(tmp_path / "ejabberd", pool_size=2,
                            call_timeout_ms=int(call_timeout * 1000))
    server.start()
    try:
        # bob: a user served by the other worker than alice's.
        names = [f"bob{index}" for index in range(8)]
        workers = worker_of(server, ["alice", *names])
        bob = next(name for name in names if workers[name] != workers["alice"])
        server.register("alice", bob, password=PASSWORD)
        bob_jid = f"{bob}@localhost"

        async def scenario():
            alice = Client("alice@localhost/t", PASSWORD, server.c2s_port)
            bob_client = Client(f"{bob_jid}/t", PASSWORD, server.c2s_port)
            await alice.connect()
            await bob_client.connect()
            try:
                await make_both(alice, bob_client)
                bob_client.xmpp.disconnect()
                pid = program_pid(server, workers[bob])
                os.kill(pid, signal.SIGSTOP)
                loop = asyncio.get_running_loop()
                started = loop.time()
                await alice.roster_set(bob_jid, subscription="remove")
                took = loop.time() - started
                # One call timeout and the worker's sweep (at most 0.2 s); 2 or 3 before.
                assert took < 1.5 * call_timeout, took
                await until(lambda: program_pid(server, workers[bob]) not in (None, pid))
                await until_journal(server, lambda s: s["pending"] == 0)
            finally:
                alice.xmpp.disconnect()

        asyncio.run(scenario())
        assert rows(server) == {(bob_jid, "alice@localhost"): ("none", 0, 0)}
    finally:
        server.stop()


def worker_of(server: EjabberdServer, users: list[str]) -> dict[str, str]:
    """{user: name of the pool worker that serves user@host}."""
    listed = ", ".join(f'<<"{user}@{server.host}">>' for user in users)
    out = server.rpc(
        f'Names = rpc:call(Node, roster_port_pool, worker_names, [<<"{server.host}">>]), '
        f'[io:format("~s ~s~n", [U, lists:nth(erlang:phash2(U, length(Names)) + 1, Names)]) '
        f'|| U <- [{listed}]]')
    return {line.split()[0].split("@")[0]: line.split()[1] for line in out.splitlines()}


def program_pid(server: EjabberdServer, worker: str) -> int | None:
    out = server.rpc(f'io:format("~p~n", [rpc:call(Node, gen_server, call, [{worker}, status])])')
    found = re.search(r"os_pid => (\d+)", out)
    return int(found[1]) if found else None


class _RosterAccessDenied(EjabberdServer):
    """mod_roster's `access` denies alice subscription presences."""

    def ejabberd_yml(self) -> str:
        text = super().ejabberd_yml()
        text = text.replace("acl:\n", "acl:\n  denied:\n    user: alice@localhost\n", 1)
        text = text.replace("access_rules:\n",
                            "access_rules:\n  roster_access:\n    deny: denied\n    allow: all\n", 1)
        return text.replace("  mod_roster:\n", "  mod_roster:\n    access: roster_access\n", 1)


def test_a_subscription_presence_the_access_rule_denies_reaches_no_one(tmp_path: Path):
    """ejabberd_c2s answers `forbidden` and then routes the presence all the same: bob held
    alice's request while alice's roster had nothing."""
    if _missing():
        pytest.skip(_missing())
    server = _RosterAccessDenied(tmp_path / "ejabberd", pool_size=1)
    server.start()
    try:
        server.register("alice", "bob", password=PASSWORD)

        async def scenario():
            alice, bob = clients(server)
            await alice.connect()
            await bob.connect()
            try:
                alice.send_subscription("bob@localhost", "subscribe")
                await alice.wait_for(lambda c: c.presences_from("bob@localhost", "error"))
                # A presence alice sends after it, on the same stream, reaches bob: the
                # subscribe would have reached him before.
                alice.xmpp.send_presence(pto="bob@localhost")
                await bob.wait_for(lambda c: c.presences_from("alice@localhost", "available"))
                assert bob.presences_from("alice@localhost", "subscribe") == []
            finally:
                alice.xmpp.disconnect()
                bob.xmpp.disconnect()

        asyncio.run(scenario())
        assert rows(server) == {}
    finally:
        server.stop()
