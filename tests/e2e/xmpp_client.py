"""A test client that records what the server sends it, on top of slixmpp.

Tests judge the server's view: they read rosters with raw roster IQs and look
at the pushes and presences each client received, never at slixmpp's local
roster copy (slixmpp's automatic subscription answers are switched off).
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

NS_ROSTER = "jabber:iq:roster"


@dataclass(frozen=True)
class Item:
    jid: str
    subscription: str
    ask: str | None
    name: str | None
    groups: tuple[str, ...]
    approved: bool

    @classmethod
    def from_xml(cls, el: ET.Element) -> "Item":
        return cls(
            jid=el.get("jid", ""),
            subscription=el.get("subscription", "none"),
            ask=el.get("ask"),
            name=el.get("name"),
            groups=tuple(g.text or "" for g in el.findall(f"{{{NS_ROSTER}}}group")),
            approved=el.get("approved") in ("true", "1"),
        )


@dataclass(frozen=True)
class RosterResult:
    ver: str | None
    items: dict[str, Item] | None  # None: empty result (the client's ver is current)


@dataclass(frozen=True)
class Push:
    ver: str | None
    item: Item


@dataclass(frozen=True)
class Presence:
    type: str
    from_jid: str
    status: str | None
    # The stanza as received (its statuses in every language, its extended content).
    xml: ET.Element | None = field(default=None, compare=False, repr=False)


class Client:
    def __init__(self, jid: str, password: str, port: int, host: str = "127.0.0.1"):
        self.jid = jid
        self.address = (host, port)
        self.pushes: list[Push] = []
        self.presences: list[Presence] = []
        self._changed = asyncio.Event()
        self.xmpp = slixmpp.ClientXMPP(
            jid, password,
            plugin_config={"feature_mechanisms": {"unencrypted_scram": True,
                                                  "unencrypted_plain": True}},
        )
        self.xmpp.auto_authorize = None     # never answer subscription requests for the test
        self.xmpp.auto_subscribe = False
        self.xmpp.register_handler(Callback(
            "roster-push recorder",
            MatchXPath(f"{{{self.xmpp.default_ns}}}iq/{{{NS_ROSTER}}}query"),
            self._on_roster_iq,
        ))
        self.xmpp.add_event_handler("presence", self._on_presence)

    @property
    def bare(self) -> str:
        return self.jid.split("/")[0]

    async def connect(self, available: bool = True, timeout: float = 10) -> None:
        started = asyncio.Event()
        failed: list[str] = []
        self.xmpp.add_event_handler("session_start", lambda _: started.set())
        self.xmpp.add_event_handler("failed_auth", lambda _: failed.append("auth"))
        # The test server has no certificate: plain TCP only.
        self.xmpp.enable_direct_tls = False
        self.xmpp.enable_starttls = False
        self.xmpp.enable_plaintext = True
        self.xmpp.connect(*self.address)
        try:
            await asyncio.wait_for(started.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.jid}: no session within {timeout} s {failed}") from None
        if available:
            self.xmpp.send_presence()

    async def disconnect(self) -> None:
        self.xmpp.disconnect()
        await asyncio.sleep(0)

    def _on_roster_iq(self, iq: slixmpp.Iq) -> None:
        if iq["type"] != "set":
            return
        query = iq.xml.find(f"{{{NS_ROSTER}}}query")
        for el in query.findall(f"{{{NS_ROSTER}}}item"):
            self.pushes.append(Push(ver=query.get("ver"), item=Item.from_xml(el)))
        self._changed.set()
        # slixmpp's own roster plugin answers the push too; one result is enough,
        # and slixmpp's answer is what the server gets.

    def _on_presence(self, pres: slixmpp.Presence) -> None:
        self.presences.append(Presence(type=pres["type"], from_jid=pres["from"].bare,
                                       status=pres["status"] or None, xml=pres.xml))
        self._changed.set()

    async def roster_get(self, ver: str | None = None) -> RosterResult:
        iq = self.xmpp.Iq(stype="get")
        query = ET.Element(f"{{{NS_ROSTER}}}query")
        if ver is not None:
            query.set("ver", ver)
        iq.append(query)
        result = await iq.send(timeout=10)
        q = result.xml.find(f"{{{NS_ROSTER}}}query")
        if q is None:
            return RosterResult(ver=None, items=None)
        items = {i.jid: i for i in (Item.from_xml(e) for e in q.findall(f"{{{NS_ROSTER}}}item"))}
        return RosterResult(ver=q.get("ver"), items=items)

    async def roster_set(self, jid: str, name: str | None = None, groups: tuple[str, ...] = (),
                         subscription: str | None = None) -> slixmpp.Iq:
        iq = self.xmpp.Iq(stype="set")
        query = ET.Element(f"{{{NS_ROSTER}}}query")
        item = ET.SubElement(query, f"{{{NS_ROSTER}}}item", {"jid": jid})
        if name is not None:
            item.set("name", name)
        if subscription is not None:
            item.set("subscription", subscription)
        for g in groups:
            ET.SubElement(item, f"{{{NS_ROSTER}}}group").text = g
        iq.append(query)
        return await iq.send(timeout=10)

    def send_subscription(self, to: str, ptype: str, status: str | None = None) -> None:
        self.xmpp.send_presence(pto=to, ptype=ptype, pstatus=status)

    def send_presence_with(self, to: str, ptype: str, children: list[ET.Element]) -> None:
        """A presence carrying `children` as given (statuses in several languages, extended
        content such as a XEP-0172 nick): slixmpp's own interfaces set one status only."""
        pres = self.xmpp.make_presence(pto=to, ptype=ptype)
        for child in children:
            pres.xml.append(child)
        pres.send()

    async def wait_for(self, predicate, timeout: float = 5.0):
        """Waits until predicate(self) is truthy; returns its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.jid}: timed out; pushes={self.pushes} presences={self.presences}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def pushes_for(self, jid: str) -> list[Push]:
        return [p for p in self.pushes if p.item.jid == jid]

    def presences_from(self, jid: str, ptype: str) -> list[Presence]:
        return [p for p in self.presences if p.from_jid == jid and p.type == ptype]
