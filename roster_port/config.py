"""The program's configuration: a TOML file, every key optional, unknown keys refused.

    [store]                      # passed to the storage adapter named by `backend`
    backend = "sqlite"           # "sqlite" or "postgres"
    path = "roster-port.sqlite"  # sqlite: the database file (relative to the config file)
    busy_timeout_ms = 5000       # sqlite: how long to wait for another process's write lock
    # dsn = "host=db dbname=app user=roster_port"   # postgres: libpq connection string or URI
    # pool_min = 1                 # postgres: connections kept open per program process
    # pool_max = 5                 # default: [serve] threads + 1, so no request waits for one
    # connect_timeout_s = 2.0      # postgres: how long a request waits for a connection at
    #                              # most (a server that is down is found out at once; keep
    #                              # it, plus the lock timeout, under the shim's call_timeout)
    # lock_timeout_ms = 2000       # postgres: how long a write waits for another transaction
    #                              # holding the same user's roster (an application's row lock)

    [roster]
    versioning = true            # roster versioning (XEP-0237 / RFC 6121 2.6)
    pre_approval = true          # subscription pre-approval (RFC 6121 3.4)
    auto_unsubscribed = true     # answer an inbound unsubscribe with unsubscribed, as ejabberd does
    read_only = false            # refuse roster sets and subscription changes (the database is
                                 # written by another application only)
    mutual_rows = false          # one row is read into two rosters (a friendship, a follows
                                 # row): deliver the contact's subscription presences that the
                                 # contact's own write already applied (docs/mappings.md)

    [limits]
    max_items = 10000            # items in one roster
    max_pending_requests = 1000  # strangers' subscription requests kept for one user (they are
                                 # not roster items; further ones are dropped, logged)
    max_name_length = 1024       # characters in an item's name
    max_groups = 64              # groups of one item
    max_group_length = 1024      # characters in a group name
    max_status_length = 1024     # characters of a subscription request's text kept (longer
                                 # texts are cut)
    max_request_bytes = 16384    # bytes of a subscription request kept whole besides its text
                                 # (its statuses with their languages, its extended content:
                                 # RFC 6121 3.1.3); elements over it are dropped whole, logged
    max_request_elements = 32    # elements of one such request kept (the shim's bounds are
                                 # the same defaults: a larger value changes nothing)
    max_frame_bytes = 8388608    # largest request frame accepted

    [serve]
    threads = 4                  # requests run side by side (different users only: one user's
                                 # requests always run one at a time, in the order they came)
    max_in_flight = 2000         # requests held at once, queued or running; more are answered
                                 # `overloaded` at once (the shim gives its safe answer)
    max_in_flight_per_user = 500 # of one user: a flood of one user's requests never crowds
                                 # out the others

    [log]
    level = "info"               # debug, info, warning, error
    file = ""                    # empty: stderr (stdout is the protocol channel, never logs)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


MAX_GROUPS = 1024  # = messages.MAX_CONTAINER_LEN, the longest array a request may hold
MAX_THREADS = 64  # a thread costs a connection (and memory) whether it is busy or not


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class RosterPolicy:
    versioning: bool = True
    pre_approval: bool = True
    auto_unsubscribed: bool = True
    read_only: bool = False
    mutual_rows: bool = False


@dataclass(frozen=True)
class Limits:
    max_items: int = 10_000
    max_pending_requests: int = 1000
    max_name_length: int = 1024
    max_groups: int = 64
    max_group_length: int = 1024
    max_status_length: int = 1024
    max_request_bytes: int = 16 * 1024
    max_request_elements: int = 32
    max_frame_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServeConfig:
    threads: int = 4
    max_in_flight: int = 2000
    max_in_flight_per_user: int = 500


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    file: str = ""


@dataclass(frozen=True)
class Config:
    store: dict[str, Any] = field(default_factory=lambda: {"backend": "sqlite", "path": "roster-port.sqlite"})
    roster: RosterPolicy = RosterPolicy()
    limits: Limits = Limits()
    serve: ServeConfig = ServeConfig()
    log: LogConfig = LogConfig()
    source: str = "<defaults>"


def _section(cls, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    for key, value in values.items():
        expected = type(getattr(cls(), key))
        if type(value) is not expected:
            raise ConfigError(
                f"{where}.{key} must be {expected.__name__}, not {type(value).__name__}"
            )
        if expected is int and value <= 0:
            raise ConfigError(f"{where}.{key} must be positive")
    return cls(**values)


def parse_config(data: dict[str, Any], *, source: str = "<string>", base_dir: Path | None = None) -> Config:
    unknown = set(data) - {"store", "roster", "limits", "serve", "log"}
    if unknown:
        raise ConfigError(f"{source}: unknown sections {sorted(unknown)}")
    store = dict(Config().store)
    store_values = data.get("store", {})
    if not isinstance(store_values, dict):
        raise ConfigError(f"{source}: [store] must be a table")
    if "backend" in store_values and store_values["backend"] != store["backend"]:
        store = {}
    store.update(store_values)
    if base_dir is not None and isinstance(store.get("path"), str):
        store["path"] = str((base_dir / store["path"]).resolve())
    log = _section(LogConfig, data.get("log", {}), f"{source}: [log]")
    if log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: [log].level must be debug, info, warning or error")
    if log.file and base_dir is not None:
        log = LogConfig(level=log.level, file=str((base_dir / log.file).resolve()))
    limits = _section(Limits, data.get("limits", {}), f"{source}: [limits]")
    if limits.max_groups > MAX_GROUPS:
        # A request's arrays are bounded at decoding (messages.py) before the op is known.
        raise ConfigError(f"{source}: [limits].max_groups must be at most {MAX_GROUPS}")
    if limits.max_request_elements > MAX_GROUPS:
        raise ConfigError(f"{source}: [limits].max_request_elements must be at most {MAX_GROUPS}")
    serve = _section(ServeConfig, data.get("serve", {}), f"{source}: [serve]")
    if serve.threads > MAX_THREADS:
        raise ConfigError(f"{source}: [serve].threads must be at most {MAX_THREADS}")
    return Config(
        store=store,
        serve=serve,
        roster=_section(RosterPolicy, data.get("roster", {}), f"{source}: [roster]"),
        limits=limits,
        log=log,
        source=source,
    )


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=path.parent)
