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
import time
from contextlib import contextmanager
from contextvars import ContextVar
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mexp.progress import progress

from mexp import plots
from mexp.cv import Fold, FoldPlan, FoldPlanError, check_plan
from mexp.data.paths import safe_name
from mexp.fold_pool import fold_outputs
from mexp.logged_models import create_fold_model
from mexp.engine import FitResult, fit, predict_proba, resolve_device, set_seed
from mexp.metrics import breakdown, confusion, scores
from mexp.tracking import T, log_history

log = logging.getLogger(__name__)
_ON_FOLD: ContextVar[Callable | None] = ContextVar("mexp_on_fold", default=None)


@contextmanager
def fold_callback(fn: Callable[[int, dict], None]):
    """Call `fn(k, running_scores)` after each fold of the stages run inside (HPO pruning)."""
    token = _ON_FOLD.set(fn)
    try:
        yield
    finally:
        _ON_FOLD.reset(token)


@dataclass
class FoldOutput:
    test_ids: list[str]
    probs: np.ndarray            # (n_test, C) class probabilities
    fit: FitResult
    fit_ids: list[str]           # samples the model's weights were fitted on
    select_ids: list[str]        # samples the epoch was selected on (validation subjects)
    example: np.ndarray | None = None   # one input batch (1, ...) as the network takes it


def fit_and_score(cfg, k: int, fold: Fold, make_model: Callable, train: tuple, val: tuple,
                  x_test, ids: tuple, to_input, augment=None) -> FoldOutput:
    """The fold recipe every stage shares: a seeded model, fitted on `train` with epochs
    selected on `val` (if it has samples), class probabilities on `x_test`.
    `ids` = (test ids, ids fitted on, ids selected on), recorded for the leak check."""
    set_seed(cfg.training.seed + k)
    model = make_model()
    res = fit(model, train, val if len(val[1]) else None, cfg.training, model.num_classes,
              to_input, augment, seed=cfg.training.seed + k, desc=f"fold {fold.name}")
    probs = predict_proba(model, x_test, to_input, cfg.training.batch_size,
                          resolve_device(cfg.training.device))
    test_ids, fit_ids, select_ids = ids
    example = to_input(x_test[:1]).cpu().numpy()         # the fold LoggedModel's input example
    return FoldOutput(list(test_ids), probs, res, list(fit_ids), list(select_ids), example)


def assert_no_leak(fold: Fold, out: FoldOutput, subject_of: dict) -> None:
    """Stop the run if a test subject's sample reached fitting or selection."""
    test = set(fold.test_subjects)
    for what, ids in (("fitted", out.fit_ids), ("selected", out.select_ids)):
        bad = sorted({subject_of[i] for i in ids} & test)
        if bad:
            raise FoldPlanError(f"fold {fold.name}: the model was {what} on test subject(s) {bad}")


def fold_results(run_id: str) -> list[dict]:
    """Every fold result file (`folds/<name>.json`) on a stage run. Composite data have fold
    names like `casme2/sub01`, so the files can sit in sub-folders."""
    client = MlflowClient()
    if not client.list_artifacts(run_id, "folds"):
        return []
    with tempfile.TemporaryDirectory() as d:
        root = Path(client.download_artifacts(run_id, "folds", d))
        return [json.loads(p.read_text()) for p in sorted(root.rglob("*.json"))]


def _completed(run_id: str) -> dict[str, dict]:
    return {r["fold"]: r for r in fold_results(run_id)}


def _kill_stale_fold_runs(parent_id: str) -> None:
    """Fold runs (and anything under them) left RUNNING by a killed process become KILLED."""
    from mexp.tracking import terminate_children
    n = terminate_children(parent_id)
    if n:
        log.info("marked %d stale run(s) under %s KILLED", n, parent_id)


class FoldLogger:
    """Logs each finished fold in a background thread (MLflow client calls with explicit run
    ids, so no fluent state crosses threads) while the next fold trains. `drain()` waits for
    everything and re-raises a logging error."""

    def __init__(self, parent_id: str, stage: str, classes, out_dir: Path | None):
        self.client, self.parent, self.stage = MlflowClient(), parent_id, stage
        self.exp = self.client.get_run(parent_id).info.experiment_id
        self.classes, self.out_dir = list(classes), out_dir
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fold-logger")
        self.pending: dict[str, Future] = {}

    def submit(self, fold: Fold, out: FoldOutput, labels: np.ndarray) -> None:
        self.pending[fold.name] = self.pool.submit(self._log, fold, out, labels)

    def check(self) -> None:
        """Re-raise the first logging error now (a lost tracking server), not after every
        remaining fold has trained."""
        for f in self.pending.values():
            if f.done() and f.exception() is not None:
                raise f.exception()

    def drain(self) -> dict[str, dict]:
        """Fold name -> the result logged for it, once everything is logged."""
        return {name: f.result() for name, f in self.pending.items()}

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _log(self, fold: Fold, out: FoldOutput, labels: np.ndarray) -> dict:
        """Fold run (per-epoch metrics, scores, confusion matrix, weights, log), then the
        result file on the parent, last: it marks the fold done for resume."""
        c, preds = self.client, out.probs.argmax(1)
        s = scores(labels, preds, len(self.classes))
        cm = confusion(labels, preds, len(self.classes))
        run = c.create_run(self.exp, run_name=f"fold={fold.name}",
                           tags={"mlflow.parentRunId": self.parent,
                                 T + "stage": f"{self.stage}:fold", T + "fold": fold.name})
        rid = run.info.run_id
        log_history(rid, out.fit.history)
        model_id, link = create_fold_model(c, run, self.parent, self.stage, fold.name, out,
                                           self.classes)      # a LoggedModel, metrics linked
        now = int(time.time() * 1000)
        c.log_batch(rid, metrics=[Metric(f"test/{k}", float(v), now, 0, **link)
                                  for k, v in s.items()]
                    + [Metric("best_epoch", float(out.fit.best_epoch), now, 0, **link)])
        c.log_dict(rid, {"classes": self.classes, "matrix": cm.tolist()}, "confusion_matrix.json")
        c.log_figure(rid, plots.confusion_figure(cm, self.classes, f"fold {fold.name}"),
                     "confusion_matrix.png")
        with tempfile.TemporaryDirectory() as d:
            torch.save(out.fit.state, Path(d) / "model.pth")
            pd.DataFrame(out.fit.history).to_csv(Path(d) / "training_log.csv", index=False)
            c.log_artifacts(rid, d)        # model.pth here too: extract_features and refit read it
        c.finalize_logged_model(model_id, "READY")
        c.set_terminated(rid, "FINISHED")
        if self.out_dir is not None:
            fd = self.out_dir / f"fold_{safe_name(fold.name)}"   # casme2/sub01: one folder
            fd.mkdir(parents=True, exist_ok=True)
            torch.save(out.fit.state, fd / "best_model.pth")
            pd.DataFrame(out.fit.history).to_csv(fd / "training_log.csv", index=False)
        result = {"fold": fold.name, "fold_run_id": rid, "test_ids": list(out.test_ids),
                  "probs": out.probs.round(6).tolist(), "best_epoch": out.fit.best_epoch,
                  "selected_on": out.fit.selected_on, "fit_ids": sorted(out.fit_ids),
                  "select_ids": sorted(out.select_ids), "history": out.fit.history, "scores": s}
        c.log_dict(self.parent, result, f"folds/{fold.name}.json")
        return result


