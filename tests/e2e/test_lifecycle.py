"""mod_roster_port's lifecycle, end to end (real ejabberd 23.01, the real program, slixmpp
clients): the takeover of mod_roster survives a restart of mod_roster, a reload never leaves
a window in which rosters read empty or fail, options that would fail later are refused with
their message while ejabberd keeps serving, and a client that logs in right after ejabberd
starts gets its roster (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import slixmpp

from conftest import PASSWORD, _missing
from ejabberd_harness import EjabberdServer, _poll_until, roster_port_command
from xmpp_client import Client

from roster_port.replay import read_transcript

pytestmark = pytest.mark.e2e

HOST = "localhost"
# The bound the README gives for the repair of a restart of mod_roster (the guard's check
# interval); after `restart_module` it is a few ms, through mod_roster's call of init/2.
REPAIR_BOUND_S = 1.0


def requests_since(server: EjabberdServer, count: int) -> list[list]:
    """The requests the shim sent after the first `count` transcript records:
    [0, id, op, args] each."""
    entries = list(read_transcript(server.transcript_path))[count:]
    return [e.message for e in entries if e.direction == "in" and e.message[0] == 0]


def transcript_records(server: EjabberdServer) -> int:
    return sum(1 for _ in read_transcript(server.transcript_path))


def reload_config(server: EjabberdServer) -> str:
    """`ejabberdctl reload_config` after rewriting ejabberd.yml from the server's fields:
    "ok", or ejabberd's message saying why the new configuration was refused."""
    server.write_config()
    out = server.rpc(
        "Res = rpc:call(Node, ejabberd_config, reload, []), "
        'io:format("~nreload_config result: ~ts~n", [case Res of ok -> "ok"; '
        "_ -> rpc:call(Node, ejabberd_config, format_error, [Res]) end])")
    # Log lines of the reload (its process has the rpc's group leader, and the logger
    # writes them when it gets to them) come before or after the result: picked by its tag.
    [result] = [line.removeprefix("reload_config result: ") for line in out.splitlines()
                if line.startswith("reload_config result: ")]
    return result


class Results(list):
    """The results of get_in_a_loop; `await results.reach(n)` until there are n."""

    def __init__(self) -> None:
        super().__init__()
        self.grown = asyncio.Event()

    def append(self, item) -> None:
        super().append(item)
        self.grown.set()

    async def reach(self, count: int, timeout: float = 10) -> None:
        async def grown_enough():
            while len(self) < count:
                self.grown.clear()
                await self.grown.wait()
        await asyncio.wait_for(grown_enough(), timeout)


# -- 1. the takeover survives a restart of mod_roster ------------------------------------------

