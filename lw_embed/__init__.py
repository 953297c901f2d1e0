"""lw_embed: a userspace runtime security agent for containers without eBPF.

Modes: the PID-1 wrapper (``lw-embed run -- CMD``), the sidecar and in-app mode
(``lw_embed.start()``, docs/inapp.md). See README.md for usage and docs/schema.md for the
event schema. Importing this package is cheap: the in-app agent is imported by
:func:`start`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def start(**options: Any) -> bool:
    """Start the in-app agent in a daemon thread of this process; False if it runs already.

    Options are the CLI's (``output``, ``data_dir``, ``backend``, ``token``, ``config``) or
    any config key as ``section_key=`` / ``**{"section.key": ...}``. A bad option raises
    :class:`lw_embed.errors.ConfigError` naming it.
    """
    from lw_embed.runtime import embedded

    return embedded.start(**options)


def stop(timeout: float | None = None) -> bool:
    """Stop the in-app agent, shipping for at most ``timeout`` s (default
    ``shutdown.flush``); True if it ended in time."""
    from lw_embed.runtime import embedded

    return embedded.stop(timeout)


def flush(timeout: float | None = None) -> bool:
    """Ship what the in-app agent has now; True if nothing is left pending in time."""
    from lw_embed.runtime import embedded

    return embedded.flush(timeout)
