"""Hot reload of the ``[filter]`` and ``[aggregate]`` sections of the config file.

Interface: ``stat(2)`` of the config file (mtime_ns, size, inode), at most once per
:data:`POLL_INTERVAL` seconds of the injected clock, and a flag set by a SIGHUP handler
(:meth:`RulesWatcher.request` only assigns an attribute, which is safe in a Python signal
handler). :meth:`RulesWatcher.try_reload` reads the file with
:func:`lw_embed.config.load_config` (``LW_EMBED_*`` overrides from the environment
included) and compiles the new filter aside.

Semantics: only ``[filter]`` and ``[aggregate]`` are applied live. A reload that parses
and compiles gives the config now in effect (the caller's config with those two sections
replaced) and the compiled :class:`~lw_embed.pipeline.filter.FilterProgram`; it also names
the keys of other sections that differ from the file as last loaded, so the caller can log
"restart needed for: tracer.mode". A reload that fails gives only the error message: the
caller keeps the old rules and says so (``agent.config_rejected``).

Capability: read access to the config file.

Cost: one ``stat`` a second while the caller polls; a reload reads and validates the file
and compiles the rules (milliseconds).

Failure modes: a missing or unreadable file counts as a change (the reload then fails and
says why); nothing here raises :class:`~lw_embed.errors.ConfigError` to the caller.
Counters: ``reloads`` (applied), ``rejected``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lw_embed.config import Config, config_to_dict, load_config
from lw_embed.errors import ConfigError
from lw_embed.pipeline.filter import FilterProgram

__all__ = ["LIVE_SECTIONS", "POLL_INTERVAL", "ReloadResult", "RulesWatcher"]

#: the sections a reload applies without a restart
LIVE_SECTIONS = ("filter", "aggregate")
#: seconds of the clock between two stat() calls of the file
POLL_INTERVAL = 1.0

_Signature = tuple[int, int, int] | None  # (mtime_ns, size, inode); None: stat failed


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of :meth:`RulesWatcher.try_reload`.

    On success ``config`` is the config now in effect (the caller's, with ``[filter]`` and
    ``[aggregate]`` from the file), ``program`` its compiled filter, ``changed`` the live
    sections that differ from before, ``restart_needed`` the dotted keys of the other
    sections whose value in the file changed (not applied). On failure ``config`` and
    ``program`` are None and ``error`` says why.
    """

    config: Config | None
    error: str | None
    program: FilterProgram | None = None
    changed: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.config is not None


def _differences(
    old: Mapping[str, Any], new: Mapping[str, Any], skip: tuple[str, ...]
) -> list[str]:
    out: list[str] = []
    for section in new:
        if section in skip:
            continue
        a, b = old.get(section, {}), new[section]
        out.extend(f"{section}.{k}" for k in {**a, **b} if a.get(k) != b.get(k))
    return out


class RulesWatcher:
    """Says when the config file should be reloaded, and reloads it."""

    __slots__ = (
        "_clock", "_env", "_last", "_next_poll", "_requested", "_signature", "path",
        "rejected", "reloads",
    )  # fmt: skip

    def __init__(
        self,
        path: str | None,
        clock: Callable[[], float],
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Watch ``path`` (None: no file, only :meth:`request` triggers a reload).

        ``env`` is the environment for ``LW_EMBED_*`` overrides (default ``os.environ``,
        read at each reload). The file's current state is the baseline: an edit made after
        this call is a change.
        """
        self.path = path
        self._clock = clock
        self._env = env
        self._requested = False
        self._signature = self._stat()
        self._next_poll = clock() + POLL_INTERVAL
        self._last = self._load_quietly()  # the file as last loaded (for restart_needed)
        self.reloads = 0
        self.rejected = 0

    def _stat(self) -> _Signature:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> Config:
        return load_config(self.path, os.environ if self._env is None else self._env)

    def _load_quietly(self) -> Config | None:
        try:
            return self._load()
        except ConfigError:
            return None

    # -- triggers -------------------------------------------------------------------------
    def request(self) -> None:
        """Ask for a reload (from a SIGHUP handler: it only sets a flag)."""
        self._requested = True

    @property
    def requested(self) -> bool:
        return self._requested

    def changed(self) -> bool:
        """True when a reload is due: it was requested, or the file changed since the last
        time this said so. The file is stat'ed at most once per POLL_INTERVAL."""
        now = self._clock()
        if self._requested:
            self._requested = False
            self._signature = self._stat()
            self._next_poll = now + POLL_INTERVAL
            return True
        if self.path is None or now < self._next_poll:
            return False
        self._next_poll = now + POLL_INTERVAL
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    # -- reload ---------------------------------------------------------------------------
    def try_reload(self, current: Config) -> ReloadResult:
        """Load and compile the file aside; never raises ConfigError.

        ``current`` is the config in effect; only its ``[filter]`` and ``[aggregate]`` are
        replaced in the result.
        """
        try:
            new = self._load()
            program = FilterProgram(new.filter)
        except ConfigError as exc:
            self.rejected += 1
            return ReloadResult(None, str(exc))
        applied = dataclasses.replace(current, filter=new.filter, aggregate=new.aggregate)
        changed = tuple(s for s in LIVE_SECTIONS if getattr(current, s) != getattr(new, s))
        base = config_to_dict(self._last if self._last is not None else current)
        restart = _differences(base, config_to_dict(new), LIVE_SECTIONS)
        self._last = new
        self.reloads += 1
        return ReloadResult(applied, None, program, changed, tuple(restart))