def test_restart_of_mod_roster_is_taken_over_again_within_the_bound(ejabberd, users, connect):
    """`ejabberdctl restart_module localhost mod_roster` re-adds mod_roster's hooks and IQ
    handler. Within the bound, ours are back alone: a roster set is pushed once (mod_roster's
    handler pushes a second time), an inbound subscription reaches the program once (as
    in_subscription, never as mod_roster's store_* state machine), roster gets are ours."""
    alice_jid, bob_jid = users("alice", "bob")
    # One rpc (starting an Erlang node costs ~1 s): restart mod_roster, then poll ejabberd's
    # own tables (not the shim's view of them) until no mod_roster handler is left, the data
    # hooks and the IQ handler being ours; the time from the restart's return to then.
    out = ejabberd.rpc(
        "Hooks = [roster_get, roster_in_subscription, roster_out_subscription, "
        "roster_get_jid_info, remove_user, c2s_self_presence, c2s_post_auth_features], "
        'H = <<"localhost">>, '
        "Ours = fun() -> "
        "  Ls = lists:append([L || K <- Hooks, {_, L} <- rpc:call(Node, ets, lookup, "
        "[hooks, {K, H}])]), "
        "  [x || {_, mod_roster, _} <- Ls] == [] "
        "  andalso length([x || {50, mod_roster_port_hooks, _} <- Ls]) == length(Hooks) "
        "  andalso rpc:call(Node, ets, lookup, [ejabberd_sm, {H, <<\"jabber:iq:roster\">>}]) "
        "== [{{H, <<\"jabber:iq:roster\">>}, roster_port_iq, process_iq}] end, "
        'Code = rpc:call(Node, mod_admin_extra, restart_module, [H, <<"mod_roster">>]), '
        "T0 = erlang:monotonic_time(millisecond), "
        "Wait = fun W() -> case Ours() of true -> ok; "
        "  false -> case erlang:monotonic_time(millisecond) - T0 > 3000 of true -> timeout; "
        "  false -> receive after 5 -> ok end, W() end end end, "
        "Got = Wait(), "
        'io:format("~p ~p ~p~n", [Code, Got, erlang:monotonic_time(millisecond) - T0])')
    code, got, elapsed_ms = out.split()
    assert code in ("0", "2"), out
    assert got == "ok", f"mod_roster's handlers still in place 3 s after its restart: {out}"
    assert int(elapsed_ms) <= REPAIR_BOUND_S * 1000, out
    ejabberd.wait_for_log("the takeover of mod_roster was undone")

    async def scenario():
        alice = await connect(alice_jid)
        bob = await connect(bob_jid)
        since = transcript_records(ejabberd)

        # The pushes of a roster set precede its result (both from the same process).
        await alice.roster_set("carol@localhost", name="Carol")
        assert len(alice.pushes_for("carol@localhost")) == 1, alice.pushes

        roster = await alice.roster_get()
        assert roster.items["carol@localhost"].name == "Carol"

        bob.send_subscription(alice_jid, "subscribe")
        await alice.wait_for(lambda c: c.presences_from(bob_jid, "subscribe"))

        def asked(op: str, user: str, **match) -> list[dict]:
            return [args for _, _, o, args in requests_since(ejabberd, since)
                    if o == op and args.get("user") == user
                    and all(args.get(k) == v for k, v in match.items())]

        # The transcript writer is asynchronous: wait for the last request.
        await asyncio.to_thread(_poll_until, lambda: asked("in_subscription", alice_jid), 5,
                                lambda: "alice's in_subscription is not in the transcript")
        assert len(asked("in_subscription", alice_jid, contact=bob_jid)) == 1
        assert len(asked("roster_iq", alice_jid, type="set")) == 1
        assert asked("roster_iq", alice_jid, type="get"), "the get was not ours"
        # mod_roster's own handlers reach the program through its storage: none of that.
        writes = [args for _, _, op, args in requests_since(ejabberd, since)
                  if op in ("store_set_item", "store_del_item", "store_get_item",
                            "store_read_version")]
        assert writes == []

    asyncio.run(scenario())


# -- 2. a reload without a window --------------------------------------------------------------

async def get_in_a_loop(client: Client, stop: threading.Event, results: list) -> None:
    """Until `stop`: a roster set renaming c1 (every fifth round), then roster gets back to
    back; each get's result timed: the item JIDs, with a "stale" mark when c1 does not have
    the last name set (the read cache, or another program, answered an old roster), or the
    error."""
    name, round_ = None, 0
    while not stop.is_set():
        try:
            if round_ % 5 == 0:
                name = f"c1-{round_}"
                await client.roster_set("c1@localhost", name=name)
            round_ += 1
            roster = await client.roster_get()
            items = sorted(roster.items or {})
            if name is not None and items and roster.items["c1@localhost"].name != name:
                items.append("stale")
            results.append((time.monotonic(), items))
        except slixmpp.exceptions.IqError as exc:
            results.append((time.monotonic(), f"error {exc.condition}"))
        except slixmpp.exceptions.IqTimeout:
            results.append((time.monotonic(), "timeout"))


CONTACTS = ["c1@localhost", "c2@localhost", "c3@localhost"]


