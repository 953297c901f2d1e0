"""Zero-code in-app mode: ``LW_EMBED_AUTOSTART=1 PYTHONPATH=<lw-embed>/entrypoints python app``.

Python imports ``sitecustomize`` at start-up from ``sys.path``; this one starts the in-app
agent when ``LW_EMBED_AUTOSTART`` is ``1``/``true``/``yes``, configured by the usual
``LW_EMBED_*`` variables (docs/inapp.md). It never stops the host: any error is printed
on stderr in one line and the host runs on. Once the agent is started,
``LW_EMBED_AUTOSTART`` is removed from ``os.environ``: Python children do not start agents
of their own (the host's agent sees them in /proc). If the image already had a sitecustomize on
``sys.path`` after this directory, it is run too (``LW_EMBED_CHAIN_SITECUSTOMIZE`` is not
needed: the next one found is imported by path).
"""

from __future__ import annotations

import os
import sys


def _autostart() -> None:
    if os.environ.get("LW_EMBED_AUTOSTART", "").strip().lower() not in ("1", "true", "yes"):
        return
    here = os.path.dirname(os.path.abspath(__file__))
    pkg_root = os.path.dirname(here)  # the checkout or install that holds lw_embed/
    if os.path.isdir(os.path.join(pkg_root, "lw_embed")) and pkg_root not in sys.path:
        sys.path.append(pkg_root)
    try:
        import lw_embed

        lw_embed.start()
        # children must not start agents of their own (one per `python -c`): the parent's
        # agent reports them from /proc; a forked child gets its agent from the fork hook
        os.environ.pop("LW_EMBED_AUTOSTART", None)
    except Exception as exc:  # the host must run whatever happens to the agent
        print(f"lw-embed: in-app agent not started: {type(exc).__name__}: {exc}",
              file=sys.stderr)  # fmt: skip


def _chain() -> None:
    """Run the next sitecustomize on sys.path (the image's own), if there is one."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if not entry or os.path.abspath(entry) == here:
            continue
        path = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_lw_embed_next_sitecustomize", path)
            if spec is not None and spec.loader is not None:
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                except Exception as exc:
                    print(f"lw-embed: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return


_chain()
_autostart()
