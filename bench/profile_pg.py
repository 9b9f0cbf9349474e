#!/usr/bin/env python3
"""Where the time of one request goes in the program on its PostgreSQL store, without ejabberd.

Drives one real `roster-port serve` (as the shim does, over pipes) on a throwaway PostgreSQL
cluster (tests/pg_cluster.py), with the change feed asked for in its hello, and for each
operation the benchmark's hooks make the program serve:

- write: mod_roster:set_item_and_notify_clients/3 through the storage backend (store_get_item,
  store_set_item of a new item, store_read_version);
- handshake: the four subscription hooks of one handshake between two new users;
- jid_info: one contact of a 50-item roster;
- roster_get: a 50-item roster;

prints the client's wall time per operation, the program's CPU time per operation
(/proc/<pid>/stat), and the statements the server ran per operation (pg_stat_statements, when
the cluster can load it, else the server's statement log counted), and with --cprofile the top
of a cProfile of the program.

    .venv/bin/python bench/profile_pg.py                  # about 30 s
    .venv/bin/python bench/profile_pg.py --ops 2000 --cprofile 25
"""

from __future__ import annotations

import argparse
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

import psycopg  # noqa: E402

from roster_port.client import ProgramProcess  # noqa: E402
from program_pg import CONTACTS, HOST, fresh_schema, load, program_config, user  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Profiled(ProgramProcess):
    """ProgramProcess, optionally under cProfile."""

    def __init__(self, config: Path, profile_to: Path | None, stderr) -> None:
        if profile_to is None:
            super().__init__(config, hello=False, stderr=stderr)
            return
        import itertools
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(profile_to), "-m", "roster_port",
             "serve", "--config", str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        self._ids = itertools.count(1)
        self._received = bytearray()


def op_write(program, n: int, tag: str) -> None:
    who = f"wr{tag}-{n % 50}@{HOST}"
    contact = f"c{n}@{HOST}"
    program.call("store_get_item", {"user": who, "contact": contact})
    program.call("store_set_item", {"user": who, "item": {
        "jid": contact, "name": "Written", "subscription": "both", "ask": "none",
        "groups": ["Bench"], "askmessage": ""}})
    program.call("store_read_version", {"user": who})


def op_handshake(program, n: int, tag: str) -> None:
    a, b = f"hs{tag}-{n}-a@{HOST}", f"hs{tag}-{n}-b@{HOST}"
    program.call("out_subscription", {"user": a, "contact": b, "type": "subscribe"})
    program.call("in_subscription", {"user": b, "contact": a, "type": "subscribe"})
    program.call("out_subscription", {"user": b, "contact": a, "type": "subscribed"})
    answer = program.call("in_subscription", {"user": a, "contact": b, "type": "subscribed"})
    assert answer["deliver"] is True, answer


def op_jid_info(program, n: int, tag: str, users: int = 0) -> None:
    i = n % users
    contact = user((i + 1 + n % CONTACTS) % (users + CONTACTS + 1) + users)
    info = program.call("jid_info", {"user": user(i), "contact": contact})
    assert info["subscription"] == "both", info


def op_roster_get(program, n: int, tag: str, users: int = 0) -> None:
    items = program.call("roster_get", {"user": user(n % users)})["items"]
    assert len(items) == CONTACTS


OPS = {"write": op_write, "handshake": op_handshake, "jid_info": op_jid_info,
       "roster_get": op_roster_get}


def statement_counts(admin: psycopg.Connection) -> dict[str, tuple[int, float]]:
    rows = admin.execute("SELECT query, calls, total_exec_time FROM pg_stat_statements "
                         "WHERE query NOT ILIKE '%%pg_stat_statements%%'").fetchall()
    return {query: (calls, total) for query, calls, total in rows}


class InProcess:
    """The dispatcher's serving of one request, in this thread: a scope, then the handler."""

    def __init__(self, dsn: str) -> None:
        from roster_port.dispatcher import OPERATIONS
        from roster_port.roster import Rules
        from roster_port.store.postgres import PostgresStore

        self.operations = OPERATIONS
        self.rules = Rules()
        self.store = PostgresStore(dsn)
        self.store.origin = "profile@localhost"

    def call(self, op: str, args: dict) -> dict:
        operation = self.operations[op]
        scope = (self.store.transaction if operation.writes_for(args) else self.store.snapshot)
        with scope(args["user"]) as txn:
            outcome = operation.handler(txn, self.rules, args)
        return {**outcome.result, "effects": [effect.to_wire() for effect in outcome.effects]}


