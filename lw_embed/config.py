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
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

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
    "FilterConfig",
    "FilterRule",
    "FrozenMap",
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
    "resolve_uid",
    "resolved_data_dir",
    "resolved_output_dir",
    "resolved_spool_dir",
    "with_overrides",
]  # fmt: skip

ENV_PREFIX = "LW_EMBED_"
#: ``LW_EMBED_*`` variables that are not config overrides (read elsewhere; ignored here).
RESERVED_ENV = frozenset(
    {"LW_EMBED_TOKEN", "LW_EMBED_CONFIG", "LW_EMBED_BACKEND", "LW_EMBED_DATA_DIR",
     "LW_EMBED_PYTHON"}
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


K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping (so a frozen config holding a table stays hashable).

    Equal to any mapping with the same items; ``config_to_dict`` turns it into a dict.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


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


# --- the table-driven machinery (generic over the root dataclass, so tests can use others) ---
#
# A field's type picks how its value is read and checked:
#   bool, int, float, str                 a TOML scalar (an int is accepted for a float)
#   list[str], tuple[str, ...]            an array of strings ("a,b" from the environment)
#   tuple[SomeDataclass, ...]             an array of tables, each validated recursively
#                                         against SomeDataclass (``[[filter.rules]]``)
#   dict[str, tuple[str, ...]]            a table of arrays of strings (``[aggregate.keys]``);
#   Mapping[str, tuple[str, ...]]         the same, stored as a hashable, read-only FrozenMap
#   X | None                              X, or absent (None, the default): "not given"
# and its ``field(metadata=...)`` adds constraints: ``choices``, ``range``/``also``,
# ``nonempty`` (a str or list must not be empty) and ``check`` (a function returning an
# error message or None). A field without a default is a required key. Arrays of tables
# and tables of lists cannot be set from the environment.
#
# A dataclass used as an element of an array of tables reports its own cross-field errors
# (raised in ``__post_init__``) with a key relative to itself ("" for the element as a
# whole); the machinery prefixes the element's position, e.g. ``filter.rules[2]``. A
# section dataclass names the full dotted key itself (see WorkerConfig).

_DESCRIPTION = {
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "str": "a string",
    "list": "a list of strings",
    "tables": "an array of tables",
    "map": "a table of lists of strings",
}
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}
_NOT_FROM_ENV = frozenset({"tables", "map"})


@dataclass(frozen=True, slots=True)
class _Key:
    name: str
    kind: str  # a key of _DESCRIPTION
    container: type[Any] | None  # list/tuple for kind "list"; dict/FrozenMap for kind "map"
    element: type[Any] | None  # the dataclass of each table, for kind "tables"
    optional: bool  # None (absent) is allowed
    required: bool  # no default: the key must be given
    nonempty: bool
    choices: tuple[str, ...] | None
    bounds: tuple[float, float] | None
    also: tuple[float, ...]
    check: Callable[[Any], str | None] | None


_KindInfo = tuple[str, type[Any] | None, type[Any] | None, bool]


def _kind(tp: Any) -> _KindInfo:
    """``(kind, container, element, optional)`` of a field type."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind, container, inner, _ = _kind(rest[0])
            return kind, container, inner, True
    if tp in (bool, int, float, str):
        return tp.__name__, None, None, False
    if (origin is list and args == (str,)) or (origin is tuple and args == (str, ...)):
        return "list", origin, None, False
    element = args[0] if origin is tuple and len(args) == 2 and args[1] is Ellipsis else None
    if isinstance(element, type) and hasattr(element, "__dataclass_fields__"):
        return "tables", tuple, element, False
    if origin in (dict, Mapping) and args == (str, tuple[str, ...]):
        return "map", dict if origin is dict else FrozenMap, None, False
    raise TypeError(f"unsupported config field type {tp!r}")


_FIELDS: dict[type[Any], dict[str, _Key]] = {}


def _fields(cls: type[Any]) -> dict[str, _Key]:
    """``{key: _Key}`` of one table's dataclass, built once."""
    if cls not in _FIELDS:
        hints = get_type_hints(cls)
        out = {}
        for f in fields(cls):
            kind, container, element, optional = _kind(hints[f.name])
            meta = f.metadata
            required = f.default is MISSING and f.default_factory is MISSING
            out[f.name] = _Key(
                f.name, kind, container, element, optional, required,
                bool(meta.get("nonempty")), meta.get("choices"), meta.get("range"),
                meta.get("also", ()), meta.get("check"),
            )  # fmt: skip
        _FIELDS[cls] = out
    return _FIELDS[cls]


_Schema = dict[str, tuple[type[Any], dict[str, _Key]]]
_SCHEMAS: dict[type[Any], _Schema] = {}


