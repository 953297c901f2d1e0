"""``lw-embed decode PATH...``: batch files and spools as JSON lines, for people.

Interface: reads batch files (as written by :class:`lw_embed.sinks.files.FileSink`), spool
segments (``*.seg`` in ``<data-dir>/spool``) and, for a directory, every ``*.cbor`` and
``*.seg`` file in it (not recursive), in name order. Order events by ``seq`` when order
matters (batches are cut by priority). Each event is printed as one JSON object per
line, keys sorted, exactly as stored (bytes shown as hex strings).

Capability: read access to the files.

Cost: one batch file in memory at a time (at most :data:`MAX_FILE_BYTES`), one strict
decode each (:func:`lw_embed.codec.decode_batch`); segments are streamed record by record.

Failure modes: a file that does not decode (torn, truncated, garbage, too large,
unreadable) is reported on ``err`` in one line naming it, and decoding goes on with the
next file; the exit status is then 1. A path that does not exist is a usage error: it is
reported and nothing is decoded (exit 2).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TextIO

import cbor2

from lw_embed.codec import decode_batch
from lw_embed.errors import RecordError

#: A batch file larger than this is not a batch (batches are about 1 s of events).
MAX_FILE_BYTES = 64 << 20
SUFFIX = ".cbor"
#: spool segments (lw_embed.spool): records of length | crc32 | seq u64 | CBOR event
SEGMENT_SUFFIX = ".seg"
_SEG_HEADER = struct.Struct("<II")
_MAX_RECORD = 16 << 20


def batch_files(paths: Iterable[str]) -> Iterator[str]:
    """The files named, and the ``*.cbor`` files of the directories named, in name order."""
    for path in paths:
        if os.path.isdir(path):
            names = sorted(
                e.name
                for e in os.scandir(path)
                if e.name.endswith((SUFFIX, SEGMENT_SUFFIX))
                and not e.name.startswith(".")
                and e.is_file()
            )
            for name in names:
                yield os.path.join(path, name)
        else:
            yield path


def read_batch(path: str) -> dict[str, Any]:
    """Read and decode one batch file; RecordError if it is not a batch, OSError if unreadable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_FILE_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise RecordError(f"larger than {MAX_FILE_BYTES} bytes")
    return decode_batch(b"".join(chunks))


def read_segment(path: str) -> Iterator[dict[str, Any]]:
    """The events of one spool segment, streamed; RecordError at the first damaged record
    (the events before it have been yielded). Delivered records not yet deleted are
    included: a segment is what is on disk, not what is pending."""
    with open(path, "rb") as f:
        while header := f.read(_SEG_HEADER.size):
            if len(header) < _SEG_HEADER.size:
                raise RecordError("torn record header at the end")
            length, crc = _SEG_HEADER.unpack(header)
            if not 8 <= length <= _MAX_RECORD:
                raise RecordError(f"bad record length {length}")
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                raise RecordError("torn or corrupt record")
            try:
                event = cbor2.loads(payload[8:])
            except Exception as exc:
                raise RecordError(f"undecodable event: {exc}") from exc
            if not isinstance(event, dict):
                raise RecordError("record is not an event map")
            yield event


def events_of(path: str) -> Iterator[dict[str, Any]]:
    """The events of one batch file or spool segment."""
    if path.endswith(SEGMENT_SUFFIX):
        return read_segment(path)
    return iter(read_batch(path)["events"])


def iter_events(paths: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The events of the batch files and spool segments in ``paths`` (directories
    expanded), as stored. Raises RecordError or OSError at the first file that does not
    decode."""
    for path in batch_files(paths):
        yield from events_of(path)


def _json_default(obj: object) -> str:
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def to_json_line(event: dict[str, Any]) -> str:
    """One event as a compact JSON line (no newline), keys sorted, bytes as hex."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), default=_json_default)


def main(paths: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Print the events of ``paths`` as JSON lines; 0 all decoded, 1 some failed, 2 usage."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing or not paths:
        for p in missing:
            err.write(f"lw-embed decode: {p}: no such file or directory\n")
        if not paths:
            err.write("lw-embed decode: no path given\n")
        return 2
    status = 0
    for arg in paths:
        try:
            files = list(batch_files([arg]))
        except OSError as exc:  # an unreadable directory
            err.write(f"lw-embed decode: {arg}: {_reason(exc)}\n")
            status = 1
            continue
        for path in files:
            try:
                for ev in events_of(path):
                    out.write(to_json_line(ev))
                    out.write("\n")
            except (RecordError, OSError) as exc:
                err.write(f"lw-embed decode: {path}: {_reason(exc)}\n")
                status = 1
    return status


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
