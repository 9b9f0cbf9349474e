"""Fixtures of the end-to-end tests: a real ejabberd 23.01 with mod_roster_port and the
real roster-port program on SQLite, in a temporary directory, and slixmpp clients.

Every test gets its own server (about 1.5 s to start), so no state leaks between tests.
When a test fails, the server's files stay in pytest's tmp_path for reading:
ejabberd.log, roster-port.log, erlang.out, transcript.msgpack.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ejabberd_harness import EJABBERD_LIBS, SHIM_EBIN, EjabberdServer  # noqa: E402
from xmpp_client import Client  # noqa: E402

PASSWORD = "secret"


def _missing() -> str | None:
    if shutil.which("erl") is None or not any(EJABBERD_LIBS.glob("ejabberd-*")):
        return "ejabberd 23.01 is not installed (scripts/bootstrap installs it)"
    if not (SHIM_EBIN / "mod_roster_port.beam").exists():
        return "the shim is not built (make -C erlang_shim)"
    return None


@pytest.fixture
def ejabberd(tmp_path: Path) -> Iterator[EjabberdServer]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    server = EjabberdServer(tmp_path / "ejabberd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def users(ejabberd: EjabberdServer):
    """users("alice", "bob") registers the accounts and returns their bare JIDs."""

    def make(*names: str) -> list[str]:
        ejabberd.register(*names, password=PASSWORD)
        return [f"{n}@{ejabberd.host}" for n in names]

    return make


@pytest.fixture
def connect(ejabberd: EjabberdServer):
    """`await connect(jid)` logs a client in (available) and disconnects it after the test.

    Tests are plain functions that call asyncio.run() on their own coroutine."""
    clients: list[Client] = []

    async def make(jid: str, available: bool = True, resource: str = "test") -> Client:
        client = Client(f"{jid}/{resource}", PASSWORD, ejabberd.c2s_port, ejabberd.ip)
        await client.connect(available=available)
        clients.append(client)
        return client

    yield make
    for client in clients:
        try:
            client.xmpp.disconnect()
        except Exception:  # noqa: BLE001 - the loop may be gone already
            pass


def run(coro):
    """Runs one test coroutine on a fresh event loop."""
    return asyncio.run(coro)


@pytest.fixture
def ejabberd_cluster(tmp_path: Path, pg_server):
    """Two ejabberd nodes in one ejabberd cluster (node B joined node A's Mnesia as
    `ejabberdctl join_cluster` does), both programs on one PostgreSQL schema; yields
    (node_a, node_b, dsn). Accounts are cluster-wide: `node_a.register(...)` serves both."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    import json

    schema = pg_server.create_schema()
    # json.dumps of an ASCII text is a TOML basic string.
    store = f'backend = "postgres"\ndsn = {json.dumps(pg_server.dsn(schema))}\n'
    node_a = EjabberdServer(tmp_path / "node-a", store_section=store)
    node_b = EjabberdServer(tmp_path / "node-b", store_section=store, cookie=node_a.cookie)
    try:
        node_a.start()
        node_b.start()
        node_b.join_cluster(node_a)
        yield node_a, node_b, pg_server.dsn(schema)
    finally:
        node_b.stop()
        node_a.stop()
        pg_server.drop_schema(schema)
