"""examples/social: a social application's own tables served as rosters, through its mapping.

The real `roster-port serve` process, driven over pipes as the shim drives it, on a real
PostgreSQL holding examples/social/schema.sql. The application's rows are the only data: each
test writes them in plain SQL, as the application does, or reads what the program wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from roster_port.client import ProgramError, ProgramProcess
from roster_port.store.base import RosterRow

pytestmark = pytest.mark.postgres

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "social"
DOMAIN = "social.example"
PEOPLE = {"alice": "Alice Liddell", "bob": "Bob Marley", "carol": "Carol King",
          "dave": "Dave Brubeck", "erin": "Erin Brockovich", "frank": "Frank Zappa"}


def jid(username: str) -> str:
    return f"{username}@{DOMAIN}"


@pytest.fixture
def dsn(pg_server) -> str:
    schema = pg_server.create_schema()
    dsn = pg_server.dsn(schema)
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
        for username, display_name in PEOPLE.items():
            connection.execute("INSERT INTO users (username, display_name) VALUES (%s, %s)",
                               (username, display_name))
    yield dsn
    pg_server.drop_schema(schema)


def app_sql(dsn: str, query: str, parameters: tuple = ()) -> list[tuple]:
    """What the application does or sees: plain SQL on its own connection."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        cursor = connection.execute(query, parameters)
        return cursor.fetchall() if cursor.description else []


def befriend(dsn: str, requester: str, addressee: str, status: str, message: str = "") -> None:
    app_sql(dsn, """
        INSERT INTO friendships (requester_id, addressee_id, status, message)
        SELECT r.id, a.id, %s, %s FROM users r, users a WHERE r.username = %s AND a.username = %s
    """, (status, message, requester, addressee))


def tag(dsn: str, owner: str, friend: str, *tags: str) -> None:
    for label in tags:
        app_sql(dsn, """
            INSERT INTO tags (owner_id, friend_id, tag)
            SELECT o.id, f.id, %s FROM users o, users f WHERE o.username = %s AND f.username = %s
        """, (label, owner, friend))


def friendships(dsn: str) -> set[tuple[str, str, str]]:
    return set(app_sql(dsn, """
        SELECT r.username, a.username, f.status FROM friendships f
        JOIN users r ON r.id = f.requester_id JOIN users a ON a.id = f.addressee_id
    """))


def write_config(tmp_path: Path, dsn: str, *, read_only: bool = False,
                 mapping: Path = EXAMPLE / "mapping.toml") -> Path:
    config = tmp_path / "roster-port.toml"
    config.write_text(
        "[store]\n"
        'backend = "postgres_mapped"\n'
        f"dsn = {json.dumps(dsn)}\n"
        f"mapping = {json.dumps(str(mapping))}\n"
        "connect_timeout_s = 2\n"
        "[roster]\n"
        "pre_approval = false\n"
        f"read_only = {'true' if read_only else 'false'}\n"
        "[log]\n"
        'level = "debug"\n'
        'file = "roster-port.log"\n', encoding="utf-8")
    return config


@pytest.fixture
def program(tmp_path, dsn):
    with ProgramProcess(write_config(tmp_path, dsn)) as process:
        yield process


def roster(program: ProgramProcess, user: str) -> dict[str, dict]:
    return {item["jid"]: item for item in program.call("roster_get", {"user": user})["items"]}


# --- Reading: the roster is the application's friend list ------------------------------------


