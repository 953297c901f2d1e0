"""The batch wire format: golden bytes, round trip and strict decoding of hostile input."""

from __future__ import annotations

import random
import time
from typing import Any

import cbor2
import pytest

from lw_embed.codec import SCHEMA_VERSION, AgentIdentity, decode_batch, encode_batch
from lw_embed.errors import RecordError
from lw_embed.events import ProcessExit

AGENT = AgentIdentity(instance_id="a1b2c3", version="0.1.0", mode="wrapper")
RESOURCE = {"container_id": "abc123", "cloud": {"provider": "aws", "platform": "fargate"}}
PROCS = [{"pid": 42, "exec_id": "9f86d081884c7d65", "exe": "/usr/bin/curl", "argv": ["curl"]}]
EXIT = ProcessExit(
    time=1_700_000_001_000_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    exit_code=None,
    signal=9,
    core_dumped=False,
    duration_ns=1_000_000_000,
    source="procfs",
)

GOLDEN_BATCH = (
    "a7656167656e74a36b696e7374616e63655f696466613162326333646d6f646567777261707065"
    "726776657273696f6e65302e312e30666576656e747381a86b636f72655f64756d706564f46b64"
    "75726174696f6e5f6e731a3b9aca0067657865635f69647039663836643038313838346337643635"
    "646b696e646c70726f636573732e6578697463706964182a667369676e616c0966736f75726365"
    "6670726f6366736474696d651b17979cfe71c4ca00646c6f7373a16a71756575655f66756c6c03"
    "6970726f63657373657381a4646172677681646375726c636578656d2f7573722f62696e2f6375"
    "726c67657865635f6964703966383664303831383834633764363563706964182a687265736f75"
    "726365a265636c6f7564a268706c6174666f726d67666172676174656870726f76696465726361"
    "77736c636f6e7461696e65725f69646661626331323366736368656d610163736571820707"
)


def _batch() -> bytes:
    return encode_batch(AGENT, RESOURCE, 7, 7, PROCS, [EXIT.to_wire()], {"queue_full": 3})


def _valid() -> dict[str, Any]:
    return cbor2.loads(_batch())  # type: ignore[no-any-return]


def test_golden_batch() -> None:
    assert _batch().hex() == GOLDEN_BATCH


def test_round_trip() -> None:
    batch = decode_batch(_batch())
    assert list(batch) == ["agent", "events", "loss", "processes", "resource", "schema", "seq"]
    assert batch["schema"] == SCHEMA_VERSION
    assert batch["agent"] == {"instance_id": "a1b2c3", "mode": "wrapper", "version": "0.1.0"}
    assert batch["seq"] == [7, 7]
    assert batch["events"] == [EXIT.to_wire()]
    assert batch["processes"] == PROCS
    assert batch["resource"] == RESOURCE
    assert batch["loss"] == {"queue_full": 3}


def test_encoding_is_deterministic_whatever_the_input_order() -> None:
    a = encode_batch(AGENT, {"b": 1, "a": 2}, 1, 2, [], [], {"y": 1, "x": 2})
    b = encode_batch(AGENT, {"a": 2, "b": 1}, 1, 2, [], [], {"x": 2, "y": 1})
    assert a == b


def test_empty_batch_round_trips() -> None:
    batch = decode_batch(encode_batch(AGENT, {}, 0, 0, [], [], {}))
    assert batch["events"] == [] and batch["processes"] == [] and batch["loss"] == {}


@pytest.mark.parametrize("first,last", [(-1, 2), (3, 2), (True, 2)])
def test_encode_rejects_bad_range(first: int, last: int) -> None:
    with pytest.raises(ValueError):
        encode_batch(AGENT, {}, first, last, [], [], {})


def _mutated(**changes: Any) -> bytes:
    batch = _valid()
    for key, value in changes.items():
        if value is KeyError:
            del batch[key]
        else:
            batch[key] = value
    return cbor2.dumps(batch)


