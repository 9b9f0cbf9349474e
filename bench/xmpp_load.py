"""The end-to-end load of bench/run: real XMPP clients over loopback TCP.

- `roster_get_latencies`: one plain client (a few dozen lines of asyncio, no XMPP library, so
  that the client's own XML handling does not hide the server's time) logs in and fetches its
  roster again and again; each fetch is timed from the request's last byte written to the
  answer's last byte read. The answer's items are counted: a short roster is an error.
- `login_storm`: N slixmpp clients log in at the same moment, each fetches its roster, sends its
  available presence and waits for the answer to a ping (ejabberd handles one session's stanzas
  in order, so the ping's answer means the presence, and its broadcast to the contacts, was
  handled). The figure is the time until the last client is done.
"""

from __future__ import annotations

import asyncio
import base64
import re
import statistics
import time
import xml.etree.ElementTree as ET

NS_ROSTER = "jabber:iq:roster"


class RawClient:
    """A minimal c2s client: plain TCP, SASL PLAIN, resource binding, raw stanzas."""

    def __init__(self, ip: str, port: int, host: str) -> None:
        self.ip, self.port, self.host = ip, port, host
        self.buffer = b""

    async def _read_until(self, pattern: bytes | re.Pattern, timeout: float = 60) -> bytes:
        """Reads until `pattern` is in the buffer; returns and consumes the buffer up to the
        end of the match."""

        async def read() -> bytes:
            while True:
                match = (pattern.search(self.buffer) if isinstance(pattern, re.Pattern)
                         else re.search(re.escape(pattern), self.buffer))
                if match:
                    data, self.buffer = self.buffer[:match.end()], self.buffer[match.end():]
                    return data
                chunk = await self.reader.read(1 << 20)
                if not chunk:
                    raise ConnectionError(f"server closed the stream; got {self.buffer[-300:]!r}")
                self.buffer += chunk

        return await asyncio.wait_for(read(), timeout)

    async def _open_stream(self) -> None:
        self.writer.write(
            f"<?xml version='1.0'?><stream:stream to='{self.host}' xmlns='jabber:client' "
            "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>".encode())
        await self._read_until(b"</stream:features>")

    async def login(self, user: str, password: str) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.ip, self.port)
        await self._open_stream()
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.writer.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                          f"{token}</auth>".encode())
        answer = await self._read_until(re.compile(rb"<success[^>]*(/>|</success>)|</failure>"))
        if b"<success" not in answer:
            raise RuntimeError(f"login of {user} refused: {answer!r}")
        await self._open_stream()
        self.writer.write(b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                          b"<resource>bench</resource></bind></iq>")
        await self._read_until(b"</iq>")

    async def roster_get(self, request_id: str) -> tuple[float, int]:
        """One roster get: (seconds, number of items in the answer)."""
        self.writer.write(f"<iq type='get' id='{request_id}'>"
                          f"<query xmlns='{NS_ROSTER}'/></iq>".encode())
        await self.writer.drain()
        started = time.perf_counter()
        # The answer is <iq ... id='request_id' ...><query ...>items</query></iq>; items hold
        # no <iq>, so the first </iq> after the id ends it.
        answer = await self._read_until(
            re.compile(rb"id=['\"]" + re.escape(request_id.encode()) + rb"['\"].*?</iq>", re.S))
        elapsed = time.perf_counter() - started
        return elapsed, answer.count(b"<item ")

    async def close(self) -> None:
        self.writer.write(b"</stream:stream>")
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def _roster_get_latencies(ip: str, port: int, host: str, user: str, password: str,
                                expected_items: int, repeats: int) -> list[float]:
    client = RawClient(ip, port, host)
    await client.login(user, password)
    try:
        times = []
        for n in range(repeats + 1):  # the first one warms up and is not counted
            elapsed, items = await client.roster_get(f"r{n}")
            if items != expected_items:
                raise RuntimeError(f"{user}: roster of {items} items, expected {expected_items}")
            if n:
                times.append(elapsed)
        return times
    finally:
        await client.close()


def roster_get_latencies(ip: str, port: int, host: str, user: str, password: str,
                         expected_items: int, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` roster gets of `user`, one after the other."""
    return asyncio.run(_roster_get_latencies(ip, port, host, user, password, expected_items,
                                             repeats))


def _make_clients(users: list[str], host: str, password: str) -> list:
    """One slixmpp client per user, made before the clock starts, and made cheap to run: this
    process shares the machine with the server, and its CPU time must not be what is measured.

    - A ClientXMPP makes its own TLS context by default, loading the system's CA certificates:
      about 0.1 s of CPU per client, more than the server spends on a login. TLS is off here,
      so all clients share one context, made once.
    - slixmpp keeps a roster copy up to date from every presence received (its "Presence"
      handler); with 50 online contacts per client that was most of the client's time. The
      clients read their roster from the server's answer, so that handler is removed: the
      presences are still received and parsed.
    """
    import ssl

    import slixmpp  # the test extra's dependency; imported here to keep --help fast

    shared = ssl.create_default_context()
    clients = []
    for user in users:
        xmpp = slixmpp.ClientXMPP(
            f"{user}@{host}/bench", password, sasl_mech="PLAIN", ssl_context=shared,
            plugin_config={"feature_mechanisms": {"unencrypted_plain": True}})
        xmpp.enable_direct_tls = False      # loopback, no certificate: plain TCP
        xmpp.enable_starttls = False
        xmpp.enable_plaintext = True
        xmpp.auto_authorize = None          # never answer subscriptions
        xmpp.auto_subscribe = False
        xmpp.remove_handler("Presence")
        clients.append(xmpp)
    return clients


async def _login_storm(ip: str, port: int, host: str, users: list[str], password: str,
                       expected_items: int, timeout: float) -> tuple[float, list[float]]:
    clients = _make_clients(users, host, password)

    async def one(xmpp, t0: float) -> float:
        user = xmpp.boundjid.user
        started = asyncio.Event()
        xmpp.add_event_handler("session_start", lambda _: started.set())
        xmpp.connect(ip, port)
        await started.wait()
        iq = xmpp.Iq(stype="get")
        iq.append(ET.Element(f"{{{NS_ROSTER}}}query"))
        result = await iq.send(timeout=timeout)
        items = result.xml.findall(f"{{{NS_ROSTER}}}query/{{{NS_ROSTER}}}item")
        if len(items) != expected_items:
            raise RuntimeError(f"{user}: roster of {len(items)} items, expected {expected_items}")
        xmpp.send_presence()
        ping = xmpp.Iq(stype="get", sto=host)
        ping.append(ET.Element("{urn:xmpp:ping}ping"))
        await ping.send(timeout=timeout)
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        per_client = await asyncio.wait_for(
            asyncio.gather(*(one(xmpp, t0) for xmpp in clients)), timeout)
        total = time.perf_counter() - t0
    finally:
        for xmpp in clients:
            xmpp.disconnect()
        await asyncio.sleep(0.5)
    return total, list(per_client)


def login_storm(ip: str, port: int, host: str, users: list[str], password: str,
                expected_items: int, timeout: float = 300) -> tuple[float, list[float]]:
    """(seconds until every client is done, each client's own seconds)."""
    return asyncio.run(_login_storm(ip, port, host, users, password, expected_items, timeout))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
