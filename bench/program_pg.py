#!/usr/bin/env python3
"""Micro-benchmark of the program on its PostgreSQL store, without ejabberd.

Drives the real `roster-port serve` over pipes (roster_port.client.ProgramProcess, as the shim
does) on a throwaway PostgreSQL cluster (tests/pg_cluster.py; or the server of --dsn) and prints
operations/s, requests/s and the p50/p99 latency of one operation for:

- handshake: a full subscription handshake between two users who never met, 4 requests
  (A out subscribe, B in subscribe, B out subscribed, A in subscribed); one operation is the 4;
- roster_get: the 50-item roster of a user (users taken in turn, every answer counted);
- jid_info: one contact of one user;
- write: what mod_roster:set_item_and_notify_clients/3 asks of the storage backend, 3 requests
  (store_get_item, store_set_item of a new item, store_read_version); one operation is the 3.

Each is run with 1 and 2 program processes (one client thread per process, closed loop), each
run `--seconds` long, `--repeat` times; the table gives the median over the repeats (the machine
is shared and noisy). Every program asks for the change feed in its hello, as the shim does
(`--no-feed` leaves it out): with it, every write wakes the feed of every process.

    .venv/bin/python bench/program_pg.py                 # about 1 minute
    .venv/bin/python bench/program_pg.py --repeat 5 --seconds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psycopg  # noqa: E402

from roster_port.client import ProgramProcess  # noqa: E402

HOST = "bench.example"
CONTACTS = 50


def user(i: int) -> str:
    return f"u{i}@{HOST}"


def fresh_schema(server, prefix: str, *statements: str) -> str:
    """The DSN of a new schema on `server` (a pg_cluster.TestServer), after `statements`
    run as its admin."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with server.connect(server.dsn()) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
        for statement in statements:
            connection.execute(statement)
    return server.dsn(schema)


def program_config(work: str | Path, dsn: str) -> Path:
    """A configuration for the program on `dsn`, logging warnings to a file beside it."""
    config = Path(work) / "roster-port.toml"
    config.write_text(f'[store]\nbackend = "postgres"\ndsn = {json.dumps(dsn)}\n'
                      '[log]\nlevel = "warning"\nfile = "roster-port.log"\n')
    return config


def load(dsn: str, users: int) -> None:
    """The program's schema (its own migrations) and `users` users with CONTACTS items each."""
    from roster_port.store.postgres import PostgresStore

    PostgresStore(dsn).close()
    with psycopg.connect(dsn) as connection:
        with connection.cursor() as cursor:
            with cursor.copy("COPY roster_items (username, contact, name, subscription, groups) "
                             "FROM STDIN") as copy:
                for i in range(users):
                    for k in range(1, CONTACTS + 1):
                        contact = user((i + k) % (users + CONTACTS + 1) + users)
                        copy.write_row((user(i), contact, f"c{k}", "both", ["Friends"]))
            cursor.execute("DELETE FROM roster_port_changes")
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


