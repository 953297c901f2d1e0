"""Frames and offset ranges shared by spool segments, the journal and the state file.

A frame is ``length (u32 LE) | crc32 of payload (u32 LE) | payload``. In a segment the
payload is ``seq (u64 LE) | CBOR of the event``; in the journal and the state file it is
one CBOR item. A header is *plausible* when ``MIN_PAYLOAD <= length <= MAX_PAYLOAD`` and
the frame ends inside the file; a frame is *intact* when it is plausible and its CRC
matches.

Readers never hold more than one chunk (plus one frame, at most ``MAX_PAYLOAD``) of a
file in memory.
"""

from __future__ import annotations

import os
import struct
import zlib
from bisect import bisect_left, bisect_right

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size
SEQ = struct.Struct("<Q")
#: A segment payload holds at least the seq.
MIN_PAYLOAD = SEQ.size
#: Anything longer is corrupt by definition (events are a few hundred bytes).
MAX_PAYLOAD = 16 << 20

_pack_header = HEADER.pack
_pack_seq = SEQ.pack
_crc32 = zlib.crc32


def frame_record(seq: int, cbor: bytes) -> bytes:
    """One segment record: header + seq + CBOR."""
    payload = _pack_seq(seq) + cbor
    return _pack_header(len(payload), _crc32(payload)) + payload


def frame_blob(payload: bytes) -> bytes:
    """One journal/state frame around an opaque payload."""
    return _pack_header(len(payload), _crc32(payload)) + payload


class ChunkReader:
    """Reads frames of one fd by absolute offset through a bounded buffer (``pread``)."""

    __slots__ = ("_base", "_buf", "chunk", "fd")

    def __init__(self, fd: int, chunk: int) -> None:
        self.fd = fd
        self.chunk = chunk
        self._buf = memoryview(b"")
        self._base = 0

    def _fill(self, off: int, need: int, limit: int) -> memoryview | None:
        data = os.pread(self.fd, min(max(self.chunk, need), limit - off), off)
        if len(data) < need:
            return None
        self._buf = memoryview(data)
        self._base = off
        return self._buf

    def _window(self, off: int, need: int, limit: int) -> tuple[memoryview, int] | None:
        rel = off - self._base
        buf = self._buf
        if rel < 0 or rel + need > len(buf):
            got = self._fill(off, need, limit)
            if got is None:
                return None
            return got, 0
        return buf, rel

    def header_end(self, off: int, limit: int) -> int:
        """End offset of the frame at ``off`` if its header is plausible, else -1."""
        if limit - off < HEADER_SIZE:
            return -1
        win = self._window(off, HEADER_SIZE, limit)
        if win is None:
            return -1
        length = int(HEADER.unpack_from(win[0], win[1])[0])
        end = off + HEADER_SIZE + length
        if length < MIN_PAYLOAD or length > MAX_PAYLOAD or end > limit:
            return -1
        return end

    def frame(self, off: int, limit: int) -> tuple[int, memoryview | None]:
        """``(end, payload)`` of the frame at ``off``.

        ``end`` is -1 when the header is not plausible; ``payload`` is None when the frame
        is not intact (bad CRC, short read). The payload view is valid until the next call.
        """
        end = self.header_end(off, limit)
        if end < 0:
            return -1, None
        win = self._window(off, end - off, limit)
        if win is None:
            return end, None
        buf, rel = win
        _, crc = HEADER.unpack_from(buf, rel)
        payload = buf[rel + HEADER_SIZE : rel + end - off]
        if _crc32(payload) != crc:
            return end, None
        return end, payload

    def drop_buffer(self) -> None:
        self._buf = memoryview(b"")


def read_u64(fd: int, off: int) -> int:
    """The u64 at ``off`` (a record's seq, read after a scan)."""
    data = os.pread(fd, SEQ.size, off)
    return int(SEQ.unpack(data)[0]) if len(data) == SEQ.size else -1


class Ranges:
    """Sorted, disjoint, half-open byte ranges ``[start, end)`` of whole records, each with
    the number of records it covers. Adjacent ranges merge, so in-order acks keep one
    range per segment."""

    __slots__ = ("counts", "ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.counts: list[int] = []

    def __len__(self) -> int:
        return len(self.starts)

    def add(self, start: int, end: int, n: int) -> None:
        starts, ends, counts = self.starts, self.ends, self.counts
        if not starts or start >= ends[-1]:
            if starts and ends[-1] == start:
                ends[-1] = end
                counts[-1] += n
            else:
                starts.append(start)
                ends.append(end)
                counts.append(n)
            return
        i = bisect_right(starts, start)
        merge_prev = i > 0 and ends[i - 1] == start
        merge_next = i < len(starts) and starts[i] == end
        if merge_prev and merge_next:
            ends[i - 1] = ends[i]
            counts[i - 1] += n + counts[i]
            del starts[i], ends[i], counts[i]
        elif merge_prev:
            ends[i - 1] = end
            counts[i - 1] += n
        elif merge_next:
            starts[i] = start
            counts[i] += n
        else:
            starts.insert(i, start)
            ends.insert(i, end)
            counts.insert(i, n)

    def find(self, off: int) -> int:
        """Index of the range containing ``off``, or -1."""
        i = bisect_right(self.starts, off) - 1
        if i >= 0 and off < self.ends[i]:
            return i
        return -1

    def cut(self, off: int) -> int:
        """Remove the ranges starting at or after ``off``; return the records they held."""
        i = bisect_left(self.starts, off)
        removed = sum(self.counts[i:])
        del self.starts[i:], self.ends[i:], self.counts[i:]
        return removed

    def flat(self) -> list[int]:
        out: list[int] = []
        for s, e, n in zip(self.starts, self.ends, self.counts, strict=True):
            out += (s, e, n)
        return out

    @classmethod
    def from_flat(cls, flat: list[int]) -> Ranges:
        r = cls()
        if len(flat) % 3:
            raise ValueError("ranges: length is not a multiple of 3")
        for i in range(0, len(flat), 3):
            s, e, n = flat[i], flat[i + 1], flat[i + 2]
            if not (0 <= s < e and n > 0) or (r.ends and s < r.ends[-1]):
                raise ValueError("ranges: not sorted, disjoint and non-empty")
            r.add(s, e, n)
        return r
