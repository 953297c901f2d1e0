"""Open-time recovery, and the bounded quarantine directory.

:func:`recover` loads the metadata and walks the segment files one at a time;
:func:`recover_segment` streams one segment (one chunk in memory at a time), keeps its
intact prefix, moves the first damaged record and everything after it to the quarantine,
and says how many records were lost (the counting rule is in the package docstring).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass

from lw_embed.spool._api import CORRUPT, EVICTED, MISSING
from lw_embed.spool._frames import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MIN_PAYLOAD,
    ChunkReader,
    Ranges,
    read_u64,
)
from lw_embed.spool._journal import MAX_SEQ, STATE, Known, Store

log = logging.getLogger("lw_embed.spool")

SEGMENT_RE = re.compile(r"p([0-2])-([0-9a-f]{16})\.seg")
SCAN_CHUNK = 1 << 20
#: Most bytes kept in <dir>/quarantine; the oldest pieces go first.
QUARANTINE_MAX = 4 << 20


def segment_name(cls: int, num: int) -> str:
    return f"p{cls}-{num:016x}.seg"


def list_segments(directory: str) -> list[tuple[int, int, str]]:
    """``(cls, num, name)`` of the segment files in ``directory``, oldest first per class."""
    out = []
    for name in os.listdir(directory):
        m = SEGMENT_RE.fullmatch(name)
        if m is not None and int(m.group(2), 16) < MAX_SEQ:
            out.append((int(m.group(1)), int(m.group(2), 16), name))
    out.sort()
    return out


class Quarantine:
    """``<dir>/quarantine``: copies of damaged bytes, at most :data:`QUARANTINE_MAX`."""

    def __init__(self, path: str, cap: int = QUARANTINE_MAX) -> None:
        self.path = path
        self.cap = cap
        self.bytes = 0
        self._n = itertools.count()

    def _new_name(self, label: str) -> str:
        return os.path.join(self.path, f"{time.time_ns():020d}-{next(self._n):04d}-{label}")

    def refresh(self) -> None:
        self.bytes = sum(size for _, size in self._pieces())

    def _pieces(self) -> list[tuple[str, int]]:
        out = []
        try:
            names = sorted(os.listdir(self.path))
        except OSError:
            return []
        for name in names:
            with contextlib.suppress(OSError):
                out.append((name, os.stat(os.path.join(self.path, name)).st_size))
        return out

    def _enforce(self) -> None:
        pieces = self._pieces()
        total = sum(size for _, size in pieces)
        for name, size in pieces:
            if total <= self.cap:
                break
            try:
                os.unlink(os.path.join(self.path, name))
                total -= size
            except OSError:
                pass
        self.bytes = total

    def copy(self, fd: int, start: int, end: int, label: str) -> None:
        """Copy bytes [start, end) of ``fd`` (at most ``cap`` of them). Best effort."""
        try:
            out = os.open(self._new_name(label), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            log.warning("spool: cannot write to the quarantine: %s", exc)
            return
        try:
            off, stop = start, min(end, start + self.cap)
            while off < stop:
                data = os.pread(fd, min(SCAN_CHUNK, stop - off), off)
                if not data:
                    break
                os.write(out, data)
                off += len(data)
            os.fdatasync(out)
        except OSError as exc:
            log.warning("spool: quarantine copy incomplete: %s", exc)
        finally:
            os.close(out)
        self._enforce()

    def move(self, path: str, label: str) -> None:
        """Move a whole file (a damaged state file) into the quarantine. Best effort."""
        try:
            os.replace(path, self._new_name(label))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._enforce()


def scan(fd: int, size: int, old: Ranges | None) -> tuple[int, Ranges, int, int, int]:
    """Walk the intact prefix of a segment.

    Returns ``(records, done, done_count, valid_end, last_offset)``: ``done`` is ``old``
    restricted to the intact records (rebuilt record by record), ``last_offset`` the
    offset of the last intact record (-1 if none).
    """
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    has_old = old is not None and len(old) > 0
    done = Ranges()
    n = done_n = 0
    off = 0
    last = -1
    buf = memoryview(b"")
    base = 0
    while off < size:
        rel = off - base
        if len(buf) - rel < HEADER_SIZE:
            buf = memoryview(os.pread(fd, min(SCAN_CHUNK, size - off), off))
            base, rel = off, 0
            if len(buf) < HEADER_SIZE:
                break
        length, crc = unpack(buf, rel)
        end = off + HEADER_SIZE + length
        if length < MIN_PAYLOAD or length > MAX_PAYLOAD or end > size:
            break
        if end - base > len(buf):
            buf = memoryview(os.pread(fd, min(max(SCAN_CHUNK, end - off), size - off), off))
            base, rel = off, 0
            if len(buf) < end - off:
                break
        if crc32(buf[rel + HEADER_SIZE : rel + HEADER_SIZE + length]) != crc:
            break
        n += 1
        if has_old and old is not None and old.find(off) >= 0:
            done.add(off, end, 1)
            done_n += 1
        last = off
        off = end
    return n, done, done_n, off, last


def count_tail(fd: int, start: int, size: int, done: Ranges | None) -> int:
    """Records lost in the damaged region [start, size): frames walked by their length
    fields (CRC not required) that were not done, plus 1 for an unwalkable remainder."""
    reader = ChunkReader(fd, SCAN_CHUNK)
    lost = 0
    off = start
    while off < size:
        end = reader.header_end(off, size)
        if end < 0:
            break
        if done is None or done.find(off) < 0:
            lost += 1
        off = end
    if off < size and (done is None or done.find(off) < 0):
        lost += 1
    return lost


@dataclass(slots=True)
class Found:
    """A segment kept by recovery: its intact records, sealed."""

    cls: int
    num: int
    name: str
    n: int
    size: int
    done: Ranges
    done_count: int


def recover_segment(
    directory: str, cls: int, num: int, known: Known | None, quarantine: Quarantine
) -> tuple[Found | None, int, int]:
    """Recover one segment file; returns ``(found or None if deleted, lost, last_seq)``.

    Never raises: an unreadable file counts what the metadata says it held as lost.
    """
    name = segment_name(cls, num)
    path = os.path.join(directory, name)
    expected = max(0, known.n - known.done_count - known.evicted) if known is not None else 0
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("spool: cannot open segment %s: %s", name, exc)
        return None, max(expected, 1), -1
    try:
        size = os.fstat(fd).st_size
        old = known.done if known is not None else None
        n, done, done_n, valid_end, last_off = scan(fd, size, old)
        lost = 0
        if valid_end < size:
            lost = count_tail(fd, valid_end, size, old)
            quarantine.copy(fd, valid_end, size, f"{name}@{valid_end}")
            log.warning(
                "spool: segment %s damaged at offset %d of %d; tail quarantined",
                name, valid_end, size,
            )  # fmt: skip
        last_seq = read_u64(fd, last_off + HEADER_SIZE) if last_off >= 0 else -1
        pending = n - done_n
        lost = max(lost, expected - pending)
        if pending == 0:
            os.close(fd)
            fd = -1
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None, lost, last_seq
        if valid_end < size:
            os.ftruncate(fd, valid_end)
            os.fdatasync(fd)
        elif known is None or valid_end > known.size:
            os.fdatasync(fd)  # the snapshot written at open will claim these records
        return Found(cls, num, name, n, valid_end, done, done_n), lost, last_seq
    except OSError as exc:
        log.warning("spool: cannot recover segment %s: %s", name, exc)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None, max(expected, 1), -1
    finally:
        if fd >= 0:
            os.close(fd)


@dataclass(slots=True)
class Recovered:
    """What open() rebuilds the spool from."""

    found: list[Found]
    delivered: int
    dropped: dict[str, int]
    next_seq: int
    gen: int


def recover(directory: str, store: Store, quarantine: Quarantine) -> Recovered:
    """Load state + journal, reconcile them with the segment files (one at a time)."""
    store.remove_tmp()
    quarantine.refresh()
    p = store.load()
    if p.state == "damaged":
        log.warning("spool: state file is damaged; quarantined, counters restart")
        quarantine.move(os.path.join(directory, STATE), STATE)
    dropped = dict(p.dropped)
    counts: dict[str, int] = {}

    def count(reason: str, n: int) -> None:
        if n > 0:
            counts[reason] = counts.get(reason, 0) + n

    def ours(cls: int, num: int) -> bool:
        """The state knows segment ``num`` and in this class (-1: any class)."""
        k = p.segs.get(num)
        return k is not None and k.cls in (-1, cls)

    # numbers are unique across classes: where two files share one, the file the state
    # knows comes first and any other is foreign (quarantined), never the other way round
    files = sorted(list_segments(directory), key=lambda f: (f[1], not ours(f[0], f[1])))
    present = {num for cls, num, _ in files if ours(cls, num)}
    for num, k in p.segs.items():
        if num not in present:
            count(EVICTED if k.doomed else MISSING, k.n - k.done_count - k.evicted)
    hwm = p.next_seq - 1
    seen: set[int] = set()
    found: list[Found] = []
    for cls, num, name in files:
        path = os.path.join(directory, name)
        known = p.segs.get(num) if ours(cls, num) else None
        if num in seen or (known is not None and known.doomed):
            if known is not None:  # evicted; the unlink did not happen before the crash
                count(EVICTED, known.n - known.done_count - known.evicted)
            else:  # a second file with the same number: not one of ours
                count(CORRUPT, 1)
                quarantine.move(path, name)
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        seen.add(num)
        hwm = max(hwm, num)
        seg, lost, last_seq = recover_segment(directory, cls, num, known, quarantine)
        count(CORRUPT, lost)
        hwm = max(hwm, last_seq)
        if seg is not None:
            found.append(seg)
    if counts:
        log.warning("spool: recovery dropped %s", counts)
    for reason, n in counts.items():
        dropped[reason] = dropped.get(reason, 0) + n
    return Recovered(found, p.delivered, dropped, hwm + 1, max(p.gen, p.journal_gen))
