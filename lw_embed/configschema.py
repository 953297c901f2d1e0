"""The table-driven config machinery: TOML tables and LW_EMBED_* variables -> frozen dataclasses.

Interface: none (pure Python over :mod:`tomllib` output and a mapping of environment
variables). Generic over the root dataclass, so :mod:`lw_embed.config` declares the
sections and tests can use other roots. Capability: none. Cost: once at start (and at a
rules reload). Failure modes: :class:`~lw_embed.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, fields, is_dataclass
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from lw_embed.errors import ConfigError

ENV_PREFIX = "LW_EMBED_"
#: ``LW_EMBED_*`` variables that are not config overrides (read elsewhere; ignored here).
RESERVED_ENV = frozenset(
    {"LW_EMBED_TOKEN", "LW_EMBED_CONFIG", "LW_EMBED_BACKEND", "LW_EMBED_DATA_DIR",
     "LW_EMBED_PYTHON", "LW_EMBED_AUTOSTART"}
)


def _one_of(*choices: str) -> dict[str, Any]:
    return {"choices": choices}


def _range(lo: float, hi: float, *also: float) -> dict[str, Any]:
    """Allow ``lo..hi`` inclusive, plus the exact values in ``also`` (e.g. 0 = "auto")."""
    return {"range": (lo, hi), "also": also}


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


# --- the table-driven machinery (generic over the root dataclass, so tests can use others) ---
#
# A field's type picks how its value is read and checked:
#   bool, int, float, str                 a TOML scalar (an int is accepted for a float)
#   list[str], tuple[str, ...]            an array of strings (from the environment "a,b",
#                                         or a TOML array: '["a", "b"]', "[]")
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
        if text.startswith("[") and text.endswith("]"):
            try:  # a TOML array; the type check that follows names a non-string item
                return tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                pass  # e.g. a lone glob "[ab]": a one-item comma list
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


