"""npm packages: ``node_modules/**/package.json``, nesting bounded.

Interface: plain files. In a ``node_modules`` directory every ``<name>/package.json`` and
``@scope/<name>/package.json`` is one package (``name`` and ``version`` from the JSON);
a package's own ``node_modules`` is read in turn, at most ``[packages] npm_depth`` levels
deep. npm keeps no file list: a package owns its directory (``prefix``), so a mapped
native addon (``.node``) or an open file inside it makes it ``active``; since node reads
and closes JavaScript files, an npm package with no evidence stays ``unmeasurable``
rather than ``dormant``.

Capability: read access to the directories.

Cost: one listdir per node_modules (and scope) directory and one read per package.json
(the scan's units); bounded by :data:`MAX_DIRS` and :data:`MAX_PACKAGES` per root, each
directory read once by identity (symlink loops end).

Failure modes: a package.json that is not JSON, not an object, or has no string ``name``
is skipped and named in ``errors`` (``.package-lock.json`` and similar are ignored);
hidden entries (``.bin``, ``.cache``) are skipped.
"""

from __future__ import annotations

import json
import os

from lw_embed.sources.packages.model import DbResult, Package, Steps, read_text

MAX_PACKAGES = 20_000  # packages under one node_modules root
MAX_DIRS = 20_000  # node_modules (and @scope) directories listed under one root


def _rel(root: str, host: str) -> str:
    return host[len(root.rstrip("/")) :] or "/" if root not in ("", "/") else host


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def scan(root: str, node_modules: str, depth: int) -> Steps[DbResult]:
    """The packages under the ``node_modules`` directory (a host path under ``root``).

    Each directory is read once by its (st_dev, st_ino), so symlink loops (``node_modules
    -> ..``) and pnpm-style links to one store end; at most :data:`MAX_DIRS` directories
    and :data:`MAX_PACKAGES` packages (beyond: an error, the rest not read). The mtimes of
    every node_modules directory read are kept in ``watched`` (a nested install changes
    one of them)."""
    res = DbResult()
    todo = [(node_modules, 1)]
    seen_dirs: set[tuple[int, int]] = set()
    seen_pkgs: set[tuple[int, int]] = set()
    while todo:
        nm, level = todo.pop()
        ident = _ident(nm)
        if ident is None or ident in seen_dirs:
            continue
        if len(seen_dirs) >= MAX_DIRS:
            res.errors.append(f"npm: {node_modules}: more than {MAX_DIRS} directories: "
                              "the rest not read")  # fmt: skip
            break
        seen_dirs.add(ident)
        try:
            res.watched[nm] = os.stat(nm).st_mtime_ns
            entries = sorted(os.listdir(nm))
        except OSError as exc:
            res.errors.append(f"npm: {nm}: {exc.strerror or exc}")
            continue
        yield 1
        dirs: list[str] = []
        for e in entries:
            if e.startswith("."):
                continue
            if e.startswith("@"):
                scope = os.path.join(nm, e)
                sid = _ident(scope)
                if sid is None or sid in seen_dirs:
                    continue
                seen_dirs.add(sid)
                try:
                    dirs += [os.path.join(scope, s) for s in sorted(os.listdir(scope))
                             if not s.startswith(".")]  # fmt: skip
                except OSError:
                    continue
                yield 1
            else:
                dirs.append(os.path.join(nm, e))
        for d in dirs:
            pid = _ident(d)
            if pid is None or pid in seen_pkgs:
                continue
            seen_pkgs.add(pid)
            pj = os.path.join(d, "package.json")
            try:
                text = read_text(pj, 4 << 20)
            except OSError:
                continue
            yield 1
            try:
                data = json.loads(text)
            except ValueError as exc:
                res.errors.append(f"npm: {pj}: {exc}")
                continue
            name = data.get("name") if isinstance(data, dict) else None
            if not isinstance(name, str) or not name:
                res.errors.append(f"npm: {pj}: no name")
                continue
            if len(res.packages) >= MAX_PACKAGES:
                res.errors.append(f"npm: {node_modules}: more than {MAX_PACKAGES} packages: "
                                  "the rest not read")  # fmt: skip
                return res
            version = data.get("version")
            real = os.path.realpath(d) if root in ("", "/") else d
            res.packages.append(Package(
                ecosystem="npm", name=name, version=version if isinstance(version, str) else "",
                arch="", source="npm", location=node_modules, files=None,
                prefix=_rel(root, real), meta_path=_rel(root, pj),
            ))  # fmt: skip
            sub = os.path.join(d, "node_modules")
            if level < depth and os.path.isdir(sub):
                todo.append((sub, level + 1))
    return res