def _schema(root: type[Any]) -> _Schema:
    """``{section: (dataclass, {key: _Key})}`` of a root dataclass, built once."""
    if root not in _SCHEMAS:
        hints = get_type_hints(root)
        _SCHEMAS[root] = {f.name: (hints[f.name], _fields(hints[f.name])) for f in fields(root)}
    return _SCHEMAS[root]


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _toml_key(key: str) -> str:
    """``key`` as it is written in a dotted TOML key (quoted unless bare)."""
    if _BARE_KEY_RE.fullmatch(key):
        return key
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)


def _coerce(key: _Key, value: Any, dotted: str, where: str = "") -> Any:
    """Check ``value`` (already typed: TOML, dict or parsed env) against ``key``."""
    if value is None and key.optional:
        return None
    kind = key.kind
    if kind == "tables":
        return _tables(key, value, dotted)
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "map":
        ok = isinstance(value, Mapping)
    else:
        ok = _is_str_list(value)
    if not ok:
        raise ConfigError(dotted, f"{where}expected {_DESCRIPTION[kind]}, got {_show(value)}")
    if kind == "float":
        value = float(value)
    elif kind == "map":
        value = _map(key, value, dotted)
    elif key.container is not None:
        value = key.container(value)
    if key.nonempty and not value:
        raise ConfigError(dotted, f"{where}must not be empty")
    if key.choices is not None and value not in key.choices:
        expected = ", ".join(key.choices)
        raise ConfigError(dotted, f"{where}expected one of {expected}, got {value!r}")
    if key.bounds is not None and value not in key.also:
        lo, hi = key.bounds
        if not lo <= value <= hi:  # also rejects nan
            extra = "".join(f"{a} or " for a in key.also)
            raise ConfigError(dotted, f"{where}expected {extra}{lo}..{hi}, got {value!r}")
    if key.check is not None:
        problem = key.check(value)
        if problem:
            raise ConfigError(dotted, f"{where}{problem}")
    return value


def _map(key: _Key, value: Mapping[Any, Any], dotted: str) -> Any:
    out: dict[str, tuple[str, ...]] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ConfigError(dotted, f"expected non-empty string keys, got {_show(k)}")
        if not _is_str_list(v):
            raise ConfigError(
                f"{dotted}.{_toml_key(k)}", f"expected a list of strings, got {_show(v)}"
            )
        out[k] = tuple(v)
    assert key.container is not None
    return key.container(out)


def _tables(key: _Key, value: Any, dotted: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(dotted, f"expected {_DESCRIPTION['tables']}, got {_show(value)}")
    assert key.element is not None
    return tuple(
        _build(key.element, item, f"{dotted}[{i}]", relative=True) for i, item in enumerate(value)
    )


def _build(cls: type[Any], table: Any, path: str, relative: bool) -> Any:
    """One dataclass from a TOML table at dotted ``path``, every key validated."""
    if not isinstance(table, Mapping):
        raise ConfigError(path, f"expected a table, got {_show(table)}")
    keys = _fields(cls)
    values = {}
    for k, v in table.items():
        name = str(k)
        spec = keys.get(name)
        dotted = f"{path}.{name}" if name else path
        if spec is None:
            raise ConfigError(dotted, "unknown key")
        values[name] = _coerce(spec, v, dotted)
    for name, spec in keys.items():
        if spec.required and name not in values:
            raise ConfigError(f"{path}.{name}", "missing required key")
    if not relative:
        return cls(**values)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc.key}" if exc.key else path, exc.message) from None


def _parse_env(key: _Key, raw: str, var: str, dotted: str) -> Any:
    """Turn an environment string into a value of ``key``'s type (not yet range-checked)."""
    text = raw.strip()
    kind = key.kind
    if kind in _NOT_FROM_ENV:
        raise ConfigError(
            dotted, f"{var}: not settable from the environment (set it in the config file)"
        )
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
    raise ConfigError(dotted, f"{var}: expected {_DESCRIPTION[kind]}, got {shown!r}")


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
        sections[name] = _build(schema[name][0], table, name, relative=False)
    return root(**sections)


def _plain(value: Any) -> Any:
    """``value`` as plain JSON-serialisable data: dataclasses and mappings -> dicts, -> lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return _dump(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _dump(obj: Any) -> dict[str, Any]:
    """One table: every key, except an optional key left at its default None (absent)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        out[f.name] = _plain(value)
    return out


def _to_dict(obj: Any) -> dict[str, dict[str, Any]]:
    return {s.name: _dump(getattr(obj, s.name)) for s in fields(obj)}


def _env_overrides(root: type[Any], env: Mapping[str, str]) -> list[tuple[str, str, Any]]:
    out = []
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("_")
        spec = _lookup(root, section, key, f"{var}: ")
        dotted = f"{section}.{key}"
        value = _coerce(spec, _parse_env(spec, env[var], var, dotted), dotted, f"{var}: ")
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
