"""Open the store the configuration names. Adapters are imported only when used, so a site on
SQLite does not need the PostgreSQL driver installed."""

from __future__ import annotations

from typing import Any

from ..config import Config, ConfigError
from .base import RosterStore


def _sqlite(options: dict[str, Any]) -> RosterStore:
    from .sqlite import SQLiteStore

    unknown = set(options) - {"backend", "path", "busy_timeout_ms"}
    if unknown:
        raise ConfigError(f"[store] for sqlite: unknown keys {sorted(unknown)}")
    path = options.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError("[store].path must name the SQLite database file")
    busy_timeout_ms = options.get("busy_timeout_ms", 5000)
    if type(busy_timeout_ms) is not int or busy_timeout_ms < 0:
        raise ConfigError("[store].busy_timeout_ms must be a non-negative integer")
    return SQLiteStore(path, busy_timeout_ms=busy_timeout_ms)


BACKENDS = {"sqlite": _sqlite}


def open_store(config: Config) -> RosterStore:
    backend = config.store.get("backend", "sqlite")
    opener = BACKENDS.get(backend)
    if opener is None:
        raise ConfigError(f"[store].backend {backend!r} is not one of {sorted(BACKENDS)}")
    # [roster].read_only is enforced by the roster logic, which answers clear XMPP errors;
    # the store itself stays writable so that a refusal never turns into a storage error.
    return opener(config.store)