@pytest.mark.parametrize(
    "changes",
    [
        {"schema": 2},
        {"schema": "1"},
        {"schema": True},
        {"schema": KeyError},
        {"events": KeyError},
        {"extra": 1},
        {"seq": [1]},
        {"seq": [1, 2, 3]},
        {"seq": [2, 1]},
        {"seq": ["1", "2"]},
        {"seq": 5},
        {"events": {}},
        {"events": [1]},
        {"events": [{"time": 1}]},
        {"events": [{"kind": 1, "time": 1}]},
        {"events": [{"kind": "x", "time": "1"}]},
        {"events": [{"kind": "x", "time": 1.0}]},
        {"events": [{"kind": "x"}]},
        {"loss": []},
        {"loss": {"x": "1"}},
        {"loss": {"x": -1}},
        {"processes": {}},
        {"processes": [{"pid": 1}]},
        {"resource": []},
        {"agent": {"instance_id": "x"}},
        {"agent": {"instance_id": 1, "mode": "m", "version": "v"}},
    ],
    ids=repr,
)
def test_decode_rejects_wrong_shape(changes: dict[str, Any]) -> None:
    with pytest.raises(RecordError):
        decode_batch(_mutated(**changes))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        cbor2.dumps([1, 2]),
        cbor2.dumps("batch"),
        cbor2.dumps(None),
        b"\xf7",  # undefined
        b"\xe0",  # simple value
    ],
    ids=repr,
)
def test_decode_rejects_non_batches(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_batch(data)


def test_decode_rejects_trailing_bytes() -> None:
    data = _batch()
    decode_batch(data)
    with pytest.raises(RecordError, match="trailing"):
        decode_batch(data + b"\x00")
    with pytest.raises(RecordError, match="trailing"):
        decode_batch(data + data)


def test_decode_rejects_truncation_at_every_length() -> None:
    data = _batch()
    for n in range(len(data)):
        with pytest.raises(RecordError):
            decode_batch(data[:n])


@pytest.mark.parametrize(
    "data",
    [
        b"\x81" * 100_000,  # [[[[...]]]]
        b"\xa1\x61a" * 50_000,  # {"a": {"a": ...}}
        b"\xd8\x1c" * 100_000 + b"\x00",  # nested shareable tags
    ],
    ids=["arrays", "maps", "tags"],
)
def test_decode_rejects_deep_nesting(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_batch(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff",  # bytes of 2**63-1
        b"\x7b\x7f\xff\xff\xff\xff\xff\xff\xff",  # text of 2**63-1
        b"\x9b\x7f\xff\xff\xff\xff\xff\xff\xff",  # array of 2**63-1 items
        b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",  # map of 2**63-1 pairs
        b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff\x61a",
        b"\xa1\x66events\x9b\x00\x00\x00\x01\x00\x00\x00\x00",
    ],
    ids=repr,
)
def test_decode_rejects_huge_declared_length_quickly(data: bytes) -> None:
    start = time.monotonic()
    with pytest.raises(RecordError):
        decode_batch(data)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1\x00",  # epoch datetime
        b"\xc1\x1b\xff\xff\xff\xff\xff\xff\xff\xff",  # out-of-range datetime
        b"\xc2\x41\x01",  # bignum
        b"\xc5\x82\x1b\x00\x00\x00\xff\xff\xff\xff\xff\x01",  # bigfloat, huge exponent
        b"\xd8\x1c\x81\xd8\x1d\x00",  # shared reference cycle
        b"\xd9\xd9\xf7" + cbor2.dumps({"a": 1}),  # self-describe
        b"\xda\x00\x01\x00\x00\x01",  # unknown tag
    ],
    ids=repr,
)
def test_decode_rejects_tags(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_batch(data)


def test_decode_rejects_tag_inside_a_valid_batch() -> None:
    batch = _valid()
    batch["resource"] = {"started": cbor2.CBORTag(1, 0)}
    with pytest.raises(RecordError):
        decode_batch(cbor2.dumps(batch))


@pytest.mark.parametrize(
    "data",
    [
        b"\xa2\x61a\x01\x61a\x02",  # duplicate key
        b"\xa1\x01\x02",  # int key
        b"\xa1\x82\x01\x02\x03",  # array key
        b"\x9f\xff",  # indefinite array
        b"\x62\xff\xfe",  # invalid UTF-8
    ],
    ids=repr,
)
def test_decode_rejects_odd_encodings(data: bytes) -> None:
    with pytest.raises(RecordError):
        decode_batch(data)


def test_non_str_key_nested_in_an_event_rejected() -> None:
    batch = _valid()
    batch["events"] = [{"kind": "x", "time": 1, "attrs": {1: "one"}}]
    with pytest.raises(RecordError):
        decode_batch(cbor2.dumps(batch))


def test_random_bytes_never_crash() -> None:
    rng = random.Random(20240501)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 96))
        with pytest.raises(RecordError):
            decode_batch(data)


def test_bit_flips_of_a_valid_batch_never_crash() -> None:
    rng = random.Random(7)
    good = _batch()
    for _ in range(3000):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        try:
            batch = decode_batch(bytes(data))
        except RecordError:
            continue
        assert isinstance(batch, dict)  # a flip inside a string can still be a valid batch


def test_every_tag_number_rejected() -> None:
    # Guards the list of tags cbor2 decodes by itself: none may slip into a batch.
    for tag in [*range(70_000), 55799, 2**32, 2**64 - 1]:
        data = cbor2.dumps(cbor2.CBORTag(tag, 0))
        with pytest.raises(RecordError):
            decode_batch(data)
