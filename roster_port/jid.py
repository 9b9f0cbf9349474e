"""Bare JIDs: parse, normalise, refuse.

Every JID that reaches the store goes through `bare_jid()`, so a row's key is always the
normalised bare JID `localpart@domainpart` (or just `domainpart`) and a malformed JID is never
stored. ejabberd already normalises the JIDs of its own users; contacts come from clients,
remote servers and admin commands and may be anything.

Normalisation is what ejabberd 23.01 applies (xmpp 1.6.1 `jid:decode/1`, p1_stringprep
1.0.29): the RFC 3454 stringprep profiles of RFC 6122, Nodeprep for the localpart and Nameprep
for the domainpart, with Unicode 3.2 tables. A resource, if present, is checked and dropped:
rosters are about bare JIDs.

Invariants (what `bare_jid()` returns, whatever it was given):
- each part is at most `MAX_PART_BYTES` (1023) bytes of UTF-8 after preparation, so the result
  is at most 2 * 1023 + 1 bytes;
- it is a fixed point: `bare_jid(bare_jid(x)) == bare_jid(x)`;
- ejabberd's `jid:decode/1` accepts it and gives back the same localpart and domainpart. The
  converse is kept as far as reasonable: we are stricter than ejabberd wherever ejabberd would
  accept a JID it cannot decode again, or one no DNS name or XMPP server can have (below);
- it holds no control character (C0, DEL, C1), no whitespace, no empty part or label;
- its domainpart is either a dotted name (labels of letters, digits, `-`, `_` and non-ASCII
  characters Nameprep allows) or an IPv6 literal in brackets, in canonical form
  (RFC 5952: lower case, zeros compressed; an IPv4-mapped address as `::ffff:a.b.c.d`).
  An IPv4 address is a dotted name (`192.0.2.1`); `[192.0.2.1]`, `[v1.x]`, `[]`, zone ids
  (`[fe80::1%eth0]`) and anything else in brackets are refused (RFC 7622 section 3.2).

What this module must never do:
- run stringprep (mapping, NFKC, table lookups) on more than `MAX_PART_BYTES` of input: every
  part's length is checked on the raw text first, in code points (cheap, and never more than
  the bytes) and then in UTF-8 bytes, and a whole text longer than `MAX_JID_CHARS` is refused
  before it is even split. Mapping and NFKC can expand a text (U+FDFA, 3 bytes, becomes 18
  characters: 6 a byte, the most any character gives), so the prepared part is measured again
  right after normalisation, before the per-character checks: the work done for one part is
  bounded by ~6,100 characters (a few milliseconds);
- cache by an unbounded key: only texts of at most `CACHE_MAX_TEXT` (128) characters are
  cached, in `CACHE_MAX_ENTRIES` (8192) entries of functools' LRU cache, so the cache holds
  under 11 MB whatever the input (a key and a value of 128 characters stored at 4 bytes a
  character, ~1.1 KB, plus the entry's own ~100 bytes), and about 2.5 MB of ordinary JIDs.
  Longer texts (JIDs with long resources or parts) cost one bounded preparation each; so do
  refusals, which are never cached;
- store or return what ejabberd's `jid:decode/1` would refuse.

Decisions, each checked against ejabberd 23.01's `jid:decode/1`:
- The resource is dropped, so it is only checked cheaply, without Resourceprep: present means
  non-empty, at most 1023 bytes, no C0/C1 control or DEL (what Resourceprep refuses most
  often). A full JID whose resource ejabberd's Resourceprep refuses for another reason (say,
  an unassigned code point) is accepted with its resource dropped: the bare JID returned is
  valid either way, and the resource is never stored, cached or returned.
- The localpart is split at the first `@` and the resource at the first `/` (RFC 7622 3.1, and
  ejabberd's parser). A localpart or domainpart that prepares to nothing (`\\u200b@example.com`)
  is refused; ejabberd would take it for a domain JID or an empty domain.
- One final dot of the domainpart is dropped (RFC 7622 3.2), ejabberd keeps it; both decode
  our result the same way.
- Nameprep's bidi rule is applied to each label (IDNA2003) and to the whole domainpart, final
  dot included (what p1_stringprep does: it refuses `x@\\u05d0.com` and `x@\\u05d0.`).
  Unassigned code points (Unicode 3.2) are refused in the domainpart as in the localpart
  (Python's `encodings.idna.nameprep` allows them; ejabberd does not).
- In the domainpart, ASCII is limited to letters, digits, `-`, `_` and `.` after preparation.
  ejabberd accepts a NUL, a DEL, `<`, `'`, `;`, `!`, ... there, and even a space coming out of
  NFKC (`a\\u00a8b` becomes `a \\u0308b`), which it then cannot decode again; RFC 7622 (IDNA)
  allows none of these.
- A label longer than 63 bytes is accepted, as ejabberd does (its domainparts need not be DNS
  names); the 1023-byte bound on the whole domainpart is what bounds it.
- Python's `stringprep.map_table_b2` folds case with today's `str.lower()`, not Unicode 3.2's:
  code points unassigned in 3.2 are refused before mapping (U+1E9E would become "ss"), and a
  fold onto a code point 3.2 lacks is not applied (Cherokee U+13A0 stays). With that, Nodeprep
  here and ejabberd's agree on every code point tried (tests/test_jid.py) but U+33C6, which
  RFC 3454's B.2 folds to "c\u2215kg" and p1_stringprep leaves "C\u2215kg".
"""

