"""HPO reliability (issue #12): bad spaces rejected before any run, a study without a completed
trial fails loudly, dead workers' trials and every run under them are KILLED, and separate
`python -m mexp.hpo` processes share one study and one parent run, ending with exactly
`hpo.trials` complete-or-pruned trials even when one of them is killed with SIGKILL."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mexp import extract_features, hpo, train_cnn
from mexp.tuning import study as hpo_study
from mexp.config import ConfigError, HPOConfig, save_config
from mexp.tuning.study import ADMITTED, RUN, SKIPPED, WORKER, admit, terminate_tree

HB = {"heartbeat_interval": 1, "grace_period": 5}     # seconds: dead workers found fast
TERMINAL = {"FINISHED", "KILLED", "FAILED"}


def tiny_stage(c):
    """Tiny frames and features, 2 folds, 1 epoch: the cheapest real stage-1 and stage-2."""
    c.data.image_size, c.data.sequence_length, c.data.input = 16, 6, "diff"
    c.training.epochs, c.training.cv_folds, c.training.val_fraction = 1, 2, 0.25


def study_run(client, cfg):
    """The one study (hpo) run in the experiment."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs([exp], "tags.`mexp.stage` = 'hpo'")
    return run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, synth_root):
    """Once: a features folder (train_cnn + extract_features), and an empty MLflow store and
    Optuna storage that each test copies (creating one costs seconds; a copy, nothing)."""
    from mexp.config import Config
    d = tmp_path_factory.mktemp("hpo-rel")
    MlflowClient(f"sqlite:///{d / 'empty.db'}").search_experiments()
    optuna.storages.RDBStorage(f"sqlite:///{d / 'optuna.db'}")
    shutil.copy(d / "empty.db", d / "stage1.db")
    with pytest.MonkeyPatch.context() as mp:
        uri = f"sqlite:///{d / 'stage1.db'}"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(d)
        mlflow.set_tracking_uri(uri)
        c = Config()
        c.data.root, c.data.cache_dir = str(synth_root), str(d / "cache")
        c.output.dir, c.model.feature_dim = str(d / "out"), 8
        tiny_stage(c)
        c.cnn_run_id = train_cnn.main(c)["run_id"]
        extract_features.main(c)
    return {"features": d / "out" / "features", "empty_db": d / "empty.db",
            "optuna_db": d / "optuna.db", "cache": d / "cache"}


