"""Framing and message decoding: pure functions, fed bytes in every possible chunking."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from roster_port.framing import Frame, FrameDecoder, OversizedFrame, encode_frame
from roster_port.messages import RequestError, decode_request, encode_request, recover_id


def _feed_in_chunks(decoder: FrameDecoder, data: bytes, cuts: list[int]):
    events, start = [], 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += decoder.feed(data[start:cut])
        start = cut
    return events


@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
)
def test_frames_survive_any_chunking(payloads, cuts):
    data = b"".join(encode_frame(payload) for payload in payloads)
    events = _feed_in_chunks(FrameDecoder(1000), data, [cut for cut in cuts if cut <= len(data)])
    assert events == [Frame(payload) for payload in payloads]


@given(cuts=st.lists(st.integers(0, 400), max_size=10))
def test_an_oversized_frame_is_skipped_and_the_next_one_is_read(cuts):
    big = encode_request(77, "roster_get", {"user": "a@b", "pad": "x" * 200})
    small = encode_request(78, "ping", {})
    data = encode_frame(big) + encode_frame(small)
    decoder = FrameDecoder(100)
    events = _feed_in_chunks(decoder, data, [cut for cut in cuts if cut <= len(data)])
    assert len(events) == 2
    oversized, frame = events
    assert isinstance(oversized, OversizedFrame) and oversized.length == len(big)
    assert recover_id(oversized.head) == 77
    assert frame == Frame(small)
    assert decoder.buffered == 0


def test_a_partial_frame_is_reported_as_buffered():
    decoder = FrameDecoder(100)
    assert decoder.feed(encode_frame(b"abcdef")[:7]) == []
    assert decoder.buffered == 7  # header and body bytes held


def test_decode_request_round_trip():
    request = decode_request(encode_request(2**64 - 1, "jid_info", {"user": "a@b", "contact": "c@d"}))
    assert (request.id, request.op, request.args) == (2**64 - 1, "jid_info", {"user": "a@b", "contact": "c@d"})


def test_binaries_are_accepted_as_text():
    payload = msgpack.packb([0, 5, b"roster_get", {b"user": b"a@b"}], use_bin_type=True)
    request = decode_request(payload)
    assert request.op == "roster_get" and request.args == {"user": "a@b"}


@pytest.mark.parametrize(
    "message, code, request_id",
    [
        ([0, 9, "ping"], "bad_request", 9),
        ([1, 9, None, {}], "bad_request", None),
        ([0, -1, "ping", {}], "bad_request", None),
        ([0, "9", "ping", {}], "bad_request", None),
        ([0, 9, 12, {}], "bad_request", 9),
        ([0, 9, "ping", []], "bad_request", 9),
        ([0, 9, "ping", {1: 2}], "bad_frame", 9),  # keys are text: refused by the decoder
        ({"id": 9}, "bad_request", None),
    ],
)
def test_ill_shaped_requests(message, code, request_id):
    with pytest.raises(RequestError) as caught:
        decode_request(msgpack.packb(message, use_bin_type=True))
    assert caught.value.error.code == code
    assert caught.value.request_id == request_id


def test_garbage_keeps_its_id_when_the_head_is_readable():
    payload = encode_request(31, "roster_get", {"user": "a@b"})
    with pytest.raises(RequestError) as caught:
        decode_request(payload[:-3])  # truncated inside the args
    assert caught.value.error.code == "bad_frame" and caught.value.request_id == 31
    with pytest.raises(RequestError) as caught:
        decode_request(b"\xc1\xc1\xc1")
    assert caught.value.error.code == "bad_frame" and caught.value.request_id is None
