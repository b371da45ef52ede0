"""The cross-validation loop every training stage shares, without tracking: the fold recipe
(`fit_and_score`), the leak check, and `run_plan`, which trains every fold not yet done (in
fold processes if asked) and hands each finished fold to a recorder in plan order.

The recorder (`mexp.tracking.folds.FoldLogger` in the stages) logs a fold and says which folds
a resumed run already has; the loop never talks to MLflow itself."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import numpy as np
import pandas as pd

from mexp.engine.metrics import scores
from mexp.engine.plans import Fold, FoldPlan, FoldPlanError, check_plan
from mexp.engine.pool import fold_outputs
from mexp.engine.training import FitResult, fit, predict_proba, resolve_device, set_seed
from mexp.util.progress import progress

_ON_FOLD: ContextVar[Callable | None] = ContextVar("mexp_on_fold", default=None)


@contextmanager
def fold_callback(fn: Callable[[int, dict], None]):
    """Call `fn(k, running_scores)` after each fold of the stages run inside (HPO pruning)."""
    token = _ON_FOLD.set(fn)
    try:
        yield
    finally:
        _ON_FOLD.reset(token)


@dataclass
class FoldOutput:
    test_ids: list[str]
    probs: np.ndarray            # (n_test, C) class probabilities
    fit: FitResult
    fit_ids: list[str]           # samples the model's weights were fitted on
    select_ids: list[str]        # samples the epoch was selected on (validation subjects)
    example: np.ndarray | None = None   # one input batch (1, ...) as the network takes it
    notes: dict | None = None    # nested selection: what was chosen and the inner scores


def fit_and_score(cfg, k: int, fold: Fold, make_model: Callable, train: tuple, val: tuple,
                  x_test, ids: tuple, to_input, augment=None) -> FoldOutput:
    """The fold recipe every stage shares: a seeded model, fitted on `train` with epochs
    selected on `val` (if it has samples), class probabilities on `x_test`.
    `ids` = (test ids, ids fitted on, ids selected on), recorded for the leak check; the
    arrays themselves are checked too (`assert_rows_apart`)."""
    oracle = bool(set(fold.val_ids) & set(fold.test_ids))    # evaluation.oracle: val = test
    assert_rows_apart(fold, x_test, train[0], None if oracle else val[0])
    set_seed(cfg.training.seed + k)
    model = make_model()
    res = fit(model, train, val if len(val[1]) else None, cfg.training, model.num_classes,
              to_input, augment, seed=cfg.training.seed + k, desc=f"fold {fold.name}")
    probs = predict_proba(model, x_test, to_input, cfg.training.batch_size,
                          resolve_device(cfg.training.device))
    test_ids, fit_ids, select_ids = ids
    example = to_input(x_test[:1]).cpu().numpy()         # the fold LoggedModel's input example
    return FoldOutput(list(test_ids), probs, res, list(fit_ids), list(select_ids), example)


def row_digests(x: np.ndarray) -> list[bytes | None]:
    """One digest per row of `x` (None for a constant row: an all-zero difference image says
    nothing about which sample it came from)."""
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    constant = (flat == flat[:, :1]).all(1) if flat.shape[1] else np.ones(len(x), bool)
    return [None if c else hashlib.blake2b(r.tobytes(), digest_size=16).digest()
            for r, c in zip(flat, constant)]


def assert_rows_apart(fold: Fold, x_test: np.ndarray, x_fit: np.ndarray,
                      x_select: np.ndarray | None) -> None:
    """Stop the fold if a row given to `fit` (to fit weights, or to select the epoch) is a test
    row: what the model was actually given, whatever ids the stage declared."""
    test = set(row_digests(x_test)) - {None}
    for what, x in (("fitted", x_fit), ("selected", x_select)):
        if x is None or not len(x) or not test:
            continue
        n = sum(d in test for d in row_digests(x))
        if n:
            raise FoldPlanError(f"fold {fold.name}: {n} row(s) of the array the model was {what} "
                                f"on equal test rows: test samples reached `fit`")


def assert_no_leak(fold: Fold, out: FoldOutput, subject_of: dict) -> None:
    """Stop the run if a test subject's sample reached fitting or selection."""
    test = set(fold.test_subjects)
    for what, ids in (("fitted", out.fit_ids), ("selected", out.select_ids)):
        bad = sorted({subject_of[i] for i in ids} & test)
        if bad:
            raise FoldPlanError(f"fold {fold.name}: the model was {what} on test subject(s) {bad}")


