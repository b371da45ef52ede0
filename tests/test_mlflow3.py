"""MLflow 3's own concepts on mexp's runs: fold models as LoggedModels with linked metrics that
`search_logged_models` ranks, system metrics on stage runs, the promoted pyfunc logged from code
with a signature and an input example."""
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from mexp import promote, train_cnn
from mexp.config import Config
from mexp.engine.crossval import FoldOutput
from mexp.engine.training import FitResult
from mexp.tracking.logged_models import (FOLD_MODEL_TYPE, fail_pending_models, late_params,
                                         open_fold_model, save_fold_model)
from mexp.tracking.runs import stage_run

ENV = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2", "MEXP_SYSTEM_METRICS": None}


@pytest.fixture(scope="module")
def _trained(synth_root, tmp_path_factory):
    """One tiny train_cnn run (3 folds) and its promotion, in a store of this module's own."""
    d = tmp_path_factory.mktemp("mlflow3")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d / 'mlflow.db'}")
    for k, v in ENV.items():
        mp.delenv(k, raising=False) if v is None else mp.setenv(k, v)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        mp.delenv(var, raising=False)
    mp.chdir(d)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        cfg = Config()
        cfg.data.root, cfg.data.image_size, cfg.data.sequence_length = str(synth_root), 32, 6
        cfg.data.input, cfg.data.cache_dir = "diff", str(d / "cache")
        cfg.training.epochs, cfg.training.batch_size, cfg.training.cv_folds = 1, 16, 3
        cfg.training.val_fraction, cfg.output.local = 0.25, False
        run = train_cnn.main(cfg)
        cfg.promote.run_id = run["run_id"]
        promoted = promote.main(cfg)
        yield cfg, run, promoted
    finally:
        mlflow.set_tracking_uri(saved)
        mp.undo()


@pytest.fixture
def trained(_trained, monkeypatch):
    """The module's runs, with the tracking store pointed back at theirs."""
    uri = f"sqlite:///{Path(_trained[0].data.cache_dir).parent / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    yield _trained
    mlflow.set_tracking_uri(saved)


