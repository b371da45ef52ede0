"""Credentials never leave the process in clear: not in params, tags, config.yaml or any other
artifact on the server, not in log lines, prints, error messages or tracebacks; MLflow itself
still gets the real URI. Checked against a real `mlflow server --app-name basic-auth`."""
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mexp import cli
from mexp.config import Config, save_config
from mexp.util.secrets import (MASK, install_log_filter, is_secret_key, redact, redact_tree,
                          redacted_output)
from mexp.tracking.runs import TrackingError, configure, stage_run
from tests.conftest import venv_env
from tests.test_remote import start_server

ADMIN_PW = "adm1n-Pw-4e7c1f09"          # the server's admin password, used in the URI
PG_PW = "pg-Secret-93b2d"               # a PostgreSQL password in hpo.storage
PG_URL = f"postgresql+psycopg2://mexp:{PG_PW}@db.invalid:5432/mexp_optuna"


@pytest.mark.parametrize("text, want", [
    ("http://admin:pw123@host:5000/api", f"http://admin:{MASK}@host:5000/api"),
    ("postgresql+psycopg2://u:p@ss@db/x", f"postgresql+psycopg2://u:{MASK}@db/x"),
    ("https://tok3n@host/x", f"https://{MASK}@host/x"),
    ("https://host/x?token=abc&b=1", f"https://host/x?token={MASK}&b=1"),
    ("MLFLOW_TRACKING_PASSWORD=xyz", f"MLFLOW_TRACKING_PASSWORD={MASK}"),
    ("{'password': 'abc'}", f"{{'password': '{MASK}'}}"),
    ("Authorization: Basic YWRtaW46cHc=", f"Authorization: Basic {MASK}"),
    # left alone: no credential in them
    ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("mlflow-artifacts:/1/abc/artifacts", "mlflow-artifacts:/1/abc/artifacts"),
    ("mail me@example.com", "mail me@example.com"),
    ("n_passes=3 author: me max_tokens: 5", "n_passes=3 author: me max_tokens: 5"),
])
def test_redact(text, want):
    assert redact(text) == want
    assert redact(want) == want                  # idempotent


def test_redact_tree_masks_by_key_name_and_by_content():
    tree = {"tracking": {"uri": "http://a:b@h"}, "hpo": {"storage": PG_URL},
            "db": {"password": "x", "port": 5432}, "data": {"root": "data/synthetic"}}
    out = redact_tree(tree)
    assert out["tracking"]["uri"] == f"http://a:{MASK}@h" and PG_PW not in out["hpo"]["storage"]
    assert out["db"] == {"password": MASK, "port": 5432} and out["data"] == tree["data"]
    assert tree["db"]["password"] == "x"          # a copy: the real config is untouched
    assert [k for k in ("password", "db_password", "api_key", "MLFLOW_TRACKING_TOKEN",
                        "storage", "uri", "tokens", "monkey") if is_secret_key(k)] == \
        ["password", "db_password", "api_key", "MLFLOW_TRACKING_TOKEN"]


def test_log_records_are_redacted_whatever_their_handler():
    """MLflow's loggers have their own handlers and do not propagate: a filter on the root
    handlers alone would miss them."""
    install_log_filter()
    buf = io.StringIO()
    lg = logging.getLogger("mexp-test-own-handler")
    lg.propagate, lg.level = False, logging.INFO
    lg.addHandler(logging.StreamHandler(buf))
    try:
        lg.info("API request to %s failed", f"http://admin:{ADMIN_PW}@h/api")
        try:
            raise RuntimeError(f"cannot reach {PG_URL}")
        except RuntimeError:
            lg.exception("lost it")
    finally:
        lg.handlers.clear()
    assert ADMIN_PW not in buf.getvalue() and PG_PW not in buf.getvalue()
    assert f"admin:{MASK}@h" in buf.getvalue() and "Traceback" in buf.getvalue()


def test_cli_masks_prints_and_tracebacks(capfd):
    def main(cfg):
        print(f"see it with: mlflow ui --backend-store-uri http://admin:{ADMIN_PW}@h")
        raise RuntimeError(f"bug while talking to {PG_URL}")
    with pytest.raises(SystemExit) as e:
        cli.run(main, "test", argv=[])
    out, err = capfd.readouterr()
    assert e.value.code == 1 and "Traceback" in err and "RuntimeError" in err
    assert ADMIN_PW not in out + err and PG_PW not in out + err
    with redacted_output():
        print(f"http://u:{ADMIN_PW}@h")
    assert ADMIN_PW not in capfd.readouterr().out


