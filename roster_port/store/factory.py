"""Open the store the configuration names. Adapters are imported only when used, so a site on
SQLite does not need the PostgreSQL driver installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .base import RosterStore


def _sqlite(options: dict[str, Any], config: Config, wait_for_database: bool) -> RosterStore:
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


def _postgres_connection_options(options: dict[str, Any], config: Config, backend: str,
                                 extra_keys: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The options every PostgreSQL backend shares, checked: dsn, pool size, connect timeout.

    The pool is shared by the program's threads: by default it may open a connection for each
    ([serve] threads) and one for the main thread (notifications of outside changes), so that
    no request waits for a connection. A smaller pool_max makes requests queue for them.
    """
    from .postgres import dsn_without_password

    unknown = set(options) - {"backend", "dsn", "pool_min", "pool_max", "connect_timeout_s"} - extra_keys
    if unknown:
        raise ConfigError(f"[store] for {backend}: unknown keys {sorted(unknown)}")
    dsn = options.get("dsn")
    if not isinstance(dsn, str) or not dsn:
        raise ConfigError(
            "[store].dsn must be a PostgreSQL connection string or URI "
            "(e.g. \"host=db.example.com dbname=roster user=roster_port\")")
    try:
        dsn_without_password(dsn)
    except ValueError:
        # libpq's message may quote a piece of the string, which may be the password.
        raise ConfigError("[store].dsn is not a valid PostgreSQL connection string or URI "
                          "(libpq cannot parse it)") from None
    pool_min = options.get("pool_min", 1)
    pool_max = options.get("pool_max", max(pool_min if type(pool_min) is int else 1,
                                           config.serve.threads + 1))
    for key, value in (("pool_min", pool_min), ("pool_max", pool_max)):
        if type(value) is not int or value < 1:
            raise ConfigError(f"[store].{key} must be a positive integer")
    if pool_min > pool_max:
        raise ConfigError(f"[store].pool_min ({pool_min}) must not exceed pool_max ({pool_max})")
    connect_timeout_s = options.get("connect_timeout_s", 2.0)
    if type(connect_timeout_s) not in (int, float) or not connect_timeout_s > 0:
        raise ConfigError("[store].connect_timeout_s must be a positive number of seconds")
    return {"dsn": dsn, "pool_min": pool_min, "pool_max": pool_max,
            "connect_timeout_s": float(connect_timeout_s)}


def _lock_timeout_ms(options: dict[str, Any]) -> int:
    lock_timeout_ms = options.get("lock_timeout_ms", 2000)
    if type(lock_timeout_ms) is not int or lock_timeout_ms < 1:
        raise ConfigError("[store].lock_timeout_ms must be a positive integer")
    return lock_timeout_ms


def _postgres(options: dict[str, Any], config: Config, wait_for_database: bool) -> RosterStore:
    from .postgres import PostgresStore

    checked = _postgres_connection_options(options, config, "postgres",
                                           frozenset({"lock_timeout_ms"}))
    return PostgresStore(checked.pop("dsn"), lock_timeout_ms=_lock_timeout_ms(options),
                         wait_for_database=wait_for_database, **checked)


def _postgres_mapped(options: dict[str, Any], config: Config,
                     wait_for_database: bool) -> RosterStore:
    """The operator's own tables through a mapping (roster_port/store/mapped.py)."""
    from .mapped import MappedPostgresStore, MappingError, load_mapping

    checked = _postgres_connection_options(options, config, "postgres_mapped",
                                           frozenset({"mapping", "lock_timeout_ms"}))
    if "mapping" not in options:
        raise ConfigError("[store].mapping must name the mapping: a packaged one (\"ejabberd\"), "
                          "a file (relative to the configuration), or an inline [store.mapping]")
    lock_timeout_ms = _lock_timeout_ms(options)
    base_dir = Path(config.source).parent if Path(config.source).is_file() else None
    try:
        mapping = load_mapping(options["mapping"], base_dir)
        # [roster].read_only: the roster logic refuses changes with clear XMPP errors; a
        # mapping without write statements is accepted only then (and the store is read-only).
        return MappedPostgresStore(checked.pop("dsn"), mapping=mapping,
                                   read_only=config.roster.read_only and not mapping.writable,
                                   lock_timeout_ms=lock_timeout_ms,
                                   wait_for_database=wait_for_database, **checked)
    except MappingError as exc:
        raise ConfigError(f"[store].mapping: {exc}") from None


BACKENDS = {"sqlite": _sqlite, "postgres": _postgres, "postgres_mapped": _postgres_mapped}


def open_store(config: Config, *, wait_for_database: bool = False) -> RosterStore:
    """The store `config` names. `wait_for_database`: a PostgreSQL database that cannot be
    reached is waited for in the background (PostgresStore) rather than StoreUnavailable."""
    backend = config.store.get("backend", "sqlite")
    opener = BACKENDS.get(backend)
    if opener is None:
        raise ConfigError(f"[store].backend {backend!r} is not one of {sorted(BACKENDS)}")
    # [roster].read_only is enforced by the roster logic, which answers clear XMPP errors;
    # the store itself stays writable so that a refusal never turns into a storage error.
    return opener(config.store, config, wait_for_database)
