"""``lw-embed ingest``: the bundled receiver of docs/protocol.md, an aiohttp server over SQLite.

Interface: HTTP/1.1 on one listening TCP socket. ``POST /v1/batches`` takes a batch
(``Content-Type: application/cbor``, ``Content-Encoding: br | gzip | identity``) and answers
200 ``{"stored": n, "duplicates": m}``; ``GET /v1/events`` (JSON lines), ``GET /v1/agents``
(JSON) and ``GET /healthz`` (``ok``, the only endpoint without the bearer token).
:func:`make_app` builds the application; it must be run by a runner made with
``auto_decompress=False`` (:func:`make_runner` does that; with aiohttp's default the body
would be inflated before the size limits could see it). :func:`serve` is the blocking
command: it prints ``lw-embed ingest listening on http://HOST:PORT`` once bound and stops
cleanly on SIGTERM/SIGINT (exit 0; 2 for a bad option or token file; 1 when the socket or
the store cannot be opened).

Capability: bind the listening address; the store's file (:mod:`lw_embed.server.store`).

Cost: per batch, the body is read into memory (at most ``max_body``) only once the batch
has a processing slot, inflated in 1 MiB steps up to ``max_decompressed`` and decoded in a
pool of :data:`PARSE_THREADS` threads (:func:`lw_embed.server.parse.parse_batch`), then
stored by the single writer thread (one SQLite transaction, one fsync). Queries run in
their own reader thread on a second connection, so neither blocks the event loop or the
writer. Peak memory is about ``max_concurrency`` compressed bodies plus
:data:`PARSE_THREADS` inflated and decoded batches (decoded CBOR can be several times
larger than its bytes: up to ~70x for a body of empty maps); waiting requests hold only
their headers.

Failure modes: every bad input gets its 4xx before it can cost more than its limit: 401
bad or missing token (with ``WWW-Authenticate``); 415 content type or encoding; 413 a body
over ``max_body`` (from ``Content-Length`` before reading, and counted while reading) or an
inflated size over ``max_decompressed`` (found without inflating the rest); 400 garbage
compression, a batch :func:`lw_embed.codec.decode_batch` rejects or one failing
:func:`lw_embed.server.parse.check_seqs`, a bad query parameter; 408 a body not received
within ``read_timeout``. Beyond ``max_concurrency`` batches in progress and ``max_queue``
waiting, 503 with ``Retry-After: 1`` at once (queries have a gate of the same size).
Malformed HTTP is answered 400 by aiohttp and logged in one line at INFO. Anything
unexpected is a 500 with the traceback logged and counted in ``app[STATE].internal_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from lw_embed.decode import to_json_line
from lw_embed.errors import ConfigError
from lw_embed.server import read_token
from lw_embed.server.parse import ENCODINGS, InputError, event_query, parse_batch, parse_listen
from lw_embed.server.store import Store, StoreError

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Decoding holds the GIL, so more threads add memory, not throughput. Decoded CBOR can be
#: ~70x its size (a body of empty maps), hence the 4 MiB default for max_decompressed: agents
#: send at most 1 MiB of raw CBOR per batch.
PARSE_THREADS = 1
_LINES_PER_WRITE = 512
_CHALLENGE = 'Bearer realm="lw-embed"'


# -- admission control ----------------------------------------------------------------------


class Gate:
    """At most ``limit`` holders and ``queue`` waiters; beyond that 503 at once."""

    def __init__(self, limit: int, queue: int) -> None:
        self._sem = asyncio.Semaphore(limit)
        self._capacity = limit + queue
        self.inside = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.inside >= self._capacity:
            raise InputError(503, "overloaded, retry later", {"Retry-After": "1"})
        self.inside += 1
        try:
            async with self._sem:
                yield
        finally:
            self.inside -= 1


# -- the application ------------------------------------------------------------------------


@dataclass
class State:
    """What the handlers share; ``app[STATE]``."""

    store_path: str
    token: bytes
    max_body: int
    max_decompressed: int
    read_timeout: float
    store_delay: float
    batches: Gate
    queries: Gate
    writer_pool: ThreadPoolExecutor = field(init=False)
    reader_pool: ThreadPoolExecutor = field(init=False)
    parse_pool: ThreadPoolExecutor = field(init=False)
    writer: Store | None = None
    reader: Store | None = None
    internal_errors: int = 0


STATE = web.AppKey("lw_embed_ingest", State)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InputError as exc:
        return web.json_response({"error": exc.message}, status=exc.status, headers=exc.headers)
    except web.HTTPException:
        raise
    except Exception:
        request.app[STATE].internal_errors += 1
        log.exception("internal error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal server error"}, status=500)


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path != "/healthz":
        header = request.headers.get("Authorization")
        if header is None:
            raise InputError(401, "missing bearer token", {"WWW-Authenticate": _CHALLENGE})
        scheme, _, cred = header.strip().partition(" ")
        given = cred.strip().encode("utf-8", "surrogatepass")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, request.app[STATE].token):
            raise InputError(
                401, "wrong bearer token",
                {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )  # fmt: skip
    return await handler(request)


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise InputError(413, f"body larger than {limit} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise InputError(408, f"body not received within {timeout:g} s") from None
    except (web.RequestPayloadError, ConnectionError) as exc:
        raise InputError(400, f"cannot read the body: {exc}") from None
    return b"".join(parts)


def _store(st: State, batch: dict[str, Any]) -> tuple[int, int]:
    if st.store_delay:  # tests only: a slow disk
        time.sleep(st.store_delay)
    assert st.writer is not None
    return st.writer.store_batch(batch)


async def _post_batch(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    if request.content_type != "application/cbor":
        raise InputError(415, f"Content-Type must be application/cbor, not {request.content_type}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in ENCODINGS:
        raise InputError(415, f"unsupported Content-Encoding {encoding!r} (br, gzip or identity)")
    if request.content_length is not None and request.content_length > st.max_body:
        raise InputError(413, f"body larger than {st.max_body} bytes")
    loop = asyncio.get_running_loop()
    async with st.batches.slot():
        body = await _read_body(request, st.max_body, st.read_timeout)
        batch = await loop.run_in_executor(
            st.parse_pool, parse_batch, body, encoding, st.max_decompressed
        )
        del body
        stored, duplicates = await loop.run_in_executor(st.writer_pool, _store, st, batch)
    return web.json_response({"stored": stored, "duplicates": duplicates})


def _event_lines(st: State, args: dict[str, Any]) -> list[str]:
    assert st.reader is not None
    return [to_json_line(ev) + "\n" for ev in st.reader.events(**args)]


async def _get_events(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    args = event_query(list(request.query.items()))
    async with st.queries.slot():
        lines = await asyncio.get_running_loop().run_in_executor(
            st.reader_pool, _event_lines, st, args
        )
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    try:
        for i in range(0, len(lines), _LINES_PER_WRITE):
            await resp.write("".join(lines[i : i + _LINES_PER_WRITE]).encode())
        await resp.write_eof()
    except ConnectionError:
        log.debug("client went away during GET /v1/events")
    return resp


async def _get_agents(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    assert st.reader is not None
    async with st.queries.slot():
        agents = await asyncio.get_running_loop().run_in_executor(st.reader_pool, st.reader.agents)
    return web.json_response(agents)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


async def _stores(app: web.Application) -> AsyncIterator[None]:
    """Open the writer and the reader, each in its own thread; close them at cleanup."""
    st = app[STATE]
    loop = asyncio.get_running_loop()
    st.writer_pool = ThreadPoolExecutor(1, thread_name_prefix="lw-ingest-writer")
    st.reader_pool = ThreadPoolExecutor(1, thread_name_prefix="lw-ingest-reader")
    st.parse_pool = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="lw-ingest-parse")
    try:
        st.writer = await loop.run_in_executor(st.writer_pool, Store, st.store_path)
        st.reader = await loop.run_in_executor(
            st.reader_pool, functools.partial(Store, st.store_path, readonly=True)
        )
        yield
    finally:
        if st.reader is not None:
            await loop.run_in_executor(st.reader_pool, st.reader.close)
        if st.writer is not None:  # after every store_batch queued before it
            await loop.run_in_executor(st.writer_pool, st.writer.close)
        for pool in (st.parse_pool, st.reader_pool, st.writer_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def make_app(
    store_path: str,
    token: str,
    *,
    max_body: int = 8 * MiB,
    max_decompressed: int = 4 * MiB,
    max_concurrency: int = 8,
    max_queue: int = 64,
    read_timeout: float = 30.0,
    _store_delay: float = 0.0,
) -> web.Application:
    """The ingest application over the store at ``store_path`` (opened at startup).

    Run it with :func:`make_runner` (``auto_decompress=False``). ``_store_delay`` (seconds
    slept in the writer thread before each batch) is for tests only.
    """
    if not token:
        raise ValueError("an empty token would let anyone in")
    if min(max_body, max_decompressed, max_concurrency) < 1 or max_queue < 0:
        raise ValueError("limits must be positive (max_queue >= 0)")
    if read_timeout <= 0:
        raise ValueError("read_timeout must be positive")
    app = web.Application(middlewares=[_errors, _auth], client_max_size=max_body)
    app[STATE] = State(
        store_path=store_path,
        token=token.encode("utf-8", "surrogatepass"),
        max_body=max_body,
        max_decompressed=max_decompressed,
        read_timeout=read_timeout,
        store_delay=_store_delay,
        batches=Gate(max_concurrency, max_queue),
        queries=Gate(max_concurrency, max_queue),
    )
    app.cleanup_ctx.append(_stores)
    app.router.add_post("/v1/batches", _post_batch)
    app.router.add_get("/v1/events", _get_events)
    app.router.add_get("/v1/agents", _get_agents)
    app.router.add_get("/healthz", _healthz)
    return app


class _MalformedHttp(logging.Filter):
    """aiohttp answers a malformed request (bad chunking, header syntax) 400 by itself and
    logs its traceback at ERROR: that is hostile input, not a bug, so one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            if not _HTTP_LOG.isEnabledFor(logging.INFO):
                return False
            record.levelno, record.levelname = logging.INFO, "INFO"
            first = str(exc.message).strip().splitlines()[:1] or [type(exc).__name__]
            record.msg, record.args = "malformed HTTP request answered %s: %s", (exc.code, first[0])
            record.exc_info = record.exc_text = None
        return True


