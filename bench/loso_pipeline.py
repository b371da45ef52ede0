"""The full two-stage pipeline under leave-one-subject-out at CASME II scale (26 subjects,
255 synthetic clips): wall time with folds trained one after another against folds trained
in parallel worker processes (`training.fold_workers`), each with every stage's time.

    python bench/loso_pipeline.py [--epochs 15] [--workdir /tmp/mexp-loso-bench]

`configs/demo.yaml` with `training.cv_method=LOSO` (26 folds per stage), against a fresh local
SQLite store per variant and a warm clip cache, so only fold scheduling differs. The serial
variant uses torch's default threads (all cores) inside one process; the parallel one
`fold_workers=<cores>` processes of one thread each. The metrics differ by seed-level noise:
a different thread count changes the order of float sums, and training amplifies it (with
`training.num_threads=1` in both, the folds are identical: tests/test_fold_pool.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

from _setup import REPO, synthetic_config, synthetic_overrides, workdir
from mexp.config import load_config


def stage_seconds(run_ids: dict) -> dict:
    from mlflow.tracking import MlflowClient
    c = MlflowClient()
    out = {}
    for stage in ("cnn_run_id", "features_run_id", "lstm_run_id"):
        info = c.get_run(run_ids[stage]).info
        out[stage.removesuffix("_run_id")] = (info.end_time - info.start_time) / 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-loso-bench-", tracking=False)   # a store per variant
    import mlflow

    from mexp import main as pipeline
    from mexp.data.datasets import load_dataset

    cores = os.cpu_count() or 1
    extra = [f"training.epochs={args.epochs}", "training.cv_method=LOSO", "output.local=false"]
    base = synthetic_overrides(work) + extra          # reloaded per variant below
    cfg = synthetic_config("demo.yaml", work, extra)
    cs = load_dataset(cfg.data)                      # warm the cache for both variants
    print(f"machine: {platform.machine()}, {cores} cores; {len(cs)} clips, "
          f"{cs.table['subject'].nunique()} subjects, LOSO, {args.epochs} epochs per stage")
    rows = {}
    for name, workers in (("serial", 1), (f"{cores} fold workers", cores)):
        mlflow.set_tracking_uri(f"sqlite:///{work / (name.replace(' ', '_') + '.db')}")
        cfg = load_config(REPO / "configs/demo.yaml", base + [f"training.fold_workers={workers}"])
        t0 = time.perf_counter()
        out = pipeline.main(cfg)
        rows[name] = (time.perf_counter() - t0, stage_seconds(out), out["uf1"])
    print("\n| variant | total | train_cnn | extract_features | train_lstm | UF1 |")
    print("|---|---|---|---|---|---|")
    for name, (total, st, uf1) in rows.items():
        print(f"| {name} | {total:.1f} s | {st['cnn']:.1f} s | {st['features']:.1f} s | "
              f"{st['lstm']:.1f} s | {uf1:.4f} |")
    (a, *_), (b, *_) = rows.values()
    print(f"\nspeed-up from fold workers: {a / b:.2f}x")


if __name__ == "__main__":
    main()
