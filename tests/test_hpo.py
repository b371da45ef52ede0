"""Optuna studies as nested MLflow runs: structure, pruning, failures, resume after kill -9,
two worker processes on SQLite and on a real PostgreSQL."""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mexp import extract_features, hpo, train_cnn
from mexp.tuning import study as hpo_study
from mexp.config import load_config, save_config


@pytest.fixture
def study_cfg(tiny_cfg, tracking):
    """A features run to search over, and a small, fast study config."""
    c = tiny_cfg
    c.data.input, c.data.sequence_length = "diff", 6
    c.training.epochs, c.training.cv_folds, c.training.val_fraction = 1, 3, 0.25
    c.output.local = False
    c.cnn_run_id = train_cnn.main(c)["run_id"]
    extract_features.main(c)
    c.cnn_run_id = ""
    c.training.epochs = 2
    c.hpo.trials = 3
    c.hpo.space = {"training.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "model.hidden_size": {"type": "categorical", "choices": [32, 64]}}
    return c


def _trial_runs(client, study_run_id):
    exp = client.get_run(study_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{study_run_id}'")


def _check_one_run_per_trial(client, out, n):
    study = optuna.load_study(study_name=out["study"], storage=out["storage"])
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                   optuna.trial.TrialState.PRUNED)]
    assert len(done) == n
    runs = _trial_runs(client, out["run_id"])
    by_trial = {}
    for r in runs:
        by_trial.setdefault(r.data.tags["mexp.trial"], []).append(r)
    for t in done:
        assert len(by_trial[str(t.number)]) == 1, t.number
    assert {r.info.run_id for r in runs} >= {t.user_attrs["mlflow_run_id"] for t in done}


def test_study_runs_trials_as_nested_runs_with_folds_under_them(study_cfg, tmp_path):
    out = hpo.main(study_cfg)
    out["storage"] = hpo_study.storage_url(study_cfg)
    _check_one_run_per_trial(MlflowClient(), out, 3)
    client = MlflowClient()
    study_run = client.get_run(out["run_id"])
    assert study_run.data.tags["mexp.stage"] == "hpo"
    trials = _trial_runs(client, out["run_id"])
    assert len(trials) == 3 and all(r.info.run_name.startswith("trial-") for r in trials)
    for r in trials:
        folds = _trial_runs(client, r.info.run_id)
        assert folds and all(f.info.run_name.startswith("fold=") for f in folds)
        assert r.data.tags["mexp.trial_state"] in ("COMPLETE", "PRUNED")
        assert "training.lr" in r.data.params
        hist = client.get_metric_history(r.info.run_id, "running/uf1")
        assert [m.step for m in hist] == list(range(len(hist)))
    arts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"best_config.yaml", "best_params.json", "optimization_history.png"} <= arts
    p = client.download_artifacts(out["run_id"], "best_config.yaml", str(tmp_path))
    best = load_config(p)                                  # the stage accepts it as --config
    assert best.training.lr == pytest.approx(out["best_params"]["training.lr"])
    assert study_run.data.metrics["best/uf1"] == pytest.approx(out["best_value"])
    assert study_run.data.tags["mexp.best_run_id"] == out["best_run_id"]


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def _study_run(client, cfg):
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs([exp], "tags.`mexp.stage` = 'hpo'")
    return run


def test_pruned_trial_is_tagged_pruned_not_failed(study_cfg, monkeypatch):
    monkeypatch.setattr(hpo, "make_pruner", lambda h: AlwaysPrune())
    study_cfg.hpo.trials = 2
    with pytest.raises(hpo.StudyError, match="every trial was pruned"):   # no best trial
        hpo.main(study_cfg)
    study_run = _study_run(MlflowClient(), study_cfg)
    assert study_run.info.status == "FAILED"
    assert study_run.data.metrics["trials/pruned"] == 2
    assert study_run.data.metrics["trials/failed"] == 0
    for r in _trial_runs(MlflowClient(), study_run.info.run_id):
        assert r.data.tags["mexp.trial_state"] == "PRUNED" and r.info.status == "KILLED"
        assert len(_trial_runs(MlflowClient(), r.info.run_id)) == 1   # stopped after fold 0


def test_failed_trial_is_tagged_with_its_error_and_the_study_goes_on(study_cfg):
    study_cfg.hpo.trials = 2
    study_cfg.hpo.space = {"model.num_layers": {"type": "categorical", "choices": [0]}}
    with pytest.raises(hpo.StudyError, match="0 pruned, 2 failed"):     # up to max_failures
        hpo.main(study_cfg)
    study_run = _study_run(MlflowClient(), study_cfg)
    assert study_run.info.status == "FAILED"
    for r in _trial_runs(MlflowClient(), study_run.info.run_id):
        assert r.info.status == "FAILED" and r.data.tags["mexp.trial_state"] == "FAILED"
        assert "num_layers" in r.data.tags["mexp.error"]          # the trial's own error


def test_bad_space_fails_before_any_run(study_cfg):
    study_cfg.hpo.space = {"training.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}
    with pytest.raises(ValueError, match="training.lrr"):
        hpo.main(study_cfg)


def test_killed_study_resumes_to_exactly_n_trials(study_cfg, tracking, tmp_path):
    study_cfg.hpo.study_name = "resume-me"
    study_cfg.hpo.trials = 4
    path = save_config(study_cfg, tmp_path / "hpo.yaml")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    proc = subprocess.Popen([sys.executable, "-m", "mexp.hpo", "--config", str(path)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    storage = hpo_study.storage_url(study_cfg)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            s = optuna.load_study(study_name="resume-me", storage=storage)
            if hpo_study.count_done(s) >= 1 and \
                    any(t.state == optuna.trial.TrialState.RUNNING for t in s.trials):
                break
        except KeyError:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the study ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study_cfg.hpo.heartbeat_interval, study_cfg.hpo.grace_period = 1, 3   # dead found in 3 s
    out = hpo.main(study_cfg)                             # same name: load and resume
    out["storage"] = storage
    _check_one_run_per_trial(MlflowClient(), out, 4)
    s = optuna.load_study(study_name="resume-me", storage=storage)
    assert any(t.state == optuna.trial.TrialState.FAIL for t in s.trials)   # the killed one


@pytest.mark.slow      # superseded in `make test` by test_hpo_reliability's three separate processes
def test_two_worker_processes_on_sqlite(study_cfg):
    study_cfg.hpo.n_workers, study_cfg.hpo.trials = 2, 4
    study_cfg.hpo.study_name = "two-workers"
    out = hpo.main(study_cfg)
    out["storage"] = hpo_study.storage_url(study_cfg)
    _check_one_run_per_trial(MlflowClient(), out, 4)
    assert len(_trial_runs(MlflowClient(), out["run_id"])) == 4


@pytest.mark.slow
def test_two_worker_processes_on_postgresql(study_cfg, postgres_url):
    study_cfg.hpo.n_workers, study_cfg.hpo.trials = 2, 4
    study_cfg.hpo.study_name = f"pg-{os.getpid()}-{time.time_ns()}"
    study_cfg.hpo.storage = postgres_url
    out = hpo.main(study_cfg)
    out["storage"] = postgres_url
    _check_one_run_per_trial(MlflowClient(), out, 4)
    assert len(_trial_runs(MlflowClient(), out["run_id"])) == 4
