"""Sidecar mode, ``lw-embed sidecar [--pid PID...]``: watch the processes of a shared PID
namespace (ECS ``pidMode: task``) from a container of its own.

Scope, decided before anything is attached (:func:`decide_scope`):

- ``--pid PID...``: those processes and their descendants (``tree`` scope);
- no ``--pid``, in a container's PID namespace: every process of the namespace
  (``namespace`` scope) except the sidecar's own (itself, its worker, their
  descendants), its ancestors (the sidecar container's own init or shell, if any) and
  PID 1 — the task's ``pause`` process or another container's init — unless
  ``--include-init`` (a PID 1 named ``pause`` is left out even then: it only sleeps);
- no ``--pid`` on a machine's root PID namespace: nothing, and exit status 2 — a sidecar
  must never ptrace a whole host by accident. The root namespace is recognised by its
  inode (``PROC_PID_INIT_INO``) or by ``kthreadd`` (pid 2, ppid 0) being visible, which
  no container's namespace shows.

Interface: a ``/proc`` snapshot; ``PTRACE_SEIZE`` of every thread of each process in
scope (:meth:`lw_embed.sources.tracer.Tracer.attach`) with
``TRACEFORK|TRACEVFORK|TRACECLONE|TRACEEXEC`` — no ``EXITKILL`` (the workload must
outlive the sidecar), no seccomp filter (one could never be removed from a running
process); fork/exec/exit from ptrace events, reported by ``waitpid(-1, __WALL)`` although
the tracees are not our children; a ``/proc`` re-scan every second for newcomers
(``docker exec``/ECS Exec sessions, children forked before their parent was seized);
signals through ``sigtimedwait(2)``. The worker (started and supervised by
:class:`lw_embed.runtime.supervisor.Supervisor`, as in wrapper mode) reports the
processes that were already running from its own /proc snapshot (``source: procfs``) and
everything the tracer says.

Capability: ``CAP_SYS_PTRACE`` to seize processes that are not our descendants (a
tracee whose capabilities exceed ours needs it whatever the uids). Without it, or when
every seize is refused, processes are observed by /proc reconciliation alone
(``techniques.processes = "procfs"``, with the reason, in ``agent.capabilities``).

Cost: at rest, one wake a second: a read of ``/proc/<pid>/stat`` per visible process.
Per traced event, the tracer's (see :mod:`lw_embed.sources.tracer`): one stop per
fork/clone and per exec, one per signal delivered to a tracee; other syscalls run at
native speed.

Failure modes: SIGTERM/SIGINT detach cleanly — every task gets ``PTRACE_INTERRUPT`` and,
at its next stop, ``PTRACE_DETACH`` (a signal taken at a signal-delivery-stop is
re-injected, a job-control stop stays as it was), within ``DETACH_BUDGET``; then the
worker drains within what is left of the platform's grace and the sidecar exits 0. A
crash or SIGKILL of the sidecar harms nothing: the kernel detaches the tracees and they
run on (no ``EXITKILL``). A process whose seize is refused (EPERM: traced by someone
else, more privileged) is left to /proc and counted (``sidecar.seize_refused``); one
that vanished mid-attach is skipped.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from lw_embed.config import Config
from lw_embed.errors import LwEmbedError
from lw_embed.kernel import procfs
from lw_embed.kernel import ptrace as pt
from lw_embed.platform import detect, probe
from lw_embed.records import R, frame
from lw_embed.runtime.supervisor import CATCHABLE, Supervisor, drain_budget, wait_reports
from lw_embed.sources.procfs import in_scope, scan
from lw_embed.sources.tracer import Tracer, TracerOptions, ptrace_options

log = logging.getLogger("lw_embed.sidecar")

#: the inode of the initial PID namespace (include/linux/proc_ns.h: PROC_PID_INIT_INO)
PROC_PID_INIT_INO = 0xEFFFFFFC
RESCAN_EVERY = 1.0
#: at most this long (and half the grace) is spent detaching after SIGTERM
DETACH_BUDGET = 3.0
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


class ScopeError(LwEmbedError):
    """Nothing may be watched as asked (exit status 2)."""


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    config: Config
    config_path: str | None = None
    #: ``--pid``: watch these trees only
    pids: tuple[int, ...] = ()
    #: ``--include-init``: PID 1 of the namespace is watched too (unless it is ``pause``)
    include_init: bool = False
    proc: str = procfs.PROC


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str  # "namespace" | "tree"
    roots: tuple[int, ...]
    exclude: frozenset[int]
    reason: str


def is_root_namespace(proc: str = procfs.PROC) -> bool:
    """True on a machine's initial PID namespace (never in a container's)."""
    if procfs.pidns_inode("self", proc) == PROC_PID_INIT_INO:
        return True
    try:
        st = procfs.read_stat(2, proc)
    except OSError:
        return False
    return st.comm == "kthreadd" and st.ppid == 0


def decide_scope(pids: tuple[int, ...], include_init: bool, me: int,
                 proc: str = procfs.PROC) -> Scope:  # fmt: skip
    """What the sidecar watches; ScopeError (exit 2) when that is nothing."""
    stats = scan(proc)
    if stats is None:
        raise ScopeError(f"cannot list {proc}: nothing to watch")
    if pids:
        for pid in pids:
            if pid <= 0:
                raise ScopeError(f"--pid {pid}: not a process id")
            if pid == me:
                raise ScopeError(f"--pid {pid}: that is the sidecar itself")
            if pid not in stats:
                raise ScopeError(f"--pid {pid}: no such process in {proc}")
        roots = tuple(sorted(set(pids)))
        return Scope("tree", roots, frozenset(), f"the trees of --pid {' '.join(map(str, roots))}")
    if is_root_namespace(proc):
        raise ScopeError(
            "this is the machine's root PID namespace (kthreadd is visible): a sidecar "
            "attaches to nothing here unless told; run it in the task's PID namespace "
            "(pidMode: task) or name the processes with --pid PID"
        )
    exclude: set[int] = set()
    p = stats[me].ppid if me in stats else 0
    while p > 0 and p in stats and p not in exclude:  # our own container's init, shell...
        exclude.add(p)
        p = stats[p].ppid
    init = stats.get(1)
    if init is not None and (not include_init or init.comm == "pause"):
        exclude.add(1)
    why = "every process of this PID namespace but the sidecar's own"
    if 1 in exclude and me != 1:
        why += f" and PID 1 ({init.comm if init else '?'})"
    return Scope("namespace", (), frozenset(exclude), why)


class Sidecar:
    """One loop over signals, tracee stops and the re-scan clock."""

    def __init__(self, opts: SidecarOptions, env: Mapping[str, str]) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.env = dict(env)
        self.me = os.getpid()
        self.grace = detect.shutdown(self.cfg.shutdown.grace, env)[0]
        self.tracer: Tracer | None = None
        self.options = ptrace_options(False, exitkill=False)
        self.stopping = False
        self.term_at: float | None = None
        self.refused: dict[tuple[int, int], int] = {}  # (pid, start_ticks) -> errno
        self.counts: dict[str, int] = {}
        self._next_scan = 0.0
        self.caps: probe.Capabilities | None = None
        #: nothing was in scope at the start: technique "none" until something shows up
        self.idle = False

    # -- start ----------------------------------------------------------------------------
    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)
        scope = self.scope = decide_scope(self.opts.pids, self.opts.include_init, self.me,
                                          self.opts.proc)  # fmt: skip
        cfg = self.cfg
        caps = probe.probe(cfg.tracer.mode, "off", cfg.tracer.no_new_privs, want_seccomp=False)
        self.sup = Supervisor(
            cfg, self.env, config_path=self.opts.config_path,
            instance_id=cfg.agent.instance_id,
            spec={"mode": "sidecar", "scope": scope.kind, "roots": list(scope.roots),
                  "exclude": sorted(scope.exclude)},
            metrics=self._metrics, losses=self._losses,
        )  # fmt: skip
        self.outbox = self.sup.outbox
        self.sup.start_worker()
        self.caps = caps
        try:
            self._attach_first(caps)
            self.outbox.put(frame(R.CAPS, time.time_ns(), caps.report()))
            if self.idle:
                log.warning("no process in scope (%s): is pidMode: task set? Watching for "
                            "processes to appear", scope.reason)  # fmt: skip
            else:
                log.info("watching %s (%s)", scope.reason, caps.techniques["processes"])
            self.sup.start_clock()
            self._loop()
        finally:
            self._detach_all()
            self._finish()
        return 0

    def _attach_first(self, caps: probe.Capabilities) -> None:
        """The first snapshot and seize; choose ptrace or /proc and say why."""
        caps.techniques["network.connect"] = "none"
        caps.reasons["network.connect"] = "sidecar mode installs no seccomp filter"
        if caps.techniques["processes"] == "procfs":
            return
        t = self.cfg.tracer
        self.tracer = Tracer(self.outbox.put, TracerOptions(t.argv_max_bytes, t.argv_max_args,
                                                            trace_connect=False))  # fmt: skip
        seized, refused = self._rescan()
        if not refused and not seized:
            self.idle = True
            caps.techniques["processes"] = "none"
            caps.reasons["processes"] = ("no process in scope: is pidMode: task set? "
                                         f"({self.scope.reason}; re-scanned every "
                                         f"{RESCAN_EVERY:g} s)")  # fmt: skip
            return
        if refused and not seized:
            self.tracer = None
            caps.techniques["processes"] = "procfs"
            caps.reasons["processes"] = (
                f"PTRACE_SEIZE refused for all {refused} processes in scope "
                f"({probe.errname(next(iter(self.refused.values())))}; no CAP_SYS_PTRACE?): "
                "/proc reconciliation, short-lived processes can be missed"
            )
            return
        caps.techniques["processes"] = "ptrace"
        why = f"PTRACE_SEIZE of {seized} running processes, no seccomp filter"
        if refused:
            why += f"; {refused} refused, watched through /proc"
        caps.reasons["processes"] = why + f" ({self.scope.reason})"

    # -- the loop -------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            try:
                self._reap()
                now = time.monotonic()
                if self.tracer is not None and now >= self._next_scan:
                    self._rescan()
                self.sup.tick(now)
            except Exception:
                errors = self.sup.errors
                errors["core.loop_error"] = errors.get("core.loop_error", 0) + 1
                log.exception("sidecar loop error (continuing)")
            info = signal.sigtimedwait(CATCHABLE, self._timeout())
            if info is not None:
                self._on_signal(info.si_signo)

    def _timeout(self) -> float:
        now = time.monotonic()
        t = self.sup.timeouts(now)
        if self.tracer is not None:
            t.append(self._next_scan - now)
        return max(0.0, min(t))

    def _on_signal(self, sig: int) -> None:
        if sig in STOP_SIGNALS:
            self.stopping = True
            self.term_at = time.monotonic()
        elif sig == signal.SIGHUP:
            self.sup.signal_worker(signal.SIGHUP)  # reload the agent's rules

    def _reap(self) -> None:
        tracer = self.tracer
        for pid, status in wait_reports(tracer, self.outbox):
            if tracer is not None and tracer.on_exit(pid, status):
                continue
            if pid == self.sup.worker_pid:
                self.sup.worker_ended(status, quiet=self.stopping)

    def _rescan(self) -> tuple[int, int]:
        """Seize the processes in scope the tracer does not have yet: (seized, refused)."""
        self._next_scan = time.monotonic() + RESCAN_EVERY
        tracer = self.tracer
        stats = scan(self.opts.proc)
        if tracer is None or stats is None:
            return 0, 0
        self._count("sidecar.rescans")
        s = self.scope
        # the sidecar's whole subtree is its own (worker, probe children)
        targets = in_scope(stats, s.kind, self.me, self.me, s.roots, s.exclude)
        self.refused = {k: v for k, v in self.refused.items()
                        if k[0] in stats and stats[k[0]].start_ticks == k[1]}  # fmt: skip
        seized = refused = 0
        for pid, st in sorted(targets.items(), key=lambda kv: kv[1].start_ticks):
            ident = (pid, st.start_ticks)
            if pid in tracer.tasks or ident in self.refused:
                continue
            try:
                tracer.attach(pid, self.options, self.opts.proc)
            except pt.PtraceFailed as exc:
                code = exc.errno or errno.EPERM
                if code == errno.ESRCH or _gone_or_ours(pid, st, self.me, self.opts.proc):
                    continue  # gone (an exiting task gives EPERM), or a new child of a
                    # tracee whose first stop is still to come
                self.refused[ident] = code
                self._count("sidecar.seize_refused")
                refused += 1
                continue
            self._count("sidecar.seized")
            seized += 1
        if self.idle and seized and self.caps is not None:  # a workload came: say so
            self.idle = False
            self.caps.techniques["processes"] = "ptrace"
            self.caps.reasons["processes"] = (f"PTRACE_SEIZE of processes that appeared "
                                              f"after the start ({s.reason})")  # fmt: skip
            self.outbox.put(frame(R.CAPS, time.time_ns(), self.caps.report()))
            log.info("watching %s (ptrace): processes appeared", s.reason)
        return seized, refused

    # -- the end --------------------------------------------------------------------------
    def _detach_all(self) -> None:
        """Let go of every tracee: interrupt, and detach at its next stop; bounded."""
        tracer = self.tracer
        if tracer is None:
            return
        end = time.monotonic() + min(DETACH_BUDGET, self.grace / 2)
        left = tracer.begin_detach()
        while left and time.monotonic() < end:
            signal.sigtimedwait({signal.SIGCHLD}, 0.05)
            self._reap()
            left = tracer.detach_step()
        self.counts["sidecar.detached"] = tracer.detached
        self.outbox.flush()
        if left:
            # still detaching: a task that stops later (a vfork parent, a task in D state)
            # is detached at that stop by _finish's wait loop, or released by the kernel
            # when we exit (no EXITKILL); it never stays stopped
            self.counts["sidecar.detach_timeouts"] = left
            log.warning("%d tasks not detached within the budget; they are detached when "
                        "they stop, or released at exit", left)  # fmt: skip

    def _finish(self) -> None:
        budget = drain_budget(self.cfg.shutdown.flush, self.grace, self.term_at,
                              time.monotonic())  # fmt: skip
        self.sup.finish("sidecar stopped", budget, on_report=self._late_report)

    def _late_report(self, pid: int, status: int) -> None:
        """A wait report during the drain: a tracee's stop is a detach, never a hold."""
        tracer = self.tracer
        if tracer is None:
            return
        if os.WIFSTOPPED(status):
            tracer.on_stop(pid, status)  # detaching: PTRACE_DETACH at this stop
            tracer.detach_step()  # its new children (auto-attached) are interrupted too
            self.counts["sidecar.detached"] = tracer.detached
        else:
            tracer.on_exit(pid, status)

    # -- records ------------------------------------------------------------------------
    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _metrics(self) -> dict[str, int | float]:
        m: dict[str, int | float] = dict(self.counts)
        if self.tracer is not None:
            m.update(self.tracer.metrics())
        return m

    def _losses(self) -> dict[str, int]:
        return dict(self.tracer.errors) if self.tracer is not None else {}


def _gone_or_ours(pid: int, st: procfs.Stat, me: int, proc: str) -> bool:
    """After a refused seize: has ``pid`` exited (or been replaced) meanwhile, or is it
    already our tracee?"""
    try:
        now = procfs.read_stat(pid, proc)
        if now.start_ticks != st.start_ticks or now.state in ("Z", "X", "x"):
            return True
        with open(f"{proc}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1]) == me
    except (OSError, ValueError, IndexError):
        return True
    return False


def run(opts: SidecarOptions, env: Mapping[str, str] | None = None) -> int:
    """Exit status: 0 after a clean stop; ScopeError (the CLI's 2) when nothing may be
    watched."""
    return Sidecar(opts, os.environ if env is None else env).run()
