"""`roster-port`: serve (what ejabberd spawns), check (for operators and scripts), replay,
install-change-log (for a DBA).

Only `serve` speaks the protocol; it never writes anything but frames to stdout. The other
commands are for people and scripts, and write their reports to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pwd
import subprocess
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
    if args.as_user:
        return _check_as(args.as_user, config.source)
    # A check never creates the store: run as root, a new SQLite file would be root's, and the
    # user ejabberd runs the program as could not write it; removed afterwards, it could be the
    # file a starting `serve` has just made. A missing file is checked as a scratch file beside
    # it (the same directory, so the same rights), which the check alone ever opens.
    new_sqlite_file = scratch_file = None
    if config.store.get("backend", "sqlite") == "sqlite":
        path = _sqlite_path(config)
        if not os.path.exists(path):
            new_sqlite_file = path
            scratch_file = f"{path}.roster-port-check-{os.getpid()}"
            config = dataclasses.replace(config, store={**config.store, "path": scratch_file})
    try:
        store = open_store(config)
    except (StoreError, OSError) as exc:
        _remove_sqlite_file(scratch_file)
        message = str(exc).replace(scratch_file, new_sqlite_file) if scratch_file else str(exc)
        _say(f"roster-port check: cannot open the store: {message}")
        return 1
    try:
        _say(f"config: {config.source}")
        described = store.describe()
        _say(f"store: {described.replace(scratch_file, new_sqlite_file) if scratch_file else described}")
        policy, limits = config.roster, config.limits
        _say(
            f"roster: versioning={policy.versioning} pre_approval={policy.pre_approval} "
            f"auto_unsubscribed={policy.auto_unsubscribed} read_only={policy.read_only} "
            f"mutual_rows={policy.mutual_rows}"
        )
        _say("limits: " + " ".join(f"{field.name}={getattr(limits, field.name)}"
                                   for field in dataclasses.fields(limits)))
        _say("serve: " + " ".join(f"{field.name}={getattr(config.serve, field.name)}"
                                  for field in dataclasses.fields(config.serve)))
        _say(f"outside changes: {_outside_changes(config, getattr(store, 'mapping', None))}")
        log_to, log_writable = _log_destination(config)
        _say(f"log: {config.log.level} to {log_to}")
        _say(f"runs as: {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})")
        if new_sqlite_file:
            _say(f"note: {new_sqlite_file} does not exist yet: serve will create it (checked "
                 "with a scratch file beside it, removed)")
        if not log_writable:
            _say(f"roster-port check: this user cannot write the log file {config.log.file}: "
                 "serve would not start")
            return 1
        _say("ok")
    finally:
        store.close()
        _remove_sqlite_file(scratch_file)
    return 0


def _remove_sqlite_file(path: str | None) -> None:
    if path:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)


def _check_as(user: str, config_path: str) -> int:
    """`check` run again as `user` (the one ejabberd runs the program as): can it run this
    interpreter, read the configuration, open the store and write the log?"""
    try:
        pwd.getpwnam(user)
    except KeyError:
        _say(f"roster-port check: no user {user}")
        return 1
    # Isolated (-I): neither the current directory nor root's PYTHON* variables may decide
    # what code runs as that user; the installed program is what is checked.
    command = [sys.executable, "-I", "-m", "roster_port", "check", "--config",
               os.path.abspath(config_path)]
    if os.geteuid() != 0:
        if pwd.getpwuid(os.geteuid()).pw_name != user:
            _say(f"roster-port check: only root can check as {user}")
            return 1
    else:
        command = ["runuser", "-u", user, "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, cwd="/",
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        error = done.stderr.strip().splitlines()
        _say(f"roster-port check: as {user}, {sys.executable} -m roster_port check exited "
             f"{done.returncode}" + (f": {error[-1]}" if error else ""))
    return done.returncode


def _sqlite_path(config: Config) -> str:
    # load_config made it absolute (relative to the configuration file).
    return os.path.abspath(config.store.get("path", "roster-port.sqlite"))


def _log_destination(config: Config) -> tuple[str, bool]:
    """Where serve logs, and whether this user can write there."""
    if not config.log.file:
        return "stderr (ejabberd's: lost when ejabberd runs detached; set [log] file)", True
    path = os.path.abspath(config.log.file)
    if os.path.exists(path):
        writable = os.access(path, os.W_OK)
    else:
        writable = os.access(os.path.dirname(path), os.W_OK | os.X_OK)
    return path + ("" if writable else " (NOT writable by this user)"), writable


def _outside_changes(config: Config, mapping) -> str:
    """Whether `serve` will push changes made outside XMPP, and what it depends on: the change
    log, triggers logging the tables the mapping reads (`mapping`: None for the program's own
    schema), and LISTEN."""
    backend = config.store.get("backend", "sqlite")
    if backend == "sqlite":
        return ("pushed: the program's own change table (roster_changes, written by its "
                "triggers), polled every 0.2 s by one program per ejabberd node")
    import psycopg
    from psycopg import sql

    from .store.mapped import tables_read
    from .store.pg_changes import CHANNEL, triggers_that_log

    try:
        with psycopg.connect(config.store["dsn"], autocommit=True, connect_timeout=max(
                1, int(config.store.get("connect_timeout_s", 2.0)))) as connection:
            has_log = connection.execute(
                "SELECT to_regclass('roster_port_changes') IS NOT NULL"
                " AND to_regprocedure('roster_port_log_change(text,text,text,text)') IS NOT NULL"
            ).fetchone()[0]
            triggers = triggers_that_log(connection)
            read = tables_read(mapping, connection) if mapping is not None else []
            connection.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            connection.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(CHANNEL)))
    except psycopg.Error as exc:
        return f"unknown: {(str(exc).strip() or type(exc).__name__).splitlines()[0]}"
    if not has_log:
        return ("NOT pushed: no change log in this database (roster_port_changes); install it "
                "with roster-port install-change-log (docs/changes.md)")
    if not triggers:
        return ("NOT pushed: the change log is installed but no trigger calls "
                "roster_port_log_change() (docs/changes.md)")
    names = ", ".join(f"{table} ({trigger}{'' if enabled else ', DISABLED'})"
                      for _, table, trigger, enabled in triggers)
    logged = {f"{schema}.{table}" for schema, table, _, enabled in triggers if enabled}
    unlogged = [table for table in read if table not in logged]
    if unlogged:
        return (f"partly pushed: LISTEN works; triggers logging changes on {names}; but the "
                f"mapping also reads {', '.join(unlogged)}, whose changes no trigger logs")
    return f"pushed: LISTEN works; triggers logging changes on {names}"


POSTGRES_BACKENDS = ("postgres", "postgres_mapped")


def _install_change_log(args: argparse.Namespace) -> int:
    """Install (or print) the change log of docs/changes.md in the store's PostgreSQL database,
    with the grants its users need, then say which triggers feed it."""
    config = load_config(args.config)
    if config.store.get("backend") not in POSTGRES_BACKENDS:
        sys.stderr.write(f"roster-port: the change log is for PostgreSQL stores; {config.source} "
                         f"has backend = {config.store.get('backend')!r}\n")
        return 2
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    from .store.pg_changes import (change_log_grants, change_log_statements, install_change_log,
                                   triggers_that_log)
    from .store.postgres import dsn_without_password

    program_dsn = config.store["dsn"]
    program_roles = list(args.program_role)
    if args.dsn and not program_roles:
        # Installed by another role (an owner, a DBA): the program's own role gets its rights.
        program_user = conninfo_to_dict(program_dsn).get("user")
        if program_user and program_user != conninfo_to_dict(args.dsn).get("user"):
            program_roles.append(program_user)

    if args.print_sql:
        schema = sql.Identifier(args.schema or "public")
        _say("-- The change log of roster-port (docs/changes.md): review, then apply with psql as")
        _say("-- the owner of the schema. Idempotent: applying it again changes nothing.")
        _say("BEGIN;")
        for statement in (change_log_statements(schema)
                          + change_log_grants(schema, program_roles=program_roles,
                                              writer_roles=args.writer_role)):
            _say(statement.as_string(None).strip() + ";")
        _say("COMMIT;")
        return 0

    dsn = args.dsn or program_dsn
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(config.store.get(
                "connect_timeout_s", 2.0)))) as connection:
            with connection.transaction():
                if args.schema:
                    schema = sql.Identifier(args.schema)
                else:
                    name = connection.execute("SELECT current_schema()").fetchone()[0]
                    if name is None:
                        raise psycopg.ProgrammingError("no schema of the search_path exists")
                    schema = sql.Identifier(name)
                install_change_log(connection, schema)
                for statement in change_log_grants(schema, program_roles=program_roles,
                                                   writer_roles=args.writer_role):
                    connection.execute(statement)
            shown = schema.as_string(None)
            _say(f"change log installed in schema {shown} of {dsn_without_password(dsn)}: "
                 "table roster_port_changes, function roster_port_log_change()")
            for role in program_roles:
                _say(f"granted to {role} (the program): SELECT, INSERT, DELETE on the table, "
                     "USAGE on its sequence")
            for role in args.writer_role:
                if role not in program_roles:
                    _say(f"granted to {role} (a writer): INSERT on the table, USAGE on its sequence")
            triggers = triggers_that_log(connection)
    except psycopg.Error as exc:
        message = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        password = conninfo_to_dict(dsn).get("password")
        if password:
            message = message.replace(password, "***")
        _say(f"roster-port install-change-log: {message}")
        return 1
    _say_triggers(triggers)
    return 0


def _say_triggers(triggers: list[tuple[str, str, str, bool]]) -> None:
    if not triggers:
        _say("triggers: none calls roster_port_log_change(): changes made outside XMPP are not "
             "pushed until the tables your mapping reads have them (docs/changes.md)")
        return
    for schema, table, trigger, enabled in triggers:
        state = "" if enabled else " (DISABLED)"
        _say(f"trigger: {trigger} on {schema}.{table} logs changes{state}")


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
    check.add_argument("--as-user", help="check as this user (the one ejabberd runs as): "
                       "root only")
    check.set_defaults(run=_check)

    change_log = commands.add_parser(
        "install-change-log",
        help="install the change log (docs/changes.md) in the store's PostgreSQL database")
    change_log.add_argument("--config", required=True, help="TOML configuration file")
    change_log.add_argument("--print-sql", action="store_true",
                            help="print the SQL for a DBA to review and apply instead")
    change_log.add_argument("--schema", help="schema to install in (default: the connection's "
                            "current schema; public with --print-sql)")
    change_log.add_argument("--dsn", help="connect as another role (the schema's owner) "
                            "instead of the store's dsn")
    change_log.add_argument("--program-role", action="append", default=[],
                            help="the program's role, granted what it needs (default with --dsn: "
                            "the store dsn's user)")
    change_log.add_argument("--writer-role", action="append", default=[],
                            help="a role whose writes fire the logging triggers (an application's), "
                            "granted INSERT; repeatable")
    change_log.set_defaults(run=_install_change_log)

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
