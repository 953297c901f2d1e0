"""The worker's pipeline loop, usable in the worker process and in a thread of a host.

Interface: ``poll(2)`` (no fd limit: an in-app host may hold fds >= 1024) on the record
pipe (when there is one, ``O_NONBLOCK``), a wake pipe (the worker process points
``signal.set_wakeup_fd`` at it; :meth:`Pipeline.request_stop` and
:meth:`Pipeline.request_flush` write to it from any thread) and every source's fd, with
the timeout set by the next reconcile pass, aggregation window, spool sync or loss report;
:class:`~lw_embed.records.FrameReader` -> :func:`~lw_embed.records.decode_payload` ->
:class:`~lw_embed.pipeline.enrich.ProcessTable` -> filter -> aggregate ->
:class:`~lw_embed.spool.Spool` (accepted) -> :class:`~lw_embed.runtime.shipper.Shipper`
(its own thread) -> HTTP backend or batch files; and the /proc reconciler of
:mod:`lw_embed.sources.procfs`. The process concerns of the worker (fd 3, signals, nice,
the launch JSON) are in :mod:`lw_embed.runtime.worker`; the in-app runner is
:mod:`lw_embed.runtime.embedded`.

Capability: none beyond those of the /proc source; a writable data dir.

Cost: idle, it sleeps in poll; per record a decode, a dict update, a ``to_wire``, the
filter and aggregate steps and one spool append (one ``write(2)``); one group fdatasync
per ``spool.sync_interval``.

Failure modes: nothing in the input stops it. Every drop has a reason and a counter:
``worker.bad_frame``, ``worker.bad_record``, ``worker.exit_unknown_process``,
``worker.process_table_full``, the sources' own and the spool's (``spool.evicted``,
``spool.full``, ``spool.corrupt``, ``http_<code>``, ...). Those and the core's cumulative
totals go out in an ``agent.loss`` event whenever they change (at most once a second) and
at the end. Events the filter excludes are not losses (``worker.filtered``). The loop
ends at EOF of the record pipe or at :meth:`Pipeline.request_stop`; it then drains the
spool by priority within the budget (the SHUTDOWN record's, the stop request's, else
``shutdown.flush``), fsyncs what is left and returns 0.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lw_embed import records
from lw_embed.codec import AgentIdentity
from lw_embed.config import (
    resolved_data_dir,
    resolved_output_dir,
    resolved_spool_dir,
)
from lw_embed.errors import RecordError
from lw_embed.events import AgentCapabilities, AgentConfigRejected, AgentLoss, AgentStatus, Event
from lw_embed.kernel import procfs
from lw_embed.pipeline.aggregate import Aggregator
from lw_embed.pipeline.enrich import PROCESS_RECORDS, ProcessTable
from lw_embed.pipeline.filter import FilterProgram, process_context
from lw_embed.pipeline.reload import RulesWatcher
from lw_embed.platform import identity as platform_identity
from lw_embed.records import R
from lw_embed.runtime import adopt
from lw_embed.runtime.outputs import instance_id_of, make_sink, open_spool
from lw_embed.runtime.shipper import (
    Shipper,
    ShipperLimits,
)
from lw_embed.sources import base as sources_base
from lw_embed.sources.base import SourceContext, WorkerSource
from lw_embed.sources.procfs import Reconciler

if TYPE_CHECKING:
    from lw_embed.runtime.worker import Spec

log = logging.getLogger("lw_embed.worker")

READ_CHUNK = 1 << 16
#: bytes read before the loop looks at its deadlines again
READ_BUDGET = 1 << 20
#: at most one agent.loss event per this many seconds (and one at the end)
LOSS_EVERY = 1.0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _map(v: Any) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise RecordError(f"expected a map, got {type(v).__name__}")
    return v


class _Poller:
    """``poll(2)`` over a set of fds that changes rarely (registrations kept between
    calls); fds the kernel calls invalid are left out until they change."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._fds: set[int] = set()
        self._bad: set[int] = set()

    def wait(self, fds: Sequence[int], timeout: float) -> set[int]:
        want = set(fds) - self._bad
        for f in self._fds - want:
            self._poll.unregister(f)
        for f in want - self._fds:
            self._poll.register(f, select.POLLIN)
        self._fds = want
        ready: set[int] = set()
        for f, ev in self._poll.poll(math.ceil(timeout * 1000)):
            if ev & select.POLLNVAL:
                log.error("fd %d is not open; no longer waited on", f)
                self._bad.add(f)
            else:
                ready.add(f)
        return ready


