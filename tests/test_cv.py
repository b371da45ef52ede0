import numpy as np
import pytest

from mexp.cv import FoldPlan, FoldPlanError, check_plan, make_plan


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