def test_a_users_roster_is_the_applications_friend_list(dsn, program):
    befriend(dsn, "alice", "bob", "accepted")
    befriend(dsn, "carol", "alice", "accepted")
    befriend(dsn, "alice", "dave", "requested", "hi Dave")   # Alice asked, no answer yet
    befriend(dsn, "erin", "alice", "requested", "hi Alice")  # Erin asked Alice
    befriend(dsn, "frank", "alice", "blocked")
    befriend(dsn, "bob", "carol", "declined")
    tag(dsn, "alice", "bob", "music", "Friends")
    tag(dsn, "bob", "alice", "wonderland")

    # The application's own answer to "who are Alice's friends?"
    friends = {jid(username) for (username,) in app_sql(dsn, """
        SELECT other.username FROM users me, friendships f, users other
        WHERE me.username = 'alice' AND f.status = 'accepted'
          AND me.id IN (f.requester_id, f.addressee_id)
          AND other.id IN (f.requester_id, f.addressee_id) AND other.id <> me.id
    """)}
    items = roster(program, jid("alice"))
    assert {contact for contact, item in items.items() if item["subscription"] == "both"} == friends
    assert items[jid("bob")] == {"jid": jid("bob"), "name": "Bob Marley", "subscription": "both",
                                 "ask": None, "approved": False, "groups": ["Friends", "music"]}
    assert items[jid("carol")]["name"] == "Carol King"
    # A request Alice sent is an item, asking; one she received is not an item (yet) ...
    assert items[jid("dave")]["subscription"] == "none" and items[jid("dave")]["ask"] == "subscribe"
    assert set(items) == friends | {jid("dave")}
    # ... but it is re-sent to her at login, with its text. Blocked never appears anywhere.
    pending = program.call("pending_in", {"user": jid("alice")})["requests"]
    assert pending == [{"from": jid("erin"), "status": "hi Alice"}]
    assert jid("frank") not in roster(program, jid("alice"))
    assert jid("alice") not in roster(program, jid("frank"))
    assert program.call("jid_info", {"user": jid("alice"), "contact": jid("frank")}) == {
        "subscription": "none", "ask": "none", "groups": [], "effects": []}
    assert program.call("jid_info", {"user": jid("bob"), "contact": jid("alice")}) == {
        "subscription": "both", "ask": "none", "groups": ["wonderland"], "effects": []}


def test_the_version_follows_the_applications_rows(dsn, program):
    def query(ver):
        return program.call("roster_iq", {"user": jid("alice"), "requester": jid("alice"),
                                          "type": "get", "items": [], "ver": ver})

    first = query(None)
    assert first["items"] == [] and first["ver"] == "0"
    befriend(dsn, "alice", "bob", "accepted")
    second = query(first["ver"])
    assert second["ver"] != first["ver"] and [item["jid"] for item in second["items"]] == [jid("bob")]
    assert query(second["ver"])["items"] is None  # nothing changed: the client's copy is current
    tag(dsn, "alice", "bob", "music")  # the application tags Bob: a new version
    assert query(second["ver"])["items"][0]["groups"] == ["music"]


# --- Writing: XMPP actions become the application's rows --------------------------------------


def test_a_subscription_handshake_writes_the_friendship_requested_then_accepted(dsn, program):
    alice, bob = jid("alice"), jid("bob")
    out = program.call("out_subscription", {"user": alice, "contact": bob, "type": "subscribe",
                                            "status": "hello"})
    assert out["route"] is True
    assert friendships(dsn) == {("alice", "bob", "requested")}
    # Alice's client is pushed the truth: Bob, by his name in the application, asked.
    [push] = [effect for effect in out["effects"] if effect["type"] == "push"]
    assert push["item"]["jid"] == bob and push["item"]["name"] == "Bob Marley"
    assert push["item"]["subscription"] == "none" and push["item"]["ask"] == "subscribe"

    program.call("in_subscription", {"user": bob, "contact": alice, "type": "subscribe",
                                     "status": "hello"})
    assert friendships(dsn) == {("alice", "bob", "requested")}
    assert program.call("jid_info", {"user": bob, "contact": alice})["ask"] == "in"

    approved = program.call("out_subscription", {"user": bob, "contact": alice,
                                                 "type": "subscribed", "status": None})
    assert approved["route"] is True
    assert friendships(dsn) == {("alice", "bob", "accepted")}
    assert {"type": "send_presence", "user": bob, "to": alice} in approved["effects"]
    program.call("in_subscription", {"user": alice, "contact": bob, "type": "subscribed",
                                     "status": None})
    assert friendships(dsn) == {("alice", "bob", "accepted")}
    assert roster(program, alice)[bob]["subscription"] == "both"
    assert roster(program, bob)[alice]["subscription"] == "both"


def test_denying_a_request_writes_declined_and_the_request_is_gone(dsn, program):
    befriend(dsn, "carol", "bob", "requested", "remember me?")
    bob, carol = jid("bob"), jid("carol")
    assert program.call("pending_in", {"user": bob})["requests"] == [
        {"from": carol, "status": "remember me?"}]
    program.call("out_subscription", {"user": bob, "contact": carol, "type": "unsubscribed",
                                      "status": None})
    assert friendships(dsn) == {("carol", "bob", "declined")}
    assert program.call("pending_in", {"user": bob})["requests"] == []
    assert carol not in roster(program, bob) and bob not in roster(program, carol)


