"""seccomp-BPF filters: assembled in Python, installed in the workload before its execve.

Interface: ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &sock_fprog)`` and
``prctl(PR_SET_NO_NEW_PRIVS)``; classic BPF over ``struct seccomp_data``.

Capability: installing a filter needs ``CAP_SYS_ADMIN`` or ``NO_NEW_PRIVS`` (which stops
setuid and file-capability binaries from gaining privilege: the capability report says
so when we had to set it).

Cost: the filter runs in the kernel on every syscall of the workload; it is a short
linear program (two instructions per traced syscall per ABI), and every syscall that is
not listed returns ``SECCOMP_RET_ALLOW`` without a stop.

Failure modes: the filter never makes a syscall fail. An unknown architecture is allowed
through; i386 (``int 0x80``) and x32 numbers are matched with their own tables, so a
syscall from another ABI is traced or allowed, never denied. ``SECCOMP_RET_TRACE`` with
no tracer attached fails the syscall with ENOSYS, which is why the wrapper sets
``PTRACE_O_EXITKILL``. Installation errors raise OSError.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ptrace import ctypes_libc as _libc_mod
from ptrace.syscall.linux import i386 as _i386
from ptrace.syscall.linux import x86_64 as _x86_64

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_DATA = 0x0000FFFF

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06

# offsets in struct seccomp_data
_OFF_NR = 0
_OFF_ARCH = 4


def _off_arg_lo(i: int) -> int:
    return 16 + 8 * i  # little-endian: the low 32 bits come first


@dataclass(frozen=True, slots=True)
class Rule:
    """Trace syscall ``name`` and tag the stop with ``data`` (read back by the tracer with
    PTRACE_GETEVENTMSG). ``arg0`` narrows the rule to calls whose first argument's low 32
    bits equal it (i386 ``socketcall`` multiplexes connect, bind, ...). ``flags_arg``
    narrows it to calls whose argument ``flags_arg`` has a bit of ``flags_mask`` set in
    its low 32 bits (write-opens: ``openat`` flags & (O_WRONLY|O_RDWR|O_CREAT|O_TRUNC))."""

    name: str
    data: int
    arg0: int | None = None
    flags_arg: int | None = None
    flags_mask: int = 0


# x32 numbers that differ from "x86-64 number | X32 bit" (from the x32 block of the table).
_X32_OWN = {name: nr for nr, name in _x86_64.SYSCALL_NAMES.items() if 512 <= nr < 548}
# syscalls newer than python-ptrace's tables; since Linux 5.1 a new syscall has one number
# on every architecture (openat2 437, fchmodat2 452 in Linux 6.6)
_NEW = {"openat2": 437, "fchmodat2": 452}
_X86_64 = {name: nr for nr, name in _x86_64.SYSCALL_NAMES.items() if nr < 512} | _NEW
# python-ptrace's i386 table ends at 319; the direct socket calls came in Linux 4.3
_I386 = {name: nr for nr, name in _i386.SYSCALL_NAMES.items()} | {
    "execveat": 358, "socket": 359, "socketpair": 360, "bind": 361, "connect": 362,
    "listen": 363, "accept4": 364, "utimensat": 320, "renameat2": 353,
} | _NEW  # fmt: skip
#: i386 socketcall(2) sub-call numbers (linux/net.h)
SOCKETCALL = {"bind": 2, "connect": 3, "listen": 4, "accept": 5, "accept4": 18}
# aarch64 (asm-generic numbers), only the ones the agent may trace; it has none of the
# legacy path calls (open, creat, unlink, rename, mkdir, chmod, chown, link, utimes...).
_AARCH64 = {
    "connect": 203, "accept": 202, "accept4": 242, "bind": 200, "listen": 201,
    "execve": 221, "execveat": 281,
    "openat": 56, "mkdirat": 34, "unlinkat": 35, "symlinkat": 36, "linkat": 37,
    "renameat": 38, "renameat2": 276, "truncate": 45, "ftruncate": 46, "fchmod": 52,
    "fchmodat": 53, "fchownat": 54, "fchown": 55, "utimensat": 88,
} | _NEW  # fmt: skip


def syscall_numbers(arch: int, name: str) -> list[int]:
    """The numbers ``name`` has under ``arch`` (x86-64 includes its x32 number)."""
    if arch == AUDIT_ARCH_X86_64:
        out = []
        if name in _X86_64:
            out.append(_X86_64[name])
        if name in _X32_OWN:
            out.append(_X32_OWN[name] | X32_SYSCALL_BIT)
        elif name in _X86_64:
            out.append(_X86_64[name] | X32_SYSCALL_BIT)
        return out
    table = {AUDIT_ARCH_I386: _I386, AUDIT_ARCH_AARCH64: _AARCH64}.get(arch, {})
    return [table[name]] if name in table else []


def native_arches() -> tuple[int, ...]:
    """The audit arches a process on this machine can issue syscalls under."""
    m = platform.machine()
    if m == "x86_64":
        return (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386)
    if m == "aarch64":
        return (AUDIT_ARCH_AARCH64,)
    return ()


Insn = tuple[int, int, int, int]


def _stmt(code: int, k: int) -> Insn:
    return (code, 0, 0, k)


def _jeq(k: int, jt: int, jf: int) -> Insn:
    return (_JEQ_K, jt, jf, k)


def _arch_block(arch: int, rules: Sequence[Rule]) -> list[Insn]:
    """Load nr, then for every (number, rule): match -> RET_TRACE|data; end: RET_ALLOW."""
    block: list[Insn] = [_stmt(_LD_W_ABS, _OFF_NR)]
    for rule in rules:
        nrs: list[tuple[int, int | None]]
        if arch == AUDIT_ARCH_I386 and rule.name in SOCKETCALL and rule.arg0 is None:
            # i386 libcs reach socket calls through socketcall(2) as well as directly
            nrs = [(n, None) for n in syscall_numbers(arch, rule.name)]
            nrs += [(n, SOCKETCALL[rule.name]) for n in syscall_numbers(arch, "socketcall")]
        else:
            nrs = [(n, rule.arg0) for n in syscall_numbers(arch, rule.name)]
        ret = _stmt(_RET_K, SECCOMP_RET_TRACE | (rule.data & SECCOMP_RET_DATA))
        for nr, arg0 in nrs:
            if rule.flags_arg is not None:
                block += [
                    _jeq(nr, 0, 4),
                    _stmt(_LD_W_ABS, _off_arg_lo(rule.flags_arg)),
                    (_JSET_K, 0, 1, rule.flags_mask),
                    ret,
                    _stmt(_LD_W_ABS, _OFF_NR),
                ]
            elif arg0 is None:
                block += [_jeq(nr, 0, 1), ret]
            else:
                block += [
                    _jeq(nr, 0, 4),
                    _stmt(_LD_W_ABS, _off_arg_lo(0)),
                    _jeq(arg0, 0, 1),
                    ret,
                    _stmt(_LD_W_ABS, _OFF_NR),
                ]
    block.append(_stmt(_RET_K, SECCOMP_RET_ALLOW))
    return block


def build_trace_filter(rules: Sequence[Rule], arches: Iterable[int] | None = None) -> list[Insn]:
    """A filter that returns RET_TRACE for ``rules`` and RET_ALLOW for everything else."""
    prog: list[Insn] = [_stmt(_LD_W_ABS, _OFF_ARCH)]
    blocks = [(a, _arch_block(a, rules)) for a in (arches or native_arches())]
    # dispatch: "jeq arch_i" jumps over the remaining dispatch entries to its block
    dispatch: list[Insn] = []
    n = len(blocks)
    offsets = []
    pos = 0
    for _, blk in blocks:
        offsets.append(pos)
        pos += len(blk)
    for i, (arch, _) in enumerate(blocks):
        # after this insn: (n - i - 1) more jeqs, one RET_ALLOW, then blocks
        jt = (n - i - 1) + 1 + offsets[i]
        if jt > 255:
            raise ValueError("seccomp filter too long for 8-bit jumps")
        dispatch.append(_jeq(arch, jt, 0))
    prog += dispatch
    prog.append(_stmt(_RET_K, SECCOMP_RET_ALLOW))  # unknown arch: allow, never fail
    for _, blk in blocks:
        prog += blk
    return prog


def build_errno_filter(names: Sequence[str], err: int) -> list[Insn]:
    """A filter failing ``names`` with ``err`` (used by tests to simulate a locked-down
    runtime, e.g. one whose profile denies ptrace)."""
    prog: list[Insn] = [_stmt(_LD_W_ABS, _OFF_ARCH)]
    arch = native_arches()[0]
    nrs = [nr for name in names for nr in syscall_numbers(arch, name)]
    prog.append(_jeq(arch, 0, 1 + 2 * len(nrs)))
    prog.append(_stmt(_LD_W_ABS, _OFF_NR))
    for nr in nrs:
        prog += [_jeq(nr, 0, 1), _stmt(_RET_K, SECCOMP_RET_ERRNO | err)]
    prog.append(_stmt(_RET_K, SECCOMP_RET_ALLOW))
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


_libc = _libc_mod.libc  # python-ptrace's handle on libc (use_errno=True), loaded once
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    r = int(_prctl(option, a2, a3, a4, a5))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def install(prog: Sequence[Insn]) -> None:
    """Install ``prog`` on the calling thread (inherited across fork and execve)."""
    raw = b"".join(struct.pack("<HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog))
