"""The Optuna side of `hpo`: storage, study name, sampler and pruner, the objective (one
nested MLflow run per trial, pruning on the running pooled score) and the study summary."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import mlflow
import optuna
import yaml
from optuna.trial import TrialState

from mexp.config import Config, apply_dict
from mexp.crossval import fold_callback
from mexp.hpo_space import suggest, to_nested
from mexp.tracking import T, attach_stage, tracking_uri

log = logging.getLogger(__name__)


def stage_main(stage: str):
    from mexp import train_cnn, train_cnn_lstm, train_lstm, train_roi
    return {"train_lstm": train_lstm.main, "train_cnn_lstm": train_cnn_lstm.main,
            "train_roi": train_roi.main, "train_cnn": train_cnn.main}[stage]


def storage_url(cfg: Config) -> str:
    """hpo.storage, else an SQLite file beside the SQLite tracking store (else ./optuna.db)."""
    if cfg.hpo.storage:
        return cfg.hpo.storage
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def study_name(cfg: Config) -> str:
    """hpo.study_name, else the stage plus a digest of what defines the search (not of the
    trial budget, so a study can be resumed with more trials)."""
    if cfg.hpo.study_name:
        return cfg.hpo.study_name
    probe = copy.deepcopy(cfg)
    probe.hpo.trials = probe.hpo.n_workers = 0
    probe.hpo.timeout = 0.0
    return f"{cfg.hpo.stage}-{probe.digest('data', 'model', 'training', 'flow', 'hpo')[:10]}"


def make_sampler(h, worker_id: int):
    if h.sampler == "random":
        return optuna.samplers.RandomSampler(seed=h.seed + worker_id)
    return optuna.samplers.TPESampler(seed=h.seed + worker_id)


def make_pruner(h):
    if h.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if h.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def count_done(study) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def fail_stale_trials(study) -> None:
    """Trials left RUNNING by a killed study become FAIL (and their runs KILLED), so a resumed
    study neither counts nor duplicates them."""
    client = mlflow.tracking.MlflowClient()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        rid = t.user_attrs.get("mlflow_run_id")
        if rid:
            client.set_tag(rid, T + "trial_state", "FAIL (killed)")
            client.set_terminated(rid, "KILLED")


def trial_config(cfg: Config, params: dict) -> Config:
    tcfg = copy.deepcopy(cfg)
    apply_dict(tcfg, to_nested(params), source="hpo trial: ")
    tcfg.output.local, tcfg.resume_run_id = False, ""
    return tcfg


def objective(trial: optuna.Trial, cfg: Config, parent_id: str) -> float:
    """Train the stage with the trial's params inside the trial's own nested run."""
    params = {k: suggest(trial, k, spec) for k, spec in cfg.hpo.space.items()}
    tcfg, metric = trial_config(cfg, params), cfg.hpo.metric
    active = mlflow.active_run()
    run = mlflow.start_run(run_name=f"trial-{trial.number:03d}", parent_run_id=parent_id,
                           nested=active is not None,
                           tags={T + "trial": str(trial.number), T + "study_run_id": parent_id})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)

    def on_fold(k: int, running: dict) -> None:
        trial.report(running[metric], k)
        mlflow.log_metric(f"running/{metric}", running[metric], step=k)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {k} ({metric} {running[metric]:.4f})")

    status = "FAILED"
    try:
        with attach_stage(), fold_callback(on_fold):
            summary = stage_main(cfg.hpo.stage)(tcfg)
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "COMPLETE"})
        mlflow.log_metric(f"trial/{metric}", summary[metric])
        status = "FINISHED"
        return summary[metric]
    except optuna.TrialPruned:
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "PRUNED"})
        status = "KILLED"
        raise
    except Exception as e:
        mlflow.set_tags({T + "stage": "hpo:trial", T + "trial_state": "FAILED",
                         T + "error": f"{type(e).__name__}: {e}"[:5000]})
        log.warning("trial %d failed: %s", trial.number, e)
        raise
    finally:
        mlflow.end_run(status)


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


def log_study_results(study, cfg: Config) -> dict:
    """Best params / value / run id, best_config.yaml and the plots on the study's run."""
    counts = {s: sum(t.state == s for t in study.trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    summary = {"complete": counts[TrialState.COMPLETE], "pruned": counts[TrialState.PRUNED],
               "failed": counts[TrialState.FAIL], "best_value": float("nan"),
               "best_trial": None, "best_run_id": None, "study": study.study_name}
    mlflow.log_metrics({"trials/complete": summary["complete"],
                        "trials/pruned": summary["pruned"], "trials/failed": summary["failed"]})
    if not counts[TrialState.COMPLETE]:
        return summary
    best = study.best_trial
    summary |= {"best_value": best.value, "best_trial": best.number,
                "best_run_id": best.user_attrs.get("mlflow_run_id"), "best_params": best.params}
    mlflow.log_metric(f"best/{cfg.hpo.metric}", best.value)
    mlflow.set_tags({T + "best_trial": str(best.number),
                     T + "best_run_id": summary["best_run_id"] or ""})
    mlflow.log_dict({"params": best.params, "value": best.value, "trial": best.number,
                     "run_id": summary["best_run_id"]}, "best_params.json")
    best_cfg = trial_config(cfg, best.params)
    best_cfg.hpo = type(cfg.hpo)()
    mlflow.log_text(yaml.safe_dump(best_cfg.to_dict(), sort_keys=False), "best_config.yaml")
    import matplotlib.pyplot as plt
    for name, fig in _plots(study).items():
        mlflow.log_figure(fig, name)
        plt.close(fig)
    return summary
