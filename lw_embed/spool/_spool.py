"""The :class:`Spool` itself (see the package docstring for the design)."""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cbor2

from lw_embed.spool._api import (
    CORRUPT,
    EVICTED,
    FULL,
    IO_ERROR,
    TOO_LARGE,
    UNENCODABLE,
    SpoolError,
    SpoolItem,
    SpoolLocked,
    SpoolStats,
    priority_of,
)
from lw_embed.spool._frames import HEADER_SIZE, MAX_PAYLOAD, frame_record
from lw_embed.spool._journal import COMPACT_BYTES, Known, Persisted, Store, snapshot_payload
from lw_embed.spool._recover import Quarantine, recover, segment_name
from lw_embed.spool._segment import Out, Segment, Unreadable

log = logging.getLogger("lw_embed.spool")

_CLASSES = (2, 1, 0)
_dumps = cbor2.dumps


class Spool:
    """Durable, bounded, prioritised event spool. Thread-safe (one lock)."""

    def __init__(
        self,
        directory: str,
        *,
        max_bytes: int,
        segment_bytes: int,
        sync_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0 or not sync_interval > 0:
            raise ValueError("max_bytes, segment_bytes and sync_interval must be positive")
        self._dir = directory
        self._qdir = os.path.join(directory, "quarantine")
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._sync_interval = sync_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._open = False
        self._lock_fd = -1
        self._store = Store(self._dir)
        self._quarantine = Quarantine(self._qdir)
        self._segs: list[list[Segment]] = [[], [], []]
        self._active: list[Segment | None] = [None, None, None]
        self._doomed: set[Segment] = set()
        self._graveyard: list[Segment] = []
        self._dirty: set[Segment] = set()
        self._dir_dirty = False
        self._bytes = self._dead_bytes = 0
        self._leased: dict[int, Out] = {}
        self._rel: list[dict[int, Out]] = [{}, {}, {}]
        self._rel_heap: list[list[int]] = [[], [], []]
        self._accepted = self._delivered = self._pending = 0
        self._dropped: dict[str, int] = {}
        self._next_seq = self._logged_next_seq = 1
        self._gen = 0
        self._logbuf: list[list[Any]] = []
        self._open_d: dict[tuple[int, str | None], list[Any]] = {}
        self._counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self._need_compact = False
        self._last_sync = 0.0

    # --- open / close -------------------------------------------------------------------

    def open(self) -> None:
        with self._sync_lock, self._lock:
            if self._open:
                raise SpoolError("spool is already open")
            self._reset()
            try:
                os.makedirs(self._dir, mode=0o750, exist_ok=True)
                os.makedirs(self._qdir, mode=0o750, exist_ok=True)
                lock_fd = os.open(
                    os.path.join(self._dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            except OSError as exc:
                raise SpoolError(f"cannot use spool directory {self._dir}: {exc}") from exc
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(lock_fd)
                if isinstance(exc, BlockingIOError):
                    raise SpoolLocked(f"spool {self._dir} is held by another process") from exc
                raise SpoolError(f"cannot lock spool {self._dir}: {exc}") from exc
            try:
                os.ftruncate(lock_fd, 0)
                os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
                self._recover()
            except BaseException as exc:
                self._close_fds()
                os.close(lock_fd)
                self._reset()
                if isinstance(exc, OSError):
                    raise SpoolError(f"cannot open spool {self._dir}: {exc}") from exc
                raise
            self._lock_fd = lock_fd
            self._open = True

    def _recover(self) -> None:
        self._store.open()
        r = recover(self._dir, self._store, self._quarantine)
        for found in r.found:
            seg = Segment(found.cls, found.num, os.path.join(self._dir, found.name))
            seg.n = seg.durable_n = found.n
            seg.size = seg.durable_size = found.size
            seg.done, seg.done_count = found.done, found.done_count
            seg.sealed = True
            self._segs[found.cls].append(seg)
            self._bytes += seg.size
        self._delivered = r.delivered
        self._dropped = r.dropped
        self._pending = sum(s.n - s.done_count for segs in self._segs for s in segs)
        self._accepted = self._delivered + sum(self._dropped.values()) + self._pending
        self._next_seq = self._logged_next_seq = r.next_seq
        self._gen = r.gen + 1
        self._store.write_snapshot(self._snapshot(), self._gen, self._next_seq)
        self._last_sync = self._clock()

    def close(self) -> None:
        """Sync, write a fresh snapshot, release the lock. Leased items stay pending."""
        with self._sync_lock:
            if not self._open:
                return
            with self._lock:  # the next open starts new segments anyway
                for seg in self._active:
                    if seg is not None:
                        self._seal(seg)
            self._sync_locked(compact=True)
            if self._logbuf:
                self._sync_locked(compact=False)
            with self._lock:
                self._close_fds()
                os.close(self._lock_fd)
                self._reset()

    def _simulate_crash(self) -> None:
        """Tests only: drop every fd (and the lock) without syncing or persisting anything."""
        with self._sync_lock, self._lock:
            if self._open:
                self._close_fds()
                os.close(self._lock_fd)
            self._reset()

    def _close_fds(self) -> None:
        for seg in self._all_segments():
            seg.close_fd()
        self._store.close()

    def _all_segments(self) -> list[Segment]:
        return [*self._segs[0], *self._segs[1], *self._segs[2], *self._doomed, *self._graveyard]

    def _check_open(self) -> None:
        if not self._open:
            raise SpoolError("spool is not open")

    # --- append -------------------------------------------------------------------------

    def append(self, event: Mapping[str, Any]) -> int | None:
        cls = priority_of(event)
        with self._lock:
            if not self._open:
                raise SpoolError("spool is not open")
            seq = self._next_seq
            try:
                frame = frame_record(seq, _dumps(dict(sorted({**event, "seq": seq}.items()))))
            except Exception:  # a caller bug; counted, never a crash of the worker
                self._refuse(UNENCODABLE)
                return None
            flen = len(frame)
            if flen > self._max_bytes or flen - HEADER_SIZE > MAX_PAYLOAD:
                self._refuse(TOO_LARGE)
                return None
            if self._bytes - self._dead_bytes + flen > self._max_bytes and not self._make_room(
                cls, flen
            ):
                self._refuse(FULL)
                return None
            seg = self._active[cls]
            if seg is None or (seg.size + flen > self._segment_bytes and seg.n > 0):
                seg = self._rotate(cls, seq)
                if seg is None:
                    self._refuse(IO_ERROR)
                    return None
            try:
                written = os.write(seg.fd, frame)
            except OSError as exc:
                self._warn(IO_ERROR, exc)
                written = -1
            if written != flen:
                self._write_failed(seg, written)
                self._refuse(IO_ERROR)
                return None
            seg.size += flen
            seg.n += 1
            self._dirty.add(seg)
            self._bytes += flen
            self._accepted += 1
            self._pending += 1
            self._next_seq = seq + 1
        if self._clock() - self._last_sync >= self._sync_interval:
            self.maybe_sync()
        return seq

    def _refuse(self, reason: str) -> None:
        self._accepted += 1
        self._dropped[reason] = self._dropped.get(reason, 0) + 1
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self._warn(reason, None)

    def _warn(self, reason: str, exc: BaseException | None) -> None:
        if reason not in self._warned:  # once per reason and open: no per-event logging
            self._warned.add(reason)
            log.warning("spool: dropping events (%s)%s", reason, f": {exc}" if exc else "")

    def _rotate(self, cls: int, seq: int) -> Segment | None:
        old = self._active[cls]
        if old is not None:
            self._seal(old)
        seg = Segment(cls, seq, os.path.join(self._dir, segment_name(cls, seq)))
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            seg.fd = os.open(seg.path, flags, 0o640)
        except OSError as exc:
            self._warn(IO_ERROR, exc)
            return None
        seg.sealed = False
        self._active[cls] = seg
        self._segs[cls].append(seg)
        self._dir_dirty = True
        return seg

    def _seal(self, seg: Segment) -> None:
        if self._active[seg.cls] is seg:
            self._active[seg.cls] = None
        seg.sealed = True
        if not seg.doomed and seg.done_count >= seg.n:
            self._retire(seg)

    def _write_failed(self, seg: Segment, written: int) -> None:
        if written > 0:
            # if this fails, the torn tail is beyond seg.size: never read, quarantined at open
            with contextlib.suppress(OSError):
                os.ftruncate(seg.fd, seg.size)
        if seg.n:
            self._seal(seg)
            return
        # created for this record: remove it now, so the retry can create the same name
        self._active[seg.cls] = None
        self._segs[seg.cls].remove(seg)
        seg.close_fd()
        with contextlib.suppress(OSError):
            os.unlink(seg.path)

    def _make_room(self, cls: int, flen: int) -> bool:
        """Evict the oldest segments of the lowest classes <= cls until flen fits."""
        excess = self._bytes - self._dead_bytes + flen - self._max_bytes
        if sum(s.size for k in range(cls + 1) for s in self._segs[k]) < excess:
            return False  # evicting everything allowed would not make room: evict nothing
        while self._bytes - self._dead_bytes + flen > self._max_bytes:
            for k in range(cls + 1):
                if self._segs[k]:
                    self._doom(self._segs[k][0])
                    break
            else:
                return False
        return True

    def _doom(self, seg: Segment) -> None:
        """Evict a segment: its unleased pending records are dropped now; leased ones are
        resolved by ack/drop/release; the file goes when the last one is."""
        cls = seg.cls
        if seg.released:
            pool = self._rel[cls]
            for seq in [q for q, o in pool.items() if o.seg is seg]:
                del pool[seq]
            seg.released = 0
        evicted = seg.n - seg.done_count - seg.leased
        seg.evicted = evicted
        if evicted:
            self._dropped[EVICTED] = self._dropped.get(EVICTED, 0) + evicted
            self._pending -= evicted
        if self._active[cls] is seg:
            self._active[cls] = None
        seg.sealed = seg.doomed = True
        self._segs[cls].remove(seg)
        self._dead_bytes += seg.size
        seg.reader = None
        self._logbuf.append(["x", seg.num, cls, seg.n, seg.size, evicted])
        if seg.leased == 0:
            self._retire(seg)
        else:
            self._doomed.add(seg)

    def _retire(self, seg: Segment) -> None:
        """No pending record left: the file is deleted at the next sync, after the journal
        says so."""
        if seg.dead:
            return
        seg.dead = True
        if seg.doomed:
            self._doomed.discard(seg)
        else:
            self._segs[seg.cls].remove(seg)
            self._dead_bytes += seg.size
        if self._active[seg.cls] is seg:
            self._active[seg.cls] = None
        self._dirty.discard(seg)
        seg.close_fd()
        self._graveyard.append(seg)

    # --- lease / ack / drop / release --------------------------------------------------

    def lease(self, max_events: int, max_bytes: int) -> list[SpoolItem]:
        """Highest class first, oldest first within a class; stops at the first item that
        does not fit ``max_bytes`` (the first item is always returned)."""
        out: list[SpoolItem] = []
        if max_events <= 0:
            return out
        with self._lock:
            self._check_open()
            budget = max_bytes
            for cls in _CLASSES:
                budget = self._lease_released(cls, out, max_events, budget)
                for seg in list(self._segs[cls]):
                    if budget < 0 or len(out) >= max_events:
                        break
                    budget = self._lease_segment(seg, out, max_events, budget)
                if budget < 0 or len(out) >= max_events:
                    break
        return out

    def _lease_released(self, cls: int, out: list[SpoolItem], limit: int, budget: int) -> int:
        heap, pool = self._rel_heap[cls], self._rel[cls]
        if not pool:
            heap.clear()
            return budget
        while heap and len(out) < limit:
            o = pool.get(heap[0])
            if o is None:
                heapq.heappop(heap)
                continue
            size = len(o.item.data)
            if out and size > budget:
                return -1
            heapq.heappop(heap)
            del pool[o.item.seq]
            o.seg.released -= 1
            o.seg.leased += 1
            self._leased[o.item.seq] = o
            out.append(o.item)
            budget -= size
        return budget

    def _lease_segment(self, seg: Segment, out: list[SpoolItem], limit: int, budget: int) -> int:
        try:
            budget = seg.take(out, limit, budget, self._leased)
        except Unreadable as exc:
            self._damaged(seg, exc.off, exc.reason)
            return budget
        if seg.cursor >= seg.size and seg.sealed and seg not in self._dirty:
            seg.close_fd()
        return budget

    def _damaged(self, seg: Segment, off: int, reason: str) -> None:
        """A record at ``off`` cannot be read at run time: drop it and everything after it
        (quarantined), keep what was before."""
        if self._active[seg.cls] is seg:
            self._active[seg.cls] = None
        seg.sealed = True
        lost = seg.n - seg.done_count - seg.leased - seg.released
        done_after = seg.done.cut(off)
        seg.done_count -= done_after
        if reason == CORRUPT and seg.fd >= 0:
            self._quarantine.copy(seg.fd, off, seg.size, f"{os.path.basename(seg.path)}@{off}")
        with contextlib.suppress(OSError):
            os.truncate(seg.path, off)
        log.warning("spool: %s at offset %d of %s: %d records lost", reason, off, seg.path, lost)
        self._bytes -= seg.size - off
        seg.size = off
        seg.n -= lost + done_after
        seg.durable_n = min(seg.durable_n, seg.n)
        seg.durable_size = min(seg.durable_size, off)
        self._dirty.discard(seg)
        seg.close_fd()
        if lost:
            self._dropped[reason] = self._dropped.get(reason, 0) + lost
            self._pending -= lost
        self._logbuf.append(["t", seg.num, seg.n, seg.size, lost, reason])
        if seg.done_count >= seg.n:
            self._retire(seg)

    def ack(self, seqs: Iterable[int]) -> None:
        """Delivered. Seqs that are not leased or released (unknown, done) are ignored."""
        self._finish(seqs, None)

    def drop(self, seqs: Iterable[int], reason: str) -> None:
        """Dead-letter under ``reason``. Same seqs as ack."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("drop reason must be a non-empty str")
        self._finish(seqs, reason)

    def _finish(self, seqs: Iterable[int], reason: str | None) -> None:
        with self._lock:
            self._check_open()
            leased, rel = self._leased, self._rel
            for seq in seqs:
                o = leased.pop(seq, None)
                if o is not None:
                    o.seg.leased -= 1
                else:
                    for pool in rel:
                        o = pool.pop(seq, None)
                        if o is not None:
                            o.seg.released -= 1
                            break
                    else:
                        continue
                self._done(o, reason)

    def _done(self, o: Out, reason: str | None) -> None:
        seg = o.seg
        seg.done.add(o.off, o.end, 1)
        seg.done_count += 1
        self._pending -= 1
        if reason is None:
            self._delivered += 1
        else:
            self._dropped[reason] = self._dropped.get(reason, 0) + 1
        key = (seg.num, reason)
        entry = self._open_d.get(key)
        if entry is not None and entry[3] == o.off:
            entry[3] = o.end
            entry[4] += 1
        else:
            entry = ["d", seg.num, o.off, o.end, 1, reason]
            self._logbuf.append(entry)
            self._open_d[key] = entry
        if seg.doomed:
            if seg.leased == 0:
                self._retire(seg)
        elif seg.sealed and seg.done_count >= seg.n:
            self._retire(seg)

    def release(self, seqs: Iterable[int]) -> None:
        """Back to pending (returned again by lease, before newer items of its class).
        Releasing an item of an evicted segment drops it as spool.evicted."""
        with self._lock:
            self._check_open()
            for seq in seqs:
                o = self._leased.pop(seq, None)
                if o is None:
                    continue
                seg = o.seg
                seg.leased -= 1
                if seg.doomed:
                    self._done(o, EVICTED)
                    continue
                seg.released += 1
                self._rel[seg.cls][seq] = o
                heapq.heappush(self._rel_heap[seg.cls], seq)

    # --- sync ---------------------------------------------------------------------------

    def maybe_sync(self) -> None:
        """Sync if sync_interval has elapsed since the last one (and no sync is running)."""
        if self._clock() - self._last_sync < self._sync_interval:
            return
        if not self._sync_lock.acquire(blocking=False):
            return
        try:
            self._sync_locked(compact=False)
        finally:
            self._sync_lock.release()

    def sync(self) -> None:
        """fdatasync the written segments, then journal the acks, drops and evictions;
        delete the segments that are no longer needed. fsyncs run outside the main lock."""
        with self._sync_lock:
            self._sync_locked(compact=False)

    def _sync_locked(self, compact: bool) -> None:
        with self._lock:
            if not self._open:
                return
            self._last_sync = self._clock()
            caps: list[tuple[Segment, int, int, int]] = []
            for seg in self._dirty:
                with contextlib.suppress(OSError):
                    caps.append((seg, os.dup(seg.fd), seg.n, seg.size))
            self._dirty.clear()
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            compact = compact or self._need_compact or self._store.jbytes >= COMPACT_BYTES
            if (
                not (
                    caps or dir_dirty or compact or self._logbuf or self._counts or self._graveyard
                )
                and self._next_seq == self._logged_next_seq
            ):
                return
        for seg, fd, _, _ in caps:
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.warning("spool: fdatasync of %s failed: %s", seg.path, exc)
            finally:
                os.close(fd)
        if dir_dirty:
            with contextlib.suppress(OSError):
                self._store.fsync_dir()
        with self._lock:
            sizes = []
            for seg, _, n, size in caps:
                if not seg.dead and seg.size >= size:
                    seg.durable_n, seg.durable_size = n, size
                    sizes.append([seg.num, seg.cls, n, size])
                    if seg.sealed and seg not in self._dirty and seg.reader is None:
                        seg.close_fd()  # reopened when a lease gets to it
            graves = list(self._graveyard)
            next_seq = self._next_seq
            entries: list[list[Any]] = []
            payload = b""
            if compact:
                self._gen += 1
                payload = self._snapshot()
            else:
                entries = [["s", next_seq, sizes], *self._logbuf]
                if self._counts:
                    entries.append(["c", dict(self._counts)])
            self._logbuf = []
            self._open_d.clear()
            self._counts = {}
            self._logged_next_seq = next_seq
            gen = self._gen
        try:
            if compact:
                self._store.write_snapshot(payload, gen, next_seq)
            else:
                self._store.append(entries)
        except OSError as exc:
            # what was not written is in memory: the next sync writes a whole snapshot
            log.warning("spool: cannot write spool metadata: %s", exc)
            self._need_compact = True
            return
        self._need_compact = False
        gone = []
        for seg in graves:
            try:
                os.unlink(seg.path)
            except FileNotFoundError:
                pass
            except OSError:
                continue
            gone.append(seg)
        if gone:
            with self._lock:
                for seg in gone:
                    self._graveyard.remove(seg)
                    self._bytes -= seg.size
                    self._dead_bytes -= seg.size
                    self._logbuf.append(["r", seg.num])
                self._dir_dirty = True

    def _snapshot(self) -> bytes:
        """The state payload of the current generation (under the lock)."""
        p = Persisted(
            gen=self._gen,
            next_seq=self._next_seq,
            delivered=self._delivered,
            dropped=dict(self._dropped),
        )
        for seg in self._all_segments():
            n, size = (seg.n, seg.size) if seg.doomed else (seg.durable_n, seg.durable_size)
            p.segs[seg.num] = Known(
                seg.cls, n, size, seg.done_count, seg.evicted, seg.doomed, seg.done
            )
        return snapshot_payload(p)

    # --- introspection ------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(
                accepted=self._accepted,
                delivered=self._delivered,
                pending=self._pending,
                dropped=dict(self._dropped),
                bytes=self._bytes,
                segments=len(self._all_segments()),
                quarantined_bytes=self._quarantine.bytes,
            )

    @property
    def next_seq(self) -> int:
        return self._next_seq
