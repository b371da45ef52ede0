"""Stage `hpo`: an Optuna study over a training stage; each trial is a nested MLflow run.

    python -m mexp.hpo --config configs/hpo_lstm.yaml [hpo.trials=30 hpo.n_workers=2]
    python -m mexp.hpo_train --config configs/lstm_stage2.yaml      # the original command

The search space uses the override keys (`training.lr: {type: float, low: 1e-5, high: 1e-2,
log: true}`) and is checked before any run opens. Trials report the running pooled score after
each fold, in plan order, so the pruner compares like with like.

Any number of processes, on any machines, may run the same study (same `hpo.study_name` and
`hpo.storage`): they share the study's one parent run (its id is the study's user attr
`mlflow_run_id`, made by the process that created the study), count the quota in the storage
and stop once the study holds `hpo.trials` complete-or-pruned trials. A worker that dies stops
sending heartbeats; after `hpo.grace_period` another worker fails its trial and KILLs the
trial's runs. The worker that finishes the study logs the summary and ends the parent run; a
study without a completed trial ends FAILED with a `StudyError` that says why.
"""
from __future__ import annotations

import logging
import os
import time
from multiprocessing import get_context

import optuna
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mexp import cli
from mexp.config import Config, ConfigError, apply_dict
from mexp.tuning.space import check_study_space
from mexp.tuning.study import (RUN, SKIPPED, close_runs, count_done, heartbeat, in_flight,
                            last_worker, make_pruner, make_sampler, make_storage, storage_url,
                            study_name, why_no_best, worker_name)
from mexp.hpo_train import trial_config, work
from mexp.util.secrets import redact, redact_tree
from mexp.tracking.runs import T, TrackingError, check_run, configure, stage_run

log = logging.getLogger(__name__)
STAGE = "hpo"


class StudyError(RuntimeError):
    """The study ended without a completed trial (all failed or pruned)."""


def check_config(cfg: Config) -> None:
    """Trials, heartbeat settings and the search space, before any run or trial starts."""
    if cfg.hpo.trials < 1:
        raise ConfigError(f"config key 'hpo.trials' must be >= 1, got {cfg.hpo.trials}")
    heartbeat(cfg.hpo)
    check_study_space(cfg)


def open_study(cfg: Config, url: str, name: str, worker_id: int):
    """(study, created): this process created the study, or joined an existing one."""
    h = cfg.hpo
    storage = make_storage(url, h)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=h.direction,
                                    sampler=make_sampler(h, worker_id), pruner=make_pruner(h))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage,
                              sampler=make_sampler(h, worker_id), pruner=make_pruner(h))
    if study.direction.name.lower() != h.direction:
        raise ConfigError(f"study '{name}' exists with direction "
                          f"{study.direction.name.lower()}, not hpo.direction={h.direction}")
    return study, False


def _wait_for_parent(study, seconds: float = 60.0) -> str:
    """The parent run id of a study another process has just created (it sets it first)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        rid = study.user_attrs.get(RUN, "")
        if rid:
            return rid
        time.sleep(0.5)
    log.warning("study %s has no parent run after %.0f s: this worker opens one",
                study.study_name, seconds)
    return ""


def open_parent(cfg: Config, study, created: bool, url: str) -> str:
    """The study's parent run, (re)set RUNNING: made here if this process created the study,
    else the one in the study's user attr `mlflow_run_id`."""
    rid = "" if created else study.user_attrs.get(RUN, "")
    if not rid and not created and not study.trials:
        rid = _wait_for_parent(study)
    if rid:
        run = check_run(rid, STAGE, finished=False)     # on this tracking server, an hpo run
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"the study's run {rid} is deleted: restore it "
                                "(mlflow runs restore) or use another hpo.study_name")
    else:
        tags = {T + "study_name": study.study_name, T + "hpo_stage": cfg.hpo.stage,
                T + "storage": redact(url)}
        with stage_run(cfg, STAGE, run_name=f"study-{study.study_name}",
                       tags=tags) as run:
            rid = run.info.run_id               # config and tags logged; ends on leaving
        MlflowClient().update_run(rid, status="RUNNING")     # before other workers see it
        study.set_user_attr(RUN, rid)
        return rid
    MlflowClient().update_run(rid, status="RUNNING")
    return rid


