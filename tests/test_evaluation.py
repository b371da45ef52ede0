"""Evaluation a reviewer can trust: predictions.csv reproduces the metrics, seed repeats,
database protocols, and the safeguards that stop a leaking run."""
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mexp.tracking import evaluation
from mexp import train_cnn
from mexp.engine.plans import FoldPlanError, check_plan, make_plan
from mexp.engine.metrics import scores


@pytest.fixture
def cfg(tiny_cfg, tracking):
    c = tiny_cfg
    c.data.input = "diff"
    c.training.epochs, c.training.cv_folds, c.training.val_fraction = 2, 3, 0.25
    c.output.local = False
    return c


def test_predictions_csv_reproduces_every_logged_metric(cfg, tracking, tmp_path):
    run = train_cnn.main(cfg)
    report, bad = evaluation.evaluate(run["run_id"])
    assert bad == [] and report["pooled"]["uf1"] == pytest.approx(run["uf1"])
    assert set(report["per_class"]) == set(["happiness", "disgust", "repression", "surprise",
                                             "fear", "sadness", "others"])
    assert len(report["per_subject"]) == 6
    r = subprocess.run([sys.executable, "-m", "mexp.evaluate", "--run-id", run["run_id"],
                        "--tracking-uri", tracking], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and "reproduced exactly" in r.stdout
    # tamper with a logged metric: the command must notice
    MlflowClient().log_metric(run["run_id"], "test/uf1", run["uf1"] + 0.1)
    r = subprocess.run([sys.executable, "-m", "mexp.evaluate", "--run-id", run["run_id"],
                        "--tracking-uri", tracking], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 1 and "MISMATCH" in r.stdout and "test/uf1" in r.stdout


def test_seed_repeats_log_mean_and_sd(cfg, capsys):
    cfg.repeats = 2
    cfg.training.epochs = 1
    out = train_cnn.main(cfg)
    client = MlflowClient()
    parent = client.get_run(out["run_id"])
    kids = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{out['run_id']}'")
    assert len(kids) == 2
    assert sorted(k.data.params["training.seed"] for k in kids) == ["42", "43"]
    ufs = [r["uf1"] for r in out["repeats"]]
    assert parent.data.metrics["repeats/uf1_mean"] == pytest.approx(np.mean(ufs))
    assert parent.data.metrics["repeats/uf1_sd"] == pytest.approx(np.std(ufs, ddof=1))
    assert "±" in capsys.readouterr().out
    # the seed ensemble, recomputed here from the two repeats' own predictions
    with tempfile.TemporaryDirectory() as d:
        preds = [pd.read_csv(client.download_artifacts(r["run_id"], "predictions.csv", d + f"/{i}"))
                 .sort_values("sample_id") for i, r in enumerate(out["repeats"])]
    cols = [c for c in preds[0] if c.startswith("prob_")]
    avg = (preds[0][cols].to_numpy() + preds[1][cols].to_numpy()) / 2
    want = scores(preds[0]["label"].to_numpy(), avg.argmax(1), len(cols))["uf1"]
    assert parent.data.metrics["ensemble/uf1"] == pytest.approx(want, abs=1e-6)
    assert out["ensemble"]["uf1"] == pytest.approx(want, abs=1e-6)
    assert "ensemble_predictions.csv" in {a.path for a in client.list_artifacts(out["run_id"])}
    report, bad = evaluation.evaluate(out["run_id"])      # the parent: its ensemble is checked
    assert bad == [] and "ensemble/uf1" in report["checked"]


def _composite():
    ids, subj, dbs = [], [], []
    for db, n in (("casme2", 3), ("samm", 3), ("smic", 2)):
        for s in range(n):
            for k in range(4):
                ids.append(f"{db}-{s}-{k}")
                subj.append(f"{db}/s{s}")
                dbs.append(db)
    return ids, subj, [i % 3 for i in range(len(ids))], dbs


def test_leave_one_database_out_and_holdout_plans():
    ids, subj, y, dbs = _composite()
    lodo = make_plan(ids, subj, y, method="LODO", databases=dbs, val_fraction=0.25)
    assert [f.name for f in lodo.folds] == ["casme2", "samm", "smic"]
    for f in lodo.folds:
        assert {s.split("/")[0] for s in f.test_subjects} == {f.name}
        assert f.name not in {s.split("/")[0] for s in f.train_subjects + f.val_subjects}
    hold = make_plan(ids, subj, y, method="holdout", databases=dbs, holdout_test="smic",
                     holdout_train="casme2", val_fraction=0.0)
    [f] = hold.folds
    assert f.name == "holdout-smic" and all(s.startswith("casme2/") for s in f.train_subjects)
    assert len(f.unused_ids) == 12                                  # samm: in neither side
    check_plan(hold, ids)
    assert hold.digest != lodo.digest
    with pytest.raises(FoldPlanError, match="holdout_test 'dfme' is not one of"):
        make_plan(ids, subj, y, method="holdout", databases=dbs, holdout_test="dfme")
    with pytest.raises(FoldPlanError, match="at least 2 databases"):
        make_plan(ids[:12], subj[:12], y[:12], method="LODO", databases=dbs[:12])


def test_safeguard_stops_a_database_on_both_sides():
    ids, subj, y, dbs = _composite()
    plan = make_plan(ids, subj, y, method="LODO", databases=dbs, val_fraction=0.0)
    plan.folds[0].train_subjects.append("casme2/s9")               # casme2 is the test db
    with pytest.raises(FoldPlanError, match="database.*casme2.*both"):
        check_plan(plan)


def test_lodo_on_the_megc2019_flow_benchmark(tiny_cfg, tracking, shared_data, monkeypatch):
    monkeypatch.setenv("MEXP_FLOW28", str(shared_data / "megc2019_flow28"))
    c = tiny_cfg
    c.data.dataset, c.data.root, c.data.label_map = "megc2019_flow28", "", "megc2019_3"
    c.model.name, c.model.num_classes, c.model.input_channels, c.model.width = "flow_cnn", 3, 3, 8
    c.training.cv_method, c.training.epochs, c.training.val_fraction = "LODO", 1, 0.0
    c.output.local = False
    c.repeats = 2                                   # seed repeats on the real benchmark too
    out = train_cnn.main(c)
    assert len(out["repeats"]) == 2
    assert out["uf1_sd"] == pytest.approx(np.std([r["uf1"] for r in out["repeats"]], ddof=1))
    assert out["repeats"][0]["run_id"] != out["repeats"][1]["run_id"]
    first = out["repeats"][0]
    assert first["folds"] == 3 and set(first["per_database"]) == {"casme2", "samm", "smic"}
    report, bad = evaluation.evaluate(first["run_id"])
    assert bad == [] and report["pooled"]["n"] == 442


def test_oracle_runs_are_labelled_and_prefixed(cfg, capsys):
    cfg.evaluation.oracle = True
    out = train_cnn.main(cfg)
    run = MlflowClient().get_run(out["run_id"])
    assert run.data.tags["mexp.oracle"] == "true"
    assert "oracle/uf1" in run.data.metrics and "test/uf1" not in run.data.metrics
    assert "ORACLE" in capsys.readouterr().out
    report, bad = evaluation.evaluate(out["run_id"])
    assert bad == []
