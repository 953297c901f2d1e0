"""The in-app audit source: the host Python process's own spawns, sockets and file changes.

Interface: :func:`sys.addaudithook` (PEP 578), installed once per process (a hook cannot be
removed: while no agent runs it returns at once). The hook looks only at
``subprocess.Popen``, ``os.exec``, ``os.posix_spawn``, ``os.system``, ``socket.connect``,
``socket.bind``, ``open`` with a write flag, ``os.remove``, ``os.rmdir``, ``os.rename`` and
``import``; it ignores the agent's own threads (a set of thread idents), appends
``(event, args, time_ns, native tid)`` to a bounded :class:`collections.deque` and, when
the deque reaches :data:`WAKE_AT` calls, writes one byte to a non-blocking wake pipe. The
pipeline thread selects on that pipe and polls every :data:`POLL_EVERY` anyway (one GIL
hand-over per batch of calls, not per call); :meth:`AuditSource.poll` turns the tuples
into events:
``process.spawn``, ``net.connect``, ``net.bind``, ``file.write``, ``file.remove``,
``file.rename`` (docs/schema.md), all with the host's exec_id. ``import`` feeds no
event: the names and files of the modules imported are kept in :data:`STATE`
(``imported``) for the package source, which in in-app mode (``ctx.mode == "in-app"``)
may also read :func:`loaded_modules`.

Capability: none (a hook only sees its own process). Another hook may refuse
``sys.addaudithook`` (it raises the ``sys.addaudithook`` audit event): the source then
reports technique ``none``.

Cost: every audit event of the host pays one Python call and a set lookup (about 0.1 us,
see bench/audit_hook.py); a watched one a thread-ident lookup, a clock read and a deque
append (well under 2 us); the parsing runs in the agent's thread. There the identical
calls of one drain (:func:`coalesced_calls`: same call and arguments, only time and
thread differ; the kinds ``aggregate.keys`` groups, spawns never) become ONE event with
their ``count`` (:class:`Coalesced`, which the aggregator counts as ``count`` events), so
a request loop's repeats cost one dict lookup each, not a trip through the pipeline.

``os.exec`` is the one call the hook waits for: exec replaces the process (and the agent
thread) right after, so it asks the agent to spool and sync the queue and waits at most
:data:`EXEC_WAIT`; the event is shipped by the next agent on that data dir.

Failure modes: the hook never raises into the host (it catches every Exception; hostile
arguments are kept as they are and parsed later). A full deque drops the event, counted
as ``audit.queue_full``; arguments that do not parse are counted as ``audit.bad_args``.
Relative paths are reported as given (the cwd is not read per call). A subprocess that
spawns through ``os.posix_spawn`` raises both events: the second is folded into the
first. After ``os.fork()`` the child gets an empty deque and a new wake pipe
(:func:`reset_after_fork`), so nothing the parent queued is reported twice.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # imported by the agent thread (AuditSource), not by start()'s install
    from lw_embed.events import Event, NetBind, NetConnect, ProcessSpawn
    from lw_embed.sources.base import SourceContext

SPAWNS = frozenset({"subprocess.Popen", "os.exec", "os.posix_spawn", "os.system"})
SOCKETS = frozenset({"socket.connect", "socket.bind"})
FILES = frozenset({"open", "os.remove", "os.rmdir", "os.rename"})
WATCHED = SPAWNS | SOCKETS | FILES | {"import"}
#: ``open`` flags that make it a write
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: at most this many queued calls are turned into events per poll (the loop stays live)
POLL_BATCH = 4096
#: the agent thread drains the queue this often (seconds) ...
POLL_EVERY = 0.1
#: ... or as soon as this many calls are queued (the hook writes the wake byte then):
#: one GIL hand-over per batch of calls, not per call
WAKE_AT = 512
#: module names kept from ``import`` events
IMPORTS_MAX = 65536
#: ``os.exec*`` waits at most this long (seconds) for its event to be synced into the
#: spool: exec replaces the process, agent thread included, right after the hook returns
EXEC_WAIT = 0.05
_FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}

Call = tuple[str, tuple[Any, ...], int, int]
#: the kind each coalescable call becomes (spawns are never coalesced: they are rare, and
#: subprocess's posix_spawn is matched to its Popen call by call)
COALESCE_KINDS = {"open": "file.write", "os.remove": "file.remove", "os.rmdir": "file.remove",
                  "os.rename": "file.rename", "socket.connect": "net.connect",
                  "socket.bind": "net.bind"}  # fmt: skip


class Coalesced:
    """``count`` identical calls of one drain as one event: the last call's event plus
    ``aggregated``, ``count``, ``first_seen``/``last_seen`` (the aggregator takes it as
    ``count`` events, see lw_embed.pipeline.aggregate). One subclass per kind
    (:data:`_COALESCED`), so ``kind`` stays a class attribute as for every event."""

    kind: ClassVar[str] = ""
    __slots__ = ("count", "event", "first_seen", "time")

    def __init__(self, event: Event, count: int, first_seen: int) -> None:
        self.event, self.count, self.first_seen, self.time = event, count, first_seen, event.time

    def to_wire(self) -> dict[str, Any]:
        wire = self.event.to_wire()
        wire["aggregated"] = True
        wire["count"] = self.count
        wire["first_seen"] = self.first_seen
        wire["last_seen"] = self.time
        return dict(sorted(wire.items()))


_COALESCED: dict[str, type[Coalesced]] = {
    k: type(f"Coalesced_{k.replace('.', '_')}", (Coalesced,), {"kind": k, "__slots__": ()})
    for k in set(COALESCE_KINDS.values())
}


def coalesced_calls(keys: Mapping[str, Sequence[str]]) -> dict[str, bool]:
    """The calls whose repeats within one drain are folded into one :class:`Coalesced`
    (-> whether the thread is part of what makes a repeat): those whose kind the
    aggregator groups (``aggregate.keys``) on fields other than ``time``. A repeat is
    then the same call with the same arguments: it differs only in time (and thread),
    which is all the aggregator would fold anyway."""
    out = {}
    for call, kind in COALESCE_KINDS.items():
        fields = keys.get(kind)
        if fields is not None and "time" not in fields:
            out[call] = "tid" in fields
    return out


def _repeat_key(call: Call, with_tid: bool) -> tuple[Any, ...] | None:
    """What makes ``call`` a repeat of another (None: it is reported alone)."""
    event, args = call[0], call[1]
    if event == "open":
        key: tuple[Any, ...] = (event, args[0], args[2]) if type(args[0]) is str else ()
    elif event == "os.rename":
        key = (event, args[0], args[1]) if type(args[0]) is str and type(args[1]) is str else ()
    elif event in SOCKETS:
        sock, addr = args[0], args[1]
        if not isinstance(sock, socket.socket) or not isinstance(addr, tuple | str | bytes):
            return None
        key = (event, args[2], sock.family, addr)
        hash(key)
    else:  # os.remove, os.rmdir
        key = (event, args[0]) if type(args[0]) is str else ()
    if not key:
        return None
    return (*key, call[3]) if with_tid else key


class HookState:
    """What the hook reads: one per process (:data:`STATE`), swapped wholesale, never
    locked (each attribute read or write is atomic under the GIL)."""

    __slots__ = ("cap", "drops", "errors", "exec_flush", "files", "imported", "install_error",
                 "installed", "on", "own", "queue", "wake_at", "wake_r", "wake_w")  # fmt: skip

    def __init__(self) -> None:
        self.queue: collections.deque[Call] | None = None  # the running agent's (or last)
        self.on = False  # an agent is running: queue
        self.cap = 0
        self.wake_at = 1  # the queue length at which the hook wakes the agent thread
        self.files = True
        self.own: frozenset[int] | set[int] = frozenset()
        self.drops = itertools.count()  # next() is atomic; the value is read by _count
        self.errors = itertools.count()
        self.imported: dict[str, str] = {}
        self.wake_r = self.wake_w = -1
        self.installed = False
        self.install_error = ""
        #: the running agent's "into the spool and synced, within this many seconds"
        self.exec_flush: Callable[[float], bool] | None = None


STATE = HookState()


def _count(counter: itertools.count[int]) -> int:
    """How often ``next`` was called on ``counter`` (without calling it)."""
    return int(repr(counter)[6:-1])


def _make_hook(st: HookState) -> Any:
    watched, files_events, socket_events = WATCHED, FILES, SOCKETS
    fileno = socket.socket.fileno  # the C method: a subclass cannot override it here
    get_ident, native_id, now, write = (threading.get_ident, threading.get_native_id,
                                        time.time_ns, os.write)  # fmt: skip

    def lw_embed_audit_hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in watched:
            return
        try:
            q = st.queue
            if not st.on or q is None or get_ident() in st.own:
                return
            if event in files_events:
                if not st.files:
                    return
                if event == "open":
                    flags = args[2]
                    if type(flags) is not int or not flags & WRITE_FLAGS:
                        return
            elif event in socket_events:
                try:  # the fd now: the socket may be closed by the time it is parsed
                    fd = fileno(args[0])
                except Exception:
                    fd = -1
                args = (args[0], args[1], fd)
            elif event == "import":
                imported = st.imported
                if len(imported) < IMPORTS_MAX and type(args[0]) is str:
                    imported[args[0]] = args[1] if type(args[1]) is str else ""
                return
            if len(q) >= st.cap:
                next(st.drops)
                return
            q.append((event, args, now(), native_id()))
            if len(q) == st.wake_at:  # else the agent's timer (POLL_EVERY) comes for it
                with contextlib.suppress(OSError):  # full: a wake is pending anyway
                    write(st.wake_w, b"\0")
            if event == "os.exec" and (flush := st.exec_flush) is not None:
                flush(EXEC_WAIT)  # the agent thread spools and syncs it, or we go on
        except Exception:  # never into the host
            with contextlib.suppress(Exception):
                next(st.errors)

    return lw_embed_audit_hook


def install() -> bool:
    """Add the hook to this process (once); False (and why, in STATE) when refused."""
    st = STATE
    if st.installed:
        return True
    if st.wake_r < 0:
        st.wake_r, st.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        sys.addaudithook(_make_hook(st))
    except Exception as exc:  # another hook refused it
        st.install_error = f"sys.addaudithook refused: {type(exc).__name__}: {exc}"
        return False
    st.installed = True
    return True


def activate(cap: int, files: bool = True) -> None:
    """Start queueing (a fresh, empty deque of at most ``cap`` calls)."""
    STATE.cap, STATE.files = cap, files
    STATE.wake_at = max(1, min(WAKE_AT, cap // 2))
    STATE.queue = collections.deque()
    STATE.on = True


def deactivate() -> None:
    """Stop queueing (what is queued stays for the last poll)."""
    STATE.on = False


class _Own:
    """Kept in the thread's locals: when the thread ends, its ident (which a new thread of
    the host may get) stops being ignored."""

    __slots__ = ("ident",)

    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __del__(self) -> None:
        STATE.own = frozenset(STATE.own - {self.ident})


_locals = threading.local()


def own_thread(ident: int | None = None) -> None:
    """Ignore the calls of the calling thread (one of the agent's) while it lives."""
    ident = threading.get_ident() if ident is None else ident
    STATE.own = frozenset({*STATE.own, ident})
    if ident == threading.get_ident():
        _locals.own = _Own(ident)


def reset_after_fork() -> None:
    """In a forked child: no agent thread, nothing queued, a wake pipe of its own (the
    inherited one is the parent's; only this thread exists, so closing it is safe)."""
    st = STATE
    st.on, st.queue, st.exec_flush = False, None, None
    st.own = frozenset()
    st.drops, st.errors = itertools.count(), itertools.count()
    old = (st.wake_r, st.wake_w)
    if st.wake_r >= 0:
        st.wake_r, st.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    for fd in old:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def loaded_modules() -> dict[str, str]:
    """Every module loaded in this process now: name -> file ("" for built-ins)."""
    out: dict[str, str] = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        out[name] = f if isinstance(f, str) else ""
    return out


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return os.fsdecode(v)
    if isinstance(v, os.PathLike):
        return _text(os.fspath(v))
    raise TypeError(f"not a path: {type(v).__name__}")


class AuditSource:
    """Turns the hook's queued calls into events (in the pipeline's thread)."""

    name = "audit"

    def __init__(self, ctx: SourceContext, state: HookState = STATE) -> None:
        from lw_embed import events

        self._ev = events
        self.ctx = ctx
        self.st = state
        self.pid = ctx.core_pid
        self.argv_bytes = ctx.config.tracer.argv_max_bytes
        self.argv_args = ctx.config.tracer.argv_max_args
        self.queue = state.queue if state.queue is not None else collections.deque()
        self.events = self.bad_args = 0
        self._last_popen: tuple[int, tuple[str, ...]] | None = None
        self._coalesce = coalesced_calls(ctx.config.aggregate.keys)
        self.coalesced = 0  # calls folded into another of their drain
        self._next_poll = ctx.mono() + POLL_EVERY

    # -- WorkerSource ---------------------------------------------------------------------
    def fileno(self) -> int | None:
        return self.st.wake_r if self.st.wake_r >= 0 else None

    def next_due(self) -> float | None:
        if len(self.queue) > POLL_BATCH:
            return self.ctx.mono()  # more than one batch is waiting
        return self._next_poll

    def poll(self, now: float) -> Iterable[Event]:
        self._next_poll = now + POLL_EVERY
        with contextlib.suppress(OSError):
            while os.read(self.st.wake_r, 4096):  # first the wake, then the queue
                pass
        return list(self._drain())

    def observe(self, rec: Sequence[Any]) -> Iterable[Event]:
        return ()

    def technique(self) -> tuple[str, str]:
        if not self.st.installed:
            return "none", self.st.install_error or "the audit hook is not installed"
        return "audit-hook", "sys.addaudithook in the host process (its children from /proc)"

    def metrics(self) -> Mapping[str, int | float]:
        return {"audit.events": self.events, "audit.queued": len(self.queue),
                "audit.coalesced": self.coalesced,
                "audit.modules_imported": len(self.st.imported)}  # fmt: skip

    def losses(self) -> Mapping[str, int]:
        return {"audit.queue_full": _count(self.st.drops), "audit.bad_args": self.bad_args,
                "audit.hook_errors": _count(self.st.errors)}  # fmt: skip

    def close(self) -> Iterable[Event]:
        return list(self._drain(limit=None))

    # -- parsing --------------------------------------------------------------------------
    def _drain(self, limit: int | None = POLL_BATCH) -> Iterator[Event]:
        """At most ``limit`` queued calls as events, in the order of their first call;
        the repeats of a call (:func:`coalesced_calls`) folded into one :class:`Coalesced`
        with their count."""
        q = self.queue
        p = self.ctx.table.get(self.pid)
        eid = p.exec_id if p is not None else None
        coalesce = self._coalesce
        calls: list[Call] = []  # in order; a repeated call: its last one
        counts: list[int] = []
        firsts: list[int] = []
        at: dict[tuple[Any, ...], int] = {}  # repeat key -> index in calls
        n = 0
        while limit is None or n < limit:
            try:
                call = q.popleft()
            except IndexError:
                break
            n += 1
            with_tid = coalesce.get(call[0])
            key = None
            if with_tid is not None:
                try:
                    key = _repeat_key(call, with_tid)
                except Exception:  # odd arguments: reported (or counted) alone
                    key = None
            if key is not None:
                i = at.get(key)
                if i is not None:
                    calls[i] = call
                    counts[i] += 1
                    continue
                at[key] = len(calls)
            calls.append(call)
            counts.append(1)
            firsts.append(call[2])
        for call, c, first in zip(calls, counts, firsts, strict=True):
            try:
                ev = self._event(call, eid)
            except Exception:  # hostile or odd arguments (anyone may call sys.audit)
                self.bad_args += c
                continue
            if ev is None:
                continue
            self.events += c
            if c > 1:
                self.coalesced += c - 1
                yield _COALESCED[ev.kind](ev, c, first)
            else:
                yield ev

    def _event(self, call: Call, eid: str | None) -> Event | None:
        event, args, t, tid = call
        pid = self.pid
        if event in SOCKETS:
            sock, addr = args[0], args[1]
            fam = sock.family
            family = _FAMILIES.get(fam, str(int(fam)))
            address, port = _address(fam, addr)
            fd = args[2]
            ev = self._ev
            cls: type[NetConnect | NetBind] = (ev.NetConnect if event == "socket.connect"
                                                else ev.NetBind)  # fmt: skip
            return cls(time=t, exec_id=eid, pid=pid, tid=tid, fd=fd, family=family,
                       address=address, port=port)  # fmt: skip
        if event == "open":
            if isinstance(args[0], int):
                return None  # open(fd): no path
            return self._ev.FileWrite(time=t, exec_id=eid, pid=pid, tid=tid, path=_text(args[0]),
                             flags=int(args[2]))  # fmt: skip
        if event in ("os.remove", "os.rmdir"):
            return self._ev.FileRemove(time=t, exec_id=eid, pid=pid, tid=tid, path=_text(args[0]))
        if event == "os.rename":
            return self._ev.FileRename(time=t, exec_id=eid, pid=pid, tid=tid, path=_text(args[0]),
                              target=_text(args[1]))  # fmt: skip
        return self._spawn(event, args, t, tid, eid)

    def _spawn(self, event: str, args: tuple[Any, ...], t: int, tid: int,
               eid: str | None) -> ProcessSpawn | None:  # fmt: skip
        cwd: str | None = None
        raw: Sequence[Any]
        if event == "os.system":
            exe, raw = "/bin/sh", ["/bin/sh", "-c", args[0]]
        elif event == "subprocess.Popen":
            raw = args[1] if isinstance(args[1], list | tuple) else [args[1]]
            exe = "" if args[0] is None else _text(args[0])
            cwd = None if args[2] is None else _text(args[2])
        else:  # os.exec, os.posix_spawn: (path, argv, env)
            exe = _text(args[0])
            raw = args[1] if isinstance(args[1], list | tuple) else [args[1]]
        argv, truncated = self._argv(raw)
        if event == "subprocess.Popen":
            self._last_popen = (tid, argv)
        elif event == "os.posix_spawn" and self._last_popen == (tid, argv):
            self._last_popen = None
            return None  # subprocess spawning through posix_spawn: already reported
        return self._ev.ProcessSpawn(time=t, exec_id=eid, pid=self.pid, tid=tid, call=event,
                                     exe=exe, argv=argv, truncated=truncated,
                                     cwd=cwd)  # fmt: skip

    def _argv(self, raw: Sequence[Any]) -> tuple[tuple[str, ...], bool]:
        out: list[str] = []
        left = self.argv_bytes
        for a in raw:
            if len(out) >= self.argv_args or left <= 0:
                return tuple(out), True
            s = _text(a)
            if len(s) > left:
                out.append(s[:left])
                return tuple(out), True
            out.append(s)
            left -= len(s) + 1
        return tuple(out), False


def _address(family: int, addr: Any) -> tuple[str, int]:
    """(address, port) of a socket address as Python gives it."""
    if family in (socket.AF_INET, socket.AF_INET6):
        host, port = addr[0], addr[1]
        if not isinstance(host, str) or not isinstance(port, int):
            raise TypeError("not an (address, port) pair")
        return host, port
    if family == socket.AF_UNIX:
        if isinstance(addr, bytes) and addr.startswith(b"\0"):
            return "@" + addr[1:].decode("utf-8", "backslashreplace"), 0
        return _text(addr), 0
    return repr(addr)[:256], 0


def probe(cfg: Any, mode: str) -> tuple[str, str]:
    """(technique, reason) for ``lw-embed env --mode``: nothing is installed."""
    if mode != "in-app":
        return "none", "in-app mode only (there is no host process to hook)"
    return "audit-hook", "sys.addaudithook in the host process (its children from /proc)"


def factory(ctx: SourceContext) -> AuditSource | None:
    """The source in in-app mode only (the other modes have no host to hook)."""
    if ctx.mode != "in-app":
        return None
    return AuditSource(ctx)
