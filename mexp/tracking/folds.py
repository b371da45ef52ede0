"""Fold logging: one nested MLflow run per fold (metrics, confusion matrix, weights, a
LoggedModel), resumable after a kill, and the pooled MEGC metrics and plots on the parent run.
The loop itself is `mexp.engine.crossval.run_plan`; `FoldLogger` is its recorder.

A fold counts as done once its result file `folds/<name>.json` is on the parent run (it is
logged last), so `resume_run_id` recomputes only unfinished folds and the pooled metrics equal
an uninterrupted run's.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from mexp.config import Config
from mexp.data.datasets import load_dataset
from mexp.data.inputs import check_channels, images
from mexp.data.paths import safe_name
from mexp.engine.batching import STEP_PATHS, choose
from mexp.engine.crossval import FoldOutput, predictions_table, run_plan
from mexp.engine.metrics import breakdown, confusion, scores
from mexp.engine.nested import NestedFolds
from mexp.engine.plans import Fold, FoldPlan, check_plan
from mexp.engine.setup import fold_plan, fold_workers
from mexp.engine.training import resolve_device
from mexp.tracking import plots
from mexp.tracking.datasets import log_dataset, log_plan
from mexp.tracking.logged_models import (artifact_repo, fail_pending_models, late_params,
                                         open_fold_model, save_fold_model)
from mexp.tracking.runs import (T, history_metrics, log_metric_list, stage_run, start,
                               terminate_tree)
from mexp.tracking.summary import summary_line

log = logging.getLogger(__name__)


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
    """Fold runs (and anything under them) left RUNNING by a killed process become KILLED,
    and their still-PENDING LoggedModels FAILED."""
    client = MlflowClient()
    ended = terminate_tree(client, parent_id, root=False)
    if ended:
        exp = client.get_run(parent_id).info.experiment_id
        n = fail_pending_models(client, exp, ended)
        log.info("marked %d stale run(s) under %s KILLED (%d pending model(s) FAILED)",
                 len(ended), parent_id, n)


def log_workers(setting: int, batched: bool) -> int:
    """Processes that log the fold runs (`tracking.log_workers`; 0: auto). Logging a fold is
    ~70-110 ms of Python in MLflow's client and store, one thread at a time under the GIL, so
    a batched run, whose folds all finish at once, logs them in processes on a machine with
    cores to spare (up to 4, leaving 2); otherwise one thread beside the training."""
    if setting:
        return int(setting)
    cpus = os.cpu_count() or 1
    return max(1, min(4, cpus - 2)) if batched and cpus >= 4 else 1


class FoldLogger:
    """Logs each finished fold in the background (MLflow client calls with explicit run ids,
    so no fluent state crosses threads) while the next fold trains: in one thread, or with
    `processes` > 1 in that many worker processes (each its own client on the same tracking
    URI). `drain()` waits for everything and re-raises a logging error."""

    def __init__(self, parent_id: str, stage: str, classes, out_dir: Path | None,
                 processes: int = 1, experiment_id: str | None = None):
        self.client, self.parent, self.stage = MlflowClient(), parent_id, stage
        self.exp = experiment_id or self.client.get_run(parent_id).info.experiment_id
        self.classes, self.out_dir = list(classes), out_dir
        self.processes, self._starting, self._start_error = processes, None, None
        if processes > 1:       # the processes start (seconds: imports) while the folds train
            self.pool = None
            self._starting = threading.Thread(target=self._start, args=(mlflow.get_tracking_uri(),),
                                              name="fold-logger-start", daemon=True)
            self._starting.start()
        else:       # 0: inside a worker process, which logs in its own thread
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="fold-logger") if processes else None
        self.pending: dict[str, Future] = {}
        self.made: dict[str, Future] = {}       # fold name -> its run and model, opened early
        self._preparing: threading.Thread | None = None

    def prepare(self, folds: list[Fold]) -> None:
        """Open the fold runs and their LoggedModels now, while the folds train, by whoever
        logs (the thread or the processes): a batched run's folds all finish at once, and
        opening one is about a quarter of logging it. Each run starts RUNNING with its tags; one
        never logged is ended KILLED by `close` (or, after a kill, by the resume)."""
        spec, starting = self._spec(), self._starting

        def go():
            if starting is not None:        # the processes' start (`submit` clears the field)
                starting.join()
            if self.pool is None:
                return                  # the start failed: `submit` says why
            for f in folds:
                if self.processes > 1:
                    self.made[f.name] = self.pool.submit(_open_in_worker, spec, f.name)
                else:
                    self.made[f.name] = self.pool.submit(self._open, f.name)
        self._preparing = threading.Thread(target=go, name="fold-logger-prepare", daemon=True)
        self._preparing.start()

    def _spec(self) -> tuple:
        out_dir = None if self.out_dir is None else Path(self.out_dir).absolute()
        return (self.parent, self.stage, tuple(self.classes), out_dir, self.exp)

    def _open(self, name: str, params: dict | None = None) -> tuple[str, str, str, str]:
        """A fold's run and PENDING LoggedModel (with `params`): (run id, its artifact URI,
        model id, the model's artifact location)."""
        c = self.client
        run = c.create_run(self.exp, run_name=f"fold={name}", tags={
            "mlflow.parentRunId": self.parent, T + "stage": f"{self.stage}:fold", T + "fold": name})
        try:
            lm = open_fold_model(c, self.exp, run.info.run_id, self.parent, self.stage, name,
                                 len(self.classes), params)
        except BaseException:
            c.set_terminated(run.info.run_id, "FAILED")
            raise
        return run.info.run_id, run.info.artifact_uri, lm.model_id, lm.artifact_location

    def _start(self, uri: str) -> None:
        try:
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload(["mexp.tracking.folds"])
            else:                           # Windows: each worker imports for itself
                ctx = multiprocessing.get_context("spawn")
            # the environment as it is now (credentials of the tracking server and artifact
            # store): the fork server may have started earlier, with another
            pool = ProcessPoolExecutor(self.processes, mp_context=ctx,
                                       initializer=_log_worker_init,
                                       initargs=(uri, dict(os.environ)))
            for _ in range(self.processes):
                pool.submit(_log_worker_ready)
            self.pool = pool
        except BaseException as e:          # raised where the first fold is submitted
            self._start_error = e

    def _started(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
            if self.pool is None:
                raise RuntimeError("the fold-logging processes did not start "
                                   "(tracking.log_workers=1 logs in a thread)"
                                   ) from self._start_error

    def submit(self, fold: Fold, out: FoldOutput, labels: np.ndarray) -> None:
        self._started()
        if self._preparing is not None:
            self._preparing.join()              # it only queues: done at once
        made = self.made.pop(fold.name, None)
        made = made.result() if made is not None else None     # an error opening it: now
        if self.processes > 1:
            self.pending[fold.name] = self.pool.submit(_log_in_worker, self._spec(), fold, out,
                                                       labels, made)
        else:
            self.pending[fold.name] = self.pool.submit(self._log, fold, out, labels, made)

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
        """Wait for the logging to end; fold runs opened early and never logged (the stage
        failed or was pruned first) are ended KILLED, their models FAILED."""
        if self._starting is not None:
            self._starting.join()
        if self._preparing is not None:
            self._preparing.join()
        try:
            for name, f in self.made.items():
                if f.cancel():
                    continue
                try:
                    rid, _, model_id, _ = f.result()
                except Exception:               # noqa: BLE001: nothing was opened
                    continue
                self.client.finalize_logged_model(model_id, "FAILED")
                self.client.set_terminated(rid, "KILLED")
                self.client.set_tag(rid, T + "terminated", "not logged: the stage ended first")
            self.made.clear()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def _log(self, fold: Fold, out: FoldOutput, labels: np.ndarray,
             made: tuple[str, str, str, str] | None = None) -> dict:
        """Fold run (per-epoch metrics, scores, confusion matrix, weights, log), then the
        result file on the parent, last: it marks the fold done for resume. `made` is the
        run and model `prepare` opened, else they are opened here. Few client calls (one
        metric batch, one artifact upload each for the run and its model): a batched run logs
        all its folds at once."""
        c, preds = self.client, out.probs.argmax(1)
        s = scores(labels, preds, len(self.classes))
        cm = confusion(labels, preds, len(self.classes))
        if made is None:
            made = self._open(fold.name, late_params(out))
        else:
            c.log_model_params(made[2], late_params(out))
        rid, uri, model_id, location = made
        link = save_fold_model(c, model_id, location, rid, self.parent, self.stage, out,
                               self.classes)        # the LoggedModel; metrics linked to it
        now = int(time.time() * 1000)
        tags = [RunTag(T + "selected", out.notes["selected"])] if out.notes else []
        metrics = (history_metrics(out.fit.history, now)
                   + [Metric(f"test/{k}", float(v), now, 0, **link) for k, v in s.items()]
                   + [Metric("best_epoch", float(out.fit.best_epoch), now, 0, **link)])
        log_metric_list(c, rid, metrics, tags)     # nested selection: the choice as a tag
        with tempfile.TemporaryDirectory() as d:
            torch.save(out.fit.state, Path(d) / "model.pth")   # extract_features, refit read it
            pd.DataFrame(out.fit.history).to_csv(Path(d) / "training_log.csv", index=False)
            (Path(d) / "confusion_matrix.json").write_text(json.dumps(
                {"classes": self.classes, "matrix": cm.tolist()}))
            plots.confusion_image(cm, self.classes, f"fold {fold.name}").save(
                Path(d) / "confusion_matrix.png")
            if out.notes:
                (Path(d) / "selection.json").write_text(json.dumps(out.notes, indent=1))
            artifact_repo(uri).log_artifacts(d)
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
                  "select_ids": sorted(out.select_ids), "history": out.fit.history, "scores": s,
                  **({"selection": out.notes} if out.notes else {})}
        c.log_dict(self.parent, result, f"folds/{fold.name}.json")
        return result


