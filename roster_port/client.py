"""A client of the program over pipes, as the shim is: for `roster-port replay`, the tests and
the benchmarks. It spawns the real `roster-port serve` process and speaks frames to it."""

from __future__ import annotations

import itertools
import os
import selectors
import time
import subprocess
import sys
from typing import Any, BinaryIO

from .framing import HEADER, encode_frame
from .messages import decode_message, encode_request


class ProgramProcess:
    def __init__(self, config_path: str, *, stderr: int | BinaryIO | None = None, hello: bool = True) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "roster_port", "serve", "--config", str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self._ids = itertools.count(1)
        self._received = bytearray()
        if hello:
            self.call("hello", {"protocols": [2], "shim": "test", "host": "localhost"})

    def next_id(self) -> int:
        return next(self._ids)

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, op: str, args: dict[str, Any], request_id: int | None = None) -> int:
        request_id = self.next_id() if request_id is None else request_id
        self.write(encode_frame(encode_request(request_id, op, args)))
        return request_id

    def read_message(self, timeout: float = 60) -> list[Any]:
        """The next message from the program; TimeoutError after `timeout` seconds, so that a
        test waiting for an answer that never comes fails instead of hanging."""
        deadline = time.monotonic() + timeout
        header = self._read_exactly(HEADER.size, deadline)
        (length,) = HEADER.unpack(header)
        return decode_message(self._read_exactly(length, deadline))

    def _read_exactly(self, size: int, deadline: float) -> bytes:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while len(self._received) < size:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise TimeoutError(f"no message from the program (pid {self.process.pid}) in time")
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EOFError("the program closed its stdout")
                self._received += chunk
        data = bytes(self._received[:size])
        del self._received[:size]
        return data

    def call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its result; raise ProgramError on an error response."""
        request_id = self.send(op, args)
        message = self.read_message()
        if message[1] != request_id:
            raise AssertionError(f"response to {message[1]} while waiting for {request_id}")
        if message[2] is not None:
            raise ProgramError(message[2])
        return message[3]

    def close(self, timeout: float = 10) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.stdout:
                self.process.stdout.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ProgramProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            try:
                self.close()
            except Exception:  # noqa: BLE001
                self.kill()


class ProgramError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error
        self.code = error.get("code")

