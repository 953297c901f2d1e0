"""The shipper: spool -> batch -> sink, in a thread of the worker with its own asyncio loop.

Interface: :class:`~lw_embed.spool.Spool` ``lease``/``ack``/``drop``/``release``; a sink
(:class:`HttpBatchSink` over :class:`~lw_embed.sinks.http.HttpSender`, or
:class:`FileBatchSink` over :class:`~lw_embed.sinks.files.FileSink` when no backend is
configured).

Capability: none (outbound TCP, or write access to the output directory).

Cost: per batch, a decode of each event's ``exec_id`` (to attach the process records the
batch refers to), one splice of the already-encoded events
(:func:`~lw_embed.codec.encode_batch_raw`) and, for HTTP, one brotli compression at
quality 4-5 (a few ms per MB). It wakes once per ``max_age`` or when the worker says a full
batch is waiting; idle, it sleeps. Full batches go at once; a batch that is not full goes
at most once per ``max_age`` (so a trickle is one request per ``max_age``, not one per
event), except while draining.

Failure modes: data leaves the spool only when the sink delivered it (ack), when the
receiver rejected it for good (dropped under ``http_<code>`` and kept in the dead-letter
directory, bounded), or when a single event is too large even alone (``too_large``). A
413 splits the batch in two. A send interrupted by shutdown releases its events back to
the spool, which the next start ships. A crash of this thread is logged and the thread
restarts its loop; the worker's process restart covers the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cbor2

from lw_embed.codec import AgentIdentity, encode_batch_raw
from lw_embed.sinks.files import FileSink
from lw_embed.spool import Spool, SpoolItem

if TYPE_CHECKING:  # aiohttp is imported only when there is a backend (outputs.make_sink)
    from lw_embed.sinks.http import HttpSender

log = logging.getLogger("lw_embed.shipper")

#: dead-lettered batches kept for inspection, oldest deleted first
DEADLETTER_MAX_BYTES = 16 << 20


class Delivery(Protocol):
    """How one delivery ended (:class:`lw_embed.sinks.http.SendResult`, :class:`Written`)."""

    @property
    def outcome(self) -> str: ...  # delivered | rejected | too_large | stopped

    @property
    def reason(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Written:
    """A :class:`FileBatchSink` delivery."""

    outcome: str
    reason: str
    attempts: int


class BatchSink(Protocol):
    """Where batches go. ``deliver`` returns once the batch is delivered, rejected for
    good, too large, or ``stop`` was set."""

    async def deliver(self, batch: bytes, *, key: str, seq_first: int, events: int,
                      stop: asyncio.Event) -> Delivery: ...  # fmt: skip

    async def close(self) -> None: ...


class HttpBatchSink:
    def __init__(self, sender: HttpSender, quality: int) -> None:
        import brotli

        self._compress = brotli.compress
        self._sender = sender
        self._quality = quality
        self._entered = False

    async def deliver(self, batch: bytes, *, key: str, seq_first: int, events: int,
                      stop: asyncio.Event) -> Delivery:  # fmt: skip
        if not self._entered:
            await self._sender.__aenter__()
            self._entered = True
        body = self._compress(batch, quality=self._quality)
        return await self._sender.send(
            body, encoding="br", idempotency_key=key, events=events, stop=stop
        )

    async def close(self) -> None:
        if self._entered:
            await self._sender.__aexit__(None, None, None)


class FileBatchSink:
    """Batches as CBOR files (``--output DIR``): delivered once renamed into place."""

    def __init__(self, sink: FileSink, instance_id: str, retry_every: float = 1.0) -> None:
        self._sink = sink
        self._instance = instance_id
        self._retry_every = retry_every

    async def deliver(self, batch: bytes, *, key: str, seq_first: int, events: int,
                      stop: asyncio.Event) -> Delivery:  # fmt: skip
        attempts = 0
        while True:
            attempts += 1
            try:
                self._sink.write(batch, self._instance, seq_first)
                return Written("delivered", "written", attempts)
            except OSError as exc:  # a full or read-only disk: keep the data, try again
                if attempts == 1:
                    log.warning("cannot write batch %d: %s (retrying)", seq_first, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._retry_every)
            if stop.is_set():
                return Written("stopped", "stopped", attempts)

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ShipperLimits:
    max_events: int
    max_bytes: int
    max_age: float


class Shipper:
    """Owns the sending thread. ``notify()`` from the worker thread when a full batch may
    be waiting; ``drain(deadline)`` at shutdown."""

    def __init__(
        self,
        spool: Spool,
        sink: BatchSink,
        agent: AgentIdentity,
        limits: ShipperLimits,
        *,
        resource: Callable[[], Mapping[str, Any]],
        processes: Callable[[Sequence[str]], list[dict[str, Any]]],
        loss: Callable[[], Mapping[str, int]],
        deadletter_dir: str | None = None,
        on_thread: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.sink = sink
        self.agent = agent
        self.limits = limits
        self._resource = resource
        self._processes = processes
        self._loss = loss
        self._deadletter = deadletter_dir
        self._on_thread = on_thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._draining_until: float | None = None
        self._started = threading.Event()
        #: a batch that is not full waits until then (one partial batch per max_age)
        self._next_partial = 0.0
        self.batches = 0
        self.delivered = 0
        self.errors = 0

    # -- thread control (called from the worker thread) ------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lw-shipper", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def notify(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    def drain(self, deadline: float) -> None:
        """Ship what is pending until it is all gone or ``deadline`` (monotonic), then stop
        and release whatever was in flight back to the spool."""
        self._draining_until = deadline
        self.notify()
        if self._thread is not None:
            # sends in flight are abandoned at the deadline; the thread ends right after
            self._thread.join(max(0.0, deadline - time.monotonic()) + 0.3)

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        if self._on_thread is not None:
            self._on_thread()
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("shipper thread failed")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._on_thread is not None:  # getaddrinfo runs in the executor's threads
            self._loop.set_default_executor(
                ThreadPoolExecutor(2, "lw-shipper-dns", initializer=self._on_thread))
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._started.set()
        watchdog = asyncio.create_task(self._watch_deadline())
        try:
            while not self._stop.is_set():
                try:
                    shipped = await self._ship_available()
                except Exception:
                    self.errors += 1
                    log.exception("shipping failed (continuing)")
                    shipped = False
                if self._draining_until is not None and not shipped:
                    break  # drained: nothing left to lease
                if not shipped:
                    wait = self.limits.max_age
                    if self._partial_waiting():
                        wait = max(0.01, self._next_partial - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                    self._wake.clear()
        finally:
            watchdog.cancel()
            await self.sink.close()

    async def _watch_deadline(self) -> None:
        assert self._stop is not None
        while True:
            until = self._draining_until
            if until is not None and time.monotonic() >= until:
                self._stop.set()
                return
            await asyncio.sleep(0.05)

    def _partial_waiting(self) -> bool:
        """Fewer events pending than a full batch, and too soon for another partial one:
        a steady trickle then goes out as one batch per ``max_age``, not a tail of tiny
        batches (each a request and a transaction at the receiver). Never while draining."""
        if self._draining_until is not None:
            return False
        pending = self.spool.stats().pending
        return 0 < pending < self.limits.max_events and time.monotonic() < self._next_partial

    async def _ship_available(self) -> bool:
        """Lease and ship batches until the spool has nothing left (or only a partial
        batch that must wait); True if any shipped."""
        shipped = False
        lim = self.limits
        while self._stop is not None and not self._stop.is_set():
            if self._partial_waiting():
                return shipped
            items = self.spool.lease(lim.max_events, lim.max_bytes)
            if not items:
                return shipped
            if len(items) < lim.max_events:
                self._next_partial = time.monotonic() + lim.max_age
            try:
                await self._ship(items)
            except BaseException:
                self.spool.release([i.seq for i in items])  # never strand a lease
                raise
            shipped = True
        return shipped

    async def _ship(self, items: list[SpoolItem]) -> None:
        assert self._stop is not None
        seqs = [i.seq for i in items]
        first, last = min(seqs), max(seqs)
        batch = self._build(items, first, last)
        key = f"{self.agent.instance_id}:{first}-{last}"
        result = await self.sink.deliver(batch, key=key, seq_first=first, events=len(items),
                                         stop=self._stop)  # fmt: skip
        self.batches += 1
        if result.outcome == "delivered":
            self.spool.ack(seqs)
            self.delivered += len(items)
        elif result.outcome == "too_large" and len(items) > 1:
            half = len(items) // 2
            await self._ship(items[:half])
            await self._ship(items[half:])
        elif result.outcome in ("rejected", "too_large"):
            reason = result.reason if result.outcome == "rejected" else "too_large"
            log.warning("dead-lettering %d events (%s)", len(items), reason)
            self._keep_deadletter(key, batch)
            self.spool.drop(seqs, reason)
        else:  # stopped
            self.spool.release(seqs)

    def _build(self, items: list[SpoolItem], first: int, last: int) -> bytes:
        exec_ids: list[str] = []
        seen: set[str] = set()
        for item in items:
            try:
                eid = cbor2.loads(item.data).get("exec_id")
            except Exception:
                continue
            if isinstance(eid, str) and eid not in seen:
                seen.add(eid)
                exec_ids.append(eid)
        raw = [i.data for i in items]
        return encode_batch_raw(self.agent, self._resource(), first, last,
                                self._processes(exec_ids), raw, self._loss())  # fmt: skip

    def _keep_deadletter(self, key: str, batch: bytes) -> None:
        d = self._deadletter
        if d is None:
            return
        try:
            os.makedirs(d, mode=0o750, exist_ok=True)
            name = key.replace(":", "-") + ".cbor"
            with open(os.path.join(d, name), "wb") as f:
                f.write(batch)
            files = sorted((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getmtime)
            total = sum(os.path.getsize(f) for f in files)
            while files and total > DEADLETTER_MAX_BYTES:
                victim = files.pop(0)
                total -= os.path.getsize(victim)
                os.unlink(victim)
        except OSError as exc:
            log.warning("cannot keep dead-lettered batch %s: %s", key, exc)