def worker(cfg_dict: dict, name: str, url: str, parent_id: str, worker_id: int) -> None:
    """One spawned process of `hpo.n_workers`: opens the study and runs trials."""
    os.environ.pop("MLFLOW_RUN_ID", None)      # else MLflow ignores parent_run_id (#15713)
    cfg = Config()
    apply_dict(cfg, cfg_dict)
    configure(cfg)
    study, _ = open_study(cfg, url, name, worker_id)
    work(study, cfg, parent_id)


def run_workers(cfg: Config, study, url: str, parent_id: str, base_id: int) -> set[str]:
    """Run this process's workers (itself, or hpo.n_workers spawned ones); their names."""
    if cfg.hpo.n_workers <= 1:
        work(study, cfg, parent_id)
        return {worker_name()}
    ctx = get_context("spawn")
    procs = [ctx.Process(target=worker, args=(cfg.to_dict(), study.study_name, url, parent_id,
                                              base_id + i)) for i in range(cfg.hpo.n_workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} HPO worker process(es) exited with codes {bad}")
    return {worker_name(p.pid) for p in procs}


def _plots(study) -> dict:
    import warnings

    from optuna.visualization import matplotlib as ovm
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out = {}
    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances),
                     ("parallel_coordinate.png", ovm.plot_parallel_coordinate)):
        try:
            ax = fn(study)
            ax = ax[0] if hasattr(ax, "__len__") and not hasattr(ax, "figure") else ax
            out[name] = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        except Exception as e:  # optuna refuses some plots on tiny studies: say so, go on
            log.info("no %s: %s", name, e)
    return out


def log_study_results(study, cfg: Config, run_id: str) -> dict:
    """Counts; with a completed trial, best params / value / run id, best_config.yaml (the
    stage's --config) and the plots, on the study's run. Quota-skipped trials are not failures."""
    client, trials = MlflowClient(), study.get_trials(deepcopy=False)
    skipped = sum(SKIPPED in t.user_attrs for t in trials)
    summary = {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
               "pruned": sum(t.state == TrialState.PRUNED for t in trials),
               "failed": sum(t.state == TrialState.FAIL for t in trials) - skipped,
               "skipped": skipped, "best_value": float("nan"), "best_trial": None,
               "best_run_id": None, "study": study.study_name}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"trials/{k}", summary[k], now, 0)
                                      for k in ("complete", "pruned", "failed")])
    if not summary["complete"]:
        return summary
    best = study.best_trial
    summary |= {"best_value": best.value, "best_trial": best.number,
                "best_run_id": best.user_attrs.get(RUN), "best_params": best.params}
    client.log_batch(run_id, metrics=[Metric(f"best/{cfg.hpo.metric}", best.value, now, 0)])
    client.set_tag(run_id, T + "best_trial", str(best.number))
    client.set_tag(run_id, T + "best_run_id", summary["best_run_id"] or "")
    client.log_dict(run_id, {"params": best.params, "value": best.value, "trial": best.number,
                             "run_id": summary["best_run_id"]}, "best_params.json")
    best_cfg = trial_config(cfg, best.params)
    best_cfg.hpo = type(cfg.hpo)()
    client.log_text(run_id, yaml.safe_dump(redact_tree(best_cfg.to_dict()), sort_keys=False),
                    "best_config.yaml")
    import matplotlib.pyplot as plt
    for name, fig in _plots(study).items():
        client.log_figure(run_id, fig, name)
        plt.close(fig)
    return summary


