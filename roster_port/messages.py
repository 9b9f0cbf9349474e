"""Messages inside frames: MessagePack-RPC shapes (docs/protocol.md, "Messages").

    request       [0, id, op, args]      shim -> program
    response      [1, id, error, result] program -> shim
    notification  [2, name, params]      program -> shim

Pure functions from bytes to values and back; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .config import MAX_GROUPS
from .errors import ProtocolError

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_ID = 2**64 - 1


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


def _is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def _text_of_bins(value: Any) -> Any:
    """msgpack `bin` where text is expected: accepted when it is UTF-8 (docs/protocol.md)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, list):
        return [_text_of_bins(item) for item in value]
    if isinstance(value, dict):
        return {_text_of_bins(key): _text_of_bins(item) for key, item in value.items()}
    return value


# What decoding one request may build, whatever its bytes say. A text or a bin costs about its
# own size, so the frame's size limit bounds those; what costs more than its bytes is a
# container (an empty array is one byte on the wire and about 60 in memory) and the scalars held
# in one. No request needs more than a handful of containers (the request, args, items, an item,
# its groups) or arrays longer than an item's groups: so a request may build at most
# MAX_CONTAINERS containers of at most MAX_CONTAINER_LEN entries each, refused as soon as
# decoding passes either bound. Deep nesting is bounded with them (it takes a container a level).
MAX_CONTAINERS = 64
MAX_CONTAINER_LEN = MAX_GROUPS  # the longest array a request needs: an item's groups
MAX_OP_LENGTH = 64


class _Budget:
    """Counts the containers one decoding builds (msgpack calls it as each one is complete)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_CONTAINERS

    def __call__(self, container: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"more than {MAX_CONTAINERS} arrays and maps in one request")
        return container


def _unpack(payload: bytes) -> Any:
    budget = _Budget()
    return msgpack.unpackb(
        payload,
        raw=False,
        strict_map_key=True,  # keys are text (or bin): never an unhashable array or map
        max_array_len=MAX_CONTAINER_LEN,
        max_map_len=MAX_CONTAINER_LEN,
        list_hook=budget,
        object_hook=budget,
    )


def decode_request(payload: bytes) -> Request:
    """The request in `payload`, or ProtocolError (with the id when it can be read).

    Never raises anything else, and never builds more than the bounds above allow.
    """
    try:
        message = _unpack(payload)
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        error = ProtocolError("bad_frame", f"not one msgpack value within bounds: {exc}"[:300])
        raise RequestError(recover_id(payload[:64]), error) from None
    if not isinstance(message, list) or not message or message[0] != REQUEST:
        raise RequestError(None, ProtocolError("bad_request", "not a request [0, id, op, args]"))
    request_id = message[1] if len(message) > 1 and _is_id(message[1]) else None
    if len(message) != 4 or request_id is None:
        raise RequestError(request_id, ProtocolError("bad_request", "a request is [0, id, op, args]"))
    _, _, op, args = message
    op, args = _text_of_bins(op), _text_of_bins(args)
    if not isinstance(op, str):
        raise RequestError(request_id, ProtocolError("bad_request", "op must be text"))
    if len(op) > MAX_OP_LENGTH:  # no op is; and an op is quoted in logs and errors
        raise RequestError(request_id, ProtocolError("unknown_op", f"an op of {len(op)} characters"))
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise RequestError(request_id, ProtocolError("bad_request", "args must be a map with text keys"))
    return Request(request_id, op, args)


class RequestError(Exception):
    """A request that cannot be served, with its id when one could be read."""

    def __init__(self, request_id: int | None, error: ProtocolError) -> None:
        super().__init__(error.message)
        self.request_id = request_id
        self.error = error


def recover_id(head: bytes) -> int | None:
    """The id of a request whose body starts with `head`, if it can be read from there."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() != 4 or unpacker.unpack() != REQUEST:
            return None
        request_id = unpacker.unpack()
    except Exception:  # noqa: BLE001 - any failure means the id is not there
        return None
    return request_id if _is_id(request_id) else None


def _pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def encode_response(request_id: int, result: dict[str, Any]) -> bytes:
    return _pack([RESPONSE, request_id, None, result])


def encode_error(request_id: int, error: dict[str, Any]) -> bytes:
    return _pack([RESPONSE, request_id, error, None])


def encode_notification(name: str, params: dict[str, Any]) -> bytes:
    return _pack([NOTIFICATION, name, params])


def encode_request(request_id: int, op: str, args: dict[str, Any]) -> bytes:
    """For clients of the program: the tests, `roster-port replay`, benchmarks."""
    return _pack([REQUEST, request_id, op, args])


def decode_message(payload: bytes) -> list[Any]:
    """Any message, undecoded beyond msgpack (for clients and transcripts)."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)
