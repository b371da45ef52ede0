"""Nested selection: inside each outer fold, an inner subject-grouped cross-validation over the
outer fold's training subjects chooses among declared candidates; the choice is refitted on all
of the outer fold's training subjects and scored once on its test subject.

`selection.mode`:
- `best`: the candidate with the best pooled inner score (`selection.metric`; UAR, then the
  candidate's order, break ties) is refitted and predicts the test subject.
- `stack`: every candidate is refitted; a multinomial logistic regression fitted on the
  candidates' inner out-of-fold probabilities only combines their test probabilities.

Candidates are named override sets of `training.*`, `model.*` and `data.augmentation` (the
data themselves are shared). Nothing here sees the outer test subject: the inner plan is built
from the outer training samples alone (checked), each inner fit goes through the fold recipe's
leak checks, and the outer fold's test rows are predicted once per refitted candidate.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import numpy as np

from mexp.config import Config, ConfigError
from mexp.engine.crossval import FoldOutput
from mexp.engine.metrics import scores
from mexp.engine.plans import Fold, FoldPlanError, make_plan
from mexp.util.schema import apply_dict, parse_overrides

ALLOWED = ("training.", "model.", "data.augmentation")
FIXED = ("training.cv_method", "training.cv_folds", "training.val_fraction", "training.holdout",
         "training.seed", "training.device", "training.fold_workers", "training.num_threads")


def candidate_configs(cfg: Config) -> dict[str, Config]:
    """Each candidate's config: the stage config with its overrides (checked)."""
    out = {}
    for name, delta in cfg.selection.candidates.items():
        if not isinstance(delta, dict):
            raise ConfigError(f"selection.candidates.{name} must be a mapping of overrides, "
                              f"got {delta!r}")
        keys = [str(k) for k in delta]
        bad = [k for k in keys if not k.startswith(ALLOWED) or k.startswith(FIXED)]
        if bad:
            raise ConfigError(f"selection.candidates.{name}: {', '.join(bad)} cannot vary between "
                              f"candidates (allowed: training.* except the fold plan, seed and "
                              f"workers, model.*, data.augmentation)")
        c = copy.deepcopy(cfg)
        c.selection.mode, c.selection.candidates = "none", {}
        apply_dict(c, parse_overrides([f"{k}={v}" for k, v in delta.items()]),
                   source=f"selection.candidates.{name}: ")
        out[str(name)] = c
    return out


def check_selection(cfg: Config) -> None:
    """What the config alone can tell about nested selection, before any run."""
    s = cfg.selection
    if s.mode == "none":
        if s.candidates:
            raise ConfigError("selection.candidates are given but selection.mode is none: "
                              "set selection.mode to best or stack")
        return
    if len(s.candidates) < (1 if s.mode == "best" else 2):
        raise ConfigError(f"selection.mode={s.mode} needs "
                          f"{'a candidate' if s.mode == 'best' else 'two candidates or more'} "
                          "in selection.candidates")
    if cfg.training.val_fraction:
        raise ConfigError("selection.mode needs training.val_fraction=0: the inner "
                          "cross-validation does the selecting, on all training subjects")
    if s.stack_database and s.mode != "stack":
        raise ConfigError("selection.stack_database=true needs selection.mode=stack (it gives "
                          "the stacker each clip's database)")
    if s.inner_folds == 1 or s.inner_folds < 0:
        raise ConfigError("selection.inner_folds must be 0 (leave-one-subject-out) or >= 2")
    for c in candidate_configs(cfg).values():
        from mexp.config import validate
        validate(c)


