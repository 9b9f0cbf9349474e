"""scripts/install, end to end, as an operator of Debian 12's system ejabberd would use it.

The install goes into a temporary PREFIX, made with Debian's /usr/bin/python3 and without the
test dependencies; then Debian's own `ejabberdctl start` runs ejabberd as the `ejabberd` user,
with the lines the install printed added to a copy of Debian's /etc/default/ejabberd (which
ejabberdctl reads as its ejabberdctl.cfg) and to an ejabberd.yml. A real client gets its roster
from the installed program; `ejabberdctl stop`; then `scripts/install --uninstall`.

Then the operator's journey to rosters from their own PostgreSQL (examples/social): the mapping in
the configuration, `roster-port install-change-log`, the application's triggers, `roster-port
check --as-user ejabberd`, and a change the application makes in SQL pushed to a client.

The machine's own /etc/default/ejabberd, /etc/ejabberd and /var/lib/ejabberd are only read:
ejabberdctl's --config-dir, --ctl-config, --spool, --logs and --node point it at this test's
directory, so a system ejabberd (if any) is not disturbed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from ejabberd_harness import _poll_until, free_port
from xmpp_client import Client

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EJABBERDCTL = Path("/usr/sbin/ejabberdctl")
DEBIAN_DEFAULTS = Path("/etc/default/ejabberd")
SOCIAL = REPO / "examples" / "social"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "scripts/install and ejabberdctl start run as root"
    if not EJABBERDCTL.exists() or not DEBIAN_DEFAULTS.exists():
        return "Debian's ejabberd package is not installed"
    try:
        pwd.getpwnam("ejabberd")
    except KeyError:
        return "no ejabberd user"
    return None


def _printed_lines(output: str) -> tuple[str, str]:
    """The /etc/default/ejabberd line and the ejabberd.yml module block the install printed."""
    erl_options = re.search(r"^ERL_OPTIONS=.*$", output, re.M)
    assert erl_options, output
    block = re.search(r"under modules:, replace mod_roster's entry with:\n\n((?:  .*\n)+)", output)
    assert block, output
    return erl_options.group(0), block.group(1)


def _ejabberd_dir(base: Path, name: str) -> Path:
    """A directory the ejabberd user owns (spool, logs)."""
    ejabberd = pwd.getpwnam("ejabberd")
    path = base / name
    path.mkdir(parents=True)
    os.chown(path, ejabberd.pw_uid, ejabberd.pw_gid)
    return path


def roster_port(*args: str, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(prefix / "bin/roster-port"), *args], capture_output=True,
                          text=True, timeout=120)


@dataclasses.dataclass
class Installation:
    base: Path            # everything of this test module, readable by the ejabberd user
    prefix: Path
    sysconf: Path
    config: Path          # the configuration the install found and kept
    logs: Path
    erl_options: str      # the line printed for /etc/default/ejabberd
    module_block: str     # the modules printed for ejabberd.yml
    install_log: str


@pytest.fixture(scope="module")
def installation():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    # pytest's tmp_path is private to root; the ejabberd user must reach these files.
    base = Path(tempfile.mkdtemp(prefix="roster-port-install-"))
    os.chmod(base, 0o755)
    try:
        prefix, sysconf = base / "opt", base / "etc"
        sysconf.mkdir()
        spool, logs = _ejabberd_dir(base, "store"), _ejabberd_dir(base, "logs")
        # A first install writes its default configuration into a new directory; the second,
        # an upgrade, keeps the operator's own (the install never overwrites one).
        first = subprocess.run(
            [str(REPO / "scripts/install"), "--sysconfdir", str(base / "etc-default"),
             str(prefix)], capture_output=True, text=True, timeout=900,
            env={k: v for k, v in os.environ.items() if k != "PYTHON"})
        assert first.returncode == 0, first.stderr[-3000:]
        config = sysconf / "roster-port.toml"
        config.write_text(
            f'[store]\nbackend = "sqlite"\npath = "{spool}/roster-port.sqlite"\n\n'
            f'[log]\nlevel = "info"\nfile = "{logs}/roster-port.log"\n')
        install = subprocess.run(
            [str(REPO / "scripts/install"), "--sysconfdir", str(sysconf), str(prefix)],
            capture_output=True, text=True, timeout=900,
            env={k: v for k, v in os.environ.items() if k != "PYTHON"})
        assert install.returncode == 0, install.stderr[-3000:]
        erl_options, module_block = _printed_lines(install.stdout)
        yield Installation(base, prefix, sysconf, config, logs, erl_options, module_block,
                           install.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)


class SystemEjabberd:
    """Debian's ejabberdctl, run as root (it runs ejabberd as the ejabberd user), on this test's
    configuration: a copy of Debian's /etc/default/ejabberd with the printed line appended."""

    def __init__(self, installation: Installation, name: str, host: str, module_block: str):
        self.host, self.port = host, free_port()
        work = installation.base / name
        cfg = work / "cfg"
        cfg.mkdir(parents=True)
        self.spool, self.logs = _ejabberd_dir(work, "spool"), _ejabberd_dir(work, "logs")
        defaults = DEBIAN_DEFAULTS.read_text()
        # This copy must name this test's files, not the system's.
        defaults = re.sub(r"(?m)^EJABBERD_CONFIG_PATH=.*$",
                          f"EJABBERD_CONFIG_PATH={cfg}/ejabberd.yml", defaults)
        defaults = re.sub(r"(?m)^EJABBERD_PID_PATH=.*$",
                          f"EJABBERD_PID_PATH={self.spool}/ejabberd.pid", defaults)
        (cfg / "ejabberdctl.cfg").write_text(defaults + "\n" + installation.erl_options + "\n")
        (cfg / "ejabberd.yml").write_text(f"""hosts:
  - "{host}"
loglevel: info
auth_method: internal
auth_password_format: plain
listen:
  -
    port: {self.port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
modules:
  mod_disco: {{}}
  mod_admin_extra: {{}}
{module_block}""")
        for f in cfg.iterdir():
            os.chmod(f, 0o644)
        node = f"rp_install_{uuid.uuid4().hex[:8]}@localhost"
        self.ctl = [str(EJABBERDCTL), "--config-dir", str(cfg),
                    "--ctl-config", str(cfg / "ejabberdctl.cfg"), "--spool", str(self.spool),
                    "--logs", str(self.logs), "--node", node]
        self.started = False

    def ejabberdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.ctl, *args], capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"ejabberdctl {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def _running(self) -> bool:
        return self.ejabberdctl("status", check=False).returncode == 0

    def __enter__(self) -> "SystemEjabberd":
        self.ejabberdctl("start")
        self.started = True
        _poll_until(self._running, 60, lambda: "timed out waiting for ejabberdctl status")
        log = self.logs / "ejabberd.log"
        _poll_until(lambda: log.exists() and "Start accepting TCP connections" in
                    log.read_text(errors="replace"), 60,
                    lambda: "timed out waiting for ejabberd's listener")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ejabberdctl("stop", check=False)
            _poll_until(lambda: not self._running(), 60,
                        lambda: "timed out waiting for ejabberd to stop")

    def register(self, *users: str) -> None:
        for user in users:
            self.ejabberdctl("register", user, self.host, "secret")

    def programs(self) -> list[tuple[str, str]]:
        """(user, command line) of the roster-port programs running."""
        listing = subprocess.run(["ps", "-ww", "-eo", "user=,args="], capture_output=True,
                                 text=True, check=True).stdout
        return [tuple(line.split(None, 1)) for line in listing.splitlines()
                if " serve --config " in line and "roster-port" in line]


