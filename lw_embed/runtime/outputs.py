"""Where the pipeline's events go: the spool it opens, the instance id kept beside it, and
the sink batches are shipped to (the HTTP backend, or batch files).

Interface: the spool directory (``<data_dir>/spool``, with fallbacks beside it and under the
temp dir), its ``instance_id`` file, the backend URL and token (file) of the config.

Capability: a writable data dir (else the temp-dir fallback); outbound TCP with a backend.

Cost: once, at start.

Failure modes: a spool held by another live agent or on an unusable volume is replaced by
a private or temporary one, logged, never a worker that does not start (unless no spool
can be opened anywhere: :class:`~lw_embed.errors.LwEmbedError`); an unreadable instance
id file gets a new id.
"""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.parse
from collections.abc import Callable

from lw_embed.config import Config
from lw_embed.errors import LwEmbedError
from lw_embed.fsutil import write_atomic
from lw_embed.runtime.shipper import BatchSink, FileBatchSink, HttpBatchSink
from lw_embed.sinks.files import FileSink
from lw_embed.spool import Spool, SpoolError, SpoolLocked

log = logging.getLogger("lw_embed.worker")

#: a 5xx other than 502/503/504 is retried this often before the batch is dead-lettered
SERVER_ERROR_ATTEMPTS = 1 << 30

_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def safe_id(v: object) -> bool:
    """An instance id usable in file names and idempotency keys."""
    return (isinstance(v, str) and 0 < len(v) <= 128 and not v.startswith(".")
            and set(v) <= _ID_CHARS)  # fmt: skip



def instance_id_of(spool_dir: str) -> str:
    """The agent instance id kept beside the spool, created once: with the spool's seq it
    names every event uniquely, across restarts and upgrades."""
    path = os.path.join(spool_dir, "instance_id")
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
        if safe_id(value):
            return value
    except (OSError, UnicodeDecodeError):
        pass
    value = os.urandom(8).hex()
    try:
        write_atomic(path, (value + "\n").encode())
    except OSError as exc:
        log.warning("cannot keep the instance id in %s: %s", spool_dir, exc)
    return value


def open_spool(cfg: Config, spool_dir: str, mono: Callable[[], float]) -> tuple[Spool, str]:
    """Open the spool. If another live agent holds it, use a private one beside it; if the
    data dir is unusable (a read-only root filesystem), use one under the temp dir. Say
    so, rather than fail: the workload must not lose its agent over a volume."""
    sc = cfg.spool
    fallback = os.path.join(tempfile.gettempdir(), f"lw-embed-{os.getuid()}", "spool")
    for d in (spool_dir, f"{spool_dir}.{os.getpid()}", fallback):
        spool = Spool(d, max_bytes=sc.max_bytes, segment_bytes=sc.segment_bytes,
                      sync_interval=sc.sync_interval, clock=mono)  # fmt: skip
        try:
            spool.open()
            return spool, d
        except SpoolLocked:
            log.error("spool %s is held by another agent; using a private spool", d)
        except (SpoolError, OSError) as exc:
            log.error("cannot use spool %s (%s); trying %s", d, exc, fallback)
    raise LwEmbedError(f"cannot open a spool in {spool_dir} nor in {fallback}")


def batches_url(url: str) -> str:
    """The backend's batch endpoint: a bare ``http(s)://host:port`` gets the protocol's
    ``/v1/batches``; a URL with a path is used as it is."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/"):
        return urllib.parse.urlunsplit(parts._replace(path="/v1/batches"))
    return url


def make_sink(cfg: Config, out_dir: str, instance_id: str, version: str) -> BatchSink:
    b = cfg.backend
    if not b.url:
        return FileBatchSink(FileSink(out_dir), instance_id)
    from lw_embed.sinks.http import HttpSender  # aiohttp: only with a backend

    token = b.token
    if b.token_file:
        with open(b.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    sender = HttpSender(
        batches_url(b.url), token, ca_file=b.ca_file, verify_tls=b.verify_tls,
        connect_timeout=b.connect_timeout, request_timeout=b.request_timeout,
        backoff_initial=b.backoff_initial, backoff_max=b.backoff_max,
        user_agent=f"lw-embed/{version}", max_server_error_retries=SERVER_ERROR_ATTEMPTS,
    )  # fmt: skip
    return HttpBatchSink(sender, b.compression_quality)
