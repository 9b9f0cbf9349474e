"""The real `roster-port serve` process on PostgreSQL, spoken to over pipes as the shim does:
changes made outside XMPP, or through another ejabberd node, come as `roster_changed`
notifications (the PostgreSQL versions of the SQLite tests in test_program.py).
"""

from __future__ import annotations

import json
import select
import time

import psycopg
import pytest

from roster_port.client import ProgramProcess

pytestmark = pytest.mark.postgres

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
HELLO = {"protocols": [2], "shim": "test", "host": "example.com"}


@pytest.fixture
def dsn(pg_server) -> str:
    schema = pg_server.create_schema()
    yield pg_server.dsn(schema)
    pg_server.drop_schema(schema)


@pytest.fixture
def config(tmp_path, dsn):
    path = tmp_path / "roster-port.toml"
    path.write_text(
        # json.dumps of an ASCII text is a TOML basic string.
        f'[store]\nbackend = "postgres"\ndsn = {json.dumps(dsn)}\nconnect_timeout_s = 1.0\n'
        '[log]\nlevel = "debug"\nfile = "roster-port.log"\n'
    )
    return path


def hello_with_feed(program: ProgramProcess, node: str) -> dict:
    """The shim's hello asking for the feed. The program opens its feed after answering it,
    before it reads the next request: once a ping is answered, the feed reports every change."""
    hello = program.call("hello", {**HELLO, "node": node, "change_feed": True})
    assert program.call("ping", {})["effects"] == []
    return hello


