"""The worker process: core records in, events accepted into the spool, batches shipped.

Launch contract (the core's side is :meth:`lw_embed.runtime.init.Core._start_worker`): fd 3
is the read end of the record pipe; ``_LW_EMBED_WORKER`` holds JSON ``{"config":
<config_to_dict>, "config_path", "core_pid", "instance_id", "mode", "scope":
"tree"|"namespace"|"none", "version"}``. The worker never writes to stdout; logs go to
stderr at ``agent.log_level``, never per event.

Interface: ``select(2)`` on fd 3 (``O_NONBLOCK``) and a signal wakeup pipe, with the
timeout set by the next reconcile pass, aggregation window, spool sync or loss report;
:class:`~lw_embed.records.FrameReader` -> :func:`~lw_embed.records.decode_payload` ->
:class:`~lw_embed.pipeline.enrich.ProcessTable` -> filter -> aggregate ->
:class:`~lw_embed.spool.Spool` (accepted) -> :class:`~lw_embed.runtime.shipper.Shipper`
(its own thread) -> HTTP backend or batch files; and the /proc reconciler of
:mod:`lw_embed.sources.procfs`.

Capability: none beyond those of the /proc source; a writable data dir.

Cost: idle, it sleeps in select; per record a decode, a dict update, a ``to_wire``, the
filter and aggregate steps and one spool append (one ``write(2)``); one group fdatasync
per ``spool.sync_interval``. It runs at nice 10 so the workload and the core come first.

Failure modes: nothing in the input stops it. Every drop has a reason and a counter:
``worker.bad_frame``, ``worker.bad_record``, ``worker.exit_unknown_process``,
``worker.process_table_full``, and the spool's own (``spool.evicted``, ``spool.full``,
``spool.corrupt``, ``http_<code>``, ...). Those and the core's cumulative totals go out in
an ``agent.loss`` event whenever they change (at most once a second) and at the end.
Events the filter excludes are not losses (they are counted in ``worker.filtered``).
SIGHUP reloads the rules (as does a change of the config file); SIGTERM/SIGINT ask the
shipper to send now: the core ends the worker by closing the pipe, and at EOF the worker
drains the spool by priority within the budget the core gave (SHUTDOWN record), fsyncs
what is left and exits 0. Exit 2: ``_LW_EMBED_WORKER`` missing or invalid, or fd 3 not open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lw_embed import records
from lw_embed.codec import AgentIdentity
from lw_embed.config import (
    Config,
    config_from_dict,
    resolved_data_dir,
    resolved_output_dir,
    resolved_spool_dir,
)
from lw_embed.errors import ConfigError, LwEmbedError, RecordError
from lw_embed.events import AgentCapabilities, AgentConfigRejected, AgentLoss, AgentStatus, Event
from lw_embed.fsutil import write_atomic
from lw_embed.kernel import procfs
from lw_embed.pipeline.aggregate import Aggregator
from lw_embed.pipeline.enrich import PROCESS_RECORDS, ProcessTable
from lw_embed.pipeline.filter import FilterProgram, process_context
from lw_embed.pipeline.reload import RulesWatcher
from lw_embed.records import R
from lw_embed.runtime.shipper import (
    BatchSink,
    FileBatchSink,
    HttpBatchSink,
    Shipper,
    ShipperLimits,
)
from lw_embed.sinks.files import FileSink
from lw_embed.sinks.http import HttpSender
from lw_embed.sources import base as sources_base
from lw_embed.sources.base import SourceContext, WorkerSource
from lw_embed.sources.procfs import SCOPES, Reconciler
from lw_embed.spool import Spool, SpoolError, SpoolLocked

log = logging.getLogger("lw_embed.worker")

ENV_VAR = "_LW_EMBED_WORKER"
RECORD_FD = 3
MODES = ("wrapper", "sidecar", "in-app")
READ_CHUNK = 1 << 16
#: bytes read before the loop looks at its deadlines again
READ_BUDGET = 1 << 20
#: at most one agent.loss event per this many seconds (and one at the end)
LOSS_EVERY = 1.0
#: a 5xx other than 502/503/504 is retried this often before the batch is dead-lettered
SERVER_ERROR_ATTEMPTS = 1 << 30


class SpecError(LwEmbedError):
    """``_LW_EMBED_WORKER`` is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What the core tells the worker at launch."""

    config: Config
    core_pid: int
    instance_id: str  # "" = the one kept in the spool directory
    mode: str
    scope: str
    version: str
    config_path: str | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def safe_id(v: object) -> bool:
    """An instance id usable in file names and idempotency keys."""
    return (isinstance(v, str) and 0 < len(v) <= 128 and not v.startswith(".")
            and set(v) <= _ID_CHARS)  # fmt: skip


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "an object"),
    "core_pid": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "instance_id": (lambda v: v == "" or safe_id(v), "empty or [A-Za-z0-9._-]{1,128}"),
    "mode": (lambda v: v in MODES, "one of " + ", ".join(MODES)),
    "scope": (lambda v: v in SCOPES, "one of " + ", ".join(SCOPES)),
    "version": (lambda v: isinstance(v, str), "a string"),
}


def parse_spec(raw: str | None) -> Spec:
    """Parse and check the launch JSON; raise SpecError naming what is wrong."""
    if raw is None:
        raise SpecError(f"{ENV_VAR} is not set (the worker is started by lw-embed run)")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SpecError(f"{ENV_VAR}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{ENV_VAR}: not a JSON object")
    for key, (ok, what) in _CHECKS.items():
        if key not in data:
            raise SpecError(f"{ENV_VAR}: {key} is missing")
        if not ok(data[key]):
            raise SpecError(f"{ENV_VAR}: {key} must be {what}, got {data[key]!r:.80}")
    path = data.get("config_path")
    if path is not None and not isinstance(path, str):
        raise SpecError(f"{ENV_VAR}: config_path must be a string or null")
    try:
        cfg = config_from_dict(data["config"])
    except ConfigError as exc:
        raise SpecError(f"{ENV_VAR}: config: {exc}") from exc
    d = data
    return Spec(cfg, d["core_pid"], d["instance_id"], d["mode"], d["scope"], d["version"],
                path)  # fmt: skip


def instance_id_of(spool_dir: str) -> str:
    """The agent instance id kept beside the spool, created once: with the spool's seq it
    names every event uniquely, across restarts and upgrades."""
    path = os.path.join(spool_dir, "instance_id")
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
        if safe_id(value):
            return value
    except (OSError, UnicodeDecodeError):
        pass
    value = os.urandom(8).hex()
    try:
        write_atomic(path, (value + "\n").encode())
    except OSError as exc:
        log.warning("cannot keep the instance id in %s: %s", spool_dir, exc)
    return value


def _map(v: Any) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise RecordError(f"expected a map, got {type(v).__name__}")
    return v


def _open_spool(cfg: Config, spool_dir: str, mono: Callable[[], float]) -> tuple[Spool, str]:
    """Open the spool. If another live agent holds it, use a private one beside it; if the
    data dir is unusable (a read-only root filesystem), use one under the temp dir. Say
    so, rather than fail: the workload must not lose its agent over a volume."""
    sc = cfg.spool
    fallback = os.path.join(tempfile.gettempdir(), f"lw-embed-{os.getuid()}", "spool")
    for d in (spool_dir, f"{spool_dir}.{os.getpid()}", fallback):
        spool = Spool(d, max_bytes=sc.max_bytes, segment_bytes=sc.segment_bytes,
                      sync_interval=sc.sync_interval, clock=mono)  # fmt: skip
        try:
            spool.open()
            return spool, d
        except SpoolLocked:
            log.error("spool %s is held by another agent; using a private spool", d)
        except (SpoolError, OSError) as exc:
            log.error("cannot use spool %s (%s); trying %s", d, exc, fallback)
    raise LwEmbedError(f"cannot open a spool in {spool_dir} nor in {fallback}")


def batches_url(url: str) -> str:
    """The backend's batch endpoint: a bare ``http(s)://host:port`` gets the protocol's
    ``/v1/batches``; a URL with a path is used as it is."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/v1/batches"))
    return url


