"""kill -9 in the middle of a fold, then resume_run_id: finished folds are kept, not recomputed,
and the pooled metrics equal an uninterrupted run's."""
import os
import signal
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from mexp import train_cnn
from mexp.config import save_config


def test_resume_after_kill_9(tiny_cfg, tracking, tmp_path):
    cfg = tiny_cfg
    cfg.data.input = "diff"
    cfg.training.epochs = 8
    cfg.training.cv_folds = 3
    cfg.training.val_fraction = 0.25
    cfg.training.num_threads = 1
    cfg.output.local = False
    path = save_config(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    proc = subprocess.Popen([sys.executable, "-m", "mexp.train_cnn", "--config", str(path)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list(tmp_path.glob("mlruns/*/*/artifacts/folds/*.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be killed"
    time.sleep(0.5)                                           # now inside the second fold
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    client = MlflowClient()
    exp = client.get_experiment_by_name("mexp")
    [killed] = client.search_runs([exp.experiment_id], "tags.`mexp.stage` = 'train_cnn' and "
                                  "attributes.status = 'RUNNING' and attributes.run_name = 'train_cnn'")
    rid = killed.info.run_id
    done = {a.path for a in client.list_artifacts(rid, "folds")}
    assert 1 <= len(done) < 3
    first_fold_runs = client.search_runs([exp.experiment_id],
                                         f"tags.mlflow.parentRunId = '{rid}'")

    cfg.resume_run_id = rid
    resumed = train_cnn.main(cfg)
    assert resumed["run_id"] == rid and client.get_run(rid).info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert sorted(c.data.tags["mexp.fold"] for c in finished) == ["k0", "k1", "k2"]
    kept = {c.info.run_id for c in first_fold_runs if c.info.status == "FINISHED"}
    assert kept <= {c.info.run_id for c in finished}          # completed folds not recomputed
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)

    cfg.resume_run_id = ""
    fresh = train_cnn.main(cfg)
    assert (resumed["uf1"], resumed["uar"], resumed["accuracy"]) == \
        (fresh["uf1"], fresh["uar"], fresh["accuracy"])


def test_fold_results_include_composite_subject_folds(tracking):
    """Composite LOSO folds are named `casme2/sub01`: their result files sit in sub-folders,
    and both resume and the refit's epoch count must find them."""
    import mlflow

    from mexp.tracking.folds import _completed
    from mexp.serving.refit import final_epochs
    mlflow.set_experiment("fold-results")            # this test's own store
    with mlflow.start_run() as run:
        for name, epoch in (("casme2/sub01", 10), ("samm/006", 20), ("k0", 30)):
            mlflow.log_dict({"fold": name, "best_epoch": epoch}, f"folds/{name}.json")
    assert set(_completed(run.info.run_id)) == {"casme2/sub01", "samm/006", "k0"}
    assert final_epochs(run.info.run_id, fallback=99) == 20
