"""Search spaces in override keys: `{type: float|int|categorical, low, high, log, step, choices}`.

`check_space` rejects a bad space (low > high, log with low <= 0, empty choices, non-numeric
bounds, unknown spec keys) with a `ConfigError` naming the key, before any trial or run starts.
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache
from importlib import resources

import yaml

from mexp.config import ConfigError, apply_dict, validate

TYPES = ("float", "int", "categorical")
_NUMERIC = {"type", "low", "high", "log", "step"}
KEYS = {"float": _NUMERIC, "int": _NUMERIC, "categorical": {"type", "choices"}}


@lru_cache(maxsize=None)
def _defaults() -> dict:
    text = resources.files("mexp.resources").joinpath("hpo_spaces.yaml").read_text()
    return yaml.safe_load(text)


def default_space(stage: str) -> dict:
    if stage not in _defaults():
        raise ConfigError(f"no default search space for hpo.stage '{stage}'")
    return dict(_defaults()[stage])


def _number(key: str, name: str, value, integer: bool) -> float | int:
    """A bound as a number: YAML reads `1e-4` (no dot) as a string, so numeric text is fine;
    anything else (text, booleans, None, lists, NaN) names the key."""
    bad = ConfigError(f"hpo.space '{key}': {name} must be a{'n integer' if integer else ' number'}"
                      f", got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        x = float(value)
    except ValueError:
        raise bad from None
    if not math.isfinite(x) or (integer and not x.is_integer()):
        raise bad
    return int(x) if integer else x


def _range(key: str, spec: dict) -> dict:
    """low, high, log, step of a numeric dimension, checked."""
    integer = spec["type"] == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise ConfigError(f"hpo.space '{key}': missing '{name}'")
    low, high = (_number(key, n, spec[n], integer) for n in ("low", "high"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"hpo.space '{key}': log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(key, "step", step, integer)
        if step <= 0:
            raise ConfigError(f"hpo.space '{key}': step must be > 0, got {step}")
        if log:
            raise ConfigError(f"hpo.space '{key}': step and log=true cannot be combined")
    if low > high:
        raise ConfigError(f"hpo.space '{key}': low ({low}) is greater than high ({high})")
    if log and low <= 0:
        raise ConfigError(f"hpo.space '{key}': log=true needs low > 0, got low={low}")
    return {"low": low, "high": high, "log": log, "step": step}


def _choices(key: str, spec: dict) -> list:
    choices = spec.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(f"hpo.space '{key}': choices must be a non-empty list, got {choices!r}")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise ConfigError(f"hpo.space '{key}': choice {c!r} is not a number, string, "
                              "boolean or null")
    return list(choices)


def check_dimension(key, spec) -> dict:
    """One dimension, checked: {type, low, high, log, step} or {type, choices}."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"hpo.space: keys must be dotted config keys, got {key!r}")
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"hpo.space '{key}': needs type one of {list(TYPES)}, got {spec!r}")
    unknown = sorted(set(spec) - KEYS[spec["type"]])
    if unknown:
        raise ConfigError(f"hpo.space '{key}': unknown field(s) {unknown} for type "
                          f"{spec['type']}; valid: {sorted(KEYS[spec['type']])}")
    if spec["type"] == "categorical":
        return {"type": "categorical", "choices": _choices(key, spec)}
    return {"type": spec["type"], **_range(key, spec)}


def check_space(space) -> dict:
    """The whole space, checked (ConfigError naming the key); key -> checked dimension."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"hpo.space must be a non-empty mapping of config keys, got {space!r}")
    return {k: check_dimension(k, s) for k, s in space.items()}


def examples(key: str, spec: dict) -> list:
    """Values worth trying against the config before any run: every choice, or both bounds."""
    d = check_dimension(key, spec)
    return d["choices"] if d["type"] == "categorical" else [d["low"], d["high"]]


def check_study_space(cfg) -> dict:
    """hpo.space (the stage's default if empty), checked, then every choice and both bounds
    applied to a copy of the config and validated, so a bad space fails before any run."""
    if not cfg.hpo.space:
        cfg.hpo.space = default_space(cfg.hpo.stage)
    space = check_space(cfg.hpo.space)
    first = {k: examples(k, s)[0] for k, s in space.items()}
    for key, spec in space.items():
        for value in examples(key, spec):
            probe = copy.deepcopy(cfg)
            try:
                apply_dict(probe, to_nested({**first, key: value}), source="hpo.space: ")
                validate(probe)
            except ConfigError as e:
                raise ConfigError(f"hpo.space '{key}' = {value!r}: {e}") from None
    return space


def suggest(trial, key: str, spec: dict):
    """The trial's value for one dimension."""
    d = check_dimension(key, spec)
    if d["type"] == "categorical":
        return trial.suggest_categorical(key, d["choices"])
    if d["type"] == "float":
        return trial.suggest_float(key, d["low"], d["high"], log=d["log"], step=d["step"])
    return trial.suggest_int(key, d["low"], d["high"], step=d["step"] or 1, log=d["log"])


def to_nested(params: dict) -> dict:
    """{'training.lr': 0.01} -> {'training': {'lr': 0.01}}."""
    out: dict = {}
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
