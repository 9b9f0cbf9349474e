"""roster_port.jid: what a JID may cost, and what may be stored as one (issue 8, items 5 and 6).

No test here measures time or memory with a clock or RSS: that work is done before preparation
is shown by stubbing the preparation steps, and the cache's bounds by reading its accounting.
When ejabberd's own `jid` module is installed (Debian's erlang-p1-xmpp, as scripts/bootstrap
installs it), the last tests check that ejabberd 23.01's `jid:decode/1` accepts every bare JID
we return and agrees with our normalisation.
"""

from __future__ import annotations

import gc
import ipaddress
import random
import shutil
import stringprep
import subprocess
import sys
import tracemalloc
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roster_port import jid
from roster_port.jid import MAX_PART_BYTES, InvalidJID, bare_jid, nameprep, nodeprep

MiB = 1 << 20
MAX_BARE_BYTES = 2 * MAX_PART_BYTES + 1
DOMAIN_ASCII = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@pytest.fixture(autouse=True)
def _fresh_cache():
    bare_jid.cache_clear()
    yield
    bare_jid.cache_clear()


class _Prepared(AssertionError):
    pass


def _refuse_to_prepare(*args, **kwargs):
    raise _Prepared("a preparation step ran on input that should have been refused before")


class _NoNormalisation:
    normalize = staticmethod(_refuse_to_prepare)


@pytest.fixture
def no_preparation(monkeypatch):
    """Every stringprep step fails the test if it runs: mapping, NFKC, nodeprep, nameprep."""
    monkeypatch.setattr(stringprep, "in_table_b1", _refuse_to_prepare)
    monkeypatch.setattr(stringprep, "map_table_b2", _refuse_to_prepare)
    # NFKC through the names jid.py uses (patching unicodedata itself would break pytest's
    # own reporting, which normalises text)
    monkeypatch.setattr(jid, "unicodedata", _NoNormalisation, raising=False)
    monkeypatch.setattr(jid, "_UCD", _NoNormalisation, raising=False)
    monkeypatch.setattr(jid, "nodeprep", _refuse_to_prepare)
    monkeypatch.setattr(jid, "nameprep", _refuse_to_prepare)


# --- Sizes are checked before any work (item 5) ---------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a" * (2 * MiB) + "@example.com",  # the 2 MiB localpart of the issue (5 s before)
        "alice@" + "a" * (2 * MiB),
        "alice@example.com/" + "r" * MiB,  # the 1 MiB resource that filled the cache
        "a" * (MAX_PART_BYTES + 1) + "@example.com",  # just over, with a short text
        "é" * 512 + "@example.com",  # 512 code points, 1024 bytes
        "alice@" + "é" * 512,
        "alice@" + "b" * (MAX_PART_BYTES + 1),
        "alice@example.com/" + "é" * 512,
        "\U0001f600" * 256 + "@example.com",  # 256 code points, 1024 bytes
    ],
    ids=lambda text: f"{len(text)}-chars",
)
def test_an_oversized_part_is_refused_before_any_preparation(no_preparation, text):
    with pytest.raises(InvalidJID, match="longer than"):
        bare_jid(text)
    assert bare_jid.cache_info().currsize == 0


@pytest.mark.parametrize("prepare", ["nodeprep", "nameprep"])
@pytest.mark.parametrize("text", ["a" * (2 * MiB), "a" * (MAX_PART_BYTES + 1), "é" * 512])
def test_nodeprep_and_nameprep_refuse_an_oversized_text_before_mapping_it(monkeypatch, prepare, text):
    function = getattr(jid, prepare)
    monkeypatch.setattr(stringprep, "in_table_b1", _refuse_to_prepare)
    monkeypatch.setattr(stringprep, "map_table_b2", _refuse_to_prepare)
    with pytest.raises(InvalidJID, match="longer than"):
        function(text)


@pytest.mark.parametrize("where", ["localpart", "domainpart"])
def test_nfkc_expansion_is_measured_before_the_prepared_text_is_checked(where):
    # U+FDFA is 3 bytes and becomes 18 characters under NFKC (spaces among them): 341 of
    # them are 1023 bytes, and over 6,000 characters once normalised.
    expanding = "\ufdfa" * 341
    assert len(expanding.encode()) == MAX_PART_BYTES
    text = f"{expanding}@example.com" if where == "localpart" else f"alice@{expanding}"
    with pytest.raises(InvalidJID, match=f"{where} is longer than {MAX_PART_BYTES} bytes once prepared"):
        bare_jid(text)


