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

from roster_port.store.base import RosterStore
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


STORE_ADAPTERS: dict[str, Callable[[Path], contextlib.AbstractContextManager[StoreFactory]]] = {
    "sqlite": sqlite_factory,
}


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