def fold_rows(fold: Fold, pos: dict) -> tuple[list[int], list[int], list[int]]:
    """Row indices (train, val, test) of a fold's samples, given sample id -> row."""
    return tuple([pos[i] for i in s] for s in (fold.train_ids, fold.val_ids, fold.test_ids))


def fit_rows(cfg, k: int, fold: Fold, make_model: Callable, x: np.ndarray, y: np.ndarray,
             ids: np.ndarray, rows: tuple, to_input, augment=None) -> FoldOutput:
    """`fit_and_score` on the rows (train, val, test) of `x`, `y` and `ids`."""
    tr, va, te = rows
    return fit_and_score(cfg, k, fold, make_model, (x[tr], y[tr]), (x[va], y[va]), x[te],
                         (ids[te], distinct(ids[tr]), ids[va]), to_input, augment)


def distinct(ids) -> list:
    """`ids` once each, in order (several rows may be one sample's: its frames)."""
    return list(dict.fromkeys(ids))


@dataclass
class RowFolds:
    """A stage's fold function whose folds are rows of one set of arrays (x, y, ids): called
    as `(k, fold)` it is the plain fold recipe; fold batching (`mexp.engine.batched`) reads the
    arrays and `rows(fold)` to train many folds as one vectorised model."""
    cfg: object
    make_model: Callable
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    rows: Callable[[Fold], tuple]           # fold -> (train, val, test) row indices
    to_input: Callable
    augment: Callable | None = None
    augment_kind: str = ""                  # flow | frames: what augmentation is for these
                                            # rows on the device (also when it is off)

    def __call__(self, k: int, fold: Fold) -> FoldOutput:
        return fit_rows(self.cfg, k, fold, self.make_model, self.x, self.y, self.ids,
                        self.rows(fold), self.to_input, self.augment)


class BlockFolds(RowFolds):
    """Folds whose arrays differ per fold (train_lstm: each fold's own CNN features; train_roi:
    each fold's own standardisation), seen by fold batching as rows of one array set: a fold's
    array is one block of `x`, added when `rows(fold)` first asks for that fold (so an inner
    fold of nested selection gets its own block too), and `y` / `ids` repeat per block. Called
    as `(k, fold)` it is the plain fold recipe on `fold_x(fold)` alone: nothing is stacked
    unless the folds are batched."""

    def __init__(self, cfg, make_model: Callable, fold_x: Callable[[Fold], np.ndarray],
                 y: np.ndarray, ids: np.ndarray, to_input: Callable, augment=None,
                 augment_kind: str = ""):
        self.cfg, self.make_model, self.fold_x, self.to_input = cfg, make_model, fold_x, to_input
        self.augment, self.augment_kind = augment, augment_kind
        self.base_y, self.base_ids = np.asarray(y), np.asarray(ids)
        self.pos = {s: i for i, s in enumerate(self.base_ids)}
        self.blocks: dict[tuple, int] = {}           # fold key -> block number
        self._arrays: list[np.ndarray] = []
        self._x = None

    @staticmethod
    def _fold_key(fold: Fold) -> tuple:
        return fold.name, tuple(fold.train_ids), tuple(fold.val_ids), tuple(fold.test_ids)

    def rows(self, fold: Fold) -> tuple:
        key = self._fold_key(fold)
        if key not in self.blocks:
            self.blocks[key] = len(self._arrays)
            self._arrays.append(self.fold_x(fold))
            self._x = None
        off = self.blocks[key] * len(self.base_ids)
        return tuple([i + off for i in r] for r in fold_rows(fold, self.pos))

    @property
    def x(self) -> np.ndarray:
        if self._x is None:
            self._x = np.concatenate(self._arrays) if self._arrays else np.zeros((0,))
        return self._x

    @property
    def y(self) -> np.ndarray:
        return np.tile(self.base_y, max(len(self._arrays), 1))

    @property
    def ids(self) -> np.ndarray:
        return np.tile(self.base_ids, max(len(self._arrays), 1))

    def __call__(self, k: int, fold: Fold) -> FoldOutput:
        return fit_rows(self.cfg, k, fold, self.make_model, self.fold_x(fold), self.base_y,
                        self.base_ids, fold_rows(fold, self.pos), self.to_input, self.augment)


class Recorder(Protocol):
    """What `run_plan` hands each finished fold to (`mexp.tracking.folds.FoldLogger`)."""
    def submit(self, fold: Fold, out: FoldOutput, labels: np.ndarray) -> None: ...
    def check(self) -> None: ...                      # re-raise a recording error now
    def drain(self) -> dict[str, dict]: ...           # fold name -> its recorded result
    def close(self) -> None: ...