def test_params_tags_and_config_yaml_are_masked_digest_is_not(tiny_cfg, tracking):
    cfg = tiny_cfg
    cfg.hpo.storage = PG_URL
    with stage_run(cfg, "probe", tags={"mexp.storage_url": PG_URL}) as run:
        rid = run.info.run_id
    r = MlflowClient().get_run(rid)
    assert r.data.params["hpo.storage"] == f"postgresql+psycopg2://mexp:{MASK}@db.invalid:5432/mexp_optuna"
    assert PG_PW not in str(r.data.tags) and r.data.tags["mexp.config_digest"] == cfg.digest()
    with tempfile.TemporaryDirectory() as d:
        text = Path(mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="config.yaml",
                                                        dst_path=d)).read_text()
    assert PG_PW not in text and yaml.safe_load(text)["hpo"]["storage"] == r.data.params["hpo.storage"]
    assert cfg.hpo.storage == PG_URL                # the run's own config keeps the real value


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("auth-server")
    srv = start_server(d, "--app-name", "basic-auth",
                       MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key-0123",
                       MLFLOW_AUTH_ADMIN_USERNAME="admin", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PW)
    yield srv
    os.killpg(srv.proc.pid, signal.SIGKILL)     # a throwaway store: no need to wait 5 s
    srv.proc.wait(30)


def _client_env(**extra) -> dict:
    env = venv_env(**extra)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _everything_on_the_server(client: MlflowClient, dst: Path) -> str:
    """Params, tags, dataset inputs and every artifact file of every run, as one text."""
    parts = []
    for exp in client.search_experiments():
        parts.append(f"{exp.name} {exp.artifact_location} {exp.tags}")
        for run in client.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            parts += [str(run.data.params), str(run.data.tags), str(run.inputs),
                      str(run.info.run_name)]
            root = Path(client.download_artifacts(rid, "", str(dst / rid)))
            parts += [p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_credentials_in_the_uri_never_reach_the_server_or_the_terminal(
        auth_server, tiny_cfg, tmp_path, monkeypatch):
    port = auth_server.url.rsplit(":", 1)[1]
    uri = f"http://admin:{ADMIN_PW}@127.0.0.1:{port}"
    cfg = tiny_cfg          # one CNN on all subjects: few requests (each costs the server a
    cfg.training.epochs, cfg.output.local = 1, False        # scrypt check under basic auth)
    cfg.stage1.scope = "all_subjects"
    cfg.tracking.uri, cfg.tracking.experiment = uri, "secrets"
    path = save_config(cfg, tmp_path / "cfg.yaml")
    r = subprocess.run([sys.executable, "-m", "mexp.train_cnn", "--config", str(path),
                        f"hpo.storage={PG_URL}"], cwd=tmp_path, env=_client_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train_cnn: one CNN on all subjects" in r.stdout
    assert ADMIN_PW not in r.stdout + r.stderr and PG_PW not in r.stdout + r.stderr

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PW)
    client = MlflowClient(tracking_uri=auth_server.url)
    [run] = client.search_runs([client.get_experiment_by_name("secrets").experiment_id],
                               "tags.`mexp.stage` = 'train_cnn'")
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == f"http://admin:{MASK}@127.0.0.1:{port}"
    assert PG_PW not in run.data.params["hpo.storage"]
    everything = _everything_on_the_server(client, tmp_path / "downloaded")
    assert "config.yaml" in str(list(tmp_path.glob("downloaded/*/*")))
    assert ADMIN_PW not in everything and PG_PW not in everything


def test_a_wrong_password_fails_naming_the_server_without_it(auth_server, monkeypatch):
    """401 from the server: one TrackingError (the CLI prints it as one line, exit 2)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    port = auth_server.url.rsplit(":", 1)[1]
    wrong = "Wrong-pw-5d1e2a"
    cfg = Config()
    cfg.tracking.uri = f"http://admin:{wrong}@127.0.0.1:{port}"
    saved = mlflow.get_tracking_uri()
    try:
        with pytest.raises(TrackingError) as e:
            configure(cfg)
    finally:
        mlflow.set_tracking_uri(saved)
    msg = str(e.value)
    assert wrong not in msg and f"http://admin:{MASK}@127.0.0.1:{port}" in msg
    assert "401" in msg or "nauthorized" in msg or "credentials" in msg.lower(), msg
