"""Tests of lw_embed.config: TOML file + LW_EMBED_* overrides, table-driven validation."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lw_embed import config as config_mod
from lw_embed.config import (
    DEFAULT_AGGREGATE_KEYS,
    RESERVED_ENV,
    AgentConfig,
    AggregateConfig,
    Config,
    FilterConfig,
    FilterRule,
    FrozenMap,
    OutputConfig,
    ProcessesConfig,
    ShutdownConfig,
    SignalsConfig,
    TracerConfig,
    WorkerConfig,
    config_from_dict,
    config_to_dict,
    default_data_dir,
    load_config,
    resolve_uid,
    resolved_data_dir,
    resolved_output_dir,
    with_overrides,
)
from lw_embed.errors import ConfigError, LwEmbedError

FULL_TOML = """\
[agent]
data_dir = "/srv/lw"
instance_id = "i-123"
log_level = "debug"

[output]
dir = "/srv/out"
batch_max_events = 500
batch_max_bytes = 2048
batch_max_age = 0.5

[tracer]
mode = "ptrace"
seccomp = "off"
no_new_privs = "never"
trace_connect = false
argv_max_bytes = 8192
argv_max_args = 16
buffer_bytes = 65536

[processes]
scope = "tree"
reconcile_interval = 10.5
ancestors_max = 0

[signals]
pgroup = true

[shutdown]
grace = 25.0
flush = 0

[worker]
restart_backoff_min = 1.0
restart_backoff_max = 1.0

[backend]
url = "https://ingest.example:8443"
token = ""
token_file = "/run/secrets/lw-token"
ca_file = "/etc/lw/ca.pem"
verify_tls = false
connect_timeout = 1.5
request_timeout = 20
backoff_initial = 0.25
backoff_max = 60
compression_quality = 4

[spool]
dir = "/srv/spool"
max_bytes = 1048576
segment_bytes = 65536
sync_interval = 0.05

[filter]
default = "exclude"

[[filter.rules]]
name = "ignore-healthcheck"
action = "exclude"
kinds = ["process.exec", "net.*"]
process_name = ["curl", "wget*"]
exe = ["/usr/bin/*"]
ancestor_exe = ["*/cron"]
ancestor_name = ["sshd"]
cmdline = "--health(check)?"
user = ["root", "1000"]
container = ["abc123*"]
alert = true

[[filter.rules]]
name = "shells"
action = "tag"
process_name = ["sh", "bash"]

[aggregate]
window = 2.5
max_groups = 100

[aggregate.keys]
"process.exec" = ["exe", "argv"]
"net.connect" = []

[network]
enabled = false
interfaces = ["eth0", "lo"]
capture = "tpacket_v2"
block_size = 65536
block_count = 4
frame_size = 1024
retire_ms = 5
snap_length = 256
blocks_per_poll = 2
max_flows = 500
tcp_timeout = 30
udp_timeout = 6.5
close_timeout = 1
active_timeout = 10
sweep_interval = 0.5
procfs_interval = 2
fd_scan_interval = 0.1
max_events_queued = 100
dns = false
dns_max_entries = 50

[packages]
enabled = false
root = "/srv/root"
snapshot_interval = 3600
check_interval = 30
usage_interval = 5
full_refresh = 120
scan_rate = 100
search_depth = 3
npm_depth = 2
rediscover_every = 4

[inapp]
queue_max = 500
files = false
sigterm = true

[files]
enabled = true
default_rules = false
trace = false
hash_algorithm = "sha512"
hash_max_bytes = 4096
secret_paths = ["/srv/secret/*"]
baseline = "/srv/lw/files.db"
scan_files_per_s = 100
scan_bytes_per_s = 65536
coalesce_quiet = 1.0
coalesce_max = 5.0
rename_timeout = 0.5
attribution_window = 10.0
max_watches = 1000
periodic_interval = 60.0
max_pending = 500

