"""The seam between the worker's loop and the sources that run inside it.

Interface: a source is any object with the :class:`WorkerSource` methods. The worker
selects on every source's :meth:`~WorkerSource.fileno` (when it has one) beside the record
pipe, calls :meth:`~WorkerSource.poll` when that fd is readable or when
:meth:`~WorkerSource.next_due` has come, and shows every decoded core record to
:meth:`~WorkerSource.observe` after the process table has applied it (so a source can look
up the exec_id of a pid, or use a traced ``connect``). What a source returns goes through
the same filter, aggregation and spool as process events.

Sources are listed by name in :data:`FACTORIES` as ``"module:function"`` and imported
lazily: a source whose import or construction fails is reported in
``agent.capabilities`` (technique ``none`` with the error as the reason) and counted,
never a worker that does not start. A factory returns ``None`` when its source is off in
the config.

Capability: none here; each source states its own.

Cost: one ``select`` slot per source with an fd and one comparison per loop per source
for ``next_due``.

Failure modes: an exception from ``poll`` or ``observe`` is counted under
``<name>.error`` (the first one logged) and the source goes on being called; it never
stops the worker.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lw_embed.config import Config
from lw_embed.events import Event
from lw_embed.pipeline.enrich import ProcessTable

log = logging.getLogger("lw_embed.sources")


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source factory is given."""

    config: Config
    mode: str  # wrapper | sidecar | in-app
    scope: str  # tree | namespace | none (see lw_embed.sources.procfs)
    table: ProcessTable  # read it, never change it: the worker owns it
    proc: str  # the proc root (tests pass a fake tree)
    data_dir: str  # where a source may keep state (baselines, caches)
    core_pid: int
    wall: Callable[[], int]
    mono: Callable[[], float]
    #: the sources built before this one, by name (files asks packages for its owner index)
    peers: dict[str, Any] = field(default_factory=dict)


class WorkerSource(Protocol):
    """A source driven by the worker's loop."""

    name: str

    def fileno(self) -> int | None:
        """A readable fd to wait on, or None."""

    def next_due(self) -> float | None:
        """The monotonic time at which :meth:`poll` wants to run next, or None. A fixed
        time: "soon" is the last poll's time plus a delay, never ``mono() + delay``
        (recomputed at every look, that would never come due)."""

    def poll(self, now: float) -> Iterable[Event]:
        """Read what is ready and do what is due; never block."""

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        """One decoded core record (``[R.*, time, ...]``), after the process table."""

    def technique(self) -> tuple[str, str]:
        """(technique, reason) for ``agent.capabilities``."""

    def metrics(self) -> Mapping[str, int | float]:
        """Counters and gauges for ``agent.status`` (names prefixed with the source's)."""

    def losses(self) -> Mapping[str, int]:
        """Cumulative drops by reason (``<name>.<reason>``) for ``agent.loss``."""

    def close(self) -> Iterable[Event]:
        """Release fds, save state and return the last events (open flows, coalesced
        changes); called once at the worker's end."""


Factory = Callable[[SourceContext], WorkerSource | None]

#: name -> "module:function"; the function takes a SourceContext
FACTORIES: dict[str, str] = {
    "packages": "lw_embed.sources.packages:make",
    "audit": "lw_embed.sources.audit:factory",
    "network": "lw_embed.sources.packets:make",
    "files": "lw_embed.sources.files:factory",
}


@dataclass(slots=True)
class Failed:
    """A source that could not be built: only its reason remains."""

    name: str
    reason: str


def seccomp_traced(cfg: Config, mode: str) -> bool:
    """Whether this mode's workload runs under the core's seccomp filter, so that the
    syscalls a source asked for arrive as records (wrapper mode, filter and tracer on)."""
    tc = cfg.tracer
    return mode == "wrapper" and tc.seccomp != "off" and tc.mode != "procfs"


def build(ctx: SourceContext, factories: Mapping[str, str] | None = None,
          ) -> tuple[list[WorkerSource], list[Failed]]:  # fmt: skip
    """Build every listed source (default: :data:`FACTORIES`); the ones that fail are
    returned apart, with why."""
    built: list[WorkerSource] = []
    failed: list[Failed] = []
    for name, target in (FACTORIES if factories is None else factories).items():
        module, _, func = target.partition(":")
        try:
            factory: Factory = getattr(importlib.import_module(module), func)
            src = factory(ctx)
        except Exception as exc:  # a broken source must not stop the worker
            log.warning("source %s unavailable: %s", name, exc)
            failed.append(Failed(name, f"{type(exc).__name__}: {exc}"))
            continue
        if src is not None:
            built.append(src)
            ctx.peers[name] = src
    return built, failed
