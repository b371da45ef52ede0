"""Stage `extract_flow`: optical flow of every clip -> 7-ROI motion sequences `(T, 14)` and
STSTNet-style apex flow images `(28, 28, 3)`, in parallel over clips, cached, logged, with a
picture of the ROIs and the flow of the first clips (`roi_previews/`).

    python -m mexp.extract_flow --config configs/roi.yaml [flow.method=tvl1]
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mexp.util.progress import progress

from mexp import cli
from mexp.tracking.datasets import log_dataset
from mexp.config import Config
from mexp.data import frames as fr
from mexp.data.cache import ClipCache, digest
from mexp.data.datasets import FLOW28, ClipSet, load_dataset, resolve_path
from mexp.flow.optical import FlowError
from mexp.flow.roi import ROIS, NoFaceError, face_flows, locate, motion_job
from mexp.tracking.runs import T, configure, stage_run

log = logging.getLogger(__name__)
STAGE = "extract_flow"
PREVIEWS = 3                     # clips whose ROI picture is logged


def gray(clip: np.ndarray) -> np.ndarray:
    """(T, H, W, C) uint8 -> (T, H, W) grey (ITU-R 601 weights for RGB)."""
    if clip.shape[-1] == 1:
        return clip[..., 0]
    return np.clip(clip @ np.array([0.299, 0.587, 0.114]), 0, 255).astype(np.uint8)


def onset_frame(dcfg, row) -> np.ndarray:
    """A clip's onset frame (its frame 0) in grey at its original size and aspect ratio, as on
    disk: the face is found there, before the clip was resized to `data.image_size` squares."""
    folder = fr.clip_folder(resolve_path(dcfg.root), row.frame_dir, row.dataset, row.clip)
    win = fr.window(fr.list_frames(folder), int(row.onset),
                    None if pd.isna(row.offset) else int(row.offset), folder)
    img = cv2.imread(str(win[0][1]), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise fr.FrameError(f"cannot read image {win[0][1]} (missing or corrupt)")
    return img


def onsets(dcfg, face: str, cs: ClipSet, rows=None) -> list:
    """The original onset frame of each clip (all, or the row indices `rows`); None for
    flow.face=full, which needs no detection."""
    rows = range(len(cs)) if rows is None else rows
    if face == "full":
        return [None for _ in rows]
    table = list(cs.table.itertuples(index=False))
    return [onset_frame(dcfg, table[i]) for i in rows]


def compute(cfg: Config, cs: ClipSet) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(kept ids, roi (N, T, 14), images (N, 28, 28, 3), skipped) over all clips."""
    fcfg = cfg.flow
    originals = onsets(cfg.data, fcfg.face, cs)
    jobs = [(sid, gray(cs.clips[i]), int(cs.apex[i]), fcfg.method, fcfg.face, fcfg.compensate,
             originals[i]) for i, sid in enumerate(cs.table["sample_id"])]
    workers = fcfg.workers or os.cpu_count() or 1
    bar = dict(total=len(jobs), desc=f"flow ({fcfg.method})", unit="clip")
    if workers > 1 and len(jobs) >= 4 * workers:
        # spawned workers (fork deadlocked here under the threads of torch and the tests); the
        # worker function lives in a module that imports only OpenCV, since importing this
        # stage's torch and MLflow in every worker made the pool slower than one process
        # for DIS and Farneback (bench/flow_speed.py, BENCHMARKS.md)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as ex:
            out = list(progress(ex.map(motion_job, jobs, chunksize=4), **bar))
    else:
        out = [motion_job(j) for j in progress(jobs, **bar)]
    skipped = [f"{sid}: {err}" for sid, _, _, err in out if err]
    if skipped and fcfg.no_face == "error":
        raise NoFaceError(skipped[0] + (f" (and {len(skipped) - 1} more clips)" if len(skipped) > 1
                                        else "") + "; flow.no_face=skip skips such clips")
    kept = [o for o in out if o[3] is None]
    if not kept:
        raise NoFaceError("no clip left after face detection")
    return ([o[0] for o in kept], np.stack([o[1] for o in kept]), np.stack([o[2] for o in kept]),
            skipped)


