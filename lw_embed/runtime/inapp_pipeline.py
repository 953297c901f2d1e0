"""The pipeline as the in-app agent runs it (imported in the agent's thread, not the host's).

Interface: :class:`lw_embed.runtime.pipeline.Pipeline` with no record pipe; the host is
reported once from ``/proc/<host>/stat`` at start, with an ``agent.capabilities`` event
of its own and an ``agent.status`` every :data:`STATUS_EVERY` (no core sends them).

Capability: none beyond the pipeline's. Cost: one /proc read at start, one status event
per 10 s. Failure modes: a host that cannot be read from /proc is simply not reported
(its children still are).
"""

from __future__ import annotations

import contextlib

from lw_embed.events import AgentCapabilities, AgentStatus
from lw_embed.kernel import procfs
from lw_embed.runtime.pipeline import Pipeline

STATUS_EVERY = 10.0


class InAppPipeline(Pipeline):
    """The pipeline in the host: the host reported once from /proc, a capability report
    and status events of its own (no core sends them)."""

    _next_status = 0.0

    def _start_shipper(self) -> None:
        super()._start_shipper()
        t = self.wall()
        host = self.spec.core_pid
        with contextlib.suppress(OSError, ValueError, IndexError):
            info = self.reconciler.read_info(procfs.read_stat(host))
            if info is not None:
                self._emit(self.table.observe_procfs(info, t))
        report = {"mode": "in-app", "pid": host, "version": self.spec.version,
                  "techniques": {"processes": "procfs"},
                  "reasons": {"processes": "in-app: the host's children from /proc "
                                           f"(scope {self.spec.scope})"}}  # fmt: skip
        self._emit(AgentCapabilities(time=t, report=self._with_sources(report)))
        self._next_status = self.mono() + STATUS_EVERY

    def _tick(self) -> None:
        super()._tick()
        if self.mono() >= self._next_status:
            self._next_status = self.mono() + STATUS_EVERY
            self._emit(AgentStatus(time=self.wall(), metrics=self.metrics()))
