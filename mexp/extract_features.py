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
from mexp.progress import progress

from mexp import cli
from mexp.common import fetch_plan, log_dataset, log_plan, out_dir, setup_torch
from mexp.config import Config, load_config
from mexp.data.datasets import load_dataset
from mexp.data.inputs import images_to_tensor
from mexp.engine import resolve_device
from mexp.tracking import T, LineageError, configure, download, resolve_parent, stage_run
from mexp.train_cnn import build_cnn, images

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


BATCH = 512          # frames per forward pass
MODELS_AT_ONCE = 8   # fold CNNs held in memory together (LOSO has one per subject)


def embed_all(models, clips: np.ndarray, device, batch: int = BATCH,
              dtype=np.float16) -> list[np.ndarray]:
    """(N, T, H, W, C) uint8 -> one (N, T, D) array of per-frame embeddings per model (float16
    as stored; `dtype=np.float32` before that rounding). Each batch of frames is converted to a
    tensor once and pushed through every model, under inference mode."""
    models = [m.eval().to(device) for m in models]
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, *clips.shape[2:])
    outs: list[np.ndarray | None] = [None] * len(models)
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = images_to_tensor(frames[i:i + batch]).to(device)
            for j, model in enumerate(models):
                f = model.forward_features(x).cpu().numpy()
                if outs[j] is None:
                    outs[j] = np.empty((len(frames), f.shape[1]), dtype)
                outs[j][i:i + len(f)] = f
    return [o.reshape(n, t, -1) for o in outs]


def embed(model, clips: np.ndarray, device, batch: int = BATCH) -> np.ndarray:
    """(N, T, H, W, C) uint8 -> (N, T, D) float16 per-frame embeddings of one model."""
    return embed_all([model], clips, device, batch)[0]


def main(cfg: Config) -> dict:
    setup_torch(cfg)
    configure(cfg)
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
