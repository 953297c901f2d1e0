"""``python -m lw_embed`` is the ``lw-embed`` command."""

from lw_embed.cli import main

raise SystemExit(main())
