"""The HTTP sender: ships one encoded batch to the ingest backend, retrying until it is settled.

Interface: HTTP/1.1 ``POST`` of the batch body to ``backend.url`` over aiohttp (plain TCP or
TLS), with the headers of ``docs/protocol.md``: ``Content-Type: application/cbor``,
``Content-Encoding``, ``Authorization: Bearer <token>``, ``Idempotency-Key``, ``X-LW-Events``
and ``User-Agent``. The retry loop is a tenacity :class:`~tenacity.asyncio.AsyncRetrying`
with every strategy given explicitly (tenacity's defaults retry forever *with no wait*), and
the session has an explicit :class:`aiohttp.ClientTimeout` (aiohttp's default total is
300 s), no redirects, no proxy/netrc from the environment, no cookie jar.

One :meth:`HttpSender.send` settles one batch as one of:

* ``delivered`` -- a 2xx answer;
* ``too_large`` -- 413, at once (the caller splits the batch in two);
* ``rejected`` -- any other 1xx/3xx/4xx at once (400, 401, 403, 415, ...; never retried),
  or a 5xx other than 502/503/504 still failing after ``max_server_error_retries`` attempts
  in total (a poison batch must not block the queue forever);
* ``stopped`` -- the caller set ``stop``. This is the only way out of the retries for
  connection errors, timeouts, malformed answers, 408, 429, 502, 503 and 504: there is no
  give-up by elapsed time or by attempt count. ``stop`` interrupts the wait between
  attempts *and* an attempt in flight (its request is abandoned: the idempotency key makes
  a later resend of the same batch harmless), so ``send`` returns within one event-loop
  turn or so of ``stop`` being set.

Waits are full-jitter exponential backoff, ``uniform(0, min(backoff_max, backoff_initial *
2**(attempt-1)))``; a ``Retry-After`` on the answer (delta-seconds or an HTTP-date, clamped
to [0, 3600] s) is a floor: the wait is ``max(retry_after, jitter)``. An unparseable
``Retry-After`` is ignored.

Capability: none beyond outbound TCP to the backend (and reading ``ca_file`` once).

Cost: one POST per batch on at most 4 pooled keep-alive connections (so TCP and TLS
handshakes are paid once, not per batch); the answer body is read and discarded, at most
64 KiB of it (a longer one closes the connection instead of reading on); two small tasks
per attempt and per wait (to race them against ``stop``). The system CA store is loaded
once, at construction.

Failure modes: nothing the network or the server does raises out of :meth:`~HttpSender.send`
-- every such failure is an outcome above (plus cancellation, which propagates). Bad
construction arguments raise :class:`~lw_embed.errors.ConfigError` (a URL that is not
``http(s)://host...``, an empty token or one with control characters -- never echoed --,
an unreadable or invalid ``ca_file``) or :class:`ValueError` (impossible numbers: a bug in
the caller). Using :meth:`~HttpSender.send` outside ``async with`` raises
:class:`RuntimeError`. Logging (logger ``lw_embed.sender``): per attempt only at DEBUG, one
WARNING when a batch's 5th attempt failed and it is still being retried, one WARNING at
construction when TLS verification is off or the token would travel in clear text.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from types import TracebackType
from typing import Literal, Self, TypeVar, cast

import aiohttp
import tenacity
from tenacity.asyncio import AsyncRetrying
from yarl import URL

from lw_embed.errors import ConfigError

__all__ = ["ENCODINGS", "HttpSender", "SendResult", "parse_retry_after"]

log = logging.getLogger("lw_embed.sender")

#: ``Content-Encoding`` values the protocol defines.
ENCODINGS = frozenset({"br", "gzip", "identity"})
#: Retried until delivered or stopped. 404 and 405 mean the URL is wrong (a deployment
#: mistake, not bad data): the data waits in the spool for the fix rather than being
#: dead-lettered.
_RETRY_FOREVER = frozenset({404, 405, 408, 429, 502, 503, 504})
#: Exceptions of one attempt that are retried until delivered or stopped. ``ClientResponseError``
#: out of ``session.post`` (with ``raise_for_status=False``) means the answer could not be
#: parsed as HTTP (its ``status`` is the parser's, not the server's), ``OSError`` covers what
#: aiohttp does not wrap; ``TimeoutError`` is ``asyncio.TimeoutError`` and the base of
#: ``aiohttp.ServerTimeoutError``.
_RETRY_EXC: tuple[type[BaseException], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientResponseError,
    TimeoutError,
    OSError,
)
_BODY_MAX = 64 * 1024
_RETRY_AFTER_MAX = 3600.0
_WARN_AT_ATTEMPT = 5
#: Idle keep-alive connections are dropped after this long: below the 5 s of common servers
#: (uvicorn, Node), so a POST rarely races the server closing an idle connection.
_KEEPALIVE = 4.0
_MAX_EXPONENT = 62  # 2.0**62 * anything sane is far above backoff_max; avoids OverflowError

_T = TypeVar("_T")

Outcome = Literal["delivered", "rejected", "too_large", "stopped"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """How one :meth:`HttpSender.send` ended."""

    outcome: Outcome
    status: int | None  # last HTTP status, None when the last attempt got no answer
    reason: str  # "http_<status>" of the last answer (200, 401, 413, 500, ...) or "stopped"
    attempts: int  # requests started (0: stop was already set)
    retry_after_honoured: float  # seconds of the waits that Retry-After decided


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    retry_after: float | None


class _Stopped(Exception):
    """``stop`` was set: leave the retry loop (internal)."""


@dataclass(slots=True)
class _Call:
    """The mutable state of one ``send``."""

    attempts: int = 0
    status: int | None = None
    reason: str = ""
    retry_after_total: float = 0.0
    wait_is_retry_after: bool = False


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3), clamped to [0, 3600].

    ``value`` is delta-seconds (ASCII digits) or an HTTP-date (any form
    :func:`email.utils.parsedate_to_datetime` reads; a date without a zone is GMT, as every
    HTTP-date is); ``now`` is the wall clock (``time.time()``). ``None`` when absent or
    unparseable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return _RETRY_AFTER_MAX if len(text) > 6 else min(float(text), _RETRY_AFTER_MAX)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        delta = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return min(max(delta, 0.0), _RETRY_AFTER_MAX)


def _verdict(status: int, attempt: int, max_server_error_retries: int) -> str:
    """``delivered``, ``too_large``, ``retry`` or ``rejected`` for an answer's status."""
    if 200 <= status < 300:
        return "delivered"
    if status == 413:
        return "too_large"
    if status in _RETRY_FOREVER:
        return "retry"
    if 500 <= status < 600:
        return "retry" if attempt < max_server_error_retries else "rejected"
    return "rejected"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        kind = "timeout"
    elif isinstance(exc, aiohttp.ClientResponseError):
        kind = "protocol"  # the answer was not parseable HTTP
    else:
        kind = "connection"
    text = " ".join(str(exc).split()) or type(exc).__name__  # one line, for logs
    return f"{kind}: {text if len(text) <= 200 else text[:197] + '...'}"


