"""The tracking server dies in the middle of a stage: the stage stops with one line naming the
server (credentials masked), exit 2, no traceback; once the server is back on the same store,
`resume_run_id` finishes the run, keeps the folds already logged and marks the fold run the
crash left RUNNING as KILLED."""
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
from mlflow.tracking import MlflowClient

from mexp import train_cnn
from mexp.config import save_config
from tests.conftest import Server, venv_env
from tests.test_remote import SERVER_ENV, start_server

PW = "Pw-in-the-uri-7f3a"               # a plain server ignores it; it must never be printed


def _kill(srv: Server) -> None:
    """SIGKILL the server and its workers: a crash, not a clean shutdown."""
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(30)


def _restart(srv: Server, tmp_path) -> Server:
    """The same command, port and store: the server is back."""
    return Server(srv.proc.args, tmp_path, venv_env(**SERVER_ENV), srv.url)


def test_server_lost_mid_run_then_resumed(tiny_cfg, tmp_path, monkeypatch):
    srv = start_server(tmp_path)
    port = srv.url.rsplit(":", 1)[1]
    cfg = tiny_cfg
    cfg.data.input = "diff"
    cfg.training.epochs, cfg.training.cv_folds, cfg.training.val_fraction = 3, 3, 0.25
    cfg.training.num_threads, cfg.output.local = 1, False
    cfg.tracking.uri = f"http://someone:{PW}@127.0.0.1:{port}"
    path = save_config(cfg, tmp_path / "cfg.yaml")
    env = venv_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "mexp.train_cnn", "--config", str(path)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # the server dies while the second fold is being logged (the first one is done:
        # its result file is on the parent), so that fold's run is left RUNNING there
        arts = tmp_path / "server-artifacts"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list(arts.glob("*/*/artifacts/folds/*.json")) and \
                    len(list(arts.glob("*/*/artifacts/confusion_matrix.json"))) >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the stage ended before the server could be killed"
        _kill(srv)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.stop()

    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and PW not in out + err
    [line] = [x for x in err.splitlines() if " ERROR " in x]
    assert f"lost the tracking server http://someone:***@127.0.0.1:{port}" in line, line
    rid = re.search(r"resume_run_id=([0-9a-f]{32})", line).group(1)

    srv, saved = _restart(srv, tmp_path), mlflow.get_tracking_uri()
    try:
        monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            monkeypatch.delenv(var, raising=False)
        mlflow.set_tracking_uri(srv.url)
        client = MlflowClient()
        exp = client.get_run(rid).info.experiment_id
        before = client.search_runs([exp], f"tags.mlflow.parentRunId = '{rid}'")
        stale = {r.info.run_id for r in before if r.info.status == "RUNNING"}
        kept = {r.info.run_id for r in before if r.info.status == "FINISHED"}
        assert stale and kept, [(r.data.tags.get("mexp.fold"), r.info.status) for r in before]

        cfg.resume_run_id = rid
        resumed = train_cnn.main(cfg)
        assert resumed["run_id"] == rid and client.get_run(rid).info.status == "FINISHED"
        after = {r.info.run_id: r for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{rid}'")}
        finished = [r for r in after.values() if r.info.status == "FINISHED"]
        assert sorted(r.data.tags["mexp.fold"] for r in finished) == ["k0", "k1", "k2"]
        assert kept <= {r.info.run_id for r in finished}       # logged folds are not redone
        assert all(after[s].info.status == "KILLED" for s in stale)
        assert resumed["folds"] == 3
    finally:
        mlflow.set_tracking_uri(saved)
        srv.stop()
