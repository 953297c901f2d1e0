"""Who and where we are: platform, container id, cloud identity — the batch ``resource``.

Interface:

- environment variables: Cloud Run services (``K_SERVICE``, ``K_REVISION``,
  ``K_CONFIGURATION``) and jobs (``CLOUD_RUN_JOB``, ``CLOUD_RUN_EXECUTION``,
  ``CLOUD_RUN_TASK_INDEX``, ``CLOUD_RUN_TASK_ATTEMPT``, ``CLOUD_RUN_TASK_COUNT``); ECS
  (``ECS_CONTAINER_METADATA_URI_V4``, ``AWS_EXECUTION_ENV``, ``AWS_REGION``); Kubernetes
  (``KUBERNETES_SERVICE_HOST`` and the usual downward-API names ``POD_NAME``,
  ``POD_NAMESPACE``, ``NODE_NAME``, ``POD_UID``, ``POD_IP``);
- files under ``root``: ``proc/self/cgroup`` then ``proc/self/mountinfo`` for the
  container id, ``var/run/secrets/kubernetes.io/serviceaccount/namespace``,
  ``proc/cmdline`` and ``proc/version`` for gVisor;
- the metadata endpoints of :mod:`lw_embed.platform.metadata` (ECS task metadata v4,
  the Google metadata server), only on the platform that has them.

:func:`from_env` never touches the network; :func:`detect` adds the metadata within a
budget; :func:`start` does that in a background thread and hands out
:meth:`LiveIdentity.resource` for the shipper to call per batch.

Capability: none (reading one's own /proc files; loopback/link-local HTTP).

Cost: ``from_env``: a few small file reads, well under a millisecond. The metadata fetch:
at most ``budget`` seconds (1 s by default), two to five small HTTP requests, once.

Failure modes: unreadable files give no id (source ``none``); a metadata endpoint that
is down, slow or hostile gives the environment-only identity, with the reason in
``Identity.errors`` and ``Identity.metadata`` set to ``failed``/``partial``/``timeout`` —
never an exception and never a wait past the budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lw_embed.platform import detect as _detect
from lw_embed.platform import metadata as md
from lw_embed.platform.probe import gvisor_marker

#: default total time the metadata endpoints get
DEFAULT_BUDGET = 1.0

Value = str | int | bool

_HEX64 = r"[0-9a-f]{64}"
# one cgroup path component that names a container
_CGROUP_COMPONENT = (
    # systemd driver: docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
    # libpod-<id>.scope (the *-conmon-<id>.scope of the monitor do not match)
    (re.compile(rf"^(?:docker|cri-containerd|crio|libpod)-({_HEX64})(?:\.scope)?$"), None),
    # cgroupfs driver: /docker/<id>, /kubepods/.../pod<uid>/<id>, /ecs/<task>/<id>
    (re.compile(rf"^({_HEX64})$"), None),
    # Fargate: /ecs/<32 hex task id>/<32 hex task id>-<digits>
    (re.compile(r"^([0-9a-f]{32}-[0-9]{1,12})$"), "ecs"),
)
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
# a task id: 32 hex digits (new ARN format) or a UUID (old)
_ECS_TASK_ID = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})$")
# mountinfo "root" fields that name our container (docker, containerd, podman, cri-o)
_MOUNT_ROOT = (
    re.compile(rf"/containers/({_HEX64})/(?:hostname|hosts|resolv\.conf)$"),
    re.compile(rf"/overlay-containers/({_HEX64})/userdata(?:/|$)"),
)
# only mounts onto these places are the runtime's own files for this container (another
# container's files can be visible when /var/lib/docker is mounted in)
_MOUNT_POINTS = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf",
                           "/run/.containerenv"})  # fmt: skip
_SA_NAMESPACE = "var/run/secrets/kubernetes.io/serviceaccount/namespace"
_K8S_VARS = {
    "pod_name": ("POD_NAME", "MY_POD_NAME", "K8S_POD_NAME", "KUBERNETES_POD_NAME"),
    "namespace": ("POD_NAMESPACE", "MY_POD_NAMESPACE", "K8S_NAMESPACE",
                  "KUBERNETES_NAMESPACE"),
    "node_name": ("NODE_NAME", "MY_NODE_NAME", "K8S_NODE_NAME", "KUBERNETES_NODE_NAME"),
    "pod_uid": ("POD_UID", "MY_POD_UID", "K8S_POD_UID"),
    "pod_ip": ("POD_IP", "MY_POD_IP", "K8S_POD_IP"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ContainerId:
    id: str = ""
    source: str = "none"  # cgroup | mountinfo | metadata | none
    ecs_task_id: str = ""  # from an /ecs/<task>/... cgroup path
    pod_uid: str = ""  # from a kubepods cgroup path


@dataclass(frozen=True, slots=True)
class Identity:
    """Everything detected; ``cloud``/``kubernetes`` are sorted (key, value) pairs."""

    platform: str  # cloudrun | fargate | ecs | kubernetes | container | host
    container_id: str = ""
    container_id_source: str = "none"  # cgroup | mountinfo | metadata | none
    hostname: str = ""
    cloud: tuple[tuple[str, Value], ...] = ()
    kubernetes: tuple[tuple[str, str], ...] = ()
    gvisor: str = ""  # the marker seen, "" when not gVisor
    limits: tuple[str, ...] = ()  # what this platform rules out or costs, for people
    metadata: str = "none"  # none (not tried) | ok | partial | failed | timeout
    errors: tuple[str, ...] = ()  # why metadata is missing, one line per document

    def cloud_map(self) -> dict[str, Value]:
        return dict(self.cloud)

    def resource(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return resource(self, extra)


def resource(ident: Identity, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The batch ``resource``: sorted keys, str/int/bool/dict values; ``extra`` merged in."""
    out: dict[str, Any] = {
        "platform": ident.platform,
        "container_id_source": ident.container_id_source,
    }
    if ident.container_id:
        out["container_id"] = ident.container_id
    if ident.hostname:
        out["hostname"] = ident.hostname
    if ident.cloud:
        out["cloud"] = dict(sorted(ident.cloud))
    if ident.kubernetes:
        out["kubernetes"] = dict(sorted(ident.kubernetes))
    if ident.gvisor:
        out["gvisor"] = True
    if ident.metadata != "none":
        out["metadata"] = ident.metadata
    out.update(extra or {})
    return dict(sorted(out.items()))