def outside_sql(dsn: str, query: str, parameters: tuple = ()) -> None:
    """What psql or another application does: its own connection, plain SQL, autocommit."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(query, parameters)


def next_message(program: ProgramProcess, timeout: float) -> list | None:
    """The next message the program writes within `timeout` seconds, or None."""
    ready, _, _ = select.select([program.process.stdout], [], [], timeout)
    return program.read_message() if ready else None


def messages_until(program: ProgramProcess, last, timeout: float) -> list[list]:
    """The messages the program writes until one for which `last` is true, or `timeout`."""
    messages: list[list] = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        message = next_message(program, remaining)
        if message is None:
            break
        messages.append(message)
        if last(message):
            break
    return messages


def pushes(notification: list) -> dict[str, dict]:
    return {effect["item"]["jid"]: effect["item"]
            for effect in notification[2]["effects"] if effect["type"] == "push"}


def test_changes_made_outside_are_notified_and_own_changes_are_not(config, dsn):
    with ProgramProcess(config, hello=False) as program:
        hello = hello_with_feed(program, "ejabberd@a")
        assert hello["capabilities"]["notifications"] is True
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                   "items": [{"jid": BOB, "name": "Bob"}]})
        # Our own write was pushed in its response: never notified.
        assert next_message(program, 0.5) is None

        # Another application, in one transaction: Carol becomes Alice's friend, Bob renamed.
        started = time.monotonic()
        with psycopg.connect(dsn) as outside:
            outside.execute("INSERT INTO roster_items (username, contact, name, subscription) "
                            "VALUES (%s, %s, 'Carol', 'both')", (ALICE, CAROL))
            outside.execute("UPDATE roster_items SET name = 'Robert' "
                            "WHERE username = %s AND contact = %s", (ALICE, BOB))
        notification = next_message(program, 1.0)
        assert notification is not None, "no notification within 1 s"
        assert time.monotonic() - started < 1.0
        assert notification[:2] == [2, "roster_changed"]
        params = notification[2]
        assert params["user"] == ALICE
        assert pushes(notification)[BOB]["name"] == "Robert"
        assert pushes(notification)[CAROL]["subscription"] == "both"
        assert {"type": "send_presence", "user": ALICE, "to": CAROL} in params["effects"]
        version = program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "get",
                                             "items": []})["ver"]
        assert {effect["ver"] for effect in params["effects"] if "ver" in effect} == {version}

        # Own write again: quiet. Then a psql-style DELETE: a remove push and unavailable.
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                   "items": [{"jid": BOB, "subscription": "remove"}]})
        assert next_message(program, 0.5) is None
        outside_sql(dsn, "DELETE FROM roster_items WHERE username = %s AND contact = %s",
                    (ALICE, CAROL))
        notification = next_message(program, 1.0)
        assert notification is not None, "no notification within 1 s"
        assert notification[2]["effects"] == [
            {"type": "push", "user": ALICE, "ver": notification[2]["effects"][0]["ver"],
             "item": {"jid": CAROL, "name": "", "subscription": "remove", "ask": None,
                      "approved": False, "groups": []}},
            {"type": "send_unavailable", "user": ALICE, "to": CAROL},
        ]
        assert program.call("ping", {})["effects"] == []  # answered next: nothing else was waiting


def test_a_change_made_through_another_node_is_notified_on_this_one(config):
    with ProgramProcess(config, hello=False) as node_a, \
            ProgramProcess(config, hello=False) as node_b:
        hello_with_feed(node_a, "ejabberd@a")
        hello_with_feed(node_b, "ejabberd@b")
        result = node_a.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                           "items": [{"jid": BOB, "name": "Bob"}]})
        [push] = result["effects"]
        assert next_message(node_b, 1.0) == [2, "roster_changed",
                                             {"user": ALICE, "effects": [push]}]
        # Node B's change: notified on A, not on B, whose response pushed it.
        node_b.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                  "items": [{"jid": BOB, "name": "Bobby"}]})
        notification = next_message(node_a, 1.0)
        assert notification is not None
        assert notification[2]["effects"][0]["item"]["name"] == "Bobby"
        assert next_message(node_b, 0.3) is None
        assert node_a.call("ping", {})["effects"] == []  # answered next: nothing else was waiting


def test_a_process_without_the_feed_is_never_notified(config, dsn):
    # The shim asks one process of its pool for the feed; the others stay quiet.
    with ProgramProcess(config, hello=False) as program:
        assert program.call("hello", HELLO)["capabilities"]["notifications"] is False
        outside_sql(dsn, "INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                    (ALICE, CAROL))
        assert next_message(program, 0.5) is None


@pytest.fixture
def cluster(pg_server):
    if pg_server.cluster is None:
        pytest.skip("the server of ROSTER_PORT_TEST_PG_DSN is not ours to restart")
    yield pg_server.cluster
    if not pg_server.cluster.running:
        pg_server.cluster.start()


def test_the_feed_reconnects_after_a_restart_of_postgresql(config, dsn, cluster, tmp_path):
    with ProgramProcess(config, hello=False) as program:
        hello_with_feed(program, "ejabberd@a")
        outside_sql(dsn, "INSERT INTO roster_items (username, contact) VALUES (%s, %s)",
                    (ALICE, "before@example.com"))
        assert next_message(program, 1.0) is not None
        cluster.restart()
        outside_sql(dsn, "INSERT INTO roster_items (username, contact, subscription) "
                         "VALUES (%s, %s, 'to')", (ALICE, CAROL))
        # The reconnector retries after 0.1 s, 0.2 s, 0.4 s, then every 0.5 s. Once it has, the
        # shim is told to drop its cache (feed_resumed), and what was logged meanwhile comes.
        messages = messages_until(program, lambda message: message[1] == "roster_changed", 10.0)
        assert messages[-1][1] == "roster_changed", "nothing notified after the restart"
        assert pushes(messages[-1])[CAROL]["subscription"] == "to"
        if not any(message[1] == "feed_resumed" for message in messages):
            assert next_message(program, 2.0) == [2, "feed_resumed", {"effects": []}]
        # The process serves on: its pooled connections were replaced too.
        program.call("roster_iq", {"user": ALICE, "requester": ALICE, "type": "set",
                                   "items": [{"jid": BOB}]})
        assert next_message(program, 0.5) is None
        outside_sql(dsn, "DELETE FROM roster_items WHERE contact = %s", (BOB,))
        notification = next_message(program, 1.0)
        assert notification is not None and pushes(notification)[BOB]["subscription"] == "remove"
    log_text = (tmp_path / "roster-port.log").read_text()
    assert "connection lost" in log_text and "reconnected" in log_text
