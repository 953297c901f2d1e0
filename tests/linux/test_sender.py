"""The HTTP sender against scripted loopback servers started by each test.

Every server listens on 127.0.0.1 port 0 inside the test's own event loop and answers a
scripted sequence of actions, one per request (the last action repeats). Waits between
attempts go through an injected ``sleep`` that records them and returns at once, and the
jitter comes from a seeded rng, so nothing here sleeps for real except where a test says so
(and then briefly, under a ``wait_for`` bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lw_embed.errors import ConfigError
from lw_embed.sinks.http import HttpSender, SendResult, parse_retry_after

pytestmark = pytest.mark.linux  # real loopback sockets (no root needed)

BODY = b"\x1b\x05\x00\xf8\xa5\x99\xc0brotli-ish batch bytes \x00\xff"
KEY = "inst-1:100-199"
TOKEN = "s3cret-token"
UA = "lw-embed/0.1.0-test"
BOUND = 10.0  # no test may run longer than this


# --- scripted servers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Act:
    """One scripted answer: a status (+headers, body), or ``reset`` / ``hang``."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b'{"stored": 1, "duplicates": 0}'
    reset: bool = False
    hang: float = 0.0


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: Any


@dataclass
class Server:
    url: str
    seen: list[Seen]


def _rst(transport: asyncio.WriteTransport) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@contextlib.asynccontextmanager
async def serve(
    script: list[Act], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    seen: list[Seen] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        act = script[min(len(seen), len(script) - 1)]
        seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.headers),
                await request.read(),
                request.transport.get_extra_info("peername") if request.transport else None,
            )
        )
        if act.reset:
            assert request.transport is not None
            _rst(request.transport)
            return web.Response(status=500)  # never reaches the client
        if act.hang:
            await asyncio.sleep(act.hang)
        return web.Response(status=act.status, headers=act.headers, body=act.body)

    app = web.Application()
    app.router.add_post("/v1/batches", handler)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=0.2,
        handler_cancellation=True,
        auto_decompress=False,  # the test checks the raw body bytes
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_context else "http"
    try:
        yield Server(f"{scheme}://127.0.0.1:{port}/v1/batches", seen)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_serve(
    replies: list[bytes | None],
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw TCP server: per connection, read one request, then write ``replies[i]`` and
    close (``None``: close at once without reading or answering)."""
    requests: list[bytes] = []
    count = 0

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        reply = replies[min(count, len(replies) - 1)]
        count += 1
        try:
            if reply is None:
                _rst(writer.transport)
                return
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            requests.append(head + await reader.readexactly(length))
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1/batches", requests
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- sender harness ---------------------------------------------------------------------------


class Sleeps:
    """An injected ``sleep``: records the waits, returns at once; optionally sets ``stop``
    on the n-th call."""

    def __init__(self, stop: asyncio.Event | None = None, stop_after: int = 0) -> None:
        self.waits: list[float] = []
        self.stop = stop
        self.stop_after = stop_after

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.stop is not None and len(self.waits) >= self.stop_after:
            self.stop.set()
        await asyncio.sleep(0)


class TopRandom(random.Random):
    """Always draws the upper bound: makes the backoff caps visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


def sender(url: str, sleep: Callable[[float], Awaitable[None]] | None, **kw: Any) -> HttpSender:
    args: dict[str, Any] = {
        "connect_timeout": 1.0,
        "request_timeout": 2.0,
        "backoff_initial": 0.5,
        "backoff_max": 4.0,
        "user_agent": UA,
        "sleep": sleep,
        "rng": random.Random(1234),
    }
    args.update(kw)
    return HttpSender(url, TOKEN, **args)


async def send_once(
    url: str, sleeps: Sleeps | None = None, stop: asyncio.Event | None = None, **kw: Any
) -> SendResult:
    stop = stop or asyncio.Event()
    async with sender(url, sleeps if sleeps is not None else Sleeps(), **kw) as s:
        return await s.send(BODY, encoding="br", idempotency_key=KEY, events=42, stop=stop)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, BOUND))


# --- outcomes ----------------------------------------------------------------------------------


