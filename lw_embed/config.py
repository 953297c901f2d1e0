"""Agent configuration: a TOML file plus ``LW_EMBED_<SECTION>_<KEY>`` environment overrides.

Interface: no kernel interface. The file is read once with the stdlib :mod:`tomllib`; the
environment is a plain mapping handed in by the caller (so tests pass a dict). Overrides
win over the file, and both are validated by the same table-driven code: the sections,
keys, types and defaults are the fields of the frozen dataclasses below, and each field's
constraint (``choices``, a ``range``, ``nonempty``, a ``check`` function) sits in its
``field(metadata=...)``. Adding a key is one line. Besides scalars and lists of strings a
field may be an array of tables (``tuple[SomeDataclass, ...]``, validated recursively:
``[[filter.rules]]``, errors name ``filter.rules[2].action``) or a table of string lists
(``Mapping[str, tuple[str, ...]]``: ``[aggregate.keys]``); those two cannot be set from the
environment (a ConfigError says so).

Capability: none (user names in filter rules are looked up in the passwd database).
Cost: negligible (read once at start, and at each reload of the rules).

Failure modes: every bad input raises :class:`~lw_embed.errors.ConfigError` naming the
dotted key (``tracer.argv_max_bytes``), or the section for an unknown or non-table section,
or ``""`` when the file is unreadable or not valid TOML (the message then names the path
and tomllib's message). A bad environment override also names the variable. Variables in
:data:`RESERVED_ENV` belong to other parts of the program and are ignored here.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lw_embed.configschema import (
    ENV_PREFIX,
    RESERVED_ENV,
    FrozenMap,
    _from_dict,
    _load,
    _lookup,
    _one_of,
    _range,
    _to_dict,
)
from lw_embed.errors import ConfigError

__all__ = [
    "DEFAULT_AGGREGATE_KEYS",
    "ENV_PREFIX",
    "FILTER_ACTIONS",
    "FILTER_CONDITIONS",
    "RESERVED_ENV",
    "AgentConfig",
    "AggregateConfig",
    "BackendConfig",
    "Config",
    "FileRule",
    "FilesConfig",
    "FilterConfig",
    "FilterRule",
    "FrozenMap",
    "InAppConfig",
    "OutputConfig",
    "PackagesConfig",
    "ProcessesConfig",
    "ShutdownConfig",
    "SignalsConfig",
    "SpoolConfig",
    "TracerConfig",
    "WorkerConfig",
    "config_from_dict",
    "config_to_dict",
    "default_data_dir",
    "load_config",
    "resolve_uid",
    "resolved_data_dir",
    "resolved_output_dir",
    "resolved_spool_dir",
    "with_overrides",
]  # fmt: skip

@dataclass(frozen=True, slots=True)
class AgentConfig:
    data_dir: str = ""  # "" = default_data_dir()
    instance_id: str = ""  # "" = generated at start by the caller
    log_level: str = field(default="warning", metadata=_one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: str = ""  # "" = <data_dir>/batches
    batch_max_events: int = field(default=1000, metadata=_range(1, 100000))
    batch_max_bytes: int = field(default=1048576, metadata=_range(1024, 1048576))
    batch_max_age: float = field(default=1.0, metadata=_range(0.01, 60))


@dataclass(frozen=True, slots=True)
class TracerConfig:
    mode: str = field(default="auto", metadata=_one_of("auto", "ptrace", "procfs"))
    seccomp: str = field(default="auto", metadata=_one_of("auto", "on", "off"))
    no_new_privs: str = field(default="auto", metadata=_one_of("auto", "never"))
    trace_connect: bool = True
    argv_max_bytes: int = field(default=4096, metadata=_range(64, 131072))
    argv_max_args: int = field(default=256, metadata=_range(1, 4096))
    buffer_bytes: int = field(default=4194304, metadata=_range(65536, 268435456))


@dataclass(frozen=True, slots=True)
class ProcessesConfig:
    scope: str = field(default="auto", metadata=_one_of("auto", "namespace", "tree"))
    reconcile_interval: float = field(default=2.0, metadata=_range(0.05, 3600))
    ancestors_max: int = field(default=8, metadata=_range(0, 64))


@dataclass(frozen=True, slots=True)
class SignalsConfig:
    pgroup: bool = False


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    grace: float = field(default=0.0, metadata=_range(0.1, 3600, 0))  # 0 = platform, else 10 s
    flush: float = field(default=2.0, metadata=_range(0, 60))


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    restart_backoff_min: float = field(default=0.5, metadata=_range(0.01, 60))
    restart_backoff_max: float = field(default=30.0, metadata=_range(0.1, 3600))

    def __post_init__(self) -> None:
        if self.restart_backoff_max < self.restart_backoff_min:
            raise ConfigError(
                "worker.restart_backoff_max",
                f"must be >= worker.restart_backoff_min ({self.restart_backoff_min!r}), "
                f"got {self.restart_backoff_max!r}",
            )


@dataclass(frozen=True, slots=True)
class BackendConfig:
    url: str = ""  # "" = no backend: batches go to output.dir as files
    token: str = ""  # prefer token_file or $LW_EMBED_TOKEN
    token_file: str = ""
    ca_file: str = ""  # extra CA bundle (PEM) for a private backend
    verify_tls: bool = True
    connect_timeout: float = field(default=3.0, metadata=_range(0.1, 120))
    request_timeout: float = field(default=15.0, metadata=_range(0.5, 600))
    backoff_initial: float = field(default=0.5, metadata=_range(0.01, 60))
    backoff_max: float = field(default=30.0, metadata=_range(0.1, 3600))
    compression_quality: int = field(default=5, metadata=_range(0, 11))


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: str = ""  # "" = <data_dir>/spool
    max_bytes: int = field(default=268435456, metadata=_range(1 << 20, 1 << 36))
    segment_bytes: int = field(default=4194304, metadata=_range(65536, 1 << 30))
    sync_interval: float = field(default=0.1, metadata=_range(0.001, 0.1))


_UID_RE = re.compile(r"[0-9]+")


def resolve_uid(user: str) -> int | None:
    """A numeric uid (``"1000"``) as is, a user name through the passwd database; None if
    the name is unknown."""
    if _UID_RE.fullmatch(user):
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):  # ValueError: an embedded NUL
        return None


def _check_users(users: tuple[str, ...]) -> str | None:
    unknown = [u for u in users if resolve_uid(u) is None]
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        return f"unknown user {names} (not in the passwd database; give a numeric uid instead)"
    return None


def _check_regex(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


def _check_kinds(kinds: tuple[str, ...]) -> str | None:
    bad = [k for k in kinds if not k or ("*" in k and not (k.endswith(".*") and "*" not in k[:-2]))]
    if bad:
        return f"expected exact kinds or 'prefix.*', got {', '.join(repr(k) for k in bad)}"
    return None


def _condition(check: Callable[[Any], str | None] | None = None) -> Any:
    """An optional rule condition: absent (None) or a non-empty value."""
    meta: dict[str, Any] = {"nonempty": True}
    if check is not None:
        meta["check"] = check
    return field(default=None, metadata=meta)


FILTER_ACTIONS = ("include", "exclude", "tag")
#: The condition keys of a filter rule (a rule needs at least one).
FILTER_CONDITIONS = (
    "kinds", "process_name", "exe", "ancestor_exe", "ancestor_name", "cmdline", "user",
    "container",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FilterRule:
    """One ``[[filter.rules]]`` entry: conditions (all must match) and what to do.

    Lists are globs (fnmatch) except ``kinds`` (exact, or ``prefix.*``) and ``user``
    (names or numeric uids); ``cmdline`` is a regular expression searched in the argv
    joined by spaces. Compiled by :class:`lw_embed.pipeline.filter.FilterProgram`.
    """

    name: str = field(metadata={"nonempty": True})
    action: str = field(metadata=_one_of(*FILTER_ACTIONS))
    kinds: tuple[str, ...] | None = _condition(_check_kinds)
    process_name: tuple[str, ...] | None = _condition()
    exe: tuple[str, ...] | None = _condition()
    ancestor_exe: tuple[str, ...] | None = _condition()
    ancestor_name: tuple[str, ...] | None = _condition()
    cmdline: str | None = _condition(_check_regex)
    user: tuple[str, ...] | None = _condition(_check_users)
    container: tuple[str, ...] | None = _condition()
    alert: bool = False

    def __post_init__(self) -> None:
        if all(getattr(self, name) is None for name in FILTER_CONDITIONS):
            raise ConfigError(
                "", f"a rule needs at least one condition ({', '.join(FILTER_CONDITIONS)})"
            )


@dataclass(frozen=True, slots=True)
class FilterConfig:
    default: str = field(default="include", metadata=_one_of("include", "exclude"))
    rules: tuple[FilterRule, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ConfigError(
                    f"filter.rules[{i}].name",
                    f"duplicate rule name {rule.name!r} (also filter.rules[{seen[rule.name]}])",
                )
            seen[rule.name] = i


#: ``aggregate.keys`` when the file does not set it: per kind, the fields that make a group.
DEFAULT_AGGREGATE_KEYS: FrozenMap[str, tuple[str, ...]] = FrozenMap(
    {
        "process.exec": ("exe", "argv", "parent_exe"),
        "process.exit": ("exe", "exit_code", "signal"),
        "net.connect": ("exe", "family", "address", "port"),
    }
)


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    window: float = field(default=10.0, metadata=_range(0.1, 3600))
    max_groups: int = field(default=10000, metadata=_range(1, 1000000))
    keys: Mapping[str, tuple[str, ...]] = DEFAULT_AGGREGATE_KEYS


@dataclass(frozen=True, slots=True)
class PackagesConfig:
    """The package inventory source (lw_embed.sources.packages, docs/packages.md)."""

    enabled: bool = True
    root: str = field(default="/", metadata={"nonempty": True})  # sidecar: /proc/<pid>/root
    snapshot_interval: float = field(default=43200.0, metadata=_range(60, 30 * 86400))
    check_interval: float = field(default=60.0, metadata=_range(1, 86400))
    usage_interval: float = field(default=10.0, metadata=_range(0.5, 3600))
    full_refresh: float = field(default=300.0, metadata=_range(5, 86400))
    scan_rate: int = field(default=5000, metadata=_range(100, 10000000))  # files+dirs per s
    search_depth: int = field(default=7, metadata=_range(1, 32))
    npm_depth: int = field(default=6, metadata=_range(1, 64))
    rediscover_every: int = field(default=10, metadata=_range(1, 100000))  # checks


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """``[network]``: packet capture, flows, attribution and DNS (docs/network.md)."""

    enabled: bool = True
    interfaces: tuple[str, ...] = ()  # () = every interface of the network namespace
    capture: str = field(default="auto", metadata=_one_of(
        "auto", "tpacket_v3", "tpacket_v2", "recv", "procfs"))  # fmt: skip
    # many small blocks: a block is retired after retire_ms even when nearly empty, so at a
    # low packet rate the ring holds block_count x retire_ms of traffic (64 x 20 ms) before
    # a busy or descheduled worker loses packets
    block_size: int = field(default=131072, metadata=_range(4096, 1 << 26))
    block_count: int = field(default=64, metadata=_range(2, 4096))
    frame_size: int = field(default=2048, metadata=_range(128, 65536))
    retire_ms: int = field(default=20, metadata=_range(1, 10000))
    snap_length: int = field(default=128, metadata=_range(96, 65535))
    blocks_per_poll: int = field(default=32, metadata=_range(1, 4096))
    max_flows: int = field(default=100000, metadata=_range(10, 10000000))
    tcp_timeout: float = field(default=300.0, metadata=_range(0.1, 86400))
    udp_timeout: float = field(default=60.0, metadata=_range(0.1, 86400))
    close_timeout: float = field(default=5.0, metadata=_range(0, 3600))
    active_timeout: float = field(default=60.0, metadata=_range(0.1, 86400))
    sweep_interval: float = field(default=1.0, metadata=_range(0.01, 60))
    procfs_interval: float = field(default=1.0, metadata=_range(0.01, 3600))
    fd_scan_interval: float = field(default=0.2, metadata=_range(0, 60))
    max_events_queued: int = field(default=20000, metadata=_range(10, 10000000))
    dns: bool = True
    dns_max_entries: int = field(default=10000, metadata=_range(1, 10000000))


@dataclass(frozen=True, slots=True)
class InAppConfig:
    """In-app mode (lw_embed.start(), docs/inapp.md)."""

    queue_max: int = field(default=10000, metadata=_range(16, 1000000))  # audit hook queue
    files: bool = True  # file.write/remove/rename from the audit hook
    sigterm: bool = False  # chain a SIGTERM handler that flushes (the app's still runs)


FILE_ACTIONS = ("create", "modify", "attrib", "delete", "rename", "read")
HASH_ALGORITHMS = ("sha256", "sha1", "sha512", "md5", "blake2b")


def _check_actions(actions: tuple[str, ...]) -> str | None:
    bad = [a for a in actions if a not in FILE_ACTIONS]
    if bad:
        names = ", ".join(repr(a) for a in bad)
        return f"unknown action {names} (one of {', '.join(FILE_ACTIONS)})"
    return None


def _check_abs(path: str) -> str | None:
    return None if os.path.isabs(path) else f"must be an absolute path, got {path!r}"


@dataclass(frozen=True, slots=True)
class FileRule:
    """One ``[[files.rules]]`` entry: a file or directory to monitor (docs/files.md)."""

    path: str = field(metadata={"nonempty": True, "check": _check_abs})
    name: str = ""  # "" = the path
    recursive: bool = True
    max_depth: int = field(default=0, metadata=_range(1, 64, 0))  # 0 = unlimited
    exclude: tuple[str, ...] = ()  # globs: with a "/" against the path, else the name
    actions: tuple[str, ...] = field(
        default=("create", "modify", "attrib", "delete", "rename"),
        metadata={"nonempty": True, "check": _check_actions},
    )
    hash: bool = True


#: ``files.rules`` when the file gives none: cheap, container-sized defaults
DEFAULT_FILE_RULES: tuple[FileRule, ...] = (
    FileRule("/bin", "bin"), FileRule("/sbin", "sbin"), FileRule("/usr/bin", "usr-bin"),
    FileRule("/usr/sbin", "usr-sbin"), FileRule("/usr/local/bin", "usr-local-bin"),
    FileRule("/lib", "lib", max_depth=2), FileRule("/usr/lib", "usr-lib", max_depth=2),
    FileRule("/etc", "etc", max_depth=4),
    FileRule("/root/.ssh", "root-ssh"), FileRule("/app", "app", max_depth=6,
             exclude=("node_modules", "__pycache__", ".git", "*.log", "tmp", "cache")),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FilesConfig:
    """``[files]``: file integrity monitoring with who-data (lw_embed.sources.files)."""

    enabled: bool = True
    default_rules: bool = True  # no [[files.rules]]: use DEFAULT_FILE_RULES
    rules: tuple[FileRule, ...] = ()
    trace: bool = True  # wrapper mode: trace the file syscalls for who-data
    hash_algorithm: str = field(default="sha256", metadata=_one_of(*HASH_ALGORITHMS))
    hash_max_bytes: int = field(default=67108864, metadata=_range(0, 1 << 40))
    secret_paths: tuple[str, ...] = (
        "/etc/shadow*", "/etc/gshadow*", "*/.ssh/id_*", "/etc/ssh/ssh_host_*_key", "*.key",
        "/etc/ssl/private/*", ".env", ".env.*",  # not *.pem: CA certificates are hashed
    )  # fmt: skip
    baseline: str = ""  # "" = <data_dir>/files/baseline.sqlite
    scan_files_per_s: int = field(default=2000, metadata=_range(10, 10000000))
    scan_bytes_per_s: int = field(default=33554432, metadata=_range(65536, 1 << 40))
    coalesce_quiet: float = field(default=0.5, metadata=_range(0.01, 60))
    coalesce_max: float = field(default=10.0, metadata=_range(0.05, 3600))
    rename_timeout: float = field(default=0.2, metadata=_range(0.001, 10))
    attribution_window: float = field(default=30.0, metadata=_range(0.01, 600))
    max_watches: int = field(default=0, metadata=_range(1, 10000000, 0))  # 0 = half the limit
    periodic_interval: float = field(default=300.0, metadata=_range(0.1, 86400))
    max_pending: int = field(default=100000, metadata=_range(10, 10000000))

    def effective_rules(self) -> tuple[FileRule, ...]:
        return self.rules or (DEFAULT_FILE_RULES if self.default_rules else ())


@dataclass(frozen=True, slots=True)
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracer: TracerConfig = field(default_factory=TracerConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    inapp: InAppConfig = field(default_factory=InAppConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    packages: PackagesConfig = field(default_factory=PackagesConfig)
    files: FilesConfig = field(default_factory=FilesConfig)

# --- public API ---


def load_config(path: str | None, env: Mapping[str, str]) -> Config:
    """Read the TOML file at ``path`` (if any), apply ``LW_EMBED_*`` overrides, validate."""
    cfg: Config = _load(Config, path, env)
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from nested ``{section: {key: value}}``, validated."""
    cfg: Config = _from_dict(Config, data)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The JSON-serialisable inverse of :func:`config_from_dict` (every key, lists for lists)."""
    return _to_dict(cfg)


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """Return ``cfg`` with dotted keys (``{"output.dir": "/x"}``) replaced, validated."""
    data = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        _lookup(Config, section, key)
        data[section][key] = value
    return config_from_dict(data)


def default_data_dir(uid: int, env: Mapping[str, str]) -> str:
    """``/var/lib/lw-embed`` for root, else ``$XDG_STATE_HOME/lw-embed`` or
    ``$HOME/.local/state/lw-embed``. Raises ConfigError when neither variable is usable."""
    if uid == 0:
        return "/var/lib/lw-embed"
    state = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(state):  # the XDG spec says relative paths are to be ignored
        return os.path.join(state, "lw-embed")
    home = env.get("HOME", "")
    if home:
        return os.path.join(home, ".local", "state", "lw-embed")
    raise ConfigError("agent.data_dir", "no default: neither XDG_STATE_HOME nor HOME is set")


def resolved_data_dir(cfg: Config, uid: int, env: Mapping[str, str]) -> str:
    """``agent.data_dir``, or :func:`default_data_dir` when it is empty."""
    return cfg.agent.data_dir or default_data_dir(uid, env)


def resolved_spool_dir(cfg: Config, uid: int, env: Mapping[str, str]) -> str:
    """``spool.dir``, or ``<data_dir>/spool`` when it is empty."""
    return cfg.spool.dir or os.path.join(resolved_data_dir(cfg, uid, env), "spool")


def resolved_output_dir(cfg: Config, uid: int, env: Mapping[str, str]) -> str:
    """``output.dir``, or ``<data_dir>/batches`` when it is empty."""
    return cfg.output.dir or os.path.join(resolved_data_dir(cfg, uid, env), "batches")