def test_parts_of_exactly_the_limit_are_accepted():
    local, domain = "a" * MAX_PART_BYTES, ("b" * 62 + ".") * 16 + "c" * 15
    assert len(domain.encode()) == MAX_PART_BYTES
    assert bare_jid(f"{local}@{domain}/" + "r" * MAX_PART_BYTES) == f"{local}@{domain}"
    assert bare_jid(f"{local}@{domain[:-1]}.") == f"{local}@{domain[:-1]}"  # final dot dropped
    assert bare_jid("é" * 511 + "@example.com") == "é" * 511 + "@example.com"


# --- The cache (item 5) -----------------------------------------------------------------------


def test_long_texts_are_never_cached():
    for i in range(200):
        assert bare_jid(f"alice@example.com/{i:04}" + "r" * 1000) == "alice@example.com"
    assert bare_jid.cache_info().currsize == 0  # 200 one-kilobyte keys before
    assert bare_jid("alice@example.com") == "alice@example.com"
    assert bare_jid.cache_info().currsize == 1


def test_resources_are_checked_although_they_are_dropped():
    assert bare_jid("alice@example.com/" + "r" * MAX_PART_BYTES) == "alice@example.com"
    assert bare_jid("alice@example.com/a/b@c d") == "alice@example.com"
    for resource in ["r" * (MAX_PART_BYTES + 1), "phone\x00", "\x07", "r\x7f", "r\x85", "\ud800"]:
        with pytest.raises(InvalidJID):
            bare_jid(f"alice@example.com/{resource}")
    with pytest.raises(InvalidJID, match="empty resource"):
        bare_jid("alice@example.com/")


def _largest_jid(i: int) -> str:
    # One astral character makes CPython store every character of the string in 4 bytes:
    # the costliest bare JID the limits allow (U+20000 is assigned in Unicode 3.2).
    local = f"\U00020000{i:08}" + "a" * (MAX_PART_BYTES - 12)
    domain = f"\U00020000{i:08}." + "b" * (MAX_PART_BYTES - 13)
    assert len(local.encode()) == len(domain.encode()) == MAX_PART_BYTES
    return f"{local}@{domain}"


def _largest_cached_jid(i: int) -> str:
    # As _largest_jid, at the length of the longest text cached.
    local = f"\U00020000{i:08}" + "a" * 50
    text = f"{local}@" + "b" * (jid.CACHE_MAX_TEXT - len(local) - 1)
    assert len(text) == jid.CACHE_MAX_TEXT
    return text


def test_the_largest_jids_the_limits_allow_are_not_cached():
    assert bare_jid(_largest_jid(0)) == _largest_jid(0)
    assert bare_jid.cache_info().currsize == 0


def _cache_growth(texts: list[str]) -> int:
    """What the cache holds for `texts` (all cached), in bytes: its own entries, measured, and
    the texts, which are its keys and, already normalised, its values."""
    gc.collect()
    tracemalloc.start()
    try:
        for text in texts:
            bare_jid(text)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert bare_jid.cache_info().currsize == len(texts)
    return held + sum(sys.getsizeof(text) for text in texts)


def test_the_cache_is_bounded_in_bytes_whatever_the_jids():
    # Measured on 512 entries (preparing 8192 costly texts takes long), for a full cache.
    sample = 512
    costly = _cache_growth([_largest_cached_jid(i) for i in range(sample)])
    assert costly * jid.CACHE_MAX_ENTRIES // sample < 11 * MiB, costly
    bare_jid.cache_clear()
    ordinary = _cache_growth([f"user{i:05}@example.com" for i in range(sample)])
    assert ordinary * jid.CACHE_MAX_ENTRIES // sample < 3 * MiB, ordinary


