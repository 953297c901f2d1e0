"""The spool's metadata: the ``state`` snapshot and the append-only ``journal``.

``state`` is one frame whose payload is a CBOR map (written to ``state.tmp``, fdatasync,
rename, fsync of the directory)::

    {"v": 1, "gen": g, "next_seq": n, "delivered": d, "dropped": {reason: count},
     "segs": [[num, cls, n, size, done_count, evicted, doomed, [start, end, nrec, ...]]]}

``journal`` starts with a header frame ``{"gen": g, "next_seq": n}`` and then holds one
frame per sync: a CBOR list of entries, applied in order on top of the snapshot of the
same generation:

=====================================  ================================================
``["s", next_seq, [[num, cls, n, size]]]``  high-water mark; segment sizes made durable
``["d", num, start, end, nrec, reason]``    records in [start, end) of a segment are done:
                                            delivered (reason None) or dropped (reason)
``["c", {reason: count}]``                  drops of events that never reached a segment
``["x", num, cls, n, size, evicted]``       segment evicted; ``evicted`` records dropped
``["r", num]``                              segment file deleted
``["t", num, n, size, lost, reason]``       segment truncated at run time (corrupt record
                                            or vanished file); ``lost`` records dropped
=====================================  ================================================

Compaction writes a new snapshot with generation g+1 and then a fresh journal; a journal
whose header does not carry the snapshot's generation is stale and ignored (its effects
are in the snapshot). A torn or corrupt journal frame ends the replay: what follows is
at most the acks of the last sync interval, and those items are simply sent again.

Failure modes: an unreadable or garbage state file makes :meth:`Store.load` report
``state="damaged"`` (the caller quarantines it) and start from empty counters; the
journal is then used for its high-water marks only.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass, field
from typing import Any

import cbor2

from lw_embed.fsutil import write_atomic
from lw_embed.spool._frames import HEADER, HEADER_SIZE, ChunkReader, Ranges, frame_blob

STATE = "state"
JOURNAL = "journal"
#: Journal size at which the next sync compacts it into a new snapshot.
COMPACT_BYTES = 256 << 10
#: A state file larger than this is garbage (it holds a few dozen bytes per segment).
MAX_STATE_BYTES = 64 << 20
_OPEN_FLAGS = os.O_CLOEXEC
#: Sequence numbers (and segment numbers) stay below this; a larger one is not ours.
MAX_SEQ = 1 << 62


@dataclass(slots=True)
class Known:
    """What the metadata says about one segment."""

    cls: int = -1
    n: int = 0
    size: int = 0
    done_count: int = 0
    evicted: int = 0
    doomed: bool = False
    done: Ranges = field(default_factory=Ranges)


@dataclass(slots=True)
class Persisted:
    gen: int = 0
    next_seq: int = 1
    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    segs: dict[int, Known] = field(default_factory=dict)
    state: str = "missing"  # "missing" | "ok" | "damaged"
    #: generation in the journal header (may be stale); the next generation must exceed it
    journal_gen: int = 0

    def _seg(self, num: int) -> Known:
        k = self.segs.get(num)
        if k is None:
            k = self.segs[num] = Known()
        return k

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def apply(self, entry: Any) -> None:
        """Apply one journal entry; ValueError if it is malformed."""
        if not isinstance(entry, list) or not entry:
            raise ValueError("entry is not a list")
        tag, args = entry[0], entry[1:]
        if tag == "s" and len(args) == 2 and isinstance(args[1], list):
            self.next_seq = max(self.next_seq, _seq(args[0]))
            for item in args[1]:
                num, cls, n, size = _nats(item, 4)
                k = self._seg(num)
                k.cls, k.n, k.size = cls, max(k.n, n), max(k.size, size)
        elif tag == "d" and len(args) == 5:
            num, start, end, nrec = _nats(args[:4], 4)
            reason = args[4]
            if end <= start or nrec <= 0 or not (reason is None or isinstance(reason, str)):
                raise ValueError("bad done entry")
            k = self._seg(num)
            k.done.add(start, end, nrec)
            k.done_count += nrec
            if reason is None:
                self.delivered += nrec
            else:
                self._drop(reason, nrec)
        elif tag == "c" and len(args) == 1 and isinstance(args[0], dict):
            for reason, n in args[0].items():
                if not isinstance(reason, str):
                    raise ValueError("bad count entry")
                self._drop(reason, _nat(n))
        elif tag == "x" and len(args) == 5:
            num, cls, n, size, evicted = _nats(args, 5)
            k = self._seg(num)
            k.cls, k.n, k.size = cls, max(k.n, n), max(k.size, size)
            k.doomed = True
            k.evicted += evicted
            self._drop("spool.evicted", evicted)
        elif tag == "r" and len(args) == 1:
            self.segs.pop(_nat(args[0]), None)
        elif tag == "t" and len(args) == 5 and isinstance(args[4], str):
            num, n, size, lost = _nats(args[:4], 4)
            k = self._seg(num)
            k.n, k.size = n, size
            k.done_count -= k.done.cut(size)
            self._drop(args[4], lost)
        else:
            raise ValueError(f"unknown journal entry {tag!r}")


def _nat(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError("not a natural number")
    return x


def _seq(x: Any) -> int:
    if _nat(x) >= MAX_SEQ:
        raise ValueError("sequence number out of range")
    return int(x)


def _nats(x: Any, n: int) -> list[int]:
    if not isinstance(x, list) or len(x) != n:
        raise ValueError("bad entry arity")
    return [_nat(v) for v in x]


def snapshot_payload(p: Persisted) -> bytes:
    segs = [
        [num, k.cls, k.n, k.size, k.done_count, k.evicted, k.doomed, k.done.flat()]
        for num, k in sorted(p.segs.items())
    ]
    return cbor2.dumps(
        {
            "delivered": p.delivered,
            "dropped": dict(sorted(p.dropped.items())),
            "gen": p.gen,
            "next_seq": p.next_seq,
            "segs": segs,
            "v": 1,
        }
    )


def _parse_state(data: bytes) -> Persisted:
    if len(data) < HEADER_SIZE:
        raise ValueError("short state")
    length, crc = HEADER.unpack_from(data, 0)
    payload = data[HEADER_SIZE:]
    if length != len(payload) or zlib.crc32(payload) != crc:
        raise ValueError("state frame is damaged")
    m = cbor2.loads(payload)
    if not isinstance(m, dict) or m.get("v") != 1:
        raise ValueError("not a v1 state map")
    p = Persisted(gen=_nat(m["gen"]), next_seq=_seq(m["next_seq"]), delivered=_nat(m["delivered"]))
    dropped = m["dropped"]
    if not isinstance(dropped, dict):
        raise ValueError("dropped is not a map")
    for reason, n in dropped.items():
        if not isinstance(reason, str):
            raise ValueError("bad reason")
        p.dropped[reason] = _nat(n)
    segs = m["segs"]
    if not isinstance(segs, list):
        raise ValueError("segs is not a list")
    for item in segs:
        if not isinstance(item, list) or len(item) != 8 or not isinstance(item[6], bool):
            raise ValueError("bad segment entry")
        num, cls, n, size, done_count, evicted = _nats(item[:6], 6)
        flat = item[7]
        if not isinstance(flat, list):
            raise ValueError("bad ranges")
        done = Ranges.from_flat([_nat(v) for v in flat])
        p.segs[num] = Known(cls, n, size, done_count, evicted, item[6], done)
    p.state = "ok"
    return p


class Store:
    """Owns the directory fd and the journal fd; all writes of metadata go through it."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.dirfd = -1
        self.jfd = -1
        self.jbytes = 0

    def open(self) -> None:
        self.dirfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS)

    def close(self) -> None:
        for fd in (self.jfd, self.dirfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.jfd = self.dirfd = -1

    def fsync_dir(self) -> None:
        os.fsync(self.dirfd)

    def load(self) -> Persisted:
        """Snapshot + journal replay. Never raises on damaged content."""
        path = os.path.join(self.dir, STATE)
        p = Persisted()
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            data = None
        except OSError:
            data = b""
        if data is not None:
            try:
                if len(data) > MAX_STATE_BYTES:
                    raise ValueError("state file too large")
                p = _parse_state(data)
            except Exception:  # garbage of any shape: start from empty counters
                p = Persisted(state="damaged")
        hwm = self._replay(p)
        p.next_seq = max(p.next_seq, hwm)
        return p

    def _replay(self, p: Persisted) -> int:
        """Apply the journal to ``p`` if it belongs to p's generation; return the highest
        next_seq the journal mentions (used even when the journal is stale)."""
        path = os.path.join(self.dir, JOURNAL)
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except OSError:
            return 0
        hwm = 0
        try:
            size = os.fstat(fd).st_size
            reader = ChunkReader(fd, 256 << 10)
            end, payload = reader.frame(0, size)
            if payload is None:
                return 0
            header = cbor2.loads(payload)
            if not isinstance(header, dict):
                return 0
            hwm = _seq(header.get("next_seq", 0))
            p.journal_gen = _nat(header.get("gen", 0))
            apply = p.state == "ok" and header.get("gen") == p.gen
            off = end
            while off < size:
                end, payload = reader.frame(off, size)
                if payload is None:
                    break
                entries = cbor2.loads(payload)
                if not isinstance(entries, list):
                    break
                for entry in entries:
                    if isinstance(entry, list) and entry and entry[0] == "s":
                        hwm = max(hwm, _seq(entry[1]))
                    if apply:
                        p.apply(entry)
                off = end
        except Exception:  # a damaged journal ends the replay; see the module docstring
            pass
        finally:
            os.close(fd)
        return hwm

    def _write_atomic(self, name: str, data: bytes) -> None:
        write_atomic(os.path.join(self.dir, name), data, sync_dir=False)  # caller syncs dir

    def write_snapshot(self, payload: bytes, gen: int, next_seq: int) -> None:
        """New state (``payload`` from :func:`snapshot_payload`, generation ``gen``), then a
        fresh journal of that generation."""
        self._write_atomic(STATE, frame_blob(payload))
        self.fsync_dir()
        header = frame_blob(cbor2.dumps({"gen": gen, "next_seq": next_seq}))
        self._write_atomic(JOURNAL, header)
        self.fsync_dir()
        fd = os.open(os.path.join(self.dir, JOURNAL), os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS)
        if self.jfd >= 0:
            os.close(self.jfd)
        self.jfd = fd
        self.jbytes = len(header)

    def append(self, entries: list[Any]) -> None:
        """One journal frame holding ``entries``, written and fdatasync'd."""
        data = frame_blob(cbor2.dumps(entries))
        n = os.write(self.jfd, data)
        self.jbytes += n
        if n != len(data):
            raise OSError("short write to the spool journal")
        os.fdatasync(self.jfd)

    def remove_tmp(self) -> None:
        """Temp files of a write_atomic a crash interrupted (``.state.<pid>.<n>.tmp``)."""
        prefixes = tuple(f".{name}." for name in (STATE, JOURNAL))
        for name in os.listdir(self.dir):
            if name.startswith(prefixes) and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
