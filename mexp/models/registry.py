"""The model registry: one entry per name, each with its typed config.

A model's config is a dataclass: the one given to `register_model(name, config=...)`, or else
the one its constructor's typed keyword arguments declare (so the constructor is the single
place a model's keys and defaults are written). `create_model(name, cfg)` builds a model from
its config, or from keyword arguments checked against it: an unknown or missing key fails with
the model's valid keys.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, type] = {}


def config_of(builder: Callable, name: str) -> type:
    """The config dataclass a constructor's keyword arguments declare."""
    fields = []
    for p in inspect.signature(builder).parameters.values():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise TypeError(f"model '{name}' takes *{p.name}: declare every key it accepts")
        default = dataclasses.field() if p.default is p.empty else dataclasses.field(default=p.default)
        fields.append((p.name, p.annotation if p.annotation is not p.empty else Any, default))
    title = "".join(w.title() for w in name.split("_"))
    return dataclasses.make_dataclass(f"{title}Config", fields, frozen=True)


def register_model(name: str, config: type | None = None):
    """Decorator: `@register_model("cnn")` on a class or builder function."""
    def deco(builder):
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered; known: {list_models()}")
        _MODELS[name] = builder
        _CONFIGS[name] = config or config_of(builder, name)
        return builder
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_config(name: str) -> type:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    return _CONFIGS[name]


def model_keys(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(model_config(name)))


def make_config(name: str, **kwargs):
    """The model's config from keyword arguments; unknown or missing keys name the valid ones."""
    keys = model_keys(name)
    bad = sorted(set(kwargs) - set(keys))
    if bad:
        raise ValueError(f"model '{name}' has no key(s) {', '.join(bad)}; its keys: "
                         f"{', '.join(keys)}")
    missing = [f.name for f in dataclasses.fields(model_config(name))
               if f.default is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ValueError(f"model '{name}' needs {', '.join(missing)}; its keys: {', '.join(keys)}")
    return model_config(name)(**kwargs)


def create_model(name: str, cfg=None, **kwargs) -> nn.Module:
    """Build model `name` from its config (`cfg`, an instance of `model_config(name)`) or from
    keyword arguments checked against it."""
    if cfg is None:
        cfg = make_config(name, **kwargs)
    elif kwargs or not isinstance(cfg, model_config(name)):
        raise TypeError(f"create_model('{name}', cfg): cfg must be a {model_config(name).__name__} "
                        "and nothing else")
    return _MODELS[name](**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