from __future__ import annotations

import functools
import ipaddress
import re
import stringprep
import unicodedata

MAX_PART_BYTES = 1023
# localpart "@" domainpart "/" resourcepart: a longer text cannot be a JID (a code point is at
# least one byte), so it is refused before it is even split.
MAX_JID_CHARS = 3 * MAX_PART_BYTES + 2

CACHE_MAX_ENTRIES = 8192
CACHE_MAX_TEXT = 128  # characters: longer texts (rare) are never cached

# RFC 3454 requires Unicode 3.2, which its tables (and Python's `stringprep`) are built on.
_UCD = unicodedata.ucd_3_2_0

# Characters that RFC 6122 Nodeprep forbids in a localpart on top of the common tables.
_NODEPREP_EXTRA_PROHIBITED = frozenset("\"&'/:<>@")

# RFC 3491 section 5: Nameprep does not prohibit ASCII (C.1.1, C.2.1); _DOMAIN_ASCII does.
_NAMEPREP_PROHIBITED_TABLES = (
    stringprep.in_table_c12,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)
# RFC 6122 Nodeprep prohibits those and ASCII space and controls too.
_NODEPREP_PROHIBITED_TABLES = (
    stringprep.in_table_c11,
    stringprep.in_table_c21,
    *_NAMEPREP_PROHIBITED_TABLES,
)

# The ASCII a prepared domainpart may hold (upper case is mapped away before this check).
_DOMAIN_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

# What may stand between the brackets of an IPv6 literal, and its longest text form
# ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255").
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_IPV6_MAX_CHARS = 45

# C0 controls, DEL and C1 controls: refused in a resource without running Resourceprep.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class InvalidJID(ValueError):
    """The text is not a JID we accept; the message says why."""


def _shown(ch: str) -> str:
    return repr(ch) if ch.isascii() and ch.isprintable() else f"U+{ord(ch):04X}"


def _check_raw_size(label: str, text: str) -> None:
    """Refuse a part longer than MAX_PART_BYTES, or not valid Unicode, before any other work."""
    # Code points first: never more than the UTF-8 bytes, and free to count, so a huge text is
    # refused without being encoded.
    if len(text) > MAX_PART_BYTES:
        raise InvalidJID(f"{label} is longer than {MAX_PART_BYTES} bytes")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidJID(f"{label} is not valid Unicode (it holds a lone surrogate)") from None
    if size > MAX_PART_BYTES:
        raise InvalidJID(f"{label} is longer than {MAX_PART_BYTES} bytes")


def _map_b2(ch: str) -> str:
    """Table B.2 of RFC 3454 (case folding for NFKC), as Unicode 3.2 has it.

    Python's `stringprep.map_table_b2` folds case with the running Unicode's `str.lower()`,
    so it maps characters Unicode 3.2 leaves alone (Cherokee U+13A0, Georgian U+10A0,
    Palochka U+04C0) onto code points 3.2 does not have; RFC 3454's table (and ejabberd)
    keep them as they are. (Characters unassigned in 3.2 never get here.)
    """
    mapped = stringprep.map_table_b2(ch)
    if mapped != ch and any(stringprep.in_table_a1(m) for m in mapped):
        return ch
    return mapped


