"""Score published per-subject checkpoints (one LOSO model per test subject) on a dataset, as a
tracked `evaluate_checkpoints` run, through the same metric code as every stage.

    python -m mexp.evaluate --checkpoints DIR --model ststnet_original \
        --config configs/megc2019_flow.yaml [--channel-order bgr|rgb] [--allow-partial]

Each subject's samples are predicted by that subject's own file: `DIR/<subject>.pth` (the
authors' naming: `sub01.pth`, `006.pth`, `s01.pth`) or `DIR/<dataset>/<subject>.pth` where
subject names repeat across databases. A file is a plain state_dict loaded with strict=True.
A missing subject stops the run unless `allow_partial` is set. Channel order (`bgr`: the
authors read the PNGs with cv2.imread; `rgb`: as stored) and pixel scale (`raw`: float 0..255,
as the authors; `standard`: mexp's (x - 127.5) / 64) are explicit and logged.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from mexp.tracking import plots
from mexp.config import Config
from mexp.data.datasets import ClipSet, load_dataset, resolve_path
from mexp.data.inputs import images_to_tensor
from mexp.engine.training import predict_proba, resolve_device
from mexp.tracking.evaluation import expected_metrics, recompute, render
from mexp.tracking.runs import T, stage_run, start
from mexp.models.build import build_cnn
from mexp.data.inputs import images

log = logging.getLogger(__name__)
STAGE = "evaluate_checkpoints"
CHANNEL_ORDERS = ("bgr", "rgb")
PIXEL_SCALES = ("raw", "standard")
SUFFIX = ".pth"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another layout (names the file)."""


