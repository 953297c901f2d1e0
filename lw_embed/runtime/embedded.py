"""In-app mode: the agent's pipeline in a daemon thread of the host Python process.

``lw_embed.start(**options)`` / ``stop(timeout)`` / ``flush(timeout)`` (docs/inapp.md).
Sources: the audit hook of :mod:`lw_embed.sources.audit` (the host's own spawns, sockets,
file changes, imports), the /proc reconciler in scope ``tree`` rooted at the host (its
children), and whatever other source of :data:`lw_embed.sources.base.FACTORIES` runs in
``in-app`` mode. Everything after the hook is the worker's pipeline
(:class:`lw_embed.runtime.pipeline.Pipeline`) with no record pipe.

Interface: one daemon thread (``lw-embed``) runs the pipeline loop, the shipper its own
(``lw-shipper``, with ``lw-shipper-dns`` executor threads for name lookups when there is a
backend), the metadata fetch another (``lw-embed-identity``, on ECS and Cloud Run, for at
most its budget); every thread the agent starts calls :func:`_own_thread` first, so the
hook ignores its calls. The heavy imports (pipeline, spool, shipper) run in the agent's
thread: :func:`start` only parses the config and installs the hook.
``os.register_at_fork`` (child: the parent's queue, fds and threads are dropped and a new
agent starts on a private spool, ``<spool>.<pid>``, with a new instance id), ``atexit``
(stop within ``shutdown.flush``) and, only with ``inapp.sigterm = true``, a SIGTERM
handler chained in front of the app's.

Capability: none beyond a writable data dir (and /proc for the children).

Cost: the hook's (see :mod:`lw_embed.sources.audit`); the pipeline's work per event runs
in the agent thread, which competes for the GIL with the host (a few us per event).
:func:`start` returns at once: the spool is opened in the agent thread. ``os.exec*`` in
the host waits up to :data:`lw_embed.sources.audit.EXEC_WAIT` for its event to be synced
into the spool (the process image is replaced right after).

Failure modes: a bad option raises :class:`~lw_embed.errors.ConfigError` from
:func:`start` naming the key (the sitecustomize entry point prints it and the host goes
on). Nothing else reaches the host: an agent that cannot start (no usable spool) or whose
loop fails logs why (stderr unless the host's logging routes it elsewhere), turns the
hook off and keeps the reason for :func:`status`; the host never blocks on the agent except in
:func:`stop`/:func:`flush` and at exit, for at most the flush budget. Events the hook
queued after the agent stopped are not reported (the hook is off by then).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from lw_embed import __version__
from lw_embed.config import (
    DEFAULT_AGGREGATE_KEYS,
    Config,
    load_config,
    resolved_spool_dir,
    with_overrides,
)
from lw_embed.errors import ConfigError
from lw_embed.sources import audit

if TYPE_CHECKING:
    from lw_embed.runtime.inapp_pipeline import InAppPipeline

log = logging.getLogger("lw_embed.inapp")

#: the CLI's option names -> config keys (``start(output=..., backend=...)``)
CLI_OPTIONS = {"output": "output.dir", "data_dir": "agent.data_dir", "backend": "backend.url",
               "token": "backend.token", "instance_id": "agent.instance_id",
               "log_level": "agent.log_level"}  # fmt: skip
#: environment variables the CLI reads besides LW_EMBED_<SECTION>_<KEY>
CLI_ENV = {"LW_EMBED_DATA_DIR": "agent.data_dir", "LW_EMBED_BACKEND": "backend.url",
           "LW_EMBED_TOKEN": "backend.token"}  # fmt: skip
#: aggregation of the audit kinds unless [aggregate.keys] is set: a log file opened per
#: request is one file.write per path and window, with its count
INAPP_AGGREGATE_KEYS = {
    "process.spawn": ["exe", "call", "argv"], "net.bind": ["exe", "family", "address", "port"],
    "file.write": ["exe", "path"], "file.remove": ["exe", "path"],
    "file.rename": ["exe", "path", "target"],
}  # fmt: skip
#: a forked child waits this long before it builds its agent: a child that execs at once
#: (subprocess with preexec_fn) then leaves no private spool behind
FORK_START_DELAY = 0.1
#: a fork waits at most this long for a starting agent's imports to finish
FORK_IMPORT_WAIT = 2.0


def build_config(options: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Config, str | None]:
    """The config of ``start(**options)``: the file (``config=`` or $LW_EMBED_CONFIG), the
    LW_EMBED_* variables, then the options. An option is a CLI name (``output``,
    ``data_dir``, ``backend``, ``token``), a dotted key (``"shutdown.flush"``) or
    ``<section>_<key>`` (``shutdown_flush=1.0``) as in LW_EMBED_<SECTION>_<KEY>."""
    opts = dict(options)
    path = opts.pop("config", None) or env.get("LW_EMBED_CONFIG") or None
    if path is not None and not isinstance(path, str | os.PathLike):
        raise ConfigError("", f"config must be a path, got {path!r:.80}")
    path = os.fspath(path) if path is not None else None
    cfg = load_config(path, env)
    overrides: dict[str, Any] = {key: env[var] for var, key in CLI_ENV.items() if env.get(var)}
    sections = {f.name: {k.name for k in fields(getattr(cfg, f.name))} for f in fields(cfg)}
    for name, value in opts.items():
        if name in CLI_OPTIONS:
            dotted = CLI_OPTIONS[name]
        elif "." in name:
            dotted = name
        else:
            section = next((s for s in sections if name.startswith(s + "_")
                            and name[len(s) + 1:] in sections[s]), None)  # fmt: skip
            if section is None:
                raise ConfigError(name, "unknown option (a CLI name, section.key or "
                                        "section_key)")  # fmt: skip
            dotted = f"{section}.{name[len(section) + 1:]}"
        overrides[dotted] = os.fspath(value) if isinstance(value, os.PathLike) else value
    cfg = with_overrides(cfg, overrides)
    if cfg.aggregate.keys == DEFAULT_AGGREGATE_KEYS:
        keys = {k: list(v) for k, v in cfg.aggregate.keys.items()}
        cfg = with_overrides(cfg, {"aggregate.keys": {**INAPP_AGGREGATE_KEYS, **keys}})
    return cfg, path


def _own_thread() -> None:
    """Called first in every thread the agent starts: the hook ignores its calls."""
    audit.own_thread(threading.get_ident())


class Agent:
    """One in-app agent: its config, its thread, its pipeline (built in the thread)."""

    def __init__(self, cfg: Config, config_path: str | None, env: Mapping[str, str],
                 delay: float = 0.0) -> None:  # fmt: skip
        self.cfg, self.config_path, self.env, self.delay = cfg, config_path, env, delay
        self.pipeline: InAppPipeline | None = None
        self.ready = threading.Event()  # the pipeline is built (or failed to be)
        self.stopping = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._main, name="lw-embed", daemon=True)

    def start(self) -> None:
        audit.activate(self.cfg.inapp.queue_max, self.cfg.inapp.files)
        self.thread.start()

    def _main(self) -> None:
        _own_thread()
        if self.delay and self.stopping.wait(self.delay):
            self.ready.set()
            return
        try:  # the heavy imports happen here, not in the host's start()
            from lw_embed.runtime.inapp_pipeline import InAppPipeline
            from lw_embed.runtime.worker import Spec

            scope = self.cfg.processes.scope
            spec = Spec(config=self.cfg, core_pid=os.getpid(),
                        instance_id=self.cfg.agent.instance_id, mode="in-app",
                        scope="tree" if scope == "auto" else scope, version=__version__,
                        config_path=self.config_path)  # fmt: skip
            self.pipeline = InAppPipeline(spec, None, env=self.env, worker_pid=-1,
                                          on_thread=_own_thread)  # fmt: skip
        except Exception as exc:  # no usable spool, unreadable token file, ...
            self._failed(f"not started: {type(exc).__name__}: {exc}")
            self.ready.set()
            return
        pipeline = self.pipeline
        audit.STATE.exec_flush = self._exec_flush
        self.ready.set()
        if self.stopping.is_set():
            pipeline.request_stop()
        try:
            pipeline.run()
        except Exception as exc:  # a bug: say why, and leave the host as it was
            self._failed(f"failed: {type(exc).__name__}: {exc}", exc_info=True)
            with contextlib.suppress(Exception):
                pipeline._finish()  # what it can: ship within the budget, free the spool
        finally:
            audit.deactivate()
            if audit.STATE.exec_flush == self._exec_flush:
                audit.STATE.exec_flush = None
            pipeline.close_wake()

    def _failed(self, why: str, exc_info: bool = False) -> None:
        """The agent is gone: the hook off, the reason kept (:func:`status`) and logged
        (on stderr unless the host's logging says otherwise)."""
        audit.deactivate()
        self.error = why
        log.error("lw-embed in-app agent %s", why, exc_info=exc_info)

    def _exec_flush(self, timeout: float) -> bool:
        """From the hook, before ``os.exec*`` replaces the process: the queued calls into
        the spool and synced, waiting at most ``timeout``."""
        p = self.pipeline
        return p is not None and p.request_flush().wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Stop within ``timeout`` seconds; True when the thread ended in time."""
        end = time.monotonic() + timeout
        audit.deactivate()
        self.stopping.set()
        if self.thread.ident is None:
            return True
        self.ready.wait(max(0.0, end - time.monotonic()))
        if self.pipeline is not None:
            # the drain leaves room for the shipper's join (0.3 s) and the final syncs
            self.pipeline.request_stop(max(0.0, timeout - 0.4))
        self.thread.join(max(0.0, end - time.monotonic()))
        return not self.thread.is_alive()

    def flush(self, timeout: float) -> bool:
        """Events queued so far into the spool, and shipped: True if all was delivered."""
        end = time.monotonic() + timeout
        if not self.ready.wait(timeout) or self.pipeline is None:
            return False
        p = self.pipeline
        if not p.request_flush().wait(max(0.0, end - time.monotonic())):
            return False
        while time.monotonic() < end:
            if p.spool.stats().pending == 0:
                return True
            time.sleep(0.01)
        return p.spool.stats().pending == 0

    def abandon(self) -> None:
        """In a forked child: let go of the parent's agent without touching its state."""
        if self.pipeline is not None:
            self.pipeline.abandon()


_lock = threading.RLock()  # RLock: the SIGTERM handler may run while start() holds it
_agent: Agent | None = None
_hooks_registered = False
_prev_sigterm: Any = None


def start(**options: Any) -> bool:
    """Start the in-app agent (see :func:`build_config` for the options); False if one is
    already running (the call is then harmless: its options are ignored)."""
    global _agent
    env = {k: v for k, v in os.environ.items()}
    cfg, path = build_config(options, env)
    with _lock:
        if _agent is not None and _agent.thread.is_alive():
            return False
        logging.getLogger("lw_embed").setLevel(cfg.agent.log_level.upper())
        audit.install()
        _register_hooks()
        _agent = Agent(cfg, path, env)
        _agent.start()
        if cfg.inapp.sigterm:
            _chain_sigterm()
    return True


def stop(timeout: float | None = None) -> bool:
    """Stop the agent, shipping what it can within ``timeout`` (default ``shutdown.flush``);
    what is not sent stays in the spool for the next start. True if it ended in time."""
    global _agent
    with _lock:
        agent, _agent = _agent, None
    if agent is None:
        return True
    return agent.stop(agent.cfg.shutdown.flush if timeout is None else max(0.0, timeout))


def flush(timeout: float | None = None) -> bool:
    """Push what the hook queued through the pipeline into the spool and ship it now;
    wait at most ``timeout`` (default ``shutdown.flush``). True if nothing is pending."""
    agent = _agent
    if agent is None:
        return False
    return agent.flush(agent.cfg.shutdown.flush if timeout is None else max(0.0, timeout))


def status() -> dict[str, Any]:
    """The agent's state: ``running`` (its thread is alive), ``error`` (why it stopped or
    never started, else None)."""
    agent = _agent
    return {"running": agent is not None and agent.thread.is_alive(),
            "error": None if agent is None else agent.error}  # fmt: skip


def _register_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        _hooks_registered = True
        # imported here, not in the agent thread during a fork that _before_fork holds:
        # its at-fork hooks would then be half run (a lock released that was never taken)
        import concurrent.futures.thread  # noqa: F401

        atexit.register(_at_exit)
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    """Let the agent thread finish its imports first (bounded): a module it is importing
    at the fork would stay half-initialised in the child, whose agent could not start."""
    agent = _agent
    if agent is None or agent.thread.ident == threading.get_ident():
        return
    end = time.monotonic() + FORK_IMPORT_WAIT
    while not agent.ready.is_set() and time.monotonic() < end:
        time.sleep(0.002)  # no Condition here: a lock waited on across fork breaks


def _at_exit() -> None:
    with contextlib.suppress(Exception):
        stop()


def _after_fork_in_child() -> None:
    global _agent, _lock
    _lock = threading.RLock()  # another thread of the parent may have held it
    audit.reset_after_fork()
    parent, _agent = _agent, None
    if parent is None or parent.stopping.is_set():
        return
    parent.abandon()
    cfg = parent.cfg
    try:  # the parent keeps its spool (and lock) and its instance id
        own = f"{resolved_spool_dir(cfg, os.getuid(), parent.env)}.{os.getpid()}"
        cfg = with_overrides(cfg, {"spool.dir": own, "agent.instance_id": ""})
    except ConfigError as exc:
        log.error("lw-embed: no agent in the forked child: %s", exc)
        return
    _agent = Agent(cfg, parent.config_path, parent.env, delay=FORK_START_DELAY)
    _agent.start()


def _chain_sigterm() -> None:
    """A SIGTERM handler in front of the app's: ship now, then the app's handler runs; if
    there was none (default action), stop within the budget and die of SIGTERM as before."""
    global _prev_sigterm
    if threading.current_thread() is not threading.main_thread():
        log.warning("inapp.sigterm: start() is not in the main thread; no handler chained")
        return
    prev = signal.getsignal(signal.SIGTERM)
    if prev is signal.SIG_IGN or getattr(prev, "__name__", "") == "_on_sigterm":
        return
    if prev is None:  # a handler installed from C: it cannot be called from here
        log.warning("inapp.sigterm: SIGTERM has a handler installed outside Python; "
                    "left in place, none chained")  # fmt: skip
        return
    _prev_sigterm = prev

    def _on_sigterm(signum: int, frame: Any) -> None:
        agent = _agent
        if callable(prev):
            if agent is not None and agent.pipeline is not None:
                agent.pipeline.request_flush()  # no wait: the app's handler comes first
            handler: Callable[[int, Any], Any] = prev
            handler(signum, frame)
            return
        if prev is not signal.SIG_DFL:
            return  # unknown: neither called nor turned into a kill
        stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, _on_sigterm)
