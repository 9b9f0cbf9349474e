"""The driver of bench/run: stock mod_roster against mod_roster_port, side by side, in one run.

Theory of operation
-------------------
Five variants, each a real ejabberd 23.01 started from a directory of its own (with
tests/e2e/ejabberd_harness.py's EjabberdServer, given the configuration shape each variant
needs), on the same data set:

    mnesia       stock mod_roster, db_type mnesia (ejabberd's default)
    sql-sqlite   stock mod_roster, db_type sql, SQLite, ejabberd's own schema (lite.sql)
    sql-pg       stock mod_roster, db_type sql, PostgreSQL, ejabberd's own schema (pg.sql)
    port-sqlite  mod_roster_port + roster-port serve, SQLite store
    port-pg      mod_roster_port + roster-port serve, PostgreSQL store

All variants have the same modules, roster versioning on with the version stored
(`versioning: true`, `store_current_id: true`, as the harness runs mod_roster_port), and
mod_roster's other options at ejabberd's defaults (so the SQL variants have mod_roster's cache).
PostgreSQL is one throwaway cluster (tests/pg_cluster.py) shared by the two PostgreSQL variants,
each in a database of its own.

Per variant:
 1. load the data set: `users` users with `contacts` contacts each (ring neighbours, mutual,
    subscription both), plus one user per roster size (10 ... 5,000 items). Mnesia is written
    through mod_roster's own storage backend by the Erlang module (bench/roster_bench.erl); the
    SQL stores are bulk-loaded here before ejabberd starts: ejabberd's tables with the rows
    mod_roster_sql writes, roster-port's (created by the program's own migrations) with the
    same items. Then every variant is checked to answer the same roster sizes.
 2. restart ejabberd (every cache gone), then the hook suite of roster_bench: first touch,
    warm reads, writes, subscription handshakes (see roster_bench.erl).
 3. end to end, roster IQ get of each roster size with a plain XMPP client (bench/xmpp_load.py).
 4. restart ejabberd, then the login storm: N slixmpp clients log in together.
Then, for the two roster-port variants, the memory check: a store with `rss_rows` rows, the
rosters of spread-out users read, and the resident memory of each program process.

The Erlang module is compiled with erlc against Debian's ejabberd (as erlang_shim/Makefile does)
into a temporary directory and loaded into the running node over distribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "e2e"), str(REPO / "tests"), str(REPO / "bench")]

from ejabberd_harness import EJABBERD_LIBS, EjabberdServer, roster_port_command  # noqa: E402

import report  # noqa: E402
import xmpp_load  # noqa: E402

HOST = "localhost"
PASSWORD = "secret"
# Debian's ejabberd package ships ejabberd's SQL schema files here.
EJABBERD_SQL = Path("/usr/share/ejabberd/sql")
XMPP_INCLUDE_GLOB = "/usr/lib/erlang/lib/p1_xmpp-*/include"


@dataclasses.dataclass(frozen=True)
class Scale:
    users: int            # users of the hook suite, `contacts` contacts each
    contacts: int
    seconds: float        # length of each timed hook run
    sizes: tuple[int, ...]  # roster sizes of the end-to-end roster get
    handshakes: int       # most subscription handshakes of one (timed) handshake run
    size_repeats: int     # roster gets timed per size
    clients: int          # slixmpp clients of the login storm
    rss_rows: int         # rows in the store of the memory check
    rss_samples: int      # users whose rosters are read before RSS is taken


FULL = Scale(users=1000, contacts=50, seconds=4.0, handshakes=1500, sizes=(10, 100, 1000, 5000),
             size_repeats=20, clients=200, rss_rows=1_000_000, rss_samples=2000)
QUICK = Scale(users=100, contacts=50, seconds=0.5, handshakes=100, sizes=(10, 100, 1000, 5000),
              size_repeats=5, clients=50, rss_rows=50_000, rss_samples=300)


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    label: str
    roster: str   # "stock" or "port"
    engine: str   # "mnesia", "sqlite" or "pg"


VARIANTS = [
    Variant("mnesia", "stock mod_roster, Mnesia", "stock", "mnesia"),
    Variant("sql-sqlite", "stock mod_roster, SQL on SQLite", "stock", "sqlite"),
    Variant("sql-pg", "stock mod_roster, SQL on PostgreSQL", "stock", "pg"),
    Variant("port-sqlite", "mod_roster_port, SQLite store", "port", "sqlite"),
    Variant("port-pg", "mod_roster_port, PostgreSQL store", "port", "pg"),
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- The data set (mirrors roster_bench.erl) -------------------------------------------------

def user(i: int) -> str:
    return f"u{i}"


def ring(i: int, n: int, k: int) -> list[int]:
    return [(i + d + n) % n for d in range(-(k // 2), k // 2 + 1) if d != 0]


def size_user(size: int) -> str:
    return f"size{size}"


def rosters(n: int, k: int, sizes: Iterable[int]) -> Iterator[tuple[str, list[str]]]:
    """(user, contacts) of the data set, as node parts of JIDs on HOST."""
    for i in range(n):
        yield user(i), [user(c) for c in ring(i, n, k)]
    for size in sizes:
        yield size_user(size), [f"s{c}" for c in range(size)]


# --- ejabberd, configured per variant ---------------------------------------------------------

@dataclasses.dataclass
class BenchServer(EjabberdServer):
    """The harness's EjabberdServer with the configuration of one variant. `store_toml` is the
    program's [store] table; empty means stock mod_roster (no mod_roster_port)."""

    db_type: str = "mnesia"
    sql_yaml: str = ""
    store_toml: str = ""

    def roster_port_toml(self) -> str:
        return (f"{self.store_toml}\n[log]\nlevel = \"warning\"\n"
                f"file = \"{self.program_log_path}\"\n")

    def ejabberd_yml(self) -> str:
        port_module = ""
        if self.store_toml:
            command = f"{roster_port_command()} serve --config {self.workdir / 'roster-port.toml'}"
            port_module = f"""  mod_roster_port:
    command: "{command}"
    pool_size: {self.pool_size}
    call_timeout: {self.call_timeout_ms}
    transcript: undefined
"""
        return f"""# Generated by bench/bench.py for one variant of the benchmark.
hosts:
  - "{self.host}"
loglevel: info
log_rotate_count: 0
auth_method: internal
auth_password_format: plain
{self.sql_yaml}
listen:
  -
    port: {self.c2s_port}
    ip: "{self.ip}"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    backlog: 1024
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  mod_caps: {{}}
  mod_roster:
    db_type: {self.db_type}
    versioning: true
    store_current_id: true
{port_module}"""


