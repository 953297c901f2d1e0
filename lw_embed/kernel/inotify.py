"""inotify(7) through ctypes: an fd, watches, and the parsed ``struct inotify_event`` records.

Interface: ``inotify_init1(IN_NONBLOCK|IN_CLOEXEC)``, ``inotify_add_watch``,
``inotify_rm_watch`` (libc), ``read(2)`` of the fd parsed with :mod:`struct`
(``int wd; uint32 mask, cookie, len; char name[len]``).

Capability: none beyond read access to the watched directories. Limits (per user, not
raisable from inside Fargate or Cloud Run): ``/proc/sys/fs/inotify/max_user_watches``
watches, ``max_user_instances`` fds, and a queue of ``max_queued_events`` events per fd,
past which the kernel drops events and queues one ``IN_Q_OVERFLOW``.

Cost: one syscall per watch added; reading is one ``read`` per up to 64 KiB of events and
a ``struct.unpack_from`` per event. A watch costs the kernel about 1 KiB.

Failure modes: :meth:`Inotify.add_watch` raises OSError (ENOSPC: watch limit reached;
ENOENT/ENOTDIR: the path went away; EACCES); :func:`inotify_init1` failing (EMFILE: too
many instances) raises OSError from the constructor; :meth:`Inotify.read` returns ``[]``
when nothing is queued and raises OSError on any other read error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import NamedTuple

IN_ACCESS = 0x00000001
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_CLOSE_NOWRITE = 0x00000010
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")
READ_SIZE = 65536

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_init1 = _libc.inotify_init1
_init1.argtypes = (ctypes.c_int,)
_init1.restype = ctypes.c_int
_add = _libc.inotify_add_watch
_add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_add.restype = ctypes.c_int
_rm = _libc.inotify_rm_watch
_rm.argtypes = (ctypes.c_int, ctypes.c_int)
_rm.restype = ctypes.c_int


def _check(r: int, what: str) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return r


class InotifyEvent(NamedTuple):  # a tuple: thousands are parsed per read
    wd: int
    mask: int
    cookie: int
    name: str


def parse(buf: bytes) -> list[InotifyEvent]:
    """The events in one ``read`` of an inotify fd (a torn tail is ignored)."""
    out: list[InotifyEvent] = []
    pos, n = 0, len(buf)
    size = _HEADER.size
    while pos + size <= n:
        wd, mask, cookie, length = _HEADER.unpack_from(buf, pos)
        pos += size
        raw = buf[pos : pos + length]
        pos += length
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        out.append(InotifyEvent(wd, mask, cookie, name))
    return out


class Inotify:
    """One inotify instance (non-blocking, close-on-exec)."""

    def __init__(self) -> None:
        self.fd = _check(_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str, mask: int) -> int:
        return _check(_add(self.fd, os.fsencode(path), mask), f"inotify_add_watch {path}")

    def rm_watch(self, wd: int) -> None:
        try:
            _check(_rm(self.fd, wd), "inotify_rm_watch")
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # already gone (deleted directory)
                raise

    def read(self) -> list[InotifyEvent]:
        try:
            buf = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return []
        return parse(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def limits(proc: str = "/proc") -> dict[str, int]:
    """The inotify sysctls (absent ones left out)."""
    out: dict[str, int] = {}
    for key in ("max_user_watches", "max_user_instances", "max_queued_events"):
        try:
            with open(f"{proc}/sys/fs/inotify/{key}") as f:
                out[key] = int(f.read().strip())
        except (OSError, ValueError):
            pass
    return out