def cached_compute(cfg: Config, cs: ClipSet):
    cache = ClipCache(resolve_path(cfg.data.cache_dir), {"flow": 2})
    key = digest([cs.digest, cfg.flow.method, cfg.flow.face, cfg.flow.compensate,
                  cfg.flow.no_face])
    roi, img, ids = (cache.get(f"{key}-{p}") for p in ("roi", "img", "ids"))
    if roi is not None and img is not None and ids is not None:
        log.info("flow features from the cache (%s)", key)
        return [str(i) for i in ids], roi, img, []
    ids, roi, img, skipped = compute(cfg, cs)
    cache.put(f"{key}-roi", roi), cache.put(f"{key}-img", img)
    cache.put(f"{key}-ids", np.array(ids))                   # written last: marks it complete
    return ids, roi, img, skipped


def log_previews(cfg: Config, cs: ClipSet, ids: list[str]) -> None:
    """`roi_previews/<sample>.png` for the first kept clips: onset frame with landmarks and ROIs,
    and the onset->apex flow (mexp.flow.preview)."""
    from mexp.flow.preview import roi_figure

    rows = cs.subset(ids[:PREVIEWS])
    for i, onset in zip(rows, onsets(cfg.data, cfg.flow.face, cs, rows)):
        frames, apex = gray(cs.clips[i]), int(cs.apex[i])
        onset = frames[0] if onset is None else onset
        sid = str(cs.table["sample_id"].iloc[i])
        try:
            face = locate(onset, cfg.flow.face, sid)
            small = face.scaled(frames.shape[1:3])
            flow = face_flows(frames[[0, apex]], cfg.flow.method, small, cfg.flow.compensate)[1]
        except FlowError as e:                   # a picture is no reason to fail the stage
            log.warning("no ROI preview for %s: %s", sid, e)
            continue
        fig = roi_figure(onset, face, flow, small,
                         f"{sid}  flow.face={cfg.flow.face}  flow.method={cfg.flow.method}")
        mlflow.log_figure(fig, f"roi_previews/{sid.replace('/', '_')}.png")


def main(cfg: Config) -> dict:
    if cfg.data.dataset == FLOW28:
        raise ValueError("data.dataset=megc2019_flow28 is already flow: train_cnn reads it directly")
    configure(cfg)                              # an unreachable server fails before any work
    cs = load_dataset(cfg.data)
    parent = mlflow.active_run()
    tags = {T + "flow_method": cfg.flow.method}
    if parent is not None:
        tags[T + "parent_run_id"] = parent.info.run_id
    with stage_run(cfg, STAGE, tags=tags) as run, tempfile.TemporaryDirectory() as tmp:
        log_dataset(cs.table, cs.digest, cfg.data.dataset)
        ids, roi, img, skipped = cached_compute(cfg, cs)
        if skipped:
            log.warning("skipped %d clip(s) without a face:\n  %s", len(skipped), "\n  ".join(skipped))
        d = Path(tmp) / "flow"
        d.mkdir()
        np.save(d / "roi_features.npy", roi)
        np.save(d / "flow28.npy", img)
        table = cs.table.assign(group=cs.groups).set_index("sample_id").loc[ids].reset_index()
        table.to_csv(d / "index.csv", index=False)
        (d / "meta.json").write_text(json.dumps(
            {"classes": list(cs.classes), "rois": list(ROIS), "method": cfg.flow.method,
             "face": cfg.flow.face, "data_digest": cs.digest, "dataset": cfg.data.dataset,
             "skipped": skipped},
            indent=1))
        mlflow.log_artifacts(str(d), "flow")
        log_previews(cfg, cs, ids)
        mlflow.log_metrics({"clips": len(ids), "skipped": len(skipped)})
        rid = run.info.run_id
    print(f"{STAGE}: {len(ids)} clips -> ROI sequences {tuple(roi.shape)} and flow images "
          f"{tuple(img.shape)} ({cfg.flow.method}); skipped {len(skipped)}; run {rid}")
    return {"run_id": rid, "clips": len(ids), "skipped": len(skipped)}


if __name__ == "__main__":
    cli.run(main, __doc__)
