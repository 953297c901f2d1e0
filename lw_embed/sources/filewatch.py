"""The file source's watches: directory <-> watch descriptor, the budget, the fallback set.

Interface: :class:`lw_embed.kernel.inotify.Inotify` (``inotify_add_watch``,
``inotify_rm_watch``); ``IN_IGNORED`` events are passed to :meth:`Watches.ignored`.

Capability: read access to the directories.

Cost: one syscall per watch added; a watch is about 1 KiB of kernel memory. Renaming or
moving out a directory walks the watch table once (rare).

Failure modes: the budget full (``files.max_watches``) or ``inotify_add_watch`` failing
(ENOSPC at ``max_user_watches``, EACCES, ...) puts the directory in :attr:`Watches.periodic`
(scanned every ``files.periodic_interval`` instead) and calls ``degraded`` with the reason;
a directory that vanished (ENOENT, ENOTDIR, ELOOP) is just not watched.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from lw_embed.kernel.inotify import Inotify


class Watches:
    """The watch table of one inotify instance."""

    def __init__(self, ino: Inotify, mask: int, budget: int,
                 degraded: Callable[[str, str, str, str], None]) -> None:  # fmt: skip
        self.ino = ino
        self.mask = mask
        self.budget = budget
        self.degraded = degraded
        self.wds: dict[int, str] = {}
        self.dirs: dict[str, int] = {}
        self.periodic: set[str] = set()  # directories scanned periodically instead

    def add(self, d: str) -> bool:
        """Watch directory ``d`` (budget permitting); False: it is scanned periodically or
        it went away."""
        if d in self.dirs:
            return True
        if len(self.dirs) >= self.budget:
            if d not in self.periodic:
                self.periodic.add(d)
                self.degraded("watch_budget", "periodic_scan", d, f"budget {self.budget} watches")
            return False
        try:
            wd = self.ino.add_watch(d, self.mask)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            self.periodic.add(d)
            why = errno.errorcode.get(exc.errno or 0, str(exc))
            self.degraded("watch_failed", "periodic_scan", d, why)
            return False
        old = self.wds.get(wd)
        if old is not None and old != d:
            self.dirs.pop(old, None)
        self.wds[wd] = d
        self.dirs[d] = wd
        self.periodic.discard(d)
        return True

    def forget(self, path: str, tree: bool) -> None:
        if tree:
            pre = path + "/"
            for d in [d for d in self.dirs if d == path or d.startswith(pre)]:
                wd = self.dirs.pop(d)
                self.wds.pop(wd, None)
                self.ino.rm_watch(wd)
            self.periodic -= {d for d in self.periodic if d == path or d.startswith(pre)}
        else:
            gone = self.dirs.pop(path, None)
            if gone is not None:
                self.wds.pop(gone, None)
            self.periodic.discard(path)

    def move(self, old: str, new: str) -> None:
        pre = old + "/"
        for d in [d for d in self.dirs if d == old or d.startswith(pre)]:
            wd = self.dirs.pop(d)
            nd = new + d[len(old):]
            self.dirs[nd] = wd
            self.wds[wd] = nd
        moved = {d for d in self.periodic if d == old or d.startswith(pre)}
        self.periodic = (self.periodic - moved) | {new + d[len(old):] for d in moved}

    def ignored(self, wd: int) -> None:
        """The kernel dropped ``wd`` (directory deleted, unmounted, or rm_watch)."""
        d = self.wds.pop(wd, None)
        if d is not None and self.dirs.get(d) == wd:
            del self.dirs[d]
