"""Stage 2 `train_lstm`: an LSTM over each fold's feature sequences, scored on that fold.

    python -m mexp.train_lstm --config configs/lstm_stage2.yaml [features_run_id=<id>]
    mlflow run . -e train_lstm --env-manager local -P overrides="features_run_id=<id> training.epochs=5"

Inputs, in order: `features_run_id`; else the latest FINISHED extract_features run with the same
data config; else a local `data.features_dir` written by extract_features.
"""
from __future__ import annotations

import json
import logging
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from mexp import cli
from mexp.tracking.folds import cross_validate
from mexp.tracking.repeats import run_repeats
from mexp.tracking.summary import summary_line
from mexp.config import Config, ConfigError
from mexp.engine.crossval import BlockFolds
from mexp.engine.plans import FoldPlan
from mexp.data.datasets import resolve_path
from mexp.data.inputs import features_to_tensor
from mexp.models.build import build_model, model_spec
from mexp.tracking.lineage import match_upstream, upstream_used
from mexp.tracking.runs import LineageError, T, check_run, download, stage_run, start

log = logging.getLogger(__name__)
STAGE = "train_lstm"


class Features:
    """A features folder: index.csv, fold_plan.json, lineage.json, fold=<name>.npy."""

    def __init__(self, folder: Path, run_id: str = ""):
        self.folder, self.run_id = folder, run_id
        for f in ("index.csv", "fold_plan.json", "lineage.json"):
            if not (folder / f).is_file():
                raise LineageError(f"features folder {folder} has no {f}: not written by "
                                   "extract_features")
        self.table = pd.read_csv(folder / "index.csv", dtype={"subject": str, "group": str})
        self.plan = FoldPlan.load(folder / "fold_plan.json")
        self.lineage = json.loads((folder / "lineage.json").read_text())

    def fold(self, name: str) -> np.ndarray:
        p = self.folder / f"fold={name}.npy"
        if not p.is_file():
            raise LineageError(f"features for fold {name} missing in {self.folder}")
        return np.load(p)


def resolve_features(cfg: Config, tmp: Path) -> Features:
    if cfg.features_run_id:
        check_run(cfg.features_run_id, "extract_features")
        return Features(download(cfg.features_run_id, "features", tmp), cfg.features_run_id)
    run, note = match_upstream(cfg, "extract_features")
    if run is not None:
        log.info("using %s", note)
        upstream_used(note)
        return Features(download(run.info.run_id, "features", tmp), run.info.run_id)
    if cfg.data.features_dir and resolve_path(cfg.data.features_dir).is_dir():
        log.info("using the local features folder %s", cfg.data.features_dir)
        upstream_used(f"the local features folder {cfg.data.features_dir}")
        return Features(resolve_path(cfg.data.features_dir))
    raise LineageError(f"no features: {note}; pass features_run_id, run extract_features with "
                       "this config first, or set data.features_dir to a folder it wrote")


def adopt_plan(cfg: Config, plan: FoldPlan) -> None:
    """The fold plan comes from the features run: the run's params say that plan, not the
    config's own cv keys."""
    t = cfg.training
    if plan.method == "StratifiedGroupKFold":
        method, folds = plan.method, len(plan.folds)
    else:
        method, folds = plan.method, t.cv_folds
    if (t.cv_method, t.cv_folds) != (method, folds):
        log.info("fold plan from the features run: training.cv_method=%s, cv_folds=%d "
                 "(the config said %s, %d)", method, folds, t.cv_method, t.cv_folds)
    t.cv_method, t.cv_folds = method, folds


def make_fold_fn(cfg: Config, feats: Features, classes) -> BlockFolds:
    """Each fold's features come from that fold's own CNN: a fold reads its own array (fold
    batching stacks them, `BlockFolds`)."""
    ids = feats.table["sample_id"].to_numpy()
    y = feats.table["label"].to_numpy(np.int64)
    dim = np.load(feats.folder / f"fold={feats.plan.folds[0].name}.npy", mmap_mode="r").shape[-1]
    spec = model_spec(cfg, "lstm", num_classes=len(classes), input_dim=dim)
    return BlockFolds(cfg, partial(build_model, spec),
                      lambda fold: feats.fold(fold.name).astype(np.float32), y, ids,
                      features_to_tensor)


def check_config(cfg: Config) -> None:
    """What train_lstm refuses before any run: nested selection. Its inner folds would need
    features from a stage-1 CNN that never saw each inner test subject, and stage 1 makes one
    CNN per outer fold only."""
    if cfg.selection.mode != "none":
        raise ConfigError(
            f"train_lstm cannot run nested selection (selection.mode={cfg.selection.mode}): "
            "each inner fold would need features from a stage-1 CNN that never saw its inner "
            "test subject; select end to end with train_cnn_lstm, or at stage 1 with "
            "train_cnn, and set selection.mode=none here")


def main(cfg: Config) -> dict:
    check_config(cfg)
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    start(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        feats = resolve_features(cfg, Path(tmp))
        adopt_plan(cfg, feats.plan)
        lin = feats.lineage
        leak = bool(lin.get("leak"))
        tags = {T + "parent_run_id": feats.run_id, T + "features_run_id": feats.run_id,
                T + "cnn_run_id": lin["cnn_run_id"], T + "leak": str(leak).lower(),
                T + "model": cfg.model.name or "lstm"}
        with stage_run(cfg, STAGE, tags=tags, resume_run_id=cfg.resume_run_id) as run:
            summary = cross_validate(cfg, STAGE, run, feats.plan, feats.table,
                                     lin["data_digest"], lin.get("dataset", "features"),
                                     lin["classes"],
                                     lambda c: make_fold_fn(c, feats, lin["classes"]))
            summary["leak"] = leak
    warn = " -- LEAKING: the stage-1 CNN saw the test subjects" if leak else ""
    print(summary_line(STAGE, summary, summary["run_id"], warn))
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
