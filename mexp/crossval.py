"""The cross-validation loop every training stage shares: one nested MLflow run per fold,
resumable after a kill, pooled MEGC metrics and plots on the parent run.

A fold counts as done once its result file `folds/<name>.json` is on the parent run (it is
logged last), so `resume_run_id` recomputes only unfinished folds and the pooled metrics equal
an uninterrupted run's.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from mexp import plots
from mexp.cv import Fold, FoldPlan, FoldPlanError
from mexp.engine import FitResult
from mexp.metrics import breakdown, confusion, scores
from mexp.tracking import T, log_history

log = logging.getLogger(__name__)


@dataclass
class FoldOutput:
    test_ids: list[str]
    probs: np.ndarray            # (n_test, C) class probabilities
    fit: FitResult
    fit_ids: list[str]           # samples the model's weights were fitted on
    select_ids: list[str]        # samples the epoch was selected on (validation subjects)


def assert_no_leak(fold: Fold, out: FoldOutput, subject_of: dict) -> None:
    """Stop the run if a test subject's sample reached fitting or selection."""
    test = set(fold.test_subjects)
    for what, ids in (("fitted", out.fit_ids), ("selected", out.select_ids)):
        bad = sorted({subject_of[i] for i in ids} & test)
        if bad:
            raise FoldPlanError(f"fold {fold.name}: the model was {what} on test subject(s) {bad}")


def _completed(run_id: str) -> dict[str, dict]:
    client = MlflowClient()
    done = {}
    for a in client.list_artifacts(run_id, "folds"):
        if a.path.endswith(".json"):
            with tempfile.TemporaryDirectory() as d:
                p = client.download_artifacts(run_id, a.path, d)
                r = json.loads(Path(p).read_text())
            done[r["fold"]] = r
    return done


def _kill_stale_fold_runs(parent_id: str) -> None:
    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                       "attributes.status = 'RUNNING'"):
        client.set_terminated(r.info.run_id, "KILLED")


def _log_fold(fold: Fold, out: FoldOutput, labels: np.ndarray, classes, stage: str,
              out_dir: Path | None) -> tuple[str, dict]:
    """One nested run: per-epoch metrics, fold scores, confusion matrix, weights, log."""
    preds = out.probs.argmax(1)
    s = scores(labels, preds, len(classes))
    cm = confusion(labels, preds, len(classes))
    with mlflow.start_run(run_name=f"fold={fold.name}", nested=True,
                          tags={T + "stage": f"{stage}:fold", T + "fold": fold.name}) as fr:
        log_history(fr.info.run_id, out.fit.history)
        mlflow.log_metrics({f"test/{k}": v for k, v in s.items()} |
                           {"best_epoch": out.fit.best_epoch})
        mlflow.log_dict({"classes": list(classes), "matrix": cm.tolist()}, "confusion_matrix.json")
        fig = plots.confusion_figure(cm, classes, f"fold {fold.name}")
        mlflow.log_figure(fig, "confusion_matrix.png")
        plots.close(fig)
        with tempfile.TemporaryDirectory() as d:
            torch.save(out.fit.state, Path(d) / "model.pth")
            pd.DataFrame(out.fit.history).to_csv(Path(d) / "training_log.csv", index=False)
            mlflow.log_artifacts(d)
        run_id = fr.info.run_id
    if out_dir is not None:
        fd = out_dir / f"fold_{fold.name}"
        fd.mkdir(parents=True, exist_ok=True)
        torch.save(out.fit.state, fd / "best_model.pth")
        pd.DataFrame(out.fit.history).to_csv(fd / "training_log.csv", index=False)
    return run_id, s


