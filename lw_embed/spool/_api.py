"""Public types of the spool: errors, items, stats, drop reasons and priority classes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lw_embed.errors import LwEmbedError

#: Drop reasons the spool itself uses (callers add their own through Spool.drop).
EVICTED = "spool.evicted"
CORRUPT = "spool.corrupt"
MISSING = "spool.missing"
FULL = "spool.full"
TOO_LARGE = "spool.too_large"
UNENCODABLE = "spool.unencodable"
IO_ERROR = "spool.io_error"


class SpoolError(LwEmbedError):
    """The spool cannot be used (directory not writable, not open)."""


class SpoolLocked(SpoolError):
    """Another live process (or Spool instance) holds the spool directory."""


@dataclass(frozen=True, slots=True)
class SpoolItem:
    seq: int
    priority: int
    data: bytes  # CBOR of the event dict, keys sorted, including "seq"


@dataclass(frozen=True, slots=True)
class SpoolStats:
    accepted: int
    delivered: int
    pending: int
    dropped: dict[str, int]
    bytes: int
    segments: int
    quarantined_bytes: int


_LOW_KINDS = frozenset({"net.flow", "net.dns", "file.write", "file.remove", "file.rename"})


def priority_of(event: Mapping[str, Any]) -> int:
    """2 for alerts and agent.* events, 0 for flows, DNS and in-app file activity (the
    high-volume noise), 1 for the rest (process, package and file integrity events)."""
    if event.get("alert") is True:
        return 2
    kind = event.get("kind")
    if isinstance(kind, str):
        if kind.startswith("agent."):
            return 2
        if kind in _LOW_KINDS:
            return 0
    return 1
