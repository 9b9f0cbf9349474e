"""A real ejabberd 23.01 (Debian 12's) with mod_roster_port, run from a directory.

The one place that knows how to configure and run ejabberd for roster-port: the
end-to-end fixture (tests/e2e/conftest.py) and `scripts/start` both use it.

    server = EjabberdServer(workdir)      # writes nothing yet
    server.start()                        # config files, then ejabberd; waits until it listens
    server.register("alice", "secret")
    ...
    server.stop()                         # SIGTERM: ejabberd stops its modules, the pool
                                          # closes the programs' stdin, they exit

Files in `workdir`: ejabberd.yml, roster-port.toml, roster.sqlite (the store),
ejabberd.log, roster-port.log (the program's own log), erlang.out (the VM's
stdout/stderr: crash reports, and the program's stderr, which it inherits),
transcript.msgpack (every frame exchanged), spool/ (Mnesia: accounts).

Run as a script it is `scripts/start`'s server:
    python tests/e2e/ejabberd_harness.py --dir var --port 5222 --user alice --user bob
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIM_EBIN = REPO / "erlang_shim" / "ebin"
# Where the metrics listener serves (EjabberdServer.metrics_http).
METRICS_PATH = "/roster-port/metrics"
# Debian 12's layout; ERL_LIBS lets the VM find ejabberd's application there.
EJABBERD_LIBS = Path("/usr/lib/x86_64-linux-gnu")


def _poll_until(condition, timeout: float, failure) -> None:
    """Until `condition()` holds, read again every 50 ms (what it reads, ejabberd's or the
    program's log files and the shim's transcript, wakes nobody); AssertionError(failure())
    once `timeout` seconds have passed without."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def roster_port_command() -> Path:
    for candidate in (REPO / ".venv" / "bin" / "roster-port",):
        if candidate.exists():
            return candidate
    found = shutil.which("roster-port")
    if not found:
        raise RuntimeError("roster-port is not installed: run scripts/bootstrap")
    return Path(found)