def _ended_elsewhere(client, parent_id: str, seconds: float) -> bool:
    """Whether the parent run leaves RUNNING (another worker ended it) within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if client.get_run(parent_id).info.status != "RUNNING":
            return True
        time.sleep(1.0)
    return False


def finish(cfg: Config, study, parent_id: str, mine: set[str]) -> dict:
    """Summary on the parent run and its end status, written once: by the process whose
    workers (`mine`) completed the study's last trial, or by any process that found the study
    already complete (`mine` empty); another process waits a grace period for it to, then
    does it itself. An unfinished study with trials in flight elsewhere is left to those."""
    client, done = MlflowClient(), count_done(study)
    if done < cfg.hpo.trials and in_flight(study):
        log.info("the study is unfinished and other workers have trials in flight: they "
                 "will log the summary and end run %s", parent_id)
        return {"study": study.study_name, "run_id": parent_id, "finished": False}
    if done >= cfg.hpo.trials and mine and last_worker(study) not in mine:
        log.info("study complete: worker %s, which completed its last trial, logs the summary "
                 "and ends run %s", last_worker(study), parent_id)
        if _ended_elsewhere(client, parent_id, heartbeat(cfg.hpo)[1]):
            return {"study": study.study_name, "run_id": parent_id, "finished": False}
        log.warning("run %s is still RUNNING after the grace period: this worker ends it",
                    parent_id)
    close_runs(study, parent_id)
    summary = log_study_results(study, cfg, parent_id)
    summary |= {"run_id": parent_id, "finished": True}
    if not summary["complete"]:
        summary["error"] = why_no_best(study, cfg)
        client.set_tag(parent_id, T + "error", summary["error"][:5000])
        client.set_terminated(parent_id, "FAILED")
        raise StudyError(summary["error"])
    client.set_terminated(parent_id, "FINISHED")
    return summary


def _abandon(study, parent_id: str, err: BaseException) -> None:
    """This worker failed: the parent run is FAILED unless other workers still run trials."""
    try:
        if not in_flight(study):
            client = MlflowClient()
            client.set_tag(parent_id, T + "error", redact(f"{type(err).__name__}: {err}")[:5000])
            client.set_terminated(parent_id, "FAILED")
    except Exception as e:  # the storage or server is what failed: say so, keep the first error
        log.warning("could not mark study run %s FAILED: %s", parent_id, redact(str(e)))


def main(cfg: Config) -> dict:
    check_config(cfg)
    configure(cfg)
    url, name = storage_url(cfg), study_name(cfg)
    study, created = open_study(cfg, url, name, 0)
    base_id = 0 if created else os.getpid()     # joining workers sample differently
    if not created:
        study.sampler = make_sampler(cfg.hpo, base_id)
    parent_id = open_parent(cfg, study, created, url)
    os.environ.pop("MLFLOW_RUN_ID", None)      # trials nest under parent_id, not `mlflow run`'s run
    log.info("study %s on %s (%s): %d of %d trial(s) complete-or-pruned; run %s", name,
             redact(url), "created" if created else "joined", count_done(study),
             cfg.hpo.trials, parent_id)
    complete = count_done(study) >= cfg.hpo.trials
    try:
        mine = run_workers(cfg, study, url, parent_id, base_id)
    except BaseException as e:
        _abandon(study, parent_id, e)
        raise
    summary = finish(cfg, study, parent_id, set() if complete else mine)
    if summary["finished"]:
        print(f"hpo: study {name}: {summary['complete']} complete, {summary['pruned']} pruned, "
              f"{summary['failed']} failed; best {cfg.hpo.metric} {summary['best_value']:.4f} "
              f"(trial {summary['best_trial']}, run {summary['best_run_id']}); "
              f"best_config.yaml on run {parent_id}")
    else:
        print(f"hpo: study {name}: this worker is done; another one ends run {parent_id}")
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