class NestedFolds:
    """A fold function (k, fold) -> FoldOutput that selects inside the fold. `make_fold_fn`
    builds the stage's plain fold function for a config; `table` holds sample_id, group
    (the subject) and label of every sample."""

    def __init__(self, cfg: Config, make_fold_fn: Callable[[Config], Callable], table,
                 num_classes: int):
        self.cfg, self.make_fold_fn, self.num_classes = cfg, make_fold_fn, num_classes
        self.candidates = candidate_configs(cfg)
        self.subject = dict(zip(table["sample_id"], table["group"].astype(str)))
        self.label = dict(zip(table["sample_id"], table["label"].astype(int)))
        db = table["dataset"] if "dataset" in table else [""] * len(table)
        self.database = dict(zip(table["sample_id"], np.asarray(db).astype(str)))
        self.ready: dict[tuple, FoldOutput] = {}      # `prepare`d outputs, read once

    def inner_plan(self, fold: Fold):
        ids = sorted(fold.train_ids + fold.val_ids)
        s = self.cfg.selection
        plan = make_plan(ids, [self.subject[i] for i in ids], [self.label[i] for i in ids],
                         method="StratifiedGroupKFold" if s.inner_folds else "LOSO",
                         n_folds=s.inner_folds or 5, seed=self.cfg.training.seed,
                         val_fraction=0.0)
        inner = {i for f in plan.folds for i in f.train_ids + f.test_ids + f.val_ids}
        subjects = {s for f in plan.folds for s in f.train_subjects + f.test_subjects}
        if inner & set(fold.test_ids) or subjects & set(fold.test_subjects):
            raise FoldPlanError(f"fold {fold.name}: the inner plan reached the test subject")
        return plan

    @staticmethod
    def refit_fold(fold: Fold) -> Fold:
        """The outer fold as the chosen candidates are refitted on it: all its training
        subjects (validation ones included), its test subject."""
        return replace(fold, train_ids=sorted(fold.train_ids + fold.val_ids), val_ids=[],
                       train_subjects=sorted(fold.train_subjects + fold.val_subjects),
                       val_subjects=[])

    def prepare(self, todo: list, cpu_workers: int = 1) -> str:
        """Before the outer folds `todo` ((k, fold), ...) run one by one: each candidate that
        fold batching trains (`training.fold_batching`, `mexp.engine.batching.choose`) trains
        the inner folds and the refit of every outer fold at once, outer x inner folds as one
        vectorised model (#15; seeds as the serial path: inner fold j gets seed + j, the refit
        of outer fold k seed + k); `__call__` then reads their outputs. Once one is batched,
        the closed-form candidates (scikit-learn members) fit their folds meanwhile, beside the
        device's training, in `cpu_workers` processes (when > 1). Inner folds keep only their
        probabilities. Returns which candidates were batched (for the run's tag)."""
        import threading

        from mexp.engine.batching import batched_outputs, choose
        from mexp.engine.pool import fold_outputs
        from mexp.engine.training import resolve_device
        nets, closed = [], []
        for name, c in self.candidates.items():
            fn, device = self.make_fold_fn(c), resolve_device(c.training.device)
            if choose(c.training.fold_batching, fn, device)[0]:
                nets.append((name, fn, device))
            elif hasattr(getattr(fn, "make_model", lambda: None)(), "fit_numpy"):
                on_cpu = copy.deepcopy(c)       # scikit-learn fits on the CPU anyway; its
                on_cpu.training.device = "cpu"  # workers then never open a CUDA context
                closed.append((name, self.make_fold_fn(on_cpu)))
        if not nets:
            return ""
        jobs = [(j, f, False) for k, fold in todo
                for j, f in enumerate(self.inner_plan(fold).folds)]
        jobs += [(k, self.refit_fold(fold), True) for k, fold in todo]
        todo_jobs = [(j, f) for j, f, _ in jobs]
        got, failed = {}, []

        def fit_closed():                   # beside the device's training, in processes
            try:
                for name, fn in closed:
                    got[name] = list(fold_outputs(fn, todo_jobs, cpu_workers))
            except BaseException as e:      # re-raised below, in the caller's thread
                failed.append(e)
        worker = threading.Thread(target=fit_closed, daemon=True)
        if cpu_workers > 1 and closed:
            worker.start()
        for name, fn, device in nets:
            self._keep(name, jobs, batched_outputs(fn, todo_jobs, device, other_seeds=False))
        if worker.ident is not None:        # started
            worker.join()
        if failed:
            raise failed[0]
        for name, outs in got.items():
            self._keep(name, jobs, outs)
        return ", ".join(n for n, _, _ in nets)

    def _keep(self, name: str, jobs: list, outs) -> None:
        for (j, f, refit), (_, _, out) in zip(jobs, outs):
            if not refit:                       # an inner fold: only its probabilities count
                out = replace(out, fit=replace(out.fit, state={}))
            self.ready[self._ready_key(name, j, f)] = out

    @staticmethod
    def _ready_key(name: str, k: int, fold: Fold) -> tuple:
        return (name, k, fold.name, tuple(fold.train_ids), tuple(fold.val_ids),
                tuple(fold.test_ids))

    def _output(self, name: str, fn, k: int, fold: Fold) -> FoldOutput:
        """Candidate `name`'s output for (k, fold): prepared in a batch, or trained now."""
        out = self.ready.pop(self._ready_key(name, k, fold), None)
        return out if out is not None else fn(k, fold)

    def inner_scores(self, fold: Fold) -> tuple[dict, dict, list[str]]:
        """Per candidate: pooled inner scores, and out-of-fold probabilities over `ids`."""
        plan, oof, ids = self.inner_plan(fold), {}, None
        for name, c in self.candidates.items():
            fn, got, todo = self.make_fold_fn(c), {}, list(enumerate(plan.folds))
            if all(self._ready_key(name, j, f) in self.ready for j, f in todo):
                outs = ((j, f, self._output(name, fn, j, f)) for j, f in todo)
            else:
                outs = self.inner_outputs(fn, c, todo)
            for _, _, out in outs:
                got.update(zip(out.test_ids, out.probs))
            ids = ids or sorted(got)
            oof[name] = np.stack([got[i] for i in ids])
        y = np.array([self.label[i] for i in ids])
        inner = {n: scores(y, p.argmax(1), self.num_classes) for n, p in oof.items()}
        return inner, oof, ids

    @staticmethod
    def inner_outputs(fn, cfg: Config, todo: list):
        """A candidate's inner folds: one vectorised model when `training.fold_batching`
        chooses it (`mexp.engine.batching`), else one fold after another."""
        from mexp.engine.batching import batched_outputs, choose
        from mexp.engine.training import resolve_device
        device = resolve_device(cfg.training.device)
        if choose(cfg.training.fold_batching, fn, device)[0]:
            return batched_outputs(fn, todo, device, other_seeds=False)
        return ((j, f, fn(j, f)) for j, f in todo)

    def ranked(self, inner: dict) -> list[str]:
        m = self.cfg.selection.metric
        order = list(self.candidates)
        return sorted(order, key=lambda n: (-inner[n][m], -inner[n]["uar"], order.index(n)))

    def __call__(self, k: int, fold: Fold) -> FoldOutput:
        inner, oof, ids = self.inner_scores(fold)
        ranked = self.ranked(inner)
        outer = self.refit_fold(fold)
        members = ranked[:1] if self.cfg.selection.mode == "best" else ranked
        outs = {n: self._output(n, self.make_fold_fn(self.candidates[n]), k, outer)
                for n in members}
        for n in set(self.candidates) - set(members):     # prepared refits not chosen
            self.ready.pop(self._ready_key(n, k, outer), None)
        best = outs[ranked[0]]
        probs, weights = best.probs, {ranked[0]: 1.0}
        if self.cfg.selection.mode == "stack":
            y = np.array([self.label[i] for i in ids])
            dbs = None
            if self.cfg.selection.stack_database:
                dbs = ([self.database[i] for i in ids],
                       [self.database[i] for i in best.test_ids])
            probs, weights = stack(oof, y, {n: o.probs for n, o in outs.items()}, members,
                                   self.num_classes, self.cfg.training.seed + k,
                                   self.cfg.training.class_weighted, dbs)
        notes = {"selected": ranked[0], "mode": self.cfg.selection.mode, "ranking": ranked,
                 "inner": {n: {m: round(v, 6) for m, v in s.items()} for n, s in inner.items()},
                 "weights": weights, "inner_samples": len(ids),
                 **({"stack_database": True} if self.cfg.selection.stack_database else {})}
        return replace(best, probs=probs, select_ids=sorted(ids), notes=notes,
                       fit=replace(best.fit, selected_on=f"nested:{ranked[0]}"))