def test_the_first_install_writes_a_configuration_only_ejabberd_can_read(installation) -> None:
    written = installation.base / "etc-default" / "roster-port.toml"
    mode = os.stat(written)
    assert (mode.st_mode & 0o777, mode.st_uid) == (0o640, 0)
    assert mode.st_gid == pwd.getpwnam("ejabberd").pw_gid
    text = written.read_text()
    assert 'path = "/var/lib/ejabberd/roster-port.sqlite"' in text
    assert 'file = "/var/log/ejabberd/roster-port.log"' in text
    # Its check ran as ejabberd on a scratch file: the system's directory is left as it was.
    assert not Path("/var/lib/ejabberd/roster-port.sqlite").exists()


def test_the_install_uses_debians_python_and_no_test_dependency(installation) -> None:
    assert f"kept {installation.config}" in installation.install_log
    venv_cfg = (installation.prefix / "venv/pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", venv_cfg, re.M), venv_cfg
    freeze = subprocess.run([str(installation.prefix / "venv/bin/pip"), "freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    assert "roster-port" in freeze or "roster_port" in freeze
    for test_dependency in ("pytest", "hypothesis", "slixmpp"):
        assert test_dependency not in freeze
    assert (installation.prefix / "ebin/mod_roster_port.beam").exists()
    # What the install checked, an operator can check again, as the user ejabberd runs as.
    check = roster_port("check", "--config", str(installation.config), "--as-user", "ejabberd",
                        prefix=installation.prefix)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "runs as: ejabberd (uid " in check.stdout
    assert f"log: info to {installation.logs}/roster-port.log" in check.stdout


def test_the_system_ejabberd_serves_rosters_from_the_installed_program(installation) -> None:
    with SystemEjabberd(installation, "sqlite", "localhost", installation.module_block) as server:
        server.register("alice", "bob")

        async def scenario() -> None:
            alice = Client("alice@localhost/install", "secret", server.port)
            await alice.connect()
            try:
                await alice.roster_set("bob@localhost", name="Bob", groups=("Work",))
                await alice.wait_for(lambda c: c.pushes_for("bob@localhost"), timeout=10)
                roster = await alice.roster_get()
                assert roster.items["bob@localhost"].name == "Bob"
                assert roster.items["bob@localhost"].groups == ("Work",)
            finally:
                await alice.disconnect()

        asyncio.run(scenario())
        # Served by the installed program, running as ejabberd, on the configured store.
        ours = [p for p in server.programs() if str(installation.prefix) in p[1]]
        assert ours and all(user == "ejabberd" for user, _ in ours), server.programs()
    store = installation.base / "store" / "roster-port.sqlite"
    with sqlite3.connect(store) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        assert any("bob@localhost" in str(row)
                   for t in tables for row in db.execute(f'SELECT * FROM "{t}"'))


def test_rosters_from_the_operators_postgresql_with_the_install(installation, pg_server) -> None:
    """README, "Configuring ejabberd": the operator's own tables (examples/social), the change
    log installed by the command, the application's triggers, a check as ejabberd, then a
    friendship accepted in SQL reaches a client live."""
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    try:
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute((SOCIAL / "schema.sql").read_text())
            app.execute("INSERT INTO users (username, display_name) VALUES "
                        "('alice', 'Alice Liddell'), ('bob', 'Bob Marley'), ('carol', 'Carol King')")
            app.execute("INSERT INTO friendships (requester_id, addressee_id, status) "
                        "VALUES (1, 2, 'accepted')")
        etc = installation.base / "etc-social"
        etc.mkdir()
        shutil.copy(SOCIAL / "mapping.toml", etc / "mapping.toml")
        social = (SOCIAL / "roster-port.toml").read_text()
        social = re.sub(r'(?m)^dsn = .*$', lambda _: f"dsn = {json_string(dsn)}", social)
        social += f'file = "{installation.logs}/roster-port-social.log"\n'
        config = etc / "roster-port.toml"
        config.write_text(social)
        for f in (etc, *etc.iterdir()):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)

        check = roster_port("check", "--config", str(config), "--as-user", "ejabberd",
                            prefix=installation.prefix)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "outside changes: NOT pushed: no change log" in check.stdout
        installed = roster_port("install-change-log", "--config", str(config),
                                prefix=installation.prefix)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert "none calls roster_port_log_change()" in installed.stdout
        applied = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-d", dsn, "-f",
                                  str(SOCIAL / "triggers.sql")], capture_output=True, text=True,
                                 timeout=60)
        assert applied.returncode == 0, applied.stderr
        check = roster_port("check", "--config", str(config), "--as-user", "ejabberd",
                            prefix=installation.prefix)
        assert "outside changes: pushed: LISTEN works; triggers logging changes on friendships" \
            in check.stdout, check.stdout

        block = installation.module_block.replace(str(installation.config), str(config))
        with SystemEjabberd(installation, "social", "social.example", block) as server:
            server.register("alice", "bob", "carol")

            async def scenario() -> None:
                alice = Client("alice@social.example/install", "secret", server.port)
                await alice.connect()
                try:
                    roster = await alice.roster_get()
                    assert roster.items["bob@social.example"].name == "Bob Marley"
                    assert roster.items["bob@social.example"].subscription == "both"
                    # The application accepts a friendship on its web site.
                    with psycopg.connect(dsn, autocommit=True) as app:
                        app.execute("INSERT INTO friendships (requester_id, addressee_id, status) "
                                    "VALUES (3, 1, 'accepted')")
                    pushes = await alice.wait_for(
                        lambda c: c.pushes_for("carol@social.example"), timeout=10)
                    assert pushes[-1].item.subscription == "both"
                finally:
                    await alice.disconnect()

            asyncio.run(scenario())
    finally:
        pg_server.drop_schema(schema)


