"""Cloud metadata endpoints: the ECS task metadata v4 and the Google metadata server.

Interface: plain HTTP/1.1 GETs with :mod:`http.client` (no redirects, no proxies):

- ECS: ``$ECS_CONTAINER_METADATA_URI_V4`` (the container document) and
  ``$ECS_CONTAINER_METADATA_URI_V4/task`` (the task document), JSON objects;
- Google: ``http://$GCE_METADATA_HOST/computeMetadata/v1/<path>`` (host
  ``metadata.google.internal`` unless ``GCE_METADATA_HOST`` or ``GCE_METADATA_ROOT`` say
  otherwise, as Google's client libraries do), header ``Metadata-Flavor: Google``, plain
  text values: ``project/project-id``, ``project/numeric-project-id``, ``instance/region``
  (``projects/N/regions/R``), ``instance/id``, ``instance/zone``.

Capability: network access to a link-local or loopback address; nothing else.

Cost: one TCP connection per document, only on a platform that has the endpoint; a
shared deadline bounds the whole fetch (1 s by default).

Failure modes: every failure (refused, timeout, DNS, non-200, oversized body, not JSON,
JSON that is not an object, wrong value types) becomes an entry in ``Fetched.errors``
and a missing value — never an exception. Bodies are bounded (:data:`MAX_BODY`), values
are bounded strings (:data:`MAX_VALUE`). The socket timeout is reset to what is left of
the deadline before every read; the caller (:class:`lw_embed.platform.identity.LiveIdentity`)
runs the fetch in a daemon thread so that not even a slow DNS lookup holds it past the
deadline.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: largest document accepted; real ECS task documents are a few KiB
MAX_BODY = 256 * 1024
#: longest string value kept from a document
MAX_VALUE = 512
#: the Google metadata host when the environment does not name another
GCE_DEFAULT_HOST = "metadata.google.internal"


class FetchError(Exception):
    """One document could not be had (internal: turned into a ``Fetched.errors`` entry)."""


@dataclass(slots=True)
class Fetched:
    """What a fetch got: values by name, and one error string per failed document."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("timed out")
    return left


