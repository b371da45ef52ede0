"""Stage `hpo`: an Optuna study over a training stage; each trial is a nested MLflow run.

    python -m mexp.hpo --config configs/hpo_lstm.yaml [hpo.trials=30 hpo.n_workers=2]
    python -m mexp.hpo_train --config configs/lstm_stage2.yaml      # the original command

The search space uses the override keys (`training.lr: {type: float, low: 1e-5, high: 1e-2,
log: true}`). Trials report the running pooled score after each fold, in plan order, so the
pruner compares like with like. `hpo.study_name` with an existing study resumes it; the study
ends with exactly `hpo.trials` complete-or-pruned trials (failed ones are reported, not counted
twice). `hpo.n_workers=N` runs N processes on the same storage (SQLite or PostgreSQL).
"""
from __future__ import annotations

import copy
import logging
import os
from multiprocessing import get_context

import optuna

from mexp import cli
from mexp.config import Config, apply_dict
from mexp.hpo_space import default_space, suggest, to_nested
from mexp.hpo_study import (count_done, fail_stale_trials, log_study_results, make_pruner,
                            make_sampler, objective, storage_url, study_name)
from mexp.tracking import T, configure, stage_run

log = logging.getLogger(__name__)
STAGE = "hpo"


def quotas(n: int, workers: int) -> list[int]:
    """Split n trials over workers as evenly as possible (exact total)."""
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


def worker(cfg_dict: dict, name: str, storage: str, parent_id: str, n_trials: int,
           worker_id: int) -> None:
    """One process's share of the study (also the in-process path for one worker)."""
    os.environ.pop("MLFLOW_RUN_ID", None)      # else MLflow ignores parent_run_id (#15713)
    cfg = Config()
    apply_dict(cfg, cfg_dict)
    configure(cfg)
    sampler = make_sampler(cfg.hpo, worker_id)
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                              pruner=make_pruner(cfg.hpo))
    study.optimize(lambda t: objective(t, cfg, parent_id), n_trials=n_trials,
                   timeout=cfg.hpo.timeout or None, catch=(Exception,),
                   gc_after_trial=True)


def run_workers(cfg: Config, name: str, storage: str, parent_id: str, remaining: int) -> None:
    shares = [q for q in quotas(remaining, max(1, cfg.hpo.n_workers)) if q > 0]
    if len(shares) <= 1:
        worker(cfg.to_dict(), name, storage, parent_id, remaining, 0)
        return
    ctx = get_context("spawn")
    procs = [ctx.Process(target=worker, args=(cfg.to_dict(), name, storage, parent_id, q, i))
             for i, q in enumerate(shares)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} HPO worker process(es) exited with codes {bad}")


def main(cfg: Config) -> dict:
    if not cfg.hpo.space:
        cfg.hpo.space = default_space(cfg.hpo.stage)
    probe = copy.deepcopy(cfg)                  # a bad space fails before any run is opened
    apply_dict(probe, to_nested({k: suggest(None, k, s) for k, s in cfg.hpo.space.items()}),
               source="hpo.space: ")
    configure(cfg)
    storage, name = storage_url(cfg), study_name(cfg)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction=cfg.hpo.direction, sampler=make_sampler(cfg.hpo, 0))
    fail_stale_trials(study)
    remaining = cfg.hpo.trials - count_done(study)
    tags = {T + "study_name": name, T + "hpo_stage": cfg.hpo.stage,
            T + "storage": storage.split("@")[-1]}
    parent = study.user_attrs.get("mlflow_run_id", "")
    with stage_run(cfg, STAGE, run_name=f"study-{name}", tags=tags,
                   resume_run_id=parent if parent else "") as run:
        study.set_user_attr("mlflow_run_id", run.info.run_id)
        log.info("study %s on %s: %d trial(s) to run", name, storage, max(remaining, 0))
        if remaining > 0:
            run_workers(cfg, name, storage, run.info.run_id, remaining)
        study = optuna.load_study(study_name=name, storage=storage)
        summary = log_study_results(study, cfg)
        summary["run_id"] = run.info.run_id
    print(f"hpo: study {name}: {summary['complete']} complete, {summary['pruned']} pruned, "
          f"{summary['failed']} failed; best {cfg.hpo.metric} {summary['best_value']:.4f} "
          f"(trial {summary['best_trial']}, run {summary['best_run_id']}); "
          f"best_config.yaml on run {summary['run_id']}")
    return summary


if __name__ == "__main__":
    cli.run(main, __doc__)
