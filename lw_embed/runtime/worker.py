"""The worker process: core records in, events accepted into the spool, batches shipped.

Launch contract (the core's side is :meth:`lw_embed.runtime.init.Core._start_worker`): fd 3
is the read end of the record pipe; ``_LW_EMBED_WORKER`` holds JSON ``{"config":
<config_to_dict>, "config_path", "core_pid", "instance_id", "mode", "scope":
"tree"|"namespace"|"none", "version"}``. The worker never writes to stdout; logs go to
stderr at ``agent.log_level``, never per event.

Interface: the loop of :class:`lw_embed.runtime.pipeline.Pipeline` over fd 3
(``O_NONBLOCK``), with ``signal.set_wakeup_fd`` pointed at its wake pipe; this module
adds the process concerns: the launch JSON, fd 3, signal handlers, nice.

Capability: none beyond those of the /proc source; a writable data dir.

Cost: idle, it sleeps in select; per record a decode, a dict update, a ``to_wire``, the
filter and aggregate steps and one spool append (one ``write(2)``); one group fdatasync
per ``spool.sync_interval``. It runs at nice 10 so the workload and the core come first.

Failure modes: nothing in the input stops it. Every drop has a reason and a counter:
``worker.bad_frame``, ``worker.bad_record``, ``worker.exit_unknown_process``,
``worker.process_table_full``, and the spool's own (``spool.evicted``, ``spool.full``,
``spool.corrupt``, ``http_<code>``, ...). Those and the core's cumulative totals go out in
an ``agent.loss`` event whenever they change (at most once a second) and at the end.
Events the filter excludes are not losses (they are counted in ``worker.filtered``).
SIGHUP reloads the rules (as does a change of the config file); SIGTERM/SIGINT ask the
shipper to send now: the core ends the worker by closing the pipe, and at EOF the worker
drains the spool by priority within the budget the core gave (SHUTDOWN record), fsyncs
what is left and exits 0. Exit 2: ``_LW_EMBED_WORKER`` missing or invalid, or fd 3 not open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lw_embed.config import Config, config_from_dict
from lw_embed.errors import ConfigError, LwEmbedError
from lw_embed.runtime.outputs import (  # re-exported
    SERVER_ERROR_ATTEMPTS,
    batches_url,
    instance_id_of,
    safe_id,
)
from lw_embed.runtime.pipeline import LOSS_EVERY, READ_BUDGET, READ_CHUNK, Pipeline, _is_int
from lw_embed.sources.procfs import SCOPES

__all__ = [
    "ENV_VAR", "LOSS_EVERY", "MODES", "READ_BUDGET", "READ_CHUNK", "RECORD_FD",
    "SERVER_ERROR_ATTEMPTS", "Spec", "SpecError", "Worker", "batches_url", "instance_id_of",
    "main", "parse_spec", "safe_id",
]  # fmt: skip

log = logging.getLogger("lw_embed.worker")

ENV_VAR = "_LW_EMBED_WORKER"
RECORD_FD = 3
MODES = ("wrapper", "sidecar", "in-app")




class SpecError(LwEmbedError):
    """``_LW_EMBED_WORKER`` is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Spec:
    """What the core tells the worker at launch."""

    config: Config
    core_pid: int
    instance_id: str  # "" = the one kept in the spool directory
    mode: str
    scope: str
    version: str
    config_path: str | None = None
    #: the sidecar's: scope "tree" over these pids instead of core_pid's; pids left out
    roots: tuple[int, ...] = ()
    exclude: tuple[int, ...] = ()



_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "config": (lambda v: isinstance(v, dict), "an object"),
    "core_pid": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "instance_id": (lambda v: v == "" or safe_id(v), "empty or [A-Za-z0-9._-]{1,128}"),
    "mode": (lambda v: v in MODES, "one of " + ", ".join(MODES)),
    "scope": (lambda v: v in SCOPES, "one of " + ", ".join(SCOPES)),
    "version": (lambda v: isinstance(v, str), "a string"),
}


def parse_spec(raw: str | None) -> Spec:
    """Parse and check the launch JSON; raise SpecError naming what is wrong."""
    if raw is None:
        raise SpecError(f"{ENV_VAR} is not set (the worker is started by lw-embed run)")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise SpecError(f"{ENV_VAR}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{ENV_VAR}: not a JSON object")
    for key, (ok, what) in _CHECKS.items():
        if key not in data:
            raise SpecError(f"{ENV_VAR}: {key} is missing")
        if not ok(data[key]):
            raise SpecError(f"{ENV_VAR}: {key} must be {what}, got {data[key]!r:.80}")
    path = data.get("config_path")
    if path is not None and not isinstance(path, str):
        raise SpecError(f"{ENV_VAR}: config_path must be a string or null")
    try:
        cfg = config_from_dict(data["config"])
    except ConfigError as exc:
        raise SpecError(f"{ENV_VAR}: config: {exc}") from exc
    d = data
    pids: dict[str, tuple[int, ...]] = {}
    for key in ("roots", "exclude"):  # optional (the sidecar's)
        v = d.get(key, [])
        if not isinstance(v, list) or not all(_is_int(p) and p > 0 for p in v):
            raise SpecError(f"{ENV_VAR}: {key} must be a list of positive integers")
        pids[key] = tuple(v)
    return Spec(cfg, d["core_pid"], d["instance_id"], d["mode"], d["scope"], d["version"],
                path, pids["roots"], pids["exclude"])  # fmt: skip


class Worker(Pipeline):
    """The worker process: the pipeline over the record pipe (fd 3), with the process's
    signals (SIGTERM/SIGINT: send now; SIGHUP: reload the rules) on the wake pipe."""

    def __init__(self, spec: Spec, fd: int = RECORD_FD, **kw: Any) -> None:
        super().__init__(spec, fd, **kw)

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: self.watcher.request())
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        for sig in (signal.SIGTTOU, signal.SIGTTIN):  # a terminal belongs to the workload
            signal.signal(sig, signal.SIG_IGN)
        # the core starts us with these blocked, so none could kill us before now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
        return super().run()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.shipper.notify()  # the wakeup fd ends the select


#: the worker yields the CPU to the workload and to the core (which holds tracee stops)
WORKER_NICE = 10


def main() -> int:
    """Entry point of ``python -m lw_embed.runtime.worker``; returns the exit status."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)
    try:
        spec = parse_spec(os.environ.get(ENV_VAR))
    except SpecError as exc:
        print(f"lw-embed worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=spec.config.agent.log_level.upper(),
        stream=sys.stderr,
        format="lw-embed worker[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        os.fstat(RECORD_FD)
    except OSError:
        print(f"lw-embed worker: fd {RECORD_FD} (the record pipe) is not open", file=sys.stderr)
        return 2
    try:
        worker = Worker(spec)
    except (OSError, LwEmbedError) as exc:  # e.g. no usable spool anywhere
        print(f"lw-embed worker: {exc}", file=sys.stderr)
        return 2
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
