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


@dataclass(frozen=True, slots=True)
class PackageInventory:
    """One part of a package inventory snapshot (parts share ``snapshot_id``)."""

    kind: ClassVar[str] = "package.inventory"
    time: int
    snapshot_id: str
    part: int
    parts: int
    root: str
    packages: tuple[Mapping[str, Any], ...]
    totals: Mapping[str, int]
    unsupported: tuple[Mapping[str, str], ...] = ()
    errors: tuple[str, ...] = ()  # the first inventory errors (part 0 only)

    def to_wire(self) -> dict[str, Any]:
        return {
            **({"errors": list(self.errors)} if self.errors else {}),
            "kind": self.kind, "packages": sorted_value(self.packages), "part": self.part,
            "parts": self.parts, "root": self.root, "snapshot_id": self.snapshot_id,
            "time": self.time, "totals": sorted_value(self.totals),
            "unsupported": sorted_value(self.unsupported),
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class PackageActive:
    """A package became active: a file it owns was executed, mapped, opened or imported."""

    kind: ClassVar[str] = "package.active"
    time: int
    ecosystem: str
    name: str
    version: str
    evidence: str
    path: str
    pid: int | None
    exec_id: str | None
    root: bool
    deleted: bool = False
    arch: str | None = None
    location: str | None = None  # the database (file or directory) the package is from

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "arch": self.arch, "deleted": self.deleted, "ecosystem": self.ecosystem,
            "evidence": self.evidence, "exec_id": self.exec_id, "kind": self.kind,
            "location": self.location, "name": self.name, "path": self.path,
            "pid": self.pid, "root": self.root, "time": self.time, "version": self.version,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class PackageChange:
    """A package was installed, removed or upgraded while the agent ran."""

    kind: ClassVar[str] = "package.change"
    time: int
    action: str  # installed | removed | upgraded
    ecosystem: str
    name: str
    source: str
    old_version: str | None
    new_version: str | None
    managers: tuple[Mapping[str, Any], ...] = ()
    arch: str | None = None
    location: str | None = None  # the database (file or directory) the package is from

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "action": self.action, "arch": self.arch, "ecosystem": self.ecosystem,
            "kind": self.kind, "location": self.location,
            "managers": sorted_value(self.managers), "name": self.name,
            "new_version": self.new_version, "old_version": self.old_version,
            "source": self.source, "time": self.time,
        })  # fmt: skip


# --- in-app audit events (lw_embed.sources.audit, docs/inapp.md): the host's own calls ---


