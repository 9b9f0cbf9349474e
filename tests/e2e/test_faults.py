"""Faults under load, end to end (issue 10): every subscription applied on both sides or on
neither, nothing acknowledged lost, errors only while the fault lasts, recovery within 1 s.

Real ejabberd 23.01 (tests/e2e/ejabberd_harness.py, pool_size 2), the real roster-port
programs, both stores (SQLite; PostgreSQL on a throwaway cluster of this module's own, even
when $ROSTER_PORT_TEST_PG_DSN names a server: the outages stop and start it with pg_ctl),
and 20 real slixmpp clients doing a steady mix of roster
sets, roster gets and subscription handshakes (tests/e2e/faults.py has the load, the injectors
and the checker, and says what each figure means). Each fault gets users of its own, so a
fault's leftovers never count against the next; one ejabberd serves a store's faults one after
the other, as a production server would live through them, and is started afresh after a fault
whose checks failed.

Each test prints nothing on success; the module prints the table of figures at its end and
writes it, with a summary of both logs' warnings and errors during each fault, to
$ROSTER_PORT_FAULT_FIGURES (default: fault-figures.md in pytest's base temporary directory),
for docs/reliability.md. Run alone: .venv/bin/python -m pytest tests/e2e/test_faults.py -q
(about 140 s on two cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from pathlib import Path

import pytest

import pg_cluster
from conftest import _missing
from ejabberd_harness import EjabberdServer
from faults import (
    PASSWORD, Figures, Load, StoreReader, Window, check, crashes, hellos, in_thread,
    journal_pending, kill, log_offsets, log_summary, logs_text, now, pid_alive, poll,
    problems_now, program_of_worker, table, wait_for_hellos, workers_of,
)

pytestmark = pytest.mark.e2e

POOL_SIZE = 2
CALL_TIMEOUT_MS = 3000
T = CALL_TIMEOUT_MS / 1000
USERS_PER_FAULT = 20
# The store is locked for longer than call_timeout.
LOCK_S = T + 2
# A program SIGSTOPped is found by the shim's ping (at once when a request passes its
# deadline, every 10 s otherwise) within call_timeout; killed then, restarted.
FREEZE_BOUND_S = 4 * T + 15
# Presences sent around a kill -9 (up to KILL_BURST just before and as many just after),
# that many times.
KILL_ROUNDS = 8
KILL_BURST = 5
# Once the fault is over and the load stopped: the journal must empty within this, then the
# handshake steps still in flight must be delivered within STEP_GRACE_S.
JOURNAL_BOUND_S = 30
STEP_GRACE_S = 3
SETTLE_S = 3

FAULTS = {  # name: (test id, prefix of the fault's users)
    "kill -9 one program": ("kill_one", "ko"),
    "kill -9 every program": ("kill_all", "ka"),
    "presence sent as a program dies": ("presence_at_kill", "pk"),
    "one program frozen": ("frozen", "fz"),
    "store locked": ("store_locked", "lk"),
    "PostgreSQL down 10 s": ("pg_down_10s", "pa"),
    "PostgreSQL down 40 s": ("pg_down_40s", "pb"),
    "ejabberd restarted": ("ejabberd_restart", "rs"),
}
SQLITE_FAULTS = [f for f in FAULTS if not f.startswith("PostgreSQL")]
POSTGRES_FAULTS = list(FAULTS)
CASES = ([pytest.param("sqlite", f, id=f"sqlite-{FAULTS[f][0]}") for f in SQLITE_FAULTS]
         + [pytest.param("postgres", f, id=f"postgres-{FAULTS[f][0]}",
                         marks=pytest.mark.postgres) for f in POSTGRES_FAULTS])


def fault_users(fault: str, host: str) -> list[str]:
    return [f"{FAULTS[fault][1]}{i:02d}@{host}" for i in range(USERS_PER_FAULT)]


class Stack:
    """ejabberd with its programs on one store, and what the injectors need of it."""

    def __init__(self, store: str, workdir: Path, pg: pg_cluster.TestServer | None) -> None:
        self.store, self.pg = store, pg
        self.dsn = None
        store_section = None
        if store == "postgres":
            schema = pg.create_schema()
            self.dsn = pg.dsn(schema)
            store_section = f'backend = "postgres"\ndsn = {json.dumps(self.dsn)}\n'
        self.server = EjabberdServer(workdir, pool_size=POOL_SIZE, call_timeout_ms=CALL_TIMEOUT_MS,
                                     store_section=store_section)
        self.reader = (StoreReader(sqlite_path=self.server.store_path) if store == "sqlite"
                       else StoreReader(pg_dsn=self.dsn))
        self.server.start()
        faults = SQLITE_FAULTS if store == "sqlite" else POSTGRES_FAULTS
        names = [u.split("@")[0] for f in faults for u in fault_users(f, self.server.host)]
        self.server.register(*names, password=PASSWORD)

    def restart(self) -> None:
        self.server.stop()
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class Stacks:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.current: Stack | None = None
        self.pg: pg_cluster.TestServer | None = None
        self.dirty = False

    def get(self, store: str) -> Stack:
        if self.current is not None and self.current.store != store:
            self.current.stop()
            self.current = None
        if self.current is None:
            pg = None
            if store == "postgres":
                if self.pg is None:
                    cluster = pg_cluster.ThrowawayCluster.start_new()
                    self.pg = pg_cluster.TestServer(cluster.admin_dsn, cluster)
                pg = self.pg
            self.current = Stack(store, self.base / store, pg)
        elif self.dirty:
            # The last fault's checks failed: this one starts from a fresh ejabberd.
            self.current.restart()
        self.dirty = False
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
        if self.pg is not None:
            if self.pg.cluster is not None and not self.pg.cluster.running:
                self.pg.cluster.start()
            self.pg.stop()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    manager = Stacks(tmp_path_factory.mktemp("faults"))
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    figures: list[Figures] = []
    yield figures
    if not figures:
        return
    text = table(figures)
    path = Path(os.environ.get("ROSTER_PORT_FAULT_FIGURES")
                or tmp_path_factory.getbasetemp() / "fault-figures.md")
    path.write_text(text + "\n\n## Logs\n\n" + logs_text(figures) + "\n")
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"fault figures (also in {path}):")
        for line in text.splitlines():
            reporter.write_line(line)


# --- the faults ------------------------------------------------------------------------------

async def inject_kill(stack: Stack, load: Load, indices: set[int]) -> list[Window]:
    server = stack.server
    pids = {i: program_of_worker(server, i) for i in indices}
    offset = server.log_size()
    start = now()
    for pid in pids.values():
        kill(pid)
    back = await wait_for_hellos(server, offset, indices, timeout=30)
    end = max(back.values()) if set(back) == indices else None
    return [Window(start, end, f"programs {pids} killed; back: {sorted(back)}")]


async def kill_one(stack, load):
    return await inject_kill(stack, load, {2})


async def kill_all(stack, load):
    return await inject_kill(stack, load, set(range(1, POOL_SIZE + 1)))


async def presence_as_program_dies(stack: Stack, load: Load) -> list[Window]:
    """KILL_ROUNDS times, one program is killed while subscription presences it serves are on
    their way: pairs whose sender it serves (its out_subscription on the dying program) send
    their next step just before the kill -9, pairs whose receiver it serves (the contact's
    in_subscription) just after; then the program comes back and every step is delivered."""
    server = stack.server
    windows = []
    served = workers_of(server, load.users, POOL_SIZE)
    await load.enter_burst_mode()
    on_killed, gaps = 0, []
    for round_ in range(KILL_ROUNDS):
        index = 1 + round_ % POOL_SIZE
        # Until the last round's steps are delivered (a step never delivered is left out).
        await load.pairs_idle(timeout=2 * T + 3)
        idle = [p for p in load.pairs if not p.stopped and p.pending is None]
        load.rng.shuffle(idle)
        before = [p for p in idle if served[p.next_step()[3].user] == index][:KILL_BURST]
        after = [p for p in idle if p not in before
                 and served[p.next_step()[4].user] == index][:KILL_BURST]
        pid = program_of_worker(server, index)
        offset = server.log_size()
        mark = len(load.presence_sends)
        await load.burst(before)
        start = now()
        kill(pid)
        await load.burst(after)
        sends = load.presence_sends[mark:]
        on_killed += len(sends)
        gaps += [abs(t - start) for t, _, _ in sends]
        back = await wait_for_hellos(server, offset, {index}, timeout=30)
        windows.append(Window(start, back.get(index), f"round {round_}: program {pid}"))
        if index not in back:
            break
    await load.pairs_idle(timeout=2 * T + 3)
    load.leave_burst_mode()
    gaps.sort()
    if gaps:
        load.notes.append(
            f"{on_killed} presences sent to or from a program around its kill -9, "
            f"{len(windows)} kills; time between send and kill: median "
            f"{gaps[len(gaps) // 2] * 1000:.0f} ms, max {gaps[-1] * 1000:.0f} ms")
    return windows


async def frozen(stack: Stack, load: Load) -> list[Window]:
    server = stack.server
    index = 1
    pid = program_of_worker(server, index)
    offset = server.log_size()
    start = now()
    kill(pid, signal.SIGSTOP)
    try:
        detected = await poll(lambda: not pid_alive(pid) and index in hellos(server, offset),
                              FREEZE_BOUND_S)
    finally:
        if pid_alive(pid):  # never leave a stopped process behind
            kill(pid)
    note = f"program {pid} frozen"
    if not detected:
        note += f"; not killed by the shim within {FREEZE_BOUND_S} s: killed by the test"
    back = await wait_for_hellos(server, offset, {index}, timeout=30)
    return [Window(start, back.get(index), note)]


async def store_locked(stack: Stack, load: Load) -> list[Window]:
    if stack.store == "sqlite":
        # Another application holds SQLite's write lock (tests/test_concurrency.py).
        holder = sqlite3.connect(stack.server.store_path, isolation_level=None, timeout=30,
                                 check_same_thread=False)
        try:
            await in_thread(holder.execute, "BEGIN IMMEDIATE")
            start = now()
            await load.pause(LOCK_S)   # the fault's duration, while the load runs
        finally:
            await in_thread(holder.close)   # a rollback
        return [Window(start, now(), f"SQLite write lock held {LOCK_S} s")]
    import psycopg

    # The operator's application holds a row lock on some users' rosters.
    locked = load.users[::5]
    holder = await in_thread(psycopg.connect, stack.dsn)
    try:
        await in_thread(holder.execute, "SELECT 1 FROM roster_versions WHERE username = ANY(%s) "
                                        "FOR UPDATE", (locked,))
        start = now()
        await load.pause(LOCK_S)
    finally:
        await in_thread(holder.close)   # a rollback
    return [Window(start, now(), f"row locks on {len(locked)} users held {LOCK_S} s")]


async def pg_down(stack: Stack, load: Load, seconds: float) -> list[Window]:
    cluster = stack.pg.cluster
    start = now()
    try:
        await in_thread(cluster.stop)
        await load.pause(start + seconds - now())   # the fault's duration, while the load runs
    finally:
        await in_thread(cluster.start)
    return [Window(start, now(), f"PostgreSQL stopped {seconds} s")]


async def ejabberd_restarted(stack: Stack, load: Load) -> list[Window]:
    server = stack.server
    load.server_down()
    start = now()
    try:
        await in_thread(server.stop)
        await in_thread(server.start)
    finally:
        load.server_up()
    end = now()
    return [Window(start, end, "ejabberd stopped and started; clients reconnect")]


INJECTORS = {
    "kill -9 one program": kill_one,
    "kill -9 every program": kill_all,
    "presence sent as a program dies": presence_as_program_dies,
    "one program frozen": frozen,
    "store locked": store_locked,
    "PostgreSQL down 10 s": lambda s, l: pg_down(s, l, 10),
    "PostgreSQL down 40 s": lambda s, l: pg_down(s, l, 40),
    "ejabberd restarted": ejabberd_restarted,
}


async def run_fault(stack: Stack, fault: str) -> Figures:
    began = now()
    server = stack.server
    figures = Figures(stack.store, fault,
                      reads_must_not_fail=fault in ("kill -9 one program",
                                                    "presence sent as a program dies"))
    load = Load(fault_users(fault, server.host), server.ip, server.c2s_port, server.host)
    offsets = log_offsets(server)
    try:
        await load.connect()
        load.start()
        if not await load.warmed_up():
            figures.notes.append("the load did not warm up")
        figures.windows = await INJECTORS[fault](stack, load)
        ends = [w.end for w in figures.windows]
        if None not in ends:
            await load.recovered(max(ends))
        drained_at = now()
        # Steps in flight may still be delivered while the journal empties.
        await load.drain(step_grace=JOURNAL_BOUND_S)
        pending: int | None = None

        def journal_empty() -> bool:
            nonlocal pending
            pending = journal_pending(server)
            return pending in (None, 0)

        emptied = await poll(lambda: in_thread(journal_empty), JOURNAL_BOUND_S, interval=0.2)
        figures.journal = "absent" if pending is None else f"{pending} pending"
        await load.pairs_done(STEP_GRACE_S)
        rows: dict = {}

        async def settled() -> bool:
            nonlocal rows
            rows = await in_thread(stack.reader.rows, load.users)
            return not problems_now(load, rows)

        # Something may still be on its way: the store is read again until it agrees.
        await poll(settled, SETTLE_S, interval=0.1)
        if emptied:
            figures.quiescent_s = now() - drained_at
        final = await load.final_gets()
        check(figures, load, rows, final)
        figures.notes.extend(load.notes)
        workdir = server.workdir
        figures.crashes = crashes([(workdir / name, offsets[name])
                                   for name in ("ejabberd.log", "error.log", "erlang.out")])
        figures.shim_log = log_summary(workdir / "ejabberd.log", offsets["ejabberd.log"],
                                       ("[warning]", "[error]"))
        figures.program_log = log_summary(workdir / "roster-port.log",
                                          offsets["roster-port.log"], (" WARNING ", " ERROR "))
    finally:
        await load.close()
    figures.duration_s = now() - began
    return figures


@pytest.mark.parametrize("store,fault", CASES)
def test_fault(store, fault, stacks, report):
    stack = stacks.get(store)
    stacks.dirty = True   # until the fault's checks pass
    figures = asyncio.run(run_fault(stack, fault))
    report.append(figures)
    problems = figures.failures()
    stacks.dirty = bool(problems)
    summary = table([figures])
    assert not problems, (f"{store}, {fault}:\n" + "\n".join(problems)
                          + f"\nnotes: {figures.notes}\n{summary}\nlogs: {stack.server.workdir}")
