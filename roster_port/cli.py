"""`roster-port`: serve (what ejabberd spawns), check (for operators and scripts), replay.

Only `serve` speaks the protocol; it never writes anything but frames to stdout. `check` and
`replay` are for people and scripts, and write their reports to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from . import __version__
from .config import Config, ConfigError, load_config


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def setup_logging(config: Config) -> None:
    handler: logging.Handler
    if config.log.file:
        handler = logging.FileHandler(config.log.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s roster-port[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

    config = load_config(args.config)
    setup_logging(config)
    return serve(config)


def _check(args: argparse.Namespace) -> int:
    from .store.base import StoreError
    from .store.factory import open_store

    config = load_config(args.config)
    try:
        store = open_store(config)
    except (StoreError, OSError) as exc:
        _say(f"roster-port check: cannot open the store: {exc}")
        return 1
    try:
        _say(f"config: {config.source}")
        _say(f"store: {store.describe()}")
        policy, limits = config.roster, config.limits
        _say(
            f"roster: versioning={policy.versioning} pre_approval={policy.pre_approval} "
            f"auto_unsubscribed={policy.auto_unsubscribed} read_only={policy.read_only}"
        )
        _say("limits: " + " ".join(f"{field.name}={getattr(limits, field.name)}"
                                   for field in dataclasses.fields(limits)))
        _say("serve: " + " ".join(f"{field.name}={getattr(config.serve, field.name)}"
                                  for field in dataclasses.fields(config.serve)))
        _say(f"log: {config.log.level} to {config.log.file or 'stderr'}")
        _say("ok")
    finally:
        store.close()
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .replay import dump, replay

    if args.json:
        for line in dump(args.transcript):
            _say(line)
        return 0
    count, differences = replay(args.transcript)
    for difference in differences:
        _say(difference.describe())
    _say(f"{args.transcript}: {count} requests replayed, {len(differences)} differences")
    return 1 if differences else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="roster-port", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"roster-port {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve rosters over stdin/stdout (spawned by ejabberd)")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate the configuration and open the store")
    check.add_argument("--config", required=True, help="TOML configuration file")
    check.set_defaults(run=_check)

    replay = commands.add_parser("replay", help="replay a recorded transcript against a fresh store")
    replay.add_argument("transcript", help="a transcript recorded by mod_roster_port")
    replay.add_argument("--json", action="store_true", help="print the transcript as JSON lines instead")
    replay.set_defaults(run=_replay)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as exc:
        sys.stderr.write(f"roster-port: {exc}\n")
        return 2