@dataclass(frozen=True, slots=True)
class ProcessSpawn:
    """The host process asked to run a program (subprocess.Popen, os.posix_spawn,
    os.system, os.exec*), as its audit hook saw the call (the child's own process.exec
    comes from /proc, when it lives long enough to be seen)."""

    kind: ClassVar[str] = "process.spawn"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    call: str
    exe: str
    argv: tuple[str, ...]
    truncated: bool
    cwd: str | None = None
    source: str = "audit"

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "argv": list(self.argv), "call": self.call, "cwd": self.cwd, "exe": self.exe,
            "exec_id": self.exec_id, "kind": self.kind, "pid": self.pid, "source": self.source,
            "tid": self.tid, "time": self.time, "truncated": self.truncated,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class NetBind:
    """A socket of the host process was bound to a local address (socket.bind)."""

    kind: ClassVar[str] = "net.bind"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    fd: int
    family: str
    address: str
    port: int

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "address": self.address, "exec_id": self.exec_id, "family": self.family,
            "fd": self.fd, "kind": self.kind, "pid": self.pid, "port": self.port,
            "tid": self.tid, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class FileWrite:
    """The host process opened a file for writing (open/os.open with a write flag)."""

    kind: ClassVar[str] = "file.write"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    path: str
    flags: int
    source: str = "audit"

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "exec_id": self.exec_id, "flags": self.flags, "kind": self.kind, "path": self.path,
            "pid": self.pid, "source": self.source, "tid": self.tid, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class FileRemove:
    """The host process removed a file or directory (os.remove/unlink/rmdir)."""

    kind: ClassVar[str] = "file.remove"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    path: str
    source: str = "audit"

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "exec_id": self.exec_id, "kind": self.kind, "path": self.path, "pid": self.pid,
            "source": self.source, "tid": self.tid, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class FileRename:
    """The host process renamed ``path`` to ``target`` (os.rename/os.replace)."""

    kind: ClassVar[str] = "file.rename"
    time: int
    exec_id: str | None
    pid: int
    tid: int
    path: str
    target: str
    source: str = "audit"

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "exec_id": self.exec_id, "kind": self.kind, "path": self.path, "pid": self.pid,
            "source": self.source, "target": self.target, "tid": self.tid, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class NetFlow:
    """A flow (bidirectional 5-tuple) from packets or /proc/net: counters are deltas since
    the previous record of the same ``flow_id`` (``flow_seq`` 0, 1, ...; ``seq`` is the
    spool's), ``final`` on the last one. docs/network.md has every field."""

    kind: ClassVar[str] = "net.flow"
    time: int
    flow_id: str
    flow_seq: int
    final: bool
    proto: str
    orig_addr: str
    orig_port: int
    resp_addr: str
    resp_port: int
    start: int
    end: int
    orig_pkts: int | None
    orig_bytes: int | None
    orig_ip_bytes: int | None
    resp_pkts: int | None
    resp_bytes: int | None
    resp_ip_bytes: int | None
    orig_flags: str | None
    resp_flags: str | None
    conn_state: str
    direction: str  # syn | listen | first_packet | procfs
    end_reason: str | None
    exec_id: str | None
    pid: int | None
    exe: str | None
    attribution: str  # syscall | inode | unknown
    peer_names: tuple[str, ...] | None
    source: str  # packets | procfs

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "attribution": self.attribution, "conn_state": self.conn_state,
            "direction": self.direction, "end": self.end, "end_reason": self.end_reason,
            "exe": self.exe, "exec_id": self.exec_id, "final": self.final,
            "flow_id": self.flow_id, "flow_seq": self.flow_seq, "kind": self.kind,
            "orig_addr": self.orig_addr,
            "orig_bytes": self.orig_bytes, "orig_flags": self.orig_flags,
            "orig_ip_bytes": self.orig_ip_bytes, "orig_pkts": self.orig_pkts,
            "orig_port": self.orig_port,
            "peer_names": list(self.peer_names) if self.peer_names else None,
            "pid": self.pid, "proto": self.proto, "resp_addr": self.resp_addr,
            "resp_bytes": self.resp_bytes, "resp_flags": self.resp_flags,
            "resp_ip_bytes": self.resp_ip_bytes, "resp_pkts": self.resp_pkts,
            "resp_port": self.resp_port, "source": self.source,
            "start": self.start, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class NetListen:
    """A listening TCP socket (or a bound UDP one) seen for the first time."""

    kind: ClassVar[str] = "net.listen"
    time: int
    proto: str
    address: str
    port: int
    exec_id: str | None
    pid: int | None
    exe: str | None
    attribution: str
    source: str  # syscall | procfs

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "address": self.address, "attribution": self.attribution, "exe": self.exe,
            "exec_id": self.exec_id, "kind": self.kind, "pid": self.pid, "port": self.port,
            "proto": self.proto, "source": self.source, "time": self.time,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class NetDns:
    """A DNS response seen on the wire: the question, the answers and who asked."""

    kind: ClassVar[str] = "net.dns"
    time: int
    query: str
    qtype: str
    rcode: str
    answers: tuple[tuple[str, str, str, int], ...]  # (name, type, data, ttl)
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    exec_id: str | None
    pid: int | None
    attribution: str

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "answers": [{"data": d, "name": n, "ttl": t, "type": ty}
                        for n, ty, d, t in self.answers],
            "attribution": self.attribution, "client_addr": self.client_addr,
            "client_port": self.client_port, "exec_id": self.exec_id, "kind": self.kind,
            "pid": self.pid, "qtype": self.qtype, "query": self.query, "rcode": self.rcode,
            "server_addr": self.server_addr, "server_port": self.server_port,
            "time": self.time,
        })  # fmt: skip


