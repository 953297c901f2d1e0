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
(the scan's units).

Failure modes: a package.json that is not JSON, not an object, or has no string ``name``
is skipped and named in ``errors`` (``.package-lock.json`` and similar are ignored);
hidden entries (``.bin``, ``.cache``) are skipped.
"""

from __future__ import annotations

import json
import os

from lw_embed.sources.packages.model import DbResult, Package, Steps, read_text


def _rel(root: str, host: str) -> str:
    return host[len(root.rstrip("/")):] or "/" if root not in ("", "/") else host


def scan(root: str, node_modules: str, depth: int) -> Steps[DbResult]:
    """The packages under the ``node_modules`` directory (a host path under ``root``)."""
    res = DbResult()
    todo = [(node_modules, 1)]
    while todo:
        nm, level = todo.pop()
        try:
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
                try:
                    dirs += [os.path.join(nm, e, s) for s in sorted(os.listdir(os.path.join(nm, e)))
                             if not s.startswith(".")]  # fmt: skip
                except OSError:
                    continue
                yield 1
            else:
                dirs.append(os.path.join(nm, e))
        for d in dirs:
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
            version = data.get("version")
            res.packages.append(Package(
                ecosystem="npm", name=name, version=version if isinstance(version, str) else "",
                arch="", source="npm", location=node_modules, files=None,
                prefix=_rel(root, d), meta_path=_rel(root, pj),
            ))  # fmt: skip
            sub = os.path.join(d, "node_modules")
            if level < depth and os.path.isdir(sub):
                todo.append((sub, level + 1))
    return res
