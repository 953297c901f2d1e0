"""The ``lw-embed`` command line: argument parsing only; each subcommand calls one function.

Exit codes: ``run`` exits with the workload's status; 2 for usage and config errors
(nothing is started); ``decode`` 0/1/2 as documented in :mod:`lw_embed.decode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from lw_embed import __version__
from lw_embed.config import Config, load_config, with_overrides
from lw_embed.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lw-embed",
        description="Userspace runtime security agent for containers without eBPF.",
    )
    p.add_argument("--version", action="version", version=f"lw-embed {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run CMD as PID 1 under the agent (wrapper mode)")
    _config_args(run)
    run.add_argument("--output", metavar="DIR", help="write CBOR batch files into DIR")
    run.add_argument("--data-dir", metavar="DIR",
                     help="spool, state and default output (or $LW_EMBED_DATA_DIR)")
    run.add_argument("--backend", metavar="URL",
                     help="ship batches to this ingest URL (or $LW_EMBED_BACKEND)")
    run.add_argument("--token", metavar="TOKEN",
                     help="bearer token for the backend (better: $LW_EMBED_TOKEN or "
                          "[backend] token_file)")
    run.add_argument("--watch", action="append", default=[], metavar="PATH",
                     help="monitor PATH (recursive, every action; repeatable)")
    run.add_argument("--pgroup", action="store_true",
                     help="forward signals to the workload's process group")  # fmt: skip
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    side = sub.add_parser("sidecar", help="watch the processes of a shared PID namespace "
                          "(pidMode: task) or of --pid trees, from a container of its own")
    _config_args(side)
    side.add_argument("--output", metavar="DIR", help="write CBOR batch files into DIR")
    side.add_argument("--watch", action="append", default=[], metavar="PATH",
                      help="monitor PATH (recursive, every action; repeatable)")
    side.add_argument("--data-dir", metavar="DIR",
                      help="spool, state and default output (or $LW_EMBED_DATA_DIR)")
    side.add_argument("--backend", metavar="URL",
                      help="ship batches to this ingest URL (or $LW_EMBED_BACKEND)")
    side.add_argument("--token", metavar="TOKEN", help="bearer token for the backend")
    side.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                      help="watch this process and its descendants only (repeatable)")
    side.add_argument("--include-init", action="store_true",
                      help="watch PID 1 of the namespace too (never a 'pause' process)")

    dec = sub.add_parser("decode", help="print events of batch files/directories as JSON lines")
    dec.add_argument("paths", nargs="+", metavar="PATH")

    val = sub.add_parser("validate-config", help="check a config file (and LW_EMBED_* vars)")
    val.add_argument("file", metavar="FILE")

    ing = sub.add_parser("ingest", help="run the bundled backend (aiohttp over SQLite)")
    ing.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    ing.add_argument("--db", required=True, metavar="FILE", help="SQLite database")
    ing.add_argument("--token-file", required=True, metavar="FILE",
                     help="the bearer token agents and queries must present")
    ing.add_argument("--max-body", type=int, default=8 << 20, metavar="BYTES",
                     help="largest compressed body (413 beyond)")
    ing.add_argument("--max-decompressed", type=int, default=4 << 20, metavar="BYTES",
                     help="largest body once decompressed (413 beyond)")
    ing.add_argument("--max-concurrency", type=int, default=8, metavar="N")
    ing.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests waiting beyond this get 503 + Retry-After")

    for name, what in (("query", "print stored events as JSON lines"),
                       ("agents", "print the agents the backend knows")):
        q = sub.add_parser(name, help=what)
        q.add_argument("--server", required=True, metavar="URL")
        q.add_argument("--token-file", metavar="FILE", help="(or $LW_EMBED_TOKEN)")
        if name == "query":
            q.add_argument("--kind", metavar="K")
            q.add_argument("--since", metavar="T", help="ns since the epoch or ISO 8601")
            q.add_argument("--exec-id", metavar="E")
            q.add_argument("--agent", metavar="I", help="agent instance id")
            q.add_argument("--limit", type=int, default=10000, metavar="N")

    inv = sub.add_parser("inventory", help="installed packages and which ones are in use now")
    _config_args(inv)
    inv.add_argument("--root", metavar="DIR", help="filesystem root (default [packages] root)")
    inv.add_argument("--json", action="store_true", help="machine-readable output")

    env = sub.add_parser("env", help="what this machine allows and what the agent would use")
    _config_args(env)
    env.add_argument("--json", action="store_true", help="machine-readable output")
    env.add_argument("--metadata-timeout", type=float, default=1.0, metavar="S",
                     help="total seconds the cloud metadata endpoint gets (default 1)")
    env.add_argument("--no-metadata", action="store_true",
                     help="do not ask the cloud metadata endpoint (environment only)")
    env.add_argument("--mode", choices=("run", "sidecar", "in-app"), default="run",
                     help="show the techniques of this mode (default run)")
    return p


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (or $LW_EMBED_CONFIG)")


def _load(path: str | None, env: Mapping[str, str], overrides: Mapping[str, Any]) -> Config:
    cfg = load_config(path or env.get("LW_EMBED_CONFIG") or None, env)
    return with_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})


def _setup_logging(level: str, who: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format=f"lw-embed[{who}]: %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = os.environ
    try:
        if args.command == "run":
            return _run(args, env)
        if args.command == "sidecar":
            return _sidecar(args, env)
        if args.command == "validate-config":
            load_config(args.file, env)
            print(f"{args.file}: ok")
            return 0
        if args.command == "decode":
            from lw_embed import decode

            return decode.main(args.paths, sys.stdout, sys.stderr)
        if args.command == "env":
            return _env(args, env)
        if args.command == "ingest":
            from lw_embed.server import ingest

            return ingest.serve(args.listen, args.db, args.token_file, max_body=args.max_body,
                                max_decompressed=args.max_decompressed,
                                max_concurrency=args.max_concurrency, max_queue=args.max_queue)
        if args.command == "inventory":
            from lw_embed import inventory_cli

            cfg = _load(args.config, env, {})
            return inventory_cli.main(cfg.packages, args.root, args.json, sys.stdout, sys.stderr)
        if args.command in ("query", "agents"):
            return _query(args, env)
    except ConfigError as exc:
        print(f"lw-embed: config error: {exc}", file=sys.stderr)
        return 2
    return 2


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # Block signals at once: a SIGTERM that arrives while the agent is still starting is
    # then forwarded to the workload instead of killing PID 1. The original mask goes to
    # the workload.
    catchable = {s for s in range(1, signal.NSIG)
                 if s not in (signal.SIGKILL, signal.SIGSTOP, 32, 33)}  # fmt: skip
    orig_mask = frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, catchable))
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("lw-embed run: missing command (lw-embed run [OPTIONS] -- CMD [ARG...])",
              file=sys.stderr)  # fmt: skip
        return 2
    cfg = _load(args.config, env, {
        "output.dir": args.output,
        "agent.data_dir": args.data_dir or env.get("LW_EMBED_DATA_DIR"),
        "backend.url": args.backend or env.get("LW_EMBED_BACKEND"),
        "backend.token": args.token or env.get("LW_EMBED_TOKEN"),
        "signals.pgroup": True if args.pgroup else None,
    })  # fmt: skip
    cfg = _with_watch(cfg, args.watch, defaults=True)
    _setup_logging(cfg.agent.log_level, "core")
    from lw_embed.runtime import init

    faults = frozenset(f for f in env.get("_LW_EMBED_FAULTS", "").split(",") if f)
    path = args.config or env.get("LW_EMBED_CONFIG") or None
    opts = init.RunOptions(argv=tuple(cmd), config=cfg, config_path=path, faults=faults,
                           orig_mask=orig_mask)  # fmt: skip
    return init.run(opts, env)


def _with_watch(cfg: Config, paths: Sequence[str], defaults: bool) -> Config:
    from lw_embed.pipeline.filerules import with_watch

    return with_watch(cfg, paths, defaults)


def _sidecar(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    cfg = _load(args.config, env, {
        "output.dir": args.output,
        "agent.data_dir": args.data_dir or env.get("LW_EMBED_DATA_DIR"),
        "backend.url": args.backend or env.get("LW_EMBED_BACKEND"),
        "backend.token": args.token or env.get("LW_EMBED_TOKEN"),
    })  # fmt: skip
    # the default trees would be the sidecar's own image: only what --watch names
    cfg = _with_watch(cfg, args.watch, defaults=False)
    _setup_logging(cfg.agent.log_level, "sidecar")
    from lw_embed.runtime import sidecar

    path = args.config or env.get("LW_EMBED_CONFIG") or None
    opts = sidecar.SidecarOptions(cfg, path, tuple(args.pid), args.include_init)
    try:
        return sidecar.run(opts, env)
    except sidecar.ScopeError as exc:
        print(f"lw-embed sidecar: {exc}", file=sys.stderr)
        return 2


def _query(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lw_embed.server import query, read_token

    token = read_token(args.token_file) if args.token_file else env.get("LW_EMBED_TOKEN", "")
    if args.command == "agents":
        return query.agents_main(args.server, token, sys.stdout, sys.stderr)
    return query.main(args.server, token, args.kind, args.since, args.exec_id, args.agent,
                      args.limit, sys.stdout, sys.stderr)  # fmt: skip


def _env(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from lw_embed.platform import report

    cfg = _load(args.config, env, {})
    rep = report.build(cfg, env, budget=args.metadata_timeout, fetch=not args.no_metadata,
                       mode=args.mode)
    print(json.dumps(rep, indent=2, sort_keys=True) if args.json else report.render(rep))
    return 0
