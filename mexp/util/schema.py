"""Nested dataclasses as a config schema: apply YAML-like dicts and dotted `key=value`
overrides onto them, coercing each value to its field's type. Unknown keys and bad values
raise ConfigError naming the key (and the valid ones). mexp's own schema is `mexp.config`."""
from __future__ import annotations

import dataclasses
import shlex
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file, key or value is invalid."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _hints(obj) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert `value` (from YAML or the command line) to the field type `typ`."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "1", "on"):
                return True
            if s in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if typ is str:
            if value is None:
                return ""
            if isinstance(value, (dict, list)):
                raise ValueError
            if isinstance(value, bool):      # YAML 1.1 reads on/off/yes/no as booleans
                return "on" if value else "off"
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}': {value!r} is not a valid {typ.__name__}") from None
    raise ConfigError(f"config key '{key}': unsupported field type {typ}")


def _valid_keys(obj, prefix: str = "") -> list[str]:
    return [prefix + f.name for f in dataclasses.fields(obj)]


def apply_dict(cfg: Any, delta: dict, prefix: str = "", source: str = "") -> None:
    """Apply a nested dict onto a dataclass instance in place, validating every key."""
    if not isinstance(delta, dict):
        raise ConfigError(f"{source}config section '{prefix.rstrip('.') or '<root>'}' "
                          f"must be a mapping, got {type(delta).__name__}")
    hints = _hints(cfg)
    for k, v in delta.items():
        key = f"{prefix}{k}"
        if k not in hints:
            raise ConfigError(f"{source}unknown config key '{key}'; valid keys: "
                              + ", ".join(_valid_keys(cfg, prefix)))
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur):
            apply_dict(cur, v if v is not None else {}, key + ".", source)
        else:
            setattr(cfg, k, _coerce(v, hints[k], key))


def parse_overrides(overrides: str | list[str] | None) -> dict:
    """'a.b=1 c=x' (or a list of such items) -> nested dict of YAML-parsed values."""
    if not overrides:
        return {}
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    out: dict = {}
    for part in items:
        if "=" not in part:
            raise ConfigError(f"override '{part}' is not of the form key=value")
        key, raw = part.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{part}' conflicts with another override")
        node[leaf] = value
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: line, column and the problem."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    ctx = getattr(e, "context", None)
    return f"{where}{what}" + (f" ({ctx})" if ctx else "")
