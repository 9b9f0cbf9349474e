"""scripts/install, end to end, as an operator of Debian 12's system ejabberd would use it.

The install goes into a temporary PREFIX, made with Debian's /usr/bin/python3 and without the
test dependencies; then Debian's own `ejabberdctl start` runs ejabberd as the `ejabberd` user,
with the lines the install printed added to a copy of Debian's /etc/default/ejabberd (which
ejabberdctl reads as its ejabberdctl.cfg) and to an ejabberd.yml. A real client gets its roster
from the installed program; `ejabberdctl stop`; then `scripts/install --uninstall`.

The machine's own /etc/default/ejabberd, /etc/ejabberd and /var/lib/ejabberd are only read:
ejabberdctl's --config-dir, --ctl-config, --spool, --logs and --node point it at this test's
directory, so a system ejabberd (if any) is not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from ejabberd_harness import free_port
from xmpp_client import Client

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EJABBERDCTL = Path("/usr/sbin/ejabberdctl")
DEBIAN_DEFAULTS = Path("/etc/default/ejabberd")


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


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _printed_lines(output: str) -> tuple[str, str]:
    """The /etc/default/ejabberd line and the ejabberd.yml module block the install printed."""
    erl_options = re.search(r"^ERL_OPTIONS=.*$", output, re.M)
    assert erl_options, output
    block = re.search(r"under modules:, replace mod_roster's entry with:\n\n((?:  .*\n)+)", output)
    assert block, output
    return erl_options.group(0), block.group(1)


def test_install_serve_with_system_ejabberdctl_and_uninstall() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    ejabberd = pwd.getpwnam("ejabberd")
    # pytest's tmp_path is private to root; the ejabberd user must reach these files.
    base = Path(tempfile.mkdtemp(prefix="roster-port-install-"))
    os.chmod(base, 0o755)
    try:
        _install_serve_uninstall(base, ejabberd)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _install_serve_uninstall(base: Path, ejabberd: pwd.struct_passwd) -> None:
    prefix, sysconf, cfg, spool, logs = (base / n for n in ("opt", "etc", "cfg", "spool", "logs"))
    for d in (sysconf, cfg, spool, logs):
        d.mkdir()
    for d in (spool, logs):
        os.chown(d, ejabberd.pw_uid, ejabberd.pw_gid)
    # An operator's own configuration is kept as it is (the install never overwrites it).
    config = sysconf / "roster-port.toml"
    config.write_text(
        f'[store]\nbackend = "sqlite"\npath = "{spool}/roster-port.sqlite"\n\n'
        f'[log]\nlevel = "info"\nfile = "{logs}/roster-port.log"\n')

    install = subprocess.run(
        [str(REPO / "scripts/install"), "--sysconfdir", str(sysconf), str(prefix)],
        capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "PYTHON"})
    assert install.returncode == 0, install.stderr[-3000:]
    assert f"kept {config}" in install.stderr
    erl_options, module_block = _printed_lines(install.stdout)

    # Debian's interpreter, no test dependency in the venv, readable by everyone.
    venv_cfg = (prefix / "venv/pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", venv_cfg, re.M), venv_cfg
    freeze = subprocess.run([str(prefix / "venv/bin/pip"), "freeze"], capture_output=True,
                            text=True, check=True).stdout.lower()
    assert "roster-port" in freeze or "roster_port" in freeze
    for test_dependency in ("pytest", "hypothesis", "slixmpp"):
        assert test_dependency not in freeze
    assert (prefix / "ebin/mod_roster_port.beam").exists()

    # What the install checked, an operator can check again: as the user ejabberd runs as.
    as_ejabberd = subprocess.run([str(prefix / "bin/roster-port"), "check", "--config", str(config),
                                  "--as-user", "ejabberd"], capture_output=True, text=True,
                                 timeout=60)
    assert as_ejabberd.returncode == 0, as_ejabberd.stdout + as_ejabberd.stderr
    assert "runs as: ejabberd (uid " in as_ejabberd.stdout
    assert f"log: info to {logs}/roster-port.log" in as_ejabberd.stdout

    port = free_port()
    node = f"rp_install_{uuid.uuid4().hex[:8]}@localhost"
    defaults = DEBIAN_DEFAULTS.read_text()
    # This copy must name this test's files, not the system's.
    defaults = re.sub(r"(?m)^EJABBERD_CONFIG_PATH=.*$", f"EJABBERD_CONFIG_PATH={cfg}/ejabberd.yml",
                      defaults)
    defaults = re.sub(r"(?m)^EJABBERD_PID_PATH=.*$", f"EJABBERD_PID_PATH={spool}/ejabberd.pid",
                      defaults)
    (cfg / "ejabberdctl.cfg").write_text(defaults + "\n" + erl_options + "\n")
    (cfg / "ejabberd.yml").write_text(f"""hosts:
  - "localhost"
loglevel: info
auth_method: internal
auth_password_format: plain
listen:
  -
    port: {port}
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
    ctl = [str(EJABBERDCTL), "--config-dir", str(cfg), "--ctl-config", str(cfg / "ejabberdctl.cfg"),
           "--spool", str(spool), "--logs", str(logs), "--node", node]

    def ejabberdctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"ejabberdctl {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def status_ok() -> bool:
        return ejabberdctl("status", check=False).returncode == 0

    started = False
    try:
        ejabberdctl("start")
        started = True
        _wait_until(status_ok, 60, "ejabberdctl status")
        _wait_until(lambda: "Start accepting TCP connections" in
                    (logs / "ejabberd.log").read_text(errors="replace"), 60, "ejabberd's listener")
        ejabberdctl("register", "alice", "localhost", "secret")
        ejabberdctl("register", "bob", "localhost", "secret")

        async def scenario() -> None:
            alice = Client("alice@localhost/install", "secret", port)
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
        programs = subprocess.run(["ps", "-ww", "-eo", "user=,args="],
                                  capture_output=True, text=True).stdout
        ours = [line for line in programs.splitlines() if f"{prefix}/bin/roster-port serve" in line
                or f"{prefix}/venv/bin/roster-port serve" in line]
        assert ours, programs
        assert all(line.split()[0] == "ejabberd" for line in ours), ours
        with sqlite3.connect(spool / "roster-port.sqlite") as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            assert any("bob@localhost" in str(row)
                       for t in tables for row in db.execute(f'SELECT * FROM "{t}"'))
    finally:
        if started:
            ejabberdctl("stop", check=False)
            _wait_until(lambda: not status_ok(), 60, "ejabberd to stop")
    uninstall = subprocess.run([str(REPO / "scripts/install"), "--uninstall", str(prefix)],
                               capture_output=True, text=True, timeout=60)
    assert uninstall.returncode == 0, uninstall.stderr
    assert not prefix.exists()
    assert config.exists()


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
    shutil.rmtree(precious)
