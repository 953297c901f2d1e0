"""The batch wire format: one CBOR map per batch (docs/schema.md is the reference).

Interface: bytes in, bytes out; no kernel interface. A batch is::

    {"agent": {"instance_id", "mode", "version"}, "events": [event, ...],
     "loss": {reason: count}, "processes": [process record, ...], "resource": {...},
     "schema": SCHEMA_VERSION, "seq": [first, last]}

with every map's keys inserted in sorted order, so plain ``cbor2.dumps`` is
deterministic (``canonical=True`` is about 4x slower and sorts length-first).

Capability: none.

Cost: :func:`encode_batch` is one ``cbor2.dumps`` plus a key sort of the small per-batch
parts (agent, loss, resource, process records); event dicts are taken as
:meth:`lw_embed.events.Event.to_wire` built them, already sorted. :func:`decode_batch`
is one decode plus one walk over the result to check its types.

Failure modes: :func:`encode_batch` raises ``ValueError`` on a bad sequence range (a bug
in the caller). :func:`decode_batch` treats its input as hostile: anything that is not
exactly a batch of this schema version -- undecodable CBOR, trailing bytes, tags,
indefinite-length items, duplicate keys, nesting deeper than :data:`MAX_DEPTH`, non-str
map keys, a missing or extra top-level key, a wrong type -- raises
:class:`~lw_embed.errors.RecordError`, and nothing else escapes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2

from lw_embed.errors import RecordError
from lw_embed.events import sorted_value

SCHEMA_VERSION = 1
#: Deepest container nesting decode_batch accepts (a batch needs about 6).
MAX_DEPTH = 64
TOP_KEYS = frozenset({"agent", "events", "loss", "processes", "resource", "schema", "seq"})
_AGENT_KEYS = ("instance_id", "mode", "version")

# Tags cbor2 decodes by itself (into datetimes, Decimals, shared references, regexes, ...);
# a batch never carries tags, so every one of them is rejected. Unknown tags reach
# tag_hook, which rejects them too.
# fmt: off
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260,
                 261, 1004, 43000, 55799)
# fmt: on


class _TagSeen(Exception):
    pass


def _reject_tag(*_args: Any) -> Any:
    raise _TagSeen("CBOR tags are not allowed in a batch")


_NO_TAGS: dict[int, Any] = dict.fromkeys(_BUILTIN_TAGS, _reject_tag)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """Who sent a batch: the agent instance (one per agent start), its version and mode."""

    instance_id: str
    version: str
    mode: str

    def to_wire(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "mode": self.mode, "version": self.version}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _array_header(n: int) -> bytes:
    """The CBOR header of a definite-length array of ``n`` items (major type 4)."""
    if n < 24:
        return bytes([0x80 + n])
    if n < 1 << 8:
        return bytes([0x98, n])
    if n < 1 << 16:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


_K = {k: cbor2.dumps(k) for k in TOP_KEYS}


def encode_batch_raw(
    agent: AgentIdentity,
    resource: Mapping[str, Any],
    seq_first: int,
    seq_last: int,
    processes: Sequence[Mapping[str, Any]],
    raw_events: Sequence[bytes],
    loss: Mapping[str, int],
) -> bytes:
    """Encode one batch whose events are already CBOR (as the spool stores them).

    The events are spliced in byte for byte, so a batch costs one small encode of its
    header parts and a join, whatever its size. Output is identical to
    :func:`encode_batch` given the decoded events.
    """
    if not (_is_int(seq_first) and _is_int(seq_last)) or not 0 <= seq_first <= seq_last:
        raise ValueError(f"bad sequence range [{seq_first!r}, {seq_last!r}]")
    d = cbor2.dumps
    return b"".join((
        b"\xa7",  # map of the 7 top-level keys, inserted in sorted order
        _K["agent"], d(agent.to_wire()),
        _K["events"], _array_header(len(raw_events)), *raw_events,
        _K["loss"], d({k: loss[k] for k in sorted(loss)}),
        _K["processes"], d([sorted_value(p) for p in processes]),
        _K["resource"], d(sorted_value(resource)),
        _K["schema"], d(SCHEMA_VERSION),
        _K["seq"], d([seq_first, seq_last]),
    ))  # fmt: skip


def encode_batch(
    agent: AgentIdentity,
    resource: Mapping[str, Any],
    seq_first: int,
    seq_last: int,
    processes: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    loss: Mapping[str, int],
) -> bytes:
    """Encode one batch as deterministic CBOR.

    ``events`` are event wire dicts (``Event.to_wire()``), kept as given; ``processes``
    are the process records those events reference; ``loss`` is the drop count per
    reason. ``[seq_first, seq_last]`` is the batch's sequence range, the idempotency key
    together with the agent's instance id.
    """
    raw = [cbor2.dumps(e if type(e) is dict else dict(e)) for e in events]
    return encode_batch_raw(agent, resource, seq_first, seq_last, processes, raw, loss)


def _loads_strict(data: bytes) -> Any:
    """Decode exactly one CBOR item with no tags and no trailing bytes."""
    try:
        dec = cbor2.CBORDecoder(
            io.BytesIO(data),
            tag_hook=_reject_tag,
            semantic_decoders=_NO_TAGS,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        obj = dec.decode()
        try:
            extra = dec.read(1)
        except cbor2.CBORDecodeEOF:
            extra = b""
    except RecursionError as exc:
        raise RecordError("undecodable batch: nested too deeply") from exc
    except Exception as exc:  # cbor2 raises several types on garbage
        raise RecordError(f"undecodable batch: {exc}") from exc
    if extra:
        raise RecordError("undecodable batch: trailing bytes after the batch")
    return obj


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Allow only what JSON can show: maps with str keys, lists, str, bytes, numbers."""
    if depth > MAX_DEPTH:
        raise RecordError(f"{where}: nested too deeply")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise RecordError(f"{where}: map key {type(k).__name__} is not a str")
            _check_plain(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_plain(v, where, depth + 1)
    elif value is not None and not isinstance(value, str | bytes | int | float):
        raise RecordError(f"{where}: value of type {type(value).__name__} not allowed")


def decode_batch(data: bytes) -> dict[str, Any]:
    """Decode and check one batch; raise RecordError unless it is a valid batch."""
    batch = _loads_strict(data)
    if not isinstance(batch, dict):
        raise RecordError(f"batch is a {type(batch).__name__}, not a map")
    _check_plain(batch, "batch")
    keys = set(batch)
    if keys != TOP_KEYS:
        missing, extra = sorted(TOP_KEYS - keys), sorted(keys - TOP_KEYS)
        raise RecordError(f"batch keys: missing {missing}, unexpected {extra}")
    schema = batch["schema"]
    if not _is_int(schema) or schema != SCHEMA_VERSION:
        raise RecordError(f"schema version {schema!r}, expected {SCHEMA_VERSION}")
    agent = batch["agent"]
    if (
        not isinstance(agent, dict)
        or set(agent) != set(_AGENT_KEYS)
        or not all(isinstance(agent[k], str) for k in _AGENT_KEYS)
    ):
        raise RecordError("agent: not a map of str instance_id, mode, version")
    if not isinstance(batch["resource"], dict):
        raise RecordError("resource: not a map")
    seq = batch["seq"]
    if (
        not isinstance(seq, list)
        or len(seq) != 2
        or not all(_is_int(s) for s in seq)
        or not 0 <= seq[0] <= seq[1]
    ):
        raise RecordError(f"seq: not a range [first, last] of ints: {seq!r}")
    loss = batch["loss"]
    if not isinstance(loss, dict) or not all(_is_int(n) and n >= 0 for n in loss.values()):
        raise RecordError("loss: not a map of reason -> count")
    processes = batch["processes"]
    if not isinstance(processes, list):
        raise RecordError("processes: not a list")
    for i, proc in enumerate(processes):
        if not isinstance(proc, dict) or not isinstance(proc.get("exec_id"), str):
            raise RecordError(f"processes[{i}]: not a map with a str exec_id")
    events = batch["events"]
    if not isinstance(events, list):
        raise RecordError("events: not a list")
    for i, ev in enumerate(events):
        if not isinstance(ev, dict):
            raise RecordError(f"events[{i}]: not a map")
        if not isinstance(ev.get("kind"), str) or not _is_int(ev.get("time")):
            raise RecordError(f"events[{i}]: needs a str kind and an int time")
    return batch
