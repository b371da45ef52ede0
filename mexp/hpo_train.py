"""Running HPO trials: the worker loop that shares the study's quota with every other worker,
and the objective (one nested MLflow run per trial, pruning on the running pooled score).

Also the original toolkit's HPO command, kept:

    python -m mexp.hpo_train --config configs/lstm_stage2.yaml

the same as `python -m mexp.hpo`; with a stage config and no `hpo` section it searches the
stage's default space (mexp/resources/hpo_spaces.yaml) for `hpo.trials` trials.
"""
from __future__ import annotations

import copy
import logging
import math
import threading
import time
import warnings
from contextlib import contextmanager

import mlflow
import optuna
from optuna.trial import TrialState

from mexp import cli
from mexp.config import Config, apply_dict
from mexp.engine.crossval import fold_callback
from mexp.tuning.space import suggest, to_nested
from mexp.tuning.study import (ADMITTED, ERROR, RUN, SKIPPED, WORKER, admit, close_dead_trial,
                            count_done, fail_dead_trials, heartbeat, in_flight, worker_name)
from mexp.util.secrets import redact
from mexp.tracking.runs import T, attach_stage

log = logging.getLogger(__name__)


def stage_main(stage: str):
    from mexp import train_cnn, train_cnn_lstm, train_lstm, train_roi
    return {"train_lstm": train_lstm.main, "train_cnn_lstm": train_cnn_lstm.main,
            "train_roi": train_roi.main, "train_cnn": train_cnn.main}[stage]


def _lost_trial(study, number: int | None, err: ValueError) -> bool:
    """After Optuna's "Cannot tell a FAIL trial": another worker declared this live worker
    dead (no heartbeat within the grace period). Drop the result, KILL its runs."""
    if number is None:
        return False
    t = study.get_trials(deepcopy=False)[number]
    if t.state != TrialState.FAIL or "Cannot tell" not in str(err):
        return False
    log.warning("trial %d was failed by another worker (no heartbeat within the grace "
                "period): its result is dropped", number)
    close_dead_trial(study, t)                  # KILLED, though this worker ended it FINISHED
    return True


def max_failures(h) -> int:
    """Failed trials (errors, not dead workers) after which the workers stop."""
    return int(getattr(h, "max_failures", 0)) or h.trials


def failures(study, since: int) -> int:
    """Trials numbered `since` or later that failed with an error."""
    return sum(t.state == TrialState.FAIL and ERROR in t.user_attrs and t.number >= since
               for t in study.get_trials(deepcopy=False))


def work(study, cfg: Config, parent_id: str) -> None:
    """Run trials until the study (in the storage, all workers together) holds hpo.trials
    complete-or-pruned ones, waiting while the remaining slots are in flight elsewhere."""
    n, (interval, grace) = cfg.hpo.trials, heartbeat(cfg.hpo)
    deadline = time.time() + cfg.hpo.timeout if cfg.hpo.timeout else None
    budget, base = max_failures(cfg.hpo), len(study.get_trials(deepcopy=False))
    last: dict = {}

    def func(trial):
        last["number"] = trial.number
        return objective(trial, cfg, parent_id)

    while True:
        fail_dead_trials(study, grace)
        done, flying = count_done(study), len(in_flight(study))
        if done >= n:
            return
        if deadline is not None and time.time() >= deadline:
            log.info("hpo.timeout reached: this worker starts no more trials")
            return
        if failures(study, base) >= budget:
            log.warning("%d trial(s) failed with an error (hpo.max_failures=%d): this worker "
                        "starts no more trials", failures(study, base), budget)
            return
        if done + flying >= n:                  # the last slots are in flight: wait on them
            time.sleep(min(5.0, interval))
            continue
        if cfg.hpo.trial_batch > 1:
            run_group(study, cfg, parent_id, min(cfg.hpo.trial_batch, n - done - flying))
            continue
        last.clear()
        try:
            study.optimize(func, n_trials=1, catch=(Exception,), gc_after_trial=True)
        except ValueError as e:
            if not _lost_trial(study, last.get("number"), e):
                raise


def run_group(study, cfg: Config, parent_id: str, size: int) -> None:
    """`hpo.trial_batch`: ask up to `size` trials (each admitted against the quota as one
    trial is), sample all their parameters first, then run them one after another inside
    `mexp.engine.batching.trial_group`: where the stage batches its folds, the first trial
    trains every trial's replicas whose configs differ only in learning rate, weight decay or
    class weighting as one vectorised model, and the others log what was kept for them. Each
    trial keeps its own nested run, pruning (which then saves logging, not training) and
    error; heartbeats go on for every trial of the group until it is told."""
    from mexp.engine.batching import trial_group
    trials = []
    for _ in range(size):
        with warnings.catch_warnings():     # "heartbeat ... with Study.optimize": `heartbeats`
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            t = study.ask()
        t.set_user_attr(WORKER, worker_name())
        ok, ahead = admit(study, t, cfg.hpo.trials)
        if not ok:
            t.set_user_attr(SKIPPED, f"quota met: {ahead} trial(s) done or in flight")
            study.tell(t, state=TrialState.FAIL)
            break
        t.set_user_attr(ADMITTED, True)
        trials.append(t)
    params = [{k: suggest(t, k, spec) for k, spec in cfg.hpo.space.items()} for t in trials]
    with heartbeats(study, trials), trial_group([trial_config(cfg, p) for p in params]):
        for t, p in zip(trials, params):
            try:
                value, state = train_trial(t, cfg, parent_id, p), None
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            except Exception as e:
                record_error(t, e)
                value, state = None, TrialState.FAIL
            try:
                study.tell(t, value, state=state)
            except ValueError as e:
                if not _lost_trial(study, t.number, e):
                    raise