# Program processes per host for the roster-port variants (mod_roster_port's pool_size); the
# shim's default is one per scheduler, 2 on the reference machine. --pool-size changes it.
POOL_SIZE = 2


def make_server(variant: Variant, workdir: Path, pg: "PgServer | None",
                data: list[tuple[str, list[str]]]) -> BenchServer:
    """A server for `variant` in `workdir`, with its database created (and, for roster-port,
    loaded with `data`)."""
    workdir.mkdir(parents=True)
    common = dict(workdir=workdir, host=HOST, pool_size=POOL_SIZE, transcript=False)
    if variant.key == "mnesia":
        return BenchServer(**common, command="(stock mod_roster: no program)", db_type="mnesia")
    if variant.key == "sql-sqlite":
        path = workdir / "ejabberd.db"
        with sqlite3.connect(path) as db:
            db.executescript((EJABBERD_SQL / "lite.sql").read_text())
            db.executemany(STOCK_SQL_ITEM.replace("%s", "?"), _stock_items(data))
            db.executemany(STOCK_SQL_GROUP.replace("%s", "?"), _stock_groups(data))
        return BenchServer(**common, command="(stock mod_roster: no program)", db_type="sql",
                           sql_yaml=f'sql_type: sqlite\nsql_database: "{path}"\n')
    if variant.key == "sql-pg":
        assert pg is not None
        database = pg.create_database("ejabberd_bench")
        pg.execute_script(database, (EJABBERD_SQL / "pg.sql").read_text())
        load_stock_pg(pg.dsn(database), data)
        sql_yaml = (f'sql_type: pgsql\nsql_server: "127.0.0.1"\nsql_port: {pg.port}\n'
                    f'sql_database: "{database}"\nsql_username: "{pg.user}"\n'
                    'sql_password: ""\nsql_pool_size: 10\n')
        return BenchServer(**common, command="(stock mod_roster: no program)", db_type="sql",
                           sql_yaml=sql_yaml)
    if variant.key == "port-sqlite":
        path = workdir / "roster.sqlite"
        load_port_sqlite(path, data)
        return BenchServer(**common, db_type="port",
                           store_toml=f'[store]\nbackend = "sqlite"\npath = "{path}"\n')
    if variant.key == "port-pg":
        assert pg is not None
        dsn = pg.dsn(pg.create_database("roster_port_bench"))
        load_port_pg(dsn, data)
        return BenchServer(**common, db_type="port",
                           store_toml=f'[store]\nbackend = "postgres"\ndsn = "{dsn}"\n')
    raise ValueError(variant.key)