class Pipeline:
    """The pipeline's state and loop: records from ``fd`` (None: no record pipe, the loop
    runs until :meth:`request_stop`) and events from the sources, into the spool.

    ``worker_pid``: the process whose subtree the /proc reconciler leaves out as the
    agent's own (default: this process; the in-app runner passes -1, as the host's
    children are what it watches). ``on_thread``: called first in every thread the
    pipeline starts (shipper, identity, executor): the in-app runner marks them its own."""

    def __init__(
        self,
        spec: Spec,
        fd: int | None,
        *,
        env: Mapping[str, str] = os.environ,
        proc: str = procfs.PROC,
        wall: Callable[[], int] = time.time_ns,
        mono: Callable[[], float] = time.monotonic,
        sources: Sequence[WorkerSource] | None = None,
        worker_pid: int | None = None,
        on_thread: Callable[[], None] | None = None,
    ) -> None:
        cfg = spec.config
        self.spec, self.cfg, self.fd, self.wall, self.mono = spec, cfg, fd, wall, mono
        boot = procfs.boot_id(proc)
        pidns = procfs.pidns_inode("self", proc)
        try:
            boot_ns = procfs.boot_time_ns(proc)
        except OSError:
            boot_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        sidecar = spec.mode == "sidecar"  # its processes are in other containers
        self.table = ProcessTable(
            boot, pidns, boot_ns, cfg.processes.ancestors_max,
            container=platform_identity.ContainerOfPid(proc) if sidecar else None,
        )  # fmt: skip
        self.reconciler = Reconciler(
            self.table, spec.scope, spec.core_pid,
            os.getpid() if worker_pid is None else worker_pid, proc,
            cfg.tracer.argv_max_bytes, cfg.tracer.argv_max_args, spec.roots, spec.exclude,
        )  # fmt: skip
        uid = os.getuid()
        self.spool, spool_dir = open_spool(cfg, resolved_spool_dir(cfg, uid, env), mono)
        self.spool_dir = spool_dir
        self._finished = False
        self.adopter = adopt.Adopter(self.spool, spool_dir, cfg.spool, self._count)
        instance = spec.instance_id or instance_id_of(spool_dir)
        self.agent = AgentIdentity(instance, spec.version, spec.mode)
        # platform, container and cloud identity; the metadata endpoint (ECS, Cloud Run)
        # is asked in the background, so it never delays the first read
        self.identity = platform_identity.start(
            env, root=os.path.dirname(os.path.abspath(proc)) or "/",
            extra={"boot_id": boot, "pid_namespace": pidns, **({"observer": True} if sidecar
                                                                else {})},
            on_thread=on_thread,
        )  # fmt: skip
        self.program = FilterProgram(cfg.filter)
        a = cfg.aggregate
        self.aggregator = Aggregator(a.window, a.max_groups, a.keys, mono)
        self.watcher = RulesWatcher(spec.config_path, mono, env)
        self._start_error: str | None = None
        if spec.config_path:
            # the file may have been edited since the core read it (a hot reload before
            # this worker replaced a dead one): run the rules it holds now
            res = self.watcher.try_reload(cfg)
            if res.ok and res.config is not None and res.program is not None:
                self.cfg, self.program = res.config, res.program
                ra = res.config.aggregate
                self.aggregator.reconfigure(ra.window, ra.max_groups, ra.keys)
            else:
                self._start_error = res.error
        o = cfg.output
        self.limits = ShipperLimits(o.batch_max_events, o.batch_max_bytes, o.batch_max_age)
        self.shipper = Shipper(
            self.spool,
            make_sink(cfg, resolved_output_dir(cfg, uid, env), instance, spec.version),
            self.agent, self.limits,
            resource=self.identity.resource,
            processes=self._process_records,
            loss=self.totals,
            deadletter_dir=os.path.join(resolved_data_dir(cfg, uid, env), "deadletter"),
            on_thread=on_thread,
        )  # fmt: skip
        self.reader = records.FrameReader()
        self.counts: dict[str, int] = {}
        self.core_totals: dict[str, int] = {}
        self._reported: dict[str, int] | None = None  # totals of the last agent.loss
        self._next_loss = 0.0
        self._eof = False
        self._stop = False
        self._flushes: collections.deque[threading.Event] = collections.deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._torn_tail = 0
        self._warned_bad_record = False
        self._since_notify = 0
        self._budget = cfg.shutdown.flush
        self.filtered = self.bytes_read = 0
        self._reconcile_every = cfg.processes.reconcile_interval
        self._reconcile_at: float | None = None
        self.source_failures: list[sources_base.Failed] = []
        if sources is None:
            ctx = SourceContext(cfg, spec.mode, spec.scope, self.table, proc,
                                resolved_data_dir(cfg, uid, env), spec.core_pid, wall, mono)
            built, self.source_failures = sources_base.build(ctx)
            sources = built
        self.sources: list[WorkerSource] = list(sources)
        self._source_errors: dict[str, int] = {}

    # -- the loop -------------------------------------------------------------------------
    def request_stop(self, budget: float | None = None) -> None:
        """End the loop (from any thread): then drain within ``budget`` seconds (default:
        what the config or a SHUTDOWN record said)."""
        if budget is not None:
            self._budget = max(0.0, budget)
        self._stop = True
        self._wake()

    def request_flush(self) -> threading.Event:
        """Ask the loop (from any thread) to poll every source, fold what aggregation
        holds, sync the spool and wake the shipper; the event is set once done."""
        done = threading.Event()
        self._flushes.append(done)
        self._wake()
        return done

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake is pending anyway) or closed
            os.write(self.wake_w, b"\0")

    def _start_shipper(self) -> None:
        self.shipper.start()

    def run(self) -> int:
        fd, wake_r = self.fd, self.wake_r
        if fd is not None:
            os.set_blocking(fd, False)
        self._start_shipper()
        if self._start_error is not None:
            self._accept(AgentConfigRejected(time=self.wall(), path=self.watcher.path or "",
                                             error=self._start_error).to_wire())  # fmt: skip
        log.info("started: scope %s, instance %s, seq %d", self.spec.scope,
                 self.agent.instance_id, self.spool.next_seq)  # fmt: skip
        while fd is not None and self._read() >= READ_BUDGET:  # what the core buffered
            pass
        if self.spec.scope != "none":
            # the first pass only notes what runs; what is still unknown to the tracer at
            # the next pass is reported (from /proc) then
            self.reconciler.reconcile(self.mono())
            self._reconcile_at = self.mono() + min(self._reconcile_every, 1.0)
        self.adopter.adopt_all()  # spools of earlier forked children that died
        pipe = [] if fd is None else [fd]
        waiter = _Poller()
        while not self._eof and not self._stop:
            by_fd = {sfd: src for src in self.sources if (sfd := src.fileno()) is not None}
            try:
                ready = waiter.wait([*pipe, wake_r, *by_fd], self._timeout())
            except OSError as exc:
                log.error("poll on the record pipe failed: %s", exc)
                break
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            if fd is not None and fd in ready:
                self._read()
            self._poll_sources({by_fd[f] for f in ready if f in by_fd})
            self._tick()
            if self._flushes:
                self._flush()
        if self._stop:  # what the sources still hold goes out too
            self._poll_sources(set(self.sources))
        if self._reconcile_at is not None:
            self._reconcile(self.mono(), final=True)  # nothing is in flight any more
        self._finish()
        for done in self._flushes:
            done.set()
        return 0

    def close_wake(self) -> None:
        """Close the wake pipe (after :meth:`run`; the worker process leaves it to exit,
        as a signal's wakeup write may still come)."""
        for w in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(w)

    def _flush(self) -> None:
        waiting = []
        with contextlib.suppress(IndexError):  # appended meanwhile: the next pass (woken)
            while True:
                waiting.append(self._flushes.popleft())
        self._poll_sources(set(self.sources))
        for ev in self.aggregator.flush(force=True):
            self._accept(ev)
        self._report_loss()
        self.spool.sync()
        self.shipper.notify()
        for done in waiting:
            done.set()

    def _timeout(self) -> float:
        now = self.mono()
        ts = [now + self.spool_sync_interval, self._next_loss, now + 1.0]
        deadline = self.aggregator.next_deadline()
        if deadline is not None:
            ts.append(deadline)
        if self._reconcile_at is not None:
            ts.append(self._reconcile_at)
        for src in self.sources:
            due = src.next_due()
            if due is not None:
                ts.append(due)
        return max(0.0, min(ts) - now)

    @property
    def spool_sync_interval(self) -> float:
        return self.cfg.spool.sync_interval

    def _tick(self) -> None:
        now = self.mono()
        if self._reconcile_at is not None and now >= self._reconcile_at:
            self._reconcile(now)
            self._reconcile_at = self.mono() + self._reconcile_every
        for ev in self.aggregator.flush(now):
            self._accept(ev)
        if self.watcher.changed():
            self._reload()
        if now >= self._next_loss:
            self._next_loss = now + LOSS_EVERY
            self._report_loss()
        self.spool.maybe_sync()

    def _read(self) -> int:
        """Read and handle what the pipe has, up to READ_BUDGET; return the bytes read."""
        got = 0
        assert self.fd is not None
        while got < READ_BUDGET:
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("reading the record pipe failed: %s", exc)
                data = b""
            if not data:
                self._eof = True
                if self.reader.pending:
                    self._torn_tail = 1  # a partial frame the core never finished
                break
            got += len(data)
            self.bytes_read += len(data)
            self.reader.feed(data)
            for payload in self.reader.payloads():
                self._on_payload(payload)
        return got

    # -- records --------------------------------------------------------------------------
    def _on_payload(self, payload: bytes) -> None:
        try:
            self._handle(records.decode_payload(payload))
        except Exception as exc:  # hostile input must never stop the worker
            self._count("worker.bad_record")
            if not self._warned_bad_record:
                self._warned_bad_record = True
                log.warning("skipping a bad record (counted as worker.bad_record): %s", exc)

    def _handle(self, rec: list[Any]) -> None:
        rtype, t, f = rec[0], rec[1], rec[2:]
        if rtype in PROCESS_RECORDS:
            self._emit(self.table.apply(rec))
        elif rtype == R.CAPS:
            self._emit(AgentCapabilities(time=t, report=self._with_sources(_map(f[0]))))
        elif rtype == R.LOSS:
            raw = _map(f[0])
            if not all(isinstance(k, str) and _is_int(v) for k, v in raw.items()):
                raise RecordError("LOSS totals are not a map of str -> int")
            self.core_totals = {(k if k.startswith("core.") else f"core.{k}"): v
                                for k, v in raw.items()}  # fmt: skip
        elif rtype == R.STATUS:
            metrics: dict[str, int | float] = {
                k: v
                for k, v in _map(f[0]).items()
                if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            }
            metrics.update(self.metrics())
            self._emit(AgentStatus(time=t, metrics=metrics))
        elif rtype == R.WORKLOAD:
            log.debug("workload started: pid %s, argv %r", f[0], f[1])
        elif rtype == R.SHUTDOWN:
            budget = f[1]
            if isinstance(budget, int | float) and not isinstance(budget, bool):
                self._budget = max(0.0, float(budget))
            log.info("core shutting down (%s): %.1fs to drain", f[0], self._budget)
        for missed in self.table.drain_missed():
            self._emit(missed)
        for src in self.sources:
            self._guarded(src, src.observe, rec)

    # -- sources --------------------------------------------------------------------------
    def _poll_sources(self, ready: set[WorkerSource]) -> None:
        for src in self.sources:
            due = src.next_due()
            now = self.mono()  # after next_due: a source that answers "now" is due
            if src in ready or (due is not None and due <= now):
                self._guarded(src, src.poll, now)

    def _guarded(self, src: WorkerSource, fn: Callable[[Any], Any], arg: Any) -> None:
        """Run one source call and emit what it returns; its errors are counted."""
        try:
            for ev in fn(arg):
                self._emit(ev)
        except Exception:
            key = f"{src.name}.error"
            n = self._source_errors[key] = self._source_errors.get(key, 0) + 1
            if n == 1:
                log.exception("source %s failed (counted as %s; it keeps running)", src.name, key)

    def _with_sources(self, report: dict[Any, Any]) -> dict[Any, Any]:
        """The core's capability report with the worker's own sources added."""
        if not self.sources and not self.source_failures:
            return report
        techniques = dict(_map(report.get("techniques") or {}))
        reasons = dict(_map(report.get("reasons") or {}))
        for src in self.sources:
            techniques[src.name], reasons[src.name] = src.technique()
        for failed in self.source_failures:
            techniques[failed.name], reasons[failed.name] = "none", failed.reason
        return {**report, "reasons": reasons, "techniques": techniques}

    def _reconcile(self, now: float, final: bool = False) -> None:
        result = self.reconciler.reconcile(now, final)
        t = self.wall()
        for pid, ticks in result.gone:
            self._emit(self.table.procfs_exit(pid, t, ticks))
            self.adopter.adopt_pid(pid)  # a forked agent that ended with os._exit
        for info in result.new:
            self._emit(self.table.observe_procfs(info, t))
        for missed in self.table.drain_missed():
            self._emit(missed)

    def _reload(self) -> None:
        res = self.watcher.try_reload(self.cfg)
        if not res.ok or res.config is None or res.program is None:
            log.warning("config reload rejected, old rules stay: %s", res.error)
            self._accept(AgentConfigRejected(time=self.wall(), path=self.watcher.path or "",
                                             error=res.error or "").to_wire())  # fmt: skip
            return
        self.cfg, self.program = res.config, res.program
        a = res.config.aggregate
        for ev in self.aggregator.reconfigure(a.window, a.max_groups, a.keys):
            self._accept(ev)
        if res.restart_needed:
            log.warning("config reloaded; these keys need a restart: %s",
                        ", ".join(res.restart_needed))  # fmt: skip
        else:
            log.info("config reloaded (%s)", ", ".join(res.changed) or "no change")

    def metrics(self) -> dict[str, int | float]:
        """The worker's own counters and gauges (added to each agent.status)."""
        st = self.spool.stats()
        return {
            "worker.bytes_read": self.bytes_read,
            "worker.filtered": self.filtered,
            "worker.aggregated": self.aggregator.folded,
            "worker.processes": len(self.table),
            "worker.processes_live": self.table.live_count,
            "worker.processes_evicted": self.table.evictions,
            "worker.reconcile_passes": self.reconciler.passes,
            "spool.accepted": st.accepted,
            "spool.delivered": st.delivered,
            "spool.pending": st.pending,
            "spool.bytes": st.bytes,
            "shipper.batches": self.shipper.batches,
            **{k: v for src in self.sources for k, v in src.metrics().items()},
        }

    # -- events, loss and shipping --------------------------------------------------------
    def _emit(self, event: Event | None) -> None:
        """An event from a source: filter, aggregate, accept."""
        if event is None:
            return
        wire = event.to_wire()
        ctx = process_context(wire, self.table)
        kept = self.program.apply(wire, ctx)
        if kept is None:
            self.filtered += 1
            return
        for ev in self.aggregator.add(kept, ctx):
            self._accept(ev)

    def _accept(self, wire: dict[str, Any]) -> None:
        if self.spool.append(wire) is None:
            return  # counted by the spool under its reason
        self._since_notify += 1
        if self._since_notify >= self.limits.max_events:
            self._since_notify = 0
            self.shipper.notify()

    def _process_records(self, exec_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The process records a batch refers to (called from the shipper thread: reads
        only, the table is changed by this thread alone)."""
        out = []
        for eid in exec_ids:
            rec = self.table.record(eid)
            if rec is not None:
                out.append(rec)
        return out

    def _count(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def _sync_counts(self) -> None:
        """Pull the counters kept by the reader and the table into ``counts``."""
        for reason, n in (
            ("worker.bad_frame", self.reader.bad_frames + self._torn_tail),
            ("worker.exit_unknown_process", self.table.unknown_exits),
            ("worker.process_table_full", self.table.evicted_live),
        ):
            if n:
                self.counts[reason] = n

    def totals(self) -> dict[str, int]:
        """Cumulative drops by reason: the core's, the worker's and the spool's."""
        self._sync_counts()
        out = dict(self.core_totals)
        losses = [kv for src in self.sources for kv in src.losses().items()]
        for k, v in (*self.counts.items(), *self._source_errors.items(), *losses,
                     *self.spool.stats().dropped.items()):  # fmt: skip
            if v:
                out[k] = out.get(k, 0) + v
        return out

    def _report_loss(self, final: bool = False) -> None:
        totals = self.totals()
        if final or totals != self._reported:
            self._reported = totals
            accepted = self.spool.stats().accepted
            self._accept(AgentLoss(time=self.wall(), totals=totals, accepted=accepted).to_wire())

    def _finish(self) -> None:
        """At EOF: fold what is left, report the loss, ship by priority within the budget,
        and keep the rest durable in the spool for the next start."""
        if self._finished:
            return
        self._finished = True
        end = self.mono() + self._budget  # the whole drain, sources' close included
        # what the workload did is durable first: a source's close may take a while (the
        # package index of a short job) and the core kills a worker past its budget
        for ev in self.aggregator.flush(force=True):
            self._accept(ev)
        self.spool.sync()
        for src in self.sources:
            self._guarded(src, lambda s: s.close(), src)  # their last events
        for ev in self.aggregator.flush(force=True):
            self._accept(ev)
        self._report_loss(final=True)
        self.spool.sync()
        self.shipper.drain(end)
        st = self.spool.stats()
        self.spool.close()
        log.info("worker done: %d delivered, %d pending in the spool", st.delivered, st.pending)

    def abandon(self) -> None:
        """In a child forked from the process that runs this pipeline: close its fds
        without writing anything (the parent still owns the spool and its lock) and
        without taking any lock (a thread that held one does not exist in the child)."""
        spool: Any = self.spool  # its private fds: close(), sync() would write and lock
        with contextlib.suppress(Exception):
            spool._close_fds()
        with contextlib.suppress(Exception):
            os.close(spool._lock_fd)
        for w in (self.wake_r, self.wake_w):
            with contextlib.suppress(OSError):
                os.close(w)
        for src in self.sources:
            abandon = getattr(src, "abandon", None)
            if abandon is not None:
                with contextlib.suppress(Exception):
                    abandon()

