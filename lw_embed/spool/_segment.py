"""One segment file in memory: counts, done ranges, and the lease cursor that reads it."""

from __future__ import annotations

import contextlib
import os

from lw_embed.spool._api import CORRUPT, MISSING, SpoolItem
from lw_embed.spool._frames import SEQ, ChunkReader, Ranges

#: Read buffer of a segment a lease is reading (in practice one per class at a time).
LEASE_CHUNK = 256 << 10
_unpack_seq = SEQ.unpack_from
_SEQ_SIZE = SEQ.size


class Unreadable(Exception):
    """The record at ``off`` cannot be read (``reason``: spool.corrupt or spool.missing)."""

    def __init__(self, off: int, reason: str) -> None:
        super().__init__(off, reason)
        self.off = off
        self.reason = reason


class Segment:
    """One segment file. Every record before ``cursor`` is done, leased or released.

    ``n``/``size`` count what was written; ``durable_n``/``durable_size`` what the last
    sync made durable. ``doomed``: evicted, waiting for its leased records; ``dead``: no
    pending record left, the file is deleted at the next sync.
    """

    __slots__ = (
        "cls", "cursor", "dead", "done", "done_count", "doomed", "durable_n", "durable_size",
        "evicted", "fd", "leased", "n", "num", "path", "reader", "released", "sealed", "size",
    )  # fmt: skip

    def __init__(self, cls: int, num: int, path: str) -> None:
        self.cls = cls
        self.num = num
        self.path = path
        self.fd = -1
        self.n = self.size = self.durable_n = self.durable_size = 0
        self.done = Ranges()
        self.done_count = self.evicted = self.leased = self.released = self.cursor = 0
        self.doomed = self.dead = self.sealed = False
        self.reader: ChunkReader | None = None

    def close_fd(self) -> None:
        self.reader = None
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def take(self, out: list[SpoolItem], limit: int, budget: int, leased: dict[int, Out]) -> int:
        """Lease records from the cursor into ``out`` (and ``leased``) until ``limit`` items
        or ``budget`` bytes; return the budget left, -1 when an item did not fit.

        Raises :class:`Unreadable` at a record that cannot be read.
        """
        if self.cursor >= self.size:
            return budget
        reader = self.reader
        if reader is None:
            if self.fd < 0:
                try:
                    self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise Unreadable(self.cursor, MISSING) from exc
            reader = self.reader = ChunkReader(self.fd, LEASE_CHUNK)
        done, cls = self.done, self.cls
        while self.cursor < self.size and len(out) < limit:
            off = self.cursor
            if done.starts:
                i = done.find(off)
                if i >= 0:
                    self.cursor = done.ends[i]
                    continue
            try:
                end, payload = reader.frame(off, self.size)
            except OSError:
                payload = None
            if payload is None:
                raise Unreadable(off, CORRUPT)
            size = len(payload) - _SEQ_SIZE
            if out and size > budget:
                return -1
            seq = _unpack_seq(payload)[0]
            item = SpoolItem(seq, cls, bytes(payload[_SEQ_SIZE:]))
            leased[seq] = Out(self, off, end, item)
            self.leased += 1
            self.cursor = end
            out.append(item)
            budget -= size
        if self.cursor >= self.size:
            reader.drop_buffer()
        return budget


class Out:
    """A record handed out by lease (or released back to the pool)."""

    __slots__ = ("end", "item", "off", "seg")

    def __init__(self, seg: Segment, off: int, end: int, item: SpoolItem) -> None:
        self.seg = seg
        self.off = off
        self.end = end
        self.item = item