def stack(oof: dict, y: np.ndarray, test: dict, members: list[str], num_classes: int,
          seed: int, balanced: bool = True,
          databases: tuple[list, list] | None = None) -> tuple[np.ndarray, dict]:
    """Test probabilities from a logistic regression on the members' inner out-of-fold
    probabilities (log-probabilities as features), classes weighted by inverse frequency when
    `balanced` (`training.class_weighted`, as the members were: UF1 and UAR weigh every class
    alike, and an unweighted stacker drifts to the majority class); its weight per member is
    the norm of the member's coefficients, for the record. With `databases` (the inner
    samples' and the test samples' database names: `selection.stack_database`) a one-hot of the
    database joins the features, so the stacker can learn each database's class balance from
    the inner folds; a database no inner sample has gets all zeros."""
    from sklearn.linear_model import LogisticRegression
    names = sorted(set(databases[0])) if databases is not None else []

    def feats(d, dbs=None):
        f = np.log(np.clip(np.hstack([d[n] for n in members]), 1e-6, 1))
        if dbs is None:
            return f
        return np.hstack([f, np.array([[float(b == n) for n in names] for b in dbs])
                          .reshape(len(f), len(names))])
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed,
                             class_weight="balanced" if balanced else None).fit(
        feats(oof, databases[0] if databases else None), y)
    p = np.zeros((len(next(iter(test.values()))), num_classes))
    p[:, clf.classes_] = clf.predict_proba(feats(test, databases[1] if databases else None))
    coef = np.abs(clf.coef_[:, :clf.coef_.shape[1] - len(names)]).reshape(
        len(clf.coef_), len(members), -1).sum(axis=(0, 2))
    return p, {n: round(float(w / coef.sum()), 4) for n, w in zip(members, coef)}
