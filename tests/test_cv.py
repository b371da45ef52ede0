import numpy as np
import pytest

from mexp.engine.plans import FoldPlan, FoldPlanError, check_plan, make_plan


def _data(n_subj=8, per=6, seed=0):
    rng = np.random.default_rng(seed)
    subj = np.repeat([f"s{i:02d}" for i in range(n_subj)], per)
    ids = [f"{s}_{k}" for k, s in enumerate(subj)]
    y = rng.integers(0, 3, len(ids))
    return ids, subj, y


@pytest.mark.parametrize("method", ["LOSO", "StratifiedGroupKFold"])
def test_no_subject_on_both_sides(method):
    ids, subj, y = _data()
    plan = make_plan(ids, subj, y, method=method, n_folds=4, seed=1, val_fraction=0.25)
    tested = []
    for f in plan.folds:
        te, tr, va = set(f.test_subjects), set(f.train_subjects), set(f.val_subjects)
        assert not (te & tr) and not (te & va) and not (tr & va)
        assert te | tr | va == set(subj)
        sub_of = dict(zip(ids, subj))
        assert {sub_of[i] for i in f.test_ids} == te
        assert {sub_of[i] for i in f.train_ids} == tr
        tested += f.test_ids
    assert sorted(tested) == sorted(ids)              # every sample tested exactly once
    assert len(plan.folds) == (8 if method == "LOSO" else 4)


def test_plan_json_roundtrip_and_digest(tmp_path):
    ids, subj, y = _data()
    plan = make_plan(ids, subj, y, method="LOSO", seed=3)
    again = FoldPlan.load(plan.save(tmp_path / "plan.json"))
    assert again.digest == plan.digest and again == plan
    assert plan.folds[0].name == "s00"
    other = make_plan(ids, subj, y, method="LOSO", seed=4)   # other validation subjects
    assert other.digest != plan.digest


def test_check_plan_catches_a_leak_and_a_data_mismatch():
    ids, subj, y = _data()
    plan = make_plan(ids, subj, y, method="LOSO")
    check_plan(plan, ids)
    with pytest.raises(FoldPlanError, match="does not match the data"):
        check_plan(plan, ids[:-1])
    plan.folds[2].train_subjects.append(plan.folds[2].test_subjects[0])
    with pytest.raises(FoldPlanError, match=f"fold {plan.folds[2].name}.*both test and train"):
        check_plan(plan)


def test_bad_plans():
    ids, subj, y = _data(n_subj=3)
    with pytest.raises(FoldPlanError, match="5 folds need at least 5 subjects"):
        make_plan(ids, subj, y, method="StratifiedGroupKFold", n_folds=5)
    with pytest.raises(FoldPlanError, match="empty"):
        make_plan([], [], [])
    with pytest.raises(FoldPlanError, match="unknown cv method"):
        make_plan(ids, subj, y, method="KFold")


def test_the_leak_check_looks_at_the_arrays_given_to_fit():
    """Ids declared right, arrays wrong: a test row inside the training array is caught."""
    import numpy as np

    from mexp.config import Config
    from mexp.engine.crossval import assert_rows_apart, fit_rows
    from mexp.engine.plans import Fold
    from mexp.models import create_model
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1, 0, 1, 0, 1])
    ids = np.array([f"s{i}" for i in range(6)])
    fold = Fold("sub3", ["sub3"], ["sub1", "sub2"], [], ["s4", "s5"], ["s0", "s1", "s2", "s3"], [])
    cfg = Config()
    cfg.training.epochs = 1
    with pytest.raises(FoldPlanError, match="fold sub3: 1 row.s. of the array the model was "
                                            "fitted on equal test rows"):
        fit_rows(cfg, 0, fold, lambda: create_model("logreg", num_classes=2), x, y, ids,
                 ([0, 1, 2, 4], [], [4, 5]), torch_tensor)
    out = fit_rows(cfg, 0, fold, lambda: create_model("logreg", num_classes=2), x, y, ids,
                   ([0, 1, 2, 3], [], [4, 5]), torch_tensor)
    assert out.probs.shape == (2, 2)
    zeros = np.zeros((2, 4), np.float32)            # constant rows name no sample: not a leak
    assert_rows_apart(fold, zeros, zeros, None)


def torch_tensor(x):
    import torch
    return torch.as_tensor(x)


def test_the_pooled_plots_see_every_fold_before_the_drain():
    """`run_plan` hands every fold's test ids, probabilities (rounded as recorded) and history
    to `before_drain` while the recorder may still be logging, then drains: the pooled plots
    render meanwhile, from what the recorder then returns."""
    import pandas as pd

    from mexp.engine.crossval import FoldOutput, run_plan
    from mexp.engine.training import FitResult
    ids, subj, y = _data(4, 5)
    plan = make_plan(ids, subj, y, method="LOSO")
    table = pd.DataFrame({"sample_id": ids, "subject": subj, "label": y})
    rng = np.random.default_rng(1)
    events, seen = [], []

    def fold_fn(k, fold):
        p = rng.dirichlet(np.ones(3), len(fold.test_ids))
        return FoldOutput(list(fold.test_ids), p, FitResult([{"epoch": 1, "loss": k}], 1),
                          list(fold.train_ids), [])

    class Recorder:
        def __init__(self):
            self.got = {}

        def submit(self, fold, out, labels):
            events.append("submit")
            self.got[fold.name] = {"fold": fold.name, "test_ids": list(out.test_ids),
                                   "probs": out.probs.round(6).tolist(),
                                   "history": out.fit.history, "logged": True}

        def check(self):
            pass

        def drain(self):
            events.append("drain")
            return self.got

        def close(self):
            events.append("close")

    rec = Recorder()
    out = run_plan(plan, table, 3, fold_fn, rec,
                   before_drain=lambda res: (events.append("plots"), seen.extend(res)))
    assert events == ["submit"] * 4 + ["plots", "drain", "close"]
    assert [r["fold"] for r in seen] == [f.name for f in plan.folds]
    for a, b in zip(seen, out):
        assert b["logged"] and a["probs"] == b["probs"] and a["history"] == b["history"]
