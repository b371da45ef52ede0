"""One way to build a stage's model from its run config, used by the fold functions, refit and
serving alike: `model_spec` (a registry name and the keys the model declares) and
`build_model` (the model from a spec; a served model's bundle stores the spec).

The config's `model` section is shared by a pipeline's stages (the CNN and the LSTM of
`main` read one section), so each model takes the keys it declares and leaves the others;
the data fix the shape keys (`num_classes`, `input_channels`, `input_dim`, `max_len`).
`model.num_classes` is 0 (the label map's classes) or must equal their count.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from mexp.config import Config, ConfigError
from mexp.models.registry import create_model, model_keys


def model_spec(cfg: Config, default: str, **given) -> dict:
    """{"name": ..., **keyword arguments} for the stage's model (`model.name`, else `default`):
    each key the model declares from `given` (what the data fix), else from the config's model
    section, else the model's own default."""
    m = cfg.model
    name = m.name or default
    keys = model_keys(name)
    n = given.get("num_classes")
    if m.num_classes and n is not None and m.num_classes != n:
        raise ConfigError(f"model.num_classes={m.num_classes} but the data have {n} classes "
                          f"(data.label_map={cfg.data.label_map or 'none'}); set it to {n} or 0")
    section = {f.name for f in dataclasses.fields(m)} - {"name"}
    spec = {k: getattr(m, k) for k in keys if k in section and k not in given}
    spec |= {k: v for k, v in given.items() if k in keys}
    return {"name": name, **spec}


def build_model(spec: dict) -> nn.Module:
    kw = dict(spec)
    return create_model(kw.pop("name"), **kw)


def build_cnn(cfg: Config, channels: int, num_classes: int) -> nn.Module:
    """Stage 1's CNN (`cnn` unless `model.name` says otherwise)."""
    return build_model(cnn_spec(cfg, channels, num_classes))


def cnn_spec(cfg: Config, channels: int, num_classes: int) -> dict:
    return model_spec(cfg, "cnn", num_classes=num_classes, input_channels=channels)
