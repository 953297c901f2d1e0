"""The bundled ingest server on loopback: the protocol, hostile bodies, overload, the CLI parts.

Servers run in a thread of the test process (``make_app`` + ``make_runner`` on
127.0.0.1:0) or, for ``serve()`` itself, in a subprocess whose listening line is parsed.
Every server a test starts is stopped at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import io
import json
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import brotli
import cbor2
import pytest
from aiohttp import web

from lw_embed.codec import AgentIdentity, encode_batch
from lw_embed.events import NetConnect, ProcessExec, ProcessExit
from lw_embed.server import ingest, query
from lw_embed.server.ingest import STATE, make_app, make_runner
from lw_embed.server.parse import InputError, inflate, parse_listen, parse_since
from lw_embed.server.store import Store

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CBOR = {"Content-Type": "application/cbor"}
AGENT = AgentIdentity(instance_id="inst-1", version="0.1.0", mode="wrapper")
RESOURCE = {"container_id": "abc123", "cloud": {"provider": "aws", "platform": "fargate"}}
T0 = 1_700_000_000_000_000_000
EXEC_A = "9f86d081884c7d65"
EXEC_B = "0123456789abcdef"
LISTENING = re.compile(r"^lw-embed ingest listening on http://(\S+):(\d+)$")


# -- batches ------------------------------------------------------------------------------


def _event(seq: int) -> dict[str, Any]:
    """A real event wire dict of a kind picked by ``seq``, with its ``seq``."""
    t = T0 + seq * 1_000
    kind = seq % 3
    if kind == 0:
        ev: dict[str, Any] = ProcessExec(
            time=t,
            exec_id=EXEC_A,
            parent_exec_id=None,
            pid=42,
            ppid=1,
            exe="/usr/bin/curl",
            argv=("curl", "-s", "http://example.com"),
            truncated=False,
            cwd="/",
            uid=0,
            gid=0,
            euid=0,
            start_time=t - 5,
            ancestors=(),
            source="ptrace",
        ).to_wire()
    elif kind == 1:
        ev = NetConnect(
            time=t,
            exec_id=EXEC_A,
            pid=42,
            tid=42,
            fd=3,
            family="inet",
            address="93.184.216.34",
            port=80,
        ).to_wire()
    else:
        ev = ProcessExit(
            time=t,
            exec_id=EXEC_B,
            pid=43,
            exit_code=0,
            signal=None,
            core_dumped=False,
            duration_ns=1_000,
            source="ptrace",
        ).to_wire()
    return dict(sorted({**ev, "seq": seq}.items()))


def events(first: int, last: int) -> list[dict[str, Any]]:
    return [_event(s) for s in range(first, last + 1)]


def make_batch(
    first: int,
    last: int,
    *,
    evs: list[dict[str, Any]] | None = None,
    loss: dict[str, int] | None = None,
    agent: AgentIdentity = AGENT,
) -> bytes:
    evs = events(first, last) if evs is None else evs
    procs = [{"exec_id": EXEC_A, "pid": 42}, {"exec_id": EXEC_B, "pid": 43}]
    return encode_batch(agent, RESOURCE, first, last, procs, evs, loss or {"queue_full": 0})


def raw_batch(**changes: Any) -> bytes:
    """A batch map encoded by hand, for the invalid ones encode_batch refuses to make."""
    b: dict[str, Any] = cbor2.loads(make_batch(0, 2))
    b.update(changes)
    out: bytes = cbor2.dumps(b)
    return out


def br(data: bytes) -> bytes:
    out: bytes = brotli.compress(data, quality=5)
    return out


@pytest.fixture(scope="session")
def brotli_bomb() -> bytes:
    """1 GiB of zeros, brotli-compressed in 1 MiB steps (about 1.6 KB)."""
    comp = brotli.Compressor(quality=5)
    zeros = bytes(1 << 20)
    out: bytes = b"".join(comp.process(zeros) for _ in range(1024)) + comp.finish()
    assert len(out) < 64 << 10
    return out


@pytest.fixture(scope="session")
def gzip_bomb() -> bytes:
    """1 GiB of zeros as one gzip member (about 1 MB)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    out = b"".join(comp.compress(zeros) for _ in range(1024)) + comp.flush()
    assert len(out) < 2 << 20
    return out


# -- a server in a thread -----------------------------------------------------------------