_WORKER_LOGGERS: dict[tuple, FoldLogger] = {}


def _log_worker_init(uri: str, env: dict) -> None:
    """A fold-logging process: the parent's environment and tracking store, one torch
    thread."""
    os.environ.clear()
    os.environ.update(env)
    mlflow.set_tracking_uri(uri)
    torch.set_num_threads(1)


def _log_worker_ready() -> None:
    """Nothing: submitted once per worker so that the pool starts them all at once."""


def _worker_logger(spec: tuple) -> FoldLogger:
    """The worker process's logger for a stage run (one per stage run there)."""
    lg = _WORKER_LOGGERS.get(spec)
    if lg is None:
        parent, stage, classes, out_dir, exp = spec
        lg = _WORKER_LOGGERS[spec] = FoldLogger(parent, stage, classes, out_dir, processes=0,
                                                experiment_id=exp)
    return lg


def _open_in_worker(spec: tuple, name: str) -> tuple[str, str, str, str]:
    """`FoldLogger._open` in a worker process."""
    return _worker_logger(spec)._open(name)


def _log_in_worker(spec: tuple, fold: Fold, out: FoldOutput, labels: np.ndarray,
                   made: tuple | None = None) -> dict:
    """`FoldLogger._log` in a worker process."""
    return _worker_logger(spec)._log(fold, out, labels, made)