# --- What is accepted, and how it is normalised (item 6) -----------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Alice@Example.COM/Phone", "alice@example.com"),
        ("example.com", "example.com"),
        ("example.com.", "example.com"),
        ("alice@example.com.", "alice@example.com"),
        ("alice@192.0.2.1", "alice@192.0.2.1"),  # an IPv4 address is a dotted name
        ("alice@[2001:DB8::1]", "alice@[2001:db8::1]"),
        ("alice@[2001:0db8:0000:0000:0000:0000:0000:0001]", "alice@[2001:db8::1]"),
        ("alice@[2001:db8:0:0:1:0:0:1]/r", "alice@[2001:db8::1:0:0:1]"),
        ("alice@[::1]", "alice@[::1]"),
        ("alice@[::1].", "alice@[::1]"),
        ("alice@[::FFFF:192.0.2.1]", "alice@[::ffff:192.0.2.1]"),
        ("alice@[::ffff:c000:201]", "alice@[::ffff:192.0.2.1]"),
        ("Ünïcode@BÜCHER.example", "ünïcode@bücher.example"),
        ("alice@ex\u00adample.com", "alice@example.com"),  # B.1: mapped to nothing
        ("alice@a_b.example", "alice@a_b.example"),
        ("alice@" + "a" * 64 + ".example", "alice@" + "a" * 64 + ".example"),  # as ejabberd
        ("\u05d0@\u05d1.\u05d2", "\u05d0@\u05d1.\u05d2"),
        ("a.b-c_d+e@sub.example.co.uk", "a.b-c_d+e@sub.example.co.uk"),
        ("alice@b\uff0ec", "alice@b.c"),  # fullwidth full stop: NFKC makes it a dot
        # Unicode 3.2 has no lower case for these; Python's str.lower() today has
        ("\u13a0@example.com", "\u13a0@example.com"),  # Cherokee
        ("\u10a0@\u10a0.example", "\u10a0@\u10a0.example"),  # Georgian Asomtavruli
        ("\u04c0@example.com", "\u04c0@example.com"),  # Palochka
    ],
)
def test_accepted_and_normalised(text, expected):
    assert bare_jid(text) == expected
    assert bare_jid(expected) == expected


# Each of these was accepted before (many stored verbatim), and ejabberd cannot use it.
NEWLY_REFUSED = [
    "x@[<script>' or 1=1; --]",
    "x@[a b\x00c]",
    "x@[]",
    "x@[1.2.3.4]",  # RFC 7622: an IPv4 address goes without brackets
    "x@[v1.x]",  # IPvFuture
    "x@[fe80::1%eth0]",  # a zone id means nothing to another host
    "x@[::1]]",
    "x@a[b",
    "x@a]b",
    "x@a\x00b",
    "x@a\x01b",
    "x@a\x1fb",
    "x@a\x7fb",
    "x@a\tb",
    "x@a\nb",
    "x@a;b",
    "x@a%b",
    "x@a!b",
    "x@\u05d0.com",  # bidi over the whole domainpart, as ejabberd checks it
    "x@com.\u05d0",
    "x@a\u0221",  # unassigned in Unicode 3.2: ejabberd refuses it
    "\u1e9e@example.com",  # unassigned in 3.2, and Python's B.2 folds it to "ss"
    "x@\u1c90.example",  # unassigned in 3.2, and Python's B.2 folds it to U+10D0
    "x@\u200b",  # a domainpart that prepares to nothing
    "\u200b@example.com",  # a localpart that prepares to nothing
    "\xad\xad@example.com",
    "x@a.com/\ud800",
    "x@a.com/r\x00",
]


STILL_REFUSED = [
    "",
    "@example.com",
    "alice@",
    "alice@example.com/",
    "a@b@c",
    "alice@@example.com",
    "alice@exa mple.com",
    "x@a\x85b",
    "x@a\x9fb",
    "x@a\u00a0b",
    "x@a\u3000b",
    "x@a\u2028b",
    "x@a\u00a8b",  # NFKC: "a \u0308b"
    "x@a\uff20b",  # NFKC: "a@b"
    "x@a<b",
    "x@a\\b",
    "x@a..b",
    "x@.",
    "x@a.com..",
    "x@[::1",
    "\ud800@example.com",
    "a\u00a8@example.com",
    "a\uff20b@example.com",
    "\u05d0a@example.com",
]


@pytest.mark.parametrize("text", NEWLY_REFUSED + STILL_REFUSED, ids=ascii)
def test_invalid_jids_are_refused(text):
    with pytest.raises(InvalidJID):
        bare_jid(text)


def _controls() -> list[str]:
    return [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]


@pytest.mark.parametrize("control", _controls(), ids=lambda ch: f"U+{ord(ch):04X}")
def test_no_control_character_anywhere(control):
    # The localpart: Nodeprep's tables C.2.1 and C.2.2 already refuse them; the domainpart:
    # Nameprep lets C0 and DEL through (they are ASCII), we do not.
    for text in [f"a{control}b@example.com", f"alice@ex{control}ample.com", f"{control}@example.com"]:
        with pytest.raises(InvalidJID):
            bare_jid(text)
    with pytest.raises(InvalidJID):
        nodeprep(f"a{control}")
    with pytest.raises(InvalidJID):
        nameprep(f"a{control}")