def _folds(client, run):
    return client.search_runs([client.get_run(run["run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{run['run_id']}'")


def test_each_fold_model_is_a_logged_model_ranked_by_its_test_uf1(trained):
    _, run, _ = trained
    client = MlflowClient()
    exp = client.get_run(run["run_id"]).info.experiment_id
    folds = {f.info.run_id: f for f in _folds(client, run)}
    ranked = mlflow.search_logged_models(
        experiment_ids=[exp], filter_string="params.stage = 'train_cnn'",
        order_by=[{"field_name": "metrics.test/uf1", "ascending": False}], output_format="list")
    assert len(ranked) == len(folds) == 3
    assert {m.source_run_id for m in ranked} == set(folds)          # one per fold, linked to it
    uf1 = [{x.key: x for x in m.metrics}["test/uf1"] for m in ranked]
    assert [u.value for u in uf1] == sorted((u.value for u in uf1), reverse=True)
    for m, u in zip(ranked, uf1):
        fold = folds[m.source_run_id]
        assert u.run_id == fold.info.run_id and u.value == fold.data.metrics["test/uf1"]
        assert m.model_type == FOLD_MODEL_TYPE and m.status == "READY"
        assert m.params["fold"] == fold.data.tags["mexp.fold"] and m.params["model"] == "cnn"
        assert {"best_epoch", "test/uar", "test/accuracy"} <= {x.key for x in m.metrics}
        assert m.model_id in {o.model_id for o in fold.outputs.model_outputs}
        info = mlflow.models.get_model_info(f"models:/{m.model_id}")
        assert info.signature.outputs.inputs[0].shape == (-1, 7)    # logits of the 7 classes
        files = {a.path for a in client.list_logged_model_artifacts(m.model_id)}
        assert {"model.pth", "MLmodel"} <= files
        assert "model.pth" in {a.path for a in client.list_artifacts(fold.info.run_id)}
    # the LoggedModel's weights are the fold run's weights
    best = ranked[0]
    mine = torch.load(mlflow.artifacts.download_artifacts(f"{best.artifact_location}/model.pth"),
                      weights_only=True)
    theirs = torch.load(client.download_artifacts(best.source_run_id, "model.pth"),
                        weights_only=True)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # metrics are linked to the dataset the stage logged as its input
    ds = client.get_run(run["run_id"]).inputs.dataset_inputs[0].dataset
    same = mlflow.search_logged_models(
        experiment_ids=[exp], datasets=[{"dataset_name": ds.name, "dataset_digest": ds.digest}],
        output_format="list")
    assert {m.model_id for m in ranked} <= {m.model_id for m in same}


@pytest.mark.skipif("example" not in FoldOutput.__dataclass_fields__,
                    reason="FoldOutput carries no input example yet")
def test_fold_models_carry_the_networks_input_example(trained):
    _, run, _ = trained
    [m, *_] = mlflow.search_logged_models(filter_string="params.stage = 'train_cnn'",
                                          experiment_ids=[_exp(run)], output_format="list")
    info = mlflow.models.get_model_info(f"models:/{m.model_id}")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 32, 32)
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"


def _exp(run):
    return MlflowClient().get_run(run["run_id"]).info.experiment_id


def test_fold_models_record_their_example_and_rank_by_linked_metrics(trained):
    """What open_fold_model and save_fold_model record from a FoldOutput that carries one input batch, and
    search_logged_models ordering fold models by the metric linked to each."""
    client = MlflowClient()
    exp = client.create_experiment("fold-model-unit")
    parent = client.create_run(exp, tags={"mexp.model": "lstm"})
    ids = {}
    for k, uf1 in (("k0", 0.2), ("k1", 0.6), ("k2", 0.4)):
        fold = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id})
        out = FoldOutput(["a"], np.full((1, 7), 1 / 7), FitResult(
            best_epoch=2, state=torch.nn.Linear(4, 7).state_dict()), ["b"], [])
        out.example = np.zeros((1, 5, 4), np.float32)               # (B, T, D) features
        lm = open_fold_model(client, exp, fold.info.run_id, parent.info.run_id, "train_lstm", k,
                             7, late_params(out))
        mid = lm.model_id
        link = save_fold_model(client, mid, lm.artifact_location, fold.info.run_id,
                               parent.info.run_id, "train_lstm", out, list("abcdefg"))
        assert link == {"model_id": mid}                            # no dataset on this run
        client.log_batch(fold.info.run_id, [Metric("test/uf1", uf1, 0, 0, **link)])
        client.finalize_logged_model(mid, "READY")
        ids[mid] = k
    for ascending, order in ((False, ["k1", "k2", "k0"]), (True, ["k0", "k2", "k1"])):
        ranked = mlflow.search_logged_models(
            experiment_ids=[exp], output_format="list",
            order_by=[{"field_name": "metrics.test/uf1", "ascending": ascending}])
        assert [ids[m.model_id] for m in ranked] == order
    info = mlflow.models.get_model_info(f"models:/{mid}")
    assert info.signature.inputs.inputs[0].shape == (-1, 5, 4)
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"
    m = client.get_logged_model(mid)
    assert m.name == "lstm-fold=k2" and m.params["best_epoch"] == "2"


def test_stage_runs_log_system_metrics(trained):
    _, run, promoted = trained
    client = MlflowClient()
    for rid in (run["run_id"], promoted["run_id"]):
        keys = set(client.get_run(rid).data.metrics)
        assert {"system/cpu_utilization_percentage",
                "system/system_memory_usage_megabytes"} <= keys, sorted(keys)


