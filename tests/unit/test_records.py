"""Core -> worker record framing: round trip, resynchronisation and payload checks."""

from __future__ import annotations

import cbor2
import pytest

from lw_embed.errors import RecordError
from lw_embed.records import ARITY, HEADER_SIZE, MAGIC, FrameReader, R, decode_payload, frame

EXEC_FIELDS = (42, 1, 12345, "/bin/sh", ["sh", "-c", "true"], False, "/", 0, 0, 0, 42)


def _frames() -> list[bytes]:
    return [
        frame(R.FORK, 1, 1, 42, 12345),
        frame(R.EXEC, 2, *EXEC_FIELDS),
        frame(R.EXIT, 3, 42, 0, None, False),
        frame(R.SHUTDOWN, 4, "sigterm", 1.5),
    ]


def test_round_trip() -> None:
    reader = FrameReader()
    reader.feed(b"".join(_frames()))
    recs = [decode_payload(p) for p in reader.payloads()]
    assert recs == [
        [R.FORK, 1, 1, 42, 12345],
        [R.EXEC, 2, *EXEC_FIELDS],
        [R.EXIT, 3, 42, 0, None, False],
        [R.SHUTDOWN, 4, "sigterm", 1.5],
    ]
    assert reader.bad_frames == 0 and reader.pending == 0


def test_every_type_round_trips() -> None:
    reader = FrameReader()
    for rtype, arity in ARITY.items():
        reader.feed(frame(R(rtype), 7, *range(arity)))
    recs = [decode_payload(p) for p in reader.payloads()]
    assert [r[0] for r in recs] == list(ARITY)
    assert all(r[2:] == list(range(ARITY[r[0]])) for r in recs)


def test_resync_after_garbage_prefix() -> None:
    reader = FrameReader()
    reader.feed(b"\x00garbage\xa5 more" + b"".join(_frames()))
    payloads = reader.payloads()
    assert len(payloads) == 4
    assert reader.bad_frames >= 1
    assert reader.pending == 0


def test_garbage_without_magic_is_dropped() -> None:
    reader = FrameReader()
    reader.feed(b"x" * 100)
    assert reader.payloads() == []
    assert reader.bad_frames == 1
    assert reader.pending == 0


def test_bit_flipped_frame_skipped_and_counted() -> None:
    frames = _frames()
    bad = bytearray(frames[1])
    bad[HEADER_SIZE + 3] ^= 0x10  # payload byte: the CRC no longer matches
    reader = FrameReader()
    reader.feed(frames[0] + bytes(bad) + frames[2] + frames[3])
    recs = [decode_payload(p) for p in reader.payloads()]
    assert [r[0] for r in recs] == [R.FORK, R.EXIT, R.SHUTDOWN]
    assert reader.bad_frames >= 1


def test_oversized_length_skipped() -> None:
    reader = FrameReader()
    reader.feed(MAGIC + b"\xff\xff\xff\x7f" + b"\x00" * 4 + _frames()[0])
    assert [decode_payload(p)[0] for p in reader.payloads()] == [R.FORK]
    assert reader.bad_frames >= 1


def test_frame_split_across_feeds() -> None:
    data = b"".join(_frames())
    reader = FrameReader()
    got: list[bytes] = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        got.extend(reader.payloads())
    assert [decode_payload(p)[1] for p in got] == [1, 2, 3, 4]
    assert reader.bad_frames == 0 and reader.pending == 0


def test_truncated_tail_kept_pending() -> None:
    frames = _frames()
    reader = FrameReader()
    reader.feed(frames[0] + frames[1][:-3])
    assert len(reader.payloads()) == 1
    assert reader.pending == len(frames[1]) - 3
    assert reader.bad_frames == 0
    reader.feed(frames[1][-3:])
    assert [decode_payload(p)[0] for p in reader.payloads()] == [R.EXEC]
    assert reader.pending == 0


def test_header_only_tail_kept_pending() -> None:
    reader = FrameReader()
    reader.feed(_frames()[0][: HEADER_SIZE - 1])
    assert reader.payloads() == []
    assert reader.pending == HEADER_SIZE - 1


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.dumps([int(R.FORK), 1, 1, 42]),  # too few fields
        cbor2.dumps([int(R.EXIT), 1, 42, 0, None, False, "extra"]),  # too many
        cbor2.dumps([99, 1, "x"]),  # unknown type
        cbor2.dumps(["3", 1]),  # type not an int
        cbor2.dumps([int(R.SHUTDOWN), "1", "x"]),  # time not an int
        cbor2.dumps({"type": 1}),  # not a list
        cbor2.dumps([1]),  # too short
        cbor2.dumps("text"),
        b"\xff\x00",  # undecodable
        b"",
    ],
    ids=repr,
)
def test_decode_payload_errors(payload: bytes) -> None:
    with pytest.raises(RecordError):
        decode_payload(payload)