def run_folds(plan: FoldPlan, table: pd.DataFrame, classes, stage: str,
              fold_fn: Callable[[int, Fold], FoldOutput], out_dir: Path | None = None,
              on_fold: Callable[[int, dict], None] | None = None, oracle: bool = False,
              workers: int = 1, batching: str = "off", device: str = "auto",
              logging_processes: int = 0) -> dict:
    """Run (or resume) every fold of `plan` under the active parent run, then log the pooled
    predictions, metrics and plots. `on_fold(k, running_scores)` is called after each fold
    in plan order (HPO reports and prunes there). `oracle=True` selects epochs on the test
    fold, as some papers do: the run is tagged and its metrics are logged as oracle/*.
    `workers > 1` trains that many folds at once in worker processes (`mexp.engine.pool`);
    `batching` (training.fold_batching) may train them as one vectorised model instead
    (`mexp.engine.batched`). The run's tag `mexp.fold_path` says which path was taken, and why.
    `logging_processes` is `tracking.log_workers` (`log_workers`)."""
    parent = mlflow.active_run().info.run_id
    check_plan(plan, table["sample_id"])        # safeguard: no subject/database on two sides
    if oracle:
        mlflow.set_tag(T + "oracle", "true")
        log.warning("evaluation.oracle=true: epochs are chosen on the TEST subjects; the "
                    "metrics are logged as oracle/* and are not honest estimates")
    done = _completed(parent)
    if done:
        log.info("resuming: %d of %d folds already complete", len(done), len(plan.folds))
    _kill_stale_fold_runs(parent)          # a resumed run's in-flight folds died with it
    dev = resolve_device(device)
    batched, why = choose(batching, fold_fn, dev)
    STEP_PATHS.clear()
    path = f"batched on {dev.type}" if batched else (f"{workers} fold processes" if workers > 1
                                                     else "serial")
    # made before training, so that its processes start meanwhile; batched folds (nested
    # selection's too, on CUDA) all finish at once and wait for it
    burst = batched or (hasattr(fold_fn, "prepare") and dev.type == "cuda")
    recorder = FoldLogger(parent, stage, classes, out_dir,
                          processes=log_workers(logging_processes, burst))
    if burst:           # their runs and models are opened by the logger while the folds train
        recorder.prepare([f for f in plan.folds if f.name not in done])
    if hasattr(fold_fn, "prepare") and workers <= 1 and not oracle:
        todo = [(k, f) for k, f in enumerate(plan.folds) if f.name not in done]
        # the CPU cores are idle beside the GPU: closed-form members fit there meanwhile,
        # leaving two for the process that drives the device
        cpus = max(1, (os.cpu_count() or 1) - 2) if dev.type == "cuda" else 1
        try:
            names = fold_fn.prepare(todo, cpus)  # nested: outer x inner folds as one model
        except BaseException:
            recorder.close()
            raise
        if names:
            path, why = f"nested, batched on {dev.type}", (
                f"candidates {names}: every outer fold's inner folds and refit as one "
                f"vectorised model per candidate")
    n = recorder.processes
    mlflow.set_tags({T + "fold_path": path, T + "fold_path_why": why,
                     T + "fold_logging": f"{n} processes" if n > 1 else "a thread"})
    log.info("folds: %s (%s)", path, why)
    with tempfile.TemporaryDirectory() as figures:
        results = run_plan(plan, table, len(classes), fold_fn, recorder, done, on_fold=on_fold,
                           oracle=oracle, workers=workers, desc=f"{stage} folds",
                           batched_on=dev if batched else None,
                           before_drain=lambda res: render_figures(res, table, classes, figures))
        if STEP_PATHS:      # how the vectorised steps ran: a CUDA graph, or eagerly (and why)
            mlflow.set_tag(T + "fold_steps", ", ".join(dict.fromkeys(STEP_PATHS)))
        return summarise(results, table, classes, plan, out_dir, "oracle" if oracle else "test",
                         figures)