def _ssl_context(ca_file: str, verify_tls: bool) -> ssl.SSLContext:
    """System CAs (plus ``ca_file``), hostname checked, TLS >= 1.2; or no verification."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # loads the system CAs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)  # in addition to the system CAs
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError("backend.ca_file", f"cannot load CA file {ca_file}: {exc}") from exc
    if not verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _unless_stopped(start: Callable[[], Awaitable[_T]], stop: asyncio.Event) -> _T:
    """Await ``start()``; if ``stop`` is set first, cancel it and raise :class:`_Stopped`.

    Nothing is started when ``stop`` is already set. A result that is ready together with
    ``stop`` wins (a 200 is a 200).
    """
    if stop.is_set():
        raise _Stopped
    work: asyncio.Future[_T] = asyncio.ensure_future(start())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((work, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pending = [t for t in (work, stopper) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
    if work.done() and not work.cancelled():
        return work.result()
    raise _Stopped


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """Read and discard at most 64 KiB of the body; close the connection if there is more."""
    left = _BODY_MAX
    try:
        while left > 0:
            chunk = await resp.content.read(left)
            if not chunk:
                return  # end of body: the connection goes back to the pool
            left -= len(chunk)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # the status is what counts; this connection is not reused
    resp.close()


class HttpSender:
    """Sends batches to one backend; use as ``async with HttpSender(...) as s: await s.send(...)``.

    ``sleep`` (default :func:`asyncio.sleep`) performs the waits between attempts and is
    raced against ``stop``; ``rng`` (default a fresh :class:`random.Random`) draws the jitter.
    Both are for tests.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca_file: str = "",
        verify_tls: bool = True,
        connect_timeout: float,
        request_timeout: float,
        backoff_initial: float,
        backoff_max: float,
        user_agent: str,
        max_server_error_retries: int = 5,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            raise ConfigError("backend.url", f"not a URL: {url!r}") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError("backend.url", f"expected http(s)://host[:port]/path, got {url!r}")
        if not token:
            raise ConfigError("backend.token", "empty (every batch would be rejected with 401)")
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in token):
            raise ConfigError("backend.token", "contains whitespace or control characters")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("request_timeout", request_timeout),
            ("backoff_initial", backoff_initial),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:  # also rejects nan
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if max_server_error_retries < 1:
            raise ValueError(
                f"max_server_error_retries must be >= 1, got {max_server_error_retries}"
            )
        self._url = parsed
        self._token = token
        self._ssl = _ssl_context(ca_file, verify_tls)
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout,
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=request_timeout,
        )
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._user_agent = user_agent
        self._max_5xx = max_server_error_retries
        self._sleep: Callable[[float], Awaitable[None]] = sleep or asyncio.sleep
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        if parsed.scheme == "https" and not verify_tls:
            log.warning("backend %s: TLS certificate verification is disabled", parsed.host)
        if parsed.scheme == "http" and parsed.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("backend %s: plain http, the token travels in clear text", parsed.host)

    async def __aenter__(self) -> Self:
        if self._session is not None:
            raise RuntimeError("HttpSender is already open")
        connector = aiohttp.TCPConnector(
            ssl=self._ssl,
            limit=4,
            limit_per_host=4,
            use_dns_cache=True,
            ttl_dns_cache=60,
            keepalive_timeout=_KEEPALIVE,
            force_close=False,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            connector_owner=True,
            timeout=self._timeout,
            raise_for_status=False,
            trust_env=False,  # no proxy or .netrc credentials from the environment
            auto_decompress=False,  # the answer body is discarded anyway
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(
        self,
        body: bytes,
        *,
        encoding: str,
        idempotency_key: str,
        events: int,
        stop: asyncio.Event,
    ) -> SendResult:
        """POST ``body`` until it is delivered, rejected, too large, or ``stop`` is set."""
        session = self._session
        if session is None:
            raise RuntimeError("HttpSender.send() outside 'async with'")
        if encoding not in ENCODINGS:
            raise ValueError(f"unsupported Content-Encoding {encoding!r}")
        headers = {
            "Content-Type": "application/cbor",
            "Content-Encoding": encoding,
            "Authorization": f"Bearer {self._token}",
            "Idempotency-Key": idempotency_key,
            "X-LW-Events": str(events),
            "User-Agent": self._user_agent,
        }
        call = _Call()

        async def attempt() -> _Answer:
            if stop.is_set():
                raise _Stopped  # no new request once stopped (not counted as an attempt)
            call.attempts += 1
            try:
                answer = await _unless_stopped(lambda: self._post(session, body, headers), stop)
            except _RETRY_EXC as exc:
                call.status, call.reason = None, _describe(exc)
                raise
            call.status, call.reason = answer.status, f"http_{answer.status}"
            return answer

        def should_retry(rs: tenacity.RetryCallState) -> bool:
            out = rs.outcome
            if out is None:
                return False
            if out.failed:
                return isinstance(out.exception(), _RETRY_EXC)
            answer = cast(_Answer, out.result())
            return _verdict(answer.status, rs.attempt_number, self._max_5xx) == "retry"

        def wait(rs: tenacity.RetryCallState) -> float:
            exponent = min(rs.attempt_number - 1, _MAX_EXPONENT)
            jitter = self._rng.uniform(
                0.0, min(self._backoff_max, self._backoff_initial * 2.0**exponent)
            )
            out = rs.outcome
            retry_after = None
            if out is not None and not out.failed:
                retry_after = cast(_Answer, out.result()).retry_after
            call.wait_is_retry_after = retry_after is not None and retry_after >= jitter
            return retry_after if retry_after is not None and retry_after >= jitter else jitter

        def before_sleep(rs: tenacity.RetryCallState) -> None:
            seconds = rs.upcoming_sleep
            if call.wait_is_retry_after:
                call.retry_after_total += seconds
            log.debug(
                "batch %s: attempt %d failed (%s), next in %.3f s",
                idempotency_key, rs.attempt_number, call.reason, seconds,
            )  # fmt: skip
            if rs.attempt_number == _WARN_AT_ATTEMPT:
                log.warning(
                    "batch %s not delivered after %d attempts (last: %s); still retrying",
                    idempotency_key, rs.attempt_number, call.reason,
                )  # fmt: skip

        async def interruptible_sleep(seconds: float) -> None:
            await _unless_stopped(lambda: self._sleep(float(seconds)), stop)

        def stopped(rs: tenacity.RetryCallState) -> None:
            raise _Stopped

        retrying = AsyncRetrying(
            sleep=interruptible_sleep,
            stop=lambda rs: stop.is_set(),  # never by time or count: only the caller stops
            wait=wait,
            retry=should_retry,
            reraise=True,
            before=tenacity.before_nothing,
            after=tenacity.after_nothing,
            before_sleep=before_sleep,
            retry_error_callback=stopped,
        )
        try:
            answer: _Answer = await retrying(attempt)
        except _Stopped:
            return SendResult(
                "stopped", call.status, "stopped", call.attempts, call.retry_after_total
            )
        verdict = _verdict(answer.status, call.attempts, self._max_5xx)
        outcome: Outcome = "rejected" if verdict == "retry" else cast(Outcome, verdict)
        reason = f"http_{answer.status}"
        if outcome != "delivered":
            log.debug("batch %s: %s (%s) after %d attempts", idempotency_key, outcome, reason,
                      call.attempts)  # fmt: skip
        return SendResult(outcome, answer.status, reason, call.attempts, call.retry_after_total)

    async def _post(
        self, session: aiohttp.ClientSession, body: bytes, headers: dict[str, str]
    ) -> _Answer:
        async with session.post(
            self._url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
            await _drain(resp)
            return _Answer(resp.status, retry_after)
