"""Eight real program processes on one SQLite file, as ejabberd's pool runs them.

10,000 random subscription events and roster sets for a few hundred user pairs are split
between the processes by user, as the shim routes them (each user's events keep their order,
different users' events race freely), and sent pipelined. The final database, and every
response, must equal a sequential replay of the same events by one process on a fresh file.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import zlib
from pathlib import Path
from typing import Any

from roster_port.client import ProgramProcess
from roster_port.subscription import PRESENCE_TYPES

PROCESSES = 8
EVENTS = 10_000
WINDOW = 64  # requests in flight per process, below the pipe buffers on both sides


def make_events(seed: int = 6121) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    users = [f"user{index}@example.com" for index in range(120)]
    pairs = list({tuple(rng.sample(users, 2)) for _ in range(300)})
    events = []
    for _ in range(EVENTS):
        user, contact = rng.choice(pairs)
        if rng.random() < 0.5:
            user, contact = contact, user
        roll = rng.random()
        if roll < 0.45:
            events.append(("out_subscription", {"user": user, "contact": contact, "type": rng.choice(PRESENCE_TYPES)}))
        elif roll < 0.9:
            events.append(("in_subscription", {"user": user, "contact": contact, "type": rng.choice(PRESENCE_TYPES), "status": "hi"}))
        else:
            item = {"jid": contact, "name": f"name {rng.randrange(5)}", "groups": [f"g{rng.randrange(3)}"]}
            if roll > 0.97:
                item = {"jid": contact, "subscription": "remove"}
            events.append(("roster_iq", {"user": user, "requester": user, "type": "set", "items": [item]}))
    return events


def run(program: ProgramProcess, events: list[tuple[int, str, dict[str, Any]]], responses: dict[int, Any]) -> None:
    for start in range(0, len(events), WINDOW):
        window = events[start : start + WINDOW]
        sent = {program.send(op, args): index for index, op, args in window}
        for _ in window:
            _, request_id, error, result = program.read_message()
            responses[sent[request_id]] = error if error is not None else result


def write_config(directory: Path) -> Path:
    directory.mkdir()
    config = directory / "roster-port.toml"
    config.write_text('[store]\npath = "rosters.sqlite"\nbusy_timeout_ms = 30000\n[log]\nfile = "roster-port.log"\n')
    return config


def dump(database: Path) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        items = connection.execute("SELECT * FROM roster_items ORDER BY user, contact").fetchall()
        versions = connection.execute("SELECT * FROM roster_versions ORDER BY user").fetchall()
    return items + versions


def test_eight_processes_equal_a_sequential_replay(tmp_path):
    events = [(index, op, args) for index, (op, args) in enumerate(make_events())]

    concurrent_config = write_config(tmp_path / "concurrent")
    shards: list[list] = [[] for _ in range(PROCESSES)]
    for event in events:
        shards[zlib.crc32(event[2]["user"].encode()) % PROCESSES].append(event)
    concurrent: dict[int, Any] = {}
    programs = [ProgramProcess(concurrent_config) for _ in range(PROCESSES)]
    threads = [threading.Thread(target=run, args=(program, shard, concurrent)) for program, shard in zip(programs, shards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert [program.close() for program in programs] == [0] * PROCESSES

    sequential_config = write_config(tmp_path / "sequential")
    sequential: dict[int, Any] = {}
    with ProgramProcess(sequential_config) as program:
        run(program, events, sequential)

    assert len(concurrent) == len(sequential) == EVENTS
    assert all("code" not in response or response["code"] == "stanza_error" for response in concurrent.values())
    assert concurrent == sequential
    final = dump(tmp_path / "concurrent" / "rosters.sqlite")
    assert final == dump(tmp_path / "sequential" / "rosters.sqlite")
    assert len(final) > 300  # the events did build rosters