# --- file integrity monitoring (lw_embed.sources.files, docs/files.md) ---


@dataclass(frozen=True, slots=True)
class FileChange:
    """A monitored file or directory changed: what (inotify or a scan) and who (a traced
    syscall, a /proc fd heuristic, or nobody)."""

    kind: ClassVar[str] = "file.change"
    time: int
    path: str
    action: str  # create | modify | attrib | delete | rename | read
    rule: str
    detected_by: str  # inotify | scan
    count: int = 1
    old_path: str | None = None
    type: str | None = None  # file | dir | symlink | other
    inode: int | None = None
    mode: int | None = None
    owner_uid: int | None = None
    owner_gid: int | None = None
    size: int | None = None
    mtime: int | None = None
    hash: str | None = None
    hash_algorithm: str | None = None
    previous_hash: str | None = None
    hash_skipped: str | None = None  # secret | too_large | disabled | unreadable
    actions: tuple[str, ...] = ()
    first_seen: int | None = None
    last_seen: int | None = None
    attribution: str = "none"  # syscall | heuristic | none
    exec_id: str | None = None
    pid: int | None = None
    exe: str | None = None
    uid: int | None = None
    syscall: str | None = None
    package: str | None = None
    package_digest_mismatch: bool | None = None

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "action": self.action, "actions": list(self.actions) or None,
            "attribution": self.attribution, "count": self.count,
            "detected_by": self.detected_by, "exe": self.exe, "exec_id": self.exec_id,
            "first_seen": self.first_seen, "hash": self.hash,
            "hash_algorithm": self.hash_algorithm, "hash_skipped": self.hash_skipped,
            "inode": self.inode, "kind": self.kind, "last_seen": self.last_seen,
            "mode": self.mode, "mtime": self.mtime, "old_path": self.old_path,
            "owner_gid": self.owner_gid, "owner_uid": self.owner_uid,
            "package": self.package, "package_digest_mismatch": self.package_digest_mismatch,
            "path": self.path, "pid": self.pid, "previous_hash": self.previous_hash,
            "rule": self.rule, "size": self.size, "syscall": self.syscall, "time": self.time,
            "type": self.type, "uid": self.uid,
        })  # fmt: skip


@dataclass(frozen=True, slots=True)
class AgentDegraded:
    """A source lost (or may have lost) events, or cannot monitor something in real time:
    what was affected and what the agent does about it."""

    kind: ClassVar[str] = "agent.degraded"
    time: int
    source: str
    reason: str  # overflow | watch_failed | watch_budget | read_error | root_missing
    action: str  # rescan | periodic_scan | retry
    paths: tuple[str, ...] = ()
    count: int = 1
    detail: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return _without_none({
            "action": self.action, "count": self.count, "detail": self.detail,
            "kind": self.kind, "paths": list(self.paths), "reason": self.reason,
            "source": self.source, "time": self.time,
        })  # fmt: skip


#: Every event kind this module defines, by its dotted name.
KINDS: Mapping[str, type[Event]] = {
    cls.kind: cls
    for cls in (ProcessExec, ProcessExit, NetConnect, AgentCapabilities, AgentLoss, AgentStatus,
                AgentConfigRejected, PackageInventory, PackageActive, PackageChange,
                ProcessSpawn, NetBind, FileWrite, FileRemove, FileRename,
                NetFlow, NetListen, NetDns,
                FileChange, AgentDegraded)
}