def http_get(url: str, deadline: float, headers: Mapping[str, str] | None = None,
             max_body: int = MAX_BODY) -> tuple[bytes, Mapping[str, str]]:  # fmt: skip
    """GET ``url`` (http only), the body and headers of a 200 answer, by ``deadline``.

    Raises :class:`FetchError` for anything else.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise FetchError(f"not an http URL: {url[:100]!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise FetchError(f"bad port in {url[:100]!r}") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, port, timeout=_remaining(deadline))
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        if conn.sock is not None:
            conn.sock.settimeout(_remaining(deadline))
        resp = conn.getresponse()
        if resp.status != 200:
            raise FetchError(f"HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_body:
            raise FetchError(f"body of {int(length)} bytes > {max_body}")
        chunks: list[bytes] = []
        size = 0
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(_remaining(deadline))
            chunk = resp.read(min(65536, max_body + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_body:
                raise FetchError(f"body > {max_body} bytes")
        return b"".join(chunks), {k.lower(): v for k, v in resp.getheaders()}
    except FetchError:
        raise
    except TimeoutError as exc:
        raise FetchError("timed out") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(f"{type(exc).__name__}: {exc}"[:200]) from exc
    finally:
        conn.close()


def get_json_object(url: str, deadline: float) -> dict[str, Any]:
    """A JSON object from ``url``; anything else is a :class:`FetchError`."""
    body, _ = http_get(url, deadline)
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FetchError("not JSON") from exc
    if not isinstance(doc, dict):
        raise FetchError(f"JSON {type(doc).__name__}, not an object")
    return doc


def text(value: object) -> str:
    """``value`` if it is a string (bounded, stripped of control characters), else ``""``."""
    if not isinstance(value, str):
        return ""
    v = value[:MAX_VALUE]
    return "".join(c for c in v if c.isprintable()).strip()


# -- ECS task metadata v4 ----------------------------------------------------------------

#: task document fields kept: JSON key -> our name
_ECS_TASK = {"TaskARN": "task_arn", "Family": "family", "Revision": "revision",
             "Cluster": "cluster", "AvailabilityZone": "availability_zone",
             "LaunchType": "launch_type", "ServiceName": "service_name"}  # fmt: skip
#: container document fields kept
_ECS_CONTAINER = {"Name": "container_name", "DockerId": "docker_id",
                  "ContainerARN": "container_arn", "Image": "image"}  # fmt: skip


def fetch_ecs(uri: str, deadline: float) -> Fetched:
    """The container document ``uri`` and the task document ``uri/task``.

    The v4 documents carry no ``stopTimeout``: the shutdown grace is never taken from
    here (see :mod:`lw_embed.platform.detect`)."""
    out = Fetched()
    base = uri.rstrip("/")
    try:
        cont = get_json_object(base, deadline)
    except FetchError as exc:
        out.errors.append(f"ecs container document: {exc}")
    else:
        for key, name in _ECS_CONTAINER.items():
            if v := text(cont.get(key)):
                out.values[name] = v
    try:
        task = get_json_object(base + "/task", deadline)
    except FetchError as exc:
        out.errors.append(f"ecs task document: {exc}")
    else:
        for key, name in _ECS_TASK.items():
            if v := text(task.get(key)):
                out.values[name] = v
        # the task document names our container too: find it by DockerId when the
        # container document had no name
        conts = task.get("Containers")
        if "container_name" not in out.values and isinstance(conts, list):
            for c in conts[:64]:
                if isinstance(c, dict) and text(c.get("DockerId")) == out.values.get(
                    "docker_id"
                ):
                    if n := text(c.get("Name")):
                        out.values["container_name"] = n
                    break
    return out


# -- Google metadata server --------------------------------------------------------------

#: metadata paths fetched: path -> our name
_GCE_PATHS = {"project/project-id": "project_id",
              "project/numeric-project-id": "project_number",
              "instance/region": "region", "instance/id": "instance_id",
              "instance/zone": "zone"}  # fmt: skip


def gce_host(env: Mapping[str, str]) -> str:
    """``host[:port]`` of the Google metadata server (``GCE_METADATA_HOST`` first)."""
    for var in ("GCE_METADATA_HOST", "GCE_METADATA_ROOT"):
        v = env.get(var, "").strip()
        if v:
            v = v.removeprefix("http://").split("/", 1)[0]
            if v:
                return v
    return GCE_DEFAULT_HOST


def _last_segment(v: str) -> str:
    # "projects/123/regions/us-central1" -> "us-central1"
    return v.rsplit("/", 1)[-1]


def fetch_gce(host: str, deadline: float) -> Fetched:
    """Project id and number, region, zone and instance id from the metadata server.

    An answer without ``Metadata-Flavor: Google`` is not the metadata server and is
    refused (a captive proxy or a wrong host answering 200).
    """
    out = Fetched()
    for path, name in _GCE_PATHS.items():
        url = f"http://{host}/computeMetadata/v1/{path}"
        try:
            body, headers = http_get(url, deadline, {"Metadata-Flavor": "Google"}, 4096)
        except FetchError as exc:
            out.errors.append(f"gce {path}: {exc}")
            if not str(exc).startswith("HTTP "):
                break  # refused, timed out, no such host: the rest would fail the same way
            continue
        if headers.get("metadata-flavor") != "Google":
            out.errors.append(f"gce {path}: answer without Metadata-Flavor: Google")
            continue
        v = text(body.decode("utf-8", "replace"))
        if name in ("region", "zone"):
            v = _last_segment(v)
        if name == "project_number" and not v.isdigit():
            out.errors.append(f"gce {path}: not a number")
            continue
        if v:
            out.values[name] = v
    return out