def test_200_delivered_with_protocol_headers() -> None:
    async def go() -> tuple[SendResult, list[Seen], list[float]]:
        sleeps = Sleeps()
        async with serve([Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, srv.seen, sleeps.waits

    res, seen, waits = run(go())
    assert res == SendResult("delivered", 200, "http_200", 1, 0.0)
    assert waits == []
    [req] = seen
    assert (req.method, req.path, req.body) == ("POST", "/v1/batches", BODY)
    h = req.headers
    assert h["Authorization"] == f"Bearer {TOKEN}"
    assert h["Idempotency-Key"] == KEY
    assert h["Content-Encoding"] == "br"
    assert h["Content-Type"] == "application/cbor"
    assert h["X-LW-Events"] == "42"
    assert h["User-Agent"] == UA
    assert h["Content-Length"] == str(len(BODY))


@pytest.mark.parametrize("code", [404, 405, 408, 429, 502, 503, 504])
def test_retryable_status_then_200(code: int) -> None:
    async def go() -> tuple[SendResult, list[Seen], list[float]]:
        sleeps = Sleeps()
        async with serve([Act(code), Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, srv.seen, sleeps.waits

    res, seen, waits = run(go())
    assert res.outcome == "delivered" and res.attempts == 2 and res.status == 200
    assert len(waits) == 1 and 0.0 <= waits[0] <= 0.5  # first wait: uniform(0, initial)
    assert [r.headers["Idempotency-Key"] for r in seen] == [KEY, KEY]
    assert [r.body for r in seen] == [BODY, BODY]


@pytest.mark.parametrize("code", [400, 401, 403, 415, 422, 301, 302])
def test_client_errors_rejected_without_retry(code: int) -> None:
    async def go() -> tuple[SendResult, int, list[float]]:
        sleeps = Sleeps()
        headers = {"Location": "/elsewhere"} if code < 400 else {}
        async with serve([Act(code, headers=headers), Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, len(srv.seen), sleeps.waits

    res, requests, waits = run(go())
    assert res == SendResult("rejected", code, f"http_{code}", 1, 0.0)
    assert requests == 1 and waits == []


def test_413_too_large_at_once() -> None:
    async def go() -> tuple[SendResult, int]:
        async with serve([Act(413), Act(200)]) as srv:
            res = await send_once(srv.url)
        return res, len(srv.seen)

    res, requests = run(go())
    assert res == SendResult("too_large", 413, "http_413", 1, 0.0)
    assert requests == 1


@pytest.mark.parametrize(("code", "limit"), [(500, 5), (500, 3), (501, 2), (500, 1)])
def test_server_errors_bounded(code: int, limit: int) -> None:
    async def go() -> tuple[SendResult, int, list[float]]:
        sleeps = Sleeps()
        async with serve([Act(code)]) as srv:
            res = await send_once(srv.url, sleeps, max_server_error_retries=limit)
        return res, len(srv.seen), sleeps.waits

    res, requests, waits = run(go())
    assert res == SendResult("rejected", code, f"http_{code}", limit, 0.0)
    assert requests == limit and len(waits) == limit - 1


def test_500_then_200_delivered() -> None:
    async def go() -> SendResult:
        async with serve([Act(500), Act(500), Act(200)]) as srv:
            return await send_once(srv.url, max_server_error_retries=3)

    res = run(go())
    assert (res.outcome, res.attempts) == ("delivered", 3)


def test_stopped_reports_last_status() -> None:
    async def go() -> SendResult:
        stop = asyncio.Event()
        async with serve([Act(503)]) as srv:
            return await send_once(srv.url, Sleeps(stop, stop_after=3), stop)

    res = run(go())
    assert res == SendResult("stopped", 503, "stopped", 3, 0.0)


def test_one_warning_at_the_fifth_attempt_and_no_token_in_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> SendResult:
        async with serve([Act(503)] * 9 + [Act(200)]) as srv:
            return await send_once(srv.url)

    with caplog.at_level(logging.DEBUG, logger="lw_embed.sender"):
        res = run(go())
    assert (res.outcome, res.attempts) == ("delivered", 10)
    mine = [r for r in caplog.records if r.name == "lw_embed.sender"]
    above_debug = [r for r in mine if r.levelno > logging.DEBUG]
    assert len(above_debug) == 1 and above_debug[0].levelno == logging.WARNING
    assert "after 5 attempts" in above_debug[0].getMessage()
    assert KEY in above_debug[0].getMessage()
    assert len(mine) == 1 + 9  # one DEBUG line per failed attempt
    assert not any(TOKEN in r.getMessage() for r in caplog.records)


# --- Retry-After -------------------------------------------------------------------------------


def test_retry_after_seconds_honoured() -> None:
    async def go() -> tuple[SendResult, list[float]]:
        sleeps = Sleeps()
        async with serve([Act(503, {"Retry-After": "7"}), Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, sleeps.waits

    res, waits = run(go())
    assert res.outcome == "delivered" and res.attempts == 2
    assert waits == [7.0]  # above backoff_max (4): Retry-After wins
    assert res.retry_after_honoured == 7.0


def test_retry_after_http_date_honoured() -> None:
    async def go() -> tuple[SendResult, list[float]]:
        sleeps = Sleeps()
        when = email.utils.formatdate(time.time() + 5, usegmt=True)
        async with serve([Act(429, {"Retry-After": when}), Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, sleeps.waits

    res, waits = run(go())
    assert res.outcome == "delivered"
    # an HTTP date has whole seconds (up to 1 s is cut) and the server answers a little
    # after the date was made: the wait is what is left of ~5 s, never the jitter's 0-0.5 s
    assert len(waits) == 1 and 3.0 <= waits[0] <= 5.5
    assert res.retry_after_honoured == waits[0]


@pytest.mark.parametrize("value", ["soon", "", "-5", "7.5", "1e3", "Thu, 99 Foo 2024 25:61:61 GMT"])
def test_garbage_retry_after_ignored(value: str) -> None:
    async def go() -> tuple[SendResult, list[float]]:
        sleeps = Sleeps()
        async with serve([Act(503, {"Retry-After": value}), Act(200)]) as srv:
            res = await send_once(srv.url, sleeps)
        return res, sleeps.waits

    res, waits = run(go())
    assert res.outcome == "delivered" and res.retry_after_honoured == 0.0
    assert len(waits) == 1 and 0.0 <= waits[0] <= 0.5


def test_retry_after_shorter_than_jitter_is_a_floor_only() -> None:
    async def go() -> list[float]:
        sleeps = Sleeps()
        async with serve([Act(503, {"Retry-After": "0"}), Act(200)]) as srv:
            await send_once(srv.url, sleeps, rng=TopRandom())
        return sleeps.waits

    assert run(go()) == [0.5]


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 3 ", now) == 3.0
    assert parse_retry_after("0", now) == 0.0
    assert parse_retry_after("99999", now) == 3600.0
    assert parse_retry_after("9" * 5000, now) == 3600.0  # no int() of a huge string
    assert parse_retry_after("\u0663", now) is None  # an Arabic-Indic digit: not delta-seconds
    for garbage in ("soon", "", "-1", "1.5", "0x10"):
        assert parse_retry_after(garbage, now) is None, garbage
    imf = email.utils.formatdate(now + 30, usegmt=True)  # Tue, 14 Nov 2023 22:13:50 GMT
    assert parse_retry_after(imf, now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 86400, usegmt=True), now) == 3600.0
    # the obsolete forms RFC 9110 says a recipient must accept; asctime has no zone: GMT
    assert parse_retry_after("Tuesday, 14-Nov-23 22:13:50 GMT", now) == 30.0
    assert parse_retry_after("Tue Nov 14 22:13:50 2023", now) == 30.0


# --- backoff -----------------------------------------------------------------------------------


def test_backoff_caps_grow_and_stop_at_backoff_max() -> None:
    async def go() -> tuple[SendResult, list[float]]:
        sleeps = Sleeps()
        async with serve([Act(503)] * 8 + [Act(200)]) as srv:
            res = await send_once(
                srv.url, sleeps, rng=TopRandom(), backoff_initial=0.1, backoff_max=1.0
            )
        return res, sleeps.waits

    res, waits = run(go())
    assert res.outcome == "delivered" and res.attempts == 9
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_backoff_is_full_jitter_from_the_injected_rng() -> None:
    async def go() -> list[float]:
        sleeps = Sleeps()
        async with serve([Act(502)] * 12 + [Act(200)]) as srv:
            await send_once(
                srv.url, sleeps, rng=random.Random(7), backoff_initial=0.1, backoff_max=1.0
            )
        return sleeps.waits

    waits = run(go())
    ref = random.Random(7)
    assert waits == [ref.uniform(0.0, min(1.0, 0.1 * 2**i)) for i in range(12)]
    assert all(0.0 <= w <= 1.0 for w in waits)


def test_retries_forever_without_overflow() -> None:
    """Thousands of attempts: no give-up by count, and 2**attempt does not overflow."""

    async def go() -> tuple[SendResult, list[float]]:
        stop = asyncio.Event()
        sleeps = Sleeps(stop, stop_after=1100)
        url = f"http://127.0.0.1:{closed_port()}/v1/batches"
        res = await send_once(url, sleeps, stop, rng=TopRandom(), backoff_max=30.0)
        return res, sleeps.waits

    res, waits = run(go())
    assert res == SendResult("stopped", None, "stopped", 1100, 0.0)
    assert max(waits) == 30.0 and waits[-1] == 30.0


# --- connection-level failures -----------------------------------------------------------------


def test_connection_reset_then_200() -> None:
    async def go() -> tuple[SendResult, int]:
        async with serve([Act(reset=True), Act(200)]) as srv:
            res = await send_once(srv.url)
        return res, len(srv.seen)

    res, requests = run(go())
    assert (res.outcome, res.status, res.attempts) == ("delivered", 200, 2)
    assert requests == 2


def test_accept_and_close_then_200() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"

    async def go() -> tuple[SendResult, list[bytes]]:
        async with raw_serve([None, None, ok]) as (url, requests):
            res = await send_once(url)
        return res, requests

    res, requests = run(go())
    assert (res.outcome, res.attempts) == ("delivered", 3)
    assert len(requests) == 1 and requests[0].endswith(BODY)


def test_malformed_answer_is_retried_not_rejected() -> None:
    """An answer that is not HTTP is not "rejected http_400" (aiohttp's parser code)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def go() -> SendResult:
        async with raw_serve([b"SSH-2.0-OpenSSH_9.6\r\n\r\n", ok]) as (url, _):
            return await send_once(url)

    res = run(go())
    assert (res.outcome, res.status, res.attempts) == ("delivered", 200, 2)


def test_server_that_never_answers_times_out_and_is_retried() -> None:
    async def go() -> tuple[SendResult, int, float]:
        async with serve([Act(hang=5.0), Act(200)]) as srv:
            t0 = time.monotonic()
            res = await send_once(srv.url, request_timeout=0.5)
            took = time.monotonic() - t0
        return res, len(srv.seen), took

    res, requests, took = run(go())
    assert (res.outcome, res.attempts) == ("delivered", 2)
    assert requests == 2
    assert 0.4 <= took < 2.0


def test_no_server_retries_until_stop_then_stops_promptly() -> None:
    """Real (short) sleeps: the waits are interrupted by ``stop``."""

    async def go() -> tuple[SendResult, float]:
        stop = asyncio.Event()
        url = f"http://127.0.0.1:{closed_port()}/v1/batches"
        async with sender(url, None, backoff_initial=0.05, backoff_max=0.2) as s:
            task = asyncio.ensure_future(
                s.send(BODY, encoding="br", idempotency_key=KEY, events=1, stop=stop)
            )
            await asyncio.sleep(0.6)
            assert not task.done()
            stop.set()
            t0 = time.monotonic()
            res = await asyncio.wait_for(task, 2.0)
            return res, time.monotonic() - t0

    res, took = run(go())
    assert res.outcome == "stopped" and res.reason == "stopped" and res.status is None
    assert res.attempts >= 3
    assert took < 1.0


def test_long_wait_is_interrupted_by_stop() -> None:
    """A Retry-After of an hour does not hold up shutdown."""

    async def go() -> tuple[SendResult, float]:
        stop = asyncio.Event()
        async with (
            serve([Act(503, {"Retry-After": "3600"})]) as srv,
            sender(srv.url, None) as s,
        ):
            task = asyncio.ensure_future(
                s.send(BODY, encoding="br", idempotency_key=KEY, events=1, stop=stop)
            )
            while not srv.seen:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            stop.set()
            t0 = time.monotonic()
            res = await asyncio.wait_for(task, 2.0)
            return res, time.monotonic() - t0

    res, took = run(go())
    assert res == SendResult("stopped", 503, "stopped", 1, 3600.0)
    assert took < 1.0


def test_request_in_flight_is_abandoned_on_stop() -> None:
    async def go() -> tuple[SendResult, float]:
        stop = asyncio.Event()
        async with (
            serve([Act(hang=5.0)]) as srv,
            sender(srv.url, None, request_timeout=8.0) as s,
        ):
            task = asyncio.ensure_future(
                s.send(BODY, encoding="br", idempotency_key=KEY, events=1, stop=stop)
            )
            while not srv.seen:
                await asyncio.sleep(0.01)
            stop.set()
            t0 = time.monotonic()
            res = await asyncio.wait_for(task, 2.0)
            return res, time.monotonic() - t0

    res, took = run(go())
    assert res == SendResult("stopped", None, "stopped", 1, 0.0)
    assert took < 1.0


def test_stop_already_set_sends_nothing() -> None:
    async def go() -> tuple[SendResult, int]:
        stop = asyncio.Event()
        stop.set()
        async with serve([Act(200)]) as srv:
            res = await send_once(srv.url, stop=stop)
        return res, len(srv.seen)

    assert run(go()) == (SendResult("stopped", None, "stopped", 0, 0.0), 0)


# --- connection reuse --------------------------------------------------------------------------


def test_connection_reused_unless_the_answer_body_is_huge() -> None:
    async def go(body: bytes) -> list[Any]:
        async with serve([Act(200, body=body)]) as srv, sender(srv.url, Sleeps()) as s:
            for _ in range(3):
                res = await s.send(
                    BODY, encoding="br", idempotency_key=KEY, events=1, stop=asyncio.Event()
                )
                assert res.outcome == "delivered"
        return [r.peer for r in srv.seen]

    small = run(go(b"x" * 60_000))
    assert len(set(small)) == 1, small  # one keep-alive connection
    huge = run(go(b"x" * 1_000_000))
    assert len(set(huge)) == 3, huge  # not read to the end: the connection is dropped


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(cert.pem, key.pem) for 127.0.0.1, made with the openssl CLI (`cryptography` is not
    installed in this venv)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    d: Path = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=lw-embed test", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return str(cert), str(key)


def _server_ctx(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_unknown_ca_is_a_connection_error_retried(self_signed: tuple[str, str]) -> None:
    cert, key = self_signed

    async def go() -> tuple[SendResult, int]:
        stop = asyncio.Event()
        async with serve([Act(200)], _server_ctx(cert, key)) as srv:
            res = await send_once(srv.url, Sleeps(stop, stop_after=2), stop)
        return res, len(srv.seen)

    res, requests = run(go())
    assert res == SendResult("stopped", None, "stopped", 2, 0.0)
    assert requests == 0  # the handshake failed: no request reached the server


def test_tls_with_ca_file_delivered(self_signed: tuple[str, str]) -> None:
    cert, key = self_signed

    async def go() -> tuple[SendResult, list[Seen]]:
        async with serve([Act(200)], _server_ctx(cert, key)) as srv:
            res = await send_once(srv.url, ca_file=cert)
        return res, srv.seen

    res, seen = run(go())
    assert res == SendResult("delivered", 200, "http_200", 1, 0.0)
    assert seen[0].body == BODY and seen[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_tls_verify_off_delivered(self_signed: tuple[str, str]) -> None:
    cert, key = self_signed

    async def go() -> SendResult:
        async with serve([Act(200)], _server_ctx(cert, key)) as srv:
            return await send_once(srv.url, verify_tls=False)

    assert run(go()).outcome == "delivered"


# --- construction and misuse -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "token", "extra", "key"),
    [
        ("ftp://h/x", TOKEN, {}, "backend.url"),
        ("not a url", TOKEN, {}, "backend.url"),
        ("http:///v1/batches", TOKEN, {}, "backend.url"),
        ("http://127.0.0.1/v1/batches", "", {}, "backend.token"),
        ("http://127.0.0.1/v1/batches", "tok\r\nX-Evil: 1", {}, "backend.token"),
        ("http://127.0.0.1/v1/batches", TOKEN, {"ca_file": "/nonexistent.pem"}, "backend.ca_file"),
    ],
)
def test_bad_construction_is_a_config_error(
    url: str, token: str, extra: dict[str, Any], key: str
) -> None:
    args: dict[str, Any] = {
        "connect_timeout": 1.0,
        "request_timeout": 1.0,
        "backoff_initial": 0.1,
        "backoff_max": 1.0,
        "user_agent": UA,
    }
    with pytest.raises(ConfigError) as info:
        HttpSender(url, token, **args, **extra)
    assert info.value.key == key
    if token:
        assert token not in str(info.value)


def test_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        sender("https://127.0.0.1/v1/batches", None, ca_file=str(bad))
    assert info.value.key == "backend.ca_file"


def test_send_outside_async_with_is_a_bug() -> None:
    async def go() -> None:
        s = sender("http://127.0.0.1:1/v1/batches", None)
        await s.send(BODY, encoding="br", idempotency_key=KEY, events=1, stop=asyncio.Event())

    with pytest.raises(RuntimeError):
        run(go())


def test_unknown_encoding_is_a_bug() -> None:
    async def go() -> None:
        async with sender("http://127.0.0.1:1/v1/batches", None) as s:
            await s.send(BODY, encoding="zstd", idempotency_key=KEY, events=1, stop=asyncio.Event())

    with pytest.raises(ValueError, match="zstd"):
        run(go())


def test_cancellation_propagates() -> None:
    async def go() -> None:
        async with serve([Act(hang=5.0)]) as srv, sender(srv.url, None) as s:
            task = asyncio.ensure_future(
                s.send(BODY, encoding="br", idempotency_key=KEY, events=1, stop=asyncio.Event())
            )
            while not srv.seen:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(go())
