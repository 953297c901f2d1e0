"""Who-data for file monitoring: the file syscalls the seccomp filter sends to the tracer.

Interface: seccomp rules (:func:`file_rules`, added by
:func:`lw_embed.sources.tracer.seccomp_rules` only when file monitoring is on) and the
handler :func:`on_stop` called from ``Tracer._on_seccomp`` at the syscall-ENTRY stop, with
the ``PTRACE_GET_SYSCALL_INFO`` arguments already read. It reads the path strings with
``process_vm_readv`` (page-bounded, at most ``PATH_MAX``), resolves a relative path against
the dirfd (``readlink /proc/<tid>/fd/<n>``) or the cwd (``readlink /proc/<tid>/cwd``),
keeps it only when it is at or below a monitored root (a prefix test: the rules proper are
matched in the worker) and sends one ``R.FILEOP`` record (pid, tid, syscall, path, path2,
flags). Whether the call succeeded is learnt in the worker, by joining the record with
the inotify event for the same path (lw_embed.sources.files).

Traced: ``open``/``openat`` only when ``flags & (O_WRONLY|O_RDWR|O_CREAT|O_TRUNC)`` (the
check is in BPF, so a read-only open never stops), ``creat``, ``truncate``/``ftruncate``,
``unlink``/``unlinkat``/``rmdir``, ``rename``/``renameat``/``renameat2``,
``mkdir``/``mkdirat``, ``link``/``linkat``/``symlink``/``symlinkat``,
``chmod``/``fchmod``/``fchmodat``, ``chown``/``lchown``/``fchown``/``fchownat``,
``utimensat``/``utimes``/``utime``/``futimesat`` (x86-64, x32 and i386 numbers).
``openat2`` and ``fchmodat2`` (Linux 6.6) too: openat2's flags sit behind a struct pointer,
which BPF cannot read, so every openat2 stops and a read-only one is dropped here after
reading ``open_how.flags`` (glibc never calls it; a few runtimes do). aarch64 has only the
``*at`` forms, traced by the same rules.

Capability: that of the tracer (ptrace of the workload).

Cost: one seccomp stop per write-open / metadata syscall of the workload (about 10-20 us
in this Python core: syscall info, one or two ``process_vm_readv``, a ``readlink`` for a
relative path, one record); none at all when file monitoring is off (no rule is added).

Failure modes: an unreadable path (bad pointer, tracee gone) drops the record (counted by
the tracer's error counters through the exception); a path outside every root is
skipped without a record.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

from lw_embed.config import Config
from lw_embed.kernel import ptrace as pt
from lw_embed.kernel import seccomp
from lw_embed.pipeline.filerules import canonical
from lw_embed.records import R, frame

O_WRONLY, O_RDWR, O_CREAT, O_TRUNC = 0o1, 0o2, 0o100, 0o1000
WRITE_FLAGS = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC
AT_FDCWD = -100
AT_REMOVEDIR = 0x200
PATH_MAX = 4096
PAGE = 4096
FIRST_READ = 256

# name -> (primary path (dirfd arg | None, path arg) or fd arg (int), second path spec, flags arg)
# primary = the path that is created/changed; for rename it is the old path (path2 = new);
# for link/symlink it is the new name (path2 = what it points to, raw for symlink).
_P = tuple[int | None, int]
SYSCALLS: dict[str, tuple[_P | int, _P | None, int | None]] = {
    "open": ((None, 0), None, 1),
    "openat": ((0, 1), None, 2),
    "creat": ((None, 0), None, None),
    "truncate": ((None, 0), None, None),
    "truncate64": ((None, 0), None, None),
    "ftruncate": (0, None, None),
    "ftruncate64": (0, None, None),
    "unlink": ((None, 0), None, None),
    "unlinkat": ((0, 1), None, 2),
    "rmdir": ((None, 0), None, None),
    "rename": ((None, 0), (None, 1), None),
    "renameat": ((0, 1), (2, 3), None),
    "renameat2": ((0, 1), (2, 3), 4),
    "mkdir": ((None, 0), None, None),
    "mkdirat": ((0, 1), None, None),
    "link": ((None, 1), (None, 0), None),
    "linkat": ((2, 3), (0, 1), None),
    "symlink": ((None, 1), None, None),
    "symlinkat": ((1, 2), None, None),
    "chmod": ((None, 0), None, None),
    "fchmod": (0, None, None),
    "fchmodat": ((0, 1), None, None),
    "chown": ((None, 0), None, None),
    "lchown": ((None, 0), None, None),
    "fchown": (0, None, None),
    "fchownat": ((0, 1), None, None),
    "utimensat": ((0, 1), None, None),
    "utimes": ((None, 0), None, None),
    "utime": ((None, 0), None, None),
    "futimesat": ((0, 1), None, None),
    "openat2": ((0, 1), None, None),  # flags: the first u64 of struct open_how (args[2])
    "fchmodat2": ((0, 1), None, None),
}
_NAMES = tuple(SYSCALLS)
TAG_BASE = 0x100  # RET_DATA tags TAG_BASE + index in _NAMES

#: the class of each syscall, as the worker joins it with inotify actions
CLASS = {
    "open": "open", "openat": "open", "creat": "creat", "truncate": "truncate",
    "truncate64": "truncate", "ftruncate": "truncate", "ftruncate64": "truncate",
    "unlink": "unlink", "unlinkat": "unlink", "rmdir": "rmdir", "rename": "rename",
    "renameat": "rename", "renameat2": "rename", "mkdir": "mkdir", "mkdirat": "mkdir",
    "link": "link", "linkat": "link", "symlink": "symlink", "symlinkat": "symlink",
    "chmod": "chmod", "fchmod": "chmod", "fchmodat": "chmod", "chown": "chown",
    "lchown": "chown", "fchown": "chown", "fchownat": "chown", "utimensat": "utime",
    "utimes": "utime", "utime": "utime", "futimesat": "utime", "openat2": "open",
    "fchmodat2": "chmod",
}  # fmt: skip


def file_rules() -> list[seccomp.Rule]:
    """The seccomp rules of file monitoring (write-opens checked on their flags in BPF)."""
    rules = []
    for i, name in enumerate(_NAMES):
        flags_arg = SYSCALLS[name][2] if name in ("open", "openat") else None
        rules.append(seccomp.Rule(name, TAG_BASE + i, flags_arg=flags_arg,
                                  flags_mask=WRITE_FLAGS if flags_arg is not None else 0))
    return rules


def is_file_tag(tag: int) -> bool:
    return TAG_BASE <= tag < TAG_BASE + len(_NAMES)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_libc = ctypes.CDLL(None, use_errno=True)
_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = (ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                 ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong)  # fmt: skip
# one preallocated buffer and iovec pair: the core is single-threaded, and building
# them per call costs more than the syscall
_BUF = ctypes.create_string_buffer(PAGE)
_BUF_ADDR = ctypes.addressof(_BUF)
_LOCAL = _IoVec(_BUF_ADDR, PAGE)
_REMOTE = _IoVec(0, 0)
_LOCAL_P, _REMOTE_P = ctypes.byref(_LOCAL), ctypes.byref(_REMOTE)


def _read(tid: int, addr: int, n: int) -> bytes:
    _REMOTE.base, _REMOTE.len = addr, n
    got = _pvr(tid, _LOCAL_P, 1, _REMOTE_P, 1, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise pt.PtraceFailed(err, os.strerror(err))
    return ctypes.string_at(_BUF_ADDR, got)


def read_cstr(tid: int, addr: int, limit: int = PATH_MAX) -> bytes:
    """A NUL-terminated string of tracee memory, read a page at a time (never past one
    unmapped page); at most ``limit`` bytes."""
    out = b""
    first = FIRST_READ  # most paths are short: a small first read is cheaper
    while len(out) < limit:
        n = min(PAGE - (addr % PAGE), limit - len(out), first)
        first = PAGE
        chunk = _read(tid, addr, n)
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        out += chunk
        if len(chunk) < n:
            break
        addr += n
    return out


def _base(tid: int, dirfd: int | None) -> str:
    if dirfd is None or dirfd == AT_FDCWD:
        return os.readlink(f"/proc/{tid}/cwd")
    return os.readlink(f"/proc/{tid}/fd/{dirfd}")


def _path(tid: int, args: Sequence[int], spec: _P | int) -> str:
    if isinstance(spec, int):  # an fd-based call
        return os.readlink(f"/proc/{tid}/fd/{_s32(args[spec])}")
    dirarg, parg = spec
    if not args[parg]:  # utimensat(fd, NULL, ...): the fd itself
        return _base(tid, _s32(args[dirarg]) if dirarg is not None else None)
    raw = os.fsdecode(read_cstr(tid, args[parg]))
    if raw.startswith("/"):
        return os.path.normpath(raw)
    base = _base(tid, _s32(args[dirarg]) if dirarg is not None else None)
    return os.path.normpath(os.path.join(base, raw))


def under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r if r.endswith("/") else r + "/") for r in roots)


def _canon(path: str, aliases: Sequence[tuple[str, str]]) -> str:
    """``path`` with a symlinked root's prefix (``/bin`` on a usr-merged image) replaced by
    the root it resolves to, so that it joins the inotify event of the same file."""
    for alias, real in aliases:
        if path == alias or path.startswith(alias + "/"):
            return real + path[len(alias):]
    return path


def on_stop(emit: Callable[[bytes], None], pid: int, tid: int, args: Sequence[int], tag: int,
            roots: Sequence[str], now_ns: int,
            aliases: Sequence[tuple[str, str]] = ()) -> bool:  # fmt: skip
    """Handle one file-syscall seccomp stop; True when a record was sent."""
    name = _NAMES[tag - TAG_BASE]
    first, second, flags_arg = SYSCALLS[name]
    how = 0
    if name == "openat2":  # struct open_how { u64 flags; ... }: the filter could not look
        raw = _read(tid, args[2], 8)
        how = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not how & WRITE_FLAGS:
            return False
    path = _path(tid, args, first)
    path2 = ""
    if second is not None:
        path2 = _path(tid, args, second)
    elif name in ("symlink", "symlinkat"):
        path2 = os.fsdecode(read_cstr(tid, args[0]))
    if aliases:
        path = _canon(path, aliases)
        if second is not None:
            path2 = _canon(path2, aliases)
    if not under(path, roots) and not (second is not None and under(path2, roots)):
        return False
    flags = int(args[flags_arg]) & 0xFFFFFFFF if flags_arg is not None else how & 0xFFFFFFFF
    if name == "unlinkat" and flags & AT_REMOVEDIR:
        name = "rmdir"  # unlinkat(AT_REMOVEDIR) is rmdir
    emit(frame(R.FILEOP, now_ns, pid, tid, name, path, path2, flags))
    return True


def trace_roots(cfg: Config) -> tuple[str, ...]:
    """The roots the core checks traced paths against; () = file syscalls not traced
    (``[files] enabled`` or ``trace`` off): then no file rule is added to the filter."""
    fc = cfg.files
    if not fc.enabled or not fc.trace:
        return ()
    return tuple(sorted({canonical(r.path) for r in fc.effective_rules()}))


def trace_aliases(cfg: Config) -> tuple[tuple[str, str], ...]:
    """(symlinked root as configured, the root it resolves to) for the rules whose path
    goes through a symlink: the tracer rewrites such prefixes before its root test."""
    if not trace_roots(cfg):
        return ()
    out = set()
    for r in cfg.files.effective_rules():
        given = os.path.normpath(os.path.abspath(r.path))
        real = canonical(r.path)
        if given != real:
            out.add((given, real))
    return tuple(sorted(out, key=lambda a: len(a[0]), reverse=True))
