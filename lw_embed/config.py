"""Agent configuration: a TOML file plus ``LW_EMBED_<SECTION>_<KEY>`` environment overrides.

Interface: no kernel interface. The file is read once with the stdlib :mod:`tomllib`; the
environment is a plain mapping handed in by the caller (so tests pass a dict). Overrides
win over the file, and both are validated by the same table-driven code: the sections,
keys, types and defaults are the fields of the frozen dataclasses below, and each field's
constraint (``choices`` or a ``range``) sits in its ``field(metadata=...)``. Adding a key
is one line.

Capability: none. Cost: negligible (read once at start).

Failure modes: every bad input raises :class:`~lw_embed.errors.ConfigError` naming the
dotted key (``tracer.argv_max_bytes``), or the section for an unknown or non-table section,
or ``""`` when the file is unreadable or not valid TOML (the message then names the path
and tomllib's message). A bad environment override also names the variable. Variables in
:data:`RESERVED_ENV` belong to other parts of the program and are ignored here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from lw_embed.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "RESERVED_ENV",
    "AgentConfig",
    "BackendConfig",
    "Config",
    "OutputConfig",
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
    "resolved_data_dir",
    "resolved_output_dir",
    "resolved_spool_dir",
    "with_overrides",
]  # fmt: skip

ENV_PREFIX = "LW_EMBED_"
#: ``LW_EMBED_*`` variables that are not config overrides (read elsewhere; ignored here).
RESERVED_ENV = frozenset(
    {"LW_EMBED_TOKEN", "LW_EMBED_CONFIG", "LW_EMBED_BACKEND", "LW_EMBED_DATA_DIR"}
)


def _one_of(*choices: str) -> dict[str, Any]:
    return {"choices": choices}


def _range(lo: float, hi: float, *also: float) -> dict[str, Any]:
    """Allow ``lo..hi`` inclusive, plus the exact values in ``also`` (e.g. 0 = "auto")."""
    return {"range": (lo, hi), "also": also}


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
    flush: float = field(default=1.0, metadata=_range(0, 60))


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


# --- the table-driven machinery (generic over the root dataclass, so tests can use others) ---

_DESCRIPTION = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
    "list": "a list of strings",
}
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True, slots=True)
class _Key:
    dotted: str
    kind: str  # a key of _DESCRIPTION
    container: type[Any] | None  # list or tuple, for kind "list"
    choices: tuple[str, ...] | None
    bounds: tuple[float, float] | None
    also: tuple[float, ...]


def _kind(tp: Any) -> tuple[str, type[Any] | None]:
    if tp in (bool, int, float, str):
        return tp.__name__, None
    origin, args = get_origin(tp), get_args(tp)
    if (origin is list and args == (str,)) or (origin is tuple and args == (str, ...)):
        return "list", origin
    raise TypeError(f"unsupported config field type {tp!r}")


def _keys(section: str, cls: type[Any]) -> dict[str, _Key]:
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        kind, container = _kind(hints[f.name])
        meta = f.metadata
        out[f.name] = _Key(
            f"{section}.{f.name}", kind, container,
            meta.get("choices"), meta.get("range"), meta.get("also", ()),
        )  # fmt: skip
    return out


_Schema = dict[str, tuple[type[Any], dict[str, _Key]]]
_SCHEMAS: dict[type[Any], _Schema] = {}


def _schema(root: type[Any]) -> _Schema:
    """``{section: (dataclass, {key: _Key})}`` of a root dataclass, built once."""
    if root not in _SCHEMAS:
        hints = get_type_hints(root)
        _SCHEMAS[root] = {
            f.name: (hints[f.name], _keys(f.name, hints[f.name])) for f in fields(root)
        }
    return _SCHEMAS[root]


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _coerce(key: _Key, value: Any, where: str = "") -> Any:
    """Check ``value`` (already typed: TOML, dict or parsed env) against ``key``."""
    kind = key.kind
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
    if not ok:
        raise ConfigError(key.dotted, f"{where}expected {_DESCRIPTION[kind]}, got {_show(value)}")
    if kind == "float":
        value = float(value)
    elif key.container is not None:
        value = key.container(value)
    if key.choices is not None and value not in key.choices:
        expected = ", ".join(key.choices)
        raise ConfigError(key.dotted, f"{where}expected one of {expected}, got {value!r}")
    if key.bounds is not None and value not in key.also:
        lo, hi = key.bounds
        if not lo <= value <= hi:  # also rejects nan
            extra = "".join(f"{a} or " for a in key.also)
            raise ConfigError(key.dotted, f"{where}expected {extra}{lo}..{hi}, got {value!r}")
    return value


def _parse_env(key: _Key, raw: str, var: str) -> Any:
    """Turn an environment string into a value of ``key``'s type (not yet range-checked)."""
    text = raw.strip()
    kind = key.kind
    if kind == "str":
        return raw
    if kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    if kind == "int" and _INT_RE.fullmatch(text):
        return int(text)
    if kind == "float" and _FLOAT_RE.fullmatch(text):
        return float(text)
    if kind == "bool" and text.lower() in _BOOLS:
        return _BOOLS[text.lower()]
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    raise ConfigError(key.dotted, f"{var}: expected {_DESCRIPTION[kind]}, got {shown!r}")


def _lookup(root: type[Any], section: str, key: str, where: str = "") -> _Key:
    schema = _schema(root)
    if section not in schema:
        raise ConfigError(section, f"{where}unknown section")
    spec = schema[section][1].get(key)
    if spec is None:
        raise ConfigError(f"{section}.{key}" if key else section, f"{where}unknown key")
    return spec


def _from_dict(root: type[Any], data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError("", f"expected a table of sections, got {_show(data)}")
    schema = _schema(root)
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if not isinstance(name, str) or name not in schema:
            raise ConfigError(str(name), "unknown section")
        if not isinstance(table, Mapping):
            raise ConfigError(name, f"expected a table, got {_show(table)}")
        cls = schema[name][0]
        values = {str(k): _coerce(_lookup(root, name, str(k)), v) for k, v in table.items()}
        sections[name] = cls(**values)
    return root(**sections)


def _to_dict(obj: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in fields(obj):
        section = getattr(obj, s.name)
        values = {f.name: getattr(section, f.name) for f in fields(section)}
        out[s.name] = {k: list(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
    return out


def _env_overrides(root: type[Any], env: Mapping[str, str]) -> list[tuple[str, str, Any]]:
    out = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        spec = _lookup(root, section, key, f"{var}: ")
        value = _coerce(spec, _parse_env(spec, env[var], var), f"{var}: ")
        out.append((section, key, value))
    return out


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"invalid TOML in config file {path}: {exc}") from exc


def _load(root: type[Any], path: str | None, env: Mapping[str, str]) -> Any:
    data: dict[str, Any] = {} if path is None else _read_toml(path)
    merged = {s: dict(t) if isinstance(t, Mapping) else t for s, t in data.items()}
    for section, key, value in _env_overrides(root, env):
        table = merged.setdefault(section, {})
        if isinstance(table, dict):  # a non-table section is reported by _from_dict
            table[key] = value
    return _from_dict(root, merged)


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
