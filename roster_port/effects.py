"""Effects: what the program asks the shim to do after an operation.

The program decides; the shim only executes. Each effect becomes one map in a response's
`effects` list (docs/protocol.md, "Effects"), in the order the roster logic produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Push:
    """Send a roster push of `item` (a wire item) to every resource of `user`."""

    user: str
    item: dict[str, Any]
    ver: str | None

    def to_wire(self) -> dict[str, Any]:
        return {"type": "push", "user": self.user, "item": self.item, "ver": self.ver}


@dataclass(frozen=True)
class RoutePresence:
    """Route a subscription presence from the bare JID `sender` to `to`."""

    sender: str
    to: str
    presence_type: str
    status: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": "route_presence",
            "from": self.sender,
            "to": self.to,
            "presence_type": self.presence_type,
            "status": self.status,
        }


@dataclass(frozen=True)
class SendPresence:
    """`to` gained a subscription from `user`: send it `user`'s current presence."""

    user: str
    to: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "send_presence", "user": self.user, "to": self.to}


@dataclass(frozen=True)
class SendUnavailable:
    """`to` lost its subscription from `user`: send it unavailable from each resource."""

    user: str
    to: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": "send_unavailable", "user": self.user, "to": self.to}


Effect = Push | RoutePresence | SendPresence | SendUnavailable
