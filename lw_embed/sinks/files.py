"""A sink that writes each batch to its own file in a directory.

Interface: ``open(O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC)`` of a temporary file in the target
directory, ``write``, ``fdatasync``, ``rename`` to
``batch-<instance_id>-<seq_first:012d>.cbor``, then ``fsync`` of the directory so the
rename itself is durable. A reader therefore sees a whole batch or no file at all; the
temporary names start with ``.`` and end with ``.tmp``, so ``*.cbor`` never matches them.
Writing the same (instance, seq_first) again replaces the file: a resend is stored once.

Capability: write access to the directory (created on first write with mode 0o750,
parents included, subject to the umask).

Cost: eight syscalls, two of them syncs (file data, then the directory), per batch -- about
one batch a second; no buffering of its own.

Failure modes: every failure (ENOSPC, EACCES, EROFS, a vanished directory, ...) raises
``OSError`` to the caller, which counts it; the temporary file is removed on failure. An
``instance_id`` that could escape the directory (``/``, a leading ``.``, empty) raises
``ValueError``: that is a bug in the caller, not an I/O failure.
"""

from __future__ import annotations

import os
import re

from lw_embed.fsutil import write_atomic

_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def batch_name(instance_id: str, seq_first: int) -> str:
    """The file name of a batch: sorts by sequence within one agent instance."""
    if not _SAFE_ID.fullmatch(instance_id):
        raise ValueError(f"instance id {instance_id!r} is not safe in a file name")
    if seq_first < 0:
        raise ValueError(f"negative sequence number {seq_first}")
    return f"batch-{instance_id}-{seq_first:012d}.cbor"


class FileSink:
    """Writes batches atomically, one file each, into ``directory``."""

    __slots__ = ("_made", "directory")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._made = False

    def _ensure_dir(self) -> None:
        if not self._made:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            self._made = True

    def write(self, data: bytes, instance_id: str, seq_first: int) -> str:
        """Write one encoded batch; return the path of the file written."""
        name = batch_name(instance_id, seq_first)
        self._ensure_dir()
        final = os.path.join(self.directory, name)
        try:
            write_atomic(final, data)
        except FileNotFoundError:
            self._made = False  # the directory vanished: make it again on the next write
            raise
        return final
