"""lw_embed: a userspace runtime security agent for containers without eBPF.

Modes: the PID-1 wrapper (``lw-embed run -- CMD``), the sidecar and in-app mode. See
README.md for usage and docs/schema.md for the event schema.
"""

__version__ = "0.1.0"
