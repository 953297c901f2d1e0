"""Core -> worker records: the compact, framed messages PID 1 hands to the worker.

Interface: a pipe (``pipe2(O_CLOEXEC)``), written non-blocking by the core, read by the
worker. Each record is one frame::

    magic (2 bytes, b"\\xa5\\x1e") | length (u32 LE) | crc32 of payload (u32 LE) | payload

and the payload is a CBOR array whose first item is the record type (:class:`R`). The
magic and CRC let a reader resynchronise: when a worker dies mid-read the core takes back
what is left in the pipe and the next worker starts at the next whole frame.

Cost: one ``cbor2.dumps`` and one ``zlib.crc32`` per record (a few microseconds); the
core never blocks on the pipe (see :class:`lw_embed.runtime.outbox.Outbox`).

Failure modes: a torn or corrupt frame is skipped and counted by :class:`FrameReader`
(``bad_frames``); a payload that is not a list with a known type raises
:class:`~lw_embed.errors.RecordError` in :func:`decode_payload`.

Record layouts (positional, after the type and the time in ns since the epoch):

=========  ===================================================================================
CAPS       report (dict: the capability report, see lw_embed.platform.probe)
FORK       parent_pid, child_pid, child_start_ticks
EXEC       pid, ppid, start_ticks, exe, argv (list[str]), argv_truncated, cwd, uid, gid, euid,
           former_tid
EXIT       pid, exit_code (int | None), signal (int | None), core_dumped
CONNECT    pid, tid, fd, family ("inet" | "inet6" | "unix" | str(int)), address, port
LOSS       totals (dict reason -> count, cumulative since the core started)
STATUS     metrics (dict name -> number, cumulative counters and gauges of the core)
WORKLOAD   main_pid, argv (list[str])  (the workload was started)
SHUTDOWN   reason (str), budget (float: seconds the worker has to drain and exit)
FILEOP     pid, tid, syscall (str), path, path2 (rename/link target, else ""), flags
           (a traced file syscall at entry; paths absolute, resolved by the core)
BIND       pid, tid, fd, family, address, port  (a traced bind at entry, sockaddr as CONNECT)
LISTEN     pid, tid, fd, backlog  (a traced listen at entry; the address is the worker's
           join with the BIND of the same (pid, fd))
=========  ===================================================================================

``*_ticks`` are ``/proc/<pid>/stat`` start times in clock ticks since boot: with the pid
they are the identity of a process (never the pid alone).
"""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum
from typing import Any

import cbor2

from lw_embed.errors import RecordError

MAGIC = b"\xa5\x1e"
_HEADER = struct.Struct("<2sII")
HEADER_SIZE = _HEADER.size
#: A frame larger than this is corrupt by definition (argv is bounded well below it).
MAX_PAYLOAD = 1 << 20


class R(IntEnum):
    """Record types."""

    CAPS = 1
    FORK = 2
    EXEC = 3
    EXIT = 4
    CONNECT = 5
    LOSS = 6
    STATUS = 7
    WORKLOAD = 8
    SHUTDOWN = 9
    FILEOP = 20  # lw_embed.sources.filetrace
    BIND = 21  # lw_embed.sources.tracer (trace_connect), lw_embed.sources.packets
    LISTEN = 22


#: Number of fields after (type, time) for each record type.
ARITY: dict[int, int] = {
    R.CAPS: 1,
    R.FORK: 3,
    R.EXEC: 11,
    R.EXIT: 4,
    R.CONNECT: 6,
    R.LOSS: 1,
    R.STATUS: 1,
    R.WORKLOAD: 2,
    R.SHUTDOWN: 2,
    R.FILEOP: 6,
    R.BIND: 6,
    R.LISTEN: 4,
}


def frame(rtype: R, time_ns: int, *fields: Any) -> bytes:
    """Encode one record as a frame."""
    payload = cbor2.dumps([int(rtype), time_ns, *fields])
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> list[Any]:
    """Decode and check one payload; raise RecordError if it is not a valid record."""
    try:
        rec = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types on garbage
        raise RecordError(f"undecodable record: {exc}") from exc
    if not isinstance(rec, list) or len(rec) < 2:
        raise RecordError("record is not a list")
    rtype, t = rec[0], rec[1]
    if not isinstance(rtype, int) or rtype not in ARITY or not isinstance(t, int):
        raise RecordError(f"unknown record type {rtype!r}")
    if len(rec) != 2 + ARITY[rtype]:
        raise RecordError(f"record type {rtype} has {len(rec) - 2} fields")
    return rec


class FrameReader:
    """Splits a byte stream into record payloads, resynchronising on damage.

    ``feed()`` bytes as they arrive, then iterate ``payloads()``. Bytes before the next
    magic and frames whose CRC does not match are skipped and counted in ``bad_frames``
    (one count per skipped region).
    """

    __slots__ = ("_buf", "bad_frames")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.bad_frames = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a whole frame."""
        return len(self._buf)

    def payloads(self) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        n = len(buf)
        while n - pos >= HEADER_SIZE:
            if buf[pos : pos + 2] != MAGIC:
                nxt = buf.find(MAGIC, pos + 1)
                self.bad_frames += 1
                if nxt < 0:
                    # keep a possible half magic at the end
                    pos = n - 1 if buf[-1:] == MAGIC[:1] else n
                    break
                pos = nxt
                continue
            _, length, crc = _HEADER.unpack_from(buf, pos)
            if length > MAX_PAYLOAD:
                self.bad_frames += 1
                pos += 1
                continue
            end = pos + HEADER_SIZE + length
            if end > n:
                break
            payload = bytes(buf[pos + HEADER_SIZE : end])
            if zlib.crc32(payload) != crc:
                self.bad_frames += 1
                pos += 1
                continue
            out.append(payload)
            pos = end
        del buf[:pos]
        return out
