"""``lw-embed query`` and ``lw-embed agents``: print what an ingest server has stored.

Interface: HTTP GET (stdlib :mod:`urllib.request`, so no aiohttp import) of ``/v1/events``
or ``/v1/agents`` on the server named by ``--server`` (``http://HOST:PORT`` or
``https://...``), with the bearer token when one is given. Events are printed to ``out`` as
the server sends them, one JSON object per line (the event as stored plus its agent's
``instance_id``); agents likewise, one JSON object per line.

Capability: network access to the server.

Cost: lines are copied as they arrive; nothing is held beyond one line. The server bounds
one answer to ``limit`` events (at most 100,000).

Failure modes: an HTTP error answer (401 wrong token, 400 bad ``since``/``limit``, 5xx) or a
connection error, timeout or answer cut short prints one line on ``err`` and returns 1; a
server URL that is not http(s) returns 2. Nothing raises.
"""

from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import TextIO

#: Seconds without progress before a request is abandoned.
TIMEOUT = 30.0


def _url(server: str, path: str, params: dict[str, str]) -> str:
    base = server.rstrip("/") + path
    return f"{base}?{urllib.parse.urlencode(params)}" if params else base


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        detail = ""
        try:
            body = json.loads(exc.read(4096) or b"{}")
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                detail = f": {body['error']}"
        except (OSError, ValueError):
            pass
        return f"HTTP {exc.code} {exc.reason}{detail}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach the server: {exc.reason}"
    return str(exc) or type(exc).__name__


def _get_lines(who: str, url: str, token: str, out: TextIO, err: TextIO) -> int:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        err.write(f"lw-embed {who}: --server must be an http:// or https:// URL\n")
        return 2
    headers = {"Accept": "application/x-ndjson, application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if line:
                    out.write(line + "\n")
    except (OSError, ValueError) as exc:  # HTTPError, URLError, timeouts, resets: OSErrors
        err.write(f"lw-embed {who}: {_reason(exc)}\n")
        return 1
    except http.client.HTTPException as exc:  # a broken answer (IncompleteRead, ...)
        err.write(f"lw-embed {who}: bad answer from the server: {_reason(exc)}\n")
        return 1
    out.flush()
    return 0


def main(
    server: str,
    token: str,
    kind: str | None,
    since: str | None,
    exec_id: str | None,
    agent: str | None,
    limit: int,
    out: TextIO,
    err: TextIO,
) -> int:
    """Print the events matching the filters, oldest first; 0, or 1 on any error."""
    params = {"limit": str(limit)}
    for key, value in (("kind", kind), ("since", since), ("exec_id", exec_id), ("agent", agent)):
        if value is not None:
            params[key] = value
    return _get_lines("query", _url(server, "/v1/events", params), token, out, err)


def agents_main(server: str, token: str, out: TextIO, err: TextIO) -> int:
    """Print every agent instance the server has seen, one JSON object per line."""
    buf = io.StringIO()
    status = _get_lines("agents", _url(server, "/v1/agents", {}), token, buf, err)
    if status:
        return status
    try:
        agents = json.loads(buf.getvalue())
    except ValueError:
        err.write("lw-embed agents: the server's answer is not JSON\n")
        return 1
    if not isinstance(agents, list):
        err.write("lw-embed agents: the server's answer is not a JSON list\n")
        return 1
    for rec in agents:
        out.write(json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n")
    return 0
