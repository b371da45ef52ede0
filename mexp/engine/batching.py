"""Fold batching in the cross-validation loop: whether a stage's folds are trained as one
vectorised model (`choose`, for `training.fold_batching`), and the fold outputs of such a
run (`batched_outputs`), which `mexp.engine.crossval.run_plan` logs like any other."""
from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

from mexp.engine.batched import Replica, fit_batched

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
    if mode == "on":
        return True, "training.fold_batching=on"
    n = sum(p.numel() for p in model.parameters())
    if device.type != "cuda":
        return False, "auto: on the CPU the fold processes are faster"
    if n > AUTO_MAX_PARAMS:
        return False, f"auto: {n:,} parameters is over the {AUTO_MAX_PARAMS:,} limit"
    return True, f"auto: CUDA and a {n:,}-parameter model"


@contextmanager
def seed_batch(seeds):
    """Within: a batched cross-validation also trains the replicas of the same folds for the
    other `seeds` (the later repeats of `repeats`) in the same vectorised model, and keeps
    their outputs until those repeats ask for them. Only for plans that do not depend on the
    seed (`mexp.tracking.repeats` checks); a fold whose ids differ is simply trained again."""
    token = _SEEDS.set(tuple(int(s) for s in seeds))
    try:
        yield
    finally:
        _SEEDS.reset(token)
        _KEPT.clear()


@contextmanager
def trial_group(configs):
    """Within: a batched cross-validation also trains the replicas of the same folds for the
    other `configs` (a group of HPO trials, `hpo.trial_batch`) that differ from its own only in
    per-replica hyperparameters (`PER_REPLICA`: learning rate, weight decay, class weighting,
    augmentation on or off),
    in the same vectorised model, and keeps their outputs until those trials' stages ask for
    them. Each replica's seed is its fold's, as when its trial trains alone; a trial whose
    config differs in anything else trains its own model when its turn comes."""
    token = _GROUP.set(tuple(configs))
    try:
        yield
    finally:
        _GROUP.reset(token)
        _KEPT.clear()


# config key -> the `Replica` field that carries it: what the replicas of one model may differ in
PER_REPLICA = {"training.lr": "lr", "training.weight_decay": "weight_decay",
               "training.class_weighted": "class_weighted", "data.augmentation": "augment"}


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def _hyper(cfg) -> dict:
    """`cfg`'s per-replica hyperparameters as `Replica` keyword arguments."""
    return {field: _get(cfg, key) for key, field in PER_REPLICA.items()}


def _group_members(cfg) -> list[tuple[str, dict]]:
    """(config key, per-replica hyperparameters) of each trial-group config that trains with
    `cfg`'s folds: the same config but for `PER_REPLICA` (compared on what `cfg` would be with
    their values, so a stage's own changes to its config carry over)."""
    own, out = _config_key(cfg), []
    for g in _GROUP.get():
        probe = copy.deepcopy(cfg)
        for key in PER_REPLICA:
            _set(probe, key, _get(g, key))
        if _strip(probe) == _strip(g) and _config_key(probe) != own:
            out.append((_config_key(probe), _hyper(g)))
    return out


def _strip(cfg) -> str:
    """The config without the per-replica hyperparameters, its seed or where outputs go."""
    d = cfg.to_dict()
    for key in [*PER_REPLICA, "training.seed"]:
        section, name = key.split(".")
        d[section] = {k: v for k, v in d[section].items() if k != name}
    d.pop("output", None)
    return json.dumps(d, sort_keys=True, default=str)


_SEEDS: ContextVar[tuple] = ContextVar("mexp_seed_batch", default=())
_GROUP: ContextVar[tuple] = ContextVar("mexp_trial_group", default=())
_KEPT: dict = {}            # (config without its seed, seed, k, fold ids) -> FoldOutput
STEP_PATHS: list = []       # how each vectorised fit ran its steps (cuda graph, eager, ...);
                            # `run_folds` clears it and tags the run with it


def _config_key(cfg) -> str:
    """The config without its seed: what the repeats of one run share."""
    d = cfg.to_dict()
    d["training"] = {**d["training"], "seed": None}
    return json.dumps(d, sort_keys=True, default=str)


def _key(base: str, seed: int, k: int, fold) -> tuple:
    return (base, seed, k, fold.name, tuple(fold.train_ids), tuple(fold.val_ids),
            tuple(fold.test_ids))