def test_a_roster_set_tags_a_friend_and_a_remove_declines_the_friendship(dsn, program):
    befriend(dsn, "alice", "bob", "accepted")
    alice, bob = jid("alice"), jid("bob")
    result = program.call("roster_iq", {"user": alice, "requester": alice, "type": "set",
                                        "items": [{"jid": bob, "name": "Bobby",
                                                   "groups": ["band", "music"]}]})
    assert app_sql(dsn, "SELECT tag FROM tags ORDER BY tag") == [("band",), ("music",)]
    # The application owns names: the push says what the roster now is.
    [push] = result["effects"]
    assert push["item"]["name"] == "Bob Marley" and push["item"]["groups"] == ["band", "music"]

    program.call("roster_iq", {"user": alice, "requester": alice, "type": "set",
                               "items": [{"jid": bob, "subscription": "remove"}]})
    assert friendships(dsn) == {("alice", "bob", "declined")}
    assert app_sql(dsn, "SELECT count(*) FROM tags") == [(0,)]
    assert roster(program, alice) == {} and roster(program, bob) == {}


def test_blocked_relationships_never_change_through_xmpp(dsn, program):
    befriend(dsn, "frank", "alice", "blocked")
    alice, frank = jid("alice"), jid("frank")
    # The blocked row keeps nothing of a request: refused, rather than routed to Frank.
    with pytest.raises(ProgramError) as refused:
        program.call("out_subscription", {"user": alice, "contact": frank, "type": "subscribe",
                                          "status": None})
    assert refused.value.error["stanza_error"]["condition"] == "not-allowed"
    # Nor is one that comes all the same (another node, an old journal) shown to Frank.
    assert program.call("in_subscription", {"user": frank, "contact": alice, "type": "subscribe",
                                            "status": None})["deliver"] is False
    program.call("out_subscription", {"user": frank, "contact": alice, "type": "subscribed",
                                      "status": None})
    assert friendships(dsn) == {("frank", "alice", "blocked")}
    assert frank not in roster(program, alice) and alice not in roster(program, frank)


def test_someone_outside_the_application_is_not_stored(dsn, program):
    outsider = "stranger@elsewhere.example"
    # A request nothing would record is refused (an error presence to the client), not routed
    # (tests/test_symmetric_rows.py has the rest of "a store that cannot hold an item").
    with pytest.raises(ProgramError) as refused:
        program.call("out_subscription", {"user": jid("alice"), "contact": outsider,
                                          "type": "subscribe", "status": None})
    assert refused.value.error["stanza_error"]["condition"] == "not-allowed"
    assert friendships(dsn) == set() and roster(program, jid("alice")) == {}


# --- Read-only: the application alone changes relationships ------------------------------------


def read_only_mapping(tmp_path: Path) -> Path:
    """The example's mapping without its write statements."""
    text = (EXAMPLE / "mapping.toml").read_text(encoding="utf-8")
    head, _, rest = text.partition("# %(status)s is the word")
    _, _, tail = rest.partition("# No version statement")
    path = tmp_path / "read-only-mapping.toml"
    path.write_text(head + "# No version statement" + tail, encoding="utf-8")
    assert "put =" not in path.read_text() and "lock_user" in path.read_text()
    return path


def test_read_only_refuses_a_roster_set_with_not_allowed_and_still_reads(dsn, tmp_path):
    befriend(dsn, "alice", "bob", "accepted")
    mapping = read_only_mapping(tmp_path)
    # lock_user is a write statement too: drop it, as an operator with a read-only role would.
    mapping.write_text(mapping.read_text().replace("lock_user =", "# lock_user ="))
    config = write_config(tmp_path, dsn, read_only=True, mapping=mapping)
    alice, bob = jid("alice"), jid("bob")
    with ProgramProcess(config) as program:
        with pytest.raises(ProgramError) as refused:
            program.call("roster_iq", {"user": alice, "requester": alice, "type": "set",
                                       "items": [{"jid": jid("carol"), "name": "Carol"}]})
        assert refused.value.error["stanza_error"]["condition"] == "not-allowed"
        answer = program.call("out_subscription", {"user": alice, "contact": jid("dave"),
                                                   "type": "subscribe", "status": None})
        assert answer["route"] is False
        assert [item["jid"] for item in program.call("roster_get", {"user": alice})["items"]] == [bob]
    assert friendships(dsn) == {("alice", "bob", "accepted")}