def _pooled(results: list[dict], table: pd.DataFrame):
    """Labels, predictions and subjects of every fold's test samples, in fold order."""
    meta = table.set_index("sample_id")
    ids = [i for r in results for i in r["test_ids"]]
    p = np.array([int(np.argmax(v)) for r in results for v in r["probs"]], dtype=int)
    return (meta.loc[ids, "label"].astype(int).to_numpy(), p, meta.loc[ids, "subject"])


FIGURES = ("confusion_matrix.png", "learning_curve.png", "per_subject.png")


def render_figures(results: list[dict], table: pd.DataFrame, classes, folder) -> None:
    """The pooled plots (confusion matrix, learning curves, per-subject scores) as PNG files in
    `folder`: drawn while the fold runs are still being logged, uploaded by `summarise`."""
    y, p, subject = _pooled(results, table)
    cm = confusion(y, p, len(classes))
    per_subject = breakdown(y, p, subject, len(classes))
    history = {r["fold"]: r["history"] for r in results}
    for name, fig in zip(FIGURES, (plots.confusion_figure(cm, classes, "pooled"),
                                   plots.learning_curve_figure(history, "all folds"),
                                   plots.per_subject_figure(per_subject, "per subject"))):
        fig.savefig(Path(folder) / name)


def summarise(results: list[dict], table: pd.DataFrame, classes, plan: FoldPlan,
              out_dir: Path | None, prefix: str, figures: str) -> dict:
    """Pooled metrics, per-database and per-subject scores, plots and files on the parent. The
    plots are `render_figures`'s, already in folder `figures` (drawn while the fold runs were
    logged); the files join them there and the folder is uploaded."""
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
    log_rows = pd.DataFrame([{"fold": f, **row} for f, h in history.items() for row in h])
    mlflow.log_dict({"classes": list(classes), "matrix": cm.tolist()}, "confusion_matrix.json")
    mlflow.log_dict({"pooled": s, "per_database": per_db, "per_subject": per_subject},
                    "scores.json")
    pred.to_csv(Path(figures) / "predictions.csv", index=False)
    log_rows.to_csv(Path(figures) / "training_log.csv", index=False)
    mlflow.log_artifacts(figures)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        pred.to_csv(out_dir / "predictions.csv", index=False)
        log_rows.to_csv(out_dir / "training_log.csv", index=False)
        plan.save(out_dir / "fold_plan.json")
    return {"uf1": s["uf1"], "uar": s["uar"], "accuracy": s["accuracy"], "n": s["n"],
            "per_database": per_db, "folds": len(results), "oracle": prefix == "oracle"}