@contextmanager
def heartbeats(study, trials: list):
    """Record each trial's heartbeat every `heartbeat_interval` while the group runs, as
    Optuna's `optimize` does for its one trial (RDBStorage.record_heartbeat), so other workers
    do not fail the trials waiting their turn as dead."""
    storage = study._storage            # the study's RDBStorage (Optuna keeps it private)
    interval = storage.get_heartbeat_interval() if hasattr(
        storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat():
        while True:
            for t in trials:
                if storage.get_trial(t._trial_id).state == TrialState.RUNNING:
                    storage.record_heartbeat(t._trial_id)
            if stop.wait(interval):
                return
    thread = threading.Thread(target=beat, daemon=True, name="hpo-heartbeats")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trial_config(cfg: Config, params: dict) -> Config:
    tcfg = copy.deepcopy(cfg)
    apply_dict(tcfg, to_nested(params), source="hpo trial: ")
    tcfg.output.local, tcfg.resume_run_id = False, ""
    return tcfg


def objective(trial: optuna.Trial, cfg: Config, parent_id: str) -> float:
    """Admit the trial or skip it (NaN: FAIL, tagged skipped, before it samples or opens a
    run, when the study's quota is taken); any error of an admitted trial is recorded on it
    (user attr mexp_error, redacted) and counts toward hpo.max_failures."""
    trial.set_user_attr(WORKER, worker_name())
    ok, ahead = admit(trial.study, trial, cfg.hpo.trials)
    if not ok:
        trial.set_user_attr(SKIPPED, f"quota met: {ahead} trial(s) done or in flight")
        log.info("trial %d not started: %d of %d trial(s) already done or in flight",
                 trial.number, ahead, cfg.hpo.trials)
        return math.nan
    trial.set_user_attr(ADMITTED, True)
    try:
        return train_trial(trial, cfg, parent_id)
    except optuna.TrialPruned:
        raise
    except Exception as e:
        record_error(trial, e)
        raise


def record_error(trial, err: Exception) -> None:
    """An admitted trial's error on the trial (user attr mexp_error, redacted) and in the log."""
    msg = redact(f"{type(err).__name__}: {err}")
    trial.set_user_attr(ERROR, msg[:2000])
    log.warning("trial %d failed: %s", trial.number, msg)


def train_trial(trial: optuna.Trial, cfg: Config, parent_id: str,
                params: dict | None = None) -> float:
    """Train the stage with the trial's params (sampled now unless given) inside the trial's
    own nested run."""
    if params is None:
        params = {k: suggest(trial, k, spec) for k, spec in cfg.hpo.space.items()}
    tcfg, metric = trial_config(cfg, params), cfg.hpo.metric
    run = mlflow.start_run(run_name=f"trial-{trial.number:03d}", parent_run_id=parent_id,
                           nested=mlflow.active_run() is not None,
                           tags={T + "trial": str(trial.number), T + "study_run_id": parent_id,
                                 T + "stage": "hpo:trial", T + "worker": worker_name()})
    trial.set_user_attr(RUN, run.info.run_id)

    def on_fold(k: int, running: dict) -> None:
        trial.report(running[metric], k)
        mlflow.log_metric(f"running/{metric}", running[metric], step=k)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {k} ({metric} {running[metric]:.4f})")

    status = "FAILED"
    try:
        with attach_stage(), fold_callback(on_fold):
            value = float(stage_main(cfg.hpo.stage)(tcfg)[metric])
        if not math.isfinite(value):
            raise ValueError(f"the stage returned {metric} = {value}")
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "COMPLETE"})
        mlflow.log_metric(f"trial/{metric}", value)
        status = "FINISHED"
        return value
    except optuna.TrialPruned:
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "PRUNED"})
        status = "KILLED"
        raise
    except Exception as e:
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "FAILED",
                         T + "error": redact(f"{type(e).__name__}: {e}")[:5000]})
        raise
    finally:
        mlflow.end_run(status)


COMMAND = ("The original toolkit's HPO command, the same as `python -m mexp.hpo`: with a stage "
           "config and no `hpo` section it searches the stage's default space "
           "(mexp/resources/hpo_spaces.yaml) for `hpo.trials` trials.")

def main(cfg):
    """The original command: the same as `mexp.hpo`."""
    from mexp.hpo import main as hpo_main    # hpo imports this module's worker loop
    return hpo_main(cfg)


if __name__ == "__main__":
    cli.run(main, COMMAND)
