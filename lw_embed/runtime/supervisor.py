"""What every agent core does for its worker: start, restart, feed, report, drain.

Shared by the PID-1 wrapper (:mod:`lw_embed.runtime.init`) and the sidecar
(:mod:`lw_embed.runtime.sidecar`): the record pipe and its :class:`Outbox`, the worker
launch contract (fd 3, ``_LW_EMBED_WORKER``; see :mod:`lw_embed.runtime.worker`), restart
with exponential backoff, the periodic ``STATUS``/``LOSS`` records, and the final hand-over
(``SHUTDOWN`` record, pipe EOF, drain within a budget, workers started anew when one dies
with records still waiting).

Interface: ``pipe2(O_CLOEXEC)``, ``posix_spawn(3)`` of ``python -P -m
lw_embed.runtime.worker`` with the read end on fd 3, stdin/stdout on /dev/null, the
held signals blocked and every catchable signal at its default; ``sigtimedwait(2)`` on
SIGCHLD and ``waitpid(-1, WNOHANG | __WALL)`` while draining; ``FIONREAD`` on the pipe.

Capability: none.

Cost: nothing per record beyond the outbox append; one spawn per worker start.

Failure modes: a worker that cannot be spawned or dies is restarted after the backoff
(``worker.restart_backoff_min`` doubling to ``_max``, reset after 10 s of good running);
records wait in the bounded outbox meanwhile (drops counted as ``core.buffer_full``). At
the end, a worker that does not finish within the budget is SIGKILLed and what it had
not read is logged as lost. The supervisor never waits on the pipe.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lw_embed import __version__
from lw_embed.config import Config, config_to_dict
from lw_embed.kernel import ptrace as pt
from lw_embed.records import R, frame
from lw_embed.runtime.outbox import Outbox

log = logging.getLogger("lw_embed.core")

#: the worker finds the record pipe on this fd (lw_embed.runtime.worker.RECORD_FD)
RECORD_FD = 3
#: glibc keeps 32 and 33 for itself; everything else that can be caught is ours to pass on
CATCHABLE = frozenset(
    s for s in range(1, signal.NSIG) if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33)
)
#: held blocked in a new worker until its handlers are in place (a SIGHUP would kill it)
WORKER_HELD = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
STATUS_EVERY = 10.0
LOSS_EVERY = 1.0
#: workers started anew during shutdown when one dies with records still to hand over
FINISH_RESTARTS = 3
#: a worker that ran this long before dying restarts after the minimum backoff again
GOOD_RUN = 10.0

#: what a core keeps for itself at the end of the platform's grace
SHUTDOWN_MARGIN = 0.5

Metrics = Callable[[], Mapping[str, int | float]]
Totals = Callable[[], Mapping[str, int]]
#: a wait report that is not the worker's, during :meth:`Supervisor.finish` (pid, status)
OnReport = Callable[[int, int], None]


def drain_budget(flush: float, grace: float, term_at: float | None, now: float) -> float:
    """How long the worker may drain: ``shutdown.flush`` (at most half the grace); after
    a SIGTERM at ``term_at``, what is left of the grace less :data:`SHUTDOWN_MARGIN`."""
    budget = min(flush, grace / 2)
    if term_at is not None:
        budget = max(budget, term_at + grace - SHUTDOWN_MARGIN - now)
    return budget


#: outbox bytes after which a long burst of tracee stops is handed over without waiting
OUTBOX_FLUSH_AT = 1 << 16


def wait_reports(tracer: Any, outbox: Outbox) -> Iterator[tuple[int, int]]:
    """Every pending ``waitpid(-1, WNOHANG | __WALL)`` report, tracee stops handled by
    ``tracer`` (a :class:`~lw_embed.sources.tracer.Tracer` or None) and not yielded; the
    rest — exits of tracees and of other children — yielded as ``(pid, status)``."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG | pt.WALL)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if os.WIFSTOPPED(status):
            if tracer is not None:
                tracer.on_stop(pid, status)
                if outbox.pending > OUTBOX_FLUSH_AT:
                    outbox.flush()  # a long burst of stops: do not wait for its end
            continue
        yield pid, status


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