# --- Loading the SQL stores -------------------------------------------------------------

def _rows(data: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, str, str]]:
    """(user JID, contact JID, name) rows: the same items roster_bench:populate writes."""
    for owner, contacts in data:
        for contact in contacts:
            yield f"{owner}@{HOST}", f"{contact}@{HOST}", contact


# The rows mod_roster_sql 23.01 writes for an item (ejabberd's schema, single-host layout):
# subscription 'B' (both), ask 'N' (none), server 'N', type 'item'; one rostergroups row per
# group. Checked against what roster_bench:populate writes through mod_roster_sql.
STOCK_SQL_ITEM = ("INSERT INTO rosterusers (username, jid, nick, subscription, ask, askmessage, "
                  "server, subscribe, type) VALUES (%s, %s, %s, 'B', 'N', '', 'N', '', 'item')")
STOCK_SQL_GROUP = "INSERT INTO rostergroups (username, jid, grp) VALUES (%s, %s, 'Friends')"


def _stock_items(data: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, str, str]]:
    for owner, contacts in data:
        for contact in contacts:
            yield owner, f"{contact}@{HOST}", contact


def _stock_groups(data: Iterable[tuple[str, list[str]]]) -> Iterator[tuple[str, str]]:
    for owner, jid, _ in _stock_items(data):
        yield owner, jid


def load_stock_pg(dsn: str, data: list[tuple[str, list[str]]]) -> None:
    """Bulk-loads the data set into ejabberd's own PostgreSQL tables (same rows as SQLite)."""
    import psycopg

    with psycopg.connect(dsn) as connection:
        with connection.cursor() as cursor:
            with cursor.copy("COPY rosterusers (username, jid, nick, subscription, ask, "
                             "askmessage, server, subscribe, type) FROM STDIN") as copy:
                for row in _stock_items(data):
                    copy.write_row((*row, "B", "N", "", "N", "", "item"))
            with cursor.copy("COPY rostergroups (username, jid, grp) FROM STDIN") as copy:
                for row in _stock_groups(data):
                    copy.write_row((*row, "Friends"))
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