class Run:
    """One measure with `procs` processes: per-operation latencies, wall time."""

    def __init__(self, programs: list[ProgramProcess], seconds: float, users: int,
                 serial: int) -> None:
        self.programs = programs
        self.seconds = seconds
        self.users = users
        self.serial = serial  # makes the handshake users of each run new

    def measure(self, name: str) -> tuple[float, float, float, int]:
        """(operations/s, p50 ms, p99 ms, operations)."""
        body = getattr(self, f"_{name}")
        latencies: list[list[float]] = [[] for _ in self.programs]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(self.programs) + 1)
        stop = threading.Event()

        def drive(index: int, program: ProgramProcess) -> None:
            mine = latencies[index]
            try:
                barrier.wait()
                n = 0
                while not stop.is_set():
                    started = time.perf_counter()
                    body(program, index, n)
                    mine.append(time.perf_counter() - started)
                    n += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                stop.set()

        threads = [threading.Thread(target=drive, args=(index, program), daemon=True)
                   for index, program in enumerate(self.programs)]
        for thread in threads:
            thread.start()
        barrier.wait()
        started = time.perf_counter()
        time.sleep(self.seconds)
        stop.set()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        if errors:
            raise errors[0]
        every = sorted(latency for mine in latencies for latency in mine)
        p50 = every[len(every) // 2] * 1000
        p99 = every[min(len(every) - 1, int(len(every) * 0.99))] * 1000
        return len(every) / wall, p50, p99, len(every)

    def _handshake(self, program: ProgramProcess, index: int, n: int) -> None:
        a = f"hs{self.serial}-{index}-{n}-a@{HOST}"
        b = f"hs{self.serial}-{index}-{n}-b@{HOST}"
        out = program.call("out_subscription", {"user": a, "contact": b, "type": "subscribe"})
        assert out["route"] is True, out
        delivered = program.call("in_subscription",
                                 {"user": b, "contact": a, "type": "subscribe", "status": "hi"})
        assert delivered["deliver"] is True, delivered
        program.call("out_subscription", {"user": b, "contact": a, "type": "subscribed"})
        answer = program.call("in_subscription", {"user": a, "contact": b, "type": "subscribed"})
        assert answer["deliver"] is True, answer
        assert any(effect["type"] == "push" and effect["item"]["subscription"] == "to"
                   for effect in answer["effects"]), answer

    def _write(self, program: ProgramProcess, index: int, n: int) -> None:
        # What mod_roster:set_item_and_notify_clients/3 asks of the storage backend (db_type
        # port): the item, then the new item written, then the version for the push.
        who = f"wr{self.serial}-{index}-{n % 50}@{HOST}"
        contact = f"c{n}@{HOST}"
        item = program.call("store_get_item", {"user": who, "contact": contact})
        assert item.get("item") is None, item
        program.call("store_set_item", {"user": who, "item": {
            "jid": contact, "name": "Written", "subscription": "both", "ask": "none",
            "groups": ["Bench"], "askmessage": ""}})
        assert program.call("store_read_version", {"user": who})["ver"] != "0"

    def _roster_get(self, program: ProgramProcess, index: int, n: int) -> None:
        who = user((n * len(self.programs) + index) % self.users)
        items = program.call("roster_get", {"user": who})["items"]
        assert len(items) == CONTACTS, (who, len(items))

    def _jid_info(self, program: ProgramProcess, index: int, n: int) -> None:
        i = (n * len(self.programs) + index) % self.users
        contact = user((i + 1 + n % CONTACTS) % (self.users + CONTACTS + 1) + self.users)
        info = program.call("jid_info", {"user": user(i), "contact": contact})
        assert info["subscription"] == "both", info


MEASURES = {"write": 3, "handshake": 4, "roster_get": 1, "jid_info": 1}  # requests per operation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL server to use (a fresh schema is made in "
                        "its database) instead of a throwaway cluster")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measure")
    parser.add_argument("--users", type=int, default=500, help="users with 50 items each")
    parser.add_argument("--procs", default="1,2", help="numbers of program processes")
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--no-feed", action="store_true",
                        help="the programs' hello does not ask for the change feed")
    parser.add_argument("--json", help="also write the medians to this file")
    options = parser.parse_args()

    from pg_cluster import TestServer, ThrowawayCluster

    cluster = None
    if options.dsn:
        server = TestServer(options.dsn, None)
    else:
        cluster = ThrowawayCluster.start_new()
        server = TestServer(cluster.admin_dsn, cluster)
    try:
        dsn = fresh_schema(server, "bench")
        load(dsn, options.users)
        with tempfile.TemporaryDirectory(prefix="roster-port-bench-") as work:
            results = run_all(program_config(work, dsn), options)
    finally:
        server.stop()

    print(f"\nmedians of {options.repeat} runs of {options.seconds:g} s "
          f"(feed {'off' if options.no_feed else 'on'})")
    print(f"{'measure':<12} {'procs':>5} {'ops/s':>9} {'requests/s':>11} {'p50 ms':>8} "
          f"{'p99 ms':>8}")
    table = []
    for (name, procs), runs in results.items():
        ops = statistics.median(run[0] for run in runs)
        p50 = statistics.median(run[1] for run in runs)
        p99 = statistics.median(run[2] for run in runs)
        requests = ops * MEASURES[name]
        print(f"{name:<12} {procs:>5} {ops:>9.1f} {requests:>11.1f} {p50:>8.3f} {p99:>8.3f}")
        table.append({"measure": name, "procs": procs, "ops_per_s": ops,
                      "requests_per_s": requests, "p50_ms": p50, "p99_ms": p99,
                      "runs": runs})
    if options.json:
        Path(options.json).write_text(json.dumps(table, indent=1))
    return 0


def run_all(config: Path, options) -> dict[tuple[str, int], list[tuple]]:
    procs_list = [int(p) for p in options.procs.split(",")]
    measures = options.measures.split(",")
    results: dict[tuple[str, int], list[tuple]] = {}
    serial = 0
    log_dir = config.parent
    for procs in procs_list:
        programs = []
        try:
            for index in range(procs):
                stderr = open(log_dir / f"stderr-{procs}-{index}.log", "wb")
                program = ProgramProcess(config, hello=False, stderr=stderr)
                programs.append(program)
                program.call("hello", {"protocols": [2], "shim": "bench", "host": HOST,
                                       "node": "bench@localhost",
                                       "change_feed": not options.no_feed})
            # Warm up: connections, caches of the server and of the programs.
            warm = Run(programs, 0.5, options.users, serial=-procs)
            for name in measures:
                warm.measure(name)
            # Interleaved repeats: a noisy moment spreads over the measures.
            for _ in range(options.repeat):
                for name in measures:
                    serial += 1
                    run = Run(programs, options.seconds, options.users, serial)
                    ops, p50, p99, count = run.measure(name)
                    results.setdefault((name, procs), []).append((ops, p50, p99, count))
                    print(f"  {name:<12} procs={procs} {ops:9.1f} ops/s  p50 {p50:7.3f} ms  "
                          f"p99 {p99:7.3f} ms  ({count} ops)", flush=True)
        finally:
            for program in programs:
                try:
                    program.close()
                except Exception:  # noqa: BLE001
                    program.kill()
    return results


if __name__ == "__main__":
    sys.exit(main())
