"""Small, allocation-light readers of /proc used by the core and the worker.

Interface: ``/proc/<pid>/{stat,status,cmdline,exe,cwd}``, ``/proc/sys/kernel/random/boot_id``,
``/proc/<pid>/ns/pid``, ``/proc/stat`` (btime). Every reader takes ``proc`` (the procfs
root) so tests can point it at a fake tree.

Capability: none for the caller's own processes; reading another user's ``exe``/``cwd``
needs ``CAP_SYS_PTRACE`` (or being its tracer).

Cost: one open+read (or readlink) per call, no psutil, no per-call allocation beyond the
result; safe to call on the tracer's hot path.

Failure modes: a process can vanish between any two reads. Readers raise ``OSError``
(``ENOENT``/``ESRCH``) or :class:`ProcGone` for a half-read entry; callers treat both as
"the process is gone" and never crash on them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

PROC = "/proc"
CLOCK_TICKS: int = os.sysconf("SC_CLK_TCK")


class ProcGone(OSError):
    """The process vanished or its entry was unreadable mid-read."""


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat the agent uses."""

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    start_ticks: int


def _read(path: str, limit: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def parse_stat(data: bytes) -> Stat:
    """Parse a /proc/<pid>/stat line; comm may contain spaces and parentheses."""
    lp = data.find(b"(")
    rp = data.rfind(b")")
    if lp < 0 or rp < lp:
        raise ProcGone("malformed stat")
    rest = data[rp + 2 :].split()
    if len(rest) < 20:
        raise ProcGone("truncated stat")
    # rest[0] is field 3 (state); field 22 (starttime) is rest[19]
    return Stat(
        pid=int(data[:lp]),
        comm=data[lp + 1 : rp].decode("utf-8", "backslashreplace"),
        state=rest[0].decode(),
        ppid=int(rest[1]),
        pgrp=int(rest[2]),
        start_ticks=int(rest[19]),
    )


def read_stat(pid: int | str, proc: str = PROC) -> Stat:
    return parse_stat(_read(f"{proc}/{pid}/stat"))


def read_ids(pid: int | str, proc: str = PROC) -> tuple[int, int, int]:
    """(uid, gid, euid) from /proc/<pid>/status."""
    data = _read(f"{proc}/{pid}/status")
    uid = gid = euid = -1
    for line in data.split(b"\n"):
        if line.startswith(b"Uid:"):
            f = line.split()
            uid, euid = int(f[1]), int(f[2])
        elif line.startswith(b"Gid:"):
            gid = int(line.split()[1])
            break
    if uid < 0 or gid < 0:
        raise ProcGone("truncated status")
    return uid, gid, euid


def read_tgid(tid: int, proc: str = PROC) -> int:
    """Thread-group id of a task (works for threads: /proc/<tid> resolves them)."""
    data = _read(f"{proc}/{tid}/status")
    for line in data.split(b"\n"):
        if line.startswith(b"Tgid:"):
            return int(line.split()[1])
    raise ProcGone("no Tgid in status")


def read_cmdline(
    pid: int | str, max_bytes: int, max_args: int, proc: str = PROC
) -> tuple[list[str], bool]:
    """argv from /proc/<pid>/cmdline, bounded; returns (argv, truncated)."""
    data = _read(f"{proc}/{pid}/cmdline", max_bytes + 1)
    truncated = len(data) > max_bytes
    if truncated:
        data = data[:max_bytes]
    if data.endswith(b"\0"):
        data = data[:-1]
    parts = data.split(b"\0") if data else []
    if len(parts) > max_args:
        parts = parts[:max_args]
        truncated = True
    return [p.decode("utf-8", "backslashreplace") for p in parts], truncated


def readlink(path: str) -> str:
    """readlink decoded for the wire (undecodable bytes kept as backslash escapes)."""
    return os.fsencode(os.readlink(path)).decode("utf-8", "backslashreplace")


def read_exe(pid: int | str, proc: str = PROC) -> str:
    return readlink(f"{proc}/{pid}/exe")


def read_cwd(pid: int | str, proc: str = PROC) -> str:
    return readlink(f"{proc}/{pid}/cwd")


def boot_id(proc: str = PROC) -> str:
    try:
        return _read(f"{proc}/sys/kernel/random/boot_id").decode().strip()
    except OSError:
        return ""


def pidns_inode(pid: int | str = "self", proc: str = PROC) -> int:
    try:
        return os.stat(f"{proc}/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def boot_time_ns(proc: str = PROC) -> int:
    """Boot time in ns since the epoch (btime of /proc/stat, 1 s resolution)."""
    for line in _read(f"{proc}/stat", 1 << 20).split(b"\n"):
        if line.startswith(b"btime "):
            return int(line.split()[1]) * 1_000_000_000
    raise ProcGone("no btime in /proc/stat")


def ticks_to_ns(start_ticks: int, boot_ns: int) -> int:
    """A start time in clock ticks since boot as ns since the epoch."""
    return boot_ns + start_ticks * 1_000_000_000 // CLOCK_TICKS


def exec_id(boot: str, pidns: int, pid: int, start_ticks: int) -> str:
    """Stable process identity: a hash of (boot id, pid-namespace inode, pid, start time).

    16 hex digits of BLAKE2b: collision-free in practice for one boot and cheap to carry.
    """
    h = hashlib.blake2b(f"{boot}:{pidns}:{pid}:{start_ticks}".encode(), digest_size=8)
    return h.hexdigest()


def list_pids(proc: str = PROC) -> list[int]:
    """Pids (thread-group ids) visible in proc."""
    return [int(n) for n in os.listdir(proc) if n.isdigit()]
