"""The one error hierarchy of lw_embed.

Every error the agent raises on purpose derives from :class:`LwEmbedError`, so callers at a
boundary (the CLI, the core loop, the worker supervisor) can tell the agent's own failures
from bugs.
"""

from __future__ import annotations


class LwEmbedError(Exception):
    """Base of every error lw_embed raises on purpose."""


class ConfigError(LwEmbedError):
    """A config file, environment override or option is invalid.

    ``key`` is the dotted name of the offending key (``tracer.argv_max_bytes``) or ``""``
    when the file itself is unreadable. The CLI exits 2 on this error, before starting
    anything.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class RecordError(LwEmbedError):
    """A core->worker record or a batch file is malformed."""
