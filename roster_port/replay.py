"""Replay a recorded transcript against a fresh store and report the differences.

A transcript is what the shim records with its `transcript` option: a stream of msgpack values
`[direction, worker, timestamp_ms, message]`, direction "in" for a frame the shim sent and "out"
for one the program sent (docs/protocol.md; erlang_shim/README.md). Replay sends every recorded
request, in file order, to one real program process on an empty store, and compares each
response with the recorded one.

Requests from different workers were concurrent when recorded; replaying them in file order
keeps each user's operations in order (the shim sends a user's requests to one worker), and
every operation touches one user's roster, so the responses must be the same. Versions are
per-user counters, deterministic from an empty store. Ids are renumbered (the workers' id
spaces overlap). Two things are normalised: hello answers are compared without
`capabilities.notifications`, since the recorded pool had one feed process and the replay asks
for none (a feed has nothing to report on a store no one else writes); and ping answers without
their counts of requests in flight, which say how busy the recorded process was.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from .client import ProgramProcess


@dataclass(frozen=True)
class Entry:
    direction: str
    worker: int
    timestamp_ms: int
    message: list[Any]


def read_transcript(path: str | Path) -> Iterator[Entry]:
    with open(path, "rb") as stream:
        for value in msgpack.Unpacker(stream, raw=False, strict_map_key=False):
            direction, worker, timestamp_ms, message = value
            yield Entry(direction, worker, timestamp_ms, message)


@dataclass(frozen=True)
class Difference:
    index: int  # position of the request in the transcript
    op: str
    args: dict[str, Any]
    recorded: Any
    replayed: Any

    def describe(self) -> str:
        return (
            f"request {self.index} {self.op} {json.dumps(self.args, sort_keys=True)}\n"
            f"  recorded: {json.dumps(self.recorded, sort_keys=True)}\n"
            f"  replayed: {json.dumps(self.replayed, sort_keys=True)}"
        )


def _outcome(op: str, message: list[Any]) -> dict[str, Any]:
    _, _, error, result = message
    if error is not None:
        return {"error": error}
    if op == "hello" and isinstance(result.get("capabilities"), dict):
        capabilities = {k: v for k, v in result["capabilities"].items() if k != "notifications"}
        result = {**result, "capabilities": capabilities}
    if op == "ping":  # how busy the process was then, not an answer of the roster logic
        result = {k: v for k, v in result.items() if k not in ("in_flight", "running")}
    return {"result": result}


def replay(path: str | Path, *, config_text: str = "") -> tuple[int, list[Difference]]:
    """Replay the transcript at `path`; return the number of requests and the differences.

    `config_text` is TOML for the program, without [store] (replay makes its own fresh one).
    """
    entries = list(read_transcript(path))
    recorded: dict[tuple[int, int], list[Any]] = {
        (entry.worker, entry.message[1]): entry.message
        for entry in entries
        if entry.direction == "out" and entry.message and entry.message[0] == 1
    }
    requests = [entry for entry in entries if entry.direction == "in" and entry.message[0] == 0]
    differences: list[Difference] = []
    with tempfile.TemporaryDirectory(prefix="roster-port-replay-") as tmp:
        config = Path(tmp) / "replay.toml"
        config.write_text(f'[store]\nbackend = "sqlite"\npath = "replay.sqlite"\n{config_text}')
        with ProgramProcess(str(config), hello=False) as program:
            for index, entry in enumerate(requests):
                _, request_id, op, args = entry.message
                if op == "hello":
                    args = {**args, "change_feed": False}
                sent_id = program.send(op, args)
                response = program.read_message()
                while response[0] != 1:  # a notification: not an answer
                    response = program.read_message()
                assert response[1] == sent_id, "the program answered another request"
                expected = recorded.get((entry.worker, request_id))
                if expected is None:
                    continue  # the shim gave up on it (deadline): nothing to compare
                if _outcome(op, expected) != _outcome(op, response):
                    differences.append(
                        Difference(index, op, args, _outcome(op, expected), _outcome(op, response))
                    )
    return len(requests), differences


def dump(path: str | Path) -> Iterator[str]:
    """The transcript as JSON lines, for people."""
    for entry in read_transcript(path):
        yield json.dumps(
            {"dir": entry.direction, "worker": entry.worker, "ts": entry.timestamp_ms, "msg": entry.message},
            sort_keys=True,
        )
