"""Fold plans: leave-one-subject-out and StratifiedGroupKFold, computed once, saved as JSON.

A plan lists, per fold, the test subjects, the training subjects and the validation subjects
(a seeded share of the training subjects, used for model selection), plus the sample ids on each
side. Its digest proves that later stages use the same folds. Subjects are the groups: no
subject is ever on two sides of a fold, which `check_plan` verifies.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


class FoldPlanError(ValueError):
    """A fold plan that leaks, or that does not match the data it is used with."""


@dataclass
class Fold:
    name: str
    test_subjects: list[str]
    train_subjects: list[str]
    val_subjects: list[str]
    test_ids: list[str]
    train_ids: list[str]
    val_ids: list[str]
    unused_ids: list[str] = field(default_factory=list)   # holdout: databases in neither side


@dataclass
class FoldPlan:
    method: str
    seed: int
    folds: list[Fold] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @classmethod
    def from_json(cls, text: str) -> "FoldPlan":
        d = json.loads(text)
        return cls(method=d["method"], seed=d["seed"], folds=[Fold(**f) for f in d["folds"]])

    def save(self, path) -> Path:
        p = Path(path)
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, path) -> "FoldPlan":
        p = Path(path)
        try:
            return cls.from_json(p.read_text())
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise FoldPlanError(f"cannot read fold plan {p}: {e}") from None

    def sample_ids(self) -> set[str]:
        return {i for f in self.folds
                for i in (*f.train_ids, *f.val_ids, *f.test_ids, *f.unused_ids)}


def _val_split(train_subjects: list[str], fraction: float, rng: np.random.Generator):
    if fraction <= 0 or len(train_subjects) < 3:
        return sorted(train_subjects), []
    n_val = max(1, int(round(fraction * len(train_subjects))))
    val = set(rng.choice(sorted(train_subjects), size=n_val, replace=False).tolist())
    return sorted(s for s in train_subjects if s not in val), sorted(val)


DATABASE_METHODS = ("LODO", "holdout")


def _database_tests(subj, dbs, method, holdout_test, holdout_train):
    """Test-subject lists (and names, and the subjects each fold may train on) per database."""
    db_of = {s: d for s, d in zip(subj.tolist(), dbs.tolist())}
    names = sorted(set(dbs.tolist()))
    if len(names) < 2:
        raise FoldPlanError(f"{method} needs data from at least 2 databases, got {names}")
    if method == "LODO":
        return [(d, sorted(s for s in db_of if db_of[s] == d), None) for d in names]
    if holdout_test not in names:
        raise FoldPlanError(f"training.holdout_test '{holdout_test}' is not one of {names}")
    train_dbs = [t.strip() for t in holdout_train.split(",") if t.strip()] or \
        [d for d in names if d != holdout_test]
    unknown = sorted(set(train_dbs) - set(names))
    if unknown or holdout_test in train_dbs:
        raise FoldPlanError(f"training.holdout_train {train_dbs}: unknown {unknown} or the test "
                            f"database {holdout_test} itself")
    return [(f"holdout-{holdout_test}", sorted(s for s in db_of if db_of[s] == holdout_test),
             sorted(s for s in db_of if db_of[s] in train_dbs))]


def make_plan(sample_ids, subjects, labels, method: str = "LOSO", n_folds: int = 5,
              seed: int = 42, val_fraction: float = 0.2, databases=None,
              holdout_test: str = "", holdout_train: str = "") -> FoldPlan:
    """Build a plan over samples grouped by subject: LOSO, StratifiedGroupKFold, LODO (leave
    one database out) or holdout (train on named databases, test on another)."""
    ids, subj, y = np.asarray(sample_ids, str), np.asarray(subjects, str), np.asarray(labels)
    if not len(ids):
        raise FoldPlanError("cannot make folds over an empty dataset")
    if len(set(ids.tolist())) != len(ids):
        raise FoldPlanError("sample ids are not unique")
    uniq = sorted(set(subj.tolist()))
    if len(uniq) < 2:
        raise FoldPlanError(f"cross-validation needs at least 2 subjects, got {uniq}")
    pools = [None] * len(uniq)
    if method in DATABASE_METHODS:
        if databases is None:
            raise FoldPlanError(f"{method} needs the database of every sample")
        spec = _database_tests(subj, np.asarray(databases, str), method, holdout_test,
                               holdout_train)
        names, tests, pools = [n for n, _, _ in spec], [t for _, t, _ in spec], [p for _, _, p in spec]
    elif method == "LOSO":
        tests = [[s] for s in uniq]
    elif method == "StratifiedGroupKFold":
        if n_folds > len(uniq):
            raise FoldPlanError(f"{n_folds} folds need at least {n_folds} subjects, "
                                f"got {len(uniq)}")
        sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        tests = [sorted(set(subj[te].tolist())) for _, te in sgkf.split(ids, y, subj)]
    else:
        raise FoldPlanError(f"unknown cv method '{method}'; use LOSO, StratifiedGroupKFold, "
                            "LODO or holdout")
    rng = np.random.default_rng(seed)
    folds = []
    for k, test in enumerate(tests):
        rest = pools[k] if pools[k] is not None else [s for s in uniq if s not in test]
        train, val = _val_split(rest, val_fraction, rng)
        pick = lambda group: sorted(ids[np.isin(subj, group)].tolist())  # noqa: E731
        name = (test[0] if method == "LOSO" else names[k] if method in DATABASE_METHODS
                else f"k{k}")
        unused = sorted(set(uniq) - set(test) - set(rest))
        folds.append(Fold(name=name, test_subjects=test, train_subjects=train,
                          val_subjects=val, test_ids=pick(test), train_ids=pick(train),
                          val_ids=pick(val), unused_ids=pick(unused)))
    plan = FoldPlan(method=method, seed=seed, folds=folds)
    check_plan(plan)
    return plan


def check_plan(plan: FoldPlan, sample_ids=None) -> None:
    """Raise FoldPlanError if any subject or sample sits on two sides of a fold, or if the
    plan's samples differ from `sample_ids` (the data it is about to be used with)."""
    for f in plan.folds:
        te, tr, va = set(f.test_subjects), set(f.train_subjects), set(f.val_subjects)
        for a, b, what in ((te, tr, "test and train"), (te, va, "test and validation"),
                           (tr, va, "train and validation")):
            if a & b:
                raise FoldPlanError(f"fold {f.name}: subject(s) {sorted(a & b)} on both "
                                    f"{what} sides")
        ids = [set(f.test_ids), set(f.train_ids), set(f.val_ids)]
        if ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]:
            raise FoldPlanError(f"fold {f.name}: a sample id is on two sides")
        if plan.method in DATABASE_METHODS:
            db = lambda subjects: {s.split("/")[0] for s in subjects}  # noqa: E731
            both = db(te) & db(tr | va)
            if both:
                raise FoldPlanError(f"fold {f.name}: database(s) {sorted(both)} on both the "
                                    "test and the training side")
    tested = [i for f in plan.folds for i in f.test_ids]
    if len(tested) != len(set(tested)) and plan.method != "holdout":
        raise FoldPlanError("a sample is tested in more than one fold")
    if sample_ids is not None:
        want, have = set(map(str, sample_ids)), plan.sample_ids()
        if want != have:
            extra, missing = sorted(want - have)[:3], sorted(have - want)[:3]
            raise FoldPlanError(f"fold plan {plan.digest} does not match the data: samples "
                                f"not in the plan {extra}, plan samples not in the data {missing}")
