"""Identity from the environment and local files: platform fixtures, container ids from
real cgroup and mountinfo samples, gVisor, Kubernetes, the resource map and the grace."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from lw_embed.platform import detect, identity, probe


def hexid(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


DOCKER = hexid("docker")
INNER = hexid("inner")
CTRD = hexid("containerd")
CRIO = hexid("crio")
PODMAN = hexid("podman")
ECS_EC2 = "ea32192c8553fbff06c9340478a2ff089b2bb5646fb718b4ee206641c9086d66"
FARGATE_TASK = "5c3e1a7f9b2d4e6f8a0b1c2d3e4f5a6b"
FARGATE_CID = f"{FARGATE_TASK}-2785031522"
POD_UID = "7f3b1c5e-2a4d-4e6f-8b0a-1c2d3e4f5a6b"
POD_UID_ = POD_UID.replace("-", "_")


def v1(path: str) -> str:
    """A cgroup v1 file with every controller at ``path``."""
    ctrls = ["pids", "memory", "cpu,cpuacct", "blkio", "devices", "freezer", "net_cls",
             "perf_event", "cpuset", "hugetlb"]  # fmt: skip
    lines = [f"{12 - i}:{c}:{path}" for i, c in enumerate(ctrls)]
    return "\n".join([*lines, f"1:name=systemd:{path}", "0::/"]) + "\n"


# (name, /proc/self/cgroup, expected id, expected source)
CGROUP_SAMPLES: list[tuple[str, str, str, str]] = [
    ("docker v1 cgroupfs", v1(f"/docker/{DOCKER}"), DOCKER, "cgroup"),
    ("docker v2 systemd scope", f"0::/system.slice/docker-{DOCKER}.scope\n", DOCKER, "cgroup"),
    ("docker v2 private cgroupns", "0::/\n", "", "none"),
    ("docker in docker v1", v1(f"/docker/{DOCKER}/docker/{INNER}"), INNER, "cgroup"),
    ("containerd default namespace v1", v1(f"/default/{CTRD}"), CTRD, "cgroup"),
    ("kubepods cgroupfs v1 (containerd)",
     v1(f"/kubepods/burstable/pod{POD_UID}/{CTRD}"), CTRD, "cgroup"),
    ("kubepods besteffort cgroupfs v1",
     v1(f"/kubepods/besteffort/pod{POD_UID}/{CTRD}"), CTRD, "cgroup"),
    ("kubepods systemd v2 cri-containerd",
     "0::/kubepods.slice/kubepods-burstable.slice/"
     f"kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{CTRD}.scope\n", CTRD, "cgroup"),
    ("kubepods systemd v1 cri-o",
     v1(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_}.slice/"
        f"crio-{CRIO}.scope"), CRIO, "cgroup"),
    ("cri-o conmon scope is not the container",
     f"0::/kubepods.slice/kubepods-pod{POD_UID_}.slice/crio-conmon-{CRIO}.scope\n", "", "none"),
    ("podman rootful v1 libpod scope", v1(f"/machine.slice/libpod-{PODMAN}.scope"),
     PODMAN, "cgroup"),
    ("podman rootless v2 libpod scope with /container",
     "0::/user.slice/user-1000.slice/user@1000.service/user.slice/"
     f"libpod-{PODMAN}.scope/container\n", PODMAN, "cgroup"),
    ("podman conmon scope is not the container",
     f"0::/machine.slice/libpod-conmon-{PODMAN}.scope\n", "", "none"),
    ("ECS on EC2 v1", v1(f"/ecs/b1d2f3e4a5c6478899aabbccddeeff00/{ECS_EC2}"), ECS_EC2, "cgroup"),
    ("ECS on EC2 v1, old UUID task id",
     v1(f"/ecs/9781c248-0edd-4cdb-9a93-f63cb662a5d3/{ECS_EC2}"), ECS_EC2, "cgroup"),
    ("Fargate v1", v1(f"/ecs/{FARGATE_TASK}/{FARGATE_CID}"), FARGATE_CID, "cgroup"),
    ("Fargate-shaped name outside /ecs", f"0::/system.slice/{FARGATE_CID}\n", "", "none"),
    ("host v2 init.scope", "0::/init.scope\n", "", "none"),
    ("host v2 login session", "0::/user.slice/user-1000.slice/session-4.scope\n", "", "none"),
    ("host v1 systemd service", v1("/system.slice/sshd.service"), "", "none"),
    ("LXC payload", "0::/lxc.payload.web01\n", "", "none"),
    ("empty file", "", "", "none"),
    ("garbage", "\x00\xff not a cgroup file\n::::\n", "", "none"),
]  # fmt: skip


@pytest.mark.parametrize("name,text,want,source", CGROUP_SAMPLES,
                         ids=[s[0] for s in CGROUP_SAMPLES])  # fmt: skip
def test_container_id_from_cgroup(name: str, text: str, want: str, source: str) -> None:
    got = identity.container_id_from_cgroup(text)
    assert (got.id, got.source) == (want, source)


def test_cgroup_side_facts() -> None:
    fg = identity.container_id_from_cgroup(v1(f"/ecs/{FARGATE_TASK}/{FARGATE_CID}"))
    assert fg.ecs_task_id == FARGATE_TASK
    old = identity.container_id_from_cgroup(
        v1(f"/ecs/9781c248-0edd-4cdb-9a93-f63cb662a5d3/{ECS_EC2}"))
    assert old.ecs_task_id == "9781c248-0edd-4cdb-9a93-f63cb662a5d3"
    for text in (v1(f"/kubepods/burstable/pod{POD_UID}/{CTRD}"),
                 f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_}"
                 f".slice/cri-containerd-{CTRD}.scope\n"):  # fmt: skip
        assert identity.container_id_from_cgroup(text).pod_uid == POD_UID


def mline(root: str, point: str, n: int = 700) -> str:
    return f"{n} 690 254:1 {root} {point} rw,relatime - ext4 /dev/vda1 rw,discard"


OVERLAY = ("690 600 0:52 / / rw,relatime master:1 - overlay overlay "
           "rw,lowerdir=/var/lib/docker/overlay2/l/ABC:/var/lib/docker/overlay2/l/DEF")  # fmt: skip
PROCM = "691 690 0:55 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw"

# (name, /proc/self/mountinfo, expected id)
MOUNTINFO_SAMPLES: list[tuple[str, str, str]] = [
    ("docker", "\n".join([OVERLAY, PROCM,
        mline(f"/var/lib/docker/containers/{DOCKER}/resolv.conf", "/etc/resolv.conf", 701),
        mline(f"/var/lib/docker/containers/{DOCKER}/hostname", "/etc/hostname", 702),
        mline(f"/var/lib/docker/containers/{DOCKER}/hosts", "/etc/hosts", 703)]), DOCKER),
    ("docker, data-root on its own filesystem",
     "\n".join([OVERLAY, mline(f"/docker/containers/{DOCKER}/hostname", "/etc/hostname")]),
     DOCKER),
    ("docker, data-root path with a space (octal escape)",
     mline(f"/srv/my\\040docker/containers/{DOCKER}/hosts", "/etc/hosts"), DOCKER),
    ("podman rootful", "\n".join([OVERLAY,
        mline(f"/var/lib/containers/storage/overlay-containers/{PODMAN}/userdata/.containerenv",
              "/run/.containerenv"),
        mline(f"/var/lib/containers/storage/overlay-containers/{PODMAN}/userdata/hostname",
              "/etc/hostname")]), PODMAN),
    ("podman rootless",
     mline(f"/home/u/.local/share/containers/storage/overlay-containers/{PODMAN}/userdata/"
           "resolv.conf", "/etc/resolv.conf"), PODMAN),
    ("cri-o", mline(f"/run/containers/storage/overlay-containers/{CRIO}/userdata/hostname",
                    "/etc/hostname"), CRIO),
    ("containerd under kubelet: sandbox and pod files are not the container's id",
     "\n".join([OVERLAY,
        mline(f"/var/lib/kubelet/pods/{POD_UID}/etc-hosts", "/etc/hosts"),
        mline(f"/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/{CTRD}/hostname",
              "/etc/hostname")]), ""),
    ("another container's file mounted elsewhere",
     mline(f"/var/lib/docker/containers/{INNER}/hostname", "/mnt/other-hostname"), ""),
    ("host", "\n".join([
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw",
        "23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw"]), ""),
    ("truncated lines", "1 2\n\n3 4 5\n", ""),
]  # fmt: skip


@pytest.mark.parametrize("name,text,want", MOUNTINFO_SAMPLES,
                         ids=[s[0] for s in MOUNTINFO_SAMPLES])  # fmt: skip
def test_container_id_from_mountinfo(name: str, text: str, want: str) -> None:
    got = identity.container_id_from_mountinfo(text)
    assert (got.id, got.source) == (want, "mountinfo" if want else "none")


def make_root(tmp_path: Path, cgroup: str = "0::/\n", mountinfo: str = OVERLAY,
              files: dict[str, str] | None = None) -> str:  # fmt: skip
    (tmp_path / "proc/self").mkdir(parents=True, exist_ok=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo + "\n")
    (tmp_path / "proc/version").write_text("Linux version 6.1.0-18-amd64 (debian-kernel@x) #1 "
                                           "SMP PREEMPT_DYNAMIC Debian 6.1.76-1\n")  # fmt: skip
    (tmp_path / "proc/cmdline").write_text("BOOT_IMAGE=/boot/vmlinuz-6.1.0-18-amd64 ro quiet\n")
    for rel, text in (files or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return str(tmp_path)


def test_cgroup_wins_then_mountinfo_then_none(tmp_path: Path) -> None:
    docker_mounts = mline(f"/var/lib/docker/containers/{INNER}/hostname", "/etc/hostname")
    a = identity.container_id(make_root(tmp_path / "a", v1(f"/docker/{DOCKER}"), docker_mounts))
    assert (a.id, a.source) == (DOCKER, "cgroup")
    b = identity.container_id(make_root(tmp_path / "b", "0::/\n", docker_mounts))
    assert (b.id, b.source) == (INNER, "mountinfo")
    c = identity.container_id(make_root(tmp_path / "c", "0::/init.scope\n"))
    assert (c.id, c.source) == ("", "none")
    d = identity.container_id(str(tmp_path / "nothing-here"))
    assert (d.id, d.source) == ("", "none")


# -- platform fixtures -------------------------------------------------------------------

BASE = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root", "LANG": "C.UTF-8"}  # fmt: skip
ENVS: dict[str, dict[str, str]] = {
    "fargate": {**BASE, "AWS_EXECUTION_ENV": "AWS_ECS_FARGATE", "AWS_REGION": "eu-west-1",
                "AWS_DEFAULT_REGION": "eu-west-1",
                "ECS_CONTAINER_METADATA_URI": f"http://169.254.170.2/v3/{FARGATE_CID}",
                "ECS_CONTAINER_METADATA_URI_V4": f"http://169.254.170.2/v4/{FARGATE_CID}",
                "ECS_AGENT_URI": f"http://169.254.170.2/api/{FARGATE_CID}",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/0a1b2c3d"},
    "ecs-ec2": {**BASE, "AWS_EXECUTION_ENV": "AWS_ECS_EC2",
                "ECS_CONTAINER_METADATA_URI": f"http://169.254.170.2/v3/{ECS_EC2[:12]}",
                "ECS_CONTAINER_METADATA_URI_V4": f"http://169.254.170.2/v4/{ECS_EC2[:12]}"},
    "cloudrun-service": {**BASE, "PORT": "8080", "K_SERVICE": "checkout",
                         "K_REVISION": "checkout-00042-xiv", "K_CONFIGURATION": "checkout"},
    "cloudrun-job": {**BASE, "CLOUD_RUN_JOB": "nightly-export",
                     "CLOUD_RUN_EXECUTION": "nightly-export-k2x9p",
                     "CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_ATTEMPT": "2",
                     "CLOUD_RUN_TASK_COUNT": "1"},
    "kubernetes": {**BASE, "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                   "KUBERNETES_SERVICE_PORT": "443", "KUBERNETES_PORT": "tcp://10.96.0.1:443",
                   "POD_NAME": "web-7d9f8b6c4-x2kqz", "NODE_NAME": "gke-prod-pool-1-a1b2c3d4-k9zx",
                   "POD_IP": "10.48.3.17"},
    "docker": {**BASE, "HOSTNAME": DOCKER[:12]},
    "host": {**BASE, "USER": "alice", "SHELL": "/bin/bash"},
}  # fmt: skip


def root_for(name: str, tmp_path: Path) -> str:
    if name == "fargate":
        return make_root(tmp_path, v1(f"/ecs/{FARGATE_TASK}/{FARGATE_CID}"))
    if name == "ecs-ec2":
        return make_root(tmp_path, v1(f"/ecs/b1d2f3e4a5c6478899aabbccddeeff00/{ECS_EC2}"))
    if name == "kubernetes":
        return make_root(tmp_path, "0::/kubepods.slice/kubepods-burstable.slice/"
                         f"kubepods-burstable-pod{POD_UID_}.slice/cri-containerd-{CTRD}.scope\n",
                         files={"var/run/secrets/kubernetes.io/serviceaccount/namespace":
                                "shop\n"})  # fmt: skip
    if name == "docker":
        return make_root(tmp_path, "0::/\n",
                         mline(f"/var/lib/docker/containers/{DOCKER}/hostname", "/etc/hostname"),
                         files={".dockerenv": ""})  # fmt: skip
    if name == "host":
        return make_root(tmp_path, "0::/user.slice/user-1000.slice/session-4.scope\n")
    return make_root(tmp_path)  # Cloud Run: gVisor or not, no container id in cgroup


# (fixture, platform, container id, source, cloud subset)
EXPECT: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("fargate", "fargate", FARGATE_CID, "cgroup",
     {"provider": "aws", "service": "ecs", "launch_type": "FARGATE", "region": "eu-west-1",
      "execution_env": "AWS_ECS_FARGATE", "task_id": FARGATE_TASK}),
    ("ecs-ec2", "ecs", ECS_EC2, "cgroup",
     {"provider": "aws", "execution_env": "AWS_ECS_EC2",
      "task_id": "b1d2f3e4a5c6478899aabbccddeeff00"}),
    ("cloudrun-service", "cloudrun", "", "none",
     {"provider": "gcp", "service": "cloudrun", "kind": "service", "service_name": "checkout",
      "revision": "checkout-00042-xiv", "configuration": "checkout",
      "execution_environment": "gen2"}),
    ("cloudrun-job", "cloudrun", "", "none",
     {"kind": "job", "job": "nightly-export", "execution": "nightly-export-k2x9p",
      "task_index": 0, "task_attempt": 2, "task_count": 1}),
    ("kubernetes", "kubernetes", CTRD, "cgroup", {}),
    ("docker", "container", DOCKER, "mountinfo", {}),
    ("host", "host", "", "none", {}),
]  # fmt: skip


@pytest.mark.parametrize("name,plat,cid,source,cloud", EXPECT, ids=[e[0] for e in EXPECT])
def test_platform_fixtures(tmp_path: Path, name: str, plat: str, cid: str, source: str,
                           cloud: dict[str, Any]) -> None:  # fmt: skip
    ident = identity.from_env(ENVS[name], root_for(name, tmp_path))
    assert ident.platform == plat
    assert (ident.container_id, ident.container_id_source) == (cid, source)
    got = ident.cloud_map()
    assert {k: got.get(k) for k in cloud} == cloud
    if not cloud:
        assert got == {}
    assert ident.metadata == "none" and not ident.errors
    # the plain detector used at PID-1 start agrees (docker/host depend on this machine's
    # /.dockerenv, the identity's on the fixture root's)
    if plat not in ("container", "host"):
        assert detect.detect(ENVS[name]).name == plat


def test_kubernetes_downward_api_and_serviceaccount(tmp_path: Path) -> None:
    ident = identity.from_env(ENVS["kubernetes"], root_for("kubernetes", tmp_path))
    assert dict(ident.kubernetes) == {
        "namespace": "shop",  # from the serviceaccount file: POD_NAMESPACE is not set
        "node_name": "gke-prod-pool-1-a1b2c3d4-k9zx",
        "pod_ip": "10.48.3.17",
        "pod_name": "web-7d9f8b6c4-x2kqz",
        "pod_uid": POD_UID,  # from the kubepods cgroup path
    }
    env = {**ENVS["kubernetes"], "POD_NAMESPACE": "from-env", "POD_UID": "u-1"}
    k = dict(identity.from_env(env, root_for("kubernetes", tmp_path / "b")).kubernetes)
    assert k["namespace"] == "from-env" and k["pod_uid"] == "u-1"
    assert detect.detect({}, identity=ident) == detect.Platform("kubernetes", 30.0)


@pytest.mark.parametrize("files,marker", [
    ({"proc/cmdline": "BOOT_IMAGE=/vmlinuz-4.4.0-gvisor quiet\n"}, "cmdline"),
    ({"proc/version": "Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016\n"}, "version"),
])  # fmt: skip
def test_gvisor_is_cloud_run_gen1_and_a_capability_limit(tmp_path: Path, files: dict[str, str],
                                                         marker: str) -> None:  # fmt: skip
    root = make_root(tmp_path)
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    assert probe.gvisor_marker(f"{root}/proc")
    ident = identity.from_env(ENVS["cloudrun-service"], root)
    assert marker in ident.gvisor
    assert ident.cloud_map()["execution_environment"] == "gen1"
    assert any(lim.startswith("gVisor") for lim in ident.limits)
    assert ident.resource()["gvisor"] is True


def test_not_gvisor_on_a_plain_kernel(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    assert probe.gvisor_marker(f"{root}/proc") == ""
    ident = identity.from_env(ENVS["cloudrun-service"], root)
    assert not ident.gvisor and "gvisor" not in ident.resource()
    assert not any(lim.startswith("gVisor") for lim in ident.limits)


# -- resource ----------------------------------------------------------------------------


def _check_types(v: object, path: str = "resource") -> None:
    assert isinstance(v, str | int | bool | list | dict), (path, v)
    if isinstance(v, dict):
        assert list(v) == sorted(v), path
        for k, x in v.items():
            assert isinstance(k, str)
            _check_types(x, f"{path}.{k}")
    if isinstance(v, list):
        for i, x in enumerate(v):
            _check_types(x, f"{path}[{i}]")


@pytest.mark.parametrize("name", sorted(ENVS))
def test_resource_is_sorted_and_plain(tmp_path: Path, name: str) -> None:
    ident = identity.from_env(ENVS[name], root_for(name, tmp_path))
    res = ident.resource({"boot_id": "9d2c", "pid_namespace": 4026531836})
    _check_types(res)
    assert res["platform"] == ident.platform
    assert res["container_id_source"] == ident.container_id_source
    assert res["boot_id"] == "9d2c" and res["pid_namespace"] == 4026531836
    if ident.container_id:
        assert res["container_id"] == ident.container_id
    else:
        assert "container_id" not in res


def test_resource_of_fargate_env_only(tmp_path: Path) -> None:
    res = identity.from_env(ENVS["fargate"], root_for("fargate", tmp_path)).resource()
    assert res["cloud"] == {"execution_env": "AWS_ECS_FARGATE", "launch_type": "FARGATE",
                            "provider": "aws", "region": "eu-west-1", "service": "ecs",
                            "task_id": FARGATE_TASK}  # fmt: skip
    assert res["container_id"] == FARGATE_CID and res["container_id_source"] == "cgroup"


def test_identity_is_frozen(tmp_path: Path) -> None:
    ident = identity.from_env(ENVS["host"], root_for("host", tmp_path))
    with pytest.raises(AttributeError):
        ident.platform = "x"  # type: ignore[misc]
    hash(ident)


# -- grace -------------------------------------------------------------------------------


@pytest.mark.parametrize("name,grace", [("fargate", 30.0), ("ecs-ec2", 30.0),
                                        ("cloudrun-service", 10.0), ("cloudrun-job", 10.0),
                                        ("kubernetes", 30.0)])  # fmt: skip
def test_grace_from_environment(name: str, grace: float) -> None:
    plat = detect.detect(ENVS[name])
    assert plat.grace == grace
    assert detect.shutdown(0.0, ENVS[name]) == (grace, f"{plat.name} default")
    assert detect.shutdown(3.0, ENVS[name]) == (3.0, "config ([shutdown] grace)")


def test_identity_refines_the_platform_name_not_the_grace(tmp_path: Path) -> None:
    import dataclasses

    ident = identity.from_env(ENVS["fargate"], root_for("fargate", tmp_path))
    assert detect.detect(None, identity=ident) == detect.Platform("fargate", 30.0)
    k8s = dataclasses.replace(ident, platform="cloudrun")
    assert detect.detect(None, identity=k8s) == detect.Platform("cloudrun", 10.0)


# -- per-process container id (sidecar mode) ----------------------------------------------


def test_container_of_pid_parses_each_cgroup_once(tmp_path: Path) -> None:
    cid = "a" * 64
    for pid, text in ((10, f"0::/system.slice/docker-{cid}.scope\n"), (11, "0::/\n")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    of = identity.ContainerOfPid(str(tmp_path))
    assert of(10) == cid and of(11) == "" and of(12) == ""  # 12: no such process
    assert len(of._cache) == 2


def test_process_records_carry_the_container_id() -> None:
    from lw_embed.pipeline.enrich import ProcessTable

    cids = {100: "b" * 64}
    table = ProcessTable("boot", 1, 0, 8, container=lambda pid: cids.get(pid, ""))
    ev = table.on_exec(1, 100, 1, 500, "/bin/sh", ["sh"], False, "/", 0, 0, 0)
    assert table.record(ev.exec_id)["container_id"] == "b" * 64  # type: ignore[index]
    table.on_fork(2, 100, 101, 600)  # a child inherits its parent's container
    child = table.get(101)
    assert child is not None and child.container_id == "b" * 64
    plain = ProcessTable("boot", 1, 0, 8)
    ev = plain.on_exec(1, 100, 1, 500, "/bin/sh", ["sh"], False, "/", 0, 0, 0)
    assert "container_id" not in plain.record(ev.exec_id)  # type: ignore[operator]
