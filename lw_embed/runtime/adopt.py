"""Adoption of orphan spools: ``<spool>.<pid>`` left by an agent that died unshipped.

A forked in-app child (a multiprocessing or pre-fork worker) runs its agent on a private
spool ``<spool>.<pid>``; one that ends with ``os._exit`` (no atexit, no drain) leaves
its pending events there. So does a worker that found the spool locked and used the
private fallback. :class:`Adopter` moves such events into the live spool, which ships
them, and deletes the directory: once at start for every sibling (:meth:`adopt_all`),
and whenever the /proc reconciler sees a child go whose pid names one
(:meth:`adopt_pid`).

Interface: ``/proc/<pid>/stat`` (the owner must be gone: no such pid, or a zombie), the
spool's own ``flock`` (:meth:`lw_embed.spool.Spool.open` raises ``SpoolLocked`` while
any process holds it), lease/ack of the orphan and ``append`` to ours.

Capability: write access to the data dir (ours already).

Cost: nothing while there are no orphans (one ``listdir`` at start, one ``stat`` per
child that ends). Per adopted event a CBOR decode and a spool append; bounded by
:data:`ADOPT_MAX_EVENTS` per directory and :data:`ADOPT_MAX_DIRS` per pass (what is left
stays for the next pass or start).

Failure modes: a directory still locked, or whose pid lives (also a reused pid), is left
alone; one that cannot be opened is left with a warning; an event that does not decode
is dropped and counted (``worker.adopt_undecodable``). Events keep their content but get
the adopting spool's seq and instance id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable

import cbor2

from lw_embed.config import SpoolConfig
from lw_embed.kernel import procfs
from lw_embed.spool import Spool, SpoolError

log = logging.getLogger("lw_embed.worker")

#: at most this many events are moved out of one orphan spool per pass
ADOPT_MAX_EVENTS = 100_000
#: at most this many orphan directories per pass
ADOPT_MAX_DIRS = 32
LEASE_EVENTS = 1000
LEASE_BYTES = 1 << 20


def owner_gone(pid: int, proc: str = procfs.PROC) -> bool:
    """True if no live process has ``pid`` (none, or a zombie)."""
    if pid == os.getpid():
        return False
    try:
        return procfs.read_stat(pid, proc).state in ("Z", "X", "x")
    except (OSError, ValueError, IndexError):
        return True


class Adopter:
    """Moves orphan ``<spool_dir>.<pid>`` spools into ``spool``."""

    def __init__(self, spool: Spool, spool_dir: str, sc: SpoolConfig,
                 count: Callable[[str, int], None], proc: str = procfs.PROC) -> None:  # fmt: skip
        self.spool, self.dir, self.sc, self._count, self.proc = spool, spool_dir, sc, count, proc
        self.adopted_dirs = 0
        self.adopted_events = 0

    def candidates(self) -> list[tuple[int, str]]:
        parent, base = os.path.split(self.dir)
        try:
            names = os.listdir(parent or ".")
        except OSError:
            return []
        out = []
        for name in names:
            head, dot, tail = name.rpartition(".")
            if dot and head == base and tail.isdigit():
                out.append((int(tail), os.path.join(parent, name)))
        return sorted(out)[:ADOPT_MAX_DIRS]

    def adopt_all(self) -> int:
        """Every orphan sibling (bounded); the number of events moved."""
        return sum(self._adopt(pid, path) for pid, path in self.candidates())

    def adopt_pid(self, pid: int) -> int:
        path = f"{self.dir}.{pid}"
        return self._adopt(pid, path) if os.path.isdir(path) else 0

    def _adopt(self, pid: int, path: str) -> int:
        if not owner_gone(pid, self.proc):
            return 0
        s, sc = self.spool, self.sc
        orphan = Spool(path, max_bytes=sc.max_bytes, segment_bytes=sc.segment_bytes,
                       sync_interval=sc.sync_interval)  # fmt: skip
        try:
            orphan.open()
        except SpoolError as exc:  # locked by a live agent, or unusable
            log.debug("not adopting %s: %s", path, exc)
            return 0
        moved = 0
        empty = False
        try:
            while moved < ADOPT_MAX_EVENTS:
                items = orphan.lease(LEASE_EVENTS, LEASE_BYTES)
                if not items:
                    break
                for item in items:
                    try:
                        ev = cbor2.loads(item.data)
                        ev.pop("seq")
                    except Exception:
                        self._count("worker.adopt_undecodable", 1)
                        continue
                    s.append(ev)
                orphan.ack([i.seq for i in items])
                moved += len(items)
            empty = orphan.stats().pending == 0
        except Exception as exc:  # a damaged orphan must not stop the agent
            log.warning("adopting spool %s failed: %s", path, exc)
        finally:
            with contextlib.suppress(Exception):
                orphan.close()
        if empty:
            shutil.rmtree(path, ignore_errors=True)
        self.adopted_dirs += 1
        self.adopted_events += moved
        log.info("adopted %d events from %s (pid %d gone)%s", moved, path, pid,
                 "" if empty else "; the rest at the next pass")  # fmt: skip
        return moved
