"""Stage `train_roi`: the ROI Transformer on 7-ROI motion sequences `(T, 14)`, per fold.

    python -m mexp.train_roi --config configs/roi.yaml [flow_run_id=<id>]

Inputs: `flow_run_id`, else the latest FINISHED extract_flow run with the same data config.
Per fold, the features are standardised with statistics of the fold's training subjects only.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from mexp import cli
from mexp.common import cross_validate, run_repeats, fold_plan, setup_torch, summary_line
from mexp.config import Config
from mexp.crossval import FoldOutput, fit_and_score
from mexp.cv import Fold
from mexp.data.inputs import features_to_tensor
from mexp.models import create_model
from mexp.tracking import T, configure, download, resolve_parent, stage_run

log = logging.getLogger(__name__)
STAGE = "train_roi"


def load_flow_run(run_id: str, tmp: Path) -> tuple[pd.DataFrame, np.ndarray, dict]:
    d = download(run_id, "flow", tmp)
    table = pd.read_csv(d / "index.csv", dtype={"subject": str, "group": str})
    return table, np.load(d / "roi_features.npy"), json.loads((d / "meta.json").read_text())


def standardise(x: np.ndarray, train_idx) -> np.ndarray:
    """Per-channel z-score with the mean and sd of the training rows only."""
    mu = x[train_idx].mean(axis=(0, 1), keepdims=True)
    sd = x[train_idx].std(axis=(0, 1), keepdims=True) + 1e-6
    return ((x - mu) / sd).astype(np.float32)


def make_fold_fn(cfg: Config, table: pd.DataFrame, x: np.ndarray, classes):
    ids = table["sample_id"].to_numpy()
    pos = {s: i for i, s in enumerate(ids)}
    y = table["label"].to_numpy(np.int64)

    def fold_fn(k: int, fold: Fold) -> FoldOutput:
        tr, va, te = ([pos[i] for i in s] for s in (fold.train_ids, fold.val_ids, fold.test_ids))
        z, m = standardise(x, tr), cfg.model
        return fit_and_score(cfg, k, fold, lambda: create_model(
            m.name or "roi_transformer", num_classes=len(classes), input_dim=x.shape[-1],
            dim=m.dim, heads=m.heads, num_layers=m.num_layers, dropout=m.dropout,
            max_len=max(64, x.shape[1])),
            (z[tr], y[tr]), (z[va], y[va]), z[te], (ids[te], ids[tr], ids[va]), features_to_tensor)
    return fold_fn


def main(cfg: Config) -> dict:
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    setup_torch(cfg)
    configure(cfg)
    flow_run = resolve_parent(cfg, cfg.flow_run_id, "extract_flow")
    fid = flow_run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        table, x, meta = load_flow_run(fid, Path(tmp))
    classes = meta["classes"]
    plan = fold_plan(cfg, table["sample_id"], table["group"], table["label"], table["dataset"])
    tags = {T + "parent_run_id": fid, T + "flow_run_id": fid,
            T + "model": cfg.model.name or "roi_transformer", T + "flow_method": meta["method"]}
    with stage_run(cfg, STAGE, tags=tags, resume_run_id=cfg.resume_run_id) as run:
        summary = cross_validate(cfg, STAGE, run, plan, table, meta["data_digest"],
                                 meta["dataset"], classes, make_fold_fn(cfg, table, x, classes))
    print(summary_line(STAGE, summary, summary["run_id"]))
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
