"""scripts/start, the README's first command: it starts ejabberd with the shim and the program
on SQLite, a client gets its roster, and SIGTERM (what a script's `kill` sends) stops it all,
also while ejabberd is still starting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ejabberd_harness import _poll_until, free_port
from xmpp_client import Client

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _processes_in(directory: Path) -> list[str]:
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True,
                             check=True).stdout
    return [line for line in listing.splitlines() if str(directory) in line]


def _start(var_dir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([str(REPO / "scripts/start")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VAR_DIR": str(var_dir), "PORT": str(port),
                                 "USERS": "alice bob"})


def _kill_leftovers(script: subprocess.Popen, var_dir: Path) -> None:
    """After a failure: nothing of this test may outlive it."""
    if script.poll() is None:
        script.kill()
    for line in _processes_in(var_dir):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    script = _start(var_dir, port)
    try:
        # The script prints its banner once ejabberd listens and the accounts exist.
        for line in script.stdout:
            if line.startswith("ejabberd is up"):
                break
        else:
            raise AssertionError(f"scripts/start exited with {script.wait()} before it was up")

        async def roster() -> None:
            alice = Client("alice@localhost/start", "secret", port)
            await alice.connect()
            try:
                await alice.roster_set("bob@localhost", name="Bob")
                assert (await alice.roster_get()).items["bob@localhost"].name == "Bob"
            finally:
                await alice.disconnect()

        asyncio.run(roster())
        assert (var_dir / "roster.sqlite").exists()
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=60) == 0
        assert _processes_in(var_dir) == []
    finally:
        _kill_leftovers(script, var_dir)


def test_sigterm_while_ejabberd_is_starting_leaves_nothing_running(tmp_path: Path) -> None:
    var_dir, port = tmp_path / "var", free_port()
    script = _start(var_dir, port)
    try:
        # ejabberd's Erlang VM is up (its command line names the directory), not yet serving.
        _poll_until(lambda: any("beam" in p or "erl" in p for p in _processes_in(var_dir)), 120,
                    lambda: "timed out waiting for ejabberd's VM")
        script.send_signal(signal.SIGTERM)
        assert script.wait(timeout=60) == 0
        _poll_until(lambda: _processes_in(var_dir) == [], 30,
                    lambda: "timed out waiting for every process of the demo to exit")
    finally:
        _kill_leftovers(script, var_dir)