def replicas_per_chunk(params: int) -> int:
    """How many replicas train as one vectorised model: up to 2^26 stacked parameters (with
    AdamW's two moments and the gradients ~1 GiB in float32), between 16 and 1024. On the
    H100 one chunk's step cost hardly grows with its replicas (MEGC2019 nested selection:
    256 replicas 28.5 s, the other 152 22.9 s; BENCHMARKS.md), so small models (STSTNet, 1.7K
    parameters) train every fold of a nested run in one chunk."""
    return int(min(1024, max(16, 2 ** 26 // max(params, 1))))


def batched_outputs(fold_fn, todo: list, device: torch.device, chunk: int | None = None,
                    other_seeds: bool = True):
    """Yield `(k, fold, FoldOutput)` for every `(k, fold)` of `todo`, in order, training up
    to `chunk` replicas (default `replicas_per_chunk`) at a time as one vectorised model
    (fold k of seed s gets seed s + k, as the serial fold recipe). Inside `seed_batch` (and
    with `other_seeds`), the other seeds' replicas of these folds train alongside and are kept
    for their repeats; inside `trial_group`, so do the other trials' replicas. Each fold's
    arrays pass the same leak check first."""
    from mexp.engine.crossval import assert_rows_apart
    cfg, f = fold_fn.cfg, fold_fn
    seed, base = cfg.training.seed, _config_key(cfg)
    extra = [s for s in _SEEDS.get() if s != seed] if other_seeds else []
    configs = [(base, {})] + (_group_members(cfg) if other_seeds else [])
    jobs = [(b, hp, s, k, fold) for b, hp in configs for s in [seed] + extra for k, fold in todo
            if _key(b, s, k, fold) not in _KEPT]
    for k, fold in todo:                   # the leak check, before anything trains
        tr, va, te = (np.asarray(i, np.int64) for i in f.rows(fold))
        oracle = bool(set(fold.val_ids) & set(fold.test_ids))
        assert_rows_apart(fold, f.x[te], f.x[tr], None if oracle else f.x[va])
    if chunk is None:
        chunk = replicas_per_chunk(sum(p.numel() for p in f.make_model().parameters()))
    trained = _train(f, jobs, device, chunk)
    mine = [_key(base, seed, k, fold) for k, fold in todo]
    try:
        for (k, fold), key in zip(todo, mine):
            while key not in _KEPT:
                next(trained)
            yield k, fold, _KEPT.pop(key)
        for _ in trained:                   # other seeds' chunks not needed yet: train them now
            pass
    finally:                                # closed early (a pruned trial): drop what is left
        for key in mine:
            _KEPT.pop(key, None)


def _train(f, jobs: list, device, chunk: int):
    """Train `jobs` ((config key, per-replica hyperparameters, seed, k, fold), ...) chunk by
    chunk, keeping each output in `_KEPT`; yields after each chunk."""
    from mexp.engine.crossval import FoldOutput, distinct
    from mexp.engine.training import FitResult
    from mexp.util.progress import progress
    num_classes = f.make_model().num_classes
    own_aug = f.augment is not None         # the stage's own config; a trial's may differ
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        reps = []
        for _, hp, s, k, fold in part:
            tr, va, te = (np.asarray(i, np.int64) for i in f.rows(fold))
            reps.append(Replica(tr, va, te, seed=s + k, name=fold.name,
                                **{"augment": own_aug, **hp}))
        seeds, trials = len({j[2] for j in part}), len({j[0] for j in part})
        bar = progress(total=f.cfg.training.epochs, unit="ep", leave=False,
                       desc=f"{len(part)} folds batched" + (f" ({seeds} seeds)" if seeds > 1
                                                            else "")
                       + (f" ({trials} trials)" if trials > 1 else ""))
        results = fit_batched(f.make_model, f.x, f.y, reps, f.cfg.training, num_classes,
                              f.to_input, f.augment_kind or None, device,
                              on_epoch=lambda e: bar.update(1))
        bar.close()
        if results:
            STEP_PATHS.append(results[0].step_path)
        for (b, _, s, k, fold), rep, res in zip(part, reps, results):
            fit = FitResult(res.history, res.best_epoch, res.selected_on, res.state)
            example = f.to_input(f.x[rep.test_idx[:1]]).cpu().numpy()
            _KEPT[_key(b, s, k, fold)] = FoldOutput(
                list(f.ids[rep.test_idx]), res.probs, fit, distinct(f.ids[rep.train_idx]),
                list(f.ids[rep.val_idx]), example)
        yield