def _sink(cfg: Config, out_dir: str, instance_id: str, version: str) -> BatchSink:
    b = cfg.backend
    if not b.url:
        return FileBatchSink(FileSink(out_dir), instance_id)
    token = b.token
    if b.token_file:
        with open(b.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    sender = HttpSender(
        batches_url(b.url), token, ca_file=b.ca_file, verify_tls=b.verify_tls,
        connect_timeout=b.connect_timeout, request_timeout=b.request_timeout,
        backoff_initial=b.backoff_initial, backoff_max=b.backoff_max,
        user_agent=f"lw-embed/{version}", max_server_error_retries=SERVER_ERROR_ATTEMPTS,
    )  # fmt: skip
    return HttpBatchSink(sender, b.compression_quality)


class Worker:
    """The worker's state and main loop."""

    def __init__(
        self,
        spec: Spec,
        fd: int = RECORD_FD,
        *,
        env: Mapping[str, str] = os.environ,
        proc: str = procfs.PROC,
        wall: Callable[[], int] = time.time_ns,
        mono: Callable[[], float] = time.monotonic,
        sources: Sequence[WorkerSource] | None = None,
    ) -> None:
        cfg = spec.config
        self.spec, self.cfg, self.fd, self.wall, self.mono = spec, cfg, fd, wall, mono
        boot = procfs.boot_id(proc)
        pidns = procfs.pidns_inode("self", proc)
        try:
            boot_ns = procfs.boot_time_ns(proc)
        except OSError:
            boot_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        self.table = ProcessTable(boot, pidns, boot_ns, cfg.processes.ancestors_max)
        self.reconciler = Reconciler(
            self.table, spec.scope, spec.core_pid, os.getpid(), proc,
            cfg.tracer.argv_max_bytes, cfg.tracer.argv_max_args,
        )  # fmt: skip
        uid = os.getuid()
        self.spool, spool_dir = _open_spool(cfg, resolved_spool_dir(cfg, uid, env), mono)
        instance = spec.instance_id or instance_id_of(spool_dir)
        self.agent = AgentIdentity(instance, spec.version, spec.mode)
        self.resource = {"boot_id": boot, "pid_namespace": pidns}
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
            _sink(cfg, resolved_output_dir(cfg, uid, env), instance, spec.version),
            self.agent, self.limits,
            resource=lambda: self.resource,
            processes=self._process_records,
            loss=self.totals,
            deadletter_dir=os.path.join(resolved_data_dir(cfg, uid, env), "deadletter"),
        )  # fmt: skip
        self.reader = records.FrameReader()
        self.counts: dict[str, int] = {}
        self.core_totals: dict[str, int] = {}
        self._reported: dict[str, int] | None = None  # totals of the last agent.loss
        self._next_loss = 0.0
        self._eof = False
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
    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.watcher.request())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for sig in (signal.SIGTTOU, signal.SIGTTIN):  # a terminal belongs to the workload
            signal.signal(sig, signal.SIG_IGN)
        # the core starts us with these blocked, so none could kill us before now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        os.set_blocking(self.fd, False)
        self.shipper.start()
        if self._start_error is not None:
            self._accept(AgentConfigRejected(time=self.wall(), path=self.watcher.path or "",
                                             error=self._start_error).to_wire())  # fmt: skip
        log.info("started: scope %s, instance %s, seq %d", self.spec.scope,
                 self.agent.instance_id, self.spool.next_seq)  # fmt: skip
        while self._read() >= READ_BUDGET:  # what the core buffered before we started
            pass
        if self.spec.scope != "none":
            # the first pass only notes what runs; what is still unknown to the tracer at
            # the next pass is reported (from /proc) then
            self.reconciler.reconcile(self.mono())
            self._reconcile_at = self.mono() + min(self._reconcile_every, 1.0)
        while not self._eof:
            by_fd = {fd: src for src in self.sources if (fd := src.fileno()) is not None}
            try:
                ready = select.select([self.fd, wake_r, *by_fd], [], [], self._timeout())[0]
            except OSError as exc:
                log.error("select on the record pipe failed: %s", exc)
                break
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            if self.fd in ready:
                self._read()
            self._poll_sources({by_fd[fd] for fd in ready if fd in by_fd})
            self._tick()
        if self._reconcile_at is not None:
            self._reconcile(self.mono(), final=True)  # nothing is in flight any more
        self._finish()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.shipper.notify()  # the wakeup fd ends the select

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
        now = self.mono()
        for src in self.sources:
            due = src.next_due()
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
        for src in self.sources:
            self._guarded(src, lambda s: s.close(), src)  # their last events
        for ev in self.aggregator.flush(force=True):
            self._accept(ev)
        self._report_loss(final=True)
        self.spool.sync()
        self.shipper.drain(self.mono() + self._budget)
        st = self.spool.stats()
        self.spool.close()
        log.info("worker done: %d delivered, %d pending in the spool", st.delivered, st.pending)


#: the worker yields the CPU to the workload and to the core (which holds tracee stops)
WORKER_NICE = 10


def main() -> int:
    """Entry point of ``python -m lw_embed.runtime.worker``; returns the exit status."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    try:
        spec = parse_spec(os.environ.get(ENV_VAR))
    except SpecError as exc:
        print(f"lw-embed worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=spec.config.agent.log_level.upper(),
        stream=sys.stderr,
        format="lw-embed worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        os.fstat(RECORD_FD)
    except OSError:
        print(f"lw-embed worker: fd {RECORD_FD} (the record pipe) is not open", file=sys.stderr)
        return 2
    try:
        worker = Worker(spec)
    except (OSError, LwEmbedError) as exc:  # e.g. no usable spool anywhere
        print(f"lw-embed worker: {exc}", file=sys.stderr)
        return 2
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
