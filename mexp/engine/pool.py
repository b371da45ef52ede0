"""Fold-level process parallelism: `training.fold_workers` processes each train whole folds.

Small models leave torch's intra-op threads idle (measured in FACTS.md: two 1-thread processes
beat one 2-thread process by 1.65x on a 2-core machine), so folds, which are independent, are
the unit of parallel work. Workers are *spawned* (safe with CUDA and with threads in the parent,
e.g. the fold logger); the stage's fold function is sent to each worker once, with cloudpickle,
since it is a closure over the stage's data. Outputs come back in plan order, so logging,
the leak check and HPO pruning see exactly what a serial run would.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

_FOLD_FN: Callable | None = None


def _init_worker(blob: bytes, threads: int) -> None:
    global _FOLD_FN
    import cloudpickle
    import torch

    from mexp.engine import training as engine

    engine.SHOW_PROGRESS = False        # one bar per worker would scramble the terminal
    torch.set_num_threads(threads)
    _FOLD_FN = cloudpickle.loads(blob)


def _run(k: int, fold):
    return _FOLD_FN(k, fold)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def fold_outputs(fold_fn: Callable, todo: Iterable[tuple[int, object]], workers: int = 1
                 ) -> Iterator[tuple[int, object, object]]:
    """Yield `(k, fold, fold_fn(k, fold))` for every `(k, fold)` in `todo`, in that order.
    `workers > 1` computes them in that many spawned processes; a worker's exception is
    re-raised here, and folds not yet started are cancelled when the caller stops early."""
    todo = list(todo)
    if workers <= 1 or len(todo) <= 1:
        for k, fold in todo:
            yield k, fold, fold_fn(k, fold)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import cloudpickle

    n = min(workers, len(todo))
    pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(cloudpickle.dumps(fold_fn), threads_per_worker(n)))
    try:
        futures = [(k, fold, pool.submit(_run, k, fold)) for k, fold in todo]
        for k, fold, fut in futures:
            yield k, fold, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