def check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roster_port", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_check_says_a_mapping_without_writes_needs_read_only(dsn, tmp_path):
    mapping = read_only_mapping(tmp_path)
    mapping.write_text(mapping.read_text().replace("lock_user =", "# lock_user ="))
    refused = check(write_config(tmp_path, dsn, read_only=False, mapping=mapping))
    assert refused.returncode != 0
    assert "no write statements" in refused.stderr and "read_only = true" in refused.stderr
    accepted = check(write_config(tmp_path, dsn, read_only=True, mapping=mapping))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "read-only: the mapping has no write statements" in accepted.stdout


def test_check_accepts_the_example_and_names_a_statement_that_does_not_fit(dsn, tmp_path):
    accepted = check(write_config(tmp_path, dsn))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "mapping.toml" in accepted.stdout and "version derived from the rows" in accepted.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text((EXAMPLE / "mapping.toml").read_text().replace(
        "FROM tags WHERE owner_id = %(user_id)s::bigint\"",
        "FROM tagz WHERE owner_id = %(user_id)s::bigint\"").replace(
        "ORDER BY t.tag COLLATE", "ORDER BY t.label COLLATE", 1))
    refused = check(write_config(tmp_path, dsn, mapping=broken))
    assert refused.returncode == 1
    assert "statements.rows" in refused.stdout and "t.label" in refused.stdout
    assert "statements.delete_all[1]" in refused.stdout and "tagz" in refused.stdout


# --- The documented triggers (examples/social/triggers.sql) -----------------------------------


def test_the_documented_triggers_report_each_change_for_both_rosters(dsn):
    # roster_port_log_change() is roster-port's own function; a stand-in records the calls.
    app_sql(dsn, """
        CREATE TABLE logged (username text, contact text, old text, new text,
                             seq bigint GENERATED ALWAYS AS IDENTITY);
        CREATE FUNCTION roster_port_log_change(p_username text, p_contact text,
                                               p_old_subscription text, p_new_subscription text)
        RETURNS void LANGUAGE sql AS
        'INSERT INTO logged (username, contact, old, new) VALUES ($1, $2, $3, $4)';
    """)
    app_sql(dsn, (EXAMPLE / "triggers.sql").read_text(encoding="utf-8"))

    def drain() -> list[tuple]:
        rows = app_sql(dsn, "SELECT username, contact, old, new FROM logged ORDER BY seq")
        app_sql(dsn, "DELETE FROM logged")
        return rows

    alice, bob = jid("alice"), jid("bob")
    befriend(dsn, "alice", "bob", "requested")
    assert drain() == [(alice, bob, None, "none"), (bob, alice, None, "none")]
    app_sql(dsn, "UPDATE friendships SET status = 'accepted'")
    assert drain() == [(alice, bob, "none", "both"), (bob, alice, "none", "both")]
    tag(dsn, "bob", "alice", "wonderland")
    assert drain() == [(bob, alice, "both", "both")]
    app_sql(dsn, "UPDATE users SET display_name = 'Alice L.' WHERE username = 'alice'")
    assert drain() == [(bob, alice, "both", "both")]
    app_sql(dsn, "UPDATE friendships SET status = 'blocked'")
    assert drain() == [(alice, bob, "both", None), (bob, alice, "both", None)]
    tag(dsn, "alice", "bob", "ignored")  # not in any roster: nothing to report
    assert drain() == []


def test_with_the_change_log_the_feed_reports_the_applications_changes(dsn):
    from roster_port.store.mapped import MappedPostgresStore
    from roster_port.store.pg_changes import install_change_log

    with psycopg.connect(dsn) as connection:
        install_change_log(connection)
    app_sql(dsn, (EXAMPLE / "triggers.sql").read_text(encoding="utf-8"))
    store = MappedPostgresStore(dsn, mapping=str(EXAMPLE / "mapping.toml"), connect_timeout_s=2)
    store.origin = "ejabberd@node1"
    feed = store.open_change_feed()
    try:
        assert feed is not None and feed.read() == []
        befriend(dsn, "alice", "bob", "accepted")  # the application, on its own
        with store.transaction(jid("carol")) as txn:  # the program, for carol: her entry is its own
            txn.put(RosterRow(jid("dave"), pending_out=True))
        changes = feed.read()
        # Carol's write was pushed by its response: not reported. The same friendship row is
        # Dave's too (a request pending from Carol): that entry is reported, for Dave's sessions.
        assert {(change.user, change.contact, change.new_subscription) for change in changes} == {
            (jid("alice"), jid("bob"), "both"), (jid("bob"), jid("alice"), "both"),
            (jid("dave"), jid("carol"), "none")}
    finally:
        if feed is not None:
            feed.close()
        store.close()
