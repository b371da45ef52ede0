"""What logging one fold run costs (`mexp.tracking.folds.FoldLogger`): a nested run, its
LoggedModel, per-epoch and test metrics, confusion matrix, weights, the result file. A batched
run trains all its folds at once and then logs them one after another, so this is the floor of
its wall time (68 folds for MEGC2019).

    python bench/fold_logging.py [--folds 20] [--epochs 40] [--workdir /tmp/mexp-fold-logging]

An STSTNet fold (6 test samples, 40 epochs of history) into a local SQLite store; prints the
mean seconds per fold and the top of a cProfile by cumulative time.
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

        def one(i: int) -> None:
            test = [f"t{i}_{j}" for j in range(6)]
            fold = Fold(f"s{i}", [f"s{i}"], ["x"], [], test, train, [])
            out = FoldOutput(test, np.random.default_rng(i).dirichlet(np.ones(3), 6),
                             FitResult(history, a.epochs, "final", model.state_dict()), train,
                             [], np.zeros((1, 3, 28, 28), np.float32))
            logger._log(fold, out, np.array([0, 1, 2, 0, 1, 2]))
        one(0)                                     # warm: imports, the store's first writes
        prof, t = cProfile.Profile(), time.perf_counter()
        prof.enable()
        for i in range(1, a.folds + 1):
            one(i)
        prof.disable()
        per = (time.perf_counter() - t) / a.folds
        logger.close()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(12)
    print("\n".join(s.getvalue().splitlines()[:30]))
    print(f"{per:.3f} s per fold run ({a.folds} folds, {a.epochs} epochs of history)")


if __name__ == "__main__":
    main()