def test_what_python_nameprep_lets_through_is_refused():
    from encodings import idna

    for ch in ["\x00", "\x01", "\x7f", " ", "\t", "<", "'", ";", "[", "]", "!", "="]:
        assert idna.nameprep(f"a{ch}b") == f"a{ch}b"  # Python's Nameprep: ASCII is not its business
        with pytest.raises(InvalidJID):
            nameprep(f"a{ch}b")


def test_lone_surrogates_are_refused_wherever_they_are():
    for text in ["\ud800@example.com", "alice@\udfff.com", "alice@example.com/\ud800", "\udc00"]:
        with pytest.raises(InvalidJID):
            bare_jid(text)


# --- Properties ---------------------------------------------------------------------------------

_PIECES = [
    *"aZ9-_.@/[]:%'<> \t",
    "\x00", "\x1f", "\x7f", "\x85", "\xa0", "\xa8", "\xad", "\u0130", "\u0221", "\u0301", "\u0340",
    "\u0345", "\u0390", "\u03f4", "\u05d0", "\u0627", "\u0661", "\u1e9b", "\u200b", "\u200e",
    "\u2028", "\u212b", "\u2126", "\u2adc", "\u3000", "\u3002", "\ufb03", "\ufdfa", "\ufeff",
    "\uff0e", "\uff20", "\U0001f600", "::1", "2001:DB8::", "::ffff:1.2.3.4", "xn--", "example.com",
]
_JIDISH = st.lists(st.one_of(st.sampled_from(_PIECES), st.characters()), max_size=12).map("".join)
_JID_LIKE = st.one_of(
    st.text(),
    _JIDISH,
    st.builds(lambda a, b: f"{a}@{b}", _JIDISH, _JIDISH),
    st.builds(lambda a, b, c: f"{a}@{b}/{c}", _JIDISH, _JIDISH, _JIDISH),
    st.builds(lambda a, b: f"{a}@[{b}]", _JIDISH, _JIDISH),
    st.builds(lambda a, b: f"{a}@[{b}]", _JIDISH, st.ip_addresses(v=6).map(str)),
    st.builds(lambda a, b: f"{a}@{b}", _JIDISH, st.ip_addresses(v=4).map(str)),
)


def _check_domain(domain: str) -> None:
    if domain.startswith("["):
        assert domain.endswith("]")
        address = ipaddress.IPv6Address(domain[1:-1])
        if address.ipv4_mapped is None:
            assert domain == f"[{address.compressed}]"
        else:
            assert domain == f"[::ffff:{address.ipv4_mapped}]"
        return
    assert all(domain.split(".")), domain
    assert all(ch in DOMAIN_ASCII for ch in domain if ch.isascii()), domain


def _check_result(result: str) -> None:
    assert bare_jid(result) == result
    assert len(result.encode()) <= MAX_BARE_BYTES
    assert not any(unicodedata.category(ch) == "Cc" or ch.isspace() for ch in result), ascii(result)
    assert "/" not in result
    local, at, domain = result.rpartition("@")
    if at:
        assert local and "@" not in local
        assert len(local.encode()) <= MAX_PART_BYTES
    assert 0 < len(domain.encode()) <= MAX_PART_BYTES
    _check_domain(domain)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JID_LIKE)
def test_any_text_is_refused_or_gives_a_fixed_point_that_ejabberd_can_use(text):
    try:
        result = bare_jid(text)
    except InvalidJID:
        return
    _check_result(result)
    if "/" in text:
        assert bare_jid(text.partition("/")[0]) == result


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=4).filter(lambda s: "@" not in s and "/" not in s), st.data())
def test_an_oversized_part_never_reaches_preparation(piece, data):
    repeat = MAX_PART_BYTES // len(piece.encode("utf-8", "surrogatepass")) + 1
    oversized = piece * repeat
    where = data.draw(st.sampled_from(["local", "domain", "resource"]))
    text = {
        "local": f"{oversized}@example.com",
        "domain": f"alice@{oversized}",
        "resource": f"alice@example.com/{oversized}",
    }[where]
    saved = (jid.nodeprep, jid.nameprep, stringprep.in_table_b1)
    jid.nodeprep = jid.nameprep = stringprep.in_table_b1 = _refuse_to_prepare
    try:
        with pytest.raises(InvalidJID):
            bare_jid(text)
    finally:
        jid.nodeprep, jid.nameprep, stringprep.in_table_b1 = saved


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_nodeprep_and_nameprep_only_ever_raise_invalid_jid(text):
    for prepare in (nodeprep, nameprep):
        try:
            prepared = prepare(text)
        except InvalidJID:
            continue
        assert prepare(prepared) == prepared
        assert len(prepared.encode()) <= MAX_PART_BYTES


