"""The file-integrity baseline: what every monitored path looked like, in a local SQLite file.

Interface: :mod:`sqlite3` (one file, WAL journal, ``synchronous=NORMAL``); ``lstat(2)`` and
``open(O_RDONLY|O_NOFOLLOW|O_NONBLOCK[|O_NOATIME])`` + ``read`` for hashing. A row is
(path, parent, inode, mode, uid, gid, size, mtime_ns, hash); ``parent`` is indexed so a
directory's recorded children are one query (deletions found by a scan).

Capability: read access to the monitored files (root for most of /etc), a writable
data dir for the database.

Cost: one indexed SELECT per checked path, one INSERT OR REPLACE per change; writes are
grouped in a transaction committed by :meth:`Baseline.commit` (once per worker poll).
Hashing reads the file once in 1 MiB chunks (the caller rate-limits the bytes).

Failure modes: a corrupt or unreadable database is moved aside (``.corrupt``) and a new
one started (the next start then reports nothing as changed offline: it re-baselines);
a file that vanishes or cannot be read while hashed gives ``hash=None`` with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import stat
from dataclasses import dataclass

log = logging.getLogger("lw_embed.files")

CHUNK = 1 << 20
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, parent TEXT NOT NULL, inode INTEGER, mode INTEGER, uid INTEGER,
    gid INTEGER, size INTEGER, mtime INTEGER, hash TEXT, ctime INTEGER);
CREATE INDEX IF NOT EXISTS files_parent ON files(parent);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    path: str
    inode: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int  # ns
    hash: str | None
    #: ns; not compared (a chmod moves it too) but part of the no-rehash key: unlike mtime,
    #: no unprivileged call can set it back
    ctime: int = 0

    @property
    def parent(self) -> str:
        return os.path.dirname(self.path)

    @property
    def type(self) -> str:
        m = self.mode
        if stat.S_ISREG(m):
            return "file"
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISLNK(m):
            return "symlink"
        return "other"


def entry_of(path: str, st: os.stat_result, digest: str | None) -> Entry:
    return Entry(path, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size,
                 st.st_mtime_ns, digest, st.st_ctime_ns)  # fmt: skip


def compare(old: Entry | None, new: Entry) -> str | None:
    """The action that turns ``old`` into ``new``: create, modify, attrib, or None."""
    if old is None:
        return "create"
    if old.hash is not None and new.hash is not None:
        content = old.hash != new.hash
    else:
        content = old.size != new.size or old.mtime != new.mtime or old.inode != new.inode
    if content or stat.S_IFMT(old.mode) != stat.S_IFMT(new.mode):
        return "modify"
    if (old.mode, old.uid, old.gid, old.inode, old.mtime) != (
        new.mode, new.uid, new.gid, new.inode, new.mtime
    ):
        return "attrib"
    return None


def same_content_key(old: Entry | None, st: os.stat_result) -> bool:
    """Whether ``old``'s hash still describes the file behind ``st`` (no rehash needed)."""
    return (
        old is not None
        and old.hash is not None
        and (old.inode, old.size, old.mtime, old.ctime)
        == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    )


