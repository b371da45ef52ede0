"""How much compute fold-level pruning saves: the same study with pruner=none and pruner=median.

    python bench/hpo_pruning.py [--workdir /tmp/mexp-hpo-bench] [--trials 12]

Stage 1 (train_cnn + extract_features) runs once on the synthetic data; then two train_lstm
studies with the same TPE seed and space, one without pruning and one with the median pruner.
Reports wall time, folds trained and the best UF1 of each.
"""
from __future__ import annotations

import argparse
import time

from _setup import synthetic_config, workdir


def folds_trained(study_run_id: str) -> int:
    from mlflow.tracking import MlflowClient
    c = MlflowClient()
    exp = c.get_run(study_run_id).info.experiment_id
    n = 0
    for t in c.search_runs([exp], f"tags.mlflow.parentRunId = '{study_run_id}'"):
        n += len(c.search_runs([exp], f"tags.mlflow.parentRunId = '{t.info.run_id}'"))
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="")
    ap.add_argument("--trials", type=int, default=12)
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-hpo-bench-")
    from mexp import extract_features, hpo, train_cnn

    cfg = synthetic_config("hpo_lstm.yaml", work,
                           ["output.local=false", f"hpo.trials={args.trials}"])
    cfg.cnn_run_id = train_cnn.main(cfg)["run_id"]
    extract_features.main(cfg)
    cfg.cnn_run_id = ""
    rows = []
    for pruner in ("none", "median"):
        cfg.hpo.pruner, cfg.hpo.study_name = pruner, f"bench-{pruner}-{time.time_ns()}"
        t0 = time.perf_counter()
        out = hpo.main(cfg)
        rows.append((pruner, time.perf_counter() - t0, folds_trained(out["run_id"]), out))
    print(f"\n{args.trials} trials x {cfg.training.cv_folds} folds, train_lstm, TPE seed {cfg.hpo.seed}")
    print("| pruner | wall time (s) | folds trained | pruned trials | best UF1 |\n|---|---|---|---|---|")
    for pruner, t, n, out in rows:
        print(f"| {pruner} | {t:.0f} | {n} | {out['pruned']} | {out['best_value']:.4f} |")
    base = rows[0]
    print(f"median pruning: {100 * (1 - rows[1][2] / base[2]):.0f}% fewer folds, "
          f"{100 * (1 - rows[1][1] / base[1]):.0f}% less wall time")


if __name__ == "__main__":
    main()
