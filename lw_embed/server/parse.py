"""Parsing what the ingest server is sent: batch bodies, query parameters, ``--listen``.

Interface: pure functions, no I/O; :mod:`lw_embed.server.ingest` runs :func:`parse_batch`
in its parse threads (it is CPU-bound) and the others on the event loop (they are cheap).

Capability: none.

Cost: :func:`inflate` produces output in 1 MiB steps and stops at the first byte over the
limit, so a compression bomb costs at most ``limit`` + 1 MiB of memory and the time to
inflate that much (a 1 GiB brotli or gzip bomb is refused in about 0.1 s against a 32 MiB
limit). :func:`parse_batch` adds one strict decode (:func:`lw_embed.codec.decode_batch`)
and one pass over the events.

Failure modes: every refusal is an :class:`InputError` carrying the HTTP status to answer
(the ingest server raises it for its own 401/408/503 too): 413 output over the limit; 400
garbage, truncated or trailing compressed data, a batch ``decode_batch`` rejects or one
failing :func:`check_seqs`, a bad query parameter; 415 an unknown encoding. Nothing else
escapes for any input (:func:`parse_since` and :func:`parse_listen` raise ``ValueError``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import brotli

from lw_embed.codec import decode_batch
from lw_embed.errors import LwEmbedError, RecordError
from lw_embed.server.store import MAX_LIMIT

MiB = 1 << 20
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
ENCODINGS = ("br", "gzip", "identity")
_INFLATE_STEP = MiB
_QUERY_KEYS = frozenset({"kind", "since", "exec_id", "agent", "limit"})
_INT = re.compile(r"-?[0-9]{1,20}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InputError(LwEmbedError):
    """A request refused: ``status`` is the HTTP answer (4xx/503), ``message`` its JSON
    ``{"error": ...}``, ``headers`` any it needs (``WWW-Authenticate``, ``Retry-After``)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def _too_large(limit: int) -> InputError:
    return InputError(413, f"decompressed body larger than {limit} bytes")


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """``data`` decoded per its Content-Encoding; InputError 413 beyond ``limit``, 400 if bad."""
    if encoding == "identity":
        if len(data) > limit:
            raise _too_large(limit)
        return data
    if encoding == "br":
        return _unbrotli(data, limit)
    if encoding == "gzip":
        return _gunzip(data, limit)
    raise InputError(415, f"unsupported Content-Encoding {encoding!r}")


def _unbrotli(data: bytes, limit: int) -> bytes:
    dec = brotli.Decompressor()
    parts: list[bytes] = []
    total = 0
    try:
        chunk = dec.process(data, output_buffer_limit=_INFLATE_STEP)
        while True:
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            parts.append(chunk)
            if dec.is_finished() or dec.can_accept_more_data() or not chunk:
                break
            chunk = dec.process(b"", output_buffer_limit=_INFLATE_STEP)
    except brotli.error as exc:
        raise InputError(400, "body is not valid brotli data") from exc
    if not dec.is_finished():
        raise InputError(400, "brotli body is truncated")
    return b"".join(parts)


def _gunzip(data: bytes, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    rest = data
    try:
        while True:  # one gzip member per round (RFC 1952 allows several)
            dec = zlib.decompressobj(wbits=31)
            pending = rest
            while not dec.eof:
                chunk = dec.decompress(pending, _INFLATE_STEP)
                total += len(chunk)
                if total > limit:
                    raise _too_large(limit)
                parts.append(chunk)
                pending = dec.unconsumed_tail
                if not chunk and not pending:
                    break
            if not dec.eof:
                raise InputError(400, "gzip body is truncated")
            rest = dec.unused_data
            if not rest:
                return b"".join(parts)
    except zlib.error as exc:
        raise InputError(400, "body is not valid gzip data") from exc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_seqs(batch: Mapping[str, Any]) -> None:
    """What the protocol adds to the schema; RecordError unless every event has a unique
    int ``seq`` within the batch's ``[seq_first, seq_last]`` and every number fits 64 bits."""
    first, last = batch["seq"]
    if last > INT64_MAX:
        raise RecordError(f"seq: {last} does not fit in 64 bits")
    if not batch["agent"]["instance_id"]:
        raise RecordError("agent: empty instance_id")
    seen: set[int] = set()
    for i, ev in enumerate(batch["events"]):
        seq = ev.get("seq")
        if not _is_int(seq):
            raise RecordError(f"events[{i}]: needs an int seq")
        if not first <= seq <= last:
            raise RecordError(f"events[{i}]: seq {seq} outside the batch's [{first}, {last}]")
        if seq in seen:
            raise RecordError(f"events[{i}]: seq {seq} appears twice in the batch")
        seen.add(seq)
        if not INT64_MIN <= ev["time"] <= INT64_MAX:
            raise RecordError(f"events[{i}]: time does not fit in 64 bits")


def parse_batch(data: bytes, encoding: str, limit: int) -> dict[str, Any]:
    """Inflate, decode and check one request body; InputError (400/413/415) if it is not a batch."""
    raw = inflate(data, encoding, limit)
    try:
        batch = decode_batch(raw)
        check_seqs(batch)
    except RecordError as exc:
        raise InputError(400, str(exc)) from exc
    return batch


def parse_since(text: str) -> int:
    """``since``: ns since the epoch, or an ISO-8601 time (UTC if no offset); ValueError."""
    text = text.strip()
    bad = f"since: {text!r} is neither ns since the epoch nor ISO-8601"
    if _INT.fullmatch(text):
        ns = int(text)
    else:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(bad) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delta = when - _EPOCH
        ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    if not INT64_MIN <= ns <= INT64_MAX:
        raise ValueError(f"since: {text!r} is out of range")
    return ns


def event_query(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``GET /v1/events`` parameters -> :meth:`Store.events` arguments; InputError 400."""
    keys = [k for k, _ in pairs]
    unknown = sorted(set(keys) - _QUERY_KEYS)
    if unknown:
        raise InputError(400, f"unknown query parameter(s) {unknown}; known: {sorted(_QUERY_KEYS)}")
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InputError(400, f"query parameter(s) {repeated} given more than once")
    query = dict(pairs)
    args: dict[str, Any] = {k: query.get(k) or None for k in ("kind", "exec_id", "agent")}
    since = query.get("since")
    try:
        args["since_ns"] = parse_since(since) if since else None
    except ValueError as exc:
        raise InputError(400, str(exc)) from None
    limit = query.get("limit") or "10000"
    if not (limit.isascii() and limit.isdigit() and len(limit) < 8 and 0 < int(limit) <= MAX_LIMIT):
        raise InputError(400, f"limit: {limit!r} is not an integer in 1..{MAX_LIMIT}")
    args["limit"] = int(limit)
    return args


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); ValueError if malformed."""
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
    else:
        host, sep, port = listen.rpartition(":")
        if ":" in host:
            raise ValueError(f"--listen {listen!r}: write an IPv6 address as [ADDR]:PORT")
    if not (sep and port.isascii() and port.isdigit() and len(port) < 6 and int(port) < 65536):
        raise ValueError(f"--listen {listen!r} is not HOST:PORT")
    return host or "0.0.0.0", int(port)
