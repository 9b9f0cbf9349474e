"""Errors as values: what an operation answers when it refuses a request.

A `StanzaError` is an XMPP error (RFC 6120 section 8.3) the shim puts on the IQ; a
`ProtocolError` is about the request itself (shape, op, protocol version). Both travel to the
shim as the `error` of a response (docs/protocol.md), never as a dead process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# Not frozen: contextlib sets __traceback__ on exceptions passing through a `with`.
@dataclass
class StanzaError(Exception):
    type: str  # modify | cancel | auth | wait
    condition: str  # an RFC 6120 defined condition, e.g. bad-request
    text: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "code": "stanza_error",
            "message": f"{self.condition}: {self.text}" if self.text else self.condition,
            "stanza_error": {"type": self.type, "condition": self.condition, "text": self.text},
        }


def shown(value: Any, limit: int = 64) -> str:
    """A value from a request as an error message or a log line may quote it: bounded, since
    a request may carry megabytes where a JID or a word is expected."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} in all)"
    if isinstance(value, (list, dict, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return repr(value)[: limit * 2]


def bad_request(text: str) -> StanzaError:
    return StanzaError("modify", "bad-request", text)


def not_acceptable(text: str) -> StanzaError:
    return StanzaError("modify", "not-acceptable", text)


def not_allowed(text: str) -> StanzaError:
    return StanzaError("cancel", "not-allowed", text)


def forbidden(text: str) -> StanzaError:
    return StanzaError("auth", "forbidden", text)


@dataclass
class ProtocolError(Exception):
    code: str  # see docs/protocol.md, "Error codes"
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "stanza_error": None}
