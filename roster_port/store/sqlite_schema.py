"""The SQLite schema of roster-port, as sqlite-utils migrations.

Imported only when a database needs migrating (see SQLiteStore._migrate): sqlite-utils and what
it pulls in cost a program process more memory than everything else it loads, and a process
serving a current schema never needs them.

Migrations are append-only: a released step is never edited, a schema change is a new step,
and its name is added to MIGRATION_NAMES in sqlite.py.
"""

from __future__ import annotations

import sqlite_utils

from roster_port.store.base import SUBSCRIPTIONS

SCHEMA = sqlite_utils.Migrations("roster_port")

_SUBSCRIPTION_LIST = ", ".join(f"'{state}'" for state in SUBSCRIPTIONS)  # constants, not data


@SCHEMA(name="0001_roster_items")
def _create_roster_items(db: sqlite_utils.Database) -> None:
    # Written out by hand because sqlite-utils' create() cannot say WITHOUT ROWID nor CHECK.
    # WITHOUT ROWID clusters the rows on (user, contact): a full roster (50 or 5,000 items) is one
    # contiguous range of the b-tree, read in contact order with no sort and no second lookup
    # per row. Groups are a JSON array in the row for the same reason (no join to read them).
    # The CHECKs keep other applications writing this table in plain SQL from storing rows that
    # the program could not read back.
    db.execute(
        f"""
        CREATE TABLE roster_items (
            user TEXT NOT NULL,
            contact TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            subscription TEXT NOT NULL DEFAULT 'none'
                CHECK (subscription IN ({_SUBSCRIPTION_LIST})),
            pending_out INTEGER NOT NULL DEFAULT 0 CHECK (pending_out IN (0, 1)),
            pending_in INTEGER NOT NULL DEFAULT 0 CHECK (pending_in IN (0, 1)),
            approved INTEGER NOT NULL DEFAULT 0 CHECK (approved IN (0, 1)),
            in_roster INTEGER NOT NULL DEFAULT 1 CHECK (in_roster IN (0, 1)),
            groups TEXT NOT NULL DEFAULT '[]'
                CHECK (json_valid(groups) AND json_type(groups) = 'array'),
            request_text TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (user, contact)
        ) WITHOUT ROWID
        """
    )


@SCHEMA(name="0002_roster_versions")
def _create_roster_versions(db: sqlite_utils.Database) -> None:
    db["roster_versions"].create(
        {"user": str, "counter": int},
        pk="user",
        not_null={"counter"},
        defaults={"counter": 0},
    )


def _bump_counter_sql(user_expression: str) -> str:
    # An upsert, so the first write of a user creates the counter row.
    return (
        f"INSERT INTO roster_versions (user, counter) VALUES ({user_expression}, 1) "
        "ON CONFLICT (user) DO UPDATE SET counter = counter + 1;"
    )


@SCHEMA(name="0003_version_triggers")
def _create_version_triggers(db: sqlite_utils.Database) -> None:
    db.execute(
        "CREATE TRIGGER roster_items_version_on_insert AFTER INSERT ON roster_items "
        f"BEGIN {_bump_counter_sql('NEW.user')} END"
    )
    db.execute(
        "CREATE TRIGGER roster_items_version_on_update AFTER UPDATE ON roster_items "
        f"BEGIN {_bump_counter_sql('OLD.user')} END"
    )
    # An UPDATE that moves a row to another user changes that user's roster too.
    db.execute(
        "CREATE TRIGGER roster_items_version_on_update_of_user AFTER UPDATE OF user ON roster_items "
        f"WHEN NEW.user IS NOT OLD.user BEGIN {_bump_counter_sql('NEW.user')} END"
    )
    db.execute(
        "CREATE TRIGGER roster_items_version_on_delete AFTER DELETE ON roster_items "
        f"BEGIN {_bump_counter_sql('OLD.user')} END"
    )


@SCHEMA(name="0004_roster_changes")
def _create_change_log(db: sqlite_utils.Database) -> None:
    # Every change of a row, by anyone, is logged by triggers. The program stamps the entries
    # of its own transactions with its origin (the ejabberd node it serves) before it commits
    # them (see _SQLiteTxn._stamp_own_changes); other applications' entries have no origin.
    # SQLiteChangeFeed reports every entry whose origin is not its own node's.
    db.execute(
        """
        CREATE TABLE roster_changes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user TEXT NOT NULL,
            contact TEXT NOT NULL,
            old_subscription TEXT,
            new_subscription TEXT,
            origin TEXT,
            recorded_at REAL NOT NULL DEFAULT (julianday('now'))
        )
        """
    )
    log_change = (
        "INSERT INTO roster_changes (user, contact, old_subscription, new_subscription) "
        "VALUES ({user}, {contact}, {old}, {new});"
    )
    moved = "(NEW.user IS NOT OLD.user OR NEW.contact IS NOT OLD.contact)"
    db.execute(
        "CREATE TRIGGER roster_items_log_insert AFTER INSERT ON roster_items BEGIN "
        + log_change.format(user="NEW.user", contact="NEW.contact", old="NULL", new="NEW.subscription")
        + " END"
    )
    db.execute(
        "CREATE TRIGGER roster_items_log_update AFTER UPDATE ON roster_items BEGIN "
        + log_change.format(
            user="OLD.user",
            contact="OLD.contact",
            old="OLD.subscription",
            new=f"CASE WHEN {moved} THEN NULL ELSE NEW.subscription END",
        )
        + " END"
    )
    db.execute(
        f"CREATE TRIGGER roster_items_log_move AFTER UPDATE ON roster_items WHEN {moved} BEGIN "
        + log_change.format(user="NEW.user", contact="NEW.contact", old="NULL", new="NEW.subscription")
        + " END"
    )
    db.execute(
        "CREATE TRIGGER roster_items_log_delete AFTER DELETE ON roster_items BEGIN "
        + log_change.format(user="OLD.user", contact="OLD.contact", old="OLD.subscription", new="NULL")
        + " END"
    )


@SCHEMA(name="0005_request_elements")
def _add_request_elements(db: sqlite_utils.Database) -> None:
    # A pending inbound request kept whole (RFC 6121 3.1.3): its statuses with their languages
    # and its extended content, one XML text each, a JSON array (base.RosterRow). Existing rows
    # read as requests without elements, their text kept, which is what they held.
    db.execute(
        "ALTER TABLE roster_items ADD COLUMN request_elements TEXT NOT NULL DEFAULT '[]' "
        "CHECK (json_valid(request_elements) AND json_type(request_elements) = 'array')"
    )


@SCHEMA(name="0006_roster_changes_by_user")
def _index_changes_by_user(db: sqlite_utils.Database) -> None:
    # A notification asks whether its user has entries after the feed's read
    # (RosterTxn.logged_after): without this index that walks every entry after the read, for
    # each user of a batch (a bulk change of N users: N x N).
    db.execute("CREATE INDEX roster_changes_by_user ON roster_changes (user, id)")
