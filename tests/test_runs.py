"""The run finder against a real `mlflow server` on loopback (one per module): the default
table hides fold runs, trials and seed runs; filters; credentials never printed; and
resolve_stage_run on pipeline and repeats parents. The run tree is made with the client, tagged
as the stages tag their runs (tests/test_report.py lists real train_cnn runs)."""
import json
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mexp import runs
from mexp.tracking.finder import AmbiguousRunError, resolve_stage_run
from mexp.tracking.runs import LineageError
from tests.conftest import Server, free_port, venv_env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs_server")
    port = free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", f"sqlite:///{d / 'server.db'}",
            "--artifacts-destination", str(d / "artifacts")]
    srv = Server(args, d, venv_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                 f"http://127.0.0.1:{port}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", srv.url)
        mp.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mp.chdir(d)
        mlflow.set_tracking_uri(srv.url)
        yield srv
    srv.stop()


class Tree:
    """Runs made through the server, newest last; ids by name."""

    def __init__(self, client: MlflowClient):
        self.client, self.ids = client, {}
        self.exp = client.create_experiment("mexp")
        self.t = int(time.time() * 1000) - 100_000

    def add(self, name, stage, parent="", status="FINISHED", metrics=None, **tags):
        self.t += 1000
        t = {"mexp.stage": stage} if stage else {}
        t |= {f"mexp.{k}": v for k, v in tags.items()}
        if parent:
            t["mlflow.parentRunId"] = self.ids[parent]
        run = self.client.create_run(self.exp, start_time=self.t, tags=t, run_name=name)
        rid = self.ids[name] = run.info.run_id
        if metrics:
            self.client.log_batch(rid, metrics=[Metric(k, v, self.t, 0) for k, v in metrics.items()])
        self.client.set_terminated(rid, status)
        return rid


def scored(uf1):
    return {"test/uf1": uf1, "test/uar": uf1 + 0.01, "test/accuracy": uf1 + 0.02}


@pytest.fixture(scope="module")
def tree(server):
    tr = Tree(MlflowClient())
    tr.add("cnn", "train_cnn", metrics=scored(0.41), model="cnn", data_digest="d" * 16,
           config_digest="c" * 16)
    for k in ("k0", "k1"):
        tr.add(f"cnn-{k}", "train_cnn:fold", parent="cnn", metrics=scored(0.3), fold=k)
    tr.add("pipe", "main", status="RUNNING")
    tr.add("p-cnn", "train_cnn", parent="pipe", metrics=scored(0.42))
    tr.add("p-feat", "extract_features", parent="pipe", parent_run_id=tr.ids["p-cnn"])
    tr.add("p-lstm", "train_lstm", parent="pipe", metrics=scored(0.51),
           features_run_id=tr.ids["p-feat"])
    tr.client.set_tag(tr.ids["pipe"], "mexp.lstm_run_id", tr.ids["p-lstm"])
    tr.client.log_batch(tr.ids["pipe"], metrics=[Metric("test/uf1", 0.51, tr.t, 0)])
    tr.client.set_terminated(tr.ids["pipe"], "FINISHED")
    tr.add("pipe2", "main", cnn_run_id=tr.ids["p-cnn"], lstm_run_id=tr.ids["p-lstm"])  # reused
    tr.add("rep", "train_lstm:repeats", metrics={"repeats/uf1_mean": 0.5, "repeats/uf1_sd": 0.02,
                                                 "repeats/uar_mean": 0.52, "ensemble/uf1": 0.55},
           repeats="2")
    for s in ("s1", "s2"):
        tr.add(f"rep-{s}", "train_lstm", parent="rep", metrics=scored(0.5))
    tr.client.set_tag(tr.ids["rep"], "mexp.repeat_run_ids", f"{tr.ids['rep-s1']},{tr.ids['rep-s2']}")
    tr.add("rep1", "train_lstm:repeats", repeats="1")
    tr.add("rep1-s", "train_lstm", parent="rep1", metrics=scored(0.47))
    tr.client.set_tag(tr.ids["rep1"], "mexp.repeat_run_ids", tr.ids["rep1-s"])
    tr.add("hpo", "hpo", hpo_stage="train_lstm", metrics={"best/uf1": 0.6})
    tr.add("trial", "hpo:trial", parent="hpo", metrics=scored(0.6))
    tr.client.set_tag(tr.ids["hpo"], "mexp.best_run_id", tr.ids["trial"])
    tr.add("failed", "train_lstm", status="FAILED")
    tr.add("untagged", "")
    return tr


def listed(capsys, *argv):
    out = runs.main([*argv])
    return [r["run_id"] for r in out["runs"]], out, capsys.readouterr().out


