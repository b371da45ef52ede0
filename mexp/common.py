"""What every training stage does the same way: torch set-up, the fold plan, the dataset
as an MLflow input, local output folders and the one-line summary."""
from __future__ import annotations

import logging
import re
import tempfile
import warnings
from pathlib import Path

import mlflow
import torch

from mexp.config import Config
from mexp.cv import FoldPlan, FoldPlanError, check_plan, make_plan
from mexp.secrets import redact
from mexp.stages import promotable
from mexp.tracking import T, ResumeError, download, upstream_note

log = logging.getLogger(__name__)


def setup_torch(cfg: Config) -> None:
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    if torch.cuda.is_available() and cfg.training.device != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)   # CPU kernels already are


def fold_plan(cfg: Config, ids, groups, labels, databases=None) -> FoldPlan:
    t = cfg.training
    return make_plan(ids, groups, labels, method=t.cv_method, n_folds=t.cv_folds, seed=t.seed,
                     val_fraction=t.val_fraction, databases=databases,
                     holdout_test=t.holdout_test, holdout_train=t.holdout_train)


def log_plan(plan: FoldPlan, sample_ids) -> None:
    """fold_plan.json on the active run, checked against the data first; on a resumed run
    the plan must be the one the run started with."""
    check_plan(plan, sample_ids)
    run = mlflow.active_run()
    have = run.data.tags.get(T + "fold_plan_digest") if run else None
    if have and have != plan.digest:
        raise ResumeError(f"cannot resume run {run.info.run_id}: it was started with fold plan "
                          f"{have}, not {plan.digest}; resume it with the same config and data")
    mlflow.set_tag(T + "fold_plan_digest", plan.digest)
    mlflow.set_tag(T + "cv_method", plan.method)
    mlflow.log_text(plan.to_json(), "fold_plan.json")


def fetch_plan(run_id: str) -> FoldPlan:
    with tempfile.TemporaryDirectory() as d:
        return FoldPlan.load(download(run_id, "fold_plan.json", d))


def log_dataset(table, digest: str, name: str) -> None:
    """The dataset as an MLflow input (name, digest, size) plus its digest as a tag."""
    run = mlflow.active_run()
    have = run.data.tags.get(T + "data_digest") if run else None
    if have and have != digest:
        raise ResumeError(f"cannot resume run {run.info.run_id}: it was started on data {have}, "
                          f"but the data now load as {digest} (frames or sheet changed)")
    cols = [c for c in ("sample_id", "dataset", "subject", "label") if c in table.columns]
    with warnings.catch_warnings():  # MLflow's schema hint about integer columns is noise here
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(table[cols], name=name, digest=digest, targets="label")
        mlflow.log_input(ds, context="training")
    mlflow.set_tags({T + "data_digest": digest, T + "dataset": name, T + "n_samples": len(table)})
    fixes = table.attrs.get("annotation_fixes") or []
    mlflow.set_tag(T + "annotation_fixes", len(fixes))
    if fixes:
        mlflow.log_dict(fixes, "annotation_fixes.json")
    mismatch = table.attrs.get("gt_mismatch")
    if mismatch:                        # data.accept_gt_mismatch: the differences, on the run
        mlflow.set_tag(T + "gt_mismatch", len(mismatch) if hasattr(mismatch, "__len__") else 1)
        mlflow.log_dict(mismatch if isinstance(mismatch, (dict, list)) else str(mismatch),
                        "gt_mismatch.json")


def out_dir(cfg: Config) -> Path | None:
    return Path(cfg.output.dir) if cfg.output.local else None


PROMOTABLE = promotable()                   # from the stage table


def where_to_look(run_id: str) -> str:
    """How to open a run: its page on a tracking server, else `mlflow ui` on the local store
    (credentials never printed)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient
        exp = MlflowClient().get_run(run_id).info.experiment_id
        base = re.sub(r"//[^/@]*@", "//", uri).rstrip("/")   # a browser logs in by itself
        return f"open it at {base}/#/experiments/{exp}/runs/{run_id}"
    return f"see it with: mlflow ui --backend-store-uri {redact(uri)}"


def next_steps(stage: str, run_id: str) -> str:
    """The commands a user runs next on this run, with its id filled in."""
    steps = [f"python -m mexp.evaluate --run-id {run_id}"]
    if stage.split(":")[0] in PROMOTABLE:
        steps.append(f"python -m mexp.promote promote.run_id={run_id}")
    return "next: " + "  |  ".join(steps) + f"  |  {where_to_look(run_id)}"


def summary_line(stage: str, s: dict, run_id: str, extra: str = "") -> str:
    """The stage's one-line result, then a line of next steps with the real ids."""
    if upstream_note():
        extra += f"; input: {upstream_note()}"
    if s.get("oracle"):
        extra += " -- ORACLE: epochs chosen on the test subjects, not an honest estimate"
    line = (f"{stage}: UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  accuracy {s['accuracy']:.4f} "
            f"over {s['folds']} folds ({s['n']} clips); run {run_id}{extra}")
    return line + "\n" + next_steps(stage, run_id)


