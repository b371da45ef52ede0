"""The model registry: one dict from name to builder, chosen by name in config."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: `@register_model("cnn")` on a class or builder function."""
    def deco(builder):
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered; known: {list_models()}")
        _MODELS[name] = builder
        return builder
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
