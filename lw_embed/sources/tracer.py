"""The process tracer: handles every ptrace stop of the workload tree and resumes it.

Interface: ``PTRACE_SEIZE`` with ``TRACEFORK|TRACEVFORK|TRACECLONE|TRACEEXEC|EXITKILL``
(+ ``TRACESECCOMP`` when a seccomp filter is installed), ``waitpid(-1, __WALL)`` reports
(owned by :mod:`lw_embed.runtime.init`), ``PTRACE_GETEVENTMSG``,
``PTRACE_GET_SYSCALL_INFO``, ``process_vm_readv`` and ``/proc/<pid>`` reads while the
tracee is stopped.

Capability: ``CAP_SYS_PTRACE`` or being the workload's parent.

Cost: only these stops happen: one per fork/vfork/clone (parent) plus the child's
initial stop, one per execve, one per signal delivered to a tracee, one per
group-stop, and one seccomp stop per traced syscall (``connect``, ``bind``, ``listen`` by
default). Untraced syscalls run at native speed. Each stop is a handful of syscalls and no
allocation beyond the record; nothing here blocks (records go to the non-blocking outbox).

Failure modes: a handler that raises is counted (``core.handler_error``) and the tracee
is resumed anyway (``finally``); a tracee that vanished mid-stop (``ESRCH``) is left to
its exit report. Threads are told from processes by ``/proc/<tgid>/task/<tid>``; an
execve from a non-leader thread is reported with the former tid, which we forget.
Job-control stops are resumed with ``PTRACE_LISTEN``, so SIGSTOP/SIGTSTP/SIGCONT behave
as without a tracer.

Attaching (the sidecar): :meth:`Tracer.attach` seizes every thread of a running
process, re-listing ``/proc/<pid>/task`` until no new thread shows up (as ``strace -p``
does), with ``ptrace_options(False, exitkill=False)``: a tracer that dies leaves its
tracees running. :meth:`Tracer.begin_detach` sends ``PTRACE_INTERRUPT`` to every task;
each next stop is handled as usual but ends in ``PTRACE_DETACH`` (the signal of a
signal-delivery-stop re-injected, a group-stop left as the kernel keeps it) instead of
a resume.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from lw_embed.kernel import procfs, seccomp
from lw_embed.kernel import ptrace as pt
from lw_embed.records import R, frame
from lw_embed.sources import filetrace

Emit = Callable[[bytes], None]

_GROUP_STOP_SIGNALS = frozenset(
    {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
)
_FORK_EVENTS = frozenset({pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE})

#: RET_DATA tags of the seccomp rules, read back at the seccomp stop.
TAG_CONNECT = 1
TAG_BIND = 2
TAG_LISTEN = 3
_I386_SOCKETCALL = frozenset(seccomp.syscall_numbers(seccomp.AUDIT_ARCH_I386, "socketcall"))


@dataclass(frozen=True, slots=True)
class TracerOptions:
    argv_max_bytes: int
    argv_max_args: int
    trace_connect: bool
    #: names of handlers that raise on purpose (fault-injection tests only)
    faults: frozenset[str] = frozenset()
    #: file monitoring's roots (lw_embed.sources.filetrace); () = file syscalls untraced
    file_roots: tuple[str, ...] = ()
    #: (symlinked root, its real path) pairs, rewritten before the roots test
    file_aliases: tuple[tuple[str, str], ...] = ()


def seccomp_rules(opts: TracerOptions) -> list[seccomp.Rule]:
    """The syscalls the filter sends to the tracer for these options."""
    rules = []
    if opts.trace_connect:
        rules.append(seccomp.Rule("connect", TAG_CONNECT))
        rules += socket_rules()
    if opts.file_roots:
        rules += filetrace.file_rules()
    return rules


def socket_rules() -> list[seccomp.Rule]:
    """bind and listen (rare calls: one stop each), so an inbound flow is attributed to
    the process that made the listener (docs/network.md "Attribution")."""
    return [seccomp.Rule("bind", TAG_BIND), seccomp.Rule("listen", TAG_LISTEN)]


def ptrace_options(with_seccomp: bool, exitkill: bool = True) -> int:
    o = (
        pt.PTRACE_O_TRACEFORK
        | pt.PTRACE_O_TRACEVFORK
        | pt.PTRACE_O_TRACECLONE
        | pt.PTRACE_O_TRACEEXEC
    )
    if exitkill:
        o |= pt.PTRACE_O_EXITKILL
    return o | pt.PTRACE_O_TRACESECCOMP if with_seccomp else o


class InjectedFault(RuntimeError):
    """Raised by a handler named in TracerOptions.faults."""


def parse_sockaddr(raw: bytes) -> tuple[str, str, int]:
    """(family, address, port) of a struct sockaddr; truncated input gives what it can."""
    if len(raw) < 2:
        return "unknown", "", 0
    fam = struct.unpack_from("=H", raw)[0]
    if fam == 2 and len(raw) >= 8:
        port = struct.unpack_from(">H", raw, 2)[0]
        return "inet", ".".join(str(b) for b in raw[4:8]), port
    if fam == 10 and len(raw) >= 24:
        port = struct.unpack_from(">H", raw, 2)[0]
        return "inet6", str(ipaddress.IPv6Address(raw[8:24])), port
    if fam == 1:
        path = raw[2:]
        if path[:1] == b"\0":
            name = "@" + path[1:].rstrip(b"\0").decode("utf-8", "backslashreplace")
        else:
            name = path.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
        return "unix", name, 0
    return str(fam), "", 0


class Tracer:
    """State of the traced tree: tid -> tgid, and the stop handlers."""

    def __init__(self, emit: Emit, opts: TracerOptions) -> None:
        self._emit = emit
        self._opts = opts
        self.tasks: dict[int, int] = {}  # tid -> tgid
        self.stops = 0
        self.stops_by: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        #: called with (tid, signal) when a tracee enters a job-control stop
        self.on_group_stop: Callable[[int, int], None] | None = None
        #: after begin_detach(): every stop ends in PTRACE_DETACH instead of a resume
        self.detaching = False
        self.detached = 0
        self._interrupted: set[int] = set()

    # -- bookkeeping -------------------------------------------------------------------
    def add_root(self, pid: int) -> None:
        self.tasks[pid] = pid

    @property
    def process_count(self) -> int:
        return sum(1 for tid, tgid in self.tasks.items() if tid == tgid)

    def _count(self, what: str) -> None:
        self.stops_by[what] = self.stops_by.get(what, 0) + 1

    def _fault(self, name: str) -> None:
        if name in self._opts.faults:
            raise InjectedFault(name)

    # -- entry points from the wait loop ------------------------------------------------
    def on_stop(self, tid: int, status: int) -> None:
        """Handle one WIFSTOPPED report of a tracee and always resume it."""
        self.stops += 1
        sig = os.WSTOPSIG(status)
        event = status >> 16
        resume_sig = 0
        listen = False
        try:
            if tid not in self.tasks:
                self._adopt(tid)
            if event == 0:
                # signal-delivery-stop: deliver the signal unchanged
                self._count("signal")
                resume_sig = sig
            elif event == pt.PTRACE_EVENT_STOP:
                if sig in _GROUP_STOP_SIGNALS:
                    self._count("group_stop")
                    listen = True
                    if self.on_group_stop is not None:
                        self.on_group_stop(tid, sig)
                else:
                    self._count("event_stop")
            elif event == pt.PTRACE_EVENT_EXEC:
                self._count("exec")
                self._on_exec(tid)
            elif event in _FORK_EVENTS:
                self._count("fork")
                self._on_fork(tid, event)
            elif event == pt.PTRACE_EVENT_SECCOMP:
                self._count("seccomp")
                self._on_seccomp(tid)
            else:
                self._count("other")
        except pt.PtraceFailed as exc:
            if exc.errno != errno.ESRCH:
                self.errors["core.ptrace_error"] = self.errors.get("core.ptrace_error", 0) + 1
        except Exception:
            self.errors["core.handler_error"] = self.errors.get("core.handler_error", 0) + 1
        finally:
            try:
                if self.detaching:
                    self._detach(tid, resume_sig)
                elif listen:
                    pt.listen(tid)
                else:
                    pt.cont(tid, resume_sig)
            except pt.PtraceFailed:
                pass  # gone (ESRCH); its exit report follows

    def on_exit(self, tid: int, status: int) -> bool:
        """A traced task ended. Returns False if ``tid`` was not traced."""
        tgid = self.tasks.pop(tid, None)
        if tgid is None:
            return False
        if tid == tgid:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            core = bool(os.WCOREDUMP(status)) if sig is not None else False
            self._emit(frame(R.EXIT, time.time_ns(), tid, code, sig, core))
        return True

    # -- attach and detach (the sidecar) -----------------------------------------------
    def attach(self, pid: int, options: int, proc: str = procfs.PROC) -> int:
        """``PTRACE_SEIZE`` every thread of the running process ``pid``; the number of
        threads newly seized. Threads are listed again until a pass finds none new (a
        thread cloned by one not yet seized would be missed otherwise). Raises
        PtraceFailed when not even one thread could be seized (EPERM: no
        CAP_SYS_PTRACE, or traced by someone else; ESRCH: gone)."""
        seized = 0
        first_error: pt.PtraceFailed | None = None
        for _ in range(16):  # bounded: a process cloning threads without end
            try:
                tids = [int(n) for n in os.listdir(f"{proc}/{pid}/task") if n.isdigit()]
            except OSError:
                break  # gone
            new = [t for t in tids if t not in self.tasks]
            if not new:
                break
            progress = False
            for tid in sorted(new):
                try:
                    pt.seize(tid, options)
                except pt.PtraceFailed as exc:
                    if first_error is None:
                        first_error = exc
                    continue
                self.tasks[tid] = pid
                seized += 1
                progress = True
            if not progress:
                break
        if not seized and first_error is not None:
            raise first_error
        if not seized and pid not in self.tasks:
            raise pt.PtraceFailed(errno.ESRCH, os.strerror(errno.ESRCH))
        return seized

    def begin_detach(self) -> int:
        """Start letting go of every task; call :meth:`detach_step` again after each
        batch of stops. Returns the number of tasks still attached."""
        self.detaching = True
        return self.detach_step()

    def detach_step(self) -> int:
        """``PTRACE_INTERRUPT`` the tasks not yet interrupted (new children included);
        a task the kernel no longer counts as ours is forgotten. Tasks still attached."""
        for tid in [t for t in self.tasks if t not in self._interrupted]:
            self._interrupted.add(tid)
            try:
                pt.interrupt(tid)
            except pt.PtraceFailed:
                self.tasks.pop(tid, None)  # not our tracee any more (detached or reaped)
        return len(self.tasks)

    def _detach(self, tid: int, sig: int) -> None:
        self.tasks.pop(tid, None)
        pt.detach(tid, sig)
        self.detached += 1

    # -- handlers -----------------------------------------------------------------------
    def _adopt(self, tid: int) -> None:
        """First stop of a task we have not heard of: a new child whose parent's fork
        event has not been handled yet."""
        try:
            tgid = procfs.read_tgid(tid)
        except OSError:
            tgid = tid
        self.tasks[tid] = tgid
        if tgid == tid:
            self._announce_child(tid)

    def _announce_child(self, pid: int) -> None:
        try:
            st = procfs.read_stat(pid)
        except OSError:
            return
        self._emit(frame(R.FORK, time.time_ns(), st.ppid, pid, st.start_ticks))

    def _on_fork(self, tid: int, event: int) -> None:
        self._fault("fork")
        new = pt.geteventmsg(tid)
        if new in self.tasks:
            return  # its own first stop came first and announced it
        parent = self.tasks.get(tid, tid)
        if event == pt.PTRACE_EVENT_CLONE and os.path.exists(f"/proc/{parent}/task/{new}"):
            self.tasks[new] = parent  # a thread
            return
        self.tasks[new] = new
        self._announce_child(new)

    def _on_exec(self, pid: int) -> None:
        former = pt.geteventmsg(pid)
        if former != pid:
            self.tasks.pop(former, None)  # exec from a non-leader thread took the tgid
        self.tasks[pid] = pid
        self._fault("exec")
        opts = self._opts
        st = procfs.read_stat(pid)
        argv, truncated = procfs.read_cmdline(pid, opts.argv_max_bytes, opts.argv_max_args)
        try:
            exe = procfs.read_exe(pid)
        except OSError:
            exe = ""
        try:
            cwd = procfs.read_cwd(pid)
        except OSError:
            cwd = ""
        uid, gid, euid = procfs.read_ids(pid)
        self._emit(
            frame(
                R.EXEC, time.time_ns(), pid, st.ppid, st.start_ticks, exe, argv, truncated,
                cwd, uid, gid, euid, former,
            )
        )  # fmt: skip

    def _on_seccomp(self, tid: int) -> None:
        self._fault("seccomp")
        _op, arch, nr, args, tag = pt.get_syscall_info(tid)
        data = tag & seccomp.SECCOMP_RET_DATA
        if data != TAG_CONNECT:
            if data in (TAG_BIND, TAG_LISTEN):
                self._on_bind_listen(tid, arch, nr, args, data)
            elif filetrace.is_file_tag(data):
                filetrace.on_stop(self._emit, self.tasks.get(tid, tid), tid, args, data,
                                  self._opts.file_roots, time.time_ns(),
                                  self._opts.file_aliases)  # fmt: skip
            return
        fd, addr, alen = args[0], args[1], args[2]
        if arch == seccomp.AUDIT_ARCH_I386 and nr in _I386_SOCKETCALL:
            raw = pt.read_memory(tid, args[1], 12)
            if len(raw) < 12:
                return
            fd, addr, alen = struct.unpack("<III", raw)
        raw = pt.read_memory(tid, addr, min(alen, 112)) if addr and alen else b""
        family, address, port = parse_sockaddr(raw)
        tgid = self.tasks.get(tid, tid)
        self._emit(frame(R.CONNECT, time.time_ns(), tgid, tid, fd, family, address, port))

    def _on_bind_listen(self, tid: int, arch: int, nr: int, args: tuple[int, ...],
                        tag: int) -> None:
        """bind (pid, fd, sockaddr) or listen (pid, fd, backlog), at syscall entry."""
        fd, a1, a2 = args[0], args[1], args[2]
        if arch == seccomp.AUDIT_ARCH_I386 and nr in _I386_SOCKETCALL:
            raw = pt.read_memory(tid, args[1], 12)  # unsigned long args[3] (listen: 2)
            if len(raw) < 8:
                return
            fd, a1, a2 = struct.unpack("<III", raw.ljust(12, b"\0"))
        tgid = self.tasks.get(tid, tid)
        if tag == TAG_LISTEN:
            backlog = struct.unpack("<i", struct.pack("<I", a1 & 0xFFFFFFFF))[0]
            self._emit(frame(R.LISTEN, time.time_ns(), tgid, tid, fd, backlog))
            return
        raw = pt.read_memory(tid, a1, min(a2, 112)) if a1 and a2 else b""
        family, address, port = parse_sockaddr(raw)
        self._emit(frame(R.BIND, time.time_ns(), tgid, tid, fd, family, address, port))

    def metrics(self) -> dict[str, int]:
        m = {"stops": self.stops, "tracees": len(self.tasks), "processes": self.process_count}
        m.update({f"stops.{k}": v for k, v in self.stops_by.items()})
        return m
