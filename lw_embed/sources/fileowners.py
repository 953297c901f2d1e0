"""Which installed package owns a monitored file, and the digest its database recorded.

Interface: the :class:`PackageOwners` protocol, provided by :class:`DpkgOwners`:
``<root>/var/lib/dpkg/info/*.list`` read once, lazily, keeping only the paths under the
monitored roots (so its memory is bounded by what is monitored, not by the image); each
listed directory is resolved once with ``realpath`` so usr-merged ``/bin/ls`` matches
``/usr/bin/ls``. The recorded digest (md5) comes from ``info/<package>.md5sums``, read
per package on first need. :class:`InventoryOwners` asks the package source's inventory
first (every ecosystem it reads: deb, rpm, apk, pypi, npm; the same worker process), and
the dpkg owners until that inventory exists and for dpkg's digests; rpm, apk and language
packages give a label and no recorded digest.

Capability: read access to the dpkg database. Cost: one pass over the ``.list`` files
(about 120k lines, ~0.3 s here) at the first lookup; then a dict lookup per change, and
one md5sums read per package (cached, 256 packages). Failure modes: no dpkg database =
no owners (``owner`` returns None); unreadable files are skipped.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lw_embed.config import Config
from lw_embed.pipeline.filerules import canonical

MD5_CACHE = 256


class PackageOwners(Protocol):
    """The package inventory's owner index, as this source uses it."""

    def owner(self, path: str) -> tuple[str, str | None, str | None] | None:
        """(package label, digest algorithm, recorded digest) of the package owning
        ``path``, or None."""


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class _Md5sums:
    """Recorded md5 digests per dpkg package, read on demand (LRU)."""

    def __init__(self, info: str) -> None:
        self.info = info
        self._cache: OrderedDict[str, dict[str, str]] = OrderedDict()

    def digest(self, package: str, path: str, aliases: dict[str, str]) -> str | None:
        sums = self._cache.get(package)
        if sums is None:
            sums = {}
            base = package.split(":", 1)[0]
            for cand in (f"{package}.md5sums", f"{base}.md5sums"):
                try:
                    with open(os.path.join(self.info, cand), errors="surrogateescape") as f:
                        for line in f:
                            digest, _, rel = line.rstrip("\n").partition("  ")
                            p = "/" + rel
                            sums[aliases.get(p, p)] = digest
                    break
                except OSError:
                    continue
            self._cache[package] = sums
            if len(self._cache) > MD5_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(package)
        return sums.get(path)


class DpkgOwners:
    """Owners of monitored paths from the dpkg database (see the module docstring)."""

    def __init__(self, roots: Sequence[str], root: str = "/") -> None:
        self.roots = tuple(roots)
        self.root = root
        self.info = os.path.join(root, "var/lib/dpkg/info")
        self._index: dict[str, str] | None = None
        self._alias: dict[str, str] = {}  # listed path -> canonical path (usr-merge)
        self._md5 = _Md5sums(self.info)

    def _build(self) -> dict[str, str]:
        index: dict[str, str] = {}
        real_dirs: dict[str, str] = {}
        try:
            names = [n for n in os.listdir(self.info) if n.endswith(".list")]
        except OSError:
            return index
        for name in names:
            pkg = name[:-5]
            try:
                with open(os.path.join(self.info, name), errors="surrogateescape") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for listed in lines:
                d, _, base = listed.rpartition("/")
                real = real_dirs.get(d)
                if real is None:
                    real = real_dirs[d] = os.path.realpath(self.root.rstrip("/") + d or "/")
                path = f"{real}/{base}" if real != "/" else f"/{base}"
                if _under(path, self.roots):
                    index[path] = pkg
                    if path != listed:
                        self._alias[listed] = path
        return index

    def owner(self, path: str) -> tuple[str, str | None, str | None] | None:
        if self._index is None:
            self._index = self._build()
        pkg = self._index.get(path)
        if pkg is None:
            return None
        return f"deb:{pkg}", "md5", self._md5.digest(pkg, path, self._alias)


class InventoryOwners:
    """Owners from the package source's :class:`~lw_embed.sources.packages.inventory.
    Inventory` (``inventory()`` returns None until its first OS scan is done), else dpkg's."""

    def __init__(self, inventory: Callable[[], Any], dpkg: DpkgOwners | None) -> None:
        self.inventory = inventory
        self.dpkg = dpkg

    def owner(self, path: str) -> tuple[str, str | None, str | None] | None:
        inv = self.inventory()
        if inv is None:
            return self.dpkg.owner(path) if self.dpkg else None
        idx = inv.owner_of(path)
        if idx is None:
            return None
        pkg = inv.packages[idx]
        if pkg.ecosystem == "deb" and self.dpkg is not None:
            got = self.dpkg.owner(path)
            if got is not None:
                return got  # with dpkg's recorded md5
        return f"{pkg.ecosystem}:{pkg.name}", None, None


def owners_for(cfg: Config, packages: Any) -> PackageOwners | None:
    """The owner index the file source uses: the package source's inventory when there is
    one for the same root (``/``), else the dpkg database's."""
    dpkg = dpkg_owners(cfg)
    if packages is None or cfg.packages.root.rstrip("/") != "":
        return dpkg
    return InventoryOwners(lambda: packages.inv, dpkg)


def dpkg_owners(cfg: Config) -> DpkgOwners | None:
    """The dpkg owners of the monitored paths, when the root has a dpkg database."""
    root = cfg.packages.root
    if not os.path.isdir(os.path.join(root, "var/lib/dpkg/info")):
        return None
    return DpkgOwners([canonical(r.path) for r in cfg.files.effective_rules()], root)