def in_process(dsn: str, admin: psycopg.Connection, options) -> None:
    import cProfile

    program = InProcess(dsn)
    print(f"{'operation':<11} {'ops':>5} {'wall ms/op':>10} {'p50 ms':>7} "
          f"{'CPU ms/op':>9} {'statements/op':>13} {'server ms/op':>12}")
    for name in options.measures.split(","):
        body = OPS[name]
        extra = {"users": options.users} if name in ("jid_info", "roster_get") else {}
        for n in range(min(50, options.ops)):
            body(program, n, "warm" + name, **extra)
        admin.execute("SELECT pg_stat_statements_reset()")
        profiler = cProfile.Profile() if options.cprofile else None
        times = []
        cpu0 = time.process_time()
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        for n in range(options.ops):
            t = time.perf_counter()
            body(program, n, "m" + name, **extra)
            times.append(time.perf_counter() - t)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        counts = statement_counts(admin)
        calls = sum(c for c, _ in counts.values())
        server_ms = sum(t for _, t in counts.values())
        print(f"{name:<11} {options.ops:>5} {wall / options.ops * 1000:>10.3f} "
              f"{statistics.median(times) * 1000:>7.3f} {cpu / options.ops * 1000:>9.3f} "
              f"{calls / options.ops:>13.1f} {server_ms / options.ops:>12.3f}")
        if profiler:
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(options.cprofile)
            stats.sort_stats("cumulative").print_stats(options.cprofile)
    program.store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=500, help="operations of each kind")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--measures", default=",".join(OPS))
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="profile the program and print its N costliest functions")
    parser.add_argument("--statements", action="store_true",
                        help="print the statements of each operation (pg_stat_statements)")
    parser.add_argument("--no-feed", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="no program process: run the store and the roster functions in "
                             "this thread (as one worker does), under cProfile if asked")
    options = parser.parse_args()

    from pg_cluster import CLUSTER_SETTINGS, TestServer, ThrowawayCluster

    CLUSTER_SETTINGS["shared_preload_libraries"] = "pg_stat_statements"
    CLUSTER_SETTINGS["pg_stat_statements.track"] = "all"  # statements inside functions too
    cluster = ThrowawayCluster.start_new()
    server = TestServer(cluster.admin_dsn, cluster)
    try:
        dsn = fresh_schema(server, "prof",
                           "CREATE EXTENSION IF NOT EXISTS pg_stat_statements SCHEMA public")
        load(dsn, options.users)
        admin = psycopg.connect(server.dsn(), autocommit=True)
        if options.in_process:
            in_process(dsn, admin, options)
            return 0
        with tempfile.TemporaryDirectory(prefix="roster-port-profile-") as work:
            config = program_config(work, dsn)
            profile_to = Path(work) / "program.prof" if options.cprofile else None
            stderr = open(Path(work) / "stderr.log", "wb")
            program = Profiled(config, profile_to, stderr)
            program.call("hello", {"protocols": [2], "shim": "profile", "host": HOST,
                                   "node": "profile@localhost",
                                   "change_feed": not options.no_feed})
            pid = program.process.pid
            print(f"{'operation':<11} {'ops':>5} {'wall ms/op':>10} {'p50 ms':>7} "
                  f"{'program CPU ms/op':>17} {'statements/op':>13} {'server ms/op':>12}")
            for name in options.measures.split(","):
                body = OPS[name]
                extra = {"users": options.users} if name in ("jid_info", "roster_get") else {}
                for n in range(min(50, options.ops)):  # warm up
                    body(program, n, "warm" + name, **extra)
                time.sleep(0.2)
                admin.execute("SELECT pg_stat_statements_reset()")
                cpu0 = cpu_seconds(pid)
                times = []
                started = time.perf_counter()
                for n in range(options.ops):
                    t = time.perf_counter()
                    body(program, n, "m" + name, **extra)
                    times.append(time.perf_counter() - t)
                wall = time.perf_counter() - started
                time.sleep(0.2)  # the feed's wake-ups after the last write
                cpu = cpu_seconds(pid) - cpu0
                counts = statement_counts(admin)
                # Top-level statements only count once: those run by functions are nested.
                top = {q: c for q, c in counts.items()}
                calls = sum(c for c, _ in top.values())
                server_ms = sum(t for _, t in top.values())
                print(f"{name:<11} {options.ops:>5} {wall / options.ops * 1000:>10.3f} "
                      f"{statistics.median(times) * 1000:>7.3f} "
                      f"{cpu / options.ops * 1000:>17.3f} {calls / options.ops:>13.1f} "
                      f"{server_ms / options.ops:>12.3f}")
                if options.statements:
                    for query, (c, t) in sorted(top.items(), key=lambda kv: -kv[1][0]):
                        print(f"    {c / options.ops:5.2f}/op {t / max(c, 1) * 1000:8.1f} us  "
                              f"{' '.join(query.split())[:150]}")
            program.close()
            if profile_to is not None:
                stats = pstats.Stats(str(profile_to))
                stats.sort_stats("tottime").print_stats(options.cprofile)
                stats.sort_stats("cumulative").print_stats(options.cprofile)
        admin.close()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
