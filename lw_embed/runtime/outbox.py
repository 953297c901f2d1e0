"""The core's side of the record pipe: a bounded buffer that never blocks the tracer.

Interface: a pipe write end set ``O_NONBLOCK`` and sized with ``F_SETPIPE_SZ``.

Capability: none (a pipe larger than ``/proc/sys/fs/pipe-max-size`` needs
``CAP_SYS_RESOURCE``; we ask for at most that and keep what we get).

Cost: a put is an append to a bytearray; the core loop flushes once per wake (after it
has handled every pending stop), so a burst of records is one ``write(2)`` and one
wake-up of the worker.

Failure modes: when the buffer would exceed its bound the record is dropped and counted
(``core.buffer_full``); a worker that is gone leaves data in the pipe (the core keeps the
read end, so nothing gets EPIPE) for the next worker to read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

F_SETPIPE_SZ = 1031


class Outbox:
    __slots__ = ("_buf", "_fd", "_max", "dropped_bytes", "drops", "written")

    def __init__(self, fd: int, max_bytes: int, pipe_bytes: int = 1 << 20) -> None:
        self._fd = fd
        self._max = max_bytes
        self._buf = bytearray()
        self.drops = 0
        self.dropped_bytes = 0
        self.written = 0
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_bytes)

    @property
    def pending(self) -> int:
        return len(self._buf)

    def put(self, data: bytes) -> None:
        if len(self._buf) + len(data) > self._max:
            self.drops += 1
            self.dropped_bytes += len(data)
            return
        self._buf += data

    def flush(self) -> bool:
        """Write what the pipe takes; True when the buffer is empty."""
        while self._buf:
            try:
                n = os.write(self._fd, self._buf[: 1 << 20])
            except BlockingIOError:
                return False
            except OSError as exc:  # EPIPE cannot happen while we hold the read end
                if exc.errno != errno.EPIPE:
                    raise
                return False
            self.written += n
            del self._buf[:n]
        return True

    def close(self) -> None:
        os.close(self._fd)
