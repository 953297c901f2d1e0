"""The package model shared by the database readers, and the stepping protocol they follow.

Interface: none of its own. Each reader (:mod:`.dpkg`, :mod:`.rpm`, :mod:`.apk`,
:mod:`.python`, :mod:`.npm`) is a generator that ``yield``s the number of files or
directories it has just read (the unit of the scan's rate limit) and ``return``s a
:class:`DbResult`. The caller decides how fast to drive it: the worker source in time
slices under ``[packages] scan_rate``, the command line at full speed (:func:`run`).

Capability: none (plain reads of the root's files).

Cost: the readers keep file lists as tuples of str; a full Debian root is about 120k
paths (about 15 MB with the owner index built from them).

Failure modes: readers never raise on bad input: an unreadable or malformed database
becomes an entry of ``DbResult.errors`` (and the packages it could read are kept); a
database format that is detected but not read (rpm Berkeley DB, NDB) is an entry of
``DbResult.unsupported``, never silently skipped.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
#: A reader: yields work units done, returns its result.
Steps = Generator[int, None, T]


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


def inside(root: str, path: str) -> str:
    """The host path of ``path`` (absolute, inside the root)."""
    if root in ("", "/"):
        return path
    return root.rstrip("/") + path


def read_text(path: str, limit: int = 64 << 20) -> str:
    """A file's text (UTF-8, bad bytes replaced), at most ``limit`` bytes."""
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


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
    except OSError:
        return -1
