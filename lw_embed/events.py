"""The event model: one frozen, slotted dataclass per event kind.

Interface: pure Python, no kernel interface. The worker builds events from core records
(:mod:`lw_embed.records`) and its own sources; :meth:`to_wire` turns one into the plain
dict that :func:`lw_embed.codec.encode_batch` puts in a batch. docs/schema.md documents
every kind and field.

Capability: none.

Cost: ``to_wire`` builds one dict literal whose keys are written in sorted order, so
``cbor2.dumps`` output is deterministic without ``canonical=True`` (about 4x slower).
Fields that are ``None`` are omitted from the wire. The agent.* kinds sort their
(small, nested) payload recursively; they are emitted rarely.

Failure modes: none at run time; a wire change is caught by the golden-byte tests in
tests/unit/test_events.py. Every wire dict carries ``kind`` (str) and ``time`` (int ns
since the epoch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

Source = Literal["ptrace", "procfs"]


class Event(Protocol):
    """What the pipeline needs of an event: its kind, its time and its wire form."""

    kind: ClassVar[str]

    @property
    def time(self) -> int: ...

    def to_wire(self) -> dict[str, Any]: ...


def sorted_value(value: Any) -> Any:
    """``value`` with every mapping's keys in sorted order, recursively (tuples -> lists).

    Keys are sorted by their ``str()`` so mixed key types do not raise; the wire uses str
    keys only.
    """
    if isinstance(value, Mapping):
        return {k: sorted_value(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [sorted_value(v) for v in value]
    return value


def _without_none(wire: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in wire.items() if v is not None}


@dataclass(frozen=True, slots=True)
class Ancestor:
    """One entry of a process's ancestry (nearest parent first in ProcessExec)."""

    exec_id: str
    pid: int
    exe: str

    def to_wire(self) -> dict[str, Any]:
        return {"exe": self.exe, "exec_id": self.exec_id, "pid": self.pid}


@dataclass(frozen=True, slots=True)
class ProcessExec:
    """A process image started (execve), or was found running by the /proc snapshot."""

    kind: ClassVar[str] = "process.exec"
    time: int
    exec_id: str
    parent_exec_id: str | None
    pid: int
    ppid: int
    exe: str
    argv: tuple[str, ...]
    truncated: bool
    cwd: str
    uid: int
    gid: int
    euid: int
    start_time: int
    ancestors: tuple[Ancestor, ...]
    source: Source

    def to_wire(self) -> dict[str, Any]:
        return _without_none(
            {
                "ancestors": [a.to_wire() for a in self.ancestors],
                "argv": list(self.argv),
                "cwd": self.cwd,
                "euid": self.euid,
                "exe": self.exe,
                "exec_id": self.exec_id,
                "gid": self.gid,
                "kind": self.kind,
                "parent_exec_id": self.parent_exec_id,
                "pid": self.pid,
                "ppid": self.ppid,
                "source": self.source,
                "start_time": self.start_time,
                "time": self.time,
                "truncated": self.truncated,
                "uid": self.uid,
            }
        )


@dataclass(frozen=True, slots=True)
class ProcessExit:
    """A process ended: exit code or killing signal, and how long it ran."""

    kind: ClassVar[str] = "process.exit"
    time: int
    exec_id: str
    pid: int
    exit_code: int | None
    signal: int | None
    core_dumped: bool
    duration_ns: int | None
    source: Source

    def to_wire(self) -> dict[str, Any]:
        return _without_none(
            {
                "core_dumped": self.core_dumped,
                "duration_ns": self.duration_ns,
                "exec_id": self.exec_id,
                "exit_code": self.exit_code,
                "kind": self.kind,
                "pid": self.pid,
                "signal": self.signal,
                "source": self.source,
                "time": self.time,
            }
        )


@dataclass(frozen=True, slots=True)
class NetConnect:
    """A traced connect(2): who connected to which peer."""

    kind: ClassVar[str] = "net.connect"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    fd: int
    family: str
    address: str
    port: int

    def to_wire(self) -> dict[str, Any]:
        return _without_none(
            {
                "address": self.address,
                "exec_id": self.exec_id,
                "family": self.family,
                "fd": self.fd,
                "kind": self.kind,
                "pid": self.pid,
                "port": self.port,
                "tid": self.tid,
                "time": self.time,
            }
        )


@dataclass(frozen=True, slots=True)
class AgentCapabilities:
    """What the agent probed, which technique each source uses, and why."""

    kind: ClassVar[str] = "agent.capabilities"
    time: int
    report: Mapping[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "report": sorted_value(self.report), "time": self.time}


@dataclass(frozen=True, slots=True)
class AgentLoss:
    """Cumulative drops by reason, and how many events were accepted in total."""

    kind: ClassVar[str] = "agent.loss"
    time: int
    totals: Mapping[str, int]
    accepted: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "kind": self.kind,
            "time": self.time,
            "totals": sorted_value(self.totals),
        }


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """The agent's own counters and gauges (CPU, RSS, stops/s, queue depth, ...)."""

    kind: ClassVar[str] = "agent.status"
    time: int
    metrics: Mapping[str, int | float]

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "metrics": sorted_value(self.metrics), "time": self.time}


@dataclass(frozen=True, slots=True)
class AgentConfigRejected:
    """A hot reload of the rules failed: the old rules stay live."""

    kind: ClassVar[str] = "agent.config_rejected"
    time: int
    path: str
    error: str

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.error, "kind": self.kind, "path": self.path, "time": self.time}


#: Every event kind this module defines, by its dotted name.
KINDS: Mapping[str, type[Event]] = {
    cls.kind: cls
    for cls in (ProcessExec, ProcessExit, NetConnect, AgentCapabilities, AgentLoss, AgentStatus,
                AgentConfigRejected)
}
