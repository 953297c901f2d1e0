"""ptrace(2) for the tracer: python-ptrace's raw binding plus the constants it lacks.

Interface: ``ptrace(2)`` through ``ptrace.binding.func.ptrace`` (python-ptrace), and
``process_vm_readv(2)`` through ctypes for reading tracee memory in one call.

Capability: ``CAP_SYS_PTRACE``, or being the parent of the tracee under Yama scope <= 1.
Every request must come from the tracer thread (the core's main thread).

Cost: one syscall per request through python-ptrace's ctypes prototype; ``get_syscall_info``
returns the syscall number and arguments in one 88-byte read instead of a full register
dump.

Failure modes: every function raises :class:`PtraceFailed` (an OSError with ``errno``)
when the kernel refuses; ``ESRCH`` means the tracee is gone or not stopped, and callers on
the hot path treat it as "already handled by its exit report".
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct

from ptrace import ctypes_libc as _libc_mod
from ptrace.binding import func as _pt

# Requests python-ptrace 0.9.9 does not define (include/uapi/linux/ptrace.h).
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E

PTRACE_O_TRACESYSGOOD = 0x01
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 1 << 20

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

SYSCALL_INFO_NONE = 0
SYSCALL_INFO_ENTRY = 1
SYSCALL_INFO_EXIT = 2
SYSCALL_INFO_SECCOMP = 3

WALL = 0x40000000


class PtraceFailed(OSError):
    """A ptrace request the kernel refused."""


# python-ptrace's ctypes prototype of libc's ptrace() (loaded with use_errno), called
# directly: its Python wrapper costs more than the syscall on the tracer's hot path.
_raw = _pt._ptrace
_FAILED = (1 << 64) - 1 if ctypes.sizeof(ctypes.c_ulong) == 8 else (1 << 32) - 1
_get_errno = ctypes.get_errno


def _call(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    r: int = _raw(request, pid, addr, data)
    if r == _FAILED:
        err = _get_errno() or _errno.EIO
        raise PtraceFailed(err, os.strerror(err))
    return r


def seize(pid: int, options: int) -> None:
    _call(PTRACE_SEIZE, pid, 0, options)


def cont(pid: int, sig: int = 0) -> None:
    _call(PTRACE_CONT, pid, 0, sig)


def listen(pid: int) -> None:
    _call(PTRACE_LISTEN, pid, 0, 0)


def interrupt(pid: int) -> None:
    _call(PTRACE_INTERRUPT, pid, 0, 0)


def detach(pid: int, sig: int = 0) -> None:
    """PTRACE_DETACH a stopped tracee, delivering ``sig`` (0: none) as it resumes. A
    tracee in group-stop stays stopped, as it would without a tracer."""
    _call(PTRACE_DETACH, pid, 0, sig)


_msg = ctypes.c_ulong()
_msg_addr = ctypes.addressof(_msg)


def geteventmsg(pid: int) -> int:
    """PTRACE_GETEVENTMSG into an unsigned long (python-ptrace's helper uses a pid_t,
    which is too small for the seccomp RET_DATA and overflows)."""
    _call(PTRACE_GETEVENTMSG, pid, 0, _msg_addr)
    return _msg.value


# struct ptrace_syscall_info: u8 op, u8 pad[3], u32 arch, u64 ip, u64 sp, then a union
# whose entry and seccomp members start with u64 nr, u64 args[6] (seccomp adds u32 ret_data).
_INFO = struct.Struct("<B3xIQQQ6QI4x")
_info_buf = ctypes.create_string_buffer(_INFO.size)
_info_addr = ctypes.addressof(_info_buf)


def get_syscall_info(pid: int) -> tuple[int, int, int, tuple[int, ...], int]:
    """(op, arch, nr, args, ret_data) of a tracee in a syscall or seccomp stop (Linux >= 5.3);
    ret_data is the SECCOMP_RET_DATA of a seccomp stop (saves a PTRACE_GETEVENTMSG)."""
    _call(PTRACE_GET_SYSCALL_INFO, pid, _INFO.size, _info_addr)
    op, arch, _ip, _sp, nr, *rest = _INFO.unpack(_info_buf.raw)
    return op, arch, nr, tuple(rest[:6]), rest[6]


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_libc = _libc_mod.libc  # python-ptrace's handle on libc (use_errno=True), loaded once
_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = (
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
)


def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Read up to ``size`` bytes of tracee memory at ``addr`` in one syscall.

    Returns fewer bytes when the range crosses into an unmapped page; raises
    PtraceFailed when nothing could be read.
    """
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), size)
    remote = _IoVec(addr, size)
    n = _pvr(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        err = ctypes.get_errno()
        raise PtraceFailed(err, os.strerror(err))
    return buf.raw[:n]