def test_default_table_hides_children_and_ends_with_next_steps(tree, server, capsys):
    ids, out, text = listed(capsys, "--tracking-uri", server.url)
    names = {v: k for k, v in tree.ids.items()}
    assert [names[i] for i in ids] == ["failed", "hpo", "rep1", "rep", "pipe2", "p-lstm",
                                       "p-feat", "p-cnn", "pipe", "cnn"]      # newest first
    rep = next(r for r in out["runs"] if r["run_id"] == tree.ids["rep"])
    assert (rep["kind"], rep["seeds"], rep["uf1_sd"], rep["ensemble_uf1"]) == ("repeats", 2, 0.02, 0.55)
    lines = text.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "id", "stage", "status"]
    cnn_line = next(x for x in lines if x.startswith(tree.ids["cnn"]))
    assert "0.4100" in cnn_line and "dddddddd" in cnn_line and "cccccccc" in cnn_line
    assert "0.5000±0.0200" in next(x for x in lines if x.startswith(tree.ids["rep"]))
    assert f"features={tree.ids['p-feat'][:8]}" in next(x for x in lines
                                                        if x.startswith(tree.ids["p-lstm"]))
    last = lines[-1]
    assert last.startswith("10 run(s) in experiment 'mexp'")
    flag = f" --tracking-uri {server.url};"
    assert f"python -m mexp.evaluate --run-id {tree.ids['rep']}{flag}" in last
    assert f"python -m mexp.report --runs {tree.ids['rep']},{tree.ids['p-lstm']}{flag}" in last
    assert f"{server.url}/#/experiments/{tree.exp}" in last


def test_filters_by_stage_status_and_all(tree, server, capsys):
    n = {v: k for k, v in tree.ids.items()}
    ids, *_ = listed(capsys, "--stage", "train_lstm")
    assert [n[i] for i in ids] == ["failed", "rep1", "rep", "p-lstm"]
    ids, *_ = listed(capsys, "--stage", "train_lstm", "--status", "finished", "--limit", "2")
    assert [n[i] for i in ids] == ["rep1", "rep"]
    ids, *_ = listed(capsys, "--stage", "train_lstm", "--all")
    assert {"rep-s1", "rep-s2", "rep1-s"} <= {n[i] for i in ids}
    ids, *_ = listed(capsys, "--stage", "train_cnn:fold")
    assert [n[i] for i in ids] == ["cnn-k1", "cnn-k0"]
    ids, *_ = listed(capsys, "--all", "--limit", "100")
    assert set(ids) == set(tree.ids.values())
    with pytest.raises(SystemExit) as e:
        runs.main(["--status", "DONE"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        runs.main(["--experiment", "nope"])
    assert e.value.code == 2


def test_cli_json_through_a_url_with_a_password_prints_no_secret(tree, server):
    url = server.url.replace("http://", "http://alice:pw-s3cret@")
    env = venv_env()
    env.pop("MLFLOW_TRACKING_URI")                 # the flag alone says where
    r = subprocess.run([sys.executable, "-m", "mexp.runs", "--tracking-uri", url, "--json",
                        "--stage", "hpo", "--all"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pw-s3cret" not in r.stdout + r.stderr
    rows = json.loads(r.stdout)
    assert [x["run_id"] for x in rows] == [tree.ids["trial"], tree.ids["hpo"]]
    assert rows[1]["kind"] == "best" and rows[1]["uf1"] == 0.6
    assert rows[1]["upstream"] == {"best": tree.ids["trial"]}
    assert (f"next: python -m mexp.evaluate --run-id {tree.ids['trial']} --tracking-uri "
            f"http://alice:***@127.0.0.1") in r.stderr


def test_resolve_stage_run_on_pipeline_and_repeats_parents(tree):
    i = tree.ids
    assert resolve_stage_run(i["p-lstm"], "train_lstm") == i["p-lstm"]
    assert resolve_stage_run(i["pipe"], "train_lstm") == i["p-lstm"]           # by tag
    assert resolve_stage_run(i["pipe"], "extract_features") == i["p-feat"]     # by nesting
    assert resolve_stage_run(i["pipe2"], "train_cnn") == i["p-cnn"]            # reused, by tag
    assert resolve_stage_run(i["rep1"], "train_lstm") == i["rep1-s"]
    assert resolve_stage_run(i["rep"], "train_lstm", allow_parent=True) == i["rep"]
    with pytest.raises(AmbiguousRunError) as e:
        resolve_stage_run(i["rep"], "train_lstm")
    assert set(e.value.candidates) == {i["rep-s1"], i["rep-s2"]}
    assert i["rep-s1"] in str(e.value) and i["rep-s2"] in str(e.value) and i["rep"] in str(e.value)
    with pytest.raises(LineageError, match=f"pipeline run {i['pipe']} has no train_roi run.*"
                                           f"train_lstm {i['p-lstm']}"):
        resolve_stage_run(i["pipe"], "train_roi")
    with pytest.raises(LineageError, match=f"run {i['hpo']} is a 'hpo' run.*best trial is run "
                                           f"{i['trial']}"):
        resolve_stage_run(i["hpo"], "train_lstm")
    with pytest.raises(LineageError, match=f"run {i['cnn']} is a 'train_cnn' run, not a 'train_lstm'"):
        resolve_stage_run(i["cnn"], "train_lstm")
    with pytest.raises(LineageError, match="run id 'f00' not found on http://127.0.0.1"):
        resolve_stage_run("f00", "train_lstm")