def raw_tensor(x: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float 0..255, as the authors' torch.Tensor(img)."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 3, 1, 2)


TO_INPUT = {"raw": raw_tensor, "standard": images_to_tensor}


def model_images(cfg: Config, cs: ClipSet, channel_order: str) -> np.ndarray:
    """One image per sample (the apex frame, after data.input as in train_cnn), (N, H, W, C)
    uint8 in `channel_order`. The data layer gives RGB; 'bgr' reverses the channels as
    cv2.imread would (for flow images: strain, v, u)."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel order {channel_order!r} is not one of {list(CHANNEL_ORDERS)}")
    x = images(cfg, cs)[np.arange(len(cs)), cs.apex]
    if channel_order == "bgr":
        if x.shape[-1] != 3:
            raise ValueError(f"channel order bgr needs 3-channel images, the data have "
                             f"{x.shape[-1]}")
        x = x[..., ::-1]
    return np.ascontiguousarray(x)


def find_checkpoints(ckpt_dir: Path, table: pd.DataFrame) -> tuple[dict, list[str]]:
    """(group -> file, missing groups) for the LOSO groups of `table` (dataset, subject,
    group columns). `<dataset>/<subject>.pth` or `<subject>.pth`; both present is an error,
    and so is a bare `<subject>.pth` whose name is a subject in two databases."""
    found, missing = {}, []
    subjects = table.drop_duplicates("group")
    dbs_of = subjects.groupby("subject")["dataset"].agg(lambda s: sorted(set(s)))
    for row in subjects.itertuples(index=False):
        specific = ckpt_dir / row.dataset / f"{row.subject}{SUFFIX}"
        bare = ckpt_dir / f"{row.subject}{SUFFIX}"
        if specific.is_file() and bare.is_file():
            raise CheckpointError(f"subject {row.group}: both {specific} and {bare} exist; "
                                  "keep one")
        if specific.is_file():
            found[row.group] = specific
        elif bare.is_file() and len(dbs_of[row.subject]) > 1:
            raise CheckpointError(f"{bare} is ambiguous: subject {row.subject!r} is in databases "
                                  f"{dbs_of[row.subject]}; name the files "
                                  f"<dataset>/{row.subject}{SUFFIX}")
        elif bare.is_file():
            found[row.group] = bare
        else:
            missing.append(row.group)
    return found, missing


def missing_message(ckpt_dir: Path, missing: list[str], table: pd.DataFrame) -> str:
    subj = dict(zip(table["group"], table["subject"]))
    names = ", ".join(f"{g} ({subj[g]}{SUFFIX})" for g in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    have = sorted(p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob(f"*{SUFFIX}"))
    return (f"no checkpoint for {len(missing)} of {table['group'].nunique()} subject(s) in "
            f"{ckpt_dir}: {names}{more}. Files are named <subject>{SUFFIX} (or "
            f"<dataset>/<subject>{SUFFIX}); the folder holds {len(have)} {SUFFIX} file(s)"
            f"{' e.g. ' + ', '.join(have[:5]) if have else ''}. Pass --allow-partial to score "
            "only the subjects that have one")


def load_weights(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load a plain state_dict in exactly the model's key layout (strict); any other file is
    an error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or a pickled object, not weights
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"cannot read checkpoint {path} as a torch state_dict: "
                              f"{type(e).__name__}: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit model '{name}': missing key(s) "
                              f"{missing[:8]}, unexpected key(s) {unexpected[:8]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = "; ".join(s.strip() for s in str(e).splitlines()[1:4])
        raise CheckpointError(f"checkpoint {path} does not fit model '{name}': {detail}") from None


def predict(cfg: Config, cs: ClipSet, x: np.ndarray, files: dict, ckpt_dir: Path,
            pixel_scale: str) -> pd.DataFrame:
    """predictions.csv rows (table order) for every sample of a subject with a checkpoint,
    each predicted by its own subject's model."""
    device = resolve_device(cfg.training.device)
    t, groups = cs.table, cs.table["group"].to_numpy()
    probs = np.full((len(t), len(cs.classes)), np.nan)
    for group, path in files.items():
        idx = np.flatnonzero(groups == group)
        model = build_cnn(cfg, x.shape[-1], len(cs.classes))   # as train_cnn builds it
        load_weights(model, path, cfg.model.name)
        probs[idx] = predict_proba(model.to(device), x[idx], TO_INPUT[pixel_scale],
                                   cfg.training.batch_size, device)
    keep = np.flatnonzero(t["group"].isin(list(files)).to_numpy())
    pred = pd.DataFrame({"sample_id": t["sample_id"], "dataset": t["dataset"], "subject": groups,
                         "fold": groups, "label": t["label"].astype(int)}).iloc[keep]
    pred["pred"] = probs[keep].argmax(1)
    for c, col in zip(cs.classes, probs[keep].T):
        pred[f"prob_{c}"] = col
    pred["checkpoint"] = [files[g].relative_to(ckpt_dir).as_posix() for g in pred["fold"]]
    return pred.reset_index(drop=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_results(pred: pd.DataFrame, classes, manifest: dict) -> dict:
    """Metrics (test/*, pooled and per database) from predictions.csv by `evaluate.recompute`
    (what `python -m mexp.evaluate --run-id` checks), plus the files, on the active run."""
    report = recompute(pred, classes)
    mlflow.log_metrics(expected_metrics(report, "test"))
    cm = np.array(report["confusion"])
    mlflow.log_dict({"classes": list(classes), "matrix": report["confusion"]},
                    "confusion_matrix.json")
    mlflow.log_dict({k: report[k] for k in ("pooled", "per_database", "per_subject", "per_class")},
                    "scores.json")
    mlflow.log_dict(manifest, "checkpoints.json")
    mlflow.log_figure(plots.confusion_figure(cm, classes, "published checkpoints"),
                      "confusion_matrix.png")
    with tempfile.TemporaryDirectory() as d:
        pred.to_csv(Path(d) / "predictions.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "predictions.csv"))
    return report


def log_inputs(cs: ClipSet, cfg: Config) -> None:
    """The scored samples as an MLflow input (context 'evaluation')."""
    cols = ["sample_id", "dataset", "subject", "label"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mlflow.log_input(mlflow.data.from_pandas(cs.table[cols], name=cfg.data.dataset,
                                                 digest=cs.digest, targets="label"),
                         context="evaluation")


def resolve_files(ckpt_dir: Path, table: pd.DataFrame, allow_partial: bool) -> tuple[dict, list]:
    """find_checkpoints, then: missing subjects stop here unless `allow_partial` (and at least
    one is found); files that match no subject are logged (a naming mismatch shows there)."""
    files, missing = find_checkpoints(ckpt_dir, table)
    if missing and (not allow_partial or not files):
        raise CheckpointError(missing_message(ckpt_dir, missing, table))
    if missing:
        log.warning("--allow-partial: %d subject(s) without a checkpoint are left out: %s",
                    len(missing), ", ".join(missing))
    unused = sorted(set(ckpt_dir.rglob(f"*{SUFFIX}")) - set(files.values()))
    if unused:
        log.warning("%d %s file(s) in %s match no subject of the data: %s", len(unused), SUFFIX,
                    ckpt_dir, ", ".join(p.relative_to(ckpt_dir).as_posix() for p in unused[:10]))
    return files, missing


def log_run(cfg, cs, pred, ckpt_dir, files, missing, channel_order, pixel_scale) -> dict:
    """The evaluate_checkpoints run: tags and params saying what was fed, the checkpoints' hashes,
    metrics and files; then the report and the one-line summary."""
    manifest = {"dir": str(ckpt_dir), "model": cfg.model.name,
                "files": {g: {"file": p.relative_to(ckpt_dir).as_posix(), "sha256": sha256(p)}
                          for g, p in files.items()}, "missing": missing}
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:16]
    tags = {T + "model": cfg.model.name, T + "channel_order": channel_order,
            T + "pixel_scale": pixel_scale, T + "cv_method": "LOSO", T + "data_digest": cs.digest,
            T + "dataset": cfg.data.dataset, T + "checkpoints_digest": digest,
            T + "partial": str(bool(missing)).lower()}
    with stage_run(cfg, STAGE, run_name=f"checkpoints {ckpt_dir.name}", tags=tags) as run:
        mlflow.log_params({"checkpoints.dir": str(ckpt_dir),
                           "checkpoints.channel_order": channel_order,
                           "checkpoints.pixel_scale": pixel_scale, "checkpoints.files": len(files),
                           "checkpoints.missing_subjects": len(missing)})
        log_inputs(cs, cfg)
        report = log_results(pred, cs.classes, manifest)
        rid = run.info.run_id
    print(render(report))
    s = report["pooled"]
    partial = (f"; PARTIAL: {len(missing)} subject(s) without a checkpoint left out"
               if missing else "")
    print(f"{STAGE}: UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  accuracy {s['accuracy']:.4f} over "
          f"{len(files)} subject checkpoints ({s['n']} samples; channel order {channel_order}, "
          f"pixel scale {pixel_scale}){partial}; run {rid}")
    return {"run_id": rid, **{k: s[k] for k in ("uf1", "uar", "accuracy", "n")},
            "per_database": report["per_database"], "subjects": len(files), "missing": missing,
            "channel_order": channel_order, "pixel_scale": pixel_scale}


def main(cfg: Config, checkpoints: str, channel_order: str = "bgr", pixel_scale: str = "raw",
         allow_partial: bool = False) -> dict:
    """Score the checkpoints in `checkpoints` (one per LOSO subject) on `cfg.data`; everything
    that can fail (data, files, layouts) fails before the run is opened."""
    if pixel_scale not in PIXEL_SCALES:
        raise ValueError(f"pixel scale {pixel_scale!r} is not one of {list(PIXEL_SCALES)}")
    if not cfg.model.name:
        raise ValueError("name the checkpoints' model: --model <registry name> "
                         "(e.g. ststnet_original)")
    ckpt_dir = resolve_path(checkpoints).absolute()
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {ckpt_dir} is not a folder")
    cfg = copy.deepcopy(cfg)
    start(cfg)                                   # an unreachable server fails first
    if hasattr(cfg.data, "channel_order"):
        cfg.data.channel_order = "rgb"               # load as stored: the order is applied here
    cs = load_dataset(cfg.data)
    cs.table = cs.table.assign(group=cs.groups)
    x = model_images(cfg, cs, channel_order)
    files, missing = resolve_files(ckpt_dir, cs.table, allow_partial)
    pred = predict(cfg, cs, x, files, ckpt_dir, pixel_scale)
    if hasattr(cfg.data, "channel_order"):
        cfg.data.channel_order = channel_order       # the logged config says what was fed
    return log_run(cfg, cs, pred, ckpt_dir, files, missing, channel_order, pixel_scale)
