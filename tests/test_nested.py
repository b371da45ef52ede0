"""Nested selection (#16): inside each outer fold an inner subject-grouped cross-validation over
the outer training subjects picks a candidate (or fits a stacker); the outer test subject is
never seen. On three real MEGC2019 subjects with the closed-form members, so it runs in seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mexp import train_cnn
from mexp.config import ConfigError, load_config
from mexp.data.datasets import load_dataset
from mexp.data.inputs import images
from mexp.engine.nested import NestedFolds, candidate_configs
from mexp.engine.setup import fold_plan
from mexp.tracking import evaluation
from tests.conftest import flow28_slice, store_at

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("sub06", "sub17", "016", "s15")     # 2 CASME II, 1 SAMM, 1 SMIC
CANDIDATES = "selection.candidates={lr: {model.name: logreg}, svm: {model.name: svm_rbf}}"


@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory) -> Path:
    return flow28_slice(shared_data, tmp_path_factory.mktemp("flow28"), SUBJECTS)


def _cfg(root, *extra):
    return load_config(ROOT / "configs/megc2019_flow.yaml", [
        f"data.root={root}", "repeats=1", "training.fold_workers=1", "training.device=cpu",
        "output.local=false", "model.name=logreg", CANDIDATES, "selection.mode=best", *extra])


@pytest.mark.parametrize("overrides, message", [
    (["selection.mode=stack", "selection.candidates={a: {model.name: logreg}}"], "two candidates"),
    (["training.val_fraction=0.2"], "needs training.val_fraction=0"),
    (["selection.candidates={a: {training.cv_method: LOSO}}"], "cannot vary between candidates"),
    (["selection.candidates={a: {training.epohcs: 3}}"], "selection.candidates.a: unknown config key 'training.epohcs'"),
    (["selection.mode=none"], "selection.mode is none"),
    (["selection.inner_folds=1"], "selection.inner_folds must be 0"),
    (["selection.stack_database=true"], "stack_database=true needs selection.mode=stack"),
])
def test_a_bad_selection_is_refused_by_the_config(subset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(subset, *overrides)


def _nested(cfg):
    cs = load_dataset(cfg.data)
    clips = images(cfg, cs)
    plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels, cs.table["dataset"])
    nested = NestedFolds(cfg, lambda c: train_cnn.make_fold_fn(c, cs, clips),
                         cs.table.assign(group=cs.groups), len(cs.classes))
    return cs, clips, plan, nested


def test_the_choice_is_made_on_the_inner_folds_and_refitted_on_the_outer_training_subjects(subset):
    cfg = _cfg(subset)
    cs, clips, plan, nested = _nested(cfg)
    fold = plan.folds[0]
    out = nested(0, fold)
    inner = nested.inner_plan(fold)
    assert {s for f in inner.folds for s in f.test_subjects} == set(fold.train_subjects)
    assert out.notes["selected"] == max(out.notes["inner"], key=lambda n: (
        out.notes["inner"][n]["uf1"], out.notes["inner"][n]["uar"]))
    assert sorted(out.select_ids) == sorted(fold.train_ids) and out.notes["inner_samples"] == len(
        fold.train_ids)
    plain = train_cnn.make_fold_fn(candidate_configs(cfg)[out.notes["selected"]], cs, clips)(0, fold)
    np.testing.assert_allclose(out.probs, plain.probs, atol=1e-12)   # the refit is the plain fold
    assert out.fit.selected_on == f"nested:{out.notes['selected']}"


def test_the_test_subjects_labels_cannot_change_the_choice(subset):
    """Shuffle the test subject's labels: every inner score and the choice stay the same."""
    cfg = _cfg(subset, "selection.mode=stack")
    cs, clips, plan, nested = _nested(cfg)
    fold = plan.folds[0]
    a = nested(0, fold)
    test = np.isin(cs.table["sample_id"], fold.test_ids)
    cs.table.loc[test, "label"] = (cs.labels[test] + 1) % 3     # every test label now wrong
    b = NestedFolds(cfg, lambda c: train_cnn.make_fold_fn(c, cs, clips),
                    cs.table.assign(group=cs.groups), len(cs.classes))(0, fold)
    assert a.notes == b.notes
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-9)
    assert abs(sum(a.notes["weights"].values()) - 1) < 1e-3
    np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-6)