_HTTP_LOG = logging.getLogger("lw_embed.server.http")
_HTTP_LOG.addFilter(_MalformedHttp())


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner :func:`make_app` needs: aiohttp must not inflate bodies by itself."""
    kwargs.setdefault("shutdown_timeout", 5.0)
    kwargs.setdefault("logger", _HTTP_LOG)
    return web.AppRunner(app, auto_decompress=False, **kwargs)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(app: web.Application, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = make_runner(app)
    try:
        await runner.setup()
        sock = _bind(host, port)
        await web.SockSite(runner, sock).start()
        shown = f"[{host}]" if ":" in host else host
        print(f"lw-embed ingest listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def serve(
    listen: str,
    db: str,
    token_file: str,
    *,
    max_body: int = 8 * MiB,
    max_decompressed: int = 4 * MiB,
    max_concurrency: int = 8,
    max_queue: int = 64,
    read_timeout: float = 30.0,
) -> int:
    """Run the ingest server until SIGTERM/SIGINT; the exit status (see module docstring)."""
    logging.basicConfig(
        level=logging.WARNING, format="lw-embed[ingest]: %(levelname)s %(message)s",
        stream=sys.stderr,
    )  # fmt: skip
    try:
        host, port = parse_listen(listen)
        app = make_app(
            db, read_token(token_file), max_body=max_body, max_decompressed=max_decompressed,
            max_concurrency=max_concurrency, max_queue=max_queue, read_timeout=read_timeout,
        )  # fmt: skip
    except (ConfigError, ValueError) as exc:
        print(f"lw-embed ingest: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(app, host, port))
    except (StoreError, OSError) as exc:
        print(f"lw-embed ingest: {exc}", file=sys.stderr)
        return 1