def seed_roster(server: EjabberdServer, user: str) -> None:
    for contact in CONTACTS:
        server.store_execute_reported(
            "INSERT INTO roster_items (user, contact, subscription) VALUES (?, ?, 'both')",
            (user, contact))


def run_gets_around(server: EjabberdServer, jid: str, change) -> tuple[list, float, float, object]:
    """Logs `jid` in, does roster gets back to back, runs `change()` in a thread once some
    gets were answered, and goes on for 20 gets after it returned. The results, when the
    change started and ended, and what it returned."""

    async def scenario():
        client = Client(f"{jid}/loop", PASSWORD, server.c2s_port, server.ip)
        await client.connect(available=False)
        try:
            stop, results = threading.Event(), Results()
            loop = asyncio.create_task(get_in_a_loop(client, stop, results))
            await results.reach(5)
            started = time.monotonic()
            returned = await asyncio.to_thread(change)
            ended = time.monotonic()
            count = len(results)
            await results.reach(count + 20)
            stop.set()
            await loop
            return results, started, ended, returned
        finally:
            client.xmpp.disconnect()

    return asyncio.run(scenario())


def test_reload_keeps_rosters_served_throughout(ejabberd, users):
    """A reload (an option changed, `ejabberdctl reload_config`) while a client does roster
    gets back to back: no get answers an empty roster or an error, and the new pool (pool_size
    2 -> 3) serves afterwards, the old programs gone."""
    (alice_jid,) = users("alice")
    seed_roster(ejabberd, alice_jid)
    old_pids = set(ejabberd.program_pids())
    offset = ejabberd.log_size()

    def reload_with_three_programs() -> str:
        ejabberd.pool_size = 3
        return reload_config(ejabberd)

    results, started, ended, answer = run_gets_around(ejabberd, alice_jid,
                                                      reload_with_three_programs)
    bad = [(round(t - started, 3), r) for t, r in results if r != CONTACTS]
    assert bad == [], f"gets that were not the full roster (s after the reload began): {bad}"
    during = [r for t, r in results if started <= t <= ended]
    assert len(during) >= 3, "too few gets while the reload ran to say anything"
    assert answer == "ok"
    ejabberd.wait_for_log("reloaded; the new programs serve", offset=offset)
    assert ejabberd._log_count("speaks protocol", offset) == 3
    new_pids = set(ejabberd.program_pids())
    assert len(new_pids) == 3 and not new_pids & old_pids
    # The new pool's read cache is handed over once the old pool has stopped.
    assert ejabberd.rpc('io:format("~p~n", [rpc:call(Node, roster_port_cache, is_live, '
                        '[rpc:call(Node, roster_port_pool, cache, [<<"localhost">>])])])'
                        ).strip() == "true"


def test_failed_reload_leaves_the_running_pool_serving(tmp_path: Path):
    """A reload whose programs never say hello (a command that passes validation but cannot
    run) leaves the running programs serving, every get answered, with an error log."""
    if _missing():
        pytest.skip(_missing())
    server = EjabberdServer(tmp_path / "ejabberd", call_timeout_ms=1000)
    server.start()
    try:
        server.register("alice", password=PASSWORD)
        alice_jid = f"alice@{HOST}"
        seed_roster(server, alice_jid)
        old_pids = set(server.program_pids())
        offset = server.log_size()

        def reload_with_a_missing_program() -> str:
            server.module_options["command"] = json.dumps(
                f"{tmp_path / 'no-such-program'} serve --config "
                f"{server.workdir / 'roster-port.toml'}")
            return reload_config(server)

        results, started, _, answer = run_gets_around(server, alice_jid,
                                                      reload_with_a_missing_program)
        bad = [(round(t - started, 3), r) for t, r in results if r != CONTACTS]
        assert bad == [], f"gets that were not the full roster: {bad}"
        assert set(server.program_pids()) == old_pids
        assert answer == "ok"
        server.wait_for_log("reload failed: the new programs did not all answer their hello",
                            offset=offset)

        # What the error says to do: fix the cause (here: the program is installed where
        # the new command says), then restart the module, which takes the new options.
        program = tmp_path / "no-such-program"
        program.write_text(f"#!/bin/sh\nexec {roster_port_command()} \"$@\"\n")
        program.chmod(0o755)
        offset = server.log_size()
        server.rpc('0 = rpc:call(Node, mod_admin_extra, restart_module, '
                   '[<<"localhost">>, <<"mod_roster_port">>])')
        server.wait_for_log("speaks protocol", count=server.pool_size, offset=offset)
        assert not set(server.program_pids()) & old_pids

        async def served():
            alice = Client(f"{alice_jid}/after", PASSWORD, server.c2s_port, server.ip)
            await alice.connect()
            try:
                assert sorted((await alice.roster_get()).items) == CONTACTS
            finally:
                alice.xmpp.disconnect()

        asyncio.run(served())
    finally:
        server.stop()