def load_port_sqlite(path: Path, data: Iterable[tuple[str, list[str]]]) -> None:
    """Creates the program's SQLite store (its own migrations) and bulk-inserts the data set."""
    from roster_port.store.sqlite import SQLiteStore

    SQLiteStore(str(path)).close()
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO roster_items (user, contact, name, subscription, groups) "
            "VALUES (?, ?, ?, 'both', '[\"Friends\"]')", _rows(data))
        _clear_change_log(db.execute, {name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")})
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def load_port_pg(dsn: str, data: Iterable[tuple[str, list[str]]]) -> None:
    """Creates the program's PostgreSQL store (its own migrations) and COPYs the data set in."""
    import psycopg

    from roster_port.store.postgres import PostgresStore

    PostgresStore(dsn).close()
    with psycopg.connect(dsn) as connection:
        with connection.cursor() as cursor:
            with cursor.copy("COPY roster_items (username, contact, name, subscription, groups) "
                             "FROM STDIN") as copy:
                for jid, contact, name in _rows(data):
                    copy.write_row((jid, contact, name, "both", ["Friends"]))
            cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            _clear_change_log(cursor.execute, {name for (name,) in cursor.fetchall()})
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")


CHANGE_LOG_TABLES = ("roster_changes", "roster_port_changes")  # SQLite's, PostgreSQL's


def _clear_change_log(execute, existing_tables: set[str]) -> None:
    """The triggers logged every loaded row as a change made outside the program. The data set
    stands for rows that were there before the run: drop those entries (a program starting
    later reads only newer entries anyway; this keeps the log from weighing on the run)."""
    for table in CHANGE_LOG_TABLES:
        if table in existing_tables:
            execute(f"DELETE FROM {table}")


# --- PostgreSQL ---------------------------------------------------------------------------------

class PgServer:
    """The throwaway cluster of tests/pg_cluster.py, with databases made on demand."""

    def __init__(self) -> None:
        import pg_cluster

        self.cluster = pg_cluster.ThrowawayCluster.start_new()
        self.port = self.cluster.port
        self.user = pg_cluster.SERVER_USER
        self._count = 0

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def create_database(self, prefix: str) -> str:
        import psycopg

        self._count += 1
        name = f"{prefix}_{self._count}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return name

    def execute_script(self, database: str, script: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn(database), autocommit=True) as connection:
            connection.execute(script)  # no parameters: several statements are allowed

    def version(self) -> str:
        import psycopg

        with psycopg.connect(self.dsn("postgres")) as connection:
            return connection.execute("SHOW server_version").fetchone()[0]

    def settings(self) -> str:
        import pg_cluster

        return ", ".join(f"{k}={v}" for k, v in pg_cluster.CLUSTER_SETTINGS.items()
                         if k in ("fsync", "synchronous_commit", "shared_buffers"))

    def destroy(self) -> None:
        self.cluster.destroy()


# --- The Erlang load module -----------------------------------------------------------------------

def compile_bench_module(out_dir: Path) -> Path:
    ejabberd = sorted(EJABBERD_LIBS.glob("ejabberd-23.01*/ebin")) or sorted(
        EJABBERD_LIBS.glob("ejabberd-*/ebin"))
    xmpp_include = sorted(Path("/").glob(XMPP_INCLUDE_GLOB.lstrip("/")))
    if not ejabberd or not xmpp_include:
        raise RuntimeError("ejabberd 23.01 (Debian's package) is not installed: run scripts/bootstrap")
    ebin = ejabberd[-1]
    subprocess.run(["erlc", "+warnings_as_errors", "-pa", str(ebin),
                    "-I", str(ebin.parent / "include"), "-I", str(xmpp_include[-1]),
                    "-o", str(out_dir), str(REPO / "bench" / "roster_bench.erl")], check=True)
    return out_dir / "roster_bench.beam"


def bench_call(server: BenchServer, beam: Path, function: str, args: str,
               printer: str) -> list[list[str]]:
    """Loads roster_bench into the node, calls roster_bench:function(args) there, and returns
    the tab-separated lines `printer` (an Erlang fun of the answer) prints. (Variable names are
    unusual so as not to clash with those of the harness's rpc wrapper.)"""
    expression = (
        f'{{ok, BenchBeam}} = file:read_file("{beam}"), '
        '{module, roster_bench} = rpc:call(Node, code, load_binary, '
        '[roster_bench, "roster_bench.beam", BenchBeam]), '
        f'BenchAnswer = rpc:call(Node, roster_bench, {function}, [{args}], infinity), '
        'case BenchAnswer of {badrpc, _} -> erlang:error(BenchAnswer); _ -> ok end, '
        f'({printer})(BenchAnswer)'
    )
    out = server.rpc(expression, timeout=1800)
    return [line.split("\t")[1:] for line in out.splitlines() if line.startswith("ROW\t")]


PRINT_RESULTS = ('fun(L) -> [io:format("ROW\\t~ts\\t~b\\t~b\\t~b\\t~f\\t~f~n", '
                 '[N, P, C, W, P50, P99]) || {N, P, C, W, P50, P99} <- L] end')
PRINT_SIZES = 'fun(L) -> [io:format("ROW\\t~ts\\t~b~n", [U, S]) || {U, S} <- L] end'


def results_of(variant: Variant, lines: list[list[str]]) -> list[report.Row]:
    return [report.Row(variant=variant.key, measure=name, procs=int(procs), calls=int(calls),
                       wall_s=int(wall_us) / 1e6, p50_ms=float(p50) / 1000,
                       p99_ms=float(p99) / 1000)
            for name, procs, calls, wall_us, p50, p99 in lines]


def erl_bin(text: str) -> str:
    return f'<<"{text}">>'


def check_sizes(server: BenchServer, beam: Path, scale: Scale, users: int) -> None:
    """Every variant must answer the same data set: a few rosters' lengths, through roster_get."""
    expected = {user(0): scale.contacts, user(users - 1): scale.contacts}
    expected.update({size_user(s): s for s in scale.sizes})
    names = ", ".join(erl_bin(u) for u in expected)
    got = {u: int(n) for u, n in bench_call(server, beam, "roster_sizes",
                                             f"{erl_bin(HOST)}, [{names}]", PRINT_SIZES)}
    if got != expected:
        raise RuntimeError(f"the data set is not what it should be: {got} != {expected}")


def start(server: BenchServer, variant: Variant, timeout: float = 60) -> None:
    """Starts ejabberd and waits until the variant can serve rosters. The harness waits for the
    listener and the programs' hello; ejabberd's SQL pool starts after the listener, so for the
    stock SQL variants we wait until a query goes through (a hook running before that crashes,
    and mod_roster answers an empty roster)."""
    server.start(timeout=timeout)
    if variant.roster != "stock" or variant.engine == "mnesia":
        return
    deadline = time.monotonic() + timeout
    while True:
        out = server.rpc(f'io:format("~p~n", [rpc:call(Node, ejabberd_sql, sql_query, '
                         f'[{erl_bin(HOST)}, [<<"SELECT 1">>]])])')
        if out.startswith("{selected"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{variant.key}: ejabberd's SQL pool is not ready: {out.strip()}")
        time.sleep(0.5)


# --- One variant ------------------------------------------------------------------------------------

def run_variant(variant: Variant, scale: Scale, base: Path, pg: PgServer | None,
                beam: Path) -> tuple[list[report.Row], dict]:
    rows: list[report.Row] = []
    info: dict = {}
    data = list(rosters(scale.users, scale.contacts, scale.sizes))
    log(f"{variant.key}: preparing the store")
    started = time.monotonic()
    server = make_server(variant, base / variant.key, pg, data)
    try:
        start(server, variant)
        server.register(*(user(i) for i in range(scale.clients)),
                        *(size_user(s) for s in scale.sizes), password=PASSWORD)
        if variant.engine == "mnesia":
            log(f"{variant.key}: writing the data set through mod_roster's backend")
            populate = bench_call(server, beam, "populate",
                                  f"{erl_bin(HOST)}, {scale.users}, {scale.contacts}, "
                                  f"[{', '.join(map(str, scale.sizes))}]",
                                  f"fun(T) -> ({PRINT_RESULTS})([T]) end")
            info["populate_s"] = results_of(variant, populate)[0].wall_s
        check_sizes(server, beam, scale, scale.users)

        log(f"{variant.key}: restart, then the hook suite")
        server.stop()
        start(server, variant)
        rows += results_of(variant, bench_call(
            server, beam, "suite",
            f"{erl_bin(HOST)}, {scale.users}, {scale.contacts}, {scale.seconds:.2f}, "
            f"{scale.handshakes}",
            PRINT_RESULTS))

        log(f"{variant.key}: roster IQ get end to end, by roster size")
        for size in scale.sizes:
            times = xmpp_load.roster_get_latencies(server.ip, server.c2s_port, HOST,
                                                   size_user(size), PASSWORD, size,
                                                   scale.size_repeats)
            rows.append(report.Row.from_latencies(variant.key, f"roster IQ get e2e, {size} items",
                                                  1, times))
        info["beam_rss_mb"] = rss_mb(server.process.pid)[0]

        log(f"{variant.key}: restart, then {scale.clients} clients log in together")
        server.stop()
        start(server, variant)
        cpu_before = cpu_seconds(server)
        total, per_client = xmpp_load.login_storm(
            server.ip, server.c2s_port, HOST, [user(i) for i in range(scale.clients)], PASSWORD,
            scale.contacts)
        cpu_after = cpu_seconds(server)
        info["login_cpu_s"] = {k: cpu_after[k] - cpu_before[k] for k in cpu_after}
        info["login_s"] = total
        rows.append(report.Row(variant=variant.key, measure=f"{scale.clients}-client login e2e",
                               procs=scale.clients, calls=scale.clients, wall_s=total,
                               p50_ms=report.percentile(per_client, 0.50) * 1000,
                               p99_ms=report.percentile(per_client, 0.99) * 1000))
    finally:
        server.stop()
    info["elapsed_s"] = time.monotonic() - started
    log(f"{variant.key}: done in {info['elapsed_s']:.0f} s")
    return rows, info


def cpu_seconds(server: BenchServer) -> dict[str, float]:
    """CPU time (user + system) used so far by ejabberd's VM, by the program processes, and by
    this process (the load generator): where a phase's time went."""
    tick = os.sysconf("SC_CLK_TCK")

    def of(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    own = os.times()
    return {"ejabberd": of(server.process.pid),
            "program": sum(of(pid) for pid in program_pids(server.workdir / "roster-port.toml")),
            "client": own.user + own.system}


# --- Memory of the program processes with a big store ---------------------------------------------

def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def program_pids(config: Path) -> list[int]:
    """The `roster-port serve --config <config>` processes running now."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(config).encode() in argv:
            pids.append(int(entry.name))
    return sorted(pids)


def run_memory(variant: Variant, scale: Scale, base: Path, pg: PgServer | None,
               beam: Path) -> tuple[list[report.Row], list[report.MemoryRow]]:
    users = scale.rss_rows // scale.contacts
    log(f"{variant.key}: memory check, loading {users * scale.contacts:,} rows")
    server = make_server(variant, base / f"{variant.key}-memory", pg,
                         list(rosters(users, scale.contacts, ())))
    try:
        server.start(timeout=120)
        rows = results_of(variant, bench_call(
            server, beam, "touch",
            f"{erl_bin(HOST)}, {users}, {scale.contacts}, {scale.rss_samples}", PRINT_RESULTS))
        pids = program_pids(server.workdir / "roster-port.toml")
        if len(pids) != server.pool_size:
            raise RuntimeError(f"expected {server.pool_size} program processes, found {pids}")
        memory = [report.MemoryRow(variant=variant.key, rows=users * scale.contacts, pid=pid,
                                   rss_mb=rss_mb(pid)[0], peak_mb=rss_mb(pid)[1])
                  for pid in pids]
    finally:
        server.stop()
    return rows, memory


# --- The machine ------------------------------------------------------------------------------------

def machine(pg: PgServer | None) -> dict[str, str]:
    def first(pattern: str, text: str, default: str = "?") -> str:
        match = re.search(pattern, text, re.M)
        return match.group(1).strip() if match else default

    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    otp = subprocess.run(["erl", "-noshell", "-eval",
                          'io:format("~s", [erlang:system_info(otp_release)]), halt().'],
                         capture_output=True, text=True).stdout.strip()

    def deb(package: str) -> str:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                              capture_output=True, text=True).stdout.strip() or "?"

    import roster_port
    import slixmpp

    mem_gib = int(first(r"^MemTotal:\s*(\d+)", meminfo, "0")) / 1024 / 1024
    return {
        "CPU": first(r"^model name\s*:\s*(.*)$", cpuinfo),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_gib:.1f} GiB",
        "kernel": platform.release(),
        "ejabberd": deb("ejabberd"),
        "Erlang/OTP": f"{otp} (erlang-base {deb('erlang-base')})",
        "Python": platform.python_version(),
        "SQLite (Python)": sqlite3.sqlite_version,
        "SQLite (ejabberd, erlang-p1-sqlite3)": f"{deb('libsqlite3-0')} (system library)",
        "PostgreSQL": (f"{pg.version()} (throwaway cluster: {pg.settings()})" if pg else "-"),
        "erlang-p1-pgsql": deb("erlang-p1-pgsql"),
        "roster-port": roster_port.__version__,
        "slixmpp": slixmpp.__version__,
    }


# --- Main ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    global POOL_SIZE
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Stock mod_roster (Mnesia, SQL on SQLite and PostgreSQL) against "
                    "mod_roster_port (SQLite and PostgreSQL stores), side by side.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer users, shorter runs (about 3 minutes): for development")
    parser.add_argument("--variants", default=",".join(v.key for v in VARIANTS),
                        help="comma-separated subset of: %(default)s")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory check (big store for each roster-port variant)")
    parser.add_argument("--doc", type=Path,
                        help="the Markdown report to write (default: docs/benchmarks.md, or "
                             "var/bench/benchmarks-quick.md with --quick); the plot goes next "
                             "to it, same name, .png")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE,
                        help="program processes per host for the roster-port variants "
                             "(default: %(default)s, one per core of the reference machine)")
    parser.add_argument("--note", default="",
                        help="a sentence for the report (e.g. what else ran on the machine)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the report again from the results a run "
                             "saved (var/bench/results-*.json)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' directories (logs, stores) after the run")
    args = parser.parse_args(argv)

    scale = QUICK if args.quick else FULL
    POOL_SIZE = args.pool_size
    wanted = args.variants.split(",")
    variants = [v for v in VARIANTS if v.key in wanted]
    if len(variants) != len(wanted):
        parser.error(f"unknown variant in {args.variants!r}")
    doc = args.doc or (REPO / ("var/bench/benchmarks-quick.md" if args.quick
                               else "docs/benchmarks.md"))
    command = shlex.join(["bench/run", *(argv if argv is not None else sys.argv[1:])])
    if args.render:
        result = report.Report.from_json(args.render.read_text())
        print(result.text())
        result.write(doc, doc.with_suffix(".png"))
        log(f"wrote {doc} and {doc.with_suffix('.png')} from {args.render}")
        return 0

    base = Path(tempfile.mkdtemp(prefix="roster-bench-"))
    started = time.monotonic()
    pg = None
    rows: list[report.Row] = []
    memory: list[report.MemoryRow] = []
    infos: dict[str, dict] = {}
    ok = False
    try:
        beam = compile_bench_module(base)
        if any(v.engine == "pg" for v in variants):
            log("starting a throwaway PostgreSQL cluster")
            pg = PgServer()
        machine_info = machine(pg)
        for variant in variants:
            variant_rows, infos[variant.key] = run_variant(variant, scale, base, pg, beam)
            rows += variant_rows
        if not args.no_memory:
            for variant in variants:
                if variant.roster == "port":
                    touch_rows, variant_memory = run_memory(variant, scale, base, pg, beam)
                    rows += touch_rows
                    memory += variant_memory
        ok = True
    finally:
        if pg is not None:
            pg.destroy()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"the servers' directories are kept in {base}")

    elapsed = time.monotonic() - started
    result = report.Report(
        variants=[(v.key, v.label, v.roster, v.engine) for v in variants],
        rows=rows, memory=memory, infos=infos, machine=machine_info, command=command,
        quick=args.quick, scale=dataclasses.asdict(scale), elapsed_s=elapsed,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), note=args.note,
        pool_size=POOL_SIZE)
    saved = REPO / "var" / "bench" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(result.to_json())
    print(result.text())
    doc.parent.mkdir(parents=True, exist_ok=True)
    result.write(doc, doc.with_suffix(".png"))
    log(f"wrote {doc} and {doc.with_suffix('.png')} ({elapsed / 60:.1f} min in all); "
        f"the results are saved in {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