@dataclass
class EjabberdServer:
    workdir: Path
    host: str = "localhost"
    c2s_port: int = 0                  # 0: a free port is picked
    ip: str = "127.0.0.1"
    pool_size: int = 2
    call_timeout_ms: int = 5000
    transcript: bool = True
    # mod_roster_port's read cache (`cache` / `cache_size` options).
    cache: bool = True
    cache_size: int = 100000
    # Overrides the program's command (tests of a missing or failing program); then start()
    # does not wait for the programs' hello.
    command: str | None = None
    # The program's [store] section (TOML, without the header), e.g. PostgreSQL shared by
    # several servers; None: the SQLite file store_path.
    store_section: str | None = None
    # The program's [roster] section (TOML, without the header); None: no section (defaults).
    roster_section: str | None = None
    # "port" (default): mod_roster on db_type port, served by mod_roster_port and the program.
    # "sql": stock ejabberd, mod_roster on db_type sql (mod_roster_sql) and no mod_roster_port
    # nor program at all; needs `sql` (the database ejabberd's own tables are in).
    roster_backend: str = "port"
    # ejabberd's top-level sql_* options without the prefix (type, server, port, database,
    # username, password...), e.g. {"type": "pgsql", "server": "127.0.0.1", ...}; None: none.
    sql: dict[str, str | int] | None = None
    # More virtual hosts served by the same node (each gets its own shim pool, all the same
    # program configuration), and ejabberd's `new_sql_schema` (pg.new.sql: server_host columns,
    # several hosts in one database) for its own sql_* database.
    extra_hosts: tuple[str, ...] = ()
    new_sql_schema: bool = False
    # mod_roster's db_type in the "port" variant (a test of the check that it is port).
    roster_db_type: str = "port"
    # mod_roster_port options as YAML text, {"journal_dir": '"/var/x"'}: each replaces the
    # line the fields above make for that option, or is added (tests of option validation).
    module_options: dict[str, str] = field(default_factory=dict)
    # Loads mod_shared_roster (its groups in Mnesia; tests create them through its API).
    shared_roster: bool = False
    # An ejabberd_http listener on `ip` serving mod_roster_port_metrics at METRICS_PATH
    # (tests of the metrics); off by default. 0: a free port is picked.
    metrics_http: bool = False
    metrics_port: int = 0
    node: str = field(default_factory=lambda: f"rosterport_{secrets.token_hex(4)}")
    cookie: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        if not self.c2s_port:
            self.c2s_port = free_port()
        if self.metrics_http and not self.metrics_port:
            self.metrics_port = free_port()

    # -- files ------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "ejabberd.log"

    @property
    def program_log_path(self) -> Path:
        return self.workdir / "roster-port.log"

    @property
    def transcript_path(self) -> Path:
        return self.workdir / "transcript.msgpack"

    @property
    def store_path(self) -> Path:
        return self.workdir / "roster.sqlite"

    def roster_port_toml(self) -> str:
        store = self.store_section or f'backend = "sqlite"\npath = "{self.store_path}"\n'
        roster = f"\n[roster]\n{self.roster_section}" if self.roster_section is not None else ""
        return (
            "[store]\n"
            f"{store}"
            f"{roster}"
            "\n[log]\n"
            'level = "info"\n'
            f'file = "{self.program_log_path}"\n'
        )

    def ejabberd_yml(self) -> str:
        command = self.command or (
            f"{roster_port_command()} serve --config {self.workdir / 'roster-port.toml'}")
        transcript = f'"{self.transcript_path}"' if self.transcript else "undefined"
        sql = "".join(f"sql_{key}: {value if isinstance(value, int) else json.dumps(value)}\n"
                      for key, value in (self.sql or {}).items())
        if self.new_sql_schema:
            sql += "new_sql_schema: true\n"
        hosts = "".join(f'  - "{host}"\n' for host in (self.host, *self.extra_hosts))
        if self.roster_backend == "sql":
            roster_modules = """  # Stock ejabberd: mod_roster_sql on the sql_* database, no roster-port.
  mod_roster:
    db_type: sql
    versioning: true
    store_current_id: true
"""
        else:
            roster_modules = f"""  mod_roster:
    db_type: {self.roster_db_type}
    versioning: true
    # mod_roster's own pushes (ejabberdctl roster commands) then carry the
    # program's version instead of a hash of its own.
    store_current_id: true
  mod_roster_port:
    command: "{command}"
    pool_size: {self.pool_size}
    call_timeout: {self.call_timeout_ms}
    transcript: {transcript}
    cache: {"true" if self.cache else "false"}
    cache_size: {self.cache_size}
"""
            for key, value in self.module_options.items():
                line = f"    {key}: {value}\n"
                roster_modules, replaced = re.subn(rf"(?m)^    {re.escape(key)}: .*\n",
                                                   lambda _: line, roster_modules)
                if not replaced:
                    roster_modules += line
        if self.shared_roster:
            roster_modules += "  mod_shared_roster: {}\n"
        metrics_listener = f"""  -
    port: {self.metrics_port}
    ip: "{self.ip}"
    module: ejabberd_http
    request_handlers:
      "{METRICS_PATH}": mod_roster_port_metrics
""" if self.metrics_http else ""
        # JSON strings are valid YAML scalars: no quoting surprises in paths.
        return f"""# Generated by tests/e2e/ejabberd_harness.py; edits are overwritten.
hosts:
{hosts}loglevel: info
log_rotate_count: 0
{sql}auth_method: internal
auth_password_format: plain
listen:
  -
    port: {self.c2s_port}
    ip: "{self.ip}"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
{metrics_listener}acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
modules:
  mod_disco: {{}}
  mod_ping: {{}}
  # ejabberdctl's roster commands (add_rosteritem...), which write through mod_roster's
  # storage backend (db_type: port).
  mod_admin_extra: {{}}
  mod_caps: {{}}
  # mod_pubsub sits on roster_in_subscription at the shim's sequence and always answers
  # true: loaded here so that the tests show the shim's answer wins.
  mod_pubsub:
    plugins:
      - flat
      - pep
{roster_modules}"""

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "spool").mkdir(exist_ok=True)
        (self.workdir / "roster-port.toml").write_text(self.roster_port_toml())
        (self.workdir / "ejabberd.yml").write_text(self.ejabberd_yml())

    # -- running ----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ERL_LIBS=str(EJABBERD_LIBS),
            EJABBERD_CONFIG_PATH=str(self.workdir / "ejabberd.yml"),
            EJABBERD_LOG_PATH=str(self.log_path),
            HOME=env.get("HOME", str(self.workdir)),
        )
        return env

    def start(self, timeout: float = 30.0, wait_for_programs: bool = True) -> None:
        """Writes the configuration and starts ejabberd; returns once it accepts
        connections and (unless not `wait_for_programs`) every program said hello."""
        if not (SHIM_EBIN / "mod_roster_port.beam").exists():
            raise RuntimeError(f"the shim is not built ({SHIM_EBIN}): run make -C erlang_shim")
        self.write_config()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = open(self.workdir / "erlang.out", "ab")
        self.process = subprocess.Popen(
            [
                "erl", "-sname", self.node, "-setcookie", self.cookie, "-noinput",
                "-pa", str(SHIM_EBIN),
                "-mnesia", "dir", f'"{self.workdir / "spool"}"',
                "-s", "ejabberd",
            ],
            cwd=self.workdir, env=self._env(),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the VM
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ejabberd exited with {self.process.returncode}: "
                                   f"see {self.workdir / 'erlang.out'} and {self.log_path}"
                                   f"{self._start_failure_tail()}")
            # Up means: ejabberd listens and every program of the pool said hello.
            if (self._listening()
                    and self._log_count("Start accepting TCP connections", log_offset) >= 1
                    and (not wait_for_programs or self.command is not None
                         or self.roster_backend != "port"
                         or self._log_count("speaks protocol", log_offset)
                         >= self.pool_size * (1 + len(self.extra_hosts)))):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"ejabberd did not start within {timeout} s: see {self.log_path}"
                           f"{self._start_failure_tail()}")

    def _start_failure_tail(self, lines: int = 15) -> str:
        """The ends of erlang.out and ejabberd.log, for the error of a failed start: pytest's
        tmp_path may be gone (rotated by later runs) when someone reads the failure."""
        parts = []
        for path in (self.workdir / "erlang.out", self.log_path):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            parts.append(f"\n--- {path.name} (last {lines} lines) ---\n" + "\n".join(tail))
        return "".join(parts)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.ip, self.c2s_port), timeout=0.5):
                return True
        except OSError:
            return False

    def _log_count(self, text: str, offset: int = 0) -> int:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace").count(text)
        except FileNotFoundError:
            return 0

    @property
    def node_name(self) -> str:
        """The Erlang node's full name (`-sname` on this machine's short host name)."""
        return f"{self.node}@{socket.gethostname().split('.')[0]}"

    def join_cluster(self, first: "EjabberdServer", timeout: float = 60.0) -> None:
        """Makes this running node join `first`'s cluster as `ejabberdctl join_cluster` does
        (ejabberd_admin:join_cluster/1: ejabberd stops here, this node's Mnesia is replaced by
        a copy of `first`'s (accounts, sessions, routes: all cluster-wide from then on), and
        ejabberd starts again). Opt-in: a server is a cluster of one unless this is called.
        Both servers must have been made with the same `cookie`. Returns once each node lists
        both in ejabberd_cluster:get_nodes() and this node's pool said hello again."""
        if self.cookie != first.cookie:
            raise ValueError("nodes of one cluster need the same cookie")
        offset = self.log_size()
        out = self.rpc(
            "io:format(\"~p~n\", [rpc:call(Node, ejabberd_admin, join_cluster, "
            f"[<<\"{first.node_name}\">>], {int(timeout * 1000)})])", timeout=timeout + 10)
        if out.strip() != "ok":
            raise RuntimeError(f"join_cluster {first.node_name} failed: {out.strip()}")
        self.wait_for_log("speaks protocol", count=self.pool_size, offset=offset,
                          timeout=timeout)
        both = sorted([self.node_name, first.node_name])
        _poll_until(lambda: self.cluster_nodes() == both == first.cluster_nodes(), timeout,
                    lambda: f"the cluster is not {both}: {self.cluster_nodes()}")

    def cluster_nodes(self) -> list[str]:
        """The running nodes of this node's cluster (ejabberd_cluster:get_nodes/0), sorted."""
        out = self.rpc('io:format("~s~n", [lists:join(" ", [atom_to_list(N) || N <- '
                       'lists:sort(rpc:call(Node, ejabberd_cluster, get_nodes, []))])])')
        return out.split()

    def kill(self) -> None:
        """Kills the VM (SIGKILL: no module stops, no Mnesia sync, sessions die with the TCP
        connections) and its programs, which see EOF on stdin."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def rpc(self, erlang_expr: str, timeout: float = 30.0) -> str:
        """Evaluates `erlang_expr` (which may use the variable Node) from a hidden node and
        returns what it prints with io:format."""
        short_host = socket.gethostname().split(".")[0]
        script = (
            f"Node = '{self.node}@{short_host}', "
            f"try {erlang_expr} of _ -> halt(0) "
            "catch C:R -> io:format(standard_error, \"~p:~p~n\", [C, R]), halt(1) end."
        )
        result = subprocess.run(
            ["erl", "-sname", f"ctl_{secrets.token_hex(4)}", "-setcookie", self.cookie,
             "-noinput", "-hidden", "-eval", script],
            capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rpc failed: {result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def wait_for_log(self, text: str, count: int = 1, offset: int = 0,
                     timeout: float = 15.0) -> None:
        """Waits until ejabberd's log has `text` at least `count` times after byte `offset`."""
        _poll_until(lambda: self._log_count(text, offset) >= count, timeout,
                    lambda: f"{text!r} not logged {count} times within {timeout} s")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def program_pids(self) -> list[int]:
        """OS pids of the roster-port programs serving this server."""
        config = str(self.workdir / "roster-port.toml")
        out = subprocess.run(["pgrep", "-f", f"serve --config {config}"],
                             capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def store_execute(self, sql: str, params: tuple = ()) -> None:
        """Changes the store behind ejabberd's back, as another application would: plain
        SQL on the SQLite file, in a transaction of its own."""
        with sqlite3.connect(self.store_path, timeout=10) as db:
            db.execute(sql, params)
        db.close()

    def store_execute_reported(self, sql: str, params: tuple = (),
                               timeout: float = 15.0) -> None:
        """store_execute, then waits until the change feed has reported the change to the
        shim: for each of this host's users the statement changed, the program has logged
        "<user>: N rows changed outside XMPP" for every change-log entry it made, and (with
        a transcript) the shim has read the roster_changed notifications. Until then the
        change is in flight: a client logging in may get its push after her login (correct
        behaviour, but not what a test that seeds rows then logs in is about), and the
        shim's read cache may still answer what it read before.

        Every write behind ejabberd's back that a test does not mean to race should use
        this; store_execute is for the tests of the feed itself."""
        offset = self.program_log_path.stat().st_size if self.program_log_path.exists() else 0
        notified_before = self._notifications()
        with sqlite3.connect(self.store_path, timeout=10, isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")
            (last,) = db.execute("SELECT coalesce(max(id), 0) FROM roster_changes").fetchone()
            db.execute(sql, params)
            # The entries this statement made (the program stamps its own with its node).
            made = dict(db.execute(
                "SELECT user, count(*) FROM roster_changes WHERE id > ? AND origin IS NULL "
                "GROUP BY user", (last,)).fetchall())
            db.execute("COMMIT")
        db.close()
        # The feed of this server reports the users of its host only.
        made = {user: n for user, n in made.items() if user.endswith("@" + self.host)}

        def newly_notified() -> dict[str, int]:
            notified = self._notifications()
            return {user: notified.get(user, 0) - notified_before.get(user, 0) for user in made}

        def all_reported() -> bool:
            reported, notified = self._reported_outside_changes(offset), newly_notified()
            return all(sum(reported.get(user, [])) >= n
                       and (not self.transcript or notified[user] >= len(reported[user]))
                       for user, n in made.items())

        _poll_until(all_reported, timeout, lambda: (
            f"the change feed did not report {made} within {timeout} s (program log: "
            f"{self._reported_outside_changes(offset)}; notifications read by the shim: "
            f"{newly_notified()})"))

    def _reported_outside_changes(self, offset: int) -> dict[str, list[int]]:
        """{user: [N of each "<user>: N rows changed outside XMPP" line]} of the program log
        after byte `offset` (whole lines only: the programs append as they go)."""
        try:
            with open(self.program_log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return {}
        reported: dict[str, list[int]] = {}
        for line in text.splitlines(keepends=True):
            found = re.search(r" (\S+): (\d+) rows changed outside XMPP\n$", line)
            if found:
                reported.setdefault(found[1], []).append(int(found[2]))
        return reported

    def _notifications(self) -> dict[str, int]:
        """{user: roster_changed notifications the shim has read}, from the transcript (the
        worker records a frame as it reads it; the newest record may be half written)."""
        import msgpack  # the program's dependency; only the tests need it here

        counts: dict[str, int] = {}
        if not self.transcript:
            return counts
        try:
            data = self.transcript_path.read_bytes()
        except FileNotFoundError:
            return counts
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data)
        for direction, _worker, _ts, message in unpacker:
            if (direction == "out" and message and message[0] == 2
                    and message[1] == "roster_changed" and isinstance(message[2], dict)):
                user = message[2].get("user")
                counts[user] = counts.get(user, 0) + 1
        return counts

    def store_query(self, sql: str, params: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(self.store_path, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def register(self, *users: str, password: str = "secret", host: str | None = None) -> None:
        """Creates accounts on `host` (default: the first host), all in one rpc: starting an
        Erlang node costs about a second."""
        host = host or self.host
        calls = ", ".join(
            f"{{<<\"{u}\">>, rpc:call(Node, ejabberd_auth, try_register, "
            f"[<<\"{u}\">>, <<\"{host}\">>, <<\"{password}\">>])}}"
            for u in users
        )
        out = self.rpc(f"io:format(\"~p~n\", [[{calls}]])")
        compact = "".join(out.split())
        for user in users:
            if not any(f'{{<<"{user}">>,{answer}}}' in compact
                       for answer in ("ok", "{error,exists}")):
                raise RuntimeError(f"registering {user} failed: {out.strip()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # OTP turns SIGTERM into init:stop(): ejabberd stops its modules, the
        # pool closes the programs' stdin and they exit.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "EjabberdServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run ejabberd with roster-port from a directory.")
    parser.add_argument("--dir", required=True, help="working directory (config, logs, data)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5222)
    parser.add_argument("--user", action="append", default=[], help="account to create")
    parser.add_argument("--password", default="secret")
    args = parser.parse_args(argv)

    workdir = Path(args.dir).resolve()
    # Mnesia ties its files (accounts) to the node name: keep it stable per directory.
    node = "rosterport_" + hashlib.sha1(str(workdir).encode()).hexdigest()[:8]
    server = EjabberdServer(workdir, host=args.host, c2s_port=args.port, ip=args.ip, node=node)
    # SIGTERM (a script's `kill`, systemd, a container's stop) stops it as Ctrl-C does, even
    # while ejabberd is still starting: the `finally` below stops ejabberd and its programs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.start()
        if args.user:
            server.register(*args.user, password=args.password)
        print(f"ejabberd is up: XMPP on {args.ip}:{args.port}, domain {args.host}")
        for user in args.user:
            print(f"  account {user}@{args.host}, password {args.password!r}")
        print("Connect any XMPP client to that address without TLS, for example:")
        print(f"  JID {args.user[0] if args.user else 'alice'}@{args.host}, server {args.ip}, "
              f"port {args.port}, encryption off (plaintext is allowed here)")
        print(f"Logs: {server.log_path} (ejabberd), {server.program_log_path} (roster-port)")
        print(f"Rosters are stored in {server.store_path}. Ctrl-C stops everything.")
        sys.stdout.flush()
        while server.process and server.process.poll() is None:
            time.sleep(0.5)
        print("ejabberd exited on its own: see the logs above", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ejabberd...", file=sys.stderr)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