def run_plan(plan: FoldPlan, table: pd.DataFrame, num_classes: int,
             fold_fn: Callable[[int, Fold], FoldOutput], recorder: Recorder,
             done: dict[str, dict] | None = None, on_fold: Callable[[int, dict], None] | None = None,
             oracle: bool = False, workers: int = 1, desc: str = "folds",
             batched_on=None, before_drain: Callable[[list[dict]], None] | None = None
             ) -> list[dict]:
    """Every fold of `plan` not in `done` (fold name -> result of a resumed run), trained by
    `fold_fn` (in `workers` processes if > 1), leak-checked and handed to `recorder` in plan
    order; `on_fold(k, running_scores)` after each fold (HPO prunes there). With `oracle`
    the validation split is the test fold (tagged and reported as such by the caller).
    `batched_on` (a torch device) trains the folds as one vectorised model instead
    (`mexp.engine.batched`; `fold_fn` must be a RowFolds). Returns the fold results in plan
    order, as the recorder recorded them. `before_drain(results)` gets every fold's test ids,
    probabilities (as recorded) and history in plan order while the recorder may still be
    logging: the pooled plots render meanwhile."""
    done = done or {}
    check_plan(plan, table["sample_id"])
    on_fold = on_fold or _ON_FOLD.get()
    label_of = dict(zip(table["sample_id"], table["label"].astype(int)))
    subject_of = dict(zip(table["sample_id"], table["subject"]))
    results: dict[str, dict] = dict(done)
    if oracle:
        def run_fold(k, fold, fn=fold_fn):
            return fn(k, replace(fold, val_ids=fold.test_ids, val_subjects=fold.test_subjects))
    else:
        run_fold = fold_fn
    todo = [(k, f) for k, f in enumerate(plan.folds) if f.name not in done]
    if batched_on is not None:
        from mexp.engine.batching import batched_outputs
        swap = (lambda f: replace(f, val_ids=f.test_ids, val_subjects=f.test_subjects)) \
            if oracle else (lambda f: f)
        outputs = batched_outputs(fold_fn, [(k, swap(f)) for k, f in todo], batched_on)
    else:
        outputs = fold_outputs(run_fold, todo, workers)
    try:
        for k, fold in enumerate(progress(plan.folds, desc=desc, unit="fold")):
            if fold.name not in done:
                k_out, fold_out, out = next(outputs)
                assert (k_out, fold_out.name) == (k, fold.name)
                if not oracle:
                    assert_no_leak(fold, out, subject_of)
                y = np.array([label_of[i] for i in out.test_ids])
                recorder.submit(fold, out, y)
                recorder.check()
                results[fold.name] = {"fold": fold.name, "test_ids": list(out.test_ids),
                                      "probs": out.probs.round(6).tolist(),
                                      "history": out.fit.history}
            if on_fold is not None:
                so_far = [results[f.name] for f in plan.folds[:k + 1]]
                on_fold(k, pooled_scores(so_far, label_of, num_classes))
        if before_drain is not None:
            before_drain([results[f.name] for f in plan.folds])
        results.update(recorder.drain())   # the pooled metrics come from what was recorded
    finally:
        outputs.close()                    # cancels folds not started (e.g. a pruned trial)
        recorder.close()
    return [results[f.name] for f in plan.folds]


def pooled_scores(results: list[dict], label_of: dict, num_classes: int) -> dict:
    ids = [i for r in results for i in r["test_ids"]]
    preds = np.concatenate([np.asarray(r["probs"]).argmax(1) for r in results]) if ids else []
    return scores([label_of[i] for i in ids], preds, num_classes)


def predictions_table(results: list[dict], table: pd.DataFrame, classes) -> pd.DataFrame:
    rows = []
    meta = table.set_index("sample_id")
    for r in results:
        for sid, p in zip(r["test_ids"], r["probs"]):
            m = meta.loc[sid]
            rows.append({"sample_id": sid, "dataset": m["dataset"], "subject": m["subject"],
                         "fold": r["fold"], "label": int(m["label"]), "pred": int(np.argmax(p)),
                         **{f"prob_{c}": float(v) for c, v in zip(classes, p)},
                         "best_epoch": r["best_epoch"], "selected_on": r["selected_on"],
                         **({"selected": r["selection"]["selected"]} if "selection" in r else {}),
                         "fold_run_id": r["fold_run_id"]})
    return pd.DataFrame(rows)
