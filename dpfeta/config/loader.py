"""Reading a config: a YAML (or config.json) file, ``--set a.b=c`` overrides, the typed coercion of
every value to its declared type, and the redacted keys of a stored config.json."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from dpfeta.config.checks import validate
from dpfeta.config.schema import INFRA_KEYS, RENAMED_KEYS, SECRET_KEYS, SEED_REDACTED, Config


def load(path: Path | str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML (or config.json) file, apply ``a.b=c`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file not found: expected a YAML file at '{p}'")
        raw = _read_mapping_file(p)
        if not isinstance(raw, dict):
            raise TypeError(f"config '{p}': expected a mapping at top level, got {type(raw).__name__}")
        raw = _unredacted(raw)  # a stored config.json: its redacted keys at their defaults (or --set)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def replace(cfg: Config, updates: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with dotted-key updates applied (typed and validated)."""
    raw = cfg.to_dict()
    for key, value in updates.items():
        _set_dotted(raw, key, value)
    new = from_dict(raw)
    validate(new)
    return new


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (an exponent without a dot) as a string; read it as the number it is
    (YAML 1.2), also inside mappings such as tune.search_space."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader


def _read_mapping_file(p: Path) -> Any:
    """The parsed YAML (or JSON) of a config file; an unreadable file or a syntax error is a
    ``ValueError`` naming the file (and the line), not a parser traceback."""
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"config file '{p}': cannot read it ({reason})") from None
    try:
        return (json.loads(text) if p.suffix == ".json" else _yaml(text)) or {}
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"config file '{p}': invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file '{p}': invalid YAML{_yaml_where(exc)}: {_yaml_problem(exc)}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{problem} ({context})" if context else problem


def parse_override(item: str) -> tuple[str, Any]:
    """``section.key=value`` -> (key, value); the value is YAML (``[2, 8]``, ``null``, ``1e-5``), except
    that a key declared a string keeps its text as given (``run.name=2024`` is the name "2024")."""
    if "=" not in item:
        raise ValueError(f"override '{item}': expected the form section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or key.startswith("-"):
        raise ValueError(f"override '{item}': expected a dotted key such as privacy.epsilon=1")
    if not text.strip():
        return key, ""
    try:
        value = _yaml(text)
    except yaml.YAMLError as exc:
        raise ValueError(
            f"override '{item}': the value of '{key}' is not valid YAML: {_yaml_problem(exc)} "
            "(quote the whole --set argument in the shell, and strings with ':' or '#' in YAML)"
        ) from None
    if isinstance(value, (bool, int, float)) and _declares_str(key):
        return key, text.strip()
    return key, value


def _declares_str(key: str) -> bool:
    """Whether the dotted key is declared a string (or an optional string) in the schema."""
    cls: Any = Config
    *sections, name = key.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
    if not dataclasses.is_dataclass(cls):
        return False
    tp = typing.get_type_hints(cls).get(name)
    # Optional[str] is a string; Union[int, str] (a number or a word such as auto) is parsed like YAML
    return tp is str or (
        typing.get_origin(tp) in (Union, types.UnionType) and set(typing.get_args(tp)) - {type(None)} == {str}
    )


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"config key '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_public_dict(public: dict) -> Config:
    """A config from ``public_dict()`` (a release's config.json): the redacted keys at their defaults."""
    return from_dict(_unredacted(public))


def _unredacted(raw: dict) -> dict:
    raw = json.loads(json.dumps(raw))
    for key in (*SECRET_KEYS, *INFRA_KEYS):
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and raw[section].get(name) == SEED_REDACTED:
            del raw[section][name]
    return raw


def from_dict(raw: dict, cls: type = Config, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise TypeError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        if key in RENAMED_KEYS:
            raise ValueError(f"config key '{key}' was replaced: use {RENAMED_KEYS[key]}")
        raise ValueError(
            f"unknown config key '{key}'; expected one of: " + ", ".join(prefix + n for n in sorted(names))
        )
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        expected = " or ".join(_type_name(a) for a in args)
        raise TypeError(f"config key '{key}': expected {expected}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise TypeError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError(f"config key '{key}': expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML read a name such as `true` as a boolean
            return "true" if value else "false"
        if isinstance(value, (int, float)):  # YAML read a name such as 2024 as a number
            return str(value)
        if not isinstance(value, str):
            raise TypeError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"config key '{key}': unsupported type {tp!r}")  # internal: schema error


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))
