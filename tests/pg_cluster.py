"""A PostgreSQL server for the tests: a throwaway cluster, or the server named by an environment
variable.

Theory of operation
-------------------
`shared_server()` gives the one `TestServer` of the test session, started on first use (so a run
of SQLite tests only never starts PostgreSQL) and stopped by `stop_shared_server()`, which
tests/conftest.py calls when the session ends (and `atexit`, should the session end some other
way).

- By default it is a throwaway cluster made with Debian's `postgresql` package: `initdb` and
  `pg_ctl` from /usr/lib/postgresql/<newest version>/bin, in a temporary directory, with trust
  authentication, a free loopback TCP port, its unix socket in that directory, and fsync off (the
  data is thrown away). PostgreSQL refuses to run as root, so when the tests run as root, every
  server command runs as the `postgres` system user (the package creates it) through `runuser`
  (or `setpriv`), and the directory belongs to that user.
- The cluster's default collation is ICU's en-US, on purpose: it orders text unlike code point
  order, so the contract's ordering test proves the adapter's `COLLATE "C"` rather than passing
  by luck of the cluster's locale.
- With ROSTER_PORT_TEST_PG_DSN set (any libpq connection string or URI of a role that may
  CREATE DATABASE), that server is used instead and nothing is started. Only what needs a server
  of our own (restarting it) is skipped then.
- The session works in a database of its own, dropped at the end; each test gets a fresh schema
  in it (`create_schema`), dropped after the test.

A missing PostgreSQL is a test *failure* that says how to install it, never a skip: a green run
must mean the PostgreSQL adapter was tested.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from roster_port.store.postgres import dsn_without_password

log = logging.getLogger(__name__)

DSN_VARIABLE = "ROSTER_PORT_TEST_PG_DSN"
SERVER_USER = "postgres"  # the system user Debian's postgresql package creates
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
DATABASE_PREFIX = "roster_port_test_"
HOW_TO_INSTALL = (
    "install Debian's postgresql package (scripts/bootstrap does: apt-get install postgresql), "
    f"or set {DSN_VARIABLE} to a PostgreSQL server where the tests may create databases"
)

# Settings of the throwaway cluster. Durability is pointless for data thrown away at the end.
CLUSTER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_connections": "off",
}
START_TIMEOUT_S = 30


class ThrowawayCluster:
    """A PostgreSQL cluster in a temporary directory, owned by the server user when we are root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.base_dir = Path(tempfile.mkdtemp(prefix="roster-port-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_file = self.base_dir / "server.log"
        self.port = 0
        self.running = False
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            for path in (self.base_dir, self.socket_dir):
                shutil.chown(path, SERVER_USER, SERVER_USER)

    @classmethod
    def start_new(cls) -> "ThrowawayCluster":
        cluster = cls(find_server_binaries())
        try:
            cluster._initdb()
            cluster._start_on_a_free_port()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @property
    def admin_dsn(self) -> str:
        return make_conninfo(host="127.0.0.1", port=self.port, user=SERVER_USER,
                             dbname="postgres")

    def start(self) -> None:
        self._pg_ctl("start", "--wait", f"--timeout={START_TIMEOUT_S}", f"--log={self.log_file}")
        self.running = True

    def stop(self) -> None:
        self._pg_ctl("stop", "--wait", "--mode=fast")
        self.running = False

    def restart(self) -> None:
        """Stop and start again: every connection is cut, as in a real server restart."""
        self._pg_ctl("restart", "--wait", "--mode=fast", f"--timeout={START_TIMEOUT_S}",
                     f"--log={self.log_file}")
        self.running = True

    def destroy(self) -> None:
        """Stop the server if it runs, and remove its directory."""
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # --- Internals --------------------------------------------------------------------------

    def _initdb(self) -> None:
        self._run_as_server_user(
            self.bin_dir / "initdb",
            f"--pgdata={self.data_dir}",
            f"--username={SERVER_USER}",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            # See the module docstring: a default collation that is not code point order.
            "--locale-provider=icu",
            "--icu-locale=en-US",
            "--no-sync",
            "--no-instructions",
        )

    def _start_on_a_free_port(self) -> None:
        # Another process may take the port between our probe and the server's bind: try again.
        for attempt in range(3):
            self.port = free_loopback_port()
            self._write_settings()
            try:
                self.start()
                return
            except subprocess.CalledProcessError:
                if attempt == 2 or "could not bind" not in self._log_tail():
                    raise

    def _write_settings(self) -> None:
        settings = dict(CLUSTER_SETTINGS, port=str(self.port),
                        unix_socket_directories=str(self.socket_dir))
        text = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        (self.data_dir / "postgresql.auto.conf").write_text(
            "# Written by tests/pg_cluster.py\n" + text)

    def _pg_ctl(self, *arguments: str) -> None:
        self._run_as_server_user(self.bin_dir / "pg_ctl", f"--pgdata={self.data_dir}",
                                 *arguments)

    def _run_as_server_user(self, program: Path, *arguments: str) -> None:
        command = [str(program), *arguments]
        if os.geteuid() == 0:
            command = as_server_user(command)
        try:
            subprocess.run(command, cwd=self.base_dir, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, check=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            log.error("%s failed (exit %s):\n%s%s\nserver log:\n%s", " ".join(command),
                      exc.returncode, exc.stdout, exc.stderr, self._log_tail())
            raise

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def as_server_user(command: list[str]) -> list[str]:
    """`command` run as the server user (we are root, which PostgreSQL refuses to run as)."""
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--", *command]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups",
                "--", *command]
    pytest.fail("running as root, and neither runuser nor setpriv is there to run PostgreSQL "
                f"as the {SERVER_USER!r} user", pytrace=False)


def find_server_binaries() -> Path:
    """The bin directory of the newest PostgreSQL server installed, or a failed test."""

    def version_of(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))

    candidates = sorted((Path(path) for path in glob.glob(DEBIAN_BIN_GLOB)), key=version_of)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bin_dir in reversed(candidates):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    pytest.fail(f"PostgreSQL server programs (initdb, pg_ctl) not found in {DEBIAN_BIN_GLOB} "
                f"nor on PATH: {HOW_TO_INSTALL}", pytrace=False)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestServer:
    """A running PostgreSQL server, with one database of our own for the session.

    Each test gets a schema of its own in that database (`create_schema`, and `dsn(schema)` to
    reach it): a fresh, empty place for the store's tables that costs a millisecond, where a
    CREATE DATABASE costs a few hundred. `cluster` is the throwaway cluster behind the server,
    or None for a server named by ROSTER_PORT_TEST_PG_DSN (which the tests never stop).
    """

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, admin_dsn: str, cluster: ThrowawayCluster | None) -> None:
        self.admin_dsn = admin_dsn
        self.cluster = cluster
        self.database = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
        with self.connect(self.admin_dsn) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'")
                               .format(sql.Identifier(self.database)))

    def dsn(self, schema: str | None = None) -> str:
        """The session database; with `schema`, first (and only) on the search_path."""
        if schema is None:
            return make_conninfo(self.admin_dsn, dbname=self.database)
        return make_conninfo(self.admin_dsn, dbname=self.database,
                             options=f"-c search_path={schema}")

    @staticmethod
    def connect(dsn: str) -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)

    def create_schema(self) -> str:
        """A new, empty schema of the session database."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        with self.connect(self.dsn()) as connection:
            connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        return name

    def drop_schema(self, name: str) -> None:
        with self.connect(self.dsn()) as connection:
            # A test that failed half-way may have left a session holding a lock on its tables.
            self._terminate_other_sessions(connection)
            connection.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))

    @contextlib.contextmanager
    def refusing_connections(self) -> Iterator[None]:
        """The session database really unreachable: sessions cut, new ones refused, until exit.

        What a client sees is what it sees when the server goes away: its open connections die
        ("terminating connection due to administrator command") and new ones are refused. Only
        our own database is touched, so this works on a shared server too.
        """
        with self.connect(self.admin_dsn) as connection:
            self._allow_connections(connection, False)
            try:
                self._terminate_other_sessions(connection)
                yield
            finally:
                self._allow_connections(connection, True)

    def _terminate_other_sessions(self, connection: psycopg.Connection) -> None:
        connection.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()", (self.database,))

    def _allow_connections(self, connection: psycopg.Connection, allow: bool) -> None:
        connection.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(self.database), sql.Literal(allow)))

    def stop(self) -> None:
        """Drop the session database; stop the throwaway cluster."""
        try:
            with self.connect(self.admin_dsn) as connection:
                connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.database)))
        except psycopg.Error as exc:
            log.warning("could not drop the test database %s: %s", self.database, exc)
        finally:
            if self.cluster is not None:
                self.cluster.destroy()


_shared: TestServer | None = None
_shared_failure: str | None = None


def shared_server() -> TestServer:
    """The session's server, started on first use. Fails the test if there can be none."""
    global _shared, _shared_failure
    if _shared is not None:
        return _shared
    if _shared_failure is not None:  # fail every PostgreSQL test fast, with the first reason
        pytest.fail(_shared_failure, pytrace=False)
    external_dsn = os.environ.get(DSN_VARIABLE)
    try:
        if external_dsn:
            server = TestServer(make_conninfo(external_dsn, connect_timeout=5), cluster=None)
            log.info("testing PostgreSQL on %s (from %s)", dsn_without_password(external_dsn),
                     DSN_VARIABLE)
        else:
            cluster = ThrowawayCluster.start_new()
            try:
                server = TestServer(cluster.admin_dsn, cluster)
            except BaseException:
                cluster.destroy()
                raise
            log.info("started a throwaway PostgreSQL cluster in %s on port %d",
                     cluster.base_dir, cluster.port)
    except (OSError, subprocess.SubprocessError, psycopg.Error) as exc:
        where = f"the server of {DSN_VARIABLE}" if external_dsn else "a throwaway cluster"
        _shared_failure = f"cannot run PostgreSQL tests on {where}: {exc}; {HOW_TO_INSTALL}"
        pytest.fail(_shared_failure, pytrace=False)
    except pytest.fail.Exception as exc:
        _shared_failure = str(exc)
        raise
    _shared = server
    atexit.register(stop_shared_server)
    return server