# -- container id ------------------------------------------------------------------------


def container_id_from_cgroup(text: str) -> ContainerId:
    """The container id named by ``/proc/self/cgroup`` (v1 or v2), or an empty one.

    The last matching path component wins (a container nested in another is the inner
    one); lines are tried in order, the first that names a container wins.
    """
    ecs_task = pod_uid = ""
    found = ""
    for line in text.splitlines()[:256]:
        path = line.split(":", 2)[-1].strip()
        if not path or path == "/":
            continue
        parts = path.split("/")
        line_id = ""
        for i, comp in enumerate(parts):
            for rx, ctx in _CGROUP_COMPONENT:
                m = rx.match(comp)
                if m and (ctx is None or "ecs" in parts[:i]):
                    line_id = m.group(1)
                    break
            if comp == "ecs" and i + 1 < len(parts) and _ECS_TASK_ID.match(parts[i + 1]):
                ecs_task = ecs_task or parts[i + 1]
            if not pod_uid and (pm := _POD_UID.search(comp)):
                pod_uid = pm.group(1).replace("_", "-")
        if line_id and not found:
            found = line_id
    if not found:
        return ContainerId(ecs_task_id=ecs_task, pod_uid=pod_uid)
    return ContainerId(found, "cgroup", ecs_task, pod_uid)


