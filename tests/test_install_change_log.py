"""`roster-port install-change-log` against a real PostgreSQL: what a DBA runs for a mapped
store (docs/changes.md), with the grants the program's role and an application's role need.

The roles are real and unprivileged: the program's role owns nothing, reads its store's tables
and writes through the operator's trigger, so a missing grant fails here as it would in
production.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pg_cluster

pytestmark = pytest.mark.postgres

FOLLOWS = """
CREATE TABLE follows (follower text NOT NULL, followee text NOT NULL,
                      PRIMARY KEY (follower, followee));
CREATE FUNCTION follows_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM roster_port_log_change(OLD.follower, OLD.followee, 'to', NULL);
        RETURN OLD;
    END IF;
    PERFORM roster_port_log_change(NEW.follower, NEW.followee, NULL, 'to');
    RETURN NEW;
END $$;
CREATE TRIGGER follows_roster_port AFTER INSERT OR DELETE ON follows
    FOR EACH ROW EXECUTE FUNCTION follows_log();
"""


def run_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", "install-change-log", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def database(pg_server, tmp_path: Path):
    """A schema with an operator's table, and two unprivileged roles: the program's and a web
    application's. Yields (admin dsn, schema, program role, web role, config path)."""
    schema = pg_server.create_schema()
    suffix = uuid.uuid4().hex[:8]
    program, web = f"rp_program_{suffix}", f"rp_web_{suffix}"
    admin_dsn = pg_server.dsn(schema)
    with pg_server.connect(admin_dsn) as connection:
        try:
            for role in (program, web):
                connection.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(
                    sql.Identifier(role)))
        except psycopg.errors.InsufficientPrivilege:
            pytest.skip("the test PostgreSQL role cannot create roles")
        for role in (program, web):
            connection.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(schema), sql.Identifier(role)))
    config = tmp_path / "roster-port.toml"
    program_dsn = make_conninfo(admin_dsn, user=program, password="pw")
    config.write_text(f'[store]\nbackend = "postgres_mapped"\ndsn = "{program_dsn}"\n'
                      f'mapping = "ejabberd"\n')
    try:
        yield admin_dsn, schema, program, web, config
    finally:
        pg_server.drop_schema(schema)
        with pg_server.connect(pg_server.dsn()) as connection:
            for role in (program, web):
                connection.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                connection.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_installs_with_grants_and_reports_the_triggers(database) -> None:
    admin_dsn, schema, program, web, config = database
    done = run_command("--config", str(config), "--dsn", admin_dsn, "--writer-role", web)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f'change log installed in schema "{schema}"' in done.stdout
    assert f"granted to {program} (the program)" in done.stdout
    assert f"granted to {web} (a writer)" in done.stdout
    # No trigger yet: said so, as a warning the operator can act on.
    assert "none calls roster_port_log_change()" in done.stdout
    assert "pw" not in done.stdout

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(FOLLOWS)
        admin.execute(sql.SQL("GRANT SELECT, INSERT, DELETE ON follows TO {}, {}").format(
            sql.Identifier(program), sql.Identifier(web)))

    # Idempotent; now it names the trigger.
    again = run_command("--config", str(config), "--dsn", admin_dsn, "--writer-role", web)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"trigger: follows_roster_port on {schema}.follows logs changes" in again.stdout

    # The web application's write fires the trigger: the grant lets its INSERT log the change.
    web_dsn = make_conninfo(admin_dsn, user=web, password="pw")
    with psycopg.connect(web_dsn, autocommit=True) as connection:
        connection.execute("INSERT INTO follows VALUES ('alice@x', 'bob@x')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("SELECT * FROM roster_port_changes")
    # The program's role reads the log, writes through the trigger and prunes.
    program_dsn = make_conninfo(admin_dsn, user=program, password="pw")
    with psycopg.connect(program_dsn, autocommit=True) as connection:
        rows = connection.execute("SELECT username, contact FROM roster_port_changes").fetchall()
        assert rows == [("alice@x", "bob@x")]
        connection.execute("DELETE FROM roster_port_changes WHERE username = 'alice@x'")
        connection.execute("DELETE FROM follows")
        assert connection.execute("SELECT count(*) FROM roster_port_changes").fetchone()[0] == 1


def test_without_the_grants_the_applications_writes_fail(database) -> None:
    """Why the grants matter: the function runs with the writer's rights."""
    admin_dsn, schema, program, web, config = database
    assert run_command("--config", str(config), "--dsn", admin_dsn).returncode == 0
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(FOLLOWS)
        admin.execute(sql.SQL("GRANT INSERT ON follows TO {}").format(sql.Identifier(web)))
    web_dsn = make_conninfo(admin_dsn, user=web, password="pw")
    with psycopg.connect(web_dsn, autocommit=True) as connection:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("INSERT INTO follows VALUES ('alice@x', 'bob@x')")


def test_printed_sql_applies_as_is_and_equals_what_the_command_installs(database) -> None:
    admin_dsn, schema, program, web, config = database
    printed = run_command("--config", str(config), "--print-sql", "--schema", schema,
                          "--program-role", program, "--writer-role", web)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count("BEGIN;") == 1 and printed.stdout.rstrip().endswith("COMMIT;")
    applied = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-d", admin_dsn],
                             input=printed.stdout, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stderr
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        privileges = admin.execute(
            "SELECT has_table_privilege(%s, 'roster_port_changes', 'INSERT'),"
            " has_table_privilege(%s, 'roster_port_changes', 'SELECT'),"
            " has_table_privilege(%s, 'roster_port_changes', 'SELECT'),"
            " has_sequence_privilege(%s, 'roster_port_changes_id_seq', 'USAGE')",
            (web, web, program, program)).fetchone()
    assert privileges == (True, False, True, True)
    # Applying it twice changes nothing (a DBA re-runs a reviewed file).
    again = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-d", admin_dsn],
                           input=printed.stdout, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr


def test_refuses_a_store_that_is_not_postgresql(tmp_path: Path) -> None:
    config = tmp_path / "roster-port.toml"
    config.write_text('[store]\nbackend = "sqlite"\npath = "x.sqlite"\n')
    done = run_command("--config", str(config))
    assert done.returncode == 2
    assert "the change log is for PostgreSQL stores" in done.stderr


def test_a_database_that_is_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "roster-port.toml"
    config.write_text('[store]\nbackend = "postgres_mapped"\nmapping = "ejabberd"\n'
                      'dsn = "host=127.0.0.1 port=1 dbname=x user=u password=sekrit"\n')
    done = run_command("--config", str(config))
    assert done.returncode == 1
    assert done.stdout.startswith("roster-port install-change-log: ")
    assert "sekrit" not in done.stdout + done.stderr


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_check_says_whether_changes_made_outside_xmpp_will_be_pushed(database) -> None:
    """`check` tells the three states apart: no log, a log nothing writes to, a log fed by
    triggers (naming them)."""
    admin_dsn, schema, program, web, config = database
    pg_cluster.load_ejabberd_schema(admin_dsn)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {}")
                      .format(sql.Identifier(schema), sql.Identifier(program)))
    before = run_check(config)
    assert before.returncode == 0, before.stdout + before.stderr
    assert "outside changes: NOT pushed: no change log" in before.stdout
    assert "mutual_rows=False" in before.stdout

    assert run_command("--config", str(config), "--dsn", admin_dsn).returncode == 0
    no_trigger = run_check(config)
    assert "outside changes: NOT pushed: the change log is installed but no trigger" in no_trigger.stdout

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(FOLLOWS)
    # A trigger, but not on what the mapping reads (ejabberd's rosterusers, rostergroups).
    partly = run_check(config)
    assert partly.returncode == 0, partly.stdout + partly.stderr
    line = next(x for x in partly.stdout.splitlines() if x.startswith("outside changes: "))
    assert line.startswith("outside changes: partly pushed: LISTEN works; triggers logging "
                           "changes on follows (follows_roster_port); but the mapping also reads ")
    assert f"{schema}.rosterusers" in line and f"{schema}.rostergroups" in line

    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(ROSTER_TABLES_LOG)
    fed = run_check(config)
    assert fed.returncode == 0, fed.stdout + fed.stderr
    line = next(x for x in fed.stdout.splitlines() if x.startswith("outside changes: "))
    assert line.startswith("outside changes: pushed: LISTEN works; triggers logging changes on "), line
    assert "rosterusers (rosterusers_roster_port)" in line
    assert "rostergroups (rostergroups_roster_port)" in line


ROSTER_TABLES_LOG = """
CREATE FUNCTION roster_tables_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM roster_port_log_change(OLD.username, OLD.jid, NULL, NULL);
        RETURN OLD;
    END IF;
    PERFORM roster_port_log_change(NEW.username, NEW.jid, NULL, NULL);
    RETURN NEW;
END $$;
CREATE TRIGGER rosterusers_roster_port AFTER INSERT OR UPDATE OR DELETE ON rosterusers
    FOR EACH ROW EXECUTE FUNCTION roster_tables_log();
CREATE TRIGGER rostergroups_roster_port AFTER INSERT OR UPDATE OR DELETE ON rostergroups
    FOR EACH ROW EXECUTE FUNCTION roster_tables_log();
"""