def stop_shared_server() -> None:
    global _shared
    server, _shared = _shared, None
    if server is not None:
        server.stop()


# ejabberd's own PostgreSQL schemas, as Debian's ejabberd package ships them (the tests of the
# ejabberd mappings load them unchanged): pg.sql, the default single-host schema, and
# pg.new.sql, the schema of `new_sql_schema: true` (server_host columns, several hosts).
EJABBERD_PG_SQL = Path("/usr/share/ejabberd/sql/pg.sql")
EJABBERD_PG_NEW_SQL = Path("/usr/share/ejabberd/sql/pg.new.sql")


def ejabberd_pg_sql(*, new_schema: bool = False) -> str:
    """The text of ejabberd's pg.sql (pg.new.sql with `new_schema`); the test fails (never
    skips) when it is missing."""
    path = EJABBERD_PG_NEW_SQL if new_schema else EJABBERD_PG_SQL
    if not path.is_file():
        pytest.fail(f"{path} is missing: apt-get install ejabberd", pytrace=False)
    return path.read_text(encoding="utf-8")


def load_ejabberd_schema(dsn: str, *, new_schema: bool = False) -> None:
    """Create ejabberd's tables (its pg.sql or pg.new.sql, unchanged) in the first schema of
    `dsn`."""
    with TestServer.connect(dsn) as connection:
        connection.execute(ejabberd_pg_sql(new_schema=new_schema))


