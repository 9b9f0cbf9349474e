"""Frames on the wire: a 4-byte big-endian length, then that many bytes of one msgpack value.

Sans-IO: `FrameDecoder.feed(bytes)` returns the events the bytes complete, and
`encode_frame(payload)` returns bytes to write. The caller owns the pipe. This is what an Erlang
port opened with `{packet, 4}` reads and writes.

A frame over the size limit is never buffered: its body is skipped as it streams by, keeping
only the first bytes so the request id can still be recovered and answered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">I")
HEAD_KEPT = 64  # bytes of an oversized frame kept to recover its request id


@dataclass(frozen=True)
class Frame:
    payload: bytes


@dataclass(frozen=True)
class OversizedFrame:
    length: int
    head: bytes  # the first bytes of the body


FrameEvent = Frame | OversizedFrame


def encode_frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._skipping = 0  # bytes of an oversized body still to discard
        self._skipped_length = 0
        self._skipped_head = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (for a log line at EOF)."""
        return len(self._buffer) + (self._skipped_length - self._skipping if self._skipping else 0)

    def feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        view = memoryview(data)
        if self._skipping:
            view = self._skip(view, events)
        self._buffer += view
        while True:
            if len(self._buffer) < HEADER.size:
                break
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                rest = memoryview(bytes(self._buffer[HEADER.size :]))
                self._buffer.clear()
                self._skipping, self._skipped_length = length, length
                self._skipped_head = bytearray()
                rest = self._skip(rest, events)
                self._buffer += rest
                continue
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            events.append(Frame(bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return events

    def _skip(self, view: memoryview, events: list[FrameEvent]) -> memoryview:
        taken = min(self._skipping, len(view))
        if len(self._skipped_head) < HEAD_KEPT:
            self._skipped_head += view[: min(taken, HEAD_KEPT - len(self._skipped_head))]
        self._skipping -= taken
        if not self._skipping:
            events.append(OversizedFrame(self._skipped_length, bytes(self._skipped_head)))
        return view[taken:]