[[files.rules]]
path = "/srv/app"
name = "app"
recursive = false
max_depth = 3
exclude = ["*.log"]
actions = ["create", "delete", "read"]
hash = false
"""

FULL_DICT: dict[str, dict[str, Any]] = {
    "packages": {
        "enabled": False, "root": "/srv/root", "snapshot_interval": 3600.0,
        "check_interval": 30.0, "usage_interval": 5.0, "full_refresh": 120.0,
        "scan_rate": 100, "search_depth": 3, "npm_depth": 2, "rediscover_every": 4,
    },
    "inapp": {"queue_max": 500, "files": False, "sigterm": True},
    "files": {
        "enabled": True, "default_rules": False, "trace": False, "hash_algorithm": "sha512",
        "hash_max_bytes": 4096, "secret_paths": ["/srv/secret/*"],
        "baseline": "/srv/lw/files.db", "scan_files_per_s": 100, "scan_bytes_per_s": 65536,
        "coalesce_quiet": 1.0, "coalesce_max": 5.0, "rename_timeout": 0.5,
        "attribution_window": 10.0, "max_watches": 1000, "periodic_interval": 60.0,
        "max_pending": 500,
        "rules": [{
            "path": "/srv/app", "name": "app", "recursive": False, "max_depth": 3,
            "exclude": ["*.log"], "actions": ["create", "delete", "read"], "hash": False,
        }],
    },
    "agent": {"data_dir": "/srv/lw", "instance_id": "i-123", "log_level": "debug"},
    "output": {
        "dir": "/srv/out",
        "batch_max_events": 500,
        "batch_max_bytes": 2048,
        "batch_max_age": 0.5,
    },
    "tracer": {
        "mode": "ptrace",
        "seccomp": "off",
        "no_new_privs": "never",
        "trace_connect": False,
        "argv_max_bytes": 8192,
        "argv_max_args": 16,
        "buffer_bytes": 65536,
    },
    "processes": {"scope": "tree", "reconcile_interval": 10.5, "ancestors_max": 0},
    "signals": {"pgroup": True},
    "shutdown": {"grace": 25.0, "flush": 0.0},
    "worker": {"restart_backoff_min": 1.0, "restart_backoff_max": 1.0},
    "backend": {
        "url": "https://ingest.example:8443",
        "token": "",
        "token_file": "/run/secrets/lw-token",
        "ca_file": "/etc/lw/ca.pem",
        "verify_tls": False,
        "connect_timeout": 1.5,
        "request_timeout": 20.0,
        "backoff_initial": 0.25,
        "backoff_max": 60.0,
        "compression_quality": 4,
    },
    "spool": {"dir": "/srv/spool", "max_bytes": 1048576, "segment_bytes": 65536,
              "sync_interval": 0.05},
    "filter": {
        "default": "exclude",
        "rules": [
            {
                "name": "ignore-healthcheck",
                "action": "exclude",
                "kinds": ["process.exec", "net.*"],
                "process_name": ["curl", "wget*"],
                "exe": ["/usr/bin/*"],
                "ancestor_exe": ["*/cron"],
                "ancestor_name": ["sshd"],
                "cmdline": "--health(check)?",
                "user": ["root", "1000"],
                "container": ["abc123*"],
                "alert": True,
            },
            {"name": "shells", "action": "tag", "process_name": ["sh", "bash"], "alert": False},
        ],
    },
    "aggregate": {
        "window": 2.5,
        "max_groups": 100,
        "keys": {"process.exec": ["exe", "argv"], "net.connect": []},
    },
    "network": {
        "enabled": False, "interfaces": ["eth0", "lo"], "capture": "tpacket_v2",
        "block_size": 65536, "block_count": 4, "frame_size": 1024, "retire_ms": 5,
        "snap_length": 256, "blocks_per_poll": 2, "max_flows": 500, "tcp_timeout": 30.0,
        "udp_timeout": 6.5, "close_timeout": 1.0, "active_timeout": 10.0,
        "sweep_interval": 0.5, "procfs_interval": 2.0, "fd_scan_interval": 0.1,
        "max_events_queued": 100, "dns": False, "dns_max_entries": 50,
    },
}


def write(tmp_path: Path, text: str, name: str = "lw-embed.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), env or {})


# --- defaults and valid input ---


def test_defaults_without_file() -> None:
    cfg = load_config(None, {})
    assert cfg == Config()
    assert cfg.agent == AgentConfig(data_dir="", instance_id="", log_level="warning")
    assert cfg.output == OutputConfig("", 1000, 1048576, 1.0)
    assert cfg.tracer == TracerConfig("auto", "auto", "auto", True, 4096, 256, 4194304)
    assert cfg.processes == ProcessesConfig("auto", 2.0, 8)
    assert cfg.signals == SignalsConfig(pgroup=False)
    assert cfg.shutdown == ShutdownConfig(grace=0.0, flush=2.0)
    assert cfg.worker == WorkerConfig(restart_backoff_min=0.5, restart_backoff_max=30.0)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == Config()
    assert load_text(tmp_path, "[tracer]\n") == Config()


def test_full_file_loads_every_key(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL_TOML)
    assert config_to_dict(cfg) == FULL_DICT
    assert cfg.tracer.mode == "ptrace"
    assert cfg.signals.pgroup is True
    assert cfg.shutdown.flush == 0.0 and isinstance(cfg.shutdown.flush, float)
    assert config_from_dict(FULL_DICT) == cfg


def test_full_file_round_trips_through_dict_and_json(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL_TOML)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()  # defaults validate


def test_int_is_accepted_for_float_and_stored_as_float(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[output]\nbatch_max_age = 2\n")
    assert cfg.output.batch_max_age == 2.0
    assert isinstance(cfg.output.batch_max_age, float)


@pytest.mark.parametrize(
    ("text", "section", "key", "value"),
    [
        ("[shutdown]\ngrace = 0\n", "shutdown", "grace", 0.0),
        ("[shutdown]\ngrace = 0.1\n", "shutdown", "grace", 0.1),
        ("[shutdown]\ngrace = 3600\n", "shutdown", "grace", 3600.0),
        ("[tracer]\nargv_max_bytes = 64\n", "tracer", "argv_max_bytes", 64),
        ("[tracer]\nargv_max_bytes = 131072\n", "tracer", "argv_max_bytes", 131072),
        ("[processes]\nancestors_max = 64\n", "processes", "ancestors_max", 64),
        ('[agent]\nlog_level = "error"\n', "agent", "log_level", "error"),
    ],
)
def test_boundaries_accepted(
    tmp_path: Path, text: str, section: str, key: str, value: object
) -> None:
    cfg = load_text(tmp_path, text)
    assert getattr(getattr(cfg, section), key) == value


# --- bad input from the file ---

BAD_FILES = [
    ("[bogus]\nx = 1\n", "bogus", "unknown section"),
    ("bogus = 1\n", "bogus", "unknown section"),
    ("[tracer]\nbogus = 1\n", "tracer.bogus", "unknown key"),
    ("[signals]\npgroup = true\nPGROUP = true\n", "signals.PGROUP", "unknown key"),
    (
        '[tracer]\nargv_max_bytes = "x"\n',
        "tracer.argv_max_bytes",
        "expected an integer, got str 'x'",
    ),
    (
        "[tracer]\nargv_max_bytes = true\n",
        "tracer.argv_max_bytes",
        "expected an integer, got bool True",
    ),
    (
        "[tracer]\nargv_max_bytes = 4096.0\n",
        "tracer.argv_max_bytes",
        "expected an integer, got float 4096.0",
    ),
    (
        "[tracer]\nargv_max_bytes = [1]\n",
        "tracer.argv_max_bytes",
        "expected an integer, got list [1]",
    ),
    ('[output]\nbatch_max_age = "1"\n', "output.batch_max_age", "expected a number, got str '1'"),
    (
        "[output]\nbatch_max_age = true\n",
        "output.batch_max_age",
        "expected a number, got bool True",
    ),
    ("[tracer]\ntrace_connect = 1\n", "tracer.trace_connect", "expected a boolean, got int 1"),
    (
        '[tracer]\ntrace_connect = "yes"\n',
        "tracer.trace_connect",
        "expected a boolean, got str 'yes'",
    ),
    ("[output]\ndir = 5\n", "output.dir", "expected a string, got int 5"),
    ("[tracer]\nmode = 1\n", "tracer.mode", "expected a string, got int 1"),
    ("[tracer]\nargv_max_bytes = 5\n", "tracer.argv_max_bytes", "expected 64..131072, got 5"),
    (
        "[tracer]\nargv_max_bytes = 131073\n",
        "tracer.argv_max_bytes",
        "expected 64..131072, got 131073",
    ),
    ("[tracer]\nbuffer_bytes = 1\n", "tracer.buffer_bytes", "expected 65536..268435456, got 1"),
    ("[output]\nbatch_max_events = 0\n", "output.batch_max_events", "expected 1..100000, got 0"),
    (
        "[output]\nbatch_max_bytes = 1023\n",
        "output.batch_max_bytes",
        "expected 1024..1048576, got 1023",
    ),
    ("[output]\nbatch_max_age = 0.001\n", "output.batch_max_age", "expected 0.01..60, got 0.001"),
    ("[output]\nbatch_max_age = nan\n", "output.batch_max_age", "expected 0.01..60, got nan"),
    ("[output]\nbatch_max_age = inf\n", "output.batch_max_age", "expected 0.01..60, got inf"),
    ("[processes]\nancestors_max = -1\n", "processes.ancestors_max", "expected 0..64, got -1"),
    (
        "[processes]\nreconcile_interval = 0.01\n",
        "processes.reconcile_interval",
        "expected 0.05..3600",
    ),
    ("[shutdown]\ngrace = 0.05\n", "shutdown.grace", "expected 0 or 0.1..3600, got 0.05"),
    ("[shutdown]\ngrace = -1\n", "shutdown.grace", "expected 0 or 0.1..3600, got -1.0"),
    ("[shutdown]\nflush = 61\n", "shutdown.flush", "expected 0..60, got 61.0"),
    ("[worker]\nrestart_backoff_min = 0\n", "worker.restart_backoff_min", "expected 0.01..60"),
    ("[worker]\nrestart_backoff_max = 0.05\n", "worker.restart_backoff_max", "expected 0.1..3600"),
    ('[tracer]\nmode = "x"\n', "tracer.mode", "expected one of auto, ptrace, procfs, got 'x'"),
    ('[tracer]\nmode = "PTRACE"\n', "tracer.mode", "expected one of auto, ptrace, procfs"),
    ('[tracer]\nseccomp = "yes"\n', "tracer.seccomp", "expected one of auto, on, off, got 'yes'"),
    ('[tracer]\nno_new_privs = "always"\n', "tracer.no_new_privs", "expected one of auto, never"),
    ('[processes]\nscope = "host"\n', "processes.scope", "expected one of auto, namespace, tree"),
    (
        '[agent]\nlog_level = "trace"\n',
        "agent.log_level",
        "expected one of debug, info, warning, error",
    ),
    ("tracer = 3\n", "tracer", "expected a table, got int 3"),
    ('signals = "on"\n', "signals", "expected a table, got str 'on'"),
    ("[[worker]]\nrestart_backoff_min = 1\n", "worker", "expected a table, got list"),
    (
        "[worker]\nrestart_backoff_min = 5\nrestart_backoff_max = 2\n",
        "worker.restart_backoff_max",
        "must be >= worker.restart_backoff_min",
    ),
    ("[worker]\nrestart_backoff_min = 31\n", "worker.restart_backoff_max", "must be >="),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD_FILES)
def test_bad_file_raises_config_error_naming_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.key == key
    assert message in info.value.message
    assert isinstance(info.value, LwEmbedError)


@pytest.mark.parametrize(("text", "key", "message"), BAD_FILES)
def test_bad_dict_raises_same_error(tmp_path: Path, text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tomllib.loads(text))
    assert info.value.key == key
    assert message in info.value.message


def test_toml_syntax_error_names_path_and_tomllib_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[tracer\nmode = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == ""
    assert path in info.value.message
    assert "line 1" in info.value.message  # from tomllib's message
    assert str(info.value) == info.value.message


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[signals]\npgroup = true\npgroup = false\n")
    assert info.value.key == ""


def test_invalid_utf8_is_a_toml_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[agent]\ninstance_id = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert info.value.key == ""
    assert str(path) in info.value.message


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.key == ""
    assert path in info.value.message
    assert "No such file" in info.value.message


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), {})
    assert info.value.key == ""
    assert str(tmp_path) in info.value.message


def test_from_dict_rejects_non_mapping_top_level() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict([("tracer", {})])  # type: ignore[arg-type]
    assert info.value.key == ""


# --- environment overrides ---


def test_env_override_applies() -> None:
    cfg = load_config(None, {"LW_EMBED_TRACER_ARGV_MAX_BYTES": "8192"})
    assert cfg.tracer.argv_max_bytes == 8192
    assert cfg.tracer == dataclasses.replace(TracerConfig(), argv_max_bytes=8192)


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {
        "LW_EMBED_TRACER_ARGV_MAX_BYTES": "1024",
        "LW_EMBED_OUTPUT_DIR": "/env/out",
        "LW_EMBED_SIGNALS_PGROUP": "no",
        "LW_EMBED_WORKER_RESTART_BACKOFF_MAX": "2",
    }
    cfg = load_text(tmp_path, FULL_TOML, env)
    assert cfg.tracer.argv_max_bytes == 1024
    assert cfg.output.dir == "/env/out"
    assert cfg.signals.pgroup is False
    assert cfg.worker.restart_backoff_max == 2.0
    assert cfg.tracer.mode == "ptrace"  # untouched keys keep the file's value
    assert cfg.output.batch_max_events == 500


def test_env_adds_a_section_missing_from_the_file(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[tracer]\nmode = "procfs"\n', {"LW_EMBED_PROCESSES_SCOPE": "tree"})
    assert (cfg.tracer.mode, cfg.processes.scope) == ("procfs", "tree")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" on ", True),
        ("0", False), ("false", False), ("False", False), ("NO", False), ("off", False),
    ],
)  # fmt: skip
def test_env_bool_spellings(raw: str, expected: bool) -> None:
    assert load_config(None, {"LW_EMBED_SIGNALS_PGROUP": raw}).signals.pgroup is expected


@pytest.mark.parametrize(
    ("var", "raw", "section", "key", "expected"),
    [
        ("LW_EMBED_OUTPUT_BATCH_MAX_AGE", "0.25", "output", "batch_max_age", 0.25),
        ("LW_EMBED_OUTPUT_BATCH_MAX_AGE", "2", "output", "batch_max_age", 2.0),
        ("LW_EMBED_OUTPUT_BATCH_MAX_AGE", "5e-1", "output", "batch_max_age", 0.5),
        ("LW_EMBED_SHUTDOWN_GRACE", "0", "shutdown", "grace", 0.0),
        ("LW_EMBED_OUTPUT_BATCH_MAX_EVENTS", " 42 ", "output", "batch_max_events", 42),
        ("LW_EMBED_PROCESSES_ANCESTORS_MAX", "+3", "processes", "ancestors_max", 3),
        ("LW_EMBED_AGENT_INSTANCE_ID", " spaced id ", "agent", "instance_id", " spaced id "),
        ("LW_EMBED_AGENT_DATA_DIR", "/data", "agent", "data_dir", "/data"),
        ("LW_EMBED_AGENT_LOG_LEVEL", "info", "agent", "log_level", "info"),
    ],
)
def test_env_values_parsed_per_type(
    var: str, raw: str, section: str, key: str, expected: object
) -> None:
    value = getattr(getattr(load_config(None, {var: raw}), section), key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("var", "raw", "key", "message"),
    [
        ("LW_EMBED_TRACER_ARGV_MAX_BYTES", "abc", "tracer.argv_max_bytes",
         "LW_EMBED_TRACER_ARGV_MAX_BYTES: expected an integer, got 'abc'"),
        ("LW_EMBED_TRACER_ARGV_MAX_BYTES", "4096.0", "tracer.argv_max_bytes",
         "LW_EMBED_TRACER_ARGV_MAX_BYTES: expected an integer, got '4096.0'"),
        ("LW_EMBED_TRACER_ARGV_MAX_BYTES", "0x100", "tracer.argv_max_bytes",
         "LW_EMBED_TRACER_ARGV_MAX_BYTES: expected an integer"),
        ("LW_EMBED_TRACER_ARGV_MAX_BYTES", "", "tracer.argv_max_bytes",
         "LW_EMBED_TRACER_ARGV_MAX_BYTES: expected an integer, got ''"),
        ("LW_EMBED_TRACER_ARGV_MAX_BYTES", "5", "tracer.argv_max_bytes",
         "LW_EMBED_TRACER_ARGV_MAX_BYTES: expected 64..131072, got 5"),
        ("LW_EMBED_OUTPUT_BATCH_MAX_AGE", "soon", "output.batch_max_age",
         "LW_EMBED_OUTPUT_BATCH_MAX_AGE: expected a number, got 'soon'"),
        ("LW_EMBED_OUTPUT_BATCH_MAX_AGE", "nan", "output.batch_max_age",
         "LW_EMBED_OUTPUT_BATCH_MAX_AGE: expected a number"),
        ("LW_EMBED_SHUTDOWN_GRACE", "0.05", "shutdown.grace",
         "LW_EMBED_SHUTDOWN_GRACE: expected 0 or 0.1..3600, got 0.05"),
        ("LW_EMBED_SIGNALS_PGROUP", "maybe", "signals.pgroup",
         "LW_EMBED_SIGNALS_PGROUP: expected a boolean, got 'maybe'"),
        ("LW_EMBED_TRACER_MODE", "x", "tracer.mode",
         "LW_EMBED_TRACER_MODE: expected one of auto, ptrace, procfs, got 'x'"),
        ("LW_EMBED_BOGUS_KEY", "1", "bogus", "LW_EMBED_BOGUS_KEY: unknown section"),
        ("LW_EMBED_TRACER_BOGUS", "1", "tracer.bogus", "LW_EMBED_TRACER_BOGUS: unknown key"),
        ("LW_EMBED_TRACER", "1", "tracer", "LW_EMBED_TRACER: unknown key"),
        ("LW_EMBED_TOKENS", "1", "tokens", "LW_EMBED_TOKENS: unknown section"),
    ],
)  # fmt: skip
def test_bad_env_names_variable_and_key(var: str, raw: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: raw})
    assert info.value.key == key
    assert info.value.message.startswith(message)


def test_bad_env_is_reported_even_with_a_good_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, FULL_TOML, {"LW_EMBED_TRACER_SECCOMP": "maybe"})
    assert info.value.key == "tracer.seccomp"
    assert "LW_EMBED_TRACER_SECCOMP" in info.value.message


def test_env_backoff_relation_checked_with_file(tmp_path: Path) -> None:
    text = "[worker]\nrestart_backoff_min = 10\n"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, {"LW_EMBED_WORKER_RESTART_BACKOFF_MAX": "5"})
    assert info.value.key == "worker.restart_backoff_max"


def test_env_on_non_table_section_reports_the_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "tracer = 1\n", {"LW_EMBED_TRACER_MODE": "auto"})
    assert info.value.key == "tracer"


def test_reserved_and_foreign_env_names_are_ignored() -> None:
    assert {"LW_EMBED_TOKEN", "LW_EMBED_CONFIG", "LW_EMBED_BACKEND", "LW_EMBED_DATA_DIR"} <= (
        RESERVED_ENV
    )
    env = {name: "whatever" for name in RESERVED_ENV}
    env |= {
        "_LW_EMBED_STATE_FD": "3",
        "_LW_EMBED_TRACER_MODE": "x",
        "lw_embed_tracer_mode": "x",
        "LW_EMBEDX_TRACER_MODE": "x",
        "HOME": "/root",
        "PATH": "/bin",
    }
    assert load_config(None, env) == Config()


def test_env_does_not_read_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LW_EMBED_TRACER_MODE", "garbage")
    assert load_config(None, {}) == Config()


# --- with_overrides ---


def test_with_overrides_applies_and_keeps_the_rest() -> None:
    base = config_from_dict(FULL_DICT)
    cfg = with_overrides(base, {"output.dir": "/x", "signals.pgroup": False, "shutdown.grace": 3})
    assert cfg.output.dir == "/x"
    assert cfg.signals.pgroup is False
    assert cfg.shutdown.grace == 3.0 and isinstance(cfg.shutdown.grace, float)
    assert cfg.tracer == base.tracer
    assert base.output.dir == "/srv/out"  # the input is not changed
    assert with_overrides(base, {}) == base


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"output.dir": 1}, "output.dir", "expected a string, got int 1"),
        ({"signals.pgroup": "yes"}, "signals.pgroup", "expected a boolean, got str 'yes'"),
        ({"tracer.argv_max_bytes": True}, "tracer.argv_max_bytes", "expected an integer"),
        ({"tracer.argv_max_bytes": 1}, "tracer.argv_max_bytes", "expected 64..131072, got 1"),
        ({"tracer.mode": "x"}, "tracer.mode", "expected one of auto, ptrace, procfs"),
        ({"tracer.bogus": 1}, "tracer.bogus", "unknown key"),
        ({"bogus.key": 1}, "bogus", "unknown section"),
        ({"tracer": 1}, "tracer", "unknown key"),
        ({"worker.restart_backoff_max": 0.2}, "worker.restart_backoff_max", "must be >="),
    ],
)
def test_with_overrides_validates(overrides: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), overrides)
    assert info.value.key == key
    assert message in info.value.message


# --- immutability ---


@pytest.mark.parametrize(
    "obj",
    [
        Config(), AgentConfig(), OutputConfig(), TracerConfig(), ProcessesConfig(),
        SignalsConfig(), ShutdownConfig(), WorkerConfig(), FilterConfig(), AggregateConfig(),
        FilterRule(name="r", action="tag", exe=("/bin/*",)),
    ],
)  # fmt: skip
def test_dataclasses_are_frozen_and_slotted(obj: Any) -> None:
    name = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, getattr(obj, name))
    assert not hasattr(obj, "__dict__")
    hash(obj)


def test_worker_relation_holds_on_direct_construction() -> None:
    with pytest.raises(ConfigError) as info:
        WorkerConfig(restart_backoff_min=2.0, restart_backoff_max=1.0)
    assert info.value.key == "worker.restart_backoff_max"


# --- directories ---


def test_default_data_dir() -> None:
    env = {"HOME": "/home/u", "XDG_STATE_HOME": "/xdg"}
    assert default_data_dir(0, env) == "/var/lib/lw-embed"
    assert default_data_dir(1000, env) == "/xdg/lw-embed"
    assert default_data_dir(1000, {"HOME": "/home/u"}) == "/home/u/.local/state/lw-embed"
    assert default_data_dir(1000, {"HOME": "/home/u", "XDG_STATE_HOME": ""}) == (
        "/home/u/.local/state/lw-embed"
    )
    # a relative XDG_STATE_HOME is invalid per the XDG spec and ignored
    assert default_data_dir(1000, {"HOME": "/h", "XDG_STATE_HOME": "rel"}) == (
        "/h/.local/state/lw-embed"
    )


def test_default_data_dir_without_home() -> None:
    with pytest.raises(ConfigError) as info:
        default_data_dir(1000, {})
    assert info.value.key == "agent.data_dir"
    assert default_data_dir(0, {}) == "/var/lib/lw-embed"


def test_resolved_dirs() -> None:
    env = {"HOME": "/home/u"}
    cfg = Config()
    assert resolved_data_dir(cfg, 0, env) == "/var/lib/lw-embed"
    assert resolved_output_dir(cfg, 0, env) == "/var/lib/lw-embed/batches"
    assert resolved_output_dir(cfg, 1000, env) == "/home/u/.local/state/lw-embed/batches"
    cfg = with_overrides(cfg, {"agent.data_dir": "/d"})
    assert resolved_data_dir(cfg, 1000, {}) == "/d"
    assert resolved_output_dir(cfg, 1000, {}) == "/d/batches"
    cfg = with_overrides(cfg, {"output.dir": "/o"})
    assert resolved_output_dir(cfg, 1000, {}) == "/o"


# --- the machinery: list[str] support, via a private root dataclass ---


@dataclass(frozen=True, slots=True)
class _ListSection:
    names: tuple[str, ...] = ()
    tags: list[str] = field(default_factory=list)
    count: int = field(default=1, metadata={"range": (1, 3)})


@dataclass(frozen=True, slots=True)
class _ListRoot:
    lists: _ListSection = field(default_factory=_ListSection)


def test_list_of_strings_from_dict_and_back() -> None:
    obj = config_mod._from_dict(_ListRoot, {"lists": {"names": ["a", "b"], "tags": ["x"]}})
    assert obj.lists.names == ("a", "b")
    assert obj.lists.tags == ["x"]
    data = config_mod._to_dict(obj)
    assert data == {"lists": {"names": ["a", "b"], "tags": ["x"], "count": 1}}
    assert config_mod._from_dict(_ListRoot, data) == obj
    assert config_mod._from_dict(_ListRoot, {}) == _ListRoot()


@pytest.mark.parametrize("value", ["a,b", ["a", 1], [["a"]], 3, None])
def test_list_of_strings_rejects_other_types(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod._from_dict(_ListRoot, {"lists": {"names": value}})
    assert info.value.key == "lists.names"
    assert "expected a list of strings" in info.value.message


def test_list_of_strings_from_file_and_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[lists]\nnames = ["from-file"]\ntags = ["t"]\n')
    obj = config_mod._load(_ListRoot, path, {"LW_EMBED_LISTS_NAMES": " a, b,,c ,"})
    assert obj.lists.names == ("a", "b", "c")
    assert obj.lists.tags == ["t"]
    obj = config_mod._load(_ListRoot, None, {"LW_EMBED_LISTS_TAGS": ""})
    assert obj.lists.tags == []


def test_private_root_env_errors_use_its_schema() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod._load(_ListRoot, None, {"LW_EMBED_TRACER_MODE": "auto"})
    assert info.value.key == "tracer"
    with pytest.raises(ConfigError) as info:
        config_mod._load(_ListRoot, None, {"LW_EMBED_LISTS_COUNT": "4"})
    assert info.value.key == "lists.count"
    assert info.value.message == "LW_EMBED_LISTS_COUNT: expected 1..3, got 4"


def test_every_config_key_is_reachable_by_env() -> None:
    """Each key of Config can be set through its LW_EMBED_ variable (the table is complete)."""
    for section, keys in config_to_dict(Config()).items():
        for key, default in keys.items():
            if (section, key) in NOT_FROM_ENV:
                continue  # tables and arrays of tables: see test_nested_keys_not_from_env
            var = f"LW_EMBED_{section}_{key}".upper()
            raw = str(default).lower() if isinstance(default, bool) else str(default)
            cfg = load_config(None, {var: raw})  # a list as str(): a TOML array
            assert config_to_dict(cfg)[section][key] == default, var  # tuples as lists


@pytest.mark.parametrize(("raw", "value"), [
    ("eth0, lo", ("eth0", "lo")), ("", ()), ("[]", ()), ('["eth0", "lo"]', ("eth0", "lo")),
    ("['eth0']", ("eth0",)), ("[eth*]", ("[eth*]",)),  # not TOML: a one-item comma list
])  # fmt: skip
def test_env_lists_are_comma_lists_or_toml_arrays(raw: str, value: tuple[str, ...]) -> None:
    assert load_config(None, {"LW_EMBED_NETWORK_INTERFACES": raw}).network.interfaces == value
    with pytest.raises(ConfigError) as info:
        load_config(None, {"LW_EMBED_NETWORK_INTERFACES": "[1, 2]"})
    assert info.value.key == "network.interfaces"


# --- [filter] and [aggregate]: arrays of tables and tables of lists ---

NOT_FROM_ENV = {("filter", "rules"), ("aggregate", "keys"), ("files", "rules")}

RULE = '[[filter.rules]]\nname = "r"\naction = "tag"\nexe = ["/bin/*"]\n'


def rules_toml(*bodies: str) -> str:
    return "".join(f"[[filter.rules]]\n{body}\n" for body in bodies)


def test_filter_and_aggregate_defaults() -> None:
    cfg = Config()
    assert cfg.filter == FilterConfig(default="include", rules=())
    assert cfg.aggregate.window == 10.0
    assert cfg.aggregate.max_groups == 10000
    assert dict(cfg.aggregate.keys) == {
        "process.exec": ("exe", "argv", "parent_exe"),
        "process.exit": ("exe", "exit_code", "signal"),
        "net.connect": ("exe", "family", "address", "port"),
    }
    assert cfg.aggregate.keys == DEFAULT_AGGREGATE_KEYS
    assert config_to_dict(cfg)["filter"] == {"default": "include", "rules": []}
    assert config_to_dict(cfg)["aggregate"]["keys"]["process.exit"] == [
        "exe", "exit_code", "signal",
    ]  # fmt: skip


def test_filter_rules_load_as_frozen_rules(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, FULL_TOML)
    first, second = cfg.filter.rules
    assert first == FilterRule(
        name="ignore-healthcheck", action="exclude", kinds=("process.exec", "net.*"),
        process_name=("curl", "wget*"), exe=("/usr/bin/*",), ancestor_exe=("*/cron",),
        ancestor_name=("sshd",), cmdline="--health(check)?", user=("root", "1000"),
        container=("abc123*",), alert=True,
    )  # fmt: skip
    assert second == FilterRule(name="shells", action="tag", process_name=("sh", "bash"))
    assert second.exe is None and second.cmdline is None and second.alert is False
    assert cfg.filter.default == "exclude"
    hash(cfg)  # the whole config stays hashable


def test_optional_conditions_are_absent_from_the_dict_not_null() -> None:
    cfg = config_from_dict(tomllib.loads(RULE))
    assert config_to_dict(cfg)["filter"]["rules"] == [
        {"name": "r", "action": "tag", "exe": ["/bin/*"], "alert": False}
    ]
    # an explicit null (JSON) is the same as absent
    data = {"filter": {"rules": [{"name": "r", "action": "tag", "exe": ["x"], "user": None}]}}
    assert config_from_dict(data).filter.rules[0].user is None


def test_aggregate_keys_replace_the_whole_map(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[aggregate.keys]\n"net.connect" = ["address"]\n')
    assert dict(cfg.aggregate.keys) == {"net.connect": ("address",)}
    assert cfg.aggregate.window == 10.0
    empty = load_text(tmp_path, "[aggregate.keys]\n")
    assert dict(empty.aggregate.keys) == {}
    assert config_from_dict(config_to_dict(empty)) == empty


def test_aggregate_keys_is_read_only_and_hashable() -> None:
    keys = Config().aggregate.keys
    assert isinstance(keys, FrozenMap)
    with pytest.raises(TypeError):
        keys["x"] = ()  # type: ignore[index]
    assert keys == dict(keys)
    assert hash(keys) == hash(FrozenMap(dict(keys)))
    assert hash(AggregateConfig()) == hash(AggregateConfig())


BAD_NESTED = [
    (RULE + RULE.replace('"r"', '"s"') + '[[filter.rules]]\nname = "t"\nacton = "tag"\n',
     "filter.rules[2].acton", "unknown key"),
    (rules_toml('name = "r"\naction = "drop"\nexe = ["x"]'), "filter.rules[0].action",
     "expected one of include, exclude, tag, got 'drop'"),
    (rules_toml('name = ""\naction = "tag"\nexe = ["x"]'), "filter.rules[0].name",
     "must not be empty"),
    (rules_toml('name = 1\naction = "tag"\nexe = ["x"]'), "filter.rules[0].name",
     "expected a string, got int 1"),
    (rules_toml('action = "tag"\nexe = ["x"]'), "filter.rules[0].name", "missing required key"),
    (rules_toml('name = "r"\nexe = ["x"]'), "filter.rules[0].action", "missing required key"),
    (RULE + RULE.replace('"/bin/*"', '"/usr/*"'), "filter.rules[1].name",
     "duplicate rule name 'r' (also filter.rules[0])"),
    (rules_toml('name = "r"\naction = "tag"'), "filter.rules[0]",
     "a rule needs at least one condition"),
    (rules_toml('name = "r"\naction = "tag"\nalert = true'), "filter.rules[0]",
     "a rule needs at least one condition"),
    (RULE + rules_toml('name = "s"\naction = "tag"\ncmdline = "--x("'), "filter.rules[1].cmdline",
     "invalid regular expression '--x('"),
    (rules_toml('name = "r"\naction = "tag"\nuser = ["root", "no-such-user-xyz"]'),
     "filter.rules[0].user", "unknown user 'no-such-user-xyz'"),
    (rules_toml('name = "r"\naction = "tag"\nuser = [0]'), "filter.rules[0].user",
     "expected a list of strings, got list [0]"),
    (rules_toml('name = "r"\naction = "tag"\nkinds = "process.exec"'), "filter.rules[0].kinds",
     "expected a list of strings, got str 'process.exec'"),
    (rules_toml('name = "r"\naction = "tag"\nkinds = ["net*"]'), "filter.rules[0].kinds",
     "expected exact kinds or 'prefix.*', got 'net*'"),
    (rules_toml('name = "r"\naction = "tag"\nexe = []'), "filter.rules[0].exe",
     "must not be empty"),
    (rules_toml('name = "r"\naction = "tag"\ncmdline = ""'), "filter.rules[0].cmdline",
     "must not be empty"),
    (rules_toml('name = "r"\naction = "tag"\nexe = ["x"]\nalert = "yes"'), "filter.rules[0].alert",
     "expected a boolean, got str 'yes'"),
    ("[filter]\nrules = 3\n", "filter.rules", "expected an array of tables, got int 3"),
    ("[filter]\nrules = [1]\n", "filter.rules[0]", "expected a table, got int 1"),
    ('[filter]\ndefault = "tag"\n', "filter.default", "expected one of include, exclude"),
    ("[filter]\nbogus = 1\n", "filter.bogus", "unknown key"),
    ("[aggregate]\nwindow = 0.05\n", "aggregate.window", "expected 0.1..3600, got 0.05"),
    ("[aggregate]\nmax_groups = 0\n", "aggregate.max_groups", "expected 1..1000000, got 0"),
    ("[aggregate]\nkeys = 1\n", "aggregate.keys",
     "expected a table of lists of strings, got int 1"),
    ('[aggregate.keys]\n"process.exec" = "exe"\n', 'aggregate.keys."process.exec"',
     "expected a list of strings, got str 'exe'"),
    ("[aggregate.keys]\nexec = [1]\n", "aggregate.keys.exec", "expected a list of strings"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "message"), BAD_NESTED)
def test_bad_nested_input_names_the_dotted_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert info.value.key == key
    assert message in info.value.message
    with pytest.raises(ConfigError) as info:
        config_from_dict(tomllib.loads(text))
    assert info.value.key == key
    assert message in info.value.message


@pytest.mark.parametrize(("var", "key"), [
    ("LW_EMBED_FILTER_RULES", "filter.rules"),
    ("LW_EMBED_AGGREGATE_KEYS", "aggregate.keys"),
])  # fmt: skip
def test_nested_keys_not_from_env(var: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {var: "[]"})
    assert info.value.key == key
    assert info.value.message.startswith(f"{var}: not settable from the environment")


def test_scalar_filter_and_aggregate_keys_from_env(tmp_path: Path) -> None:
    env = {
        "LW_EMBED_FILTER_DEFAULT": "exclude",
        "LW_EMBED_AGGREGATE_WINDOW": "0.5",
        "LW_EMBED_AGGREGATE_MAX_GROUPS": "7",
    }
    cfg = load_text(tmp_path, RULE, env)
    assert (cfg.filter.default, cfg.aggregate.window, cfg.aggregate.max_groups) == (
        "exclude", 0.5, 7,
    )  # fmt: skip
    assert cfg.filter.rules[0].name == "r"  # the file's rules stay


def test_with_overrides_sets_nested_values() -> None:
    cfg = with_overrides(Config(), {
        "filter.rules": [{"name": "a", "action": "exclude", "kinds": ["net.*"]}],
        "aggregate.keys": {"process.exec": ["exe"]},
    })  # fmt: skip
    assert cfg.filter.rules == (FilterRule(name="a", action="exclude", kinds=("net.*",)),)
    assert dict(cfg.aggregate.keys) == {"process.exec": ("exe",)}
    with pytest.raises(ConfigError) as info:
        with_overrides(Config(), {"filter.rules": [{"name": "a", "action": "tag"}]})
    assert info.value.key == "filter.rules[0]"


def test_rule_without_condition_fails_on_direct_construction() -> None:
    with pytest.raises(ConfigError) as info:
        FilterRule(name="r", action="tag")
    assert info.value.key == ""  # relative to the rule; the loader prefixes filter.rules[N]
    with pytest.raises(ConfigError) as info:
        FilterConfig(rules=(FilterRule("a", "tag", exe=("x",)),) * 2)
    assert info.value.key == "filter.rules[1].name"


def test_resolve_uid() -> None:
    assert resolve_uid("0") == 0
    assert resolve_uid("1000") == 1000
    assert resolve_uid("root") == 0
    assert resolve_uid("no-such-user-xyz") is None
    assert resolve_uid("bad\x00name") is None


# --- the machinery: nested tables, via a private root dataclass ---


@dataclass(frozen=True, slots=True)
class _Leaf:
    x: int = field(metadata={"range": (0, 9)})
    tag: str | None = None

    def __post_init__(self) -> None:
        if self.tag == "bad":
            raise ConfigError("tag", "must not be 'bad'")


@dataclass(frozen=True, slots=True)
class _Item:
    name: str
    leaves: tuple[_Leaf, ...] = ()
    opt: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class _NestSection:
    items: tuple[_Item, ...] = ()
    plain_map: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _NestRoot:
    nest: _NestSection = field(default_factory=_NestSection)


def test_nested_tables_round_trip() -> None:
    data = {"nest": {
        "items": [{"name": "a", "leaves": [{"x": 1}, {"x": 2, "tag": "t"}]}, {"name": "b"}],
        "plain_map": {"k": ["v", "w"]},
    }}  # fmt: skip
    obj = config_mod._from_dict(_NestRoot, data)
    assert obj.nest.items == (
        _Item("a", (_Leaf(1), _Leaf(2, "t"))),
        _Item("b"),
    )
    assert obj.nest.plain_map == {"k": ("v", "w")}
    assert type(obj.nest.plain_map) is dict  # a dict-typed field stays a dict
    dumped = config_mod._to_dict(obj)
    assert dumped == {"nest": {
        "items": [{"name": "a", "leaves": [{"x": 1}, {"x": 2, "tag": "t"}]},
                  {"name": "b", "leaves": []}],
        "plain_map": {"k": ["v", "w"]},
    }}  # fmt: skip
    assert config_mod._from_dict(_NestRoot, json.loads(json.dumps(dumped))) == obj


@pytest.mark.parametrize(
    ("items", "key", "message"),
    [
        ([{"name": "a"}, {"name": "b", "leaves": [{"x": 1}, {"x": 10}]}],
         "nest.items[1].leaves[1].x", "expected 0..9, got 10"),
        ([{"name": "a", "leaves": [{"y": 1}]}], "nest.items[0].leaves[0].y", "unknown key"),
        ([{"name": "a", "leaves": [{}]}], "nest.items[0].leaves[0].x", "missing required key"),
        ([{"name": "a", "leaves": [{"x": 1, "tag": "bad"}]}], "nest.items[0].leaves[0].tag",
         "must not be 'bad'"),
        ([{"name": "a", "leaves": {"x": 1}}], "nest.items[0].leaves",
         "expected an array of tables"),
        ([{"name": "a", "opt": "s"}], "nest.items[0].opt", "expected a list of strings"),
        ("a", "nest.items", "expected an array of tables, got str 'a'"),
    ],
)  # fmt: skip
def test_nested_errors_name_the_full_path(items: object, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod._from_dict(_NestRoot, {"nest": {"items": items}})
    assert info.value.key == key
    assert message in info.value.message