# -- 3. options that would fail later are refused ----------------------------------------------

def test_options_that_would_fail_later_are_refused_and_ejabberd_keeps_serving(
        ejabberd, users, connect, tmp_path: Path):
    """Each value is refused by `reload_config` with its message; the running options stay,
    and rosters are served by the same programs all along."""
    (alice_jid,) = users("alice")
    seed_roster(ejabberd, alice_jid)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        ("command", '""', "the command is empty"),
        ("command", "[]", "the command is empty"),
        ("command", '["roster-port", ""]', "an element of the command is an empty string"),
        ("transcript", '""', "the path is empty: write undefined for no transcript"),
        ("transcript", json.dumps(str(a_file / "transcript")),
         f"cannot write the file {a_file / 'transcript'}"),
        ("call_timeout", "1", "1 ms is too short: the minimum is 1000 ms"),
        ("call_timeout", "999", "999 ms is too short"),
        ("journal_dir", '""', "the path is empty: write undefined"),
        ("journal_dir", json.dumps(str(a_file / "journal")),
         f"cannot write in the directory {a_file / 'journal'}"),
        ("journal_max_entries", "0", "Expected positive integer"),
    ]
    pids = set(ejabberd.program_pids())
    for option, value, message in cases:
        ejabberd.module_options = {option: value}
        answer = reload_config(ejabberd)
        assert f"mod_roster_port->{option}" in answer and message in answer, (option, value,
                                                                             answer)
    # Still the same programs, serving.
    assert set(ejabberd.program_pids()) == pids

    async def scenario():
        alice = await connect(alice_jid)
        assert sorted((await alice.roster_get()).items) == CONTACTS

    asyncio.run(scenario())
    # And values at the limits are taken.
    ejabberd.module_options = {"call_timeout": "1000",
                               "journal_dir": json.dumps(str(tmp_path / "journal"))}
    assert reload_config(ejabberd) == "ok"


def test_mod_roster_without_db_type_port_is_reported_and_rosters_still_served(tmp_path: Path):
    if _missing():
        pytest.skip(_missing())
    server = EjabberdServer(tmp_path / "ejabberd", roster_db_type="mnesia")
    server.start()
    try:
        server.wait_for_log(f"roster-port {HOST}: mod_roster runs with db_type: mnesia, not port")
        server.register("alice", password=PASSWORD)
        seed_roster(server, f"alice@{HOST}")

        async def scenario():
            alice = Client(f"alice@{HOST}/t", PASSWORD, server.c2s_port, server.ip)
            await alice.connect()
            try:
                assert sorted((await alice.roster_get()).items) == CONTACTS
            finally:
                alice.xmpp.disconnect()

        asyncio.run(scenario())
    finally:
        server.stop()


# -- 4. mod_roster_port stopped alone ----------------------------------------------------------