# --- Against ejabberd's own jid:decode/1 (when ejabberd's libraries are installed) ----------

_EJABBERD_DECODER = r"""
case code:which(jid) of
    non_existing -> io:put_chars("nojid\n");
    _ ->
        {ok, _} = application:ensure_all_started(stringprep),
        ok = jid:start(),
        Loop = fun L() ->
            case io:get_line("") of
                eof -> ok;
                Line ->
                    Bin = binary:decode_hex(list_to_binary(string:trim(Line))),
                    Out = try jid:decode(Bin) of
                        {jid, _, _, _, U, S, R} ->
                            [<<"ok ">>, binary:encode_hex(U), <<" ">>, binary:encode_hex(S),
                             <<" ">>, binary:encode_hex(R)]
                    catch _:_ -> <<"error">>
                    end,
                    io:put_chars([Out, $\n]),
                    L()
            end
        end,
        Loop()
end,
halt().
"""


def _ejabberd_decode(texts: list[str]) -> list[tuple[str, str, str] | None]:
    """ejabberd 23.01's jid:decode/1 of each text: (luser, lserver, lresource), or None."""
    if shutil.which("erl") is None:
        pytest.skip("no Erlang (erl) installed")
    lines = "".join(text.encode().hex() + "\n" for text in texts)
    done = subprocess.run(
        ["erl", "-noshell", "-eval", _EJABBERD_DECODER],
        input=lines, capture_output=True, text=True, timeout=120,
    )
    out = done.stdout.splitlines()
    if out[:1] == ["nojid"]:
        pytest.skip("ejabberd's jid module (erlang-p1-xmpp) is not installed")
    assert done.returncode == 0 and len(out) == len(texts), done.stderr[-2000:]
    decoded = []
    for line in out:
        if line == "error":
            decoded.append(None)
        else:
            _, *parts = line.split(" ")
            luser, lserver, lresource = (bytes.fromhex(part).decode() for part in parts)
            decoded.append((luser, lserver, lresource))
    return decoded


REALISTIC = [
    "alice@example.com", "Alice@Example.COM", "x@[2001:DB8::1]", "x@[::ffff:1.2.3.4]",
    "x@192.0.2.1", "Ünïcode@BÜCHER.example", "\u05d0@\u05d1.\u05d2", "x@a_b.example",
    "x@" + "a" * 64 + ".com", "a" * MAX_PART_BYTES + "@example.com", "x@example.com.",
    "x@a\u3002b", "conference.example.com", "x@xn--bcher-kva.example",
    "a.b-c_d+e@sub.example.co.uk", "\u4e2d\u6587@\u4f8b\u5b50.\u6d4b\u8bd5", "user@localhost",
]


def _random_char(rng: random.Random) -> str:
    low, high = rng.choice([(0x20, 0x7F), (0xA0, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x30000)])
    return chr(rng.randrange(low, high))


def _random_part(rng: random.Random, longest: int) -> str:
    pieces = _PIECES + ["\u00c5", "\u00df", "\u0131", "\u03a3", "\u1100\u1161", "\u212a"]
    return "".join(
        rng.choice(pieces) if rng.random() < 0.6 else _random_char(rng)
        for _ in range(rng.randrange(longest))
    )


def _corpus() -> list[str]:
    rng = random.Random(8)  # fixed: the same corpus on every run
    texts = NEWLY_REFUSED + STILL_REFUSED + REALISTIC
    for _ in range(4000):
        local, domain, resource = (_random_part(rng, n) for n in (6, 8, 4))
        texts.append(rng.choice([domain, f"{local}@{domain}", f"{local}@{domain}/{resource}"]))
    return [text for text in texts if not any("\ud800" <= ch <= "\udfff" for ch in text)]


def _joined(luser: str, lserver: str) -> str:
    return f"{luser}@{lserver}" if luser else lserver