def run_repeats(cfg: Config, main_fn, stage: str) -> dict:
    """The whole cross-validation `cfg.repeats` times with seeds s, s+1, ... as nested runs;
    mean and sd of UF1/UAR/accuracy (pooled and per database) on the parent, and the seed
    ensemble: every sample's class probabilities averaged over the repeats (each repeat's
    prediction for a sample comes from a model that never saw its subject, so the average
    is as honest as its parts), scored as ensemble/*."""
    import copy

    import numpy as np

    from mexp.tracking import stage_run
    n, s0 = cfg.repeats, cfg.training.seed
    with stage_run(cfg, f"{stage}:repeats", run_name=f"{stage} x{n}",
                   tags={T + "repeats": str(n)}) as run:
        results = []
        for i in range(n):
            c = copy.deepcopy(cfg)
            c.repeats, c.training.seed = 1, s0 + i
            results.append(main_fn(c))
        agg = {}
        for k in ("uf1", "uar", "accuracy"):
            v = np.array([r[k] for r in results], float)
            agg[k] = (float(v.mean()), float(v.std(ddof=1)) if n > 1 else 0.0)
        metrics = {f"repeats/{k}_{w}": x for k, (m, sd) in agg.items()
                   for w, x in (("mean", m), ("sd", sd))}
        for db in sorted(set().union(*(r.get("per_database", {}) for r in results))):
            for k in ("uf1", "uar"):
                v = np.array([r["per_database"][db][k] for r in results], float)
                metrics[f"repeats/{db}/{k}_mean"] = float(v.mean())
                metrics[f"repeats/{db}/{k}_sd"] = float(v.std(ddof=1)) if n > 1 else 0.0
        mlflow.log_metrics(metrics)
        mlflow.set_tag(T + "repeat_run_ids", ",".join(r["run_id"] for r in results))
        ens = seed_ensemble([r["run_id"] for r in results]) if n > 1 else None
        rid = run.info.run_id
    print(f"{stage} x{n} seeds {s0}..{s0 + n - 1}: " + "  ".join(
        f"{k.upper() if k != 'accuracy' else 'accuracy'} {m:.4f} ± {sd:.4f}"
        for k, (m, sd) in agg.items()) + (f"; ensemble of {n}: UF1 {ens['uf1']:.4f} UAR "
                                          f"{ens['uar']:.4f}" if ens else "") + f"; run {rid}")
    print(next_steps(stage, rid))
    return {"run_id": rid, "repeats": results,
            **{k: m for k, (m, _) in agg.items()}, **{f"{k}_sd": sd for k, (_, sd) in agg.items()},
            **({"ensemble": ens} if ens else {})}


def seed_ensemble(run_ids: list[str]) -> dict:
    """Average the repeats' predictions.csv probabilities per sample; log the pooled and
    per-database scores (ensemble/*), the confusion matrix and ensemble_predictions.csv on
    the active run."""
    import numpy as np
    import pandas as pd

    from mexp import plots
    from mexp.evaluate import expected_metrics, recompute

    with tempfile.TemporaryDirectory() as d:
        preds = [pd.read_csv(download(r, "predictions.csv", Path(d) / r)).sort_values("sample_id")
                 .reset_index(drop=True) for r in run_ids]
    base = preds[0]
    for r, p in zip(run_ids[1:], preds[1:]):
        if not p["sample_id"].equals(base["sample_id"]):
            raise FoldPlanError(f"repeat run {r} predicted other samples than {run_ids[0]}")
    cols = [c for c in base.columns if c.startswith("prob_")]
    probs = np.mean([p[cols].to_numpy(float) for p in preds], axis=0)
    out = base[["sample_id", "dataset", "subject", "label"]].assign(pred=probs.argmax(1))
    for c, v in zip(cols, probs.T):
        out[c] = v
    classes = [c.removeprefix("prob_") for c in cols]
    report = recompute(out, classes)          # the same code `mexp.evaluate` checks it with
    mlflow.log_metrics(expected_metrics(report, "ensemble"))
    mlflow.log_figure(plots.confusion_figure(np.array(report["confusion"]), classes,
                                             f"ensemble of {len(run_ids)} seeds"),
                      "ensemble_confusion_matrix.png")
    with tempfile.TemporaryDirectory() as d:
        out.to_csv(Path(d) / "ensemble_predictions.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "ensemble_predictions.csv"))
    s = report["pooled"]
    return {**{m: s[m] for m in ("uf1", "uar", "accuracy")},
            "per_database": report["per_database"], "members": len(run_ids)}


def fold_workers(cfg: Config) -> int:
    """training.fold_workers, with 0 meaning one process per CPU core (or 1 on a GPU, where
    folds in parallel would only queue on the one device)."""
    import os

    from mexp.engine import resolve_device
    n = cfg.training.fold_workers
    if n < 0:
        raise ValueError(f"training.fold_workers must be >= 0, got {n}")
    if n == 0:
        n = 1 if resolve_device(cfg.training.device).type == "cuda" else (os.cpu_count() or 1)
    return n


def cross_validate(cfg: Config, stage: str, run, plan: FoldPlan, table, digest: str,
                   dataset: str, classes, fold_fn) -> dict:
    """Inside a stage's run: the dataset input and fold plan, every fold, the pooled summary.
    `table` needs sample_id, dataset, label and `group` (the CV subject) columns."""
    from mexp.crossval import run_folds
    log_dataset(table, digest, dataset)
    log_plan(plan, table["sample_id"])
    summary = run_folds(plan, table.assign(subject=table["group"]), classes, stage, fold_fn,
                        out_dir(cfg), oracle=cfg.evaluation.oracle,
                        workers=fold_workers(cfg))
    summary["run_id"] = run.info.run_id
    return summary