def run_folds(plan: FoldPlan, table: pd.DataFrame, classes, stage: str,
              fold_fn: Callable[[int, Fold], FoldOutput], out_dir: Path | None = None,
              on_fold: Callable[[int, dict], None] | None = None, oracle: bool = False,
              workers: int = 1) -> dict:
    """Run (or resume) every fold of `plan` under the active parent run, then log the pooled
    predictions, metrics and plots. `on_fold(k, running_scores)` is called after each fold
    in plan order (HPO reports and prunes there). `oracle=True` selects epochs on the test
    fold, as some papers do: the run is tagged and its metrics are logged as oracle/*.
    `workers > 1` trains that many folds at once in worker processes (`mexp.fold_pool`)."""
    parent = mlflow.active_run().info.run_id
    check_plan(plan, table["sample_id"])        # safeguard: no subject/database on two sides
    if oracle:
        mlflow.set_tag(T + "oracle", "true")
        log.warning("evaluation.oracle=true: epochs are chosen on the TEST subjects; the "
                    "metrics are logged as oracle/* and are not honest estimates")
    on_fold = on_fold or _ON_FOLD.get()
    done = _completed(parent)
    if done:
        log.info("resuming: %d of %d folds already complete", len(done), len(plan.folds))
    _kill_stale_fold_runs(parent)          # a resumed run's in-flight folds died with it
    label_of = dict(zip(table["sample_id"], table["label"].astype(int)))
    subject_of = dict(zip(table["sample_id"], table["subject"]))
    results: dict[str, dict] = dict(done)
    logger = FoldLogger(parent, stage, classes, out_dir)
    if oracle:
        def run_fold(k, fold, fn=fold_fn):
            return fn(k, replace(fold, val_ids=fold.test_ids, val_subjects=fold.test_subjects))
    else:
        run_fold = fold_fn
    todo = [(k, f) for k, f in enumerate(plan.folds) if f.name not in done]
    outputs = fold_outputs(run_fold, todo, workers)
    try:
        for k, fold in enumerate(progress(plan.folds, desc=f"{stage} folds", unit="fold")):
            if fold.name not in done:
                k_out, fold_out, out = next(outputs)
                assert (k_out, fold_out.name) == (k, fold.name)
                if not oracle:
                    assert_no_leak(fold, out, subject_of)
                y = np.array([label_of[i] for i in out.test_ids])
                logger.submit(fold, out, y)
                logger.check()
                results[fold.name] = {"fold": fold.name, "test_ids": list(out.test_ids),
                                      "probs": out.probs.tolist()}
            if on_fold is not None:
                so_far = [results[f.name] for f in plan.folds[:k + 1]]
                on_fold(k, pooled_scores(so_far, label_of, len(classes)))
        results.update(logger.drain())     # the pooled metrics come from what was logged
    finally:
        outputs.close()                    # cancels folds not started (e.g. a pruned trial)
        logger.close()
    results = [results[f.name] for f in plan.folds]
    return summarise(results, table, classes, plan, out_dir, "oracle" if oracle else "test")


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
              out_dir: Path | None, prefix: str = "test") -> dict:
    """Pooled metrics, per-database and per-subject scores, plots and files on the parent."""
    pred = predictions_table(results, table, classes)
    y, p = pred["label"].to_numpy(), pred["pred"].to_numpy()
    s = scores(y, p, len(classes))
    per_db = breakdown(y, p, pred["dataset"], len(classes)) if pred["dataset"].nunique() > 1 else {}
    per_subject = breakdown(y, p, pred["subject"], len(classes))
    cm = confusion(y, p, len(classes))
    metrics = {f"{prefix}/{k}": v for k, v in s.items() if k != "n"}
    metrics |= {f"{prefix}/{db}/{k}": v for db, d in per_db.items() for k, v in d.items() if k != "n"}
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
            "per_database": per_db, "folds": len(results), "oracle": prefix == "oracle"}