def test_a_nested_run_logs_each_folds_choice_and_reproduces(subset, tmp_path):
    from mlflow.tracking import MlflowClient
    with store_at(tmp_path):
        s = train_cnn.main(_cfg(subset, "selection.mode=stack"))
        client = MlflowClient()
        run = client.get_run(s["run_id"])
        assert run.data.tags["mexp.selection"] == "stack"
        folds = client.search_runs([run.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{s['run_id']}'")
        assert len(folds) == len(SUBJECTS)
        for f in folds:
            assert f.data.tags["mexp.selected"] in ("lr", "svm")
            assert "selection.json" in [a.path for a in client.list_artifacts(f.info.run_id)]
        report, bad = evaluation.evaluate(s["run_id"])
        assert bad == [] and report["pooled"]["n"] == s["n"]
        from mexp.serving.refit import refit
        from mexp.tracking.runs import LineageError
        with pytest.raises(LineageError, match="selection.mode=stack.*lr,svm"):
            refit(run)                    # one refitted model would not be what was scored


def test_inner_folds_train_as_one_vectorised_model_when_batching_is_on(subset):
    """A net candidate's inner folds go through fold batching (training.fold_batching=on) and
    give what one-by-one training gives (no augmentation, no dropout)."""
    outs = {}
    for mode in ("off", "on"):
        cfg = _cfg(subset, "selection.candidates={net: {model.name: ststnet}}", "training.epochs=2",
                   "data.augmentation=false", "model.dropout=0", f"training.fold_batching={mode}")
        _, _, plan, nested = _nested(cfg)
        outs[mode] = nested(0, plan.folds[0])
    assert outs["on"].notes["inner_samples"] == outs["off"].notes["inner_samples"]
    assert outs["on"].notes["selected"] == outs["off"].notes["selected"] == "net"
    np.testing.assert_allclose(outs["on"].probs, outs["off"].probs, atol=1e-3)


def test_the_stacker_weighs_classes_as_the_members_were_trained():
    """UF1/UAR weigh each class alike: with `training.class_weighted` the stacker is fitted with
    balanced class weights, so a minority class the members score weakly is not given up."""
    from mexp.engine.nested import stack
    rng = np.random.default_rng(0)
    y = np.array([0] * 90 + [1] * 10)
    def member(labels):
        logits = rng.normal(0, 1, (len(labels), 2))
        logits[np.arange(len(labels)), labels] += 0.8
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    oof = {"a": member(y), "b": member(y)}
    yt = np.array([0] * 50 + [1] * 50)
    test = {"a": member(yt), "b": member(yt)}
    recall1 = {}
    for balanced in (False, True):
        p, w = stack(oof, y, test, ["a", "b"], 2, 0, balanced)
        assert np.allclose(p.sum(1), 1) and set(w) == {"a", "b"}
        recall1[balanced] = (p.argmax(1)[yt == 1] == 1).mean()
    assert recall1[True] > recall1[False] + 0.2, recall1


def test_the_database_aware_stacker_learns_each_databases_class_balance():
    """`selection.stack_database`: with members that cannot tell the classes apart, the stacker
    given each clip's database (one-hot, fitted on the inner folds only) predicts the class that
    database's inner samples hold; without it, it cannot. A database no inner sample has gets
    zeros, and the member weights still sum to 1."""
    from mexp.engine.nested import stack
    rng = np.random.default_rng(1)
    dbs = ["casme2"] * 60 + ["samm"] * 60
    y = np.array([0] * 50 + [1] * 10 + [1] * 50 + [0] * 10)        # each database's own balance
    noise = lambda n: rng.dirichlet([5, 5], n)                    # noqa: E731 (uninformative)
    oof, test = {"a": noise(120), "b": noise(120)}, {"a": noise(30), "b": noise(30)}
    tdbs = ["casme2"] * 10 + ["samm"] * 10 + ["smic"] * 10
    p, w = stack(oof, y, test, ["a", "b"], 2, 0, True, (dbs, tdbs))
    assert (p[:10].argmax(1) == 0).all() and (p[10:20].argmax(1) == 1).all()
    assert np.allclose(p.sum(1), 1) and abs(sum(w.values()) - 1) < 1e-3
    plain, _ = stack(oof, y, test, ["a", "b"], 2, 0, True)
    assert np.abs(plain[:20, 0] - 0.5).max() < np.abs(p[:20, 0] - 0.5).min()


def test_a_nested_fold_stacks_with_each_clips_database(subset):
    cfg = _cfg(subset, "selection.mode=stack", "selection.stack_database=true")
    cs, clips, plan, nested = _nested(cfg)
    out = nested(0, plan.folds[0])
    assert out.notes["stack_database"] is True
    np.testing.assert_allclose(out.probs.sum(1), 1, atol=1e-6)
    plain = _nested(_cfg(subset, "selection.mode=stack"))[3](0, plan.folds[0])
    assert np.abs(out.probs - plain.probs).max() > 1e-6     # the database features were used


def test_outer_and_inner_folds_train_as_one_vectorised_model_per_candidate(subset, batched_fits,
                                                                          tmp_path):
    """With fold batching, `prepare` trains every outer fold's inner folds and refit of a net
    candidate in one `fit_batched` call (#15 / #16: outer x inner together), and each outer
    fold's output equals the one-outer-fold-at-a-time path (inner folds batched per outer
    fold, refit serial) up to float32 noise; the closed-form member's folds are fitted in
    worker processes meanwhile; the stage run says which path it took."""
    cfg = _cfg(subset, "selection.candidates={net: {model.name: ststnet}, lr: {model.name: logreg}}",
               "selection.mode=stack", "training.epochs=2", "data.augmentation=false",
               "model.dropout=0", "training.fold_batching=on")
    _, _, plan, nested = _nested(cfg)
    todo = list(enumerate(plan.folds))[:2]
    assert nested.prepare(todo, cpu_workers=2) == "net"
    inner = [len(nested.inner_plan(f).folds) for _, f in todo]
    assert [len(r) for r in batched_fits] == [sum(inner) + len(todo)]   # inner folds + refits
    assert sorted({key[0] for key in nested.ready}) == ["lr", "net"]   # lr: 2 CPU processes
    assert len(nested.ready) == 2 * (sum(inner) + len(todo))
    prepared = [nested(k, f) for k, f in todo]
    assert nested.ready == {}                         # every prepared output was used once
    _, _, _, plain = _nested(cfg)
    for (k, f), a in zip(todo, prepared):
        b = plain(k, f)
        assert a.notes["ranking"] == b.notes["ranking"] and a.notes["inner_samples"] == b.notes[
            "inner_samples"]
        for n in ("net", "lr"):
            for m in ("uf1", "uar"):
                assert abs(a.notes["inner"][n][m] - b.notes["inner"][n][m]) < 1e-9
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-3)
        assert a.fit.state.keys() == b.fit.state.keys()
    with store_at(tmp_path):
        from mlflow.tracking import MlflowClient
        s = train_cnn.main(cfg)
        tags = MlflowClient().get_run(s["run_id"]).data.tags
        assert tags["mexp.fold_path"] == "nested, batched on cpu"
        assert "candidates net" in tags["mexp.fold_path_why"]
        report, bad = evaluation.evaluate(s["run_id"])
        assert bad == [] and report["pooled"]["n"] == s["n"]


def test_closed_form_members_fit_on_the_cpu_beside_batched_nets(subset, monkeypatch):
    """The scikit-learn members' worker processes get a CPU copy of their config (on CUDA they
    had each opened a CUDA context for nothing), whatever `training.device` says."""
    from mexp.engine import pool
    devices, real = [], pool.fold_outputs

    def recorded(fn, todo, workers=1):
        devices.append(fn.cfg.training.device)
        return real(fn, todo, workers)
    monkeypatch.setattr(pool, "fold_outputs", recorded)
    cfg = _cfg(subset, "selection.candidates={net: {model.name: ststnet}, lr: {model.name: logreg}}",
               "selection.mode=stack", "training.epochs=1", "training.fold_batching=on",
               "training.device=auto")
    _, _, plan, nested = _nested(cfg)
    assert nested.prepare(list(enumerate(plan.folds))[:1], cpu_workers=2) == "net"
    assert devices == ["cpu"]
