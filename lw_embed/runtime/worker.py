"""The worker process: core records in, batch files out (``python -m lw_embed.runtime.worker``).

Launch contract (the core's side is :meth:`lw_embed.runtime.init.Core._start_worker`): fd 3
is the read end of the record pipe; ``_LW_EMBED_WORKER`` holds JSON ``{"config":
<config_to_dict>, "core_pid", "instance_id", "mode", "scope": "tree"|"namespace"|"none",
"version"}`` and optionally ``"seq_start"`` (otherwise the sequence resumes after the
newest batch file of this instance, so a restarted worker never reuses a number). The
worker never writes to stdout; logs go to stderr at ``agent.log_level``, never per event.

Interface: ``select(2)`` on fd 3 (``O_NONBLOCK``) and a signal wakeup pipe, with the
timeout set by the next batch deadline, sink retry or reconcile pass;
:class:`~lw_embed.records.FrameReader` -> :func:`~lw_embed.records.decode_payload` ->
:class:`~lw_embed.pipeline.enrich.ProcessTable` -> :class:`~lw_embed.pipeline.batch.Batcher`
-> :func:`~lw_embed.codec.encode_batch` -> :class:`~lw_embed.sinks.files.FileSink`; and the
/proc snapshot and reconciler of :mod:`lw_embed.sources.procfs`.

Capability: none beyond those of the /proc source; write access to the output directory.

Cost: idle, it sleeps in select; per record a decode, a dict update and a ``to_wire``;
per batch one encode and two fsyncs (about once a second under load).

Failure modes: nothing in the input stops it. Every drop has a reason and a counter:
``worker.bad_frame`` (bytes FrameReader skipped, a torn tail at EOF), ``worker.bad_record``
(undecodable or ill-typed records), ``worker.sink_error`` (events of a batch whose write
failed :data:`SINK_ATTEMPTS` times), ``worker.encode_error``, ``worker.exit_unknown_process``
(an EXIT with no known process) and ``worker.process_table_full`` (live entries evicted).
Those and the core's cumulative totals go out in an ``agent.loss`` event whenever they
change (at most once per batch; it may exceed the batch bounds by that one event) and in
the final batch always; every batch header carries them too. SIGTERM/SIGINT only request
an early flush: the core ends the worker by closing the pipe, and at EOF the worker
flushes and exits 0. Exit 2: ``_LW_EMBED_WORKER`` missing or invalid, fd 3 not open, or
no output directory can be resolved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lw_embed import records
from lw_embed.codec import AgentIdentity, encode_batch
from lw_embed.config import Config, config_from_dict, resolved_output_dir
from lw_embed.decode import read_batch
from lw_embed.errors import ConfigError, LwEmbedError, RecordError
from lw_embed.events import AgentCapabilities, AgentLoss, AgentStatus, Event
from lw_embed.kernel import procfs
from lw_embed.pipeline.batch import Batcher
from lw_embed.pipeline.enrich import PROCESS_RECORDS, ProcessTable
from lw_embed.records import R
from lw_embed.sinks.files import FileSink, batch_name
from lw_embed.sources.procfs import SCOPES, Reconciler

log = logging.getLogger("lw_embed.worker")

ENV_VAR = "_LW_EMBED_WORKER"
RECORD_FD = 3
MODES = ("wrapper", "sidecar", "in-app")
READ_CHUNK = 1 << 16
#: bytes read before the loop looks at its deadlines again
READ_BUDGET = 1 << 20
#: writes of one batch before it is dropped (counted as worker.sink_error per event)
SINK_ATTEMPTS = 3
SINK_RETRY_DELAY = 0.5


class SpecError(LwEmbedError):
    """``_LW_EMBED_WORKER`` is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What the core tells the worker at launch."""

    config: Config
    core_pid: int
    instance_id: str
    mode: str
    scope: str
    version: str
    seq_start: int | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _safe_id(v: object) -> bool:
    try:
        return isinstance(v, str) and bool(batch_name(v, 0))
    except ValueError:
        return False


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "an object"),
    "core_pid": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "instance_id": (_safe_id, "a string safe in a file name"),
    "mode": (lambda v: v in MODES, "one of " + ", ".join(MODES)),
    "scope": (lambda v: v in SCOPES, "one of " + ", ".join(SCOPES)),
    "version": (lambda v: isinstance(v, str), "a string"),
    "seq_start": (lambda v: v is None or (_is_int(v) and v >= 0), "a non-negative integer"),
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
        if key not in data and key != "seq_start":
            raise SpecError(f"{ENV_VAR}: {key} is missing")
        if not ok(data.get(key)):
            raise SpecError(f"{ENV_VAR}: {key} must be {what}, got {data[key]!r:.80}")
    try:
        cfg = config_from_dict(data["config"])
    except ConfigError as exc:
        raise SpecError(f"{ENV_VAR}: config: {exc}") from exc
    d = data
    return Spec(cfg, d["core_pid"], d["instance_id"], d["mode"], d["scope"], d["version"],
                d.get("seq_start"))  # fmt: skip


def resume_seq(directory: str, instance_id: str) -> int:
    """The first sequence number after the newest batch file of ``instance_id``."""
    pat = re.compile(rf"batch-{re.escape(instance_id)}-(\d+)\.cbor")
    try:
        firsts = [int(m[1]) for n in os.listdir(directory) if (m := pat.fullmatch(n))]
    except OSError:
        return 0
    if not firsts:
        return 0
    first = max(firsts)
    try:
        last = read_batch(os.path.join(directory, batch_name(instance_id, first)))["seq"][1]
    except (OSError, RecordError) as exc:
        log.warning("cannot read the last batch of this instance (%s); resuming after it", exc)
        return first + 1
    return int(last) + 1


@dataclass(slots=True)
class _Held:
    """An encoded batch not yet written."""

    data: bytes
    seq_first: int
    events: int
    attempts: int = 0
    retry_at: float = 0.0


def _map(v: Any) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise RecordError(f"expected a map, got {type(v).__name__}")
    return v


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
    ) -> None:
        cfg = spec.config
        self.spec, self.fd, self.wall, self.mono = spec, fd, wall, mono
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
        out_dir = resolved_output_dir(cfg, os.getuid(), env)
        self.sink = FileSink(out_dir)
        seq = spec.seq_start
        self.seq_start = resume_seq(out_dir, spec.instance_id) if seq is None else seq
        o = cfg.output
        self.batcher = Batcher(
            o.batch_max_events, o.batch_max_bytes, o.batch_max_age, self.seq_start, mono
        )
        self.agent = AgentIdentity(spec.instance_id, spec.version, spec.mode)
        self.resource = {"boot_id": boot, "pid_namespace": pidns}
        self.reader = records.FrameReader()
        self.counts: dict[str, int] = {}
        self.core_totals: dict[str, int] = {}
        self._reported: dict[str, int] = {}  # totals of the last agent.loss
        self._dirty_at: float | None = None  # when the totals first differed from those
        self._held: _Held | None = None
        self._flush_requested = False
        self._eof = False
        self._torn_tail = 0
        self._warned_bad_record = False
        self.batches_written = self.events_written = self.bytes_read = 0
        self._reconcile_every = cfg.processes.reconcile_interval
        self._reconcile_at: float | None = None

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.set_blocking(self.fd, False)
        log.info("started: scope %s, seq %d", self.spec.scope, self.seq_start)
        while self._read() >= READ_BUDGET:  # what the core buffered before we started
            pass  # is applied before the snapshot, so those processes are not reported twice
        t = self.wall()
        for info in self.reconciler.snapshot():
            self._emit(self.table.observe_procfs(info, t))
        if self.spec.scope != "none":
            self._reconcile_at = self.mono() + self._reconcile_every
        while not self._eof:
            try:
                ready = select.select([self.fd, wake_r], [], [], self._timeout())[0]
            except OSError as exc:
                log.error("select on the record pipe failed: %s", exc)
                break
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
            if self.fd in ready:
                self._read()
            now = self.mono()
            if self._reconcile_at is not None and now >= self._reconcile_at:
                self._reconcile(now)
                self._reconcile_at = self.mono() + self._reconcile_every
            self._sync_counts()
            if self._held is not None:
                if now >= self._held.retry_at:
                    self._flush()
            elif self._flush_requested or self.batcher.due() or self._loss_due(now):
                self._flush()
        if self._reconcile_at is not None:
            self._reconcile(self.mono(), final=True)  # nothing is in flight any more
        self._final_flush()
        log.info("worker done: %d batches, %d events", self.batches_written, self.events_written)
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._flush_requested = True  # the wakeup fd ends the select

    def _timeout(self) -> float | None:
        now = self.mono()
        ts: list[float] = []
        if self._held is not None:
            ts.append(self._held.retry_at)
        else:
            if self._flush_requested:
                return 0.0
            deadline = self.batcher.deadline()
            if deadline is not None:
                ts.append(deadline)
            if self._dirty_at is not None:
                ts.append(self._dirty_at + self.batcher.max_age)
        if self._reconcile_at is not None:
            ts.append(self._reconcile_at)
        return max(0.0, min(ts) - now) if ts else None

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
            self._emit(AgentCapabilities(time=t, report=_map(f[0])))
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
            log.info("core shutting down (%s): flushing", f[0])
            self._flush_requested = True
        for missed in self.table.drain_missed():
            self._emit(missed)

    def _reconcile(self, now: float, final: bool = False) -> None:
        result = self.reconciler.reconcile(now, final)
        t = self.wall()
        for pid, ticks in result.gone:
            self._emit(self.table.procfs_exit(pid, t, ticks))
        for info in result.new:
            self._emit(self.table.observe_procfs(info, t))
        for missed in self.table.drain_missed():
            self._emit(missed)

    def metrics(self) -> dict[str, int | float]:
        """The worker's own counters and gauges (added to each agent.status)."""
        return {
            "worker.batches_written": self.batches_written,
            "worker.bytes_read": self.bytes_read,
            "worker.events_written": self.events_written,
            "worker.events_pending": len(self.batcher),
            "worker.processes": len(self.table),
            "worker.processes_live": self.table.live_count,
            "worker.processes_evicted": self.table.evictions,
            "worker.reconcile_passes": self.reconciler.passes,
        }

    # -- events, loss and batches ---------------------------------------------------------
    def _emit(self, event: Event | None) -> None:
        if event is None:
            return
        wire = event.to_wire()
        eid = wire.get("exec_id")
        self.batcher.add(wire, self.table.record(eid if isinstance(eid, str) else None))
        if self.batcher.full():
            self._flush()

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
        """Cumulative drops by reason, the core's and the worker's."""
        out = dict(self.core_totals)
        for k, v in self.counts.items():
            if v:
                out[k] = out.get(k, 0) + v
        return out

    def _loss_due(self, now: float) -> bool:
        if self._dirty_at is None and self.totals() != self._reported:
            self._dirty_at = now
        return self._dirty_at is not None and now >= self._dirty_at + self.batcher.max_age

    def _flush(self, final: bool = False) -> None:
        """Write the held batch if any, else take, encode and write the pending one."""
        self._flush_requested = False
        if self._held is not None:
            if not final and self.mono() < self._held.retry_at:
                return
            self._write_held()
            if self._held is not None:
                return
        self._sync_counts()
        totals = self.totals()
        if final or totals != self._reported:
            accepted = self.batcher.next_seq - self.seq_start
            loss = AgentLoss(time=self.wall(), totals=totals, accepted=accepted)
            self.batcher.add(loss.to_wire())
            self._reported, self._dirty_at = totals, None
        batch = self.batcher.take()
        if batch is None:
            return
        try:
            data = encode_batch(
                self.agent, self.resource, batch.seq_first, batch.seq_last,
                batch.processes, batch.events, totals,
            )  # fmt: skip
        except Exception as exc:
            self._count("worker.encode_error", len(batch))
            log.error("cannot encode batch %d..%d: %s", batch.seq_first, batch.seq_last, exc)
            return
        self._held = _Held(data, batch.seq_first, len(batch))
        self._write_held()

    def _write_held(self) -> None:
        held = self._held
        assert held is not None
        try:
            self.sink.write(held.data, self.spec.instance_id, held.seq_first)
        except OSError as exc:
            held.attempts += 1
            if held.attempts < SINK_ATTEMPTS:
                held.retry_at = self.mono() + SINK_RETRY_DELAY * 2 ** (held.attempts - 1)
                log.warning("writing batch %d failed (%s); will retry", held.seq_first, exc)
                return
            log.error("dropping batch %d (%d events) after %d failed writes: %s",
                      held.seq_first, held.events, held.attempts, exc)  # fmt: skip
            self._count("worker.sink_error", held.events)
            self._held = None
            return
        self._held = None
        self.batches_written += 1
        self.events_written += held.events

    def _final_flush(self) -> None:
        """At EOF: write what is held (retrying at once), then one last batch with the loss."""
        while self._held is not None:
            self._write_held()
            if self._held is not None:
                time.sleep(0.05)
        self._flush(final=True)
        while self._held is not None:
            time.sleep(0.05)
            self._write_held()


def main() -> int:
    """Entry point of ``python -m lw_embed.runtime.worker``; returns the exit status."""
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
    except ConfigError as exc:
        print(f"lw-embed worker: {exc}", file=sys.stderr)
        return 2
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
