"""File-monitoring rules, compiled: which paths are monitored, by which rule, for what.

Interface: none (pure Python over ``[[files.rules]]``, see :class:`lw_embed.config.FileRule`;
roots are canonicalised once with :func:`canonical` so they compare with the paths the
kernel and ``/proc/<pid>/cwd`` give; two rules on one canonical root are one: the first).

Semantics: a path belongs to the rule with the longest root that contains it. Its depth is
the number of components below the root (a file directly in the root has depth 1); a rule
with ``recursive = false`` reaches depth 1, ``max_depth = N`` depth N (0: unlimited). A
path is excluded when any component below the root matches an ``exclude`` glob: a glob
with a ``/`` is matched against the full path of the component, one without against its
name. Exclusion is decided *before* a directory is watched, so an excluded tree costs no
watch. A root that is not a directory is monitored as a single file (its parent directory
is watched, every other name in it ignored). ``secret_paths`` globs (full path, or name when
there is no ``/``) are never hashed.

Capability: none. Cost: per lookup, one prefix test per rule and one regex match per path
component below the root. Failure modes: none (a bad glob is just a literal pattern).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lw_embed.config import (
    DEFAULT_FILE_RULES,
    FILE_ACTIONS,
    Config,
    FileRule,
    config_from_dict,
    config_to_dict,
)


def _glob_re(globs: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(g) for g in globs]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    root: str
    max_depth: int  # 0 = unlimited
    actions: frozenset[str]
    hash: bool
    file_only: bool  # the root is a single file
    exclude_name: re.Pattern[str] | None
    exclude_path: re.Pattern[str] | None
    prefix: str  # root with a trailing "/"

    def contains(self, path: str) -> bool:
        if self.file_only:
            return path == self.root
        return path == self.root or path.startswith(self.prefix)

    def depth(self, path: str) -> int:
        if path == self.root:
            return 0
        return path[len(self.prefix):].count("/") + 1

    def excluded(self, path: str) -> bool:
        """Whether some component of ``path`` below the root matches an exclude glob."""
        if path == self.root or (self.exclude_name is None and self.exclude_path is None):
            return False
        rel = path[len(self.prefix):]
        cur = self.root.rstrip("/")
        for part in rel.split("/"):
            cur = f"{cur}/{part}"
            if self.exclude_name is not None and self.exclude_name.match(part):
                return True
            if self.exclude_path is not None and self.exclude_path.match(cur):
                return True
        return False


_PROC_ROOT = re.compile(r"/proc/(?:\d+|self)/root(?=/|$)")


def canonical(path: str) -> str:
    """``realpath(path)``, except below a ``/proc/<pid>/root`` prefix (a sidecar's view of
    another mount namespace): seen from here that magic link reads as our own ``/``, so
    the prefix is kept and only the rest is normalised (the kernel resolves it in the
    target's root when the path is opened)."""
    m = _PROC_ROOT.match(path)
    if m is None:
        return os.path.realpath(path)
    rest = os.path.normpath("/" + path[m.end():].lstrip("/"))
    return m.group(0) + (rest if rest != "/" else "")


def _rebase(glob: str, given: str, root: str) -> str:
    """A path exclude written against the rule's path as configured (``/app/cache/*`` with
    ``/app`` a symlink) rewritten against the resolved root the paths are tested in."""
    given = os.path.normpath(os.path.abspath(given))
    if given != root and (glob == given or glob.startswith(given + "/")):
        return root + glob[len(given):]
    return glob


def compile_rule(rule: FileRule) -> CompiledRule:
    root = canonical(rule.path)
    depth = 1 if not rule.recursive else rule.max_depth
    return CompiledRule(
        name=rule.name or rule.path,
        root=root,
        max_depth=depth,
        actions=frozenset(rule.actions),
        hash=rule.hash,
        file_only=os.path.lexists(root) and not os.path.isdir(root),
        exclude_name=_glob_re(g for g in rule.exclude if "/" not in g),
        exclude_path=_glob_re(_rebase(g, rule.path, root) for g in rule.exclude if "/" in g),
        prefix=root if root.endswith("/") else root + "/",
    )


class RuleSet:
    """The compiled rules, and the questions the watcher and the scanner ask of them."""

    __slots__ = ("_secret_name", "_secret_path", "rules")

    def __init__(self, rules: Sequence[FileRule], secret_paths: Sequence[str] = ()) -> None:
        compiled: list[CompiledRule] = []
        for r in rules:  # /bin and /usr/bin are one tree on a usr-merged image: keep one
            c = compile_rule(r)
            if all(c.root != o.root for o in compiled):
                compiled.append(c)
        # longest root first: the most specific rule wins
        self.rules: tuple[CompiledRule, ...] = tuple(
            sorted(compiled, key=lambda r: len(r.root), reverse=True)
        )
        self._secret_name = _glob_re(g for g in secret_paths if "/" not in g)
        self._secret_path = _glob_re(g for g in secret_paths if "/" in g)

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(r.root for r in self.rules)

    def rule_of(self, path: str) -> CompiledRule | None:
        """The rule ``path`` falls under (depth and exclusions included), or None."""
        for rule in self.rules:
            if rule.contains(path):
                if rule.excluded(path):
                    return None
                if rule.max_depth and rule.depth(path) > rule.max_depth:
                    return None
                return rule
        return None

    def watch_rule(self, path: str) -> CompiledRule | None:
        """The rule under which directory ``path`` is to be watched (its entries can
        match), or None."""
        rule = self.rule_of(path)
        if rule is None or rule.file_only:
            return None
        if rule.max_depth and rule.depth(path) >= rule.max_depth:
            return None
        return rule

    def is_secret(self, path: str) -> bool:
        m = _PROC_ROOT.match(path)  # a sidecar's /proc/<pid>/root/etc/shadow is /etc/shadow
        if m is not None:
            path = path[m.end():] or "/"
        if self._secret_path is not None and self._secret_path.match(path):
            return True
        name = path.rpartition("/")[2]
        return self._secret_name is not None and bool(self._secret_name.match(name))

    def under_any_root(self, path: str) -> bool:
        """The cheap prefix test (the core's): ``path`` is at or below some root."""
        return any(r.contains(path) for r in self.rules)


def with_watch(cfg: Config, paths: Sequence[str], defaults: bool = True) -> Config:
    """``cfg`` with file monitoring on and one recursive, every-action rule per path
    (``--watch PATH``); relative paths are made absolute. The rules of the config stay;
    the default rules stay when monitoring was enabled and ``defaults`` (false for a
    sidecar, whose default trees would be its own image's)."""
    if not paths:
        return cfg
    data = config_to_dict(cfg)
    files = data["files"]
    defaults = defaults and files["enabled"] and files["default_rules"]
    rules = list(files["rules"])
    if not rules and defaults:  # a default rule on a watched root gives way to the watch
        watched = {canonical(os.path.abspath(p)) for p in paths}
        rules = config_to_dict_rules(
            [r for r in DEFAULT_FILE_RULES if canonical(r.path) not in watched])
    for p in paths:
        rules.append({"path": os.path.abspath(p), "name": f"watch:{p}",
                      "actions": list(FILE_ACTIONS[:5])})
    files["rules"] = rules
    files["enabled"] = True
    return config_from_dict(data)


def config_to_dict_rules(rules: Sequence[FileRule]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for r in rules:
        out.append({"path": r.path, "name": r.name, "recursive": r.recursive,
                    "max_depth": r.max_depth, "exclude": list(r.exclude),
                    "actions": list(r.actions), "hash": r.hash})  # fmt: skip
    return out
