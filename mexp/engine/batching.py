"""Fold batching in the cross-validation loop: whether a stage's folds are trained as one
vectorised model (`choose`, for `training.fold_batching`), and the fold outputs of such a
run (`batched_outputs`), which `mexp.engine.crossval.run_plan` logs like any other."""
from __future__ import annotations

import numpy as np
import torch

from mexp.engine.batched import Replica, fit_batched
from mexp.engine.recipes import recipe_keys

# Largest model `fold_batching: auto` stacks on a GPU (parameters per replica): the field's
# flow nets are 1.7K (STSTNet) to 6.5M (Dual-Inception).
AUTO_MAX_PARAMS = 10_000_000


def choose(mode: str, fold_fn, device: torch.device) -> tuple[bool, str]:
    """(batch the folds?, why) for `training.fold_batching` = auto | on | off. Batching needs a
    fold function made of rows of one array set (`RowFolds`) and a model trained by epochs;
    `auto` batches on CUDA only: on 2 CPU cores the batched MEGC2019 run used 1.12x the CPU
    time of the serial one (BENCHMARKS.md)."""
    from mexp.engine.crossval import RowFolds
    if mode == "off":
        return False, "training.fold_batching=off"
    if not isinstance(fold_fn, RowFolds):
        return False, "this stage's folds are not rows of one array set (or selection is nested)"
    model = fold_fn.make_model()
    if hasattr(model, "fit_numpy"):
        return False, "a closed-form model (fitted once, no epochs)"
    if recipe_keys(fold_fn.cfg.training):
        return False, f"{', '.join(recipe_keys(fold_fn.cfg.training))} not batched yet"
    if mode == "on":
        return True, "training.fold_batching=on"
    n = sum(p.numel() for p in model.parameters())
    if device.type != "cuda":
        return False, "auto: on the CPU the fold processes are faster"
    if n > AUTO_MAX_PARAMS:
        return False, f"auto: {n:,} parameters is over the {AUTO_MAX_PARAMS:,} limit"
    return True, f"auto: CUDA and a {n:,}-parameter model"


def batched_outputs(fold_fn, todo: list, device: torch.device, chunk: int = 256):
    """Yield `(k, fold, FoldOutput)` for every `(k, fold)` of `todo`, in order, training up
    to `chunk` folds at a time as one vectorised model (seed `cfg.training.seed + k`, as the
    serial fold recipe). Each fold's arrays pass the same leak check first."""
    from mexp.engine.crossval import FoldOutput, assert_rows_apart
    from mexp.engine.training import FitResult
    from mexp.util.progress import progress
    cfg, f = fold_fn.cfg, fold_fn
    num_classes = f.make_model().num_classes
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        reps = []
        for k, fold in part:
            tr, va, te = (np.asarray(i, np.int64) for i in f.rows(fold))
            oracle = bool(set(fold.val_ids) & set(fold.test_ids))
            assert_rows_apart(fold, f.x[te], f.x[tr], None if oracle else f.x[va])
            reps.append(Replica(tr, va, te, seed=cfg.training.seed + k, name=fold.name))
        bar = progress(total=cfg.training.epochs, desc=f"{len(part)} folds batched", unit="ep",
                       leave=False)
        results = fit_batched(f.make_model, f.x, f.y, reps, cfg.training, num_classes,
                              f.to_input, f.augment_kind or None, device,
                              on_epoch=lambda e: bar.update(1))
        bar.close()
        for (k, fold), rep, res in zip(part, reps, results):
            fit = FitResult(res.history, res.best_epoch, res.selected_on, res.state)
            example = f.to_input(f.x[rep.test_idx[:1]]).cpu().numpy()
            yield k, fold, FoldOutput(list(f.ids[rep.test_idx]), res.probs, fit,
                                      list(f.ids[rep.train_idx]), list(f.ids[rep.val_idx]),
                                      example)
