"""Search spaces in override keys: `{type: float|int|categorical, low, high, log, step, choices}`."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import yaml

from mexp.config import ConfigError

TYPES = ("float", "int", "categorical")


@lru_cache(maxsize=None)
def _defaults() -> dict:
    text = resources.files("mexp.resources").joinpath("hpo_spaces.yaml").read_text()
    return yaml.safe_load(text)


def default_space(stage: str) -> dict:
    if stage not in _defaults():
        raise ConfigError(f"no default search space for hpo.stage '{stage}'")
    return dict(_defaults()[stage])


def suggest(trial, key: str, spec: dict):
    """The trial's value for one dimension; with `trial=None`, a valid example value
    (used to check the space against the config before any run starts)."""
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise ConfigError(f"hpo.space '{key}': needs type one of {list(TYPES)}, got {spec!r}")
    t = spec["type"]
    try:
        if t == "categorical":
            choices = list(spec["choices"])
            return choices[0] if trial is None else trial.suggest_categorical(key, choices)
        low, high = spec["low"], spec["high"]
        if t == "float":
            if trial is None:
                return float(low)
            return trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log")))
        if trial is None:
            return int(low)
        return trial.suggest_int(key, int(low), int(high), step=int(spec.get("step", 1)),
                                 log=bool(spec.get("log")))
    except KeyError as e:
        raise ConfigError(f"hpo.space '{key}': missing {e.args[0]!r}") from None


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
