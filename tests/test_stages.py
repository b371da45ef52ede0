"""The stage workflow on tiny synthetic data against a per-test SQLite tracking store."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from mexp import extract_features, main as pipeline, train_cnn, train_cnn_lstm, train_lstm
from mexp.engine.crossval import FoldOutput, assert_no_leak
from mexp.engine.plans import Fold, FoldPlanError
from mexp.engine.training import FitResult
from mexp.tracking.runs import LineageError, ResumeError


@pytest.fixture
def cfg(stage_cfg):
    return stage_cfg


def _artifacts(client, run_id, path=""):
    return {a.path for a in client.list_artifacts(run_id, path)}


def _children(client, run):
    return client.search_runs([run.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{run.info.run_id}'")


def _plots_equal_the_recorded_folds(client, run_id, tmp_path):
    """The pooled plots, drawn while the fold runs were still being logged, are what the
    recorded fold results (folds/*.json, predictions.csv) draw."""
    import pandas as pd

    from mexp.tracking.folds import FIGURES, fold_results, render_figures
    got = Path(client.download_artifacts(run_id, "", str(tmp_path / "logged")))
    pred = pd.read_csv(got / "predictions.csv", dtype={"subject": str})
    classes = json.loads((got / "confusion_matrix.json").read_text())["classes"]
    render_figures(fold_results(run_id), pred, classes, tmp_path)
    for f in FIGURES:
        assert (tmp_path / f).read_bytes() == (got / f).read_bytes(), f


def test_pipeline_logs_everything_and_reuses_finished_stages(cfg, capsys, tmp_path):
    out = pipeline.main(cfg)
    client = MlflowClient()
    *_, line, steps = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("pipeline: UF1") and out["lstm_run_id"] in line
    assert steps.startswith("next: ") and "mlflow ui --backend-store-uri" in steps
    assert f"python -m mexp.evaluate --run-id {out['lstm_run_id']}" in steps
    assert f"python -m mexp.promote promote.run_id={out['lstm_run_id']}" in steps
    top = client.get_run(out["run_id"])
    stages = {r.data.tags["mexp.stage"]: r for r in _children(client, top)}
    assert set(stages) == {"train_cnn", "extract_features", "train_lstm"}
    cnn = stages["train_cnn"]
    tags = cnn.data.tags
    for t in ("mexp.config_digest", "mexp.data_digest", "mexp.fold_plan_digest",
              "mexp.git_commit", "mexp.code_digest"):
        assert tags.get(t), t
    assert cnn.data.params["training.epochs"] == "2"
    assert {"config.yaml", "fold_plan.json", "predictions.csv", "training_log.csv",
            "confusion_matrix.png", "confusion_matrix.json", "learning_curve.png",
            "per_subject.png", "folds"} <= _artifacts(client, cnn.info.run_id)
    assert 0.0 <= cnn.data.metrics["test/uf1"] <= 1.0
    assert cnn.inputs.dataset_inputs[0].dataset.digest == tags["mexp.data_digest"]
    _plots_equal_the_recorded_folds(client, cnn.info.run_id, tmp_path)
    folds = _children(client, cnn)
    assert len(folds) == 3 and {f.data.tags["mexp.fold"] for f in folds} == {"k0", "k1", "k2"}
    hist = client.get_metric_history(folds[0].info.run_id, "train/loss")
    assert [m.step for m in hist] == [1, 2]
    assert {"model.pth", "confusion_matrix.png", "training_log.csv"} <= \
        _artifacts(client, folds[0].info.run_id)
    feat = stages["extract_features"]
    assert feat.data.tags["mexp.parent_run_id"] == cnn.info.run_id
    lstm = stages["train_lstm"]
    assert lstm.data.tags["mexp.features_run_id"] == feat.info.run_id
    assert lstm.data.tags["mexp.fold_plan_digest"] == tags["mexp.fold_plan_digest"]
    assert (pytest.approx(lstm.data.metrics["test/uf1"]) == top.data.metrics["test/uf1"])
    # local output folders of the original toolkit
    assert (cfg.output.dir and (__import__("pathlib").Path(cfg.output.dir) / "features" /
                                "fold=k0.npy").is_file())
    from mexp import evaluate                  # a pipeline id stands for its train_lstm run
    assert evaluate.main(["--run-id", out["run_id"]]) == 0
    assert f"pipeline run {out['run_id']} -> its train_lstm run {lstm.info.run_id}" in \
        capsys.readouterr().out
    again = pipeline.main(cfg)
    assert [again[k] for k in ("cnn_run_id", "features_run_id", "lstm_run_id")] == \
        [out[k] for k in ("cnn_run_id", "features_run_id", "lstm_run_id")]
    assert "reusing FINISHED run" in capsys.readouterr().out
    cfg.force = True
    forced = pipeline.main(cfg)
    assert forced["cnn_run_id"] != out["cnn_run_id"]
    assert forced["uf1"] == pytest.approx(out["uf1"])        # same seed, same numbers


def _fold_results(client, run_id, tmp_path):
    res = {}
    for a in client.list_artifacts(run_id, "folds"):
        p = client.download_artifacts(run_id, a.path, str(tmp_path))
        r = json.loads(open(p).read())
        res[r["fold"]] = r
    return res


def test_no_test_subject_reaches_fitting_or_selection(cfg, tmp_path):
    cnn = train_cnn.main(cfg)
    cfg.cnn_run_id = cnn["run_id"]
    feats = extract_features.main(cfg)
    cfg.features_run_id = feats["run_id"]
    lstm = train_lstm.main(cfg)
    client = MlflowClient()
    plan = json.loads(open(client.download_artifacts(cnn["run_id"], "fold_plan.json",
                                                     str(tmp_path))).read())
    subject = lambda sid: sid.split("_")[0]  # noqa: E731  (synthetic ids: sub01_EP..)
    for run_id in (cnn["run_id"], lstm["run_id"]):
        results = _fold_results(client, run_id, tmp_path / run_id)
        for f in plan["folds"]:
            r = results[f["name"]]
            test = set(f["test_subjects"])
            assert {subject(i) for i in r["test_ids"]} == test
            assert not {subject(i) for i in r["fit_ids"]} & test
            assert not {subject(i) for i in r["select_ids"]} & test
            assert r["select_ids"] and r["selected_on"] == "validation"
    # each fold's features come from that fold's CNN
    cnn_results = _fold_results(client, cnn["run_id"], tmp_path / "c")
    feat_dir = tmp_path / "f"
    client.download_artifacts(feats["run_id"], "features", str(feat_dir))
    ccfg = extract_features.cnn_config(cnn["run_id"])
    from mexp.data.datasets import load_dataset
    from mexp.data.inputs import images
    from mexp.engine.embed import embed
    from mexp.models.build import build_cnn
    cs = load_dataset(ccfg.data)
    clips = images(ccfg, cs)
    for name in ("k0", "k2"):
        model = build_cnn(ccfg, 1, 7)
        w = client.download_artifacts(cnn_results[name]["fold_run_id"], "model.pth",
                                      str(tmp_path / name))
        model.load_state_dict(torch.load(w, weights_only=True))
        mine = embed(model, clips[:3], torch.device("cpu"))
        saved = np.load(feat_dir / "features" / f"fold={name}.npy")[:3]
        assert np.allclose(mine.astype(np.float32), saved.astype(np.float32), atol=1e-2)
    k0 = np.load(feat_dir / "features" / "fold=k0.npy")
    k1 = np.load(feat_dir / "features" / "fold=k1.npy")
    assert not np.allclose(k0, k1)


def test_feature_extraction_over_all_folds_at_once_equals_one_model_at_a_time():
    """embed_all (each batch of frames through every fold CNN, inference mode, any batch size)
    gives per model the features the per-fold loop before #17 gave (no_grad, batch 256)."""
    from mexp.data.inputs import images_to_tensor
    from mexp.engine.embed import embed, embed_all
    from mexp.models import create_model
    clips = np.random.default_rng(0).integers(0, 256, (5, 4, 32, 32, 1), dtype=np.uint8)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = create_model("cnn", num_classes=7, input_channels=1, feature_dim=16)
        for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        models.append(m)
    frames = images_to_tensor(clips.reshape(20, 32, 32, 1))
    with torch.no_grad():
        before = [m.eval().forward_features(frames).numpy().reshape(5, 4, -1) for m in models]
    for batch in (3, 512):
        after = embed_all(models, clips, torch.device("cpu"), batch, np.float32)
        stored = embed_all(models, clips, torch.device("cpu"), batch)
        for a, s, b in zip(after, stored, before):
            assert a.shape == s.shape == (5, 4, 16) and s.dtype == np.float16
            assert np.abs(a - b).max() <= 1e-5
            # float16 storage: equal up to its own rounding (1 unit in the last place)
            assert np.all(np.abs(s.astype(np.float32) - b) <= 1e-5 + np.abs(b) / 1024)
    one = embed(models[1], clips, torch.device("cpu"))
    assert np.array_equal(one, embed_all(models, clips, torch.device("cpu"))[1])
    assert not np.allclose(before[0], before[1])


def test_leak_guard_stops_a_fold_that_saw_its_test_subject():
    fold = Fold("k0", ["sub01"], ["sub02"], [], ["sub01_a"], ["sub02_a"], [])
    out = FoldOutput(["sub01_a"], np.zeros((1, 7)), FitResult(), ["sub02_a", "sub01_a"], [])
    with pytest.raises(FoldPlanError, match=r"fold k0: the model was fitted on test subject"):
        assert_no_leak(fold, out, {"sub01_a": "sub01", "sub02_a": "sub02"})


def test_all_subjects_scope_is_tagged_and_reported_as_leaking(cfg, capsys):
    cfg.stage1.scope = "all_subjects"
    cnn = train_cnn.main(cfg)
    assert MlflowClient().get_run(cnn["run_id"]).data.tags["mexp.leak"] == "true"
    cfg.cnn_run_id = cnn["run_id"]
    f = extract_features.main(cfg)
    cfg.features_run_id = f["run_id"]
    cfg.training.cv_method, cfg.training.cv_folds = "LOSO", 9     # the plan is the features run's
    s = train_lstm.main(cfg)
    assert s["leak"] is True
    params = MlflowClient().get_run(s["run_id"]).data.params
    assert (params["training.cv_method"], params["training.cv_folds"]) == ("StratifiedGroupKFold", "3")
    assert "LEAKING" in capsys.readouterr().out


def test_lineage_errors_name_the_run(cfg):
    cnn = train_cnn.main(cfg)
    cfg.features_run_id = cnn["run_id"]               # a train_cnn run, not extract_features
    with pytest.raises(LineageError, match=f"run {cnn['run_id']} is a 'train_cnn' run"):
        train_lstm.main(cfg)
    cfg.features_run_id = "0123456789abcdef0123456789abcdef"
    with pytest.raises(LineageError, match="0123456789abcdef0123456789abcdef.*not found"):
        train_lstm.main(cfg)
    client = MlflowClient()
    exp = client.get_run(cnn["run_id"]).info.experiment_id
    unfinished = client.create_run(exp, tags={"mexp.stage": "train_cnn"})
    cfg.cnn_run_id = unfinished.info.run_id
    with pytest.raises(LineageError, match="is RUNNING, not FINISHED"):
        extract_features.main(cfg)


def test_resume_with_a_different_fold_plan_is_refused(cfg):
    first = train_cnn.main(cfg)
    MlflowClient().set_terminated(first["run_id"], "KILLED")
    cfg.resume_run_id = first["run_id"]
    cfg.training.seed = 8                             # other folds
    with pytest.raises(ResumeError, match=r"training\.seed \(run: '?7'?, now: 8\)"):
        train_cnn.main(cfg)
    assert MlflowClient().get_run(first["run_id"]).info.status == "KILLED"


def test_same_seed_same_metrics_on_cpu(cfg):
    cfg.output.local = False
    a = train_cnn_lstm.main(cfg)
    b = train_cnn_lstm.main(cfg)
    assert (a["uf1"], a["uar"], a["accuracy"]) == (b["uf1"], b["uar"], b["accuracy"])


def test_train_lstm_folds_batched_as_one_by_one(cfg, tmp_path):
    """train_lstm's folds each read their own CNN's features; with fold batching on they are
    stacked (`BlockFolds`) and the LSTM unrolled for vmap: without dropout every fold's test
    probabilities agree with the serial run's, the run says which path it took, and
    `mexp.evaluate` reproduces the batched run's metrics."""
    import pandas as pd

    from mexp.tracking import evaluation
    cnn = train_cnn.main(cfg)
    cfg.cnn_run_id = cnn["run_id"]
    cfg.features_run_id = extract_features.main(cfg)["run_id"]
    cfg.model.dropout, cfg.training.fold_workers, cfg.training.device = 0.0, 1, "cpu"
    client, got = MlflowClient(), {}
    for mode in ("off", "on"):
        cfg.training.fold_batching = mode
        s = train_lstm.main(cfg)
        tags = client.get_run(s["run_id"]).data.tags
        assert tags["mexp.fold_path"] == ("batched on cpu" if mode == "on" else "serial")
        got[mode] = pd.read_csv(client.download_artifacts(
            s["run_id"], "predictions.csv", str(tmp_path / mode))).sort_values("sample_id")
        report, bad = evaluation.evaluate(s["run_id"])
        assert bad == [] and report["pooled"]["n"] == 42
    cols = [c for c in got["on"].columns if c.startswith("prob_")]
    diff = np.abs(got["on"][cols].to_numpy() - got["off"][cols].to_numpy()).max()
    assert diff < 1e-3, diff
    assert (got["on"]["fold"].to_numpy() == got["off"]["fold"].to_numpy()).all()


def test_nested_selection_at_stage_two_is_refused_before_any_run(cfg):
    """train_lstm (and the pipeline, before its stage 1) refuse `selection.mode`: the inner
    folds would need stage-1 CNNs that never saw the inner test subjects."""
    from mexp.config import ConfigError
    cfg.training.val_fraction = 0.0
    cfg.selection.mode, cfg.selection.candidates = "best", {"a": {"training.lr": 1e-3}}
    client = MlflowClient()
    for command in (train_lstm.main, pipeline.main):
        with pytest.raises(ConfigError, match="train_lstm cannot run nested selection"):
            command(cfg)
    assert not [r for e in client.search_experiments() for r in
                client.search_runs([e.experiment_id])]


def test_every_frame_folds_are_the_old_recipe_and_batch(cfg):
    """`data.frames=all` (each training clip's every frame, labelled with its clip) as rows of
    one array: one fold run by the fold function equals the recipe it replaced (the training
    clips' frames via `stage1_frames`, apex frames to select and test) exactly, and fold
    batching trains the folds as one model with the same probabilities up to float32 noise
    (with SGD: a clip's near-identical frames leave gradients near zero, where Adam's
    normalisation turns float32 rounding into full steps, ~1e-2 apart after one epoch)."""
    from mexp.data.datasets import load_dataset
    from mexp.data.inputs import images, images_to_tensor, stage1_frames
    from mexp.engine.batching import batched_outputs
    from mexp.engine.crossval import fit_and_score
    from mexp.engine.setup import fold_plan
    cfg.data.frames, cfg.model.dropout, cfg.data.augmentation = "all", 0.0, False
    cfg.training.device, cfg.training.epochs, cfg.training.optimizer = "cpu", 1, "sgd"
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels)
    fn = train_cnn.make_fold_fn(cfg, cs, clips)
    fold, ids = plan.folds[0], cs.table["sample_id"].to_numpy()
    tr, va, te = (cs.subset(s) for s in (fold.train_ids, fold.val_ids, fold.test_ids))
    x_tr, owner = stage1_frames(clips[tr], cs.apex[tr], "all")
    old = fit_and_score(cfg, 0, fold, fn.make_model, (x_tr, cs.labels[tr][owner]),
                        (clips[va, cs.apex[va]], cs.labels[va]), clips[te, cs.apex[te]],
                        (ids[te], ids[tr], ids[va]), images_to_tensor)
    new = fn(0, fold)
    np.testing.assert_array_equal(new.probs, old.probs)
    assert (new.test_ids, new.fit_ids, new.select_ids) == (old.test_ids, old.fit_ids,
                                                          old.select_ids)
    assert len(fn.x) == len(cs) * (clips.shape[1] + 1)
    todo = list(enumerate(plan.folds))
    for k, f, out in batched_outputs(fn, todo, torch.device("cpu")):
        serial = old if k == 0 else fn(k, f)
        assert out.fit_ids == serial.fit_ids and out.test_ids == serial.test_ids
        np.testing.assert_allclose(out.probs, serial.probs, atol=1e-3)