def test_mod_roster_port_stopped_alone_answers_errors_not_empty_rosters(ejabberd, users, connect):
    """mod_roster gets its hooks back, but its storage (db_type: port) has no program any
    more: a roster get must fail (internal-server-error, wait), never answer an empty roster,
    and the log says what happened."""
    (alice_jid,) = users("alice")
    seed_roster(ejabberd, alice_jid)
    ejabberd.rpc('ok = rpc:call(Node, gen_mod, stop_module_keep_config, '
                 '[<<"localhost">>, mod_roster_port])')

    async def scenario():
        alice = await connect(alice_jid)
        with pytest.raises(slixmpp.exceptions.IqError) as err:
            await alice.roster_get()
        assert (err.value.condition, err.value.etype) == ("internal-server-error", "wait")

    asyncio.run(scenario())
    ejabberd.wait_for_log("mod_roster_port stopped while mod_roster stays")


# -- 5. a client right after ejabberd starts ---------------------------------------------------

STARTS = 10


def logins_right_after_start(server: EjabberdServer, fresh_store, tmp_path: Path) -> None:
    """STARTS starts of `server`, each returning as soon as ejabberd listens (not waiting for
    the programs' hello); a client logs in at once and must get its roster, never an error.
    Even starts are on a fresh store (`fresh_store()`), as the issue measured: the program
    creates its schema first, the roster is empty, then one item is set. Odd starts keep the
    store (that item), and their programs start 0.5 s late (a wrapper script: a loaded
    machine), so that the client's get surely comes before any hello."""
    late = tmp_path / "late-program"
    late.write_text("#!/bin/sh\nsleep 0.5\nexec "
                    f"{roster_port_command()} serve --config {server.workdir / 'roster-port.toml'}\n")
    late.chmod(0o755)
    server.start()
    server.register("alice", password=PASSWORD)
    server.stop()
    failures = []
    for start in range(STARTS):
        fresh = start % 2 == 0
        if fresh:
            fresh_store()
        server.command = None if fresh else str(late)
        server.start(wait_for_programs=False)
        try:
            async def login():
                alice = Client(f"alice@{HOST}/t", PASSWORD, server.c2s_port, server.ip)
                t0 = time.monotonic()
                await alice.connect()
                try:
                    try:
                        got = sorted((await alice.roster_get()).items)
                    except slixmpp.exceptions.IqError as exc:
                        got = f"{exc.condition} after {time.monotonic() - t0:.2f} s"
                    if fresh:  # the next start's roster (the program is up by now)
                        try:
                            await alice.roster_set("bob@localhost", name="Bob")
                        except slixmpp.exceptions.IqError as exc:
                            return f"start {start}: the set failed: {exc.condition}"
                    want = [] if fresh else ["bob@localhost"]
                    return None if got == want else f"start {start}: {got}, not {want}"
                finally:
                    alice.xmpp.disconnect()

            failure = asyncio.run(login())
            if failure:
                failures.append(failure)
        finally:
            server.stop()
    assert failures == [], failures


def test_login_right_after_start_gets_its_roster_on_sqlite(tmp_path: Path):
    if _missing():
        pytest.skip(_missing())
    server = EjabberdServer(tmp_path / "ejabberd")

    def fresh_store():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{server.store_path}{suffix}").unlink(missing_ok=True)

    logins_right_after_start(server, fresh_store, tmp_path)


@pytest.mark.postgres
def test_login_right_after_start_gets_its_roster_on_postgres(tmp_path: Path, pg_server):
    if _missing():
        pytest.skip(_missing())
    schemas: list[str] = []
    server = EjabberdServer(tmp_path / "ejabberd")

    def fresh_store():
        schemas.append(pg_server.create_schema())
        server.store_section = (f'backend = "postgres"\n'
                                f'dsn = {json.dumps(pg_server.dsn(schemas[-1]))}\n')

    fresh_store()
    try:
        logins_right_after_start(server, fresh_store, tmp_path)
    finally:
        for schema in schemas:
            pg_server.drop_schema(schema)
