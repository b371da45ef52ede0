"""Stage `extract_features`: per-frame CNN embeddings of every clip, one set per fold, each
made by *that fold's* stage-1 CNN (which never saw the fold's test subjects).

    python -m mexp.extract_features --config configs/feature_extraction.yaml [cnn_run_id=<id>]

Without `cnn_run_id` the latest FINISHED train_cnn run with the same data config is used.
Writes `features/fold=<name>.npy` (N, T, D) float16, `features/index.csv` and the fold plan.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mexp.util.progress import progress

from mexp import cli
from mexp.tracking.datasets import fetch_plan, log_dataset, log_plan
from mexp.tracking.folds import out_dir
from mexp.config import Config, load_config
from mexp.data.datasets import load_dataset
from mexp.engine.training import resolve_device
from mexp.tracking.runs import LineageError, T, download, stage_run, start
from mexp.tracking.lineage import resolve_parent
from mexp.models.build import build_cnn
from mexp.data.inputs import images
from mexp.engine.embed import MODELS_AT_ONCE, embed, embed_all

log = logging.getLogger(__name__)
STAGE = "extract_features"


def cnn_config(run_id: str) -> Config:
    with tempfile.TemporaryDirectory() as d:
        return load_config(download(run_id, "config.yaml", d))


def fold_weights(cnn_run_id: str, fold: str, leak: bool) -> dict:
    """The state dict of one fold's CNN (or the single all-subjects CNN)."""
    with tempfile.TemporaryDirectory() as d:
        if leak:
            path = download(cnn_run_id, "all_subjects/model.pth", d)
        else:
            result = json.loads(download(cnn_run_id, f"folds/{fold}.json", d).read_text())
            path = download(result["fold_run_id"], "model.pth", d)
        return torch.load(path, map_location="cpu", weights_only=True)


def main(cfg: Config) -> dict:
    start(cfg)
    cnn = resolve_parent(cfg, cfg.cnn_run_id, "train_cnn")
    cnn_id, leak = cnn.info.run_id, cnn.data.tags.get(T + "leak") == "true"
    ccfg = cnn_config(cnn_id)
    ccfg.data.cache_dir = cfg.data.cache_dir
    cs = load_dataset(ccfg.data)
    if cs.digest != cnn.data.tags.get(T + "data_digest"):
        raise LineageError(f"train_cnn run {cnn_id} was trained on data {cnn.data.tags.get(T + 'data_digest')},"
                           f" but its data config now loads {cs.digest}: the frames changed")
    plan, clips = fetch_plan(cnn_id), images(ccfg, cs)
    device = resolve_device(cfg.training.device)
    tags = {T + "parent_run_id": cnn_id, T + "cnn_run_id": cnn_id, T + "leak": str(leak).lower()}
    with stage_run(cfg, STAGE, tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
        log_dataset(cs.table, cs.digest, ccfg.data.dataset)
        log_plan(plan, cs.table["sample_id"])
        fdir = Path(tmp) / "features"
        fdir.mkdir()
        folds = list(plan.folds)
        if leak:                        # one all-subjects CNN: the same features for every fold
            model = build_cnn(ccfg, clips.shape[-1], len(cs.classes))
            model.load_state_dict(fold_weights(cnn_id, folds[0].name, leak))
            feats = embed(model, clips, device)
            for fold in folds:
                np.save(fdir / f"fold={fold.name}.npy", feats)
            folds = []
        groups = [folds[i:i + MODELS_AT_ONCE] for i in range(0, len(folds), MODELS_AT_ONCE)]
        for group in progress(groups, desc=f"extract features ({len(folds)} folds)", unit="group"):
            models = []
            for fold in group:
                model = build_cnn(ccfg, clips.shape[-1], len(cs.classes))
                model.load_state_dict(fold_weights(cnn_id, fold.name, leak))
                models.append(model)
            for fold, feats in zip(group, embed_all(models, clips, device)):
                np.save(fdir / f"fold={fold.name}.npy", feats)
        cs.table.assign(group=cs.groups).to_csv(fdir / "index.csv", index=False)
        plan.save(fdir / "fold_plan.json")
        (fdir / "lineage.json").write_text(json.dumps(
            {"cnn_run_id": cnn_id, "leak": leak, "data_digest": cs.digest,
             "classes": list(cs.classes), "dataset": ccfg.data.dataset}, indent=1))
        mlflow.log_artifacts(str(fdir), "features")
        if out_dir(cfg) is not None:
            dst = out_dir(cfg) / "features"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(fdir, dst)
        rid = run.info.run_id
    print(f"{STAGE}: {len(plan.folds)} fold(s) x {len(cs)} clips x {clips.shape[1]} frames from "
          f"train_cnn run {cnn_id}{' (LEAKING: one CNN saw every subject)' if leak else ''}; "
          f"run {rid}")
    return {"run_id": rid, "cnn_run_id": cnn_id, "folds": len(plan.folds), "leak": leak}


if __name__ == "__main__":
    cli.run(main, __doc__)