def out_dir(cfg: Config) -> Path | None:
    return Path(cfg.output.dir) if cfg.output.local else None


def cross_validate(cfg: Config, stage: str, run, plan: FoldPlan, table, digest: str,
                   dataset: str, classes, make_fold_fn: Callable[[Config], Callable]) -> dict:
    """Inside a stage's run: the dataset input and fold plan, every fold, the pooled summary.
    `table` needs sample_id, dataset, label and `group` (the CV subject) columns;
    `make_fold_fn(cfg)` is the stage's fold function for a config (nested selection builds one
    per candidate)."""
    fold_fn = make_fold_fn(cfg)
    if cfg.selection.mode != "none":
        fold_fn = NestedFolds(cfg, make_fold_fn, table, len(classes))
        mlflow.set_tags({T + "selection": cfg.selection.mode,
                         T + "candidates": ",".join(cfg.selection.candidates)})
    log_dataset(table, digest, dataset)
    log_plan(plan, table["sample_id"])
    summary = run_folds(plan, table.assign(subject=table["group"]), classes, stage, fold_fn,
                        out_dir(cfg), oracle=cfg.evaluation.oracle,
                        workers=fold_workers(cfg), batching=cfg.training.fold_batching,
                        device=cfg.training.device, logging_processes=cfg.tracking.log_workers)
    summary["run_id"] = run.info.run_id
    return summary


def clip_stage(cfg: Config, stage: str, default_model: str, make_fold_fn: Callable,
               instead: Callable | None = None) -> dict:
    """A stage trained on the data set's clips (train_cnn, train_cnn_lstm): load and check
    them, fix the fold plan, then inside the stage's run cross-validate with
    `make_fold_fn(cfg, clip_set, clips)`, or return `instead(run, clip_set, clips, plan)`
    when that gives a result (train_cnn's all-subjects scope)."""
    start(cfg)                              # an unreachable server fails before any work
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    check_channels(cfg, clips)
    plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels, cs.table["dataset"])
    with stage_run(cfg, stage, resume_run_id=cfg.resume_run_id,
                   tags={T + "model": cfg.model.name or default_model}) as run:
        done = instead(run, cs, clips, plan) if instead else None
        if done is not None:
            return done
        summary = cross_validate(cfg, stage, run, plan, cs.table.assign(group=cs.groups),
                                 cs.digest, cfg.data.dataset, cs.classes,
                                 lambda c: make_fold_fn(c, cs, clips))
    print(summary_line(stage, summary, summary["run_id"]))
    return summary
