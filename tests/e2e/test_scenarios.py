"""User-level scenarios against a real ejabberd 23.01 with mod_roster_port, the real program on
SQLite and real slixmpp clients, each on a fresh server (the conftest `ejabberd` fixture).

The scenarios themselves live in tests/e2e/scenarios.py, because
tests/e2e/record_transcripts.py runs the very same code to record tests/transcripts/. Each one
judges the server's view: raw roster IQs (never slixmpp's roster cache), the pushes and
presences every session received, and the rows the program stored.
"""

from __future__ import annotations

import asyncio

import pytest

from scenarios import SCENARIOS, World

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario(ejabberd, name):
    async def run():
        world = World(ejabberd)
        try:
            await SCENARIOS[name](world)
        finally:
            await world.close()

    asyncio.run(run())


def test_every_requested_scenario_exists():
    """The scenarios the transcripts are recorded from: a rename here must rename a file."""
    assert set(SCENARIOS) == {
        "login_and_roster_get",
        "add_rename_regroup_remove",
        "subscription_handshake_both_directions",
        "subscription_denied",
        "subscription_cancelled",
        "pre_approval",
        "request_while_offline",
        "remove_user",
        "two_resources",
    }
