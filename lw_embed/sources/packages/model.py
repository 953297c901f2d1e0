"""The package model shared by the database readers, and the stepping protocol they follow.

Interface: none of its own. Each reader (:mod:`.dpkg`, :mod:`.rpm`, :mod:`.apk`,
:mod:`.python`, :mod:`.npm`) is a generator that ``yield``s the number of files or
directories it has just read (the unit of the scan's rate limit; ``0`` marks a point where
CPU-only work may be sliced) and ``return``s a :class:`DbResult`. The caller decides how
fast to drive it: the worker source in time slices under ``[packages] scan_rate``, the
command line at full speed (:func:`run`).

Capability: none (plain reads of the root's files).

Cost: the readers keep file lists as tuples of str; a full Debian root is about 120k
paths (about 15 MB with the owner index built from them). Bounded: a package keeps at most
:data:`MAX_FILES` paths, a database file is read up to :data:`MAX_DB_BYTES`, a file list
up to :data:`MAX_LIST_BYTES`.

Failure modes: readers never raise on bad input: an unreadable or malformed database
becomes an entry of ``DbResult.errors`` (and the packages it could read are kept); a
database format that is detected but not read (rpm Berkeley DB, NDB) is an entry of
``DbResult.unsupported``, never silently skipped. A listed path that contains a NUL byte
or is not absolute after ``normpath`` is dropped and counted (``DbResult.dropped``); a
file list over a cap is not indexed (the package keeps ``files=None`` with a ``reason``:
it is ``unmeasurable``) and named in ``errors``; a database truncated at its cap is an
error too, never silent.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

T = TypeVar("T")
#: A reader: yields work units done, returns its result.
Steps = Generator[int, None, T]

MAX_FILES = 200_000  # paths of one package (the largest Debian ones have under 100k)
MAX_DB_BYTES = 64 << 20  # a status / installed database file
MAX_LIST_BYTES = 16 << 20  # one file list (info/*.list, RECORD, ...)
SLICE_LINES = 1000  # lines between two slicing points of a reader


@dataclass(frozen=True, slots=True)
class Package:
    """One installed package as its database records it."""

    ecosystem: str  # deb | rpm | apk | pypi | npm
    name: str
    version: str
    arch: str  # "" when the database does not say
    source: str  # dpkg | dpkg-status.d | rpm-sqlite | apk | python-dist-info | ...
    location: str  # the database file or directory it was read from (host path)
    files: tuple[str, ...] | None  # absolute paths inside the root; None = no file list
    prefix: str = ""  # a directory whose files it owns (npm), inside the root
    meta_path: str = ""  # its own metadata file inside the root (language packages)
    reason: str = ""  # why files is None, when a list exists but was not indexed

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity across rescans (the version is what changes on an upgrade)."""
        return (self.ecosystem, self.name, self.arch, self.location)


@dataclass(slots=True)
class DbResult:
    """What one reader found."""

    packages: list[Package] = field(default_factory=list)
    unsupported: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dropped: int = 0  # listed paths dropped: NUL byte, not absolute
    watched: dict[str, int] = field(default_factory=dict)  # extra paths -> mtime at read


def inside(root: str, path: str) -> str:
    """The host path of ``path`` (absolute, inside the root)."""
    if root in ("", "/"):
        return path
    return root.rstrip("/") + path


def clean_path(raw: str) -> str | None:
    """``raw`` normalised (``/./x``, ``a/../b``, ``//x``), or None when it holds a NUL byte
    or is not absolute: such a path could never be shown by /proc and breaks ``stat``."""
    if "\0" in raw or not raw.startswith("/"):
        return None
    p = os.path.normpath(raw)
    if p.startswith("//"):
        p = "/" + p.lstrip("/")
    return p


Listed = tuple[tuple[str, ...] | None, str]  # (files, reason when files is None)


def collect(paths: Iterable[str], res: DbResult, who: str) -> Steps[Listed]:
    """Clean ``paths`` (see :func:`clean_path`) up to :data:`MAX_FILES`; (files, reason):
    ``(None, reason)`` when the list is over the cap (named in ``res.errors``)."""
    out: list[str] = []
    n = 0
    for raw in paths:
        n += 1
        if n % SLICE_LINES == 0:
            yield 0
        p = clean_path(raw)
        if p is None:
            res.dropped += 1
            continue
        out.append(p)
        if len(out) > MAX_FILES:
            res.errors.append(f"{who}: more than {MAX_FILES} files: not indexed")
            return None, f"file list over {MAX_FILES} paths"
    return tuple(out), ""


def read_text(path: str, limit: int = MAX_DB_BYTES) -> str:
    """A file's text (UTF-8, bad bytes replaced), at most ``limit`` bytes."""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


def read_capped(path: str, limit: int, res: DbResult, who: str) -> str:
    """Like :func:`read_text`, but a file over ``limit`` is an error in ``res`` (the text is
    cut at its last whole line)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        res.errors.append(f"{who}: {path}: larger than {limit} bytes: read truncated")
        data = data[: data.rfind(b"\n", 0, limit) + 1]
    return data.decode("utf-8", "replace")


def lines_of(path: str, res: DbResult, who: str,
             limit: int = MAX_LIST_BYTES) -> Generator[str, None, None]:  # fmt: skip
    """The lines of a file (stripped, UTF-8 with bad bytes replaced), read lazily, at most
    ``limit`` bytes (beyond: an error in ``res``) and 4096 bytes a line (longer lines come
    in pieces that are never absolute paths). The open is eager: it may raise OSError."""
    return _lines(open(path, "rb"), path, res, who, limit)


def _lines(f: BinaryIO, path: str, res: DbResult, who: str,
           limit: int) -> Generator[str, None, None]:  # fmt: skip
    with f:
        total = 0
        while True:
            line = f.readline(4097)
            if not line:
                return
            total += len(line)
            if total > limit:
                res.errors.append(f"{who}: {path}: larger than {limit} bytes: read truncated")
                return
            yield line.decode("utf-8", "replace").strip()


def stanzas(text: str) -> Generator[dict[str, str], None, None]:
    """RFC 822-like stanzas (dpkg status): ``Key: value`` lines, continuation lines start
    with a space, stanzas are separated by blank lines. Keys keep their case."""
    cur: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if cur:
                yield cur
            cur, last = {}, ""
            continue
        if line[0] in " \t":
            if last:
                cur[last] += "\n" + line[1:]
            continue
        k, sep, v = line.partition(":")
        if not sep:
            continue
        last = k.strip()
        cur[last] = v.strip()
    if cur:
        yield cur


def run(steps: Steps[T]) -> T:
    """Drive a reader to its end at full speed."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: T = stop.value
            return result


def mtime_of(path: str) -> int:
    """``st_mtime_ns`` of a path, or -1 when it does not exist."""
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return -1
