"""The event model: wire dicts, key order, None omission and golden bytes."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest

from lw_embed.events import (
    KINDS,
    AgentCapabilities,
    AgentConfigRejected,
    AgentLoss,
    AgentStatus,
    Ancestor,
    Event,
    FileRemove,
    FileRename,
    FileWrite,
    NetBind,
    NetConnect,
    NetDns,
    NetFlow,
    NetListen,
    PackageActive,
    PackageChange,
    PackageInventory,
    ProcessExec,
    ProcessExit,
    ProcessSpawn,
    sorted_value,
)
from tests.unit import test_files_events as files_golden

EXEC = ProcessExec(
    time=1_700_000_000_123_456_789,
    exec_id="9f86d081884c7d65",
    parent_exec_id="0123456789abcdef",
    pid=42,
    ppid=1,
    exe="/usr/bin/curl",
    argv=("curl", "-s", "https://example.com"),
    truncated=False,
    cwd="/app",
    uid=1000,
    gid=1000,
    euid=1000,
    start_time=1_700_000_000_000_000_000,
    ancestors=(Ancestor("0123456789abcdef", 1, "/usr/local/bin/lw-embed"),),
    source="ptrace",
)
EXIT = ProcessExit(
    time=1_700_000_001_000_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    exit_code=None,
    signal=9,
    core_dumped=False,
    duration_ns=1_000_000_000,
    source="procfs",
)
CONNECT = NetConnect(
    time=1_700_000_000_500_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    tid=43,
    fd=3,
    family="inet",
    address="93.184.216.34",
    port=443,
)
CAPS = AgentCapabilities(
    time=1_700_000_000_000_000_001,
    report={
        "techniques": {"processes": "ptrace+seccomp", "network": "none"},
        "probes": {"cap_sys_ptrace": True, "kernel": "6.1.0"},
        "reasons": ["no CAP_NET_RAW"],
    },
)
LOSS = AgentLoss(
    time=1_700_000_002_000_000_000, totals={"queue_full": 3, "outbox_full": 1}, accepted=1234
)
STATUS = AgentStatus(
    time=1_700_000_003_000_000_000,
    metrics={"rss_bytes": 36_000_000, "cpu_percent": 1.5, "stops_per_s": 12},
)
REJECTED = AgentConfigRejected(
    time=1_700_000_004_000_000_000,
    path="/etc/lw-embed.toml",
    error="filter.rules[0].cmdline: bad regex",
)
ALL: list[Event] = [EXEC, EXIT, CONNECT, CAPS, LOSS, STATUS, REJECTED]

# Computed once from the instances above and pasted: a change here is a wire change.
GOLDEN = {
    "agent.config_rejected": (
        "a4656572726f72782266696c7465722e72756c65735b305d2e636d646c696e653a20626164207265"
        "676578646b696e64756167656e742e636f6e6669675f72656a65637465646470617468722f657463"
        "2f6c772d656d6265642e746f6d6c6474696d651b17979cff24952800"
    ),
    "process.exec": (
        "b069616e636573746f727381a363657865772f7573722f6c6f63616c2f62696e2f6c772d656d6265"
        "6467657865635f696470303132333435363738396162636465666370696401646172677683646375"
        "726c622d737368747470733a2f2f6578616d706c652e636f6d63637764642f617070646575696419"
        "03e8636578656d2f7573722f62696e2f6375726c67657865635f6964703966383664303831383834"
        "6337643635636769641903e8646b696e646c70726f636573732e657865636e706172656e745f6578"
        "65635f6964703031323334353637383961626364656663706964182a64707069640166736f757263"
        "65667074726163656a73746172745f74696d651b17979cfe362a00006474696d651b17979cfe3d85"
        "cd15697472756e6361746564f4637569641903e8"
    ),
    "process.exit": (
        "a86b636f72655f64756d706564f46b6475726174696f6e5f6e731a3b9aca0067657865635f6964"
        "7039663836643038313838346337643635646b696e646c70726f636573732e6578697463706964"
        "182a667369676e616c0966736f757263656670726f6366736474696d651b17979cfe71c4ca00"
    ),
    "net.connect": (
        "a967616464726573736d39332e3138342e3231362e333467657865635f69647039663836643038"
        "3138383463376436356666616d696c7964696e657462666403646b696e646b6e65742e636f6e6e"
        "65637463706964182a64706f72741901bb63746964182b6474696d651b17979cfe53f76500"
    ),
    "agent.capabilities": (
        "a3646b696e64726167656e742e6361706162696c6974696573667265706f7274a36670726f6265"
        "73a26e6361705f7379735f707472616365f5666b65726e656c65362e312e3067726561736f6e73"
        "816e6e6f204341505f4e45545f5241576a746563686e6971756573a2676e6574776f726b646e6f"
        "6e656970726f6365737365736e7074726163652b736563636f6d706474696d651b17979cfe362a"
        "0001"
    ),
    "agent.loss": (
        "a46861636365707465641904d2646b696e646a6167656e742e6c6f73736474696d651b17979cfe"
        "ad5f940066746f74616c73a26b6f7574626f785f66756c6c016a71756575655f66756c6c03"
    ),
    "agent.status": (
        "a3646b696e646c6167656e742e737461747573676d657472696373a36b6370755f70657263656e"
        "74fb3ff8000000000000697273735f62797465731a022551006b73746f70735f7065725f730c64"
        "74696d651b17979cfee8fa5e00"
    ),
}


# in-app audit events (lw_embed.sources.audit)
SPAWN = ProcessSpawn(
    time=1_700_000_005_000_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    tid=42,
    call="subprocess.Popen",
    exe="/bin/sh",
    argv=("sh", "-c", "id"),
    truncated=False,
    cwd="/app",
)
BIND = NetBind(
    time=1_700_000_005_100_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    tid=44,
    fd=5,
    family="inet",
    address="0.0.0.0",
    port=8080,
)
FWRITE = FileWrite(
    time=1_700_000_005_200_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    tid=42,
    path="/tmp/x",
    flags=577,
)
FREMOVE = FileRemove(time=1_700_000_005_300_000_000, exec_id=None, pid=42, tid=42, path="/tmp/x")
FRENAME = FileRename(
    time=1_700_000_005_400_000_000,
    exec_id="9f86d081884c7d65",
    pid=42,
    tid=42,
    path="/tmp/a",
    target="/tmp/b",
)
ALL += [SPAWN, BIND, FWRITE, FREMOVE, FRENAME]
GOLDEN_AUDIT = {
    "process.spawn": (
        "ab646172677683627368622d636269646463616c6c7073756270726f636573732e506f70656e6363"
        "7764642f61707063657865672f62696e2f736867657865635f696470396638366430383138383463"
        "37643635646b696e646d70726f636573732e737061776e63706964182a66736f7572636565617564"
        "697463746964182a6474696d651b17979cff602ff200697472756e6361746564f4"
    ),
    "net.bind": (
        "a9676164647265737367302e302e302e3067657865635f6964703966383664303831383834633764"
        "36356666616d696c7964696e657462666405646b696e64686e65742e62696e6463706964182a6470"
        "6f7274191f9063746964182c6474696d651b17979cff6625d300"
    ),
    "file.write": (
        "a867657865635f6964703966383664303831383834633764363565666c616773190241646b696e64"
        "6a66696c652e77726974656470617468662f746d702f7863706964182a66736f7572636565617564"
        "697463746964182a6474696d651b17979cff6c1bb400"
    ),
    "file.remove": (
        "a6646b696e646b66696c652e72656d6f76656470617468662f746d702f7863706964182a66736f75"
        "72636565617564697463746964182a6474696d651b17979cff72119500"
    ),
    "file.rename": (
        "a867657865635f69647039663836643038313838346337643635646b696e646b66696c652e72656e"
        "616d656470617468662f746d702f6163706964182a66736f75726365656175646974667461726765"
        "74662f746d702f6263746964182a6474696d651b17979cff78077600"
    ),
}
GOLDEN.update(GOLDEN_AUDIT)

# package events (lw_embed.sources.packages)
PKG_T = 1_700_000_000_000_000_000
ALL += [
    PackageInventory(
        time=PKG_T, snapshot_id="s1", part=1, parts=1, root="/",
        packages=({"ecosystem": "deb", "name": "bash", "state": "active",
                   "version": "5.2.15-2"},),
        totals={"deb": 1},
        unsupported=({"path": "/var/lib/rpm/Packages", "source": "rpm-bdb"},),
        errors=("dpkg: /var/lib/dpkg/info/x.list: more than 200000 files: not indexed",),
    ),
    PackageActive(
        time=PKG_T, ecosystem="deb", name="coreutils", version="9.1-1", evidence="exec",
        path="/usr/bin/env", pid=42, exec_id="0123456789abcdef", root=True, arch="amd64",
        location="/var/lib/dpkg/status",
    ),
    PackageChange(
        time=PKG_T, action="upgraded", ecosystem="deb", name="bash", source="dpkg",
        old_version="5.2.15-2", new_version="5.2.21-2",
        managers=({"manager": "apt-get", "exe": "/usr/bin/apt-get", "pid": 7, "time": 5},),
        arch="amd64", location="/var/lib/dpkg/status",
    ),
]  # fmt: skip
# file integrity events: the instances and bytes pinned in tests/unit/test_files_events.py
ALL += [files_golden.FULL, files_golden.DEGRADED]
GOLDEN.update({"file.change": files_golden.GOLDEN["full"],
               "agent.degraded": files_golden.GOLDEN["degraded"]})  # fmt: skip
GOLDEN.update({
    "package.inventory": (
        "aa666572726f727381784464706b673a202f7661722f6c69622f64706b672f696e666f2f782e6c69"
        "73743a206d6f7265207468616e203230303030302066696c65733a206e6f7420696e646578656464"
        "6b696e64717061636b6167652e696e76656e746f7279687061636b6167657381a46965636f737973"
        "74656d63646562646e616d656462617368657374617465666163746976656776657273696f6e6835"
        "2e322e31352d326470617274016570617274730164726f6f74612f6b736e617073686f745f696462"
        "73316474696d651b17979cfe362a000066746f74616c73a163646562016b756e737570706f727465"
        "6481a26470617468752f7661722f6c69622f72706d2f5061636b6167657366736f75726365677270"
        "6d2d626462"
    ),
    "package.active": (
        "ad646172636865616d6436346764656c65746564f46965636f73797374656d636465626865766964"
        "656e6365646578656367657865635f69647030313233343536373839616263646566646b696e646e"
        "7061636b6167652e616374697665686c6f636174696f6e742f7661722f6c69622f64706b672f7374"
        "61747573646e616d6569636f72657574696c7364706174686c2f7573722f62696e2f656e76637069"
        "64182a64726f6f74f56474696d651b17979cfe362a00006776657273696f6e65392e312d31"
    ),
    "package.change": (
        "ab66616374696f6e687570677261646564646172636865616d6436346965636f73797374656d6364"
        "6562646b696e646e7061636b6167652e6368616e6765686c6f636174696f6e742f7661722f6c6962"
        "2f64706b672f737461747573686d616e616765727381a463657865702f7573722f62696e2f617074"
        "2d676574676d616e61676572676170742d67657463706964076474696d6505646e616d6564626173"
        "686b6e65775f76657273696f6e68352e322e32312d326b6f6c645f76657273696f6e68352e322e31"
        "352d3266736f757263656464706b676474696d651b17979cfe362a0000"
    ),
})  # fmt: skip


# network events (lw_embed.sources.packets)
NET_T = 1_700_000_000_000_000_000
ALL += [
    NetFlow(
        time=NET_T + 5, flow_id="00112233445566ff", flow_seq=1, final=True, proto="tcp",
        orig_addr="192.0.2.1", orig_port=40000, resp_addr="198.51.100.2", resp_port=443,
        start=NET_T, end=NET_T + 4, orig_pkts=5, orig_bytes=517, orig_ip_bytes=777,
        resp_pkts=4, resp_bytes=4096, resp_ip_bytes=4304, orig_flags="SAFP",
        resp_flags="SAFP", conn_state="SF", direction="syn", end_reason="closed",
        exec_id="9f86d081884c7d65", pid=42, exe="/usr/bin/curl", attribution="syscall",
        peer_names=("api.example.com",), source="packets",
    ),
    NetListen(
        time=NET_T, proto="tcp", address="0.0.0.0", port=8080, exec_id="9f86d081884c7d65",
        pid=42, exe="/usr/bin/python3", attribution="inode", source="procfs",
    ),
    NetDns(
        time=NET_T, query="api.example.com", qtype="A", rcode="NOERROR",
        answers=(("api.example.com", "A", "192.0.2.34", 300),), client_addr="192.0.2.1",
        client_port=53000, server_addr="192.0.2.53", server_port=53, exec_id=None, pid=None,
        attribution="unknown",
    ),
]  # fmt: skip
GOLDEN.update({
    "net.flow": (
        "b81d6b6174747269627574696f6e6773797363616c6c6a636f6e6e5f737461746562534669646972"
        "656374696f6e6373796e63656e641b17979cfe362a00046a656e645f726561736f6e66636c6f7365"
        "64636578656d2f7573722f62696e2f6375726c67657865635f696470396638366430383138383463"
        "376436356566696e616cf567666c6f775f6964703030313132323333343435353636666668666c6f"
        "775f73657101646b696e64686e65742e666c6f77696f7269675f61646472693139322e302e322e31"
        "6a6f7269675f62797465731902056a6f7269675f666c61677364534146506d6f7269675f69705f62"
        "79746573190309696f7269675f706b747305696f7269675f706f7274199c406a706565725f6e616d"
        "6573816f6170692e6578616d706c652e636f6d63706964182a6570726f746f637463706972657370"
        "5f616464726c3139382e35312e3130302e326a726573705f62797465731910006a726573705f666c"
        "61677364534146506d726573705f69705f62797465731910d069726573705f706b74730469726573"
        "705f706f72741901bb66736f75726365677061636b6574736573746172741b17979cfe362a000064"
        "74696d651b17979cfe362a0005"
    ),
    "net.listen": (
        "aa676164647265737367302e302e302e306b6174747269627574696f6e65696e6f64656365786570"
        "2f7573722f62696e2f707974686f6e3367657865635f696470396638366430383138383463376436"
        "35646b696e646a6e65742e6c697374656e63706964182a64706f7274191f906570726f746f637463"
        "7066736f757263656670726f6366736474696d651b17979cfe362a0000"
    ),
    "net.dns": (
        "ab67616e737765727381a464646174616a3139322e302e322e3334646e616d656f6170692e657861"
        "6d706c652e636f6d6374746c19012c647479706561416b6174747269627574696f6e67756e6b6e6f"
        "776e6b636c69656e745f61646472693139322e302e322e316b636c69656e745f706f727419cf0864"
        "6b696e64676e65742e646e7365717479706561416571756572796f6170692e6578616d706c652e63"
        "6f6d6572636f6465674e4f4552524f526b7365727665725f616464726a3139322e302e322e35336b"
        "7365727665725f706f727418356474696d651b17979cfe362a0000"
    ),
})  # fmt: skip


def _keys_sorted(value: object) -> bool:
    if isinstance(value, dict):
        return list(value) == sorted(value) and all(_keys_sorted(v) for v in value.values())
    if isinstance(value, list):
        return all(_keys_sorted(v) for v in value)
    return True


@pytest.mark.parametrize("ev", ALL, ids=lambda e: e.kind)
def test_golden_bytes(ev: Event) -> None:
    assert cbor2.dumps(ev.to_wire()).hex() == GOLDEN[ev.kind]


def test_every_kind_has_a_golden_instance() -> None:
    assert {e.kind for e in ALL} == set(KINDS) == set(GOLDEN)


@pytest.mark.parametrize("ev", ALL, ids=lambda e: e.kind)
def test_wire_keys_sorted_recursively(ev: Event) -> None:
    wire = ev.to_wire()
    assert _keys_sorted(wire)
    assert wire["kind"] == ev.kind
    assert wire["time"] == ev.time


@pytest.mark.parametrize("ev", ALL, ids=lambda e: e.kind)
def test_deterministic_bytes_match_canonical_content(ev: Event) -> None:
    # Same content as the canonical encoding, only the key order rule differs.
    wire = ev.to_wire()
    assert cbor2.loads(cbor2.dumps(wire)) == cbor2.loads(cbor2.dumps(wire, canonical=True))


@pytest.mark.parametrize("ev", ALL, ids=lambda e: e.kind)
def test_frozen_slotted(ev: Event) -> None:
    assert not hasattr(ev, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.time = 0  # type: ignore[misc]


def test_kinds_map_to_classes() -> None:
    assert KINDS["process.exec"] is ProcessExec
    assert KINDS["process.exit"] is ProcessExit
    assert KINDS["net.connect"] is NetConnect
    assert KINDS["agent.capabilities"] is AgentCapabilities
    assert KINDS["agent.loss"] is AgentLoss
    assert KINDS["agent.status"] is AgentStatus
    for kind, cls in KINDS.items():
        assert cls.kind == kind


def test_exec_wire_shape() -> None:
    wire = EXEC.to_wire()
    assert wire["argv"] == ["curl", "-s", "https://example.com"]
    assert isinstance(wire["argv"], list)
    assert wire["ancestors"] == [
        {"exe": "/usr/local/bin/lw-embed", "exec_id": "0123456789abcdef", "pid": 1}
    ]


def test_none_fields_omitted() -> None:
    root = dataclasses.replace(EXEC, parent_exec_id=None, ancestors=())
    wire = root.to_wire()
    assert "parent_exec_id" not in wire
    assert wire["ancestors"] == []
    assert "exit_code" not in EXIT.to_wire()
    assert EXIT.to_wire()["signal"] == 9
    ended = dataclasses.replace(EXIT, exit_code=0, signal=None, duration_ns=None)
    wire = ended.to_wire()
    assert wire["exit_code"] == 0
    assert "signal" not in wire and "duration_ns" not in wire
    assert "exec_id" not in dataclasses.replace(CONNECT, exec_id=None).to_wire()


def test_false_and_zero_are_kept() -> None:
    wire = dataclasses.replace(EXIT, exit_code=0, core_dumped=False).to_wire()
    assert wire["exit_code"] == 0
    assert wire["core_dumped"] is False


def test_capabilities_sorted_recursively_and_not_mutated() -> None:
    report = {"b": {"z": 1, "a": [{"y": 1, "x": 2}]}, "a": (1, 2)}
    wire = AgentCapabilities(time=1, report=report).to_wire()
    assert _keys_sorted(wire)
    assert wire["report"] == {"a": [1, 2], "b": {"a": [{"x": 2, "y": 1}], "z": 1}}
    assert list(report) == ["b", "a"]


def test_sorted_value_plain_values() -> None:
    assert sorted_value(3) == 3
    assert sorted_value("x") == "x"
    assert sorted_value(None) is None
    assert sorted_value(b"\x00") == b"\x00"