def json_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def test_uninstall_removes_what_it_installed_and_nothing_else(installation) -> None:
    # Something of the operator's, put there after the install, is kept (and so its directory).
    (installation.prefix / "operator-notes.txt").write_text("mine")
    done = subprocess.run([str(REPO / "scripts/install"), "--uninstall", str(installation.prefix)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in installation.prefix.iterdir()) == ["operator-notes.txt"]
    assert installation.config.exists()
    (installation.prefix / "operator-notes.txt").unlink()
    installation.prefix.rmdir()


def test_uninstall_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep me")
    done = subprocess.run([str(REPO / "scripts/install"), "--uninstall", str(precious)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not made by scripts/install" in done.stderr
    assert (precious / "data").read_text() == "keep me"
    # Nor does it install into it (found by review: `scripts/install /usr/local` then
    # `--uninstall /usr/local` would have removed /usr/local).
    into = subprocess.run([str(REPO / "scripts/install"), str(precious)],
                          capture_output=True, text=True, timeout=60)
    assert into.returncode != 0
    assert "exists and was not made by scripts/install" in into.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["data"]


@pytest.mark.parametrize("option", ["PREFIX", "--sysconfdir"])
def test_a_path_the_printed_lines_could_not_hold_is_refused_before_anything(tmp_path, option):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    spaced = tmp_path / "with space"
    args = [str(spaced)] if option == "PREFIX" else ["--sysconfdir", str(spaced), str(tmp_path / "p")]
    done = subprocess.run([str(REPO / "scripts/install"), *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "give an absolute path of letters, digits" in done.stderr
    assert not spaced.exists() and not (tmp_path / "p").exists()
