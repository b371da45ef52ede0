"""What logging one fold run costs (`mexp.tracking.folds.FoldLogger`): a nested run, its
LoggedModel, per-epoch and test metrics, confusion matrix, weights, the result file. A batched
run trains all its folds at once and then logs them one after another, so this is the floor of
its wall time (68 folds for MEGC2019).

    python bench/fold_logging.py [--folds 20] [--epochs 40] [--workdir /tmp/mexp-fold-logging]
                                 [--processes 1,2,4]

An STSTNet fold (6 test samples, 40 epochs of history) into a local SQLite store; prints the
mean seconds per fold, what opening the run and model costs and what is left to log after
training when they were opened early (`FoldLogger.prepare`, as a batched run does), and the
top of a cProfile of that remainder by cumulative time. With `--processes`, the
folds are instead handed to `FoldLogger` all at once, as a batched run does, logged by one
thread (1) or N worker processes (`tracking.log_workers`), and the wall time per fold until
all are logged is printed for each (the processes started and warm first, as they are while
a run's folds train).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from _setup import workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--processes", default="")
    a = ap.parse_args()
    workdir(a.workdir, "mexp-fold-logging-")
    import mlflow

    from mexp.engine.crossval import FoldOutput
    from mexp.engine.plans import Fold
    from mexp.engine.training import FitResult
    from mexp.models import create_model
    from mexp.tracking.folds import FoldLogger
    mlflow.set_experiment("fold-logging")
    model = create_model("ststnet", num_classes=3, input_channels=3)
    history = [{"epoch": e, "train/loss": 1.0 / e} for e in range(1, a.epochs + 1)]
    train = [f"a{j}" for j in range(400)]
    with mlflow.start_run() as run:
        mlflow.set_tags({"mexp.model": "ststnet"})
        logger = FoldLogger(run.info.run_id, "train_cnn", ["negative", "positive", "surprise"],
                            None)

        def one(i: int, made=None, tag: str = "o") -> None:
            test = [f"t{i}_{j}" for j in range(6)]
            fold = Fold(f"s{i}" if made is None else f"{tag}{i}", [f"s{i}"], ["x"], [], test,
                        train, [])
            out = FoldOutput(test, np.random.default_rng(i).dirichlet(np.ones(3), 6),
                             FitResult(history, a.epochs, "final", model.state_dict()), train,
                             [], np.zeros((1, 3, 28, 28), np.float32))
            logger._log(fold, out, np.array([0, 1, 2, 0, 1, 2]), made)
        if a.processes:
            return burst(run.info.run_id, model, history, train, a)
        one(0)                                     # warm: imports, the store's first writes
        t = time.perf_counter()
        for i in range(1, a.folds + 1):
            one(i)
        per = (time.perf_counter() - t) / a.folds
        # a batched run opens its fold runs and models while the folds train (`prepare`):
        # what is left to log after training
        t = time.perf_counter()
        made = [logger._open(f"o{i}") for i in range(a.folds)]
        opened = (time.perf_counter() - t) / a.folds
        t = time.perf_counter()
        for i in range(a.folds):
            one(i, made[i])
        tail = (time.perf_counter() - t) / a.folds
        prof = cProfile.Profile()                   # the profile: apart, it slows the calls
        made = [logger._open(f"q{i}") for i in range(5)]
        prof.enable()
        for i in range(5):
            one(i, made[i], "q")
        prof.disable()
        logger.close()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(12)
    print("\n".join(s.getvalue().splitlines()[:30]))
    print(f"{per:.3f} s per fold run ({a.folds} folds, {a.epochs} epochs of history); opened "
          f"early: {opened:.3f} s to open, {tail:.3f} s left to log after training")


def burst(parent: str, model, history, train, a) -> None:
    """Every fold submitted at once, through each number of logging processes."""
    from mexp.engine.crossval import FoldOutput
    from mexp.engine.plans import Fold
    from mexp.engine.training import FitResult
    from mexp.tracking.folds import FoldLogger
    rows = []
    for n in [int(v) for v in a.processes.split(",")]:
        logger = FoldLogger(parent, "train_cnn", ["negative", "positive", "surprise"], None,
                            processes=n)
        outs = []
        for i in range(a.folds):
            test = [f"p{n}_{i}_{j}" for j in range(6)]
            outs.append((Fold(f"p{n}s{i}", [f"p{n}s{i}"], ["x"], [], test, train, []),
                         FoldOutput(test, np.random.default_rng(i).dirichlet(np.ones(3), 6),
                                    FitResult(history, a.epochs, "final", model.state_dict()),
                                    train, [], np.zeros((1, 3, 28, 28), np.float32))))
        logger.submit(*outs[0][:2], np.array([0, 1, 2, 0, 1, 2]))     # warm: workers' imports
        logger.drain()
        logger.pending.clear()
        t = time.perf_counter()
        for fold, out in outs[1:]:
            logger.submit(fold, out, np.array([0, 1, 2, 0, 1, 2]))
        logger.drain()
        per = (time.perf_counter() - t) / (a.folds - 1)
        logger.close()
        rows.append((n, per))
        print(f"{n} {'processes' if n > 1 else 'thread'}: {per * 1e3:.0f} ms per fold", flush=True)
    print("| logged by | ms per fold (all submitted at once) |\n|---|---|")
    for n, per in rows:
        print(f"| {f'{n} processes' if n > 1 else 'one thread'} | {per * 1e3:.0f} |")


if __name__ == "__main__":
    main()