# Localparts and contacts the store contract (tests/store_contract.py) uses on its own host.
_OTHER_HOST_USERS = ("alice", "bob", *(f"property-{index}" for index in range(10)))
_OTHER_HOST_CONTACTS = ("same@example.com", "a@example.com", "kept@example.com",
                        "plain@example.com", "counter@example.com", "zoë@例え.jp",
                        "stranger@example.com")


def fill_other_ejabberd_host(connection: psycopg.Connection, host: str) -> None:
    """Rows of the localparts the store contract uses, on virtual host `host` of a pg.new.sql
    database, in the letters mod_roster_sql writes (items in every subscription, a stranger's
    request, groups, a stored version): what another host of the same ejabberd keeps there."""
    letters = ("B", "T", "F", "N")
    for username in _OTHER_HOST_USERS:
        for index, contact in enumerate(_OTHER_HOST_CONTACTS):
            ask = "I" if contact.startswith("stranger") else "N"
            connection.execute(
                """INSERT INTO rosterusers (username, server_host, jid, nick, subscription, ask,
                                            askmessage, server, subscribe, "type")
                   VALUES (%s, %s, %s, %s, %s, %s, %s, 'N', '', 'item')""",
                (username, host, contact, f"{username}'s {contact} on {host}",
                 letters[index % len(letters)], ask, "other host" if ask == "I" else ""))
            connection.execute(
                "INSERT INTO rostergroups (username, server_host, jid, grp) VALUES (%s, %s, %s, %s)",
                (username, host, contact, f"group on {host}"))
        connection.execute(
            "INSERT INTO roster_version (username, server_host, version) VALUES (%s, %s, %s)",
            (username, host, f"version of {username}@{host}"))
