"""Identity from the metadata endpoints: a fake ECS v4 endpoint and a fake Google metadata
server on 127.0.0.1 serving recorded documents; and the endpoint down, slow and hostile.

``FakeMetadata`` is also used by test_env_cli.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lw_embed.platform import detect, identity, metadata

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "env"
TASK_ID = "5c3e1a7f9b2d4e6f8a0b1c2d3e4f5a6b"
TASK_ARN = f"arn:aws:ecs:eu-west-1:123456789012:task/shop-prod/{TASK_ID}"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# a route answers (status, headers, body) or writes the response itself
Route = tuple[int, dict[str, str], bytes] | Callable[[BaseHTTPRequestHandler], None]


class FakeMetadata:
    """An HTTP server on 127.0.0.1 answering GETs from a path -> Route table."""

    def __init__(self, routes: dict[str, Route] | None = None) -> None:
        self.routes: dict[str, Route] = dict(routes or {})
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                route = fake.routes.get(self.path)
                if route is None:
                    route = (404, {}, b"not found")
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    def __enter__(self) -> FakeMetadata:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ecs_uri(self) -> str:
        return f"http://{self.host}/v4/{TASK_ID}-2785031522"


def ecs_routes(container: bytes, task: bytes) -> dict[str, Route]:
    js = {"Content-Type": "application/json"}
    return {f"/v4/{TASK_ID}-2785031522": (200, js, container),
            f"/v4/{TASK_ID}-2785031522/task": (200, js, task)}  # fmt: skip


def gce_routes(values: dict[str, str], flavor: bool = True) -> dict[str, Route]:
    hdr = {"Metadata-Flavor": "Google", "Content-Type": "application/text"} if flavor else {}

    def route(path: str, value: str) -> Route:
        def answer(h: BaseHTTPRequestHandler) -> None:
            # like the real server: no Metadata-Flavor request header, no answer
            if h.headers.get("Metadata-Flavor") != "Google":
                body, status = b"Missing Metadata-Flavor:Google header.", 403
            else:
                body, status = value.encode(), 200
            h.send_response(status)
            for k, v in hdr.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)

        return answer

    return {f"/computeMetadata/v1/{p}": route(p, v) for p, v in values.items()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root whose /proc/self/cgroup and mountinfo name no container."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text("0::/\n")
    (tmp_path / "proc/self/mountinfo").write_text(
        "22 1 0:21 / / rw,relatime - overlay overlay rw\n"
    )
    (tmp_path / "proc/version").write_text("Linux version 6.1.0 (builder@host) #1 SMP\n")
    (tmp_path / "proc/cmdline").write_text("BOOT_IMAGE=/vmlinuz-6.1.0 ro quiet\n")
    return tmp_path


@pytest.fixture
def fargate() -> Iterator[FakeMetadata]:
    routes = ecs_routes(fixture("ecs_fargate_container.json"), fixture("ecs_fargate_task.json"))
    with FakeMetadata(routes) as srv:
        yield srv


def fargate_env(srv: FakeMetadata) -> dict[str, str]:
    return {"ECS_CONTAINER_METADATA_URI_V4": srv.ecs_uri(),
            "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE", "AWS_REGION": "eu-west-1"}  # fmt: skip


# -- recorded documents ------------------------------------------------------------------


def test_fargate_identity_from_task_and_container_documents(fargate: FakeMetadata,
                                                            root: Path) -> None:  # fmt: skip
    ident = identity.detect(fargate_env(fargate), root=str(root), budget=2.0)
    assert ident.platform == "fargate"
    assert ident.metadata == "ok", ident.errors
    c = ident.cloud_map()
    assert c["provider"] == "aws" and c["service"] == "ecs"
    assert c["task_arn"] == TASK_ARN
    assert (c["task_family"], c["task_revision"]) == ("shop-web", "17")
    assert c["cluster"] == "arn:aws:ecs:eu-west-1:123456789012:cluster/shop-prod"
    assert c["availability_zone"] == "eu-west-1b"
    assert c["launch_type"] == "FARGATE"
    assert c["container_name"] == "web"
    assert str(c["container_arn"]).startswith("arn:aws:ecs:eu-west-1:123456789012:container/")
    assert (c["region"], c["account_id"], c["task_id"]) == ("eu-west-1", "123456789012", TASK_ID)
    # no id in this root's cgroup/mountinfo: the container document's DockerId is used
    assert ident.container_id == f"{TASK_ID}-2785031522"
    assert ident.container_id_source == "metadata"
    assert {p for p, _ in fargate.requests} == {f"/v4/{TASK_ID}-2785031522",
                                                f"/v4/{TASK_ID}-2785031522/task"}  # fmt: skip
    # the documented v4 response has no stopTimeout: Fargate's default, and said so
    assert detect.detect({}, identity=ident) == detect.Platform("fargate", 30.0)
    assert any("stopTimeout" in lim for lim in ident.limits)


def test_cgroup_id_wins_over_metadata(fargate: FakeMetadata, root: Path) -> None:
    cid = f"{TASK_ID}-2785031522"
    (root / "proc/self/cgroup").write_text(
        f"11:memory:/ecs/{TASK_ID}/{cid}\n10:cpu,cpuacct:/ecs/{TASK_ID}/{cid}\n"
    )
    ident = identity.detect(fargate_env(fargate), root=str(root), budget=2.0)
    assert (ident.container_id, ident.container_id_source) == (cid, "cgroup")


def test_ecs_on_ec2_from_documents(root: Path) -> None:
    routes = ecs_routes(fixture("ecs_ec2_container.json"), fixture("ecs_ec2_task.json"))
    with FakeMetadata(routes) as srv:
        env = {"ECS_CONTAINER_METADATA_URI_V4": srv.ecs_uri(), "AWS_EXECUTION_ENV": "AWS_ECS_EC2"}
        ident = identity.detect(env, root=str(root), budget=2.0)
    assert ident.platform == "ecs" and ident.metadata == "ok"
    c = ident.cloud_map()
    assert c["launch_type"] == "EC2" and c["service_name"] == "billing-api-svc"
    assert c["cluster"] == "billing" and c["region"] == "us-east-2"
    assert ident.container_id == "ea32192c8553fbff06c9340478a2ff089b2bb5646fb718b4ee206641c9086d66"
    assert ident.resource()["platform"] == "ecs"


def test_launch_type_fargate_in_metadata_makes_it_fargate(root: Path) -> None:
    routes = ecs_routes(fixture("ecs_fargate_container.json"), fixture("ecs_fargate_task.json"))
    with FakeMetadata(routes) as srv:
        env = {"ECS_CONTAINER_METADATA_URI_V4": srv.ecs_uri()}  # no AWS_EXECUTION_ENV
        assert identity.from_env(env, str(root)).platform == "ecs"
        assert identity.detect(env, root=str(root), budget=2.0).platform == "fargate"


def test_stop_timeout_in_container_document_is_not_the_grace(root: Path) -> None:
    # the cores decide the grace from the environment before metadata could answer: a
    # StopTimeout (which v4 never sends) must not make `env` show a grace they ignore
    cont = json.loads(fixture("ecs_fargate_container.json"))
    cont["StopTimeout"] = 90
    routes = ecs_routes(json.dumps(cont).encode(), fixture("ecs_fargate_task.json"))
    with FakeMetadata(routes) as srv:
        ident = identity.detect(fargate_env(srv), root=str(root), budget=2.0)
    assert detect.detect({}, identity=ident).grace == 30.0
    assert detect.shutdown(0.0, fargate_env(srv)) == (30.0, "fargate default")
    assert any("stopTimeout" in lim for lim in ident.limits)


def test_cloud_run_service_from_metadata_server(root: Path) -> None:
    values = json.loads(fixture("gce_cloudrun_metadata.json"))
    with FakeMetadata(gce_routes(values)) as srv:
        env = {"K_SERVICE": "checkout", "K_REVISION": "checkout-00042-xiv",
               "K_CONFIGURATION": "checkout", "GCE_METADATA_HOST": srv.host}  # fmt: skip
        ident = identity.detect(env, root=str(root), budget=2.0)
        assert all(h.get("metadata-flavor") == "Google" for _, h in srv.requests)
    assert ident.platform == "cloudrun" and ident.metadata == "ok", ident.errors
    c = ident.cloud_map()
    assert (c["provider"], c["service"], c["kind"]) == ("gcp", "cloudrun", "service")
    assert (c["service_name"], c["revision"]) == ("checkout", "checkout-00042-xiv")
    assert c["project_id"] == "shop-prod-4711" and c["project_number"] == "612345678901"
    assert c["region"] == "europe-west1"  # from "projects/N/regions/R"
    assert c["zone"] == "europe-west1-1"
    assert c["instance_id"] == values["instance/id"]
    assert c["execution_environment"] == "gen2"
    assert detect.detect({}, identity=ident).grace == 10.0


def test_cloud_run_job_with_metadata(root: Path) -> None:
    values = json.loads(fixture("gce_cloudrun_metadata.json"))
    with FakeMetadata(gce_routes(values)) as srv:
        env = {"CLOUD_RUN_JOB": "nightly-export", "CLOUD_RUN_EXECUTION": "nightly-export-k2x9p",
               "CLOUD_RUN_TASK_INDEX": "3", "CLOUD_RUN_TASK_ATTEMPT": "1",
               "CLOUD_RUN_TASK_COUNT": "8", "GCE_METADATA_ROOT": srv.host}  # fmt: skip
        ident = identity.detect(env, root=str(root), budget=2.0)
    c = ident.cloud_map()
    assert c["kind"] == "job" and c["job"] == "nightly-export"
    assert (c["task_index"], c["task_attempt"], c["task_count"]) == (3, 1, 8)
    assert c["project_id"] == "shop-prod-4711"


def test_gce_answer_without_metadata_flavor_is_refused(root: Path) -> None:
    values = json.loads(fixture("gce_cloudrun_metadata.json"))
    with FakeMetadata(gce_routes(values, flavor=False)) as srv:
        env = {"K_SERVICE": "checkout", "GCE_METADATA_HOST": srv.host}
        ident = identity.detect(env, root=str(root), budget=2.0)
    assert "project_id" not in ident.cloud_map()
    assert ident.metadata == "failed"
    assert any("Metadata-Flavor" in e for e in ident.errors)


def test_gce_missing_value_is_partial(root: Path) -> None:
    values = json.loads(fixture("gce_cloudrun_metadata.json"))
    del values["instance/zone"]  # the fake answers 404 for it
    with FakeMetadata(gce_routes(values)) as srv:
        env = {"K_SERVICE": "checkout", "GCE_METADATA_HOST": srv.host}
        ident = identity.detect(env, root=str(root), budget=2.0)
    c = ident.cloud_map()
    assert ident.metadata == "partial"
    assert ident.errors == ("gce instance/zone: HTTP 404",)
    assert "zone" not in c and c["region"] == "europe-west1" and c["instance_id"]


# -- down, slow, hostile -----------------------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_endpoint_down_gives_env_only_identity(root: Path) -> None:
    port = _closed_port()
    env = {"ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{port}/v4/x",
           "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE", "AWS_REGION": "eu-west-1"}  # fmt: skip
    t0 = time.monotonic()
    ident = identity.detect(env, root=str(root), budget=1.0)
    assert time.monotonic() - t0 < 1.0
    assert ident.platform == "fargate" and ident.metadata == "failed"
    assert ident.cloud_map()["region"] == "eu-west-1"  # from the environment
    assert "task_arn" not in ident.cloud_map()
    assert len(ident.errors) == 2 and all("refused" in e.lower() for e in ident.errors)


def test_gce_down_stops_after_first_refusal(root: Path) -> None:
    env = {"K_SERVICE": "checkout", "GCE_METADATA_HOST": f"127.0.0.1:{_closed_port()}"}
    ident = identity.detect(env, root=str(root), budget=1.0)
    assert ident.metadata == "failed" and len(ident.errors) == 1
    assert ident.cloud_map()["service_name"] == "checkout"


def _sleeper(seconds: float) -> Route:
    def answer(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)

    return answer


def _dripper(h: BaseHTTPRequestHandler) -> None:
    # headers at once, then one byte every 0.2 s: every read is quick, the whole is not
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


@pytest.mark.parametrize("route", [_sleeper(5.0), _dripper], ids=["silent", "drip"])
def test_slow_endpoint_is_cut_at_the_budget(root: Path, route: Route) -> None:
    with FakeMetadata({f"/v4/{TASK_ID}-2785031522": route,
                       f"/v4/{TASK_ID}-2785031522/task": route}) as srv:  # fmt: skip
        env = fargate_env(srv)
        budget = 0.6
        t0 = time.monotonic()
        ident = identity.detect(env, root=str(root), budget=budget)
        took = time.monotonic() - t0
    assert took < budget + 0.5, took  # a bound, not a benchmark
    assert ident.platform == "fargate"
    assert ident.metadata == "timeout"
    assert "task_arn" not in ident.cloud_map()
    assert ident.cloud_map()["region"] == "eu-west-1"


def test_live_identity_never_blocks_and_resource_waits_at_most_the_budget(root: Path) -> None:
    with FakeMetadata({f"/v4/{TASK_ID}-2785031522": _sleeper(5.0)}) as srv:
        t0 = time.monotonic()
        live = identity.start(fargate_env(srv), root=str(root), budget=0.5,
                              extra={"boot_id": "b", "pid_namespace": 4026531836})  # fmt: skip
        assert live.identity().platform == "fargate"
        assert time.monotonic() - t0 < 0.3  # start and identity() do not wait
        res = live.resource()
        assert time.monotonic() - t0 < 0.5 + 0.5
    assert res["boot_id"] == "b" and res["pid_namespace"] == 4026531836
    assert res["platform"] == "fargate" and "task_arn" not in res["cloud"]
    t1 = time.monotonic()
    live.resource()
    assert time.monotonic() - t1 < 0.1  # only the first call may wait


def test_live_identity_resource_has_the_metadata(fargate: FakeMetadata, root: Path) -> None:
    live = identity.start(fargate_env(fargate), root=str(root), budget=2.0,
                          extra={"boot_id": "b"})  # fmt: skip
    res = live.resource()
    assert res["cloud"]["task_arn"] == TASK_ARN and res["metadata"] == "ok"
    assert res["boot_id"] == "b"
    assert live.identity().cloud_map()["task_arn"] == TASK_ARN


def _huge_chunked(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"[" * 65536
    try:
        for _ in range(64):  # 4 MiB, no Content-Length
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass


HOSTILE: dict[str, Route] = {
    "huge-declared": (200, {"Content-Length": str(50 * 1024 * 1024)}, b"{}"),
    "huge-chunked": _huge_chunked,
    "not-json": (200, {}, b"<html>hello from a captive portal</html>"),
    "array": (200, {}, b'[{"TaskARN": "arn:aws:ecs:x:1:task/c/t"}]'),
    "deep": (200, {}, b"[" * 100_000 + b"]" * 100_000),
    "binary": (200, {}, bytes(range(256)) * 4),
    "http-500": (500, {}, b'{"TaskARN": "x"}'),
    "redirect": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_answers_give_env_only_identity(root: Path, name: str) -> None:
    route = HOSTILE[name]
    with FakeMetadata({f"/v4/{TASK_ID}-2785031522": route,
                       f"/v4/{TASK_ID}-2785031522/task": route}) as srv:  # fmt: skip
        ident = identity.detect(fargate_env(srv), root=str(root), budget=2.0)
    assert ident.platform == "fargate"
    assert ident.metadata == "failed", ident.errors
    assert len(ident.errors) == 2
    assert set(ident.cloud_map()) == {"execution_env", "launch_type", "provider", "region",
                                      "service"}  # fmt: skip


def test_wrong_types_are_dropped_field_by_field(root: Path) -> None:
    task = {"TaskARN": 5, "Family": {"x": 1}, "Revision": None, "LaunchType": ["FARGATE"],
            "Cluster": "c" * 100_000, "AvailabilityZone": "eu-west-1a\x00\x1b[31m",
            "Containers": "not a list"}  # fmt: skip
    cont = {"Name": 17, "DockerId": True, "StopTimeout": "forever", "ContainerARN": []}
    routes = ecs_routes(json.dumps(cont).encode(), json.dumps(task).encode())
    with FakeMetadata(routes) as srv:
        ident = identity.detect(fargate_env(srv), root=str(root), budget=2.0)
    assert ident.metadata == "ok"
    c = ident.cloud_map()
    for k in ("task_arn", "task_family", "task_revision", "container_name", "container_arn"):
        assert k not in c
    assert c["launch_type"] == "FARGATE"  # from AWS_EXECUTION_ENV, not the list
    assert len(str(c["cluster"])) == metadata.MAX_VALUE
    assert c["availability_zone"] == "eu-west-1a[31m"  # control characters removed
    assert ident.container_id_source == "none"
    res = ident.resource()
    assert json.loads(json.dumps(res)) == res


def test_non_http_uri_is_refused_without_a_connection(root: Path) -> None:
    env = {"ECS_CONTAINER_METADATA_URI_V4": "file:///etc/passwd"}
    ident = identity.detect(env, root=str(root), budget=1.0)
    assert ident.metadata == "failed"
    assert all("not an http URL" in e for e in ident.errors)


def test_no_fetch_when_the_platform_has_no_endpoint(root: Path) -> None:
    for env in ({}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}):
        ident = identity.detect(env, root=str(root), budget=1.0)
        assert ident.metadata == "none" and not ident.errors
        assert "metadata" not in ident.resource()
