"""Shared fixtures.

`store_factory` runs the store contract suite (tests/store_contract.py) once per storage adapter
listed in `STORE_ADAPTERS`. Adding an adapter is one line there: a name and a function that, given
a fresh temporary directory, yields a `StoreFactory` for one fresh, empty database (and cleans it
up afterwards; it may call `pytest.skip` when its server is not available).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import pg_cluster
from roster_port.store.base import RosterStore
from roster_port.store.mapped import MappedPostgresStore
from roster_port.store.postgres import PostgresStore
from roster_port.store.sqlite import SQLiteStore


@dataclass
class StoreFactory:
    """Opens stores of one adapter on one fresh database, and closes them after the test.

    `opener(**options)` returns a new store instance on that database; it must be picklable, as
    the concurrency tests call it in other processes. `options` is only `read_only` today.
    `unreachable()` is a context manager inside which the database cannot be reached from
    already open stores, and after which it can be again.
    """

    adapter: str
    opener: Callable[..., RosterStore]
    unreachable: Callable[[], contextlib.AbstractContextManager[None]]
    _opened: list[RosterStore] = field(default_factory=list)

    def open(self, **options: Any) -> RosterStore:
        store = self.opener(**options)
        self._opened.append(store)
        return store

    def close_all(self) -> None:
        for store in reversed(self._opened):
            store.close()
        self._opened.clear()


@contextlib.contextmanager
def sqlite_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    directory = tmp_path / "sqlite"
    directory.mkdir()

    @contextlib.contextmanager
    def directory_moved_away() -> Iterator[None]:
        # Like an unmounted volume: the path no longer leads to the file.
        away = tmp_path / "sqlite-away"
        os.rename(directory, away)
        try:
            yield
        finally:
            os.rename(away, directory)

    yield StoreFactory(
        adapter="sqlite",
        opener=functools.partial(SQLiteStore, str(directory / "roster.db")),
        unreachable=directory_moved_away,
    )


# An unreachable database gives StoreUnavailable after this long (the default is 2 s).
PG_TEST_CONNECT_TIMEOUT_S = 1.0


@contextlib.contextmanager
def postgres_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    # A fresh schema of the session's database (tests/pg_cluster.py), dropped afterwards.
    server = pg_cluster.shared_server()
    schema = server.create_schema()
    try:
        yield StoreFactory(
            adapter="postgres",
            opener=functools.partial(PostgresStore, server.dsn(schema),
                                     connect_timeout_s=PG_TEST_CONNECT_TIMEOUT_S),
            # Sessions cut and new ones refused: what a store sees of a server gone away.
            unreachable=server.refusing_connections,
        )
    finally:
        server.drop_schema(schema)


# ejabberd 23.01's own SQL schema, as Debian's ejabberd package ships it.
@contextlib.contextmanager
def postgres_mapped_ejabberd_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    # ejabberd's own tables (rosterusers, rostergroups, roster_version) through the packaged
    # mapping roster_port/mappings/ejabberd.toml.
    server = pg_cluster.shared_server()
    schema = server.create_schema()
    try:
        pg_cluster.load_ejabberd_schema(server.dsn(schema))
        yield StoreFactory(
            adapter="postgres_mapped_ejabberd",
            opener=functools.partial(MappedPostgresStore, server.dsn(schema), mapping="ejabberd",
                                     connect_timeout_s=PG_TEST_CONNECT_TIMEOUT_S),
            unreachable=server.refusing_connections,
        )
    finally:
        server.drop_schema(schema)


# ejabberd's new schema (pg.new.sql, new_sql_schema: true), several virtual hosts in one
# database, through the packaged mapping roster_port/mappings/ejabberd-new.toml. The tables
# already hold rosters, groups and versions of the same localparts on another host
# (OTHER_EJABBERD_HOST, ALICE and BOB's localparts included): every contract test then also
# shows that a host's statements never see, count, version or delete another host's rows.
OTHER_EJABBERD_HOST = "other-host.example"


@contextlib.contextmanager
def postgres_mapped_ejabberd_new_factory(tmp_path: Path) -> Iterator[StoreFactory]:
    server = pg_cluster.shared_server()
    schema = server.create_schema()
    try:
        dsn = server.dsn(schema)
        pg_cluster.load_ejabberd_schema(dsn, new_schema=True)
        with pg_cluster.TestServer.connect(dsn) as connection:
            pg_cluster.fill_other_ejabberd_host(connection, OTHER_EJABBERD_HOST)
        yield StoreFactory(
            adapter="postgres_mapped_ejabberd_new",
            opener=functools.partial(MappedPostgresStore, dsn, mapping="ejabberd-new",
                                     connect_timeout_s=PG_TEST_CONNECT_TIMEOUT_S),
            unreachable=server.refusing_connections,
        )
    finally:
        server.drop_schema(schema)


STORE_ADAPTERS: dict[str, Callable[[Path], contextlib.AbstractContextManager[StoreFactory]]] = {
    "sqlite": sqlite_factory,
    "postgres": postgres_factory,
    "postgres_mapped_ejabberd": postgres_mapped_ejabberd_factory,
    "postgres_mapped_ejabberd_new": postgres_mapped_ejabberd_new_factory,
}


@pytest.fixture(scope="session")
def pg_server() -> pg_cluster.TestServer:
    """The session's PostgreSQL server: a throwaway cluster, or $ROSTER_PORT_TEST_PG_DSN's."""
    return pg_cluster.shared_server()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pg_cluster.stop_shared_server()  # started on first use, if at all


@pytest.fixture(params=sorted(STORE_ADAPTERS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    with STORE_ADAPTERS[request.param](tmp_path) as factory:
        try:
            yield factory
        finally:
            factory.close_all()


@pytest.fixture
def store(store_factory: StoreFactory) -> RosterStore:
    """A store on a fresh, empty database."""
    return store_factory.open()
