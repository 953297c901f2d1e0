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
    NetConnect,
    ProcessExec,
    ProcessExit,
    sorted_value,
)

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