def test_ejabberd_accepts_every_bare_jid_we_return_and_reads_it_the_same():
    ours: dict[str, str] = {}
    for text in _corpus():
        try:
            ours[text] = bare_jid(text)
        except InvalidJID:
            pass
    assert len(ours) > 200  # the corpus does reach the accepting paths
    assert all(text in ours for text in REALISTIC)
    queries = sorted(set(ours.values()) | {text for text in ours if "/" not in text})
    theirs = dict(zip(queries, _ejabberd_decode(queries)))
    for text, result in ours.items():
        decoded = theirs[result]
        assert decoded is not None, f"ejabberd refuses {result!r} (from {text!r})"
        assert decoded[2] == "" and _joined(*decoded[:2]) == result, (text, result, decoded)
        if "/" in text:
            continue
        decoded = theirs[text]
        assert decoded is not None, f"ejabberd refuses {text!r}, which we accept as {result!r}"
        luser, lserver, _ = decoded
        lserver = lserver[:-1] if lserver.endswith(".") else lserver  # we drop the final dot
        if lserver.startswith("["):
            lserver = jid.nameprep(lserver)  # we write IPv6 literals in canonical form
        assert _joined(luser, lserver) == result, (text, result, decoded)


def test_ejabberd_refuses_what_the_issue_saw_stored():
    decoded = _ejabberd_decode(["x@[<script>' or 1=1; --]", "x@[a b\x00c]", "x@\u05d0.com", "x@a\u0221"])
    assert decoded == [None, None, None, None]


_RANGES = [
    (0x20, 0x250), (0x370, 0x530), (0x10A0, 0x1100), (0x13A0, 0x1400), (0x1C80, 0x1CC0),
    (0x1E00, 0x2200), (0x2C60, 0x2C80), (0x3300, 0x3400), (0xA640, 0xA800), (0xFB00, 0xFB50),
    (0xFE30, 0xFE70), (0xFF00, 0xFFF0), (0x1D400, 0x1D800),
]
_P1_STRINGPREP_MISSES = {"\u33c6"}  # RFC 3454 B.2 folds it to "c\u2215kg"; p1_stringprep to "C\u2215kg"


def test_ejabberd_and_we_prepare_each_character_alike():
    chars = [chr(c) for low, high in _RANGES for c in range(low, high) if chr(c) not in "@/"]
    chars = [ch for ch in chars if ch not in _P1_STRINGPREP_MISSES]
    theirs = _ejabberd_decode([f"a{ch}a@x" for ch in chars] + [f"x@a{ch}a" for ch in chars])
    for ch, as_local, as_domain in zip(chars, theirs[: len(chars)], theirs[len(chars):]):
        try:
            ours = nodeprep(f"a{ch}a")
        except InvalidJID:
            ours = None
        assert ours == (as_local and as_local[0]), f"U+{ord(ch):04X} in a localpart"
        try:
            ours = nameprep(f"a{ch}a")
        except InvalidJID:
            # refused only where ejabberd refuses too, or gives what it cannot decode again
            # (a space, "@", "/", an empty label) or what RFC 7622 keeps out of a domainpart
            their_domain = as_domain and as_domain[1]
            assert their_domain is None or any(
                c.isascii() and c not in DOMAIN_ASCII for c in their_domain
            ) or "" in their_domain.split("."), f"U+{ord(ch):04X} in a domainpart"
        else:
            assert ours == (as_domain and as_domain[1]), f"U+{ord(ch):04X} in a domainpart"


# --- The ASCII path prepares exactly as the general one ---------------------------------------

_ASCII = [chr(code) for code in range(0x80)]


def _outcome(prepare, text: str, ascii_path: bool):
    try:
        return prepare(text, ascii_path=ascii_path)
    except InvalidJID as exc:
        return ("refused", str(exc))


@pytest.mark.parametrize("prepare", [jid._nodeprep, jid._nameprep], ids=["nodeprep", "nameprep"])
def test_the_ascii_path_agrees_with_the_general_one_on_every_ascii_character(prepare):
    for first in _ASCII:
        for text in (first, first + "a", "a" + first, "a." + first, first + ".a", "A" + first + "Z"):
            assert _outcome(prepare, text, True) == _outcome(prepare, text, False), repr(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(_ASCII), min_size=1, max_size=40))
def test_the_ascii_path_agrees_with_the_general_one_on_any_ascii_text(text):
    for prepare in (jid._nodeprep, jid._nameprep):
        assert _outcome(prepare, text, True) == _outcome(prepare, text, False)
