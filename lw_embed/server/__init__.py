"""The bundled backend: ``lw-embed ingest`` (receiver and query API) and ``lw-embed query``.

Interface: :mod:`lw_embed.server.store` (SQLite), :mod:`lw_embed.server.ingest` (the aiohttp
server speaking docs/protocol.md), :mod:`lw_embed.server.query` (the stdlib client of its
query endpoints). This module only holds :func:`read_token`, shared by both subcommands and
cheap to import (the client side must not pay for aiohttp).

Capability: read access to the token file.

Cost: one small read.

Failure modes: an unreadable, oversized, non-UTF-8 or empty token file raises
:class:`~lw_embed.errors.ConfigError` (the CLI exits 2 on it, before starting anything).
"""

from __future__ import annotations

from lw_embed.errors import ConfigError

#: A token file larger than this is not a token file.
MAX_TOKEN_BYTES = 4096


def read_token(path: str) -> str:
    """The bearer token in ``path``: its text with surrounding whitespace stripped."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise ConfigError("", f"token file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_TOKEN_BYTES:
        raise ConfigError("", f"token file {path}: larger than {MAX_TOKEN_BYTES} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"token file {path}: not UTF-8 text") from exc
    if not token:
        raise ConfigError("", f"token file {path}: empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError("", f"token file {path}: whitespace or control characters in the token")
    return token
