"""Shared fixtures: tiny synthetic data, the reference data folder, a per-test tracking store."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from mexp.config import Config, SynthConfig
from mexp.data.datasets import shared_data_dir
from mexp.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not (d / "annotations").is_dir():
        pytest.skip(f"reference data not found at {d} (set MEXP_DATA)")
    return d


@pytest.fixture(scope="session")
def annotations(shared_data) -> Path:
    return shared_data / "annotations"


def flow28_slice(shared_data: Path, dest: Path, subjects) -> Path:
    """index.csv of `subjects` with their flow PNGs, in the MEGC2019 benchmark's own layout."""
    import pandas as pd
    src = shared_data / "megc2019_flow28"
    index = pd.read_csv(src / "index.csv", dtype={"subject": str})
    index = index[index["subject"].isin(subjects)]
    (dest / "flow").mkdir()
    for png in index["flow_png"]:
        shutil.copy(src / png, dest / png)
    index.to_csv(dest / "index.csv", index=False)
    return dest


def tiny_synth(**kw) -> SynthConfig:
    base = dict(subjects=6, clips=42, frames=12, image_size=48, seed=3)
    base.update(kw)
    return SynthConfig(**base)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset, generated once per session (read-only for tests)."""
    root = tmp_path_factory.mktemp("synth")
    generate(tiny_synth(), root)
    return root


@pytest.fixture
def tiny_cfg(synth_root, tmp_path) -> Config:
    cfg = Config()
    cfg.data.root = str(synth_root)
    cfg.data.image_size = 32
    cfg.data.sequence_length = 8
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.output.dir = str(tmp_path / "out")
    return cfg


@pytest.fixture
def stage_cfg(tiny_cfg, tracking) -> Config:
    """The tiny config the stage tests share: diff input, 6 frames, 3 folds, 2 epochs."""
    c = tiny_cfg
    c.data.input = "diff"
    c.data.sequence_length = 6
    c.training.epochs = 2
    c.training.batch_size = 16
    c.training.cv_folds = 3
    c.training.val_fraction = 0.25
    c.training.seed = 7
    return c


@contextmanager
def store_at(folder: Path):
    """MLflow pointed (variable, global, working directory) at a fresh SQLite store in
    `folder`, for a module's tests to share: creating a store's tables costs seconds."""
    import mlflow
    uri, before = f"sqlite:///{folder / 'mlflow.db'}", mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(folder)
        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(before)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)      # the in-process global wins over the variable
    return uri


def _pg(*args, check=False):
    return subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                          text=True, check=check)


@pytest.fixture(scope="session")
def postgres_url():
    """A real local PostgreSQL (Debian's package): started here, a role and database made."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin")) if Path("/usr/lib/postgresql").exists() else []
    if not shutil.which("pg_ctlcluster") or not versions:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    version = versions[-1].parent.name
    subprocess.run(["pg_ctlcluster", version, "main", "start"], capture_output=True)
    for _ in range(100):
        if subprocess.run(["pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("PostgreSQL did not start (pg_ctlcluster %s main start)" % version)
    _pg("psql", "-c", "CREATE ROLE mexp LOGIN PASSWORD 'mexp'")
    _pg("psql", "-c", "CREATE DATABASE mexp_test OWNER mexp")
    return "postgresql+psycopg2://mexp:mexp@127.0.0.1:5432/mexp_test"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_env(**extra) -> dict:
    """The environment for a subprocess that runs this venv's `mlflow` (as with it active)."""
    import sys
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


class Server:
    """A real process on a loopback port, stopped (with its children) at teardown."""

    def __init__(self, args, cwd, env, url, ready_path="/health", timeout=120):
        import urllib.request
        self.url = url
        self.log = Path(cwd) / f"server-{url.rsplit(':', 1)[-1]}.log"
        with open(self.log, "wb") as out:       # a file, not a pipe: a full pipe blocks the server
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args[:3]} exited: {self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + ready_path, timeout=2)
                return
            except Exception as e:  # not up yet (refused) or answering 401 (auth): both fine
                if getattr(e, "code", None) == 401:
                    return
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{args[:3]} did not answer on {url} in {timeout} s")

    def stop(self):
        import signal
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def batched_fits(monkeypatch) -> list:
    """The replicas of every `fit_batched` call the cross-validation makes (one list per
    vectorised model), recorded as they go to the real function."""
    from mexp.engine import batching
    calls, real = [], batching.fit_batched

    def recorded(make_model, X, y, reps, *a, **kw):
        calls.append(list(reps))
        return real(make_model, X, y, reps, *a, **kw)
    monkeypatch.setattr(batching, "fit_batched", recorded)
    return calls
