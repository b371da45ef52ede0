"""Per-stage engine set-up from the config: torch threads and determinism, the fold plan,
how many fold processes."""
from __future__ import annotations

import os

import torch

from mexp.config import Config

from mexp.engine.plans import FoldPlan, make_plan
from mexp.engine.training import resolve_device


def setup_torch(cfg: Config) -> None:
    if cfg.training.num_threads:
        torch.set_num_threads(cfg.training.num_threads)
    if torch.cuda.is_available() and cfg.training.device != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)   # CPU kernels already are


def fold_plan(cfg: Config, ids, groups, labels, databases=None) -> FoldPlan:
    t = cfg.training
    return make_plan(ids, groups, labels, method=t.cv_method, n_folds=t.cv_folds, seed=t.seed,
                     val_fraction=t.val_fraction, databases=databases,
                     holdout_test=t.holdout_test, holdout_train=t.holdout_train)


def fold_workers(cfg: Config) -> int:
    """training.fold_workers, with 0 meaning one process per CPU core (or 1 on a GPU, where
    folds in parallel would only queue on the one device)."""
    n = cfg.training.fold_workers
    if n < 0:
        raise ValueError(f"training.fold_workers must be >= 0, got {n}")
    if n == 0:
        n = 1 if resolve_device(cfg.training.device).type == "cuda" else (os.cpu_count() or 1)
    return n
