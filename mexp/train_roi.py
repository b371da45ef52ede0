"""Stage `train_roi`: the ROI Transformer on 7-ROI motion sequences `(T, 14)`, per fold.

    python -m mexp.train_roi --config configs/roi.yaml [flow_run_id=<id>]

Inputs: `flow_run_id`, else the latest FINISHED extract_flow run with the same data config.
Per fold, the features are standardised with statistics of the fold's training subjects only.
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
from mexp.engine.setup import fold_plan
from mexp.tracking.summary import summary_line
from mexp.config import Config
from mexp.engine.crossval import BlockFolds, fold_rows
from mexp.data.inputs import features_to_tensor
from mexp.models.build import build_model, model_spec
from mexp.tracking.runs import T, download, stage_run, start
from mexp.tracking.lineage import resolve_parent

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


def make_fold_fn(cfg: Config, table: pd.DataFrame, x: np.ndarray, classes) -> BlockFolds:
    """Each fold standardises with its own training rows: a fold's array is its own
    (fold batching stacks them, `BlockFolds`)."""
    ids = table["sample_id"].to_numpy()
    pos = {s: i for i, s in enumerate(ids)}
    y = table["label"].to_numpy(np.int64)
    spec = model_spec(cfg, "roi_transformer", num_classes=len(classes), input_dim=x.shape[-1],
                      max_len=max(64, x.shape[1]))
    return BlockFolds(cfg, partial(build_model, spec),
                      lambda fold: standardise(x, fold_rows(fold, pos)[0]), y, ids,
                      features_to_tensor)


def main(cfg: Config) -> dict:
    if cfg.repeats > 1:
        return run_repeats(cfg, main, STAGE)
    start(cfg)
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
                                 meta["dataset"], classes,
                                 lambda c: make_fold_fn(c, table, x, classes))
    print(summary_line(STAGE, summary, summary["run_id"]))
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
