"""file.change and agent.degraded: golden wire bytes, sorted keys, None omitted, the spool
class; and every scalar [files] key reachable from the environment."""

from __future__ import annotations

import cbor2
import pytest

from lw_embed.config import Config, config_to_dict, load_config
from lw_embed.events import KINDS, AgentDegraded, Event, FileChange
from lw_embed.spool import priority_of

FULL = FileChange(
    time=1700000000000000000, path="/etc/passwd", action="modify", rule="etc",
    detected_by="inotify", count=3, type="file", inode=42, mode=0o100644, owner_uid=0,
    owner_gid=0, size=1234, mtime=1699999999000000000, hash="ab" * 32,
    hash_algorithm="sha256", previous_hash="cd" * 32, actions=("attrib",),
    first_seen=1699999999500000000, attribution="syscall", exec_id="e1", pid=7,
    exe="/usr/bin/vi", uid=0, syscall="openat", package="deb:passwd",
    package_digest_mismatch=True,
)  # fmt: skip
MINIMAL = FileChange(time=1, path="/app/x", action="delete", rule="app", detected_by="scan")
DEGRADED = AgentDegraded(time=2, source="files", reason="overflow", action="rescan",
                         paths=("/app",), count=1, detail="inotify queue overflow")  # fmt: skip

GOLDEN = {
    "full": (
        "b81b66616374696f6e666d6f6469667967616374696f6e7381666174747269626b61747472696275"
        "74696f6e6773797363616c6c65636f756e74036b64657465637465645f627967696e6f7469667963"
        "6578656b2f7573722f62696e2f766967657865635f69646265316a66697273745f7365656e1b1797"
        "9cfe185c9b0064686173687840616261626162616261626162616261626162616261626162616261"
        "626162616261626162616261626162616261626162616261626162616261626162616261626e6861"
        "73685f616c676f726974686d6673686132353665696e6f6465182a646b696e646b66696c652e6368"
        "616e6765646d6f64651981a4656d74696d651b17979cfdfa8f3600696f776e65725f67696400696f"
        "776e65725f75696400677061636b6167656a6465623a706173737764777061636b6167655f646967"
        "6573745f6d69736d61746368f564706174686b2f6574632f70617373776463706964076d70726576"
        "696f75735f6861736878406364636463646364636463646364636463646364636463646364636463"
        "64636463646364636463646364636463646364636463646364636463646364636463646472756c65"
        "636574636473697a651904d26773797363616c6c666f70656e61746474696d651b17979cfe362a00"
        "0064747970656466696c656375696400"
    ),
    "minimal": (
        "a866616374696f6e6664656c6574656b6174747269627574696f6e646e6f6e6565636f756e74016b"
        "64657465637465645f6279647363616e646b696e646b66696c652e6368616e67656470617468662f"
        "6170702f786472756c65636170706474696d6501"
    ),
    "degraded": (
        "a866616374696f6e6672657363616e65636f756e74016664657461696c76696e6f74696679207175"
        "657565206f766572666c6f77646b696e646e6167656e742e64656772616465646570617468738164"
        "2f61707066726561736f6e686f766572666c6f7766736f757263656566696c65736474696d6502"
    ),
}
ALL: dict[str, Event] = {"full": FULL, "minimal": MINIMAL, "degraded": DEGRADED}


@pytest.mark.parametrize("name", sorted(ALL))
def test_golden_bytes_and_sorted_keys(name: str) -> None:
    wire = ALL[name].to_wire()
    assert cbor2.dumps(wire).hex() == GOLDEN[name]
    assert list(wire) == sorted(wire)
    assert None not in wire.values()


def test_kinds_are_registered_and_classed() -> None:
    assert KINDS["file.change"] is FileChange and KINDS["agent.degraded"] is AgentDegraded
    assert priority_of(DEGRADED.to_wire()) == 2  # a loss notice is never evicted first
    assert "hash" not in MINIMAL.to_wire() and MINIMAL.to_wire()["attribution"] == "none"


def test_every_scalar_files_key_is_reachable_by_env() -> None:
    for key, default in config_to_dict(Config())["files"].items():
        if isinstance(default, list):
            continue  # rules (tables) and secret_paths (lists): not through str()
        raw = str(default).lower() if isinstance(default, bool) else str(default)
        cfg = load_config(None, {f"LW_EMBED_FILES_{key.upper()}": raw})
        assert getattr(cfg.files, key) == default, key
    cfg = load_config(None, {"LW_EMBED_FILES_SECRET_PATHS": "/a,*.pem"})
    assert cfg.files.secret_paths == ("/a", "*.pem")
