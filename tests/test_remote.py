"""Against a real `mlflow server` on loopback: the pipeline with proxied artifacts, promotion and
loading the champion back; basic auth; a stage that cannot reach its server fails fast."""
import subprocess
import sys
import urllib.request

import cv2
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mexp import main as pipeline, promote
from tests.conftest import Server, free_port, venv_env

SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_server(tmp_path, *extra, **env):
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"), *extra]
    return Server(args, tmp_path, venv_env(**SERVER_ENV, **env), f"http://127.0.0.1:{port}")


@pytest.fixture
def remote(tmp_path, monkeypatch):
    srv = start_server(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "client"
    work.mkdir()
    monkeypatch.chdir(work)
    mlflow.set_tracking_uri(srv.url)
    yield srv
    srv.stop()


def test_pipeline_promote_and_load_through_the_server(remote, tiny_cfg, synth_root, tmp_path):
    c = tiny_cfg
    c.data.input, c.data.sequence_length = "diff", 6
    c.training.epochs, c.training.cv_folds, c.training.val_fraction = 2, 3, 0.25
    c.output.local = False
    out = pipeline.main(c)
    client = MlflowClient()
    for key in ("cnn_run_id", "features_run_id", "lstm_run_id"):
        run = client.get_run(out[key])
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert not (tmp_path / "client" / "mlruns").exists()      # nothing written beside the client
    assert (tmp_path / "server-artifacts").is_dir()
    c.promote.run_id = out["lstm_run_id"]
    p = promote.main(c)
    model = mlflow.pyfunc.load_model(f"models:/{p['name']}@champion")
    clip_dir = sorted((synth_root / "sub03").iterdir())[0]
    frames = sorted(clip_dir.glob("*.jpg"), key=lambda f: int(f.stem[3:]))
    clip = np.stack([cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in frames])
    pred = model.predict(clip[None])
    assert len(pred) == 1 and pred["label"][0] in ("happiness", "disgust", "repression",
                                                   "surprise", "fear", "sadness", "others")


def test_basic_auth_refuses_anonymous_and_accepts_credentials(tmp_path, monkeypatch):
    srv = start_server(tmp_path, "--app-name", "basic-auth",
                       MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret",
                       MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD="s3cret-password-42")
    try:
        url = srv.url + "/api/2.0/mlflow/experiments/search?max_results=5"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401
        env = venv_env(MLFLOW_TRACKING_URI=srv.url, MLFLOW_TRACKING_USERNAME="admin",
                       MLFLOW_TRACKING_PASSWORD="s3cret-password-42")
        code = ("import mlflow; mlflow.set_experiment('auth-ok');"
                "r = mlflow.start_run(); mlflow.log_metric('m', 1); mlflow.end_run();"
                "print(mlflow.get_run(r.info.run_id).data.metrics)")
        ok = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "'m': 1.0" in ok.stdout
        env["MLFLOW_TRACKING_PASSWORD"] = "wrong"
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode != 0 and ("401" in bad.stderr or "Unauthorized" in bad.stderr
                                        or "credentials" in bad.stderr.lower())
    finally:
        srv.stop()


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path, synth_root):
    uri = f"http://127.0.0.1:{free_port()}"
    env = venv_env(MLFLOW_TRACKING_URI=uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                   MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    r = subprocess.run([sys.executable, "-m", "mexp.train_cnn", f"data.root={synth_root}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2
    assert uri in r.stderr and "Traceback" not in r.stderr
