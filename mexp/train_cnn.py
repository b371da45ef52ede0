"""Stage 1 `train_cnn`: a spatial CNN per fold, trained on that fold's training subjects only.

    python -m mexp.train_cnn --config configs/cnn_stage1.yaml [key=value ...]

The fold plan is fixed here and logged (`fold_plan.json`); every later stage uses it.
`stage1.scope=all_subjects` reproduces the original toolkit's single CNN on all subjects: its
runs are tagged as leaking and every summary downstream says so.
"""
from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch

from mexp import cli
from mexp.config import Config
from mexp.data.datasets import FLOW28, ClipSet
from mexp.data.inputs import images_to_tensor, make_augment, stage1_frames
from mexp.engine.crossval import RowFolds
from mexp.engine.plans import Fold
from mexp.engine.training import fit, set_seed
from mexp.models.build import build_cnn
from mexp.tracking.datasets import log_dataset, log_plan
from mexp.tracking.folds import clip_stage
from mexp.tracking.repeats import run_repeats
from mexp.tracking.runs import T


log = logging.getLogger(__name__)
STAGE = "train_cnn"


def make_fold_fn(cfg: Config, cs: ClipSet, clips: np.ndarray) -> RowFolds:
    """The fold function: rows of one image array. With one image per clip that is each
    clip's apex frame; with `data.frames=all` every frame of every clip (each labelled with its
    clip's label, a fold's training rows being its training clips' frames in clip order, as
    `stage1_frames` gives them) followed by the apex frames that validation and test use. Either
    way fold batching can train the folds as one vectorised model."""
    kind = "flow" if cfg.data.dataset == FLOW28 else "frames"
    augment = make_augment(kind) if cfg.data.augmentation else None
    ids = cs.table["sample_id"].to_numpy()
    make_model = partial(build_cnn, cfg, clips.shape[-1], len(cs.classes))
    n, t = clips.shape[:2]
    apex = clips[np.arange(n), cs.apex]
    if cfg.data.frames == "apex" or t == 1:     # one image per clip
        x, y, row_ids, rows = apex, cs.labels, ids, partial(clip_rows, cs)
    else:
        x = np.concatenate([stage1_frames(clips, cs.apex, "all")[0], apex])
        y = np.concatenate([np.repeat(cs.labels, t), cs.labels])
        row_ids, rows = np.concatenate([np.repeat(ids, t), ids]), partial(frame_rows, cs, t)
    return RowFolds(cfg, make_model, x, y, row_ids, rows, images_to_tensor, augment, kind)


def frame_rows(cs: ClipSet, t: int, fold: Fold) -> tuple:
    """`data.frames=all`: the training clips' frames (rows clip * t + frame), and the
    validation and test clips' apex frames (after the n * t frame rows)."""
    tr, va, te = clip_rows(cs, fold)
    n = len(cs)
    return ((np.asarray(tr, np.int64)[:, None] * t + np.arange(t)).ravel(),
            n * t + np.asarray(va, np.int64), n * t + np.asarray(te, np.int64))


def clip_rows(cs: ClipSet, fold: Fold) -> tuple:
    return tuple(cs.subset(s) for s in (fold.train_ids, fold.val_ids, fold.test_ids))


def train_all_subjects(cfg: Config, cs: ClipSet, clips: np.ndarray) -> None:
    """The original toolkit's leaking stage 1: one CNN on every subject, final epoch."""
    x, owner = stage1_frames(clips, cs.apex, cfg.data.frames)
    set_seed(cfg.training.seed)
    model = build_cnn(cfg, clips.shape[-1], len(cs.classes))
    res = fit(model, (x, cs.labels[owner]), None, cfg.training, len(cs.classes),
              images_to_tensor, seed=cfg.training.seed, desc="all subjects")
    with tempfile.TemporaryDirectory() as d:
        torch.save(res.state, Path(d) / "model.pth")
        mlflow.log_artifact(str(Path(d) / "model.pth"), "all_subjects")
    mlflow.set_tags({T + "leak": "true", T + "scope": "all_subjects"})
    log.warning("stage1.scope=all_subjects: ONE CNN trained on every subject; stage-2 "
                "cross-validation on its features leaks the test subjects")


def main(cfg: Config) -> dict:
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    leak = cfg.stage1.scope == "all_subjects"
    return clip_stage(cfg, STAGE, "cnn", make_fold_fn, partial(all_subjects, cfg) if leak else None)


def all_subjects(cfg: Config, run, cs: ClipSet, clips: np.ndarray, plan) -> dict:
    """The original toolkit's stage 1 inside the stage's run (tagged as leaking)."""
    log_dataset(cs.table, cs.digest, cfg.data.dataset)
    log_plan(plan, cs.table["sample_id"])
    train_all_subjects(cfg, cs, clips)
    print(f"{STAGE}: one CNN on all subjects (LEAKING scope); run {run.info.run_id}")
    return {"run_id": run.info.run_id, "leak": True}


if __name__ == "__main__":
    cli.run(main, __doc__)
