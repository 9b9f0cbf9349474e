"""Bare JIDs: parse, normalise, refuse.

Every JID that reaches the store goes through `bare_jid()`, so a row's key is always the
normalised bare JID `localpart@domainpart` (or just `domainpart`) and a malformed JID is never
stored. ejabberd already normalises the JIDs of its own users; contacts come from clients and
admin commands and may be anything.

Normalisation follows RFC 6122 stringprep profiles, which is what ejabberd 23.01 applies
(jid:nodeprep / jid:nameprep): Nodeprep for the localpart, Nameprep for the domainpart.
A resource, if present, is dropped: rosters are about bare JIDs.
"""

from __future__ import annotations

import functools
import stringprep
import unicodedata
from encodings import idna

MAX_PART_BYTES = 1023

# Characters that RFC 6122 Nodeprep forbids in a localpart on top of the common tables.
_NODEPREP_EXTRA_PROHIBITED = frozenset("\"&'/:<>@")

_NODEPREP_PROHIBITED_TABLES = (
    stringprep.in_table_c11,
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


class InvalidJID(ValueError):
    """The text is not a JID we accept; the message says why."""


def _check_bidi(label: str, text: str) -> None:
    # RFC 3454 section 6: a string with right-to-left characters must start and end with one
    # and hold no left-to-right character.
    if any(stringprep.in_table_d1(ch) for ch in text):
        if any(stringprep.in_table_d2(ch) for ch in text):
            raise InvalidJID(f"{label} mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            raise InvalidJID(f"{label} must start and end with right-to-left characters")


def nodeprep(localpart: str) -> str:
    mapped = "".join(
        stringprep.map_table_b2(ch) for ch in localpart if not stringprep.in_table_b1(ch)
    )
    mapped = unicodedata.normalize("NFKC", mapped)
    for ch in mapped:
        if ch in _NODEPREP_EXTRA_PROHIBITED:
            raise InvalidJID(f"localpart may not contain {ch!r}")
        if any(in_table(ch) for in_table in _NODEPREP_PROHIBITED_TABLES):
            raise InvalidJID(f"localpart may not contain U+{ord(ch):04X}")
        if stringprep.in_table_a1(ch):
            raise InvalidJID(f"localpart contains unassigned code point U+{ord(ch):04X}")
    if mapped:
        _check_bidi("localpart", mapped)
    return mapped


def nameprep(domainpart: str) -> str:
    if domainpart.endswith("."):
        domainpart = domainpart[:-1]
    if not domainpart:
        raise InvalidJID("domainpart is empty")
    if domainpart.startswith("[") and domainpart.endswith("]"):
        return domainpart.lower()  # IPv6 literal
    labels = []
    for label in domainpart.split("."):
        if not label:
            raise InvalidJID("domainpart has an empty label")
        try:
            prepared = idna.nameprep(label)
        except UnicodeError as exc:
            raise InvalidJID(f"domainpart label {label!r}: {exc}") from None
        if any(ch in prepared for ch in " @/\\\"&'<>:"):
            raise InvalidJID(f"domainpart label {label!r} has a forbidden character")
        labels.append(prepared)
    return ".".join(labels)


@functools.lru_cache(maxsize=8192)
def bare_jid(text: str) -> str:
    """The normalised bare JID for `text`, or InvalidJID.

    Cached (bounded: a few MB at most): the same JIDs come back request after request.
    """
    if not isinstance(text, str) or not text:
        raise InvalidJID("empty JID")
    rest, slash, resource = text.partition("/")
    if slash and not resource:
        raise InvalidJID("empty resource")
    localpart, at, domainpart = rest.rpartition("@")
    if at and not localpart:
        raise InvalidJID("empty localpart")
    node = nodeprep(localpart) if at else ""
    domain = nameprep(domainpart)
    if len(node.encode()) > MAX_PART_BYTES or len(domain.encode()) > MAX_PART_BYTES:
        raise InvalidJID(f"a part of the JID is longer than {MAX_PART_BYTES} bytes")
    return f"{node}@{domain}" if node else domain
