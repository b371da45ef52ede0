"""The command line and MLproject: entry points resolve, errors are one clear line,
and `mlflow run . -e train_lstm --env-manager local` works on a features run."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from mexp import extract_features, train_cnn

ROOT = Path(__file__).resolve().parents[1]


def test_every_mlproject_entry_point_has_a_module_with_main():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    for name, ep in project["entry_points"].items():
        assert set(ep["parameters"]) == {"config", "overrides"}, name
        module = ep["command"].split()[2]
        assert callable(importlib.import_module(module).main), name
        cfg = ep["parameters"]["config"]["default"]
        assert (ROOT / cfg).is_file(), cfg


def test_config_typo_exits_2_naming_the_key(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mexp.synthesize", "--config",
                        str(ROOT / "configs/synthetic.yaml"), "synth.clipz=3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown config key 'synth.clipz'" in r.stderr and "synth.clips" in r.stderr
    assert "Traceback" not in r.stderr


def test_mlflow_run_train_lstm_entry_point(tiny_cfg, tracking, tmp_path):
    tiny_cfg.training.epochs = 1
    tiny_cfg.training.cv_folds = 2
    tiny_cfg.data.sequence_length = 4
    tiny_cfg.output.local = False
    cnn = train_cnn.main(tiny_cfg)
    tiny_cfg.cnn_run_id = cnn["run_id"]
    feats = extract_features.main(tiny_cfg)
    overrides = (f"features_run_id={feats['run_id']} training.epochs=2 output.local=false "
                 f"data.root={tiny_cfg.data.root}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}
    env["MLFLOW_TRACKING_URI"] = tracking
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # venv active
    r = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train_lstm",
                        "--env-manager", "local", "--experiment-name", "mexp",
                        "-P", f"overrides={overrides}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train_lstm: UF1" in r.stdout
    client = MlflowClient()
    exp = client.get_experiment_by_name("mexp")
    [run] = client.search_runs([exp.experiment_id], "tags.`mexp.stage` = 'train_lstm'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mexp.features_run_id"] == feats["run_id"]
    assert run.data.params["training.epochs"] == "2"
    assert "test/uf1" in run.data.metrics
