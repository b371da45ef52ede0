"""Refit the deliverable: the final model on *all* subjects with a source run's config.

The fold models are estimates of how well the recipe generalises; the model people use is
trained once more on every subject. Its epoch count is the median of the epochs the source
run's folds kept (chosen on their validation subjects), so nothing here looks at test data.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from mexp.config import Config, load_config
from mexp.tracking.folds import fold_results
from mexp.data.datasets import FLOW28, load_dataset
from mexp.data.inputs import (clips_to_tensor, features_to_tensor, images_to_tensor, make_augment,
                              stage1_frames)
from mexp.engine.training import fit, set_seed
from mexp.engine.embed import embed
from mexp.models.build import build_model, cnn_spec, model_spec
from mexp.tracking.runs import T, LineageError, download
from mexp.data.inputs import images

log = logging.getLogger(__name__)
TRAINABLE = ("train_cnn", "train_lstm", "train_cnn_lstm")


@dataclass
class Bundle:
    kind: str
    cfg: Config
    classes: list
    models: dict = field(default_factory=dict)      # name -> (spec dict, state dict)

    def save(self, d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        meta = {"kind": self.kind, "classes": list(self.classes),
                "models": {n: spec for n, (spec, _) in self.models.items()}}
        (d / "meta.json").write_text(json.dumps(meta, indent=1))
        for n, (_, state) in self.models.items():
            torch.save(state, d / f"{n}.pth")
        return d


def run_config(run_id: str, path: str = "config.yaml") -> Config:
    with tempfile.TemporaryDirectory() as d:
        return load_config(download(run_id, path, d))


def final_epochs(run_id: str, fallback: int) -> int:
    """Median of the epochs the run's folds kept (validation-chosen, or the last)."""
    kept = [r["best_epoch"] for r in fold_results(run_id)]
    return max(1, int(np.median(kept))) if kept else fallback


def _fit_all(model, x, y, cfg: Config, epochs: int, to_input, augment=None):
    cfg.training.epochs = epochs
    set_seed(cfg.training.seed)
    res = fit(model, (x, y), None, cfg.training, model.num_classes, to_input, augment,
              seed=cfg.training.seed, desc="refit on all subjects")
    return res.state


def refit_cnn(cnn_run_id: str) -> tuple[Bundle, object, np.ndarray]:
    cfg = run_config(cnn_run_id)
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    x, owner = stage1_frames(clips, cs.apex, cfg.data.frames)
    spec = cnn_spec(cfg, clips.shape[-1], len(cs.classes))
    model = build_model(spec)
    augment = make_augment("flow" if cfg.data.dataset == FLOW28 else "frames") \
        if cfg.data.augmentation else None
    state = _fit_all(model, x, cs.labels[owner], cfg, final_epochs(cnn_run_id, cfg.training.epochs),
                     images_to_tensor, augment)
    kind = "flow_cnn" if cfg.data.dataset == FLOW28 else "frame_cnn"
    return Bundle(kind, cfg, list(cs.classes), {"cnn": (spec, state)}), model, clips


def refit_two_stage(lstm_run_id: str, cnn_run_id: str) -> Bundle:
    bundle, cnn, clips = refit_cnn(cnn_run_id)
    lcfg = run_config(lstm_run_id)
    cs = load_dataset(bundle.cfg.data)
    feats = embed(cnn, clips, torch.device("cpu")).astype(np.float32)
    spec = model_spec(lcfg, "lstm", num_classes=len(cs.classes), input_dim=feats.shape[-1])
    model = build_model(spec)
    state = _fit_all(model, feats, cs.labels, lcfg, final_epochs(lstm_run_id, lcfg.training.epochs),
                     features_to_tensor)
    bundle.kind = "two_stage"
    bundle.models["lstm"] = (spec, state)
    return bundle


def refit_cnn_lstm(run_id: str) -> Bundle:
    cfg = run_config(run_id)
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    spec = model_spec(cfg, "cnn_lstm", num_classes=len(cs.classes), input_channels=clips.shape[-1])
    augment = make_augment("frames") if cfg.data.augmentation else None
    state = _fit_all(build_model(spec), clips, cs.labels, cfg,
                     final_epochs(run_id, cfg.training.epochs), clips_to_tensor, augment)
    return Bundle("cnn_lstm", cfg, list(cs.classes), {"cnn_lstm": (spec, state)})


def refit(run, stage: str | None = None) -> Bundle:
    """The final model for a FINISHED training-stage run (or an HPO trial of `stage`)."""
    stage, rid = stage or run.data.tags.get(T + "stage"), run.info.run_id
    if run.data.tags.get(T + "leak") == "true":
        raise LineageError(f"run {rid} is tagged as leaking (stage1.scope=all_subjects): "
                           "its cross-validated score is not honest, it is not promoted")
    if run.data.tags.get(T + "selection"):
        raise LineageError(f"run {rid} chose among candidates per fold (selection.mode="
                           f"{run.data.tags[T + 'selection']}, candidates "
                           f"{run.data.tags.get(T + 'candidates', '?')}): promote refits one "
                           "model and cannot reproduce that choice yet; promote a run of the "
                           "candidate you want (selection.mode=none)")
    if stage == "train_cnn":
        return refit_cnn(rid)[0]
    if stage == "train_lstm":
        return refit_two_stage(rid, run.data.tags[T + "cnn_run_id"])
    if stage == "train_cnn_lstm":
        return refit_cnn_lstm(rid)
    raise LineageError(f"run {rid} is a '{stage}' run; promote takes a run of "
                       f"{', '.join(TRAINABLE)} or an hpo study")
