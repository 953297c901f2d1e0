"""The file source's changes: whether a file must be hashed, its digest, and the fields of
its ``file.change`` event (package ownership included).

Interface: ``open``/``read`` through :class:`lw_embed.pipeline.baseline.Hasher`; the
package owner index (:mod:`lw_embed.sources.fileowners`). Used by
:class:`lw_embed.sources.files.FilesSource` (events) and its scanner
(:mod:`lw_embed.sources.filescan`), which share one :class:`Changes`.

Capability: read access to the monitored files.

Cost: a file is read only when its (inode, size, mtime, ctime) differ from the baseline's;
the bytes read are charged to the scan's byte bucket. A package-owned file whose
package records another algorithm (dpkg: md5) is read once more for that digest.

Failure modes: an unreadable or vanished file gives no digest and a ``hash_skipped``
reason; an owner index that raises is counted (``files.package_errors``), never raised.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from lw_embed.config import FilesConfig
from lw_embed.pipeline.baseline import Entry, Hasher, same_content_key
from lw_embed.pipeline.filerules import CompiledRule, RuleSet
from lw_embed.sources.fileowners import PackageOwners

#: actions whose event says which package owns the file
_PACKAGE_ACTIONS = frozenset(("create", "modify", "rename", "delete"))


class Changes:
    __slots__ = ("cfg", "count", "own_reads", "owners", "reads", "rules", "take_bytes")

    def __init__(self, cfg: FilesConfig, rules: RuleSet, owners: PackageOwners | None,
                 count: Callable[[str, int], None], take_bytes: Callable[[int], None],
                 reads: bool) -> None:  # fmt: skip
        self.cfg = cfg
        self.rules = rules
        self.owners = owners
        self.count = count
        self.take_bytes = take_bytes
        self.reads = reads
        #: our own hashing opens of files under a rule with "read": their IN_CLOSE_NOWRITE
        #: is not the workload's read
        self.own_reads: dict[str, int] = {}

    def known_hash(self, path: str, st: os.stat_result, rule: CompiledRule,
                   old: Entry | None) -> tuple[str | None, str | None] | None:  # fmt: skip
        """(digest, skipped) when the file need not be read; None when it must be hashed."""
        if not stat.S_ISREG(st.st_mode):
            return None, None
        if not rule.hash:
            return None, "disabled"
        if self.rules.is_secret(path):
            return None, "secret"
        if same_content_key(old, st):
            return old.hash if old else None, None
        return None

    def hasher(self, path: str, algorithm: str = "") -> Hasher:
        if self.reads and self.rules.rule_of(path) is not None:
            self.own_reads[path] = self.own_reads.get(path, 0) + 1
            if len(self.own_reads) > 100000:
                self.own_reads.clear()
        return Hasher(path, algorithm or self.cfg.hash_algorithm, self.cfg.hash_max_bytes)

    def hashed(self, n: int) -> None:
        self.take_bytes(n)
        self.count("hashed_bytes", n)

    def digest(self, path: str) -> tuple[str | None, str | None]:
        """Read and hash ``path`` now (charged to the byte bucket): (digest, skipped)."""
        digest, skipped, n = self.hasher(path).finish()
        self.hashed(n)
        return digest, skipped

    def hash_of(self, path: str, st: os.stat_result, rule: CompiledRule,
                old: Entry | None) -> tuple[str | None, str | None]:  # fmt: skip
        known = self.known_hash(path, st, rule, old)
        return known if known is not None else self.digest(path)

    def own_read_closed(self, path: str) -> bool:
        """Whether an ``IN_CLOSE_NOWRITE`` of ``path`` is the close of our own hashing."""
        own = self.own_reads.get(path)
        if not own:
            return False
        if own == 1:
            del self.own_reads[path]
        else:
            self.own_reads[path] = own - 1
        return True

    def fields(self, path: str, action: str, rule: CompiledRule, old: Entry | None,
               new: Entry | None, detected_by: str, wall: int,
               hash_skipped: str | None = None, **extra: Any) -> dict[str, Any]:  # fmt: skip
        """The fields of one change's event (metadata from ``new``, else ``old``); the
        event is built when it is released, attribution included."""
        e = new or old
        kw: dict[str, Any] = {"time": wall, "path": path, "action": action, "rule": rule.name,
                              "detected_by": detected_by, "hash_skipped": hash_skipped}
        if e is not None:
            kw.update(type=e.type, inode=e.inode, mode=e.mode, owner_uid=e.uid,
                      owner_gid=e.gid, size=e.size, mtime=e.mtime)  # fmt: skip
        if new is not None and new.hash:
            kw.update(hash=new.hash, hash_algorithm=self.cfg.hash_algorithm)
            if old is not None and old.hash != new.hash:
                kw["previous_hash"] = old.hash
        kw.update(extra)
        if self.owners is not None and action in _PACKAGE_ACTIONS:
            self._package(kw, new)
        return kw

    def _package(self, kw: dict[str, Any], new: Entry | None) -> None:
        path = kw["path"]
        try:
            owner = self.owners.owner(path) if self.owners else None
        except Exception:  # the index is someone else's: never let it break us
            self.count("package_errors", 1)
            return
        if owner is None:
            return
        label, algo, recorded = owner
        kw["package"] = label
        if recorded and new is not None and stat.S_ISREG(new.mode) and algo:
            digest = new.hash if algo == self.cfg.hash_algorithm else None
            if digest is None and not self.rules.is_secret(path):
                digest = self.hasher(path, algo).finish()[0]
            if digest is not None:
                kw["package_digest_mismatch"] = digest != recorded