class Supervisor:
    """The worker of one core and the pipe that feeds it.

    ``spec`` holds the launch-JSON items that differ by core (``mode``, ``scope``, and
    for the sidecar ``roots``/``exclude``); ``metrics`` and ``losses`` give the core's own
    additions to the ``STATUS`` and ``LOSS`` records.
    """

    def __init__(self, cfg: Config, env: Mapping[str, str], *, config_path: str | None,
                 instance_id: str, spec: Mapping[str, Any],
                 metrics: Metrics = dict, losses: Totals = dict) -> None:  # fmt: skip
        self.cfg = cfg
        self.env = env
        self.config_path = config_path
        self.instance_id = instance_id  # "" = the worker keeps one per spool
        self.spec = dict(spec)
        self._metrics = metrics
        self._losses = losses
        self.worker_pid = 0
        self.worker_started = 0.0
        self.worker_restart_at: float | None = None
        self.worker_backoff = cfg.worker.restart_backoff_min
        self.worker_restarts = 0
        self.worker_status: int | None = None  # wait status of the last worker that ended
        self.errors: dict[str, int] = {}
        self._last_loss: dict[str, int] = {}
        self._next_status = 0.0
        self._next_loss = 0.0
        self._on_report: OnReport | None = None
        r, w = os.pipe2(os.O_CLOEXEC)
        if r == RECORD_FD:  # dup2 onto itself would keep CLOEXEC on some libcs
            r, old = os.dup(r), r
            os.close(old)
        self.pipe_r = r
        self.outbox = Outbox(w, cfg.tracer.buffer_bytes)

    # -- the worker -------------------------------------------------------------------------
    def start_worker(self) -> None:
        self._last_loss = {}  # a new worker knows none of the core's totals: send them again
        payload = {
            "config": config_to_dict(self.cfg),
            "config_path": self.config_path,
            "core_pid": os.getpid(),
            "instance_id": self.instance_id,
            "version": __version__,
            **self.spec,
        }
        env = {k: v for k, v in self.env.items() if not k.startswith("_LW_EMBED_")}
        env["_LW_EMBED_WORKER"] = json.dumps(payload)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, self.pipe_r, RECORD_FD),
        ]
        try:
            self.worker_pid = os.posix_spawn(
                sys.executable,
                # -P: never import from the working directory (we run as root)
                [sys.executable, "-P", "-m", "lw_embed.runtime.worker"],
                env,
                file_actions=actions,
                setsigmask=WORKER_HELD,  # until it has handlers (it unblocks them)
                setsigdef=CATCHABLE,
            )
            self.worker_started = time.monotonic()
        except OSError as exc:
            log.warning("cannot start the worker: %s", exc)
            self.worker_pid = 0
            self.schedule_restart()

    def schedule_restart(self) -> None:
        now = time.monotonic()
        if now - self.worker_started > GOOD_RUN:
            self.worker_backoff = self.cfg.worker.restart_backoff_min
        self.worker_restart_at = now + self.worker_backoff
        self.worker_backoff = min(self.worker_backoff * 2, self.cfg.worker.restart_backoff_max)

    def worker_ended(self, status: int, quiet: bool = False) -> None:
        """The wait loop reaped the worker (``status``): restart it after the backoff."""
        self.worker_pid = 0
        self.worker_status = status
        if not quiet:
            log.warning("worker ended (%s); restarting", describe_status(status))
        self.worker_restarts += 1
        self.schedule_restart()

    def signal_worker(self, sig: int) -> None:
        if self.worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pid, sig)

    # -- the loop's share ----------------------------------------------------------------
    def start_clock(self) -> None:
        """The first STATUS record is due STATUS_EVERY from now."""
        self._next_status = time.monotonic() + STATUS_EVERY

    def timeouts(self, now: float) -> list[float]:
        """What the core's wait must not sleep past (seconds from ``now``)."""
        t = [self._next_status - now, 1.0]
        if self.outbox.pending:
            t.append(0.02)
        if self.worker_restart_at is not None:
            t.append(self.worker_restart_at - now)
        return t

    def tick(self, now: float) -> None:
        """Restart a worker when due, send STATUS/LOSS when due, flush the outbox."""
        restart = self.worker_restart_at
        if self.worker_pid == 0 and restart is not None and now >= restart:
            self.worker_restart_at = None
            self.start_worker()
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            self.send_status()
        if now >= self._next_loss:
            self._next_loss = now + LOSS_EVERY
            self.send_loss()
        self.outbox.flush()

    # -- records --------------------------------------------------------------------------
    def loss_totals(self) -> dict[str, int]:
        totals = dict(self.errors)
        if self.outbox.drops:
            totals["core.buffer_full"] = self.outbox.drops
        totals.update(self._losses())
        return totals

    def send_loss(self) -> None:
        totals = self.loss_totals()
        if totals != self._last_loss:
            self._last_loss = totals
            self.outbox.put(frame(R.LOSS, time.time_ns(), totals))

    def send_status(self) -> None:
        m: dict[str, int | float] = {
            "buffer_bytes": self.outbox.pending,
            "records_bytes_written": self.outbox.written,
            "worker_restarts": self.worker_restarts,
        }
        m.update(self._metrics())
        self.outbox.put(frame(R.STATUS, time.time_ns(), m))

    # -- the end --------------------------------------------------------------------------
    def finish(self, reason: str, budget: float, on_report: OnReport | None = None) -> None:
        """Hand the worker what is buffered, let it drain, and never wait past ``budget``
        seconds (at least 0.2): a worker still there then is SIGKILLed. Wait reports
        that are not the worker's go to ``on_report`` (the sidecar's tracees that stop
        only now: they must be detached, never left stopped)."""
        self._on_report = on_report
        end = time.monotonic() + max(budget, 0.2)
        self.send_status()
        self.send_loss()
        self.outbox.put(frame(R.SHUTDOWN, time.time_ns(), reason, budget - 0.1))
        closed = False
        restarts = 0
        while time.monotonic() < end:
            if not self.worker_pid:
                left = self.outbox.pending + self.pipe_unread()
                if self.worker_status == 0 or not left:
                    break  # it drained and exited, or died with nothing left to hand over
                if restarts == FINISH_RESTARTS:
                    break
                restarts += 1  # died while records wait: a new one takes what is left
                self.start_worker()
                if not self.worker_pid:
                    break
            if not closed and self.outbox.flush():
                self.outbox.close()  # EOF tells the worker everything was handed over
                closed = True
            self.wait_worker(min(0.02, max(0.0, end - time.monotonic())))
        if self.worker_pid:
            log.warning("worker did not finish within %.1fs; killing it", budget)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.worker_pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.worker_pid, 0)
        lost = self.outbox.pending + self.pipe_unread()
        if lost:
            log.warning("%d bytes of records could not be handed to a worker before exit", lost)
        if not closed:
            self.outbox.close()
        os.close(self.pipe_r)

    def wait_worker(self, timeout: float) -> None:
        signal.sigtimedwait({signal.SIGCHLD}, timeout)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | pt.WALL)
            except ChildProcessError:
                self.worker_pid = 0
                return
            if pid == 0:
                return
            if pid == self.worker_pid:
                self.worker_pid = 0
                self.worker_status = status
            elif self._on_report is not None:
                self._on_report(pid, status)

    def pipe_unread(self) -> int:
        """Bytes written to the record pipe that no worker has read yet."""
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.pipe_r, termios.FIONREAD, buf)
        except OSError:
            return 0
        return buf[0]
