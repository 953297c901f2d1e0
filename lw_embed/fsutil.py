"""Durable file writes shared by the spool, the batch-file sink and the worker's state.

Interface: ``open(O_EXCL)``, ``write(2)``, ``fdatasync(2)``, ``rename(2)`` and ``fsync(2)``
of the directory. Capability: a writable directory. Cost: two syncs per file.

Failure modes: raises OSError; the temporary file is removed on any failure, so a crash
leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import itertools
import os

_counter = itertools.count()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_atomic(path: str, data: bytes, mode: int = 0o640, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fdatasync, rename,
    and (``sync_dir``) fsync of the directory so the rename survives a crash too."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{next(_counter)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(directory or ".")
