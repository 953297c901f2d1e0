"""The core: PID-1 duties and the tracer loop of ``lw-embed run -- CMD``.

Interface: every catchable signal is blocked and taken with ``sigtimedwait(2)``; children
and tracees are reported by ``waitpid(-1, WNOHANG | __WALL)`` on each SIGCHLD (one thread
owns both, so there is no polling floor); ``prctl(PR_SET_CHILD_SUBREAPER)`` when not PID
1; ``setpgid``/``tcsetpgrp`` to hand a terminal to the workload; ``PTRACE_SEIZE`` of the
workload before it execs; records to the worker through :class:`Outbox`.

The worker's supervision (start, restart, status/loss records, the final drain) is
:class:`lw_embed.runtime.supervisor.Supervisor`, shared with the sidecar.

Capability: none for the init duties; ptrace and seccomp as the probes allow (see
:mod:`lw_embed.platform.probe`). Without them the workload runs untraced and processes
are observed through /proc by the worker.

Cost: idle, the core sleeps in ``sigtimedwait`` (it wakes at most once a second for
housekeeping). Per tracee stop see :mod:`lw_embed.sources.tracer`.

Failure modes: the workload is never failed by the agent: a failed probe degrades the
technique, a failed SEIZE starts the workload untraced, a crashed worker is restarted
with backoff while records wait in a bounded buffer (drops counted), and an exception
in the loop is counted and the loop goes on. Exit status: the workload's code, 128+N if
it died of signal N, 127/126 if CMD is missing / not executable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lw_embed.config import Config
from lw_embed.kernel import procfs, seccomp
from lw_embed.kernel import ptrace as pt
from lw_embed.platform import detect, probe
from lw_embed.records import R, frame
from lw_embed.runtime.supervisor import (
    CATCHABLE,
    RECORD_FD,
    WORKER_HELD,
    Supervisor,
    drain_budget,
    wait_reports,
)
from lw_embed.sources.filetrace import trace_aliases, trace_roots
from lw_embed.sources.tracer import Tracer, TracerOptions, ptrace_options, seccomp_rules

log = logging.getLogger("lw_embed.core")

PR_SET_CHILD_SUBREAPER = 36
__all__ = ["CATCHABLE", "RECORD_FD", "WORKER_HELD", "Core", "RunOptions", "exit_code", "run"]
FORWARDED = CATCHABLE - {signal.SIGCHLD}
TERMINAL_STOPS = frozenset({signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
TREE_CHECK_EVERY = 0.05


@dataclass(frozen=True, slots=True)
class RunOptions:
    argv: tuple[str, ...]
    config: Config
    config_path: str | None = None
    #: the signal mask we were started with, when the caller blocked signals early
    orig_mask: frozenset[int] | None = None
    faults: frozenset[str] = frozenset()


def exit_code(status: int) -> int:
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 255


def _inherited_ignored(env: Mapping[str, str]) -> set[int]:
    """Signals ignored when we were started, as far as we can know.

    Python itself ignores SIGPIPE and SIGXFSZ at start-up, so their original state is
    lost unless the shell entrypoint (entrypoints/lw-embed) recorded SigIgn for us.
    Every other ignored disposition is still in place and is inherited as it is.
    """
    raw = env.get("_LW_EMBED_SIGIGN", "")
    try:
        mask = int(raw, 16)
    except ValueError:
        return set()
    return {s for s in range(1, 65) if mask >> (s - 1) & 1}


def _exec_workload(argv: Sequence[str], env: dict[str, str], sync_r: int, nnp: bool,
                   prog: list[seccomp.Insn] | None, orig_mask: set[int],
                   ignored: set[int], tty: int | None) -> None:  # fmt: skip
    """In the forked child: wait for the tracer, filter, restore signals, exec."""
    try:
        os.setpgid(0, 0)
        if tty is not None:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(tty, os.getpgrp())  # SIGTTOU is blocked here
        mode = os.read(sync_r, 1)
        os.close(sync_r)
        if mode == b"F" and prog is not None:
            try:
                if nnp:
                    seccomp.set_no_new_privs()
                seccomp.install(prog)
            except OSError:
                pass  # probed fine but refused now: run unfiltered rather than not at all
        for s in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(s, signal.SIG_IGN if s in ignored else signal.SIG_DFL)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            # Python's own handler: a SIGINT pending for us must not become a
            # KeyboardInterrupt here; exec would have reset it to the default anyway
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, orig_mask)
        os.execvpe(argv[0], list(argv), env)
    except FileNotFoundError:
        os.write(2, f"lw-embed: {argv[0]}: command not found\n".encode(errors="replace"))
        os._exit(127)
    except PermissionError:
        os.write(2, f"lw-embed: {argv[0]}: permission denied\n".encode(errors="replace"))
        os._exit(126)
    except BaseException as exc:
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        os.write(2, f"lw-embed: {argv[0]}: {msg}\n".encode(errors="replace"))
        os._exit(126)
    os._exit(126)


class Core:
    """PID 1: one loop over signals and wait reports."""

    def __init__(self, opts: RunOptions, env: Mapping[str, str]) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.env = dict(env)
        self.grace = detect.shutdown(self.cfg.shutdown.grace, env)[0]
        self.flush_budget = min(self.cfg.shutdown.flush, self.grace / 2)
        self.instance_id = self.cfg.agent.instance_id  # "" = the worker keeps one per spool
        self.main_pid = 0
        self.main_status: int | None = None
        self.deadline: float | None = None  # when what is left of the tree gets SIGKILL
        self.term_at: float | None = None  # first SIGTERM: the platform's grace runs from here
        self.draining = False
        self.tracer: Tracer | None = None
        self.tty: int | None = None  # the terminal we handed to the workload
        self._suspend = False
        self.recent_traced_exits: dict[int, float] = {}
        self._next_tree_check = 0.0

    # -- start ------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        orig_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CATCHABLE)
        if self.opts.orig_mask is not None:
            orig_mask = set(self.opts.orig_mask)
        if os.getpid() != 1:
            with contextlib.suppress(OSError):
                seccomp.prctl(PR_SET_CHILD_SUBREAPER, 1)
        topts = TracerOptions(
            argv_max_bytes=cfg.tracer.argv_max_bytes,
            argv_max_args=cfg.tracer.argv_max_args,
            trace_connect=cfg.tracer.trace_connect,
            faults=self.opts.faults,
            file_roots=trace_roots(cfg),
            file_aliases=trace_aliases(cfg),
        )
        rules = seccomp_rules(topts)
        caps = probe.probe(cfg.tracer.mode, cfg.tracer.seccomp, cfg.tracer.no_new_privs,
                           want_seccomp=bool(rules))  # fmt: skip
        technique = caps.techniques["processes"]
        self.sup = Supervisor(
            cfg, self.env, config_path=self.opts.config_path, instance_id=self.instance_id,
            spec={"mode": "wrapper", "scope": self._scope()},
            metrics=self._core_metrics, losses=self._core_losses,
        )  # fmt: skip
        self.outbox = self.sup.outbox
        self.sup.start_worker()

        use_ptrace = technique != "procfs"
        use_filter = technique == "ptrace+seccomp"
        nnp = use_filter and not caps.ok("cap_sys_admin") and not caps.ok("no_new_privs_set")
        prog = seccomp.build_trace_filter(rules) if use_filter else None
        tty = None
        with contextlib.suppress(OSError):
            if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
                tty = 0
        self.tty = tty
        child_env = dict(self.env)
        child_env.pop("_LW_EMBED_SIGIGN", None)
        ignored = _inherited_ignored(self.env)
        sync_r, sync_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(sync_w)
            _exec_workload(self.opts.argv, child_env, sync_r, nnp, prog, orig_mask, ignored, tty)
        os.close(sync_r)
        self.main_pid = pid
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        if use_ptrace:
            try:
                pt.seize(pid, ptrace_options(use_filter))
                self.tracer = Tracer(self.outbox.put, topts)
                self.tracer.add_root(pid)
                self.tracer.on_group_stop = self._on_group_stop
            except OSError as exc:
                use_filter = False
                caps.techniques.update({"processes": "procfs", "network.connect": "none"})
                caps.reasons["processes"] = f"PTRACE_SEIZE of the workload failed: {exc}"
        os.write(sync_w, b"F" if use_filter else b"N")
        os.close(sync_w)
        now = time.time_ns()
        self.outbox.put(frame(R.CAPS, now, caps.report()))
        self.outbox.put(frame(R.WORKLOAD, now, pid, list(self.opts.argv)))
        self.sup.start_clock()
        try:
            return self._loop()
        finally:
            self._finish()

    def _scope(self) -> str:
        scope = self.cfg.processes.scope
        if scope == "auto":
            return "namespace" if os.getpid() == 1 else "tree"
        return scope

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            try:
                self._reap()
                if self._step():
                    break
            except Exception:
                errors = self.sup.errors
                errors["core.loop_error"] = errors.get("core.loop_error", 0) + 1
                log.exception("core loop error (continuing)")
            info = signal.sigtimedwait(CATCHABLE, self._timeout())
            if info is not None and info.si_signo != signal.SIGCHLD:
                self._on_signal(info.si_signo)
        assert self.main_status is not None
        return exit_code(self.main_status)

    def _timeout(self) -> float:
        now = time.monotonic()
        t = self.sup.timeouts(now)
        if self.deadline is not None:
            t.append(self.deadline - now)
        if self.draining:
            t.append(TREE_CHECK_EVERY)
        return max(0.0, min(t))

    def _reap(self) -> None:
        tracer = self.tracer
        for pid, status in wait_reports(tracer, self.outbox):
            if tracer is not None and tracer.on_exit(pid, status):
                self.recent_traced_exits[pid] = time.monotonic()
            elif pid == self.sup.worker_pid:
                self.sup.worker_ended(status, quiet=self.draining)
                continue
            elif self.recent_traced_exits.pop(pid, None) is None:
                # an untraced child of ours (procfs mode, or an adopted orphan)
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
                self.outbox.put(frame(R.EXIT, time.time_ns(), pid, code, sig, False))
            if pid == self.main_pid:
                self.main_status = status
                self._begin_drain()

    def _on_signal(self, sig: int) -> None:
        if sig not in FORWARDED:
            return
        if self.main_status is None:
            target = -self.main_pid if self.cfg.signals.pgroup else self.main_pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(target, sig)
        else:
            self._signal_tree(sig)
        if sig == signal.SIGHUP:
            self.sup.signal_worker(signal.SIGHUP)  # and reload the agent's rules
        if sig == signal.SIGTERM and self.deadline is None:
            self.term_at = time.monotonic()
            self.deadline = self.term_at + max(0.0, self.grace - self.flush_budget)

    def _on_group_stop(self, tid: int, sig: int) -> None:
        if self.tty is not None and tid == self.main_pid and sig in TERMINAL_STOPS:
            self._suspend = True

    def _suspend_with_workload(self) -> None:
        """Ctrl-Z stopped the workload on our terminal: stop ourselves too, so the shell
        that started us gets its terminal back ("Stopped"); on ``fg`` (SIGCONT) hand the
        terminal back to the workload and continue it. What dumb-init does, for a traced
        workload."""
        self._suspend = False
        assert self.tty is not None
        os.kill(os.getpid(), signal.SIGSTOP)  # returns once the shell continues us
        with contextlib.suppress(OSError):
            os.tcsetpgrp(self.tty, self.main_pid)  # SIGTTOU is blocked
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.main_pid, signal.SIGCONT)

    def _begin_drain(self) -> None:
        """The main child is gone: give the rest of the tree SIGTERM and its grace."""
        self.draining = True
        if self.deadline is None:
            self.deadline = time.monotonic() + max(0.0, self.grace - self.flush_budget)
        self._signal_tree(signal.SIGTERM)

    def _step(self) -> bool:
        """Housekeeping after each wake; True when the core should stop."""
        if self._suspend:
            self.outbox.flush()
            self._suspend_with_workload()
        now = time.monotonic()
        self.sup.tick(now)
        if self.deadline is not None and now >= self.deadline:
            self._signal_tree(signal.SIGKILL)
            if not self.draining:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.main_pid, signal.SIGKILL)
            self.deadline = now + 1.0  # SIGKILL again if anything is still there
        if not self.draining:
            return False
        if now < self._next_tree_check:
            return False
        self._next_tree_check = now + TREE_CHECK_EVERY
        return not self._tree()

    # -- the tree -----------------------------------------------------------------------
    def _tree(self) -> list[int]:
        """Live (non-zombie) descendants of the core, the worker's subtree excluded."""
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid in procfs.list_pids():
            try:
                st = procfs.read_stat(pid)
            except OSError:
                continue
            if st.state != "Z":
                children.setdefault(st.ppid, []).append(pid)
        out: list[int] = []
        todo = [p for p in children.get(me, []) if p != self.sup.worker_pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, ()))
        return out

    def _signal_tree(self, sig: int) -> None:
        for pid in self._tree():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    # -- records --------------------------------------------------------------------------
    def _core_losses(self) -> dict[str, int]:
        return dict(self.tracer.errors) if self.tracer is not None else {}

    def _core_metrics(self) -> dict[str, int | float]:
        if self.tracer is None:
            return {}
        self.recent_traced_exits = {
            p: t for p, t in self.recent_traced_exits.items() if time.monotonic() - t < 30
        }
        return dict(self.tracer.metrics())

    # -- the end --------------------------------------------------------------------------
    def _finish(self) -> None:
        """Hand the worker what is buffered, let it drain, and never wait past the budget
        (:func:`~lw_embed.runtime.supervisor.drain_budget`)."""
        budget = drain_budget(self.cfg.shutdown.flush, self.grace, self.term_at,
                              time.monotonic())  # fmt: skip
        self.sup.finish("workload exited", budget)


def run(opts: RunOptions, env: Mapping[str, str] | None = None) -> int:
    return Core(opts, os.environ if env is None else env).run()