def test_system_metrics_off_with_mexp_system_metrics_0(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    ids = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MEXP_SYSTEM_METRICS", flag)
        with stage_run(trained[0], f"probe{flag}") as run:
            time.sleep(0.5)
        ids[flag] = run.info.run_id
    metrics = {f: set(MlflowClient().get_run(r).data.metrics) for f, r in ids.items()}
    assert any(k.startswith("system/") for k in metrics["1"])
    assert not any(k.startswith("system/") for k in metrics["0"])


def test_promoted_pyfunc_is_logged_from_code(trained, monkeypatch):
    _, run, promoted = trained
    client = MlflowClient()
    mv = client.get_model_version(promoted["name"], promoted["version"])
    model_id = mv.model_id or mv.source.removeprefix("models:/")     # SQLite: in the source
    lm = client.get_logged_model(model_id)
    assert lm.source_run_id == promoted["run_id"] and lm.model_type == "mexp-promoted"
    assert lm.params["source_run_id"] == run["run_id"] and lm.params["kind"] == "frame_cnn"
    cv = {m.key: m.value for m in lm.metrics}
    assert cv["cv/uf1"] == pytest.approx(run["uf1"]) and "cv/uar" in cv
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    conf = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = conf["flavors"]["python_function"]
    assert pyfunc["model_code_path"].endswith("model_code.py") and "python_model" not in pyfunc
    assert not list(local.rglob("*.pkl"))
    assert (local / "model_code.py").read_text().rstrip().endswith("set_model(MERModel())")
    assert conf["signature"]["outputs"] and conf["saved_input_example_info"]
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")   # nothing to unpickle
    model = mlflow.pyfunc.load_model(f"models:/{promoted['name']}@champion")
    example = mlflow.models.Model.load(str(local)).load_input_example(str(local))
    pred = model.predict(example)
    assert list(pred.columns[:2]) == ["label", "label_index"] and len(pred) == len(example)
    assert pred.filter(like="prob_").sum(axis=1).to_numpy() == pytest.approx(1.0, abs=1e-4)


def test_a_dead_folds_pending_model_can_be_marked_failed(trained):
    client = MlflowClient()
    exp = client.create_experiment("dead-fold")
    run = client.create_run(exp)
    pending = client.create_logged_model(exp, name="cnn-fold=k0", source_run_id=run.info.run_id)
    assert fail_pending_models(client, exp, [run.info.run_id]) == 1
    assert client.get_logged_model(pending.model_id).status == "FAILED"
    assert fail_pending_models(client, exp, [run.info.run_id]) == 0


def test_a_fold_run_is_logged_in_few_client_calls(tracking):
    """A batched run logs all its folds after training (68 for MEGC2019), so each fold run is
    a handful of client calls: one metric batch, one artifact upload, the LoggedModel's."""
    from collections import Counter

    import mlflow
    import numpy as np

    from mexp.engine.crossval import FoldOutput
    from mexp.engine.plans import Fold
    from mexp.engine.training import FitResult
    from mexp.models import create_model
    from mexp.tracking.folds import FoldLogger
    model = create_model("ststnet", num_classes=3, input_channels=3)
    history = [{"epoch": e, "train/loss": 1.0 / e} for e in range(1, 401)]
    calls = Counter()
    mlflow.set_experiment("fold-logging")     # not an experiment id another test left set
    with mlflow.start_run() as run:
        logger = FoldLogger(run.info.run_id, "train_cnn", ["negative", "positive", "surprise"],
                            None)
        client = logger.client

        class Counting:
            def __getattr__(self, name):
                calls[name] += 1
                return getattr(client, name)
        logger.client = Counting()
        out = FoldOutput(["t1", "t2", "t3"], np.eye(3), FitResult(history, 400, "final",
                                                                  model.state_dict()),
                         ["a1"], [], np.zeros((1, 3, 28, 28), np.float32),
                         notes={"selected": "x", "inner": {}})
        res = logger._log(Fold("s1", ["s1"], ["s2"], [], ["t1", "t2", "t3"], ["a1"], []), out,
                          np.array([0, 1, 2]))
        logger.close()
    assert sum(calls.values()) <= 10, calls
    # one metric batch; the artifacts go straight to the run's and the model's repositories
    # (MlflowClient.log_artifacts would look the run up again first)
    assert calls["log_batch"] == 1 and calls["log_artifacts"] == 0, calls
    assert calls["get_run"] == 0 and calls["get_logged_model"] == 0, calls
    c = mlflow.MlflowClient()
    names = {a.path for a in c.list_artifacts(res["fold_run_id"])}
    assert {"model.pth", "training_log.csv", "confusion_matrix.json", "confusion_matrix.png",
            "selection.json"} <= names
    fold_run = c.get_run(res["fold_run_id"])
    assert fold_run.data.tags["mexp.selected"] == "x"
    assert len(c.get_metric_history(res["fold_run_id"], "train/loss")) == 400
    assert fold_run.data.metrics["test/uf1"] == 1.0


def test_a_dataset_registered_by_another_process_at_once_is_linked(tracking, monkeypatch):
    """Three HPO workers starting trials at once raced on registering the same dataset: the
    store's unique constraint refused the second insert and failed a trial. The insert is
    retried (the dataset is then found); any other error still propagates. (The experiment's
    creation is retried the same way: `mexp.tracking.runs.raced`.)"""
    import mlflow
    import pandas as pd
    import pytest
    from mlflow.exceptions import MlflowException

    from mexp.tracking import datasets
    table = pd.DataFrame({"sample_id": ["a", "b"], "dataset": ["casme2"] * 2,
                          "subject": ["1", "2"], "label": [0, 1]})
    real, calls = mlflow.log_input, []

    def racing(ds, context=None):
        calls.append(ds.name)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                  "datasets.experiment_id, datasets.name, datasets.digest")
        return real(ds, context=context)
    monkeypatch.setattr(mlflow, "log_input", racing)
    mlflow.set_experiment("race")
    with mlflow.start_run() as run:
        datasets.log_dataset(table, "d1gest", "casme2")
    assert len(calls) == 2
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == ["d1gest"]
    monkeypatch.setattr(mlflow, "log_input", lambda ds, context=None: (_ for _ in ()).throw(
        MlflowException("connection refused")))
    with mlflow.start_run(), pytest.raises(MlflowException, match="connection refused"):
        datasets.log_dataset(table, "d1gest", "casme2")