def run_folds(plan: FoldPlan, table: pd.DataFrame, classes, stage: str,
              fold_fn: Callable[[int, Fold], FoldOutput], out_dir: Path | None = None,
              on_fold: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) every fold of `plan` under the active parent run, then log the pooled
    predictions, metrics and plots. `on_fold(k, running_scores)` is called after each fold
    in plan order (HPO reports and prunes there)."""
    parent = mlflow.active_run().info.run_id
    done = _completed(parent)
    if done:
        log.info("resuming: %d of %d folds already complete", len(done), len(plan.folds))
        _kill_stale_fold_runs(parent)
    label_of = dict(zip(table["sample_id"], table["label"].astype(int)))
    subject_of = dict(zip(table["sample_id"], table["subject"]))
    results = []
    for k, fold in enumerate(tqdm(plan.folds, desc=f"{stage} folds", unit="fold")):
        if fold.name in done:
            results.append(done[fold.name])
        else:
            out = fold_fn(k, fold)
            assert_no_leak(fold, out, subject_of)
            y = np.array([label_of[i] for i in out.test_ids])
            run_id, s = _log_fold(fold, out, y, classes, stage, out_dir)
            r = {"fold": fold.name, "fold_run_id": run_id, "test_ids": list(out.test_ids),
                 "probs": out.probs.round(6).tolist(), "best_epoch": out.fit.best_epoch,
                 "selected_on": out.fit.selected_on, "fit_ids": sorted(out.fit_ids),
                 "select_ids": sorted(out.select_ids), "history": out.fit.history,
                 "scores": s}
            mlflow.log_dict(r, f"folds/{fold.name}.json")      # last: marks the fold done
            results.append(r)
        if on_fold is not None:
            on_fold(k, pooled_scores(results, label_of, len(classes)))
    return summarise(results, table, classes, plan, out_dir)


def pooled_scores(results: list[dict], label_of: dict, num_classes: int) -> dict:
    ids = [i for r in results for i in r["test_ids"]]
    preds = np.concatenate([np.asarray(r["probs"]).argmax(1) for r in results]) if ids else []
    return scores([label_of[i] for i in ids], preds, num_classes)


def predictions_table(results: list[dict], table: pd.DataFrame, classes) -> pd.DataFrame:
    rows = []
    meta = table.set_index("sample_id")
    for r in results:
        for sid, p in zip(r["test_ids"], r["probs"]):
            m = meta.loc[sid]
            rows.append({"sample_id": sid, "dataset": m["dataset"], "subject": m["subject"],
                         "fold": r["fold"], "label": int(m["label"]), "pred": int(np.argmax(p)),
                         **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                         "best_epoch": r["best_epoch"], "selected_on": r["selected_on"],
                         "fold_run_id": r["fold_run_id"]})
    return pd.DataFrame(rows)


def summarise(results: list[dict], table: pd.DataFrame, classes, plan: FoldPlan,
              out_dir: Path | None) -> dict:
    """Pooled metrics, per-database and per-subject scores, plots and files on the parent."""
    pred = predictions_table(results, table, classes)
    y, p = pred["label"].to_numpy(), pred["pred"].to_numpy()
    s = scores(y, p, len(classes))
    per_db = breakdown(y, p, pred["dataset"], len(classes)) if pred["dataset"].nunique() > 1 else {}
    per_subject = breakdown(y, p, pred["subject"], len(classes))
    cm = confusion(y, p, len(classes))
    metrics = {f"test/{k}": v for k, v in s.items() if k != "n"}
    metrics |= {f"test/{db}/{k}": v for db, d in per_db.items() for k, v in d.items() if k != "n"}
    mlflow.log_metrics(metrics)
    history = {r["fold"]: r["history"] for r in results}
    log_rows = [{"fold": f, **row} for f, h in history.items() for row in h]
    mlflow.log_dict({"classes": list(classes), "matrix": cm.tolist()}, "confusion_matrix.json")
    mlflow.log_dict({"pooled": s, "per_database": per_db, "per_subject": per_subject},
                    "scores.json")
    for name, fig in (("confusion_matrix.png", plots.confusion_figure(cm, classes, "pooled")),
                      ("learning_curve.png", plots.learning_curve_figure(history, "all folds")),
                      ("per_subject.png", plots.per_subject_figure(per_subject, "per subject"))):
        mlflow.log_figure(fig, name)
        plots.close(fig)
    with tempfile.TemporaryDirectory() as d:
        pred.to_csv(Path(d) / "predictions.csv", index=False)
        pd.DataFrame(log_rows).to_csv(Path(d) / "training_log.csv", index=False)
        mlflow.log_artifacts(d)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        pred.to_csv(out_dir / "predictions.csv", index=False)
        pd.DataFrame(log_rows).to_csv(out_dir / "training_log.csv", index=False)
        plan.save(out_dir / "fold_plan.json")
    return {"uf1": s["uf1"], "uar": s["uar"], "accuracy": s["accuracy"], "n": s["n"],
            "per_database": per_db, "folds": len(results)}