def _map_and_normalise(label: str, text: str) -> str:
    """RFC 3454 steps 1 and 2 (table B.1, table B.2, NFKC), then the prepared size.

    `text` has passed `_check_raw_size`, so the work here is bounded; the result is measured
    before the caller runs its per-character checks on it. Code points unassigned in Unicode
    3.2 are refused here, before mapping: Python's B.2 would fold some of them (U+1E9E,
    U+1C90, ...) onto assigned ones, which ejabberd refuses.
    """
    for ch in text:
        if stringprep.in_table_a1(ch):
            raise InvalidJID(f"{label} contains unassigned code point U+{ord(ch):04X}")
    mapped = "".join(_map_b2(ch) for ch in text if not stringprep.in_table_b1(ch))
    prepared = _UCD.normalize("NFKC", mapped)
    if len(prepared) > MAX_PART_BYTES or len(prepared.encode("utf-8")) > MAX_PART_BYTES:
        raise InvalidJID(f"{label} is longer than {MAX_PART_BYTES} bytes once prepared")
    return prepared


def _check_bidi(label: str, text: str) -> None:
    # RFC 3454 section 6: a string with right-to-left characters must start and end with one
    # and hold no left-to-right character.
    if any(stringprep.in_table_d1(ch) for ch in text):
        if any(stringprep.in_table_d2(ch) for ch in text):
            raise InvalidJID(f"{label} mixes right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            raise InvalidJID(f"{label} must start and end with right-to-left characters")


def nodeprep(localpart: str) -> str:
    """The localpart prepared with RFC 6122 Nodeprep, or InvalidJID (an empty text stays empty)."""
    if not isinstance(localpart, str):
        raise InvalidJID("localpart is not text")
    _check_raw_size("localpart", localpart)
    if not localpart:
        return ""
    return _nodeprep(localpart, ascii_path=localpart.isascii())


def _nodeprep(localpart: str, *, ascii_path: bool) -> str:
    if ascii_path:
        return _nodeprep_ascii(localpart)
    prepared = _map_and_normalise("localpart", localpart)
    for ch in prepared:
        if ch in _NODEPREP_EXTRA_PROHIBITED:
            raise InvalidJID(f"localpart may not contain {_shown(ch)}")
        if any(in_table(ch) for in_table in _NODEPREP_PROHIBITED_TABLES):
            raise InvalidJID(f"localpart may not contain U+{ord(ch):04X}")
        if stringprep.in_table_a1(ch):
            raise InvalidJID(f"localpart contains unassigned code point U+{ord(ch):04X}")
    if prepared:
        _check_bidi("localpart", prepared)
    return prepared


# ASCII is most JIDs, and stringprep's tables leave little of it to do: no character of table
# B.1 (mapped to nothing) nor D.1 (right-to-left) is ASCII, B.2 folds A-Z to a-z, NFKC changes
# nothing, and of the prohibited tables only C.1.1 (space) and C.2.1 (controls) hold ASCII.
# So ASCII parts are prepared here in a few microseconds, exactly as by the general path
# (tests/test_jid.py compares them on every ASCII character), instead of ~100.
_NODEPREP_ASCII_PROHIBITED = frozenset(chr(code) for code in (*range(0x21), 0x7F))


def _nodeprep_ascii(localpart: str) -> str:
    prepared = localpart.lower()
    for ch in prepared:
        if ch in _NODEPREP_EXTRA_PROHIBITED:
            raise InvalidJID(f"localpart may not contain {_shown(ch)}")
        if ch in _NODEPREP_ASCII_PROHIBITED:
            raise InvalidJID(f"localpart may not contain U+{ord(ch):04X}")
    return prepared


def _ip_literal(domainpart: str) -> str:
    """`[IPv6 address]` in RFC 5952 form, or InvalidJID. Nothing else goes in brackets."""
    inner = domainpart[1:-1] if domainpart.endswith("]") else ""
    if not inner or len(inner) > _IPV6_MAX_CHARS or not _IPV6_CHARS.issuperset(inner):
        raise InvalidJID("a domainpart in brackets must be an IPv6 address")
    try:
        address = ipaddress.IPv6Address(inner)
    except ValueError:
        raise InvalidJID("a domainpart in brackets must be an IPv6 address") from None
    mapped = address.ipv4_mapped
    if mapped is not None:
        # RFC 5952 section 5, spelt out: Python's own text for these changed in 3.13.
        return f"[::ffff:{mapped}]"
    return f"[{address.compressed}]"


def nameprep(domainpart: str) -> str:
    """The domainpart prepared with Nameprep (or an IPv6 literal made canonical), or InvalidJID."""
    if not isinstance(domainpart, str):
        raise InvalidJID("domainpart is not text")
    _check_raw_size("domainpart", domainpart)
    if not domainpart:
        raise InvalidJID("domainpart is empty")
    if domainpart.startswith("["):
        # RFC 7622 3.2: one final dot is dropped, whatever the domainpart.
        return _ip_literal(domainpart[:-1] if domainpart.endswith(".") else domainpart)
    return _nameprep(domainpart, ascii_path=domainpart.isascii())


def _nameprep(domainpart: str, *, ascii_path: bool) -> str:
    ascii_only = ascii_path
    prepared = domainpart.lower() if ascii_only else _map_and_normalise("domainpart", domainpart)
    for ch in prepared:
        if ch < "\x80":
            if ch not in _DOMAIN_ASCII:
                raise InvalidJID(f"domainpart may not contain {_shown(ch)}")
        elif any(in_table(ch) for in_table in _NAMEPREP_PROHIBITED_TABLES):
            raise InvalidJID(f"domainpart may not contain U+{ord(ch):04X}")
        elif stringprep.in_table_a1(ch):
            raise InvalidJID(f"domainpart contains unassigned code point U+{ord(ch):04X}")
    # Bidi over the whole domainpart, final dot included, as p1_stringprep checks it ...
    if not ascii_only:
        _check_bidi("domainpart", prepared)
    if prepared.endswith("."):
        prepared = prepared[:-1]
    if not prepared:
        raise InvalidJID("domainpart is empty once prepared")
    for label in prepared.split("."):
        if not label:
            raise InvalidJID("domainpart has an empty label")
        # ... and over each label, as IDNA does (`\u05d0.\u05d11.\u05d2` passes the first)
        if not ascii_only:
            _check_bidi("a domainpart label", label)
    return prepared


@functools.lru_cache(maxsize=CACHE_MAX_ENTRIES)
def _bare_jid_of_short_text(text: str) -> str:
    return _bare_jid(text)


def bare_jid(text: str) -> str:
    """The normalised bare JID for `text`, or InvalidJID.

    Texts of at most CACHE_MAX_TEXT characters are cached (functools' C cache: the same JIDs
    come back request after request, and a hit costs less than a tenth of a microsecond);
    longer ones are checked and prepared each time (bounded work, see the module doc).
    """
    if type(text) is str and len(text) <= CACHE_MAX_TEXT:
        return _bare_jid_of_short_text(text)
    return _bare_jid(text)


def _bare_jid(text: str) -> str:
    if not isinstance(text, str) or not text:
        raise InvalidJID("empty JID")
    if len(text) > MAX_JID_CHARS:
        raise InvalidJID(f"JID is longer than {MAX_JID_CHARS} characters")
    bare, slash, resource = text.partition("/")
    if slash:
        if not resource:
            raise InvalidJID("empty resource")
        _check_raw_size("resourcepart", resource)
        control = _CONTROL.search(resource)
        if control:
            raise InvalidJID(f"resourcepart may not contain U+{ord(control.group()):04X}")
    localpart, at, domainpart = bare.partition("@")
    if not at:
        localpart, domainpart = "", localpart
    elif not localpart:
        raise InvalidJID("empty localpart")
    _check_raw_size("localpart", localpart)
    _check_raw_size("domainpart", domainpart)

    node = nodeprep(localpart) if at else ""
    if at and not node:
        raise InvalidJID("localpart is empty once prepared")
    domain = nameprep(domainpart)
    result = f"{node}@{domain}" if node else domain
    if result == bare:
        result = bare  # already normalised, the usual case: one string in memory, not two
    return result


bare_jid.cache_info = _bare_jid_of_short_text.cache_info  # type: ignore[attr-defined]
bare_jid.cache_clear = _bare_jid_of_short_text.cache_clear  # type: ignore[attr-defined]