class Server:
    """``make_app(...)`` served on 127.0.0.1:0 by an event loop in its own thread."""

    def __init__(self, db: Path, **kw: Any) -> None:
        self.db = db
        self.app = make_app(str(db), TOKEN, **kw)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-ingest", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test by __init__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = make_runner(self.app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self) -> ingest.State:
        return self.app[STATE]

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "server did not stop"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(
        self,
        body: bytes,
        encoding: str | None = "br",
        *,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        h = {**CBOR, **(AUTH if auth else {})}
        if encoding is not None:
            h["Content-Encoding"] = encoding
        h.update(headers or {})
        return self.request("POST", "/v1/batches", body, h)

    def get(self, path: str, *, auth: bool = True) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, headers=AUTH if auth else {})

    def get_events(self, query: str = "") -> list[dict[str, Any]]:
        status, headers, body = self.get(f"/v1/events{query}")
        assert status == 200, body
        assert headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in body.decode().splitlines()]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(**kw: Any) -> Server:
        srv = Server(tmp_path / f"ingest{len(started)}.db", **kw)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the default limits for the hostile-input tests."""
    srv = Server(tmp_path_factory.mktemp("ingest") / "shared.db")
    try:
        yield srv
    finally:
        srv.stop()


def ok(resp: tuple[int, dict[str, str], bytes]) -> dict[str, Any]:
    status, _, body = resp
    assert status == 200, body
    out: dict[str, Any] = json.loads(body)
    return out


def still_serving(srv: Server) -> None:
    """A good batch is still answered 200, and nothing so far took the 500 path."""
    assert srv.get("/healthz", auth=False)[0] == 200
    assert set(ok(srv.post(br(make_batch(0, 2))))) == {"stored", "duplicates"}
    assert srv.state.internal_errors == 0


def with_instance(evs: list[dict[str, Any]], iid: str = "inst-1") -> list[dict[str, Any]]:
    return [{**e, "instance_id": iid} for e in evs]


# -- the happy path -----------------------------------------------------------------------


def test_batch_is_stored_once_and_queryable(server: Server) -> None:
    first = make_batch(0, 4)
    assert ok(server.post(br(first))) == {"stored": 5, "duplicates": 0}
    assert server.get_events() == with_instance(events(0, 4))

    out, err = io.StringIO(), io.StringIO()
    rc = query.main(server.url, TOKEN, None, None, None, None, 10000, out, err)
    assert (rc, err.getvalue()) == (0, "")
    assert [json.loads(line) for line in out.getvalue().splitlines()] == with_instance(events(0, 4))

    # the same batch again (lost answer): nothing new
    assert ok(server.post(br(first))) == {"stored": 0, "duplicates": 5}
    # re-cut after a restart: 3..7 overlaps 3..4
    assert ok(server.post(br(make_batch(3, 7)))) == {"stored": 3, "duplicates": 2}
    assert [e["seq"] for e in server.get_events()] == list(range(8))
    assert server.state.internal_errors == 0


def test_gzip_and_identity_work(server: Server) -> None:
    assert ok(server.post(gzip.compress(make_batch(0, 2)), "gzip")) == {
        "stored": 3,
        "duplicates": 0,
    }
    assert ok(server.post(make_batch(3, 5), "identity")) == {"stored": 3, "duplicates": 0}
    assert ok(server.post(make_batch(6, 6), None)) == {"stored": 1, "duplicates": 0}  # no header
    assert ok(server.post(gzip.compress(make_batch(7, 7)), "GZIP")) == {
        "stored": 1,
        "duplicates": 0,
    }
    assert [e["seq"] for e in server.get_events()] == list(range(8))


def test_seq_gaps_are_fine(server: Server) -> None:
    evs = [_event(2), _event(5), _event(9)]
    assert ok(server.post(br(make_batch(0, 10, evs=evs)))) == {"stored": 3, "duplicates": 0}


def test_query_filters_over_http(server: Server) -> None:
    ok(server.post(br(make_batch(0, 5))))
    other = AgentIdentity(instance_id="inst-2", version="0.2.0", mode="sidecar")
    ok(server.post(br(make_batch(0, 0, agent=other))))
    assert {e["kind"] for e in server.get_events("?kind=net.connect")} == {"net.connect"}
    assert [e["seq"] for e in server.get_events("?kind=net.connect&agent=inst-1")] == [1, 4]
    assert {e["exec_id"] for e in server.get_events(f"?exec_id={EXEC_B}")} == {EXEC_B}
    assert [e["instance_id"] for e in server.get_events("?agent=inst-2")] == ["inst-2"]
    assert [e["seq"] for e in server.get_events(f"?since={T0 + 3000}&agent=inst-1")] == [3, 4, 5]
    iso = "2023-11-14T22:13:20.000003+00:00"  # T0 + 3 us
    assert [e["seq"] for e in server.get_events(f"?since={quote(iso)}&agent=inst-1")] == [3, 4, 5]
    assert len(server.get_events("?limit=2")) == 2
    assert server.get_events("?kind=") == server.get_events()  # empty means no filter

    out, err = io.StringIO(), io.StringIO()
    rc = query.main(server.url, TOKEN, "process.exit", str(T0), EXEC_B, "inst-1", 1, out, err)
    assert rc == 0, err.getvalue()
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [2]


def test_agents_endpoint_and_agents_main(server: Server) -> None:
    before = time.time_ns()
    ok(server.post(br(make_batch(0, 2, loss={"queue_full": 1}))))
    ok(server.post(br(make_batch(3, 4, loss={"queue_full": 3, "spool_full": 1}))))
    status, headers, body = server.get("/v1/agents")
    assert status == 200 and headers["content-type"].startswith("application/json")
    (agent,) = json.loads(body)
    assert agent["instance_id"] == "inst-1" and agent["mode"] == "wrapper"
    assert agent["loss"] == {"queue_full": 3, "spool_full": 1}
    assert agent["events_stored"] == 5 and agent["resource"] == RESOURCE
    assert before <= agent["first_seen"] <= agent["last_seen"] <= time.time_ns()

    out, err = io.StringIO(), io.StringIO()
    assert query.agents_main(server.url, TOKEN, out, err) == 0, err.getvalue()
    assert [json.loads(x) for x in out.getvalue().splitlines()] == [agent]


def test_healthz_needs_no_token_and_everything_else_does(server: Server) -> None:
    assert server.get("/healthz", auth=False)[::2] == (200, b"ok")
    for path in ("/v1/events", "/v1/agents", "/nowhere", "/healthz/"):
        status, headers, _ = server.get(path, auth=False)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
    assert server.get("/nowhere")[0] == 404


def test_query_client_errors_are_one_line_and_exit_1(server: Server) -> None:
    cases: list[tuple[str, str | None, int, str]] = [
        ("wrong", None, 10, "HTTP 401"),
        (TOKEN, "yesterday", 10, "HTTP 400"),
        (TOKEN, None, 0, "HTTP 400"),
    ]
    for token, since, limit, needle in cases:
        out, err = io.StringIO(), io.StringIO()
        assert query.main(server.url, token, None, since, None, None, limit, out, err) == 1
        assert needle in err.getvalue() and err.getvalue().count("\n") == 1, err.getvalue()
        assert out.getvalue() == ""
    out, err = io.StringIO(), io.StringIO()
    assert query.agents_main(server.url, "wrong", out, err) == 1
    assert "HTTP 401" in err.getvalue()
    # nothing listening there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    err = io.StringIO()
    assert query.main(dead, TOKEN, None, None, None, None, 10, io.StringIO(), err) == 1
    assert "cannot reach" in err.getvalue() and err.getvalue().count("\n") == 1
    err = io.StringIO()
    assert query.main("ftp://x", TOKEN, None, None, None, None, 10, io.StringIO(), err) == 2


# -- hostile input: the right 4xx, never a 500, and the server carries on --------------------


def _deep() -> bytes:
    return b"\x81" * 10_000 + b"\x00"


def _missing_seq() -> bytes:
    evs = events(0, 2)
    del evs[1]["seq"]
    return make_batch(0, 2, evs=evs)


def _seq_out_of_range() -> bytes:
    return make_batch(0, 2, evs=[*events(0, 1), _event(3)])


def _seq_twice() -> bytes:
    return make_batch(0, 2, evs=[_event(0), _event(1), _event(1)])


def _bool_seq() -> bytes:
    evs = events(0, 0)
    evs[0]["seq"] = True
    return make_batch(0, 0, evs=evs)


def _huge_seq() -> bytes:
    evs = [{**_event(0), "seq": (1 << 64) - 1}]
    return raw_batch(events=evs, seq=[0, (1 << 64) - 1])


def _huge_time() -> bytes:
    return raw_batch(events=[{**_event(0), "time": (1 << 64) - 1}], seq=[0, 0])


BAD_BODIES: dict[str, tuple[Callable[[], bytes], str, int]] = {
    "garbage": (lambda: b"\xff\xfe this is not CBOR", "identity", 400),
    "garbage brotli": (lambda: b"not brotli at all" * 10, "br", 400),
    "garbage gzip": (lambda: b"\x1f\x8bnot really gzip" * 10, "gzip", 400),
    "empty": (lambda: b"", "identity", 400),
    "empty brotli": (lambda: b"", "br", 400),
    "truncated cbor": (lambda: make_batch(0, 4)[:-7], "identity", 400),
    "truncated cbor in brotli": (lambda: br(make_batch(0, 4)[:-7]), "br", 400),
    "truncated brotli": (lambda: br(make_batch(0, 4))[:-4], "br", 400),
    "truncated gzip": (lambda: gzip.compress(make_batch(0, 4))[:-4], "gzip", 400),
    "trailing bytes": (lambda: make_batch(0, 1) + b"\x00", "identity", 400),
    "not a map": (lambda: cbor2.dumps([1, 2, 3]), "identity", 400),
    "wrong schema version": (lambda: raw_batch(schema=2), "br", 400),
    "extra top-level key": (lambda: raw_batch(extra=1), "br", 400),
    "missing top-level key": (lambda: cbor2.dumps({"schema": 1}), "br", 400),
    "bad seq range": (lambda: raw_batch(seq=[5, 1]), "br", 400),
    "event missing seq": (_missing_seq, "br", 400),
    "seq out of range": (_seq_out_of_range, "br", 400),
    "seq twice": (_seq_twice, "br", 400),
    "bool seq": (_bool_seq, "br", 400),
    "seq beyond 64 bits": (_huge_seq, "br", 400),
    "time beyond 64 bits": (_huge_time, "br", 400),
    "empty instance id": (
        lambda: raw_batch(agent={"instance_id": "", "mode": "m", "version": "v"}),
        "br",
        400,
    ),
    "tag": (lambda: cbor2.dumps(cbor2.CBORTag(1, 0)), "identity", 400),
    "indefinite map": (lambda: b"\xbf\xff", "identity", 400),
    "deep nesting": (_deep, "identity", 400),
    "deep nesting in brotli": (lambda: br(_deep()), "br", 400),
    "deep nesting in gzip": (lambda: gzip.compress(_deep()), "gzip", 400),
    "unknown encoding": (lambda: make_batch(0, 1), "deflate", 415),
    "stacked encodings": (lambda: make_batch(0, 1), "br, gzip", 415),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_are_refused(shared: Server, name: str) -> None:
    build, encoding, want = BAD_BODIES[name]
    status, headers, body = shared.post(build(), encoding)
    assert status == want, body
    assert headers["content-type"].startswith("application/json")
    assert isinstance(json.loads(body)["error"], str)
    still_serving(shared)


def test_bad_requests_are_refused(shared: Server) -> None:
    good = br(make_batch(0, 2))
    cases: list[tuple[str, dict[str, str], int]] = [
        ("missing token", {**CBOR, "Content-Encoding": "br"}, 401),
        ("wrong token", {**CBOR, "Content-Encoding": "br", "Authorization": "Bearer nope"}, 401),
        (
            "token prefix",
            {**CBOR, "Content-Encoding": "br", "Authorization": f"Bearer {TOKEN[:-1]}"},
            401,
        ),
        ("basic auth", {**CBOR, "Content-Encoding": "br", "Authorization": f"Basic {TOKEN}"}, 401),
        (
            "non-ascii token",
            {**CBOR, "Content-Encoding": "br", "Authorization": "Bearer t\u00f6ken"},
            401,
        ),
        (
            "wrong content type",
            {**AUTH, "Content-Type": "application/json", "Content-Encoding": "br"},
            415,
        ),
        ("no content type", {**AUTH, "Content-Encoding": "br"}, 415),
    ]
    for name, headers, want in cases:
        status, resp_headers, body = shared.request("POST", "/v1/batches", good, headers)
        assert status == want, (name, body)
        if want == 401:
            assert resp_headers["www-authenticate"].startswith("Bearer"), name
    for path in (
        "/v1/events?since=yesterday",
        "/v1/events?since=99999999999999999999",
        "/v1/events?since=9999-01-01",
        "/v1/events?limit=0",
        "/v1/events?limit=-1",
        "/v1/events?limit=abc",
        "/v1/events?limit=1000001",
        "/v1/events?kid=x",
        "/v1/events?kind=a&kind=b",
        "/v1/events?limit=" + "1" * 5000,  # past int()'s digit limit
        "/v1/events?since=" + "1" * 5000,
    ):
        status, _, body = shared.get(path)
        assert status == 400, (path, body)
        assert "error" in json.loads(body)
    assert shared.request("GET", "/v1/batches", headers=AUTH)[0] == 405
    still_serving(shared)


def test_oversized_body_is_413_by_content_length_and_while_reading(shared: Server) -> None:
    too_big = bytes(shared.state.max_body + 1)
    status, _, body = shared.post(too_big, "identity")
    assert status == 413, body

    async def chunked() -> int:  # no Content-Length: counted while reading
        async def gen() -> Any:
            for _ in range(9):
                yield bytes(1 << 20)

        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{shared.url}/v1/batches",
                data=gen(),
                headers={**AUTH, **CBOR, "Content-Encoding": "identity"},
            ) as r,
        ):
            return r.status

    assert asyncio.run(chunked()) == 413
    still_serving(shared)


def test_compression_bombs_are_413_without_inflating_them(
    shared: Server, brotli_bomb: bytes, gzip_bomb: bytes
) -> None:
    for bomb, encoding in ((brotli_bomb, "br"), (gzip_bomb, "gzip")):
        t = time.monotonic()
        status, _, body = shared.post(bomb, encoding)
        assert status == 413, body
        assert b"decompressed" in body
        assert time.monotonic() - t < 5, "took as long as inflating 1 GiB"
    still_serving(shared)


def test_cut_off_uploads_do_not_reach_the_500_path(
    shared: Server, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:
            s.sendall(
                b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/cbor\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\xa7" * 100
            )
    with socket.create_connection(("127.0.0.1", shared.port), timeout=5) as s:  # bad chunking
        s.sendall(
            b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/cbor\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n"
        )
        assert re.match(rb"HTTP/1\.[01] 400 ", s.recv(100))
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    still_serving(shared)


def test_a_slow_body_gets_408(start_server: Callable[..., Server]) -> None:
    srv = start_server(read_timeout=0.3)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(
            b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Type: application/cbor\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\xa7" * 10
        )
        assert s.recv(100).startswith(b"HTTP/1.1 408")
    assert srv.state.internal_errors == 0


def test_an_unexpected_error_is_a_logged_500(
    server: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Store, batch: Any) -> tuple[int, int]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "store_batch", broken)
    with caplog.at_level(logging.ERROR, logger="lw_embed.server.ingest"):
        status, _, body = server.post(br(make_batch(0, 1)))
    assert status == 500 and json.loads(body) == {"error": "internal server error"}
    assert server.state.internal_errors == 1
    (rec,) = [r for r in caplog.records if r.name == "lw_embed.server.ingest"]
    assert rec.exc_info is not None and "disk on fire" in str(rec.exc_info[1])
    monkeypatch.undo()
    assert ok(server.post(br(make_batch(0, 1)))) == {"stored": 2, "duplicates": 0}


# -- overload -------------------------------------------------------------------------------


async def _concurrent_posts(url: str, body: bytes, n: int) -> list[tuple[int, str | None, float]]:
    async with aiohttp.ClientSession() as s:

        async def one() -> tuple[int, str | None, float]:
            t = time.monotonic()
            async with s.post(
                f"{url}/v1/batches", data=body, headers={**AUTH, **CBOR, "Content-Encoding": "br"}
            ) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After"), time.monotonic() - t

        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_is_503_with_retry_after_at_once(start_server: Callable[..., Server]) -> None:
    srv = start_server(max_concurrency=1, max_queue=0, _store_delay=1.5)
    results = asyncio.run(_concurrent_posts(srv.url, br(make_batch(0, 2)), 6))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 503, 503, 503, 503, 503], results
    for status, retry_after, took in results:
        if status == 503:
            assert retry_after == "1"
            assert took < 1.0, "a 503 waited for the slow store"
    assert srv.state.batches.inside == 0
    assert ok(srv.post(br(make_batch(0, 2)))) == {"stored": 0, "duplicates": 3}
    assert srv.state.internal_errors == 0


def test_queue_holds_max_queue_waiters(start_server: Callable[..., Server]) -> None:
    srv = start_server(max_concurrency=1, max_queue=1, _store_delay=0.5)
    results = asyncio.run(_concurrent_posts(srv.url, br(make_batch(0, 2)), 3))
    assert sorted(r[0] for r in results) == [200, 200, 503], results


# -- serve() in a subprocess -------------------------------------------------------------


def _serve_cmd(listen: str, db: Path, token_file: Path) -> list[str]:
    code = (
        "import sys; from lw_embed.server.ingest import serve; "
        f"sys.exit(serve({listen!r}, {str(db)!r}, {str(token_file)!r}))"
    )
    return [sys.executable, "-c", code]


def _read_line(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = end - time.monotonic()
            if left <= 0 or not sel.select(left):
                pytest.fail(f"no listening line within {timeout}s (got {buf!r})")
            chunk = os.read(fd, 4096)
            if not chunk:
                pytest.fail(f"server exited before listening (got {buf!r})")
            buf += chunk
    return buf.decode().split("\n", 1)[0]


@contextlib.contextmanager
def serve_process(
    tmp_path: Path, listen: str = "127.0.0.1:0"
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        _serve_cmd(listen, tmp_path / "ingest.db", token_file),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc, _read_line(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_prints_its_port_serves_and_stops_on_signal(tmp_path: Path, sig: int) -> None:
    with serve_process(tmp_path) as (proc, line):
        m = LISTENING.match(line)
        assert m is not None, line
        host, port = m.group(1), int(m.group(2))
        assert host == "127.0.0.1" and port > 0
        url = f"http://{host}:{port}"
        req = http.client.HTTPConnection(host, port, timeout=10)
        req.request(
            "POST", "/v1/batches", br(make_batch(0, 3)), {**AUTH, **CBOR, "Content-Encoding": "br"}
        )
        resp = req.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, {"stored": 4, "duplicates": 0})
        req.close()
        out, err = io.StringIO(), io.StringIO()
        assert query.main(url, TOKEN, None, None, None, None, 100, out, err) == 0, err.getvalue()
        assert len(out.getvalue().splitlines()) == 4
        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert b"Traceback" not in proc.stderr.read()


def test_serve_on_ipv6_loopback(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with serve_process(tmp_path, "[::1]:0") as (proc, line):
        m = LISTENING.match(line)
        assert m is not None and m.group(1) == "[::1]", line
        conn = http.client.HTTPConnection("::1", int(m.group(2)), timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok"
        conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_refuses_bad_options(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for listen, tok, want in (
        ("127.0.0.1", token, 2),
        ("::1:80", token, 2),
        ("127.0.0.1:0", tmp_path / "missing", 2),
        ("127.0.0.1:0", empty, 2),
        ("127.0.0.1:99999", token, 2),
    ):
        r = subprocess.run(
            _serve_cmd(listen, tmp_path / "x.db", tok),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        assert r.returncode == want, (listen, r.stderr)
        assert r.stdout == b"" and r.stderr.count(b"\n") == 1, r.stderr
    # the store cannot be opened, or the port is taken: 1, with one line
    r = subprocess.run(
        _serve_cmd("127.0.0.1:0", tmp_path / "no" / "dir" / "x.db", token),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run(
            _serve_cmd(f"127.0.0.1:{s.getsockname()[1]}", tmp_path / "x.db", token),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr


# -- small parsers --------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:1") == ("localhost", 1)
    assert parse_listen(":9") == ("0.0.0.0", 9)
    for bad in ("127.0.0.1", "::1:80", "[::1]80", "h:x", "h:65536", "h:-1", "h:"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_parse_since() -> None:
    assert parse_since(str(T0)) == T0
    assert parse_since("0") == 0
    assert parse_since("1970-01-01T00:00:01Z") == 1_000_000_000
    assert parse_since("1970-01-01T01:00:00+01:00") == 0
    assert parse_since("1970-01-01 00:00:00.000001") == 1000  # naive = UTC
    for bad in ("", "yesterday", "1_000", "1e9", "9999-12-31", str(1 << 63), "\uff12\uff10"):
        with pytest.raises(ValueError):
            parse_since(bad)


def test_inflate_edges() -> None:
    data = make_batch(0, 3)
    assert inflate(gzip.compress(data) + gzip.compress(b"!"), "gzip", 1 << 20) == data + b"!"
    assert inflate(br(b"a" * 1000), "br", 1000) == b"a" * 1000  # exactly the limit
    assert inflate(gzip.compress(b"a" * 1000), "gzip", 1000) == b"a" * 1000
    for body, encoding, status in (
        (br(b"a" * 1001), "br", 413),
        (gzip.compress(b"a" * 1001), "gzip", 413),
        (b"a" * 1001, "identity", 413),
        (br(data) + b"junk", "br", 400),
        (gzip.compress(data) + b"junk", "gzip", 400),
        (data, "compress", 415),
    ):
        with pytest.raises(InputError) as info:
            inflate(body, encoding, 1000 if status == 413 else 1 << 20)
        assert info.value.status == status, (encoding, info.value)