class ContainerOfPid:
    """``pid -> container id`` from ``/proc/<pid>/cgroup`` (the sidecar's processes live in
    other containers than its own); parsed once per distinct cgroup text, bounded."""

    MAX = 1024

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._cache: dict[str, str] = {}

    def __call__(self, pid: int) -> str:
        try:
            with open(f"{self.proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
                text = f.read(1 << 16)
        except OSError:
            return ""
        cid = self._cache.get(text)
        if cid is None:
            cid = container_id_from_cgroup(text).id
            if len(self._cache) >= self.MAX:
                self._cache.clear()
            self._cache[text] = cid
        return cid


def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def container_id_from_mountinfo(text: str) -> ContainerId:
    """The container id named by the runtime's bind mounts in ``/proc/self/mountinfo``.

    Docker and containerd mount ``.../containers/<id>/{hostname,hosts,resolv.conf}``,
    podman and cri-o ``.../overlay-containers/<id>/userdata/...``, onto ``/etc/*`` or
    ``/run/.containerenv``.
    """
    for line in text.splitlines()[:4096]:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        root, point = _unescape_mount(fields[3]), _unescape_mount(fields[4])
        if point not in _MOUNT_POINTS:
            continue
        for rx in _MOUNT_ROOT:
            if m := rx.search(root):
                return ContainerId(m.group(1), "mountinfo")
    return ContainerId()


def _read(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def container_id(root: str = "/") -> ContainerId:
    """cgroup first, then mountinfo (a private cgroup namespace shows ``0::/``)."""
    cg = container_id_from_cgroup(_read(os.path.join(root, "proc/self/cgroup")))
    if cg.id:
        return cg
    mi = container_id_from_mountinfo(_read(os.path.join(root, "proc/self/mountinfo")))
    return dataclasses.replace(cg, id=mi.id, source=mi.source)


# -- environment-only identity -----------------------------------------------------------


def _int(v: str) -> int | None:
    v = v.strip()
    return int(v) if v.isdigit() and len(v) < 10 else None


def _pairs(d: Mapping[str, Value | None]) -> tuple[tuple[str, Value], ...]:
    return tuple(sorted((k, v) for k, v in d.items() if v is not None and v != ""))


def _limits(platform: str, gvisor: str) -> tuple[str, ...]:
    out: list[str] = []
    if gvisor:
        out.append("gVisor sandbox (Cloud Run gen1 or runsc): ptrace and seccomp are "
                   "gVisor's emulation or absent; no SO_ATTACH_FILTER, no "
                   "PACKET_STATISTICS, no sock_diag; /proc/net/tcp works")  # fmt: skip
    if platform == "cloudrun":
        out.append("Cloud Run: the filesystem is in memory (the spool costs RAM); with "
                   "request-based billing the CPU is throttled between requests; "
                   "SIGKILL comes 10 s after SIGTERM")  # fmt: skip
    if platform == "fargate":
        out.append("Fargate: SYS_PTRACE is the only capability a task definition can add")
    if platform in ("fargate", "ecs"):
        out.append("ECS: the container's stopTimeout is not in the task metadata; the "
                   "shutdown grace assumes 30 s unless [shutdown] grace says "
                   "otherwise")  # fmt: skip
    if platform == "kubernetes":
        out.append("Kubernetes: the shutdown grace assumes terminationGracePeriodSeconds "
                   "= 30 s unless [shutdown] grace says otherwise")  # fmt: skip
    return tuple(out)


def _arn_parts(arn: str) -> tuple[str, str, str]:
    """(region, account, last path segment) of an ARN, empty strings when it is not one."""
    p = arn.split(":", 5)
    if len(p) != 6 or p[0] != "arn":
        return "", "", ""
    return p[3], p[4], p[5].rsplit("/", 1)[-1]


def from_env(env: Mapping[str, str] | None = None, root: str = "/") -> Identity:
    """The identity from the environment and local files alone (no network)."""
    env = os.environ if env is None else env
    plat = _detect.platform_name(env, root)
    cid = container_id(root)
    if plat == "host" and cid.id:
        plat = "container"
    gv = gvisor_marker(os.path.join(root, "proc"))
    cloud: dict[str, Value | None] = {}
    if plat == "cloudrun":
        cloud = {"provider": "gcp", "service": "cloudrun",
                 "execution_environment": "gen1" if gv else "gen2"}  # fmt: skip
        if env.get("CLOUD_RUN_JOB"):
            cloud |= {"kind": "job", "job": env.get("CLOUD_RUN_JOB"),
                      "execution": env.get("CLOUD_RUN_EXECUTION"),
                      "task_index": _int(env.get("CLOUD_RUN_TASK_INDEX", "")),
                      "task_attempt": _int(env.get("CLOUD_RUN_TASK_ATTEMPT", "")),
                      "task_count": _int(env.get("CLOUD_RUN_TASK_COUNT", ""))}  # fmt: skip
        else:
            cloud |= {"kind": "service", "service_name": env.get("K_SERVICE"),
                      "revision": env.get("K_REVISION"),
                      "configuration": env.get("K_CONFIGURATION")}  # fmt: skip
    elif plat in ("fargate", "ecs"):
        cloud = {"provider": "aws", "service": "ecs",
                 "launch_type": "FARGATE" if plat == "fargate" else None,
                 "execution_env": md.text(env.get("AWS_EXECUTION_ENV")),
                 "region": md.text(env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")),
                 "task_id": cid.ecs_task_id}  # fmt: skip
    k8s: dict[str, Value | None] = {}
    if env.get("KUBERNETES_SERVICE_HOST"):
        for name, names in _K8S_VARS.items():
            k8s[name] = next((md.text(env[n]) for n in names if env.get(n)), None)
        if not k8s["namespace"]:
            k8s["namespace"] = md.text(_read(os.path.join(root, _SA_NAMESPACE), 256))
        k8s["pod_uid"] = k8s["pod_uid"] or cid.pod_uid
    try:
        host = socket.gethostname()
    except OSError:
        host = ""
    return Identity(
        platform=plat,
        container_id=cid.id,
        container_id_source=cid.source,
        hostname=md.text(host),
        cloud=_pairs(cloud),
        kubernetes=tuple((k, str(v)) for k, v in _pairs(k8s)),
        gvisor=gv,
        limits=_limits(plat, gv),
    )


# -- metadata ----------------------------------------------------------------------------


def wants_metadata(ident: Identity, env: Mapping[str, str]) -> str:
    """Which endpoint this identity would ask: ``"ecs"``, ``"gce"`` or ``""``."""
    if ident.platform in ("fargate", "ecs") and env.get("ECS_CONTAINER_METADATA_URI_V4"):
        return "ecs"
    if ident.platform == "cloudrun":
        return "gce"
    return ""


def _status(got: md.Fetched) -> str:
    if not got.errors:
        return "ok"
    if any(e.endswith("timed out") for e in got.errors) and not got.values:
        return "timeout"
    return "partial" if got.values else "failed"


def with_metadata(ident: Identity, env: Mapping[str, str], deadline: float) -> Identity:
    """``ident`` completed from its platform's metadata endpoint, by ``deadline``."""
    which = wants_metadata(ident, env)
    if which == "ecs":
        got = md.fetch_ecs(env["ECS_CONTAINER_METADATA_URI_V4"], deadline)
        return _merge_ecs(ident, got)
    if which == "gce":
        got = md.fetch_gce(md.gce_host(env), deadline)
        return _merge_gce(ident, got)
    return ident


def _merge_ecs(ident: Identity, got: md.Fetched) -> Identity:
    v = got.values
    cloud: dict[str, Value | None] = dict(ident.cloud)
    launch = v.get("launch_type", "")
    plat = ident.platform
    if launch == "FARGATE":
        plat = "fargate"
    elif launch in ("EC2", "EXTERNAL"):
        plat = "ecs"
    region, account, task_id = _arn_parts(v.get("task_arn", ""))
    cloud |= {"launch_type": launch or cloud.get("launch_type"),
              "task_arn": v.get("task_arn"), "task_family": v.get("family"),
              "task_revision": v.get("revision"), "cluster": v.get("cluster"),
              "availability_zone": v.get("availability_zone"),
              "service_name": v.get("service_name"),
              "container_name": v.get("container_name"),
              "container_arn": v.get("container_arn"),
              "image": v.get("image"),
              "region": region or cloud.get("region"),
              "account_id": account or None,
              "task_id": task_id or cloud.get("task_id")}  # fmt: skip
    cid, src = ident.container_id, ident.container_id_source
    if not cid and v.get("docker_id"):
        cid, src = v["docker_id"], "metadata"
    return dataclasses.replace(
        ident, platform=plat, container_id=cid, container_id_source=src,
        cloud=_pairs(cloud), limits=_limits(plat, ident.gvisor),
        metadata=_status(got), errors=tuple(got.errors),
    )  # fmt: skip


def _merge_gce(ident: Identity, got: md.Fetched) -> Identity:
    cloud: dict[str, Value | None] = dict(ident.cloud)
    for k in ("project_id", "project_number", "region", "zone", "instance_id"):
        cloud[k] = got.values.get(k) or cloud.get(k)
    return dataclasses.replace(ident, cloud=_pairs(cloud), metadata=_status(got),
                               errors=tuple(got.errors))  # fmt: skip


def _timed_out(ident: Identity, budget: float) -> Identity:
    return dataclasses.replace(
        ident, metadata="timeout",
        errors=(f"metadata: no answer within the {budget:g} s budget",),
    )  # fmt: skip


class LiveIdentity:
    """The identity, completed from metadata in a background thread.

    ``identity()`` never waits; ``resource()`` waits, once, for what is left of the
    budget (so that the first batch already carries the full identity), then never.
    Both are safe to call from any thread.
    """

    def __init__(self, env: Mapping[str, str] | None = None, *, root: str = "/",
                 budget: float = DEFAULT_BUDGET, fetch: bool = True,
                 extra: Mapping[str, Any] | None = None,
                 on_thread: Callable[[], None] | None = None) -> None:  # fmt: skip
        env = dict(os.environ if env is None else env)
        self._on_thread = on_thread
        self.budget = max(0.0, budget)
        self._extra = dict(extra or {})
        self._deadline = time.monotonic() + self.budget
        self._done = threading.Event()
        self._set(from_env(env, root))
        self._env_only = self._ident
        if fetch and wants_metadata(self._ident, env):
            t = threading.Thread(target=self._fetch, args=(env,),
                                 name="lw-embed-identity", daemon=True)  # fmt: skip
            t.start()
        else:
            self._done.set()

    def _set(self, ident: Identity) -> None:
        # one reference swap: readers see the old or the new pair, never a mix
        self._state = (ident, resource(ident, self._extra))

    @property
    def _ident(self) -> Identity:
        return self._state[0]

    def _fetch(self, env: Mapping[str, str]) -> None:
        if self._on_thread is not None:  # the in-app agent: its requests are not the host's
            self._on_thread()
        try:
            self._set(with_metadata(self._ident, env, self._deadline))
        except Exception as exc:  # a parser bug must not kill the identity
            self._set(dataclasses.replace(self._ident, metadata="failed",
                                          errors=(f"metadata: {exc!r}"[:200],)))  # fmt: skip
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> Identity:
        """The identity once complete, or the environment-only one after ``timeout``.

        ``timeout`` defaults to what is left of the budget.
        """
        if timeout is None:
            timeout = self._deadline - time.monotonic() + 0.05
        if self._done.wait(max(0.0, timeout)):
            return self._ident
        return _timed_out(self._env_only, self.budget)

    def identity(self) -> Identity:
        return self._ident

    def resource(self) -> dict[str, Any]:
        if not self._done.is_set():
            left = self._deadline - time.monotonic() + 0.05
            if left > 0:
                self._done.wait(left)
        return dict(self._state[1])


def start(env: Mapping[str, str] | None = None, *, root: str = "/",
          budget: float = DEFAULT_BUDGET, fetch: bool = True,
          extra: Mapping[str, Any] | None = None,
          on_thread: Callable[[], None] | None = None) -> LiveIdentity:  # fmt: skip
    """Detect now from the environment, complete from metadata in the background
    (``on_thread`` is called first in that thread)."""
    return LiveIdentity(env, root=root, budget=budget, fetch=fetch, extra=extra,
                        on_thread=on_thread)


def detect(env: Mapping[str, str] | None = None, *, root: str = "/",
           budget: float = DEFAULT_BUDGET, fetch: bool = True) -> Identity:  # fmt: skip
    """The full identity, taking at most ``budget`` seconds (plus thread scheduling)."""
    with contextlib.suppress(Exception):
        return LiveIdentity(env, root=root, budget=budget, fetch=fetch).wait()
    return from_env(env, root)