@pytest.fixture
def cfg(tiny_cfg, prepared, tmp_path, monkeypatch):
    """A fresh tracking store (a copy of an empty one) and a tiny train_lstm study on the
    prepared features: 2 folds, 1 epoch, random sampler, no pruning, fast heartbeats."""
    shutil.copy(prepared["empty_db"], tmp_path / "mlflow.db")
    shutil.copy(prepared["optuna_db"], tmp_path / "optuna.db")     # the default storage
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)
    c = tiny_cfg
    c.data.features_dir, c.data.cache_dir = str(prepared["features"]), str(prepared["cache"])
    tiny_stage(c)
    c.output.local = False
    c.hpo.trials, c.hpo.pruner, c.hpo.sampler = 2, "none", "random"
    c.hpo.study_name = f"rel-{os.getpid()}-{time.time_ns()}"
    c.hpo.space = {"training.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "model.hidden_size": {"type": "categorical", "choices": [8, 16]}}
    for k, v in HB.items():
        setattr(c.hpo, k, v)
    return c


def hpo_command(config_path) -> list[str]:
    """`python -m mexp.hpo --config FILE` with fast heartbeats (until config.py has the keys:
    the same module, with the defaults that mexp reads by getattr patched in)."""
    fields = {f.name for f in dataclasses.fields(HPOConfig)}
    if set(HB) <= fields:
        return [sys.executable, "-m", "mexp.hpo", "--config", str(config_path),
                *(f"hpo.{k}={v}" for k, v in HB.items())]
    patch = "; ".join(f"c.HPOConfig.{k} = {v}" for k, v in HB.items())
    code = (f"import runpy, mexp.config as c; {patch}; "
            "runpy.run_module('mexp.hpo', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, "--config", str(config_path)]


def runs_under(client, run_id) -> list:
    """Every run below `run_id`, recursively."""
    exp = client.get_run(run_id).info.experiment_id
    out = []
    for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'"):
        out += [r] + runs_under(client, r.info.run_id)
    return out


# -- item 4: bad input before any run; no completed trial is an error ------------------------

BAD = {
    "low > high": ({"training.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "low"),
    "log, low 0": ({"training.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}, "log"),
    "no choices": ({"model.hidden_size": {"type": "categorical", "choices": []}}, "choices"),
    "text bound": ({"training.lr": {"type": "float", "low": "abc", "high": 0.1}}, "number"),
    "bool bound": ({"model.hidden_size": {"type": "int", "low": True, "high": 8}}, "integer"),
    "float int": ({"model.hidden_size": {"type": "int", "low": 2.5, "high": 8}}, "integer"),
    "step 0": ({"model.hidden_size": {"type": "int", "low": 2, "high": 8, "step": 0}}, "step"),
    "unknown field": ({"training.lr": {"type": "float", "low": 0.1, "high": 1, "lg": 1}}, "lg"),
    "bad value": ({"model.dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "dropout"),
    "unknown key": ({"training.lrr": {"type": "float", "low": 0.1, "high": 1}}, "lrr"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_space_is_refused_before_any_run_or_trial(cfg, case):
    space, word = BAD[case]
    cfg.hpo.space = space
    with pytest.raises(ConfigError, match=word) as e:
        hpo.main(cfg)
    assert next(iter(space)) in str(e.value)                  # names the key
    assert optuna.get_all_study_names("sqlite:///optuna.db") == []     # no study either
    exps = [x.experiment_id for x in MlflowClient().search_experiments()]
    assert MlflowClient().search_runs(exps) == []


def test_zero_trials_is_refused_before_any_run(cfg):
    cfg.hpo.trials = 0
    with pytest.raises(ConfigError, match="hpo.trials"):
        hpo.main(cfg)
    assert optuna.get_all_study_names("sqlite:///optuna.db") == []


def test_study_without_a_completed_trial_fails_with_the_first_error(cfg):
    cfg.hpo.space = {"model.num_layers": {"type": "categorical", "choices": [0]}}   # fails
    with pytest.raises(hpo.StudyError, match="no completed trial") as e:
        hpo.main(cfg)
    client = MlflowClient()
    parent = study_run(client, cfg)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["mexp.error"] == str(e.value)
    assert "trial 0" in str(e.value) and "0 pruned, 2 failed" in str(e.value)
    trials = runs_under(client, parent.info.run_id)
    (first,) = [r for r in trials if r.data.tags.get("mexp.trial") == "0"]
    assert first.data.tags["mexp.error"] in str(e.value)       # the trial's own error
    assert "best_config.yaml" not in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert all(r.info.status in TERMINAL for r in trials)


# -- item 6: everything under a dead run is ended ---------------------------------------------

def test_terminate_tree_ends_every_running_run_below_and_keeps_finished_ones(cfg):
    client = MlflowClient()
    exp = client.create_experiment("tree")
    top = client.create_run(exp).info.run_id
    kid = lambda parent: client.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
    a, b = kid(top), kid(top)
    a1, a2 = kid(a), kid(a)
    client.set_terminated(b, "FINISHED")
    a1x = kid(a1)
    ended = terminate_tree(client, top, "KILLED")
    assert set(ended) == {top, a, a1, a2, a1x}
    status = {r: client.get_run(r).info.status for r in (top, a, b, a1, a2, a1x)}
    assert status == {top: "KILLED", a: "KILLED", b: "FINISHED", a1: "KILLED", a2: "KILLED",
                      a1x: "KILLED"}


WORKER_SCRIPT = """
import os, sys, time, optuna
from mlflow.tracking import MlflowClient
url, name, exp_name, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
c = MlflowClient()
exp = (c.get_experiment_by_name(exp_name) or c.get_experiment(c.create_experiment(exp_name)))
study = optuna.create_study(study_name=name, direction="maximize", load_if_exists=True,
                            storage=optuna.storages.RDBStorage(url, heartbeat_interval=1))
if "mlflow_run_id" not in study.user_attrs:     # the first one makes the study's run
    study.set_user_attr("mlflow_run_id", c.create_run(
        exp.experiment_id, run_name=name, tags={"mexp.stage": "hpo"}).info.run_id)
def child(parent, **tags):
    tags["mlflow.parentRunId"] = parent
    return c.create_run(exp.experiment_id, tags=tags).info.run_id
def objective(trial):
    trial.set_user_attr("mexp_worker", "other:%d" % os.getpid())
    trial.set_user_attr("mexp_admitted", True)
    run = child(study.user_attrs["mlflow_run_id"], **{"mexp.trial": str(trial.number)})
    trial.set_user_attr("mlflow_run_id", run)
    fold = child(run)
    runs = [child(fold), fold, run]
    print("RUNNING", run, flush=True)
    time.sleep(seconds)
    for r in runs:
        c.set_terminated(r, "FINISHED")
    return 0.5
study.optimize(objective, n_trials=1)
"""


def other_worker(cfg, seconds):
    """Another process on the study (optuna + mlflow only, heartbeats every second) that
    opens a trial run with a fold run and a run under that, then sleeps `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, hpo_study.storage_url(cfg),
                             cfg.hpo.study_name, cfg.tracking.experiment, str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("RUNNING"), line
    return proc, line.split()[1]


def test_dead_workers_trial_is_failed_and_its_runs_killed_but_a_live_one_is_left(cfg):
    """Worker A is SIGKILLed mid-trial (a fold run and a run under it RUNNING); worker B is
    busy for longer than the grace period. mexp fails A's trial once its heartbeats stop,
    KILLs and tags A's run tree, leaves B alone, and ends with exactly hpo.trials complete."""
    dead, dead_run = other_worker(cfg, 600)
    live, live_run = other_worker(cfg, 3 * HB["grace_period"])
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    try:
        out = hpo.main(cfg)
    finally:
        assert live.wait(timeout=120) == 0                # B was never failed under it
    client = MlflowClient()
    study = optuna.load_study(study_name=cfg.hpo.study_name, storage=hpo_study.storage_url(cfg))
    states = [t.state for t in study.trials]
    assert states[:2] == [TrialState.FAIL, TrialState.COMPLETE] and states.count(
        TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states
    run = client.get_run(dead_run)
    assert run.info.status == "KILLED" and run.data.tags["mexp.trial_state"] == "FAIL (worker died)"
    below = runs_under(client, dead_run)
    assert len(below) == 2 and all(r.info.status == "KILLED" for r in below)
    assert client.get_run(live_run).info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in runs_under(client, live_run))
    parent = client.get_run(out["run_id"])
    assert parent.info.status == "FINISHED" and out["complete"] == 2 and out["failed"] == 1
    assert all(r.info.status in TERMINAL for r in runs_under(client, out["run_id"]))


# -- item 5: the quota is the study's, not a process's ---------------------------------------

def test_admission_counts_done_and_older_in_flight_trials():
    study = optuna.create_study()
    study.tell(study.ask(), 1.0)                           # one done
    older, younger = study.ask(), study.ask()              # both in flight, quota 2
    assert admit(study, older, 2) == (True, 1)             # the younger one is not ahead
    assert admit(study, younger, 2) == (False, 2)          # the older one is
    younger.set_user_attr(ADMITTED, True)                  # a younger one already training
    assert admit(study, older, 2) == (False, 2)
    older.set_user_attr(SKIPPED, "quota met")              # skipped trials take no slot
    assert admit(study, younger, 2) == (True, 1)


def _watch(procs, storage, name, n):
    """Kill (SIGKILL) the first worker seen training a trial; meanwhile check that the
    parent run stays RUNNING while the study is unfinished. (victim pid, violations)."""
    victim, bad, study = None, [], None
    deadline = time.time() + 900
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
        try:
            study = study or optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            continue
        trials = study.get_trials(deepcopy=False)
        parent = study.user_attrs.get(RUN)
        if parent and sum(t.state in hpo_study.DONE for t in trials) < n:
            status = MlflowClient().get_run(parent).info.status
            bad += [status] if status != "RUNNING" else []
        if victim is None:
            for t in trials:
                pid = int(t.user_attrs.get(WORKER, "x:0").rsplit(":", 1)[1])
                if t.state == TrialState.RUNNING and RUN in t.user_attrs and \
                        pid in {p.pid for p in procs}:
                    os.kill(pid, signal.SIGKILL)
                    victim = pid
                    break
    return victim, bad


def three_workers_one_killed(cfg, tmp_path, url):
    """Three `python -m mexp.hpo` processes on one study, one SIGKILLed mid-trial."""
    n = cfg.hpo.trials = 3
    path = save_config(cfg, tmp_path / "hpo.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(3)]
    procs = [subprocess.Popen(hpo_command(path), cwd=tmp_path, env=env, stdout=f,
                              stderr=subprocess.STDOUT) for f in logs]
    try:
        victim, bad = _watch(procs, optuna.storages.RDBStorage(url), cfg.hpo.study_name, n)
    finally:
        for p, f in zip(procs, logs):
            p.kill() if p.poll() is None else None
            p.wait()
            f.close()
    text = "\n".join((tmp_path / f"worker{i}.log").read_text()[-3000:] for i in range(3))
    assert victim is not None, text
    assert [p.returncode for p in procs if p.pid != victim] == [0, 0], text
    assert bad == [], f"the parent run was {bad} before the study finished"

    study = optuna.load_study(study_name=cfg.hpo.study_name, storage=url)
    trials = study.get_trials()
    assert sum(t.state in hpo_study.DONE for t in trials) == n, text   # exactly n
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    failed = [t for t in trials if t.state == TrialState.FAIL and SKIPPED not in t.user_attrs]
    assert failed and all(t.user_attrs[WORKER].endswith(f":{victim}") for t in failed), text

    client = MlflowClient()
    parent = study_run(client, cfg)                        # one, shared by every worker
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == study.user_attrs[RUN]
    assert len(client.get_metric_history(parent.info.run_id, "trials/complete")) == 1   # once
    below = runs_under(client, parent.info.run_id)
    assert all(r.info.status in TERMINAL for r in below)
    killed = [client.get_run(t.user_attrs[RUN]) for t in failed if RUN in t.user_attrs]
    assert killed and all(r.info.status == "KILLED" and
                          r.data.tags["mexp.trial_state"] == "FAIL (worker died)" for r in killed)
    assert all(client.get_run(t.user_attrs[RUN]).data.tags["mlflow.parentRunId"]
               == parent.info.run_id for t in trials if t.state in hpo_study.DONE)
    return parent


def test_three_processes_one_killed_on_sqlite(cfg, tmp_path):
    three_workers_one_killed(cfg, tmp_path, hpo_study.storage_url(cfg))


def test_three_processes_one_killed_on_postgresql(cfg, tmp_path, postgres_url):
    cfg.hpo.storage = postgres_url
    parent = three_workers_one_killed(cfg, tmp_path, postgres_url)
    assert parent.data.tags["mexp.storage"] == postgres_url.replace("mexp:mexp@", "mexp:***@")