class Hasher:
    """The digest of one regular file, read ``step`` bytes at a time, so that a large file
    never holds its caller for long; :attr:`result` is set once it is finished (the fd is
    closed then, or by :meth:`close`)."""

    __slots__ = ("_fd", "_h", "max_bytes", "n", "result")

    def __init__(self, path: str, algorithm: str, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.n = 0
        self.result: tuple[str | None, str | None, int] | None = None
        self._fd = -1
        self._h = hashlib.new(algorithm)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            try:
                self._fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
            except PermissionError:  # O_NOATIME needs ownership or CAP_FOWNER
                self._fd = os.open(path, flags)
            st = os.fstat(self._fd)
        except OSError:
            self._end(None, "unreadable")
            return
        if not stat.S_ISREG(st.st_mode):
            self._end(None, "not_regular")
        elif st.st_size > max_bytes:
            self._end(None, "too_large")

    def _end(self, digest: str | None, skipped: str | None) -> None:
        self.result = (digest, skipped, self.n)
        self.close()

    def step(self, budget: int) -> int:
        """Read and hash up to about ``budget`` bytes; the number read."""
        if self.result is not None:
            return 0
        got = 0
        try:
            while got < budget:
                chunk = os.read(self._fd, CHUNK)
                if not chunk:
                    self._end(self._h.hexdigest(), None)
                    break
                self._h.update(chunk)
                got += len(chunk)
                self.n += len(chunk)
                if self.n > self.max_bytes:  # grew while read
                    self._end(None, "too_large")
                    break
        except OSError:
            self._end(None, "unreadable")
        return got

    def finish(self) -> tuple[str | None, str | None, int]:
        """Read the rest at once: (hex digest, skipped reason, bytes read)."""
        while self.result is None:
            self.step(1 << 30)
        return self.result

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1



class Baseline:
    """The SQLite baseline (``:memory:`` for tests)."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: why an unusable database was moved aside and a new one started ("" = it was not)
        self.reset = ""
        try:
            self.db = self._open(path)
        except sqlite3.DatabaseError as exc:
            log.warning("file baseline %s unusable (%s): starting a new one", path, exc)
            self.reset = str(exc)
            with contextlib.suppress(OSError):
                os.replace(path, path + ".corrupt")
            self.db = self._open(path)

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        if path != ":memory:":
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        db.execute("SELECT count(*) FROM files").fetchone()  # fails on a corrupt file
        if "ctime" not in {r[1] for r in db.execute("PRAGMA table_info(files)")}:
            db.execute("ALTER TABLE files ADD COLUMN ctime INTEGER")  # an older baseline
        return db

    def get(self, path: str) -> Entry | None:
        row = self.db.execute(
            "SELECT path, inode, mode, uid, gid, size, mtime, hash, coalesce(ctime, 0) FROM files "
            "WHERE path=?",
            (path,),
        ).fetchone()
        return Entry(*row) if row else None

    def put(self, e: Entry) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?)",
            (e.path, e.parent, e.inode, e.mode, e.uid, e.gid, e.size, e.mtime, e.hash, e.ctime),
        )

    def children(self, parent: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM files WHERE parent=?", (parent,))]

    def tree(self, path: str) -> list[str]:
        """``path`` and every recorded path below it."""
        lo, hi = path.rstrip("/") + "/", path.rstrip("/") + "0"
        rows = self.db.execute(
            "SELECT path FROM files WHERE path=? OR (path>=? AND path<?)", (path, lo, hi)
        )
        return [r[0] for r in rows]

    def delete_tree(self, path: str) -> list[str]:
        """Forget ``path`` and everything below it; the paths forgotten, deepest first."""
        paths = self.tree(path)
        lo, hi = path.rstrip("/") + "/", path.rstrip("/") + "0"
        self.db.execute("DELETE FROM files WHERE path=? OR (path>=? AND path<?)", (path, lo, hi))
        return sorted(paths, key=len, reverse=True)

    def rename_tree(self, old: str, new: str) -> None:
        """Move the rows of ``old`` and everything below it to ``new``."""
        self.delete_tree(new)
        n = len(old)
        lo, hi = old.rstrip("/") + "/", old.rstrip("/") + "0"
        rows = self.db.execute(
            "SELECT path, inode, mode, uid, gid, size, mtime, hash, coalesce(ctime, 0) FROM files "
            "WHERE path=? OR (path>=? AND path<?)", (old, lo, hi)
        ).fetchall()  # fmt: skip
        self.db.execute("DELETE FROM files WHERE path=? OR (path>=? AND path<?)", (old, lo, hi))
        for row in rows:
            self.put(Entry(new + row[0][n:], *row[1:]))

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM files").fetchone()[0])

    def all(self) -> dict[str, Entry]:
        return {r[0]: Entry(*r) for r in self.db.execute(
            "SELECT path, inode, mode, uid, gid, size, mtime, hash, coalesce(ctime, 0) "
            "FROM files")}  # fmt: skip

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value))

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.db.commit()
            self.db.close()