def _fold_out(model, tag: str):
    from mexp.engine.plans import Fold
    test = [f"{tag}1", f"{tag}2", f"{tag}3"]
    out = FoldOutput(test, np.eye(3), FitResult([{"epoch": 1, "train/loss": 0.5}], 1, "final",
                                                model.state_dict()),
                     ["a1"], [], np.zeros((1, 3, 28, 28), np.float32))
    return Fold(tag, [tag], ["x"], [], test, ["a1"], []), out


def test_fold_runs_opened_while_training_end_logged_or_killed(tracking):
    """A batched run opens its fold runs and LoggedModels while the folds train (`prepare`):
    the folds logged later reuse them (FINISHED, model READY with its late params, nothing
    opened twice); one never logged (the stage failed or was pruned first) is ended KILLED
    and its model FAILED on `close`."""
    from mexp.models import create_model
    from mexp.tracking.folds import FoldLogger
    model = create_model("ststnet", num_classes=3, input_channels=3)
    mlflow.set_experiment("fold-prepare")
    c = MlflowClient()
    with mlflow.start_run() as run:
        logger = FoldLogger(run.info.run_id, "train_cnn", ["n", "p", "s"], None)
        folds = [_fold_out(model, t) for t in ("sA", "sB", "sC")]
        logger.prepare([f for f, _ in folds])
        logger._preparing.join()
        opened = {name: f.result() for name, f in logger.made.items()}
        assert set(opened) == {"sA", "sB", "sC"}
        for name, (rid, _, mid, _) in opened.items():
            assert c.get_run(rid).info.status == "RUNNING"
            assert c.get_run(rid).data.tags["mlflow.parentRunId"] == run.info.run_id
            assert c.get_logged_model(mid).status == "PENDING"
        for fold, out in folds[:2]:
            logger.submit(fold, out, np.array([0, 1, 2]))
        res = logger.drain()
        logger.close()
    children = c.search_runs([run.info.experiment_id],
                             f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len(children) == 3                              # nothing opened twice
    for name in ("sA", "sB"):
        rid, _, mid, _ = opened[name]
        assert res[name]["fold_run_id"] == rid
        fold_run = c.get_run(rid)
        assert fold_run.info.status == "FINISHED" and fold_run.data.metrics["test/uf1"] == 1.0
        m = c.get_logged_model(mid)
        assert m.status == "READY" and m.params["best_epoch"] == "1"
        assert m.params["selected_on"] == "final" and m.params["fold"] == name
        assert "model.pth" in {a.path for a in c.list_artifacts(rid)}
    rid, _, mid, _ = opened["sC"]
    assert c.get_run(rid).info.status == "KILLED"
    assert c.get_run(rid).data.tags["mexp.terminated"].startswith("not logged")
    assert c.get_logged_model(mid).status == "FAILED"


def test_fold_runs_opened_by_a_killed_process_are_cleaned_up_on_resume(tracking):
    """Fold runs a batched run opened before its process died stay RUNNING, their models
    PENDING: the resume's clean-up ends them KILLED and FAILED."""
    from mexp.tracking import folds as F
    mlflow.set_experiment("fold-prepare-killed")
    c = MlflowClient()
    with mlflow.start_run() as run:
        logger = F.FoldLogger(run.info.run_id, "train_cnn", ["n", "p", "s"], None)
        logger.prepare([_fold_out(torch.nn.Linear(2, 3), "k")[0]])
        logger._preparing.join()
        rid, _, mid, _ = logger.made["k"].result()
        logger.made.clear()                     # the process dies: nothing ends them
        logger.pool.shutdown()
        F._kill_stale_fold_runs(run.info.run_id)
    assert c.get_run(rid).info.status == "KILLED"
    assert c.get_logged_model(mid).status == "FAILED"
