"""One slow user never delays another, end to end: real ejabberd 23.01, the shim's real pool
with ONE program process (so every user below is served by the same process), the real
program on PostgreSQL, real slixmpp clients.

The operator's application holds a row lock on alice's roster for longer than call_timeout.
Meanwhile twelve other users' roster sets and gets on the same program process are all answered
(before alice's), the program is not restarted, alice's client gets the safe answer once the
shim's deadline passes, and neither her request nor her next one, queued behind it, is carried
out after its caller was answered: each waits for the lock no longer than its own deadline.
(That second request comes from another resource of alice's: one c2s process runs its IQs one
at a time, so its second IQ would only be sent once the first had its answer.)
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import psycopg
import pytest
import slixmpp

from conftest import PASSWORD, _missing
from ejabberd_harness import EjabberdServer
from xmpp_client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

# Long enough for twelve users' sets and gets on a loaded machine (each must be answered in
# time, by a program that is also holding alice's stuck request); the lock is held until the
# test lets go, however long that is.
CALL_TIMEOUT_MS = 8000
OTHERS = [f"user{index:02d}" for index in range(12)]


@pytest.fixture
def server(tmp_path: Path, pg_server):
    if _missing():
        pytest.skip(_missing())
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    # A lock wait far longer than call_timeout: alice's request stays stuck until the test
    # lets the lock go.
    store = f'backend = "postgres"\ndsn = {json.dumps(dsn)}\nlock_timeout_ms = 600000\n'
    node = EjabberdServer(tmp_path / "ejabberd", store_section=store, pool_size=1,
                          call_timeout_ms=CALL_TIMEOUT_MS, cache=False)
    try:
        node.start()
        node.register("alice", "bob", *OTHERS, password=PASSWORD)
        node.dsn = dsn
        yield node
    finally:
        node.stop()
        pg_server.drop_schema(schema)


async def program_reports(server, predicate) -> bool:
    """Whether a ping of the pool's one program, now, satisfies `predicate`."""
    return predicate(await _ping_counts(server))


async def _ping_counts(server) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    out = await loop.run_in_executor(None, server.rpc, (
        'io:format("~p~n", [rpc:call(Node, roster_port_pool, call, '
        '[<<"localhost">>, <<"probe@localhost">>, <<"ping">>, #{}])])'))
    return {key: int(value) for key, value in re.findall(r'<<"(in_flight|running)">> => (\d+)', out)}


async def wait_for_program(server, predicate, timeout: float = 30) -> None:
    """Until a ping of the pool's one program satisfies `predicate` (its counts of requests
    in flight and running), asked through the shim as ejabberd's own calls are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        counts = await _ping_counts(server)
        if counts and predicate(counts):
            return
        # No pause between pings: each is a round trip through a hidden Erlang node.
        assert loop.time() < deadline, f"the program never reported it: {counts}"


def test_a_user_stuck_behind_a_lock_delays_no_other_user_on_the_same_program(server):
    [program_pid] = server.program_pids()
    host = server.host

    async def scenario():
        alice = Client(f"alice@{host}/t", PASSWORD, server.c2s_port, server.ip)
        alice_phone = Client(f"alice@{host}/phone", PASSWORD, server.c2s_port, server.ip)
        others = [Client(f"{name}@{host}/t", PASSWORD, server.c2s_port, server.ip) for name in OTHERS]
        clients = [alice, alice_phone, *others]
        for client in clients:
            await client.connect()
        try:
            await alice.roster_set(f"bob@{host}", name="Bob")  # alice's roster row exists now
            with psycopg.connect(server.dsn) as holder:  # the operator's application
                holder.execute("SELECT 1 FROM roster_versions WHERE username = %s FOR UPDATE",
                               (f"alice@{host}",))
                log_offset = server.log_size()
                stuck = asyncio.ensure_future(alice.roster_set(f"carol@{host}", name="Carol"))
                # Until the program holds it (alice's write is then waiting for the lock).
                await wait_for_program(server, lambda ping: ping["running"] == 1)
                queued = asyncio.ensure_future(alice_phone.roster_set(f"dave@{host}", name="Dave"))
                await wait_for_program(server, lambda ping: ping["in_flight"] == 2)
                # Every other user's write and read, on the same program process, while
                # alice's write waits for the lock.
                writes = await asyncio.gather(*(c.roster_set(f"bob@{host}", name=c.bare) for c in others))
                assert all(iq["type"] == "result" for iq in writes)
                gets = await asyncio.gather(*(c.roster_get() for c in others))
                for client, got in zip(others, gets):
                    assert got.items[f"bob@{host}"].name == client.bare
                # All of that while alice's request is held by the lock: the program has not
                # answered it (whether the shim has given alice its safe answer yet depends
                # only on how fast this machine ran the others).
                assert await program_reports(server, lambda ping: ping.get("running", 0) >= 1)
                # Alice's caller gets the safe answer once the shim's deadline passes.
                for pending in (stuck, queued):
                    with pytest.raises(slixmpp.exceptions.IqError) as refused:
                        await pending
                    assert (refused.value.etype, refused.value.condition) == ("wait", "internal-server-error")
                holder.rollback()  # the application lets go
            # Neither of alice's writes was carried out after its caller was answered: each
            # waited for the lock no longer than its own deadline.
            roster = await alice.roster_get()
            assert f"carol@{host}" not in roster.items and f"dave@{host}" not in roster.items
            assert alice.pushes_for(f"carol@{host}") == [] == alice.pushes_for(f"dave@{host}")
            return log_offset
        finally:
            for client in clients:
                client.xmpp.disconnect()

    log_offset = asyncio.run(scenario())
    assert server.program_pids() == [program_pid], "the program was restarted"
    log = server.log_path.read_text()[log_offset:]
    assert "killing" not in log and "restarting" not in log, log
    program_log = server.program_log_path.read_text()
    assert program_log.count("store unavailable") >= 2, program_log
