"""A deliberately naive ptrace tracer: stops the workload on every syscall entry and exit.

Usage: ``python bench/naive_tracer.py CMD [ARG...]``. Exits with CMD's status (128+N if
it died of signal N).

The child does ``PTRACE_TRACEME`` and stops itself; the tracer sets
``TRACESYSGOOD|TRACEFORK|TRACEVFORK|TRACECLONE|TRACEEXEC|EXITKILL`` and resumes every
tracee with ``PTRACE_SYSCALL``, so each syscall costs two stops and two round trips
through this Python loop. It records nothing: it is the lower bound of what a tracer
that does not use seccomp pays, the baseline lw_embed's seccomp filter is meant to beat.
Raw ``ptrace(2)`` through ctypes, no dependency beyond the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PTRACE_TRACEME = 0
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000
WALL = 0x40000000
SYSCALL_STOP = signal.SIGTRAP | 0x80

OPTIONS = (
    PTRACE_O_TRACESYSGOOD
    | PTRACE_O_TRACEFORK
    | PTRACE_O_TRACEVFORK
    | PTRACE_O_TRACECLONE
    | PTRACE_O_TRACEEXEC
    | PTRACE_O_EXITKILL
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_ptrace.restype = ctypes.c_long


def ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    r = int(_ptrace(req, pid, addr, data))
    if r == -1:
        e = ctypes.get_errno()
        if e:
            raise OSError(e, os.strerror(e))
    return r


def _child(argv: list[str]) -> None:
    try:
        ptrace(PTRACE_TRACEME, 0)
        os.kill(os.getpid(), signal.SIGSTOP)  # let the parent set options before exec
        os.execvp(argv[0], argv)
    except BaseException as exc:  # report anything, never return
        os.write(2, f"naive_tracer: {argv[0]}: {exc}\n".encode(errors="replace"))
    os._exit(127)


def trace(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        _child(argv)
    _, status = os.waitpid(pid, WALL)
    if not os.WIFSTOPPED(status):
        return 127
    ptrace(PTRACE_SETOPTIONS, pid, 0, OPTIONS)
    ptrace(PTRACE_SYSCALL, pid, 0, 0)
    seen = {pid}
    main_status: int | None = None
    waitpid = os.waitpid
    resume = _ptrace
    while True:  # ends when the last tracee is reaped (ChildProcessError)
        try:
            tid, status = waitpid(-1, WALL)
        except ChildProcessError:
            break
        if not os.WIFSTOPPED(status):  # exited or killed
            seen.discard(tid)
            if tid == pid:
                main_status = status
            continue
        sig = (status >> 8) & 0xFF
        if sig == SYSCALL_STOP or status >> 16:
            sig = 0  # syscall-enter/-exit stop or a fork/exec event stop
        elif tid not in seen:
            seen.add(tid)  # a new auto-attached child's initial stop
            if sig == signal.SIGSTOP:
                sig = 0
        resume(PTRACE_SYSCALL, tid, 0, sig)  # ESRCH (tracee gone) shows up as its exit
    if main_status is None:
        return 255
    if os.WIFEXITED(main_status):
        return os.WEXITSTATUS(main_status)
    return 128 + os.WTERMSIG(main_status)


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: naive_tracer.py CMD [ARG...]", file=sys.stderr)
        return 2
    return trace(argv)


if __name__ == "__main__":
    sys.exit(main())
