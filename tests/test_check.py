"""`roster-port check` on SQLite: it reports what `serve` will do, fails when serve could not
start, and leaves no store behind that it made (run as root, a new file would be root's).

PostgreSQL's outside-changes report is tested in tests/test_install_change_log.py; `--as-user`
with the installed program in tests/e2e/test_install.py.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", "check", *args],
                          capture_output=True, text=True, timeout=60)


def write_config(tmp_path: Path, log_file: str, extra: str = "") -> Path:
    config = tmp_path / "roster-port.toml"
    config.write_text(f'[store]\npath = "rosters.sqlite"\n\n[roster]\nmutual_rows = true\n{extra}'
                      f'\n[log]\nfile = "{log_file}"\n')
    return config


def test_reports_policy_outside_changes_log_and_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(tmp_path / "roster-port.log"))
    done = run_check("--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert "mutual_rows=True" in lines["roster"] and "pre_approval=True" in lines["roster"]
    assert "versioning=True" in lines["roster"]
    assert lines["outside changes"].startswith("pushed: ")
    assert lines["log"] == f"info to {tmp_path / 'roster-port.log'}"
    assert lines["runs as"].endswith(")")
    assert "max_items=10000" in lines["limits"]
    assert done.stdout.strip().endswith("ok")


def test_a_new_store_is_not_left_behind_and_an_existing_one_is_kept(tmp_path: Path) -> None:
    """A check never creates the store file (as root it would be root's), nor removes one: a
    `serve` starting meanwhile may have made it."""
    config = write_config(tmp_path, "")
    done = run_check("--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rosters.sqlite does not exist yet: serve will create it" in done.stdout
    assert f"store: SQLite database {tmp_path / 'rosters.sqlite'} " in done.stdout
    # Neither the store nor the scratch file it was checked as is left.
    assert not list(tmp_path.glob("rosters.sqlite*"))
    assert "log: info to stderr" in done.stdout

    sqlite3.connect(tmp_path / "rosters.sqlite").close()  # an operator's (empty) file
    again = run_check("--config", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "does not exist yet" not in again.stdout
    assert (tmp_path / "rosters.sqlite").exists()


def test_a_log_file_serve_could_not_open_fails_the_check(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(tmp_path / "no such dir" / "roster-port.log"))
    done = run_check("--config", str(config))
    assert done.returncode == 1
    assert "cannot write the log file" in done.stdout
    assert "ok" not in done.stdout.splitlines()


def test_as_user_names_an_unknown_user(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    done = run_check("--config", str(config), "--as-user", "no-such-user-rp")
    assert done.returncode == 1
    assert "no user no-such-user-rp" in done.stdout
