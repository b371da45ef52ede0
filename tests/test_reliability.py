"""Issue #12: resumed and auto-chained runs are never silently wrong, and bad config is
refused before any run is opened."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mexp import extract_features, train_cnn, train_lstm
from mexp.config import ConfigError, load_config
from mexp.tracking.keys import is_neutral
from mexp.tracking.runs import LineageError, ResumeError


@pytest.fixture
def cfg(stage_cfg):
    stage_cfg.output.local = False
    return stage_cfg


def _runs(client, exp_name="mexp"):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], "") if exp else []


def test_resume_with_another_config_is_refused_naming_the_keys(cfg):
    first = train_cnn.main(cfg)
    client = MlflowClient()
    rid = first["run_id"]
    client.set_terminated(rid, "KILLED")               # as a run killed after some folds
    before = len(_runs(client))
    cfg.resume_run_id = rid
    cfg.model.hidden_size, cfg.training.lr = 64, 0.05
    with pytest.raises(ResumeError) as e:
        train_cnn.main(cfg)
    msg = str(e.value)
    assert "model.hidden_size (run: 128, now: 64)" in msg and "training.lr" in msg and rid in msg
    run = client.get_run(rid)
    assert run.info.status == "KILLED" and len(_runs(client)) == before   # nothing changed
    assert run.data.params["training.lr"] == "0.001"


def test_resume_accepts_result_neutral_keys_only(cfg, tmp_path):
    first = train_cnn.main(cfg)
    client = MlflowClient()
    client.set_terminated(first["run_id"], "KILLED")
    cfg.resume_run_id = first["run_id"]
    cfg.output.dir, cfg.output.local = str(tmp_path / "elsewhere"), True
    cfg.training.fold_workers, cfg.training.num_threads = 2, 1
    cfg.tracking.experiment = "mexp"
    again = train_cnn.main(cfg)
    assert again["run_id"] == first["run_id"] and again["uf1"] == first["uf1"]
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    for key in ("output.dir", "tracking.uri", "training.fold_workers", "hpo.trials"):
        assert is_neutral(key)
    for key in ("training.lr", "data.image_size", "model.hidden_size", "training.device",
                "training.seed", "features_run_id"):
        assert not is_neutral(key)


def test_resume_with_changed_frames_is_refused(cfg, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cfg.data.root, root)
    cfg.data.root = str(root)
    first = train_cnn.main(cfg)
    MlflowClient().set_terminated(first["run_id"], "KILLED")
    import os
    clip = sorted(p for p in root.glob("sub01/*") if p.is_dir())[0]
    for f in clip.iterdir():                           # the frames were re-exported
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    cfg.resume_run_id = first["run_id"]
    with pytest.raises(ResumeError, match=f"cannot resume run {first['run_id']}.*started on data"):
        train_cnn.main(cfg)
    assert MlflowClient().get_run(first["run_id"]).info.status == "KILLED"


def test_stale_fold_runs_of_a_killed_run_are_terminated_on_resume(cfg):
    first = train_cnn.main(cfg)
    client = MlflowClient()
    rid = first["run_id"]
    exp = client.get_run(rid).info.experiment_id
    # a fold run in flight when the process died, with no result file on the parent yet
    stale = client.create_run(exp, run_name="fold=k9", tags={"mlflow.parentRunId": rid})
    client.set_terminated(rid, "KILLED")
    cfg.resume_run_id = rid
    train_cnn.main(cfg)
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(stale.info.run_id).data.tags["mexp.terminated"] == "parent found dead"


def test_auto_upstream_matches_input_shape_and_says_which(cfg, capsys):
    cnn = train_cnn.main(cfg)
    cfg.cnn_run_id = cnn["run_id"]
    feats = extract_features.main(cfg)
    cfg.cnn_run_id = ""
    capsys.readouterr()
    lstm = train_lstm.main(cfg)                       # no features_run_id: picked by config
    line = capsys.readouterr().out.strip().splitlines()[-2]
    assert f"extract_features run {feats['run_id']} picked automatically" in line
    assert MlflowClient().get_run(lstm["run_id"]).data.tags["mexp.features_run_id"] == \
        feats["run_id"]
    cfg.data.image_size, cfg.data.sequence_length = 48, 8      # another input shape
    with pytest.raises(LineageError) as e:
        train_lstm.main(cfg)
    msg = str(e.value)
    assert feats["run_id"] in msg and "data.image_size (run: 32, now: 48)" in msg
    assert "data.sequence_length (run: 6, now: 8)" in msg
    cfg.data.image_size, cfg.data.sequence_length = 32, 6
    cfg.training.cv_folds = 4                                   # another fold plan
    with pytest.raises(LineageError, match=r"training\.cv_folds \(run: 3, now: 4\)"):
        train_lstm.main(cfg)


@pytest.mark.parametrize("item, key", [
    ("model.name=nosuchnet", "model.name"), ("training.lr=nan", "training.lr"),
    ("training.lr=inf", "training.lr"), ("training.epochs=-3", "training.epochs"),
    ("training.lr=0", "training.lr"), ("training.weight_decay=-1", "training.weight_decay"),
    ("hpo.trials=0", "hpo.trials"), ("hpo.trials=-1", "hpo.trials"),
    ("repeats=0", "repeats"), ("model.dropout=nan", "model.dropout"),
])
def test_config_alone_errors_name_the_key(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [item])


def test_bad_config_exits_2_before_any_run_or_store_is_touched(tmp_path):
    for item in ("model.name=nosuchnet",):         # the others: in-process above
        r = subprocess.run([sys.executable, "-m", "mexp.train_cnn", item], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert item.split("=")[0] in r.stderr and "Traceback" not in r.stderr
        assert not (Path(tmp_path) / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_end_lines_point_at_the_server_page_not_a_backend_flag(monkeypatch):
    """On a tracking server the next steps give the run's page (no credentials), not
    `mlflow ui --backend-store-uri http://...`."""
    from types import SimpleNamespace

    import mlflow

    from mexp.tracking import summary
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://ann:pw123@mlflow.example:5000/")
    monkeypatch.setattr("mlflow.tracking.MlflowClient.get_run", lambda self, rid: SimpleNamespace(
        info=SimpleNamespace(experiment_id="7")))
    steps = summary.next_steps("train_cnn", "abc123")
    assert "open it at http://mlflow.example:5000/#/experiments/7/runs/abc123" in steps
    assert "pw123" not in steps and "ann" not in steps and "backend-store-uri" not in steps
    assert "python -m mexp.promote promote.run_id=abc123" in steps
    assert "promote" not in summary.next_steps("extract_features", "abc123")


def test_a_run_launched_in_another_experiment_lands_in_the_configured_one(cfg, monkeypatch):
    """`mlflow run . -e train_cnn` without --experiment-name opens its run in Default: the
    stage still logs into `tracking.experiment`, and the launcher run points there."""
    client = MlflowClient()
    launcher = client.create_run("0")                  # what `mlflow run` does
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "0")
    cfg.training.epochs, cfg.training.cv_folds = 1, 2
    out = train_cnn.main(cfg)
    run = client.get_run(out["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "mexp"
    assert client.get_run(launcher.info.run_id).data.tags["mexp.logged_in_experiment"] == "mexp"
    assert not client.search_runs(["0"], "tags.`mexp.stage` = 'train_cnn'")
