"""Wall time of the stages with MLflow logging on and off, and the time spent loading data.

    python bench/stage_timing.py [--epochs 15] [--folds 5] [--workdir /tmp/mexp-bench]

"Off" runs the same fold computations (the stage's own fold function, same seeds) without any
MLflow call; "on" is the stage's `main` against a fresh local SQLite store. Loading is timed cold
(empty clip cache: decode every JPEG) and warm (cache hits only).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from _setup import synthetic_config, workdir


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-bench-")

    from mexp import extract_features, train_cnn, train_lstm
    from mexp.data.datasets import load_dataset
    from mexp.data.inputs import images
    from mexp.engine.setup import fold_plan
    from mexp.tracking.runs import configure

    cfg = synthetic_config("demo.yaml", work, [f"training.epochs={args.epochs}",
                                               f"training.cv_folds={args.folds}",
                                               "output.local=false"])
    shutil.rmtree(work / "cache", ignore_errors=True)
    t_cold, cs = timed(lambda: load_dataset(cfg.data))
    t_warm, _ = timed(lambda: load_dataset(cfg.data))

    def cnn_off():
        load_dataset(cfg.data)                       # the stage loads its data too (warm)
        clips = images(cfg, cs)
        plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels)
        fn = train_cnn.make_fold_fn(cfg, cs, clips)
        for k, f in enumerate(plan.folds):
            fn(k, f)
    t_cnn_off, _ = timed(cnn_off)
    configure(cfg)
    t_cnn_on, cnn = timed(lambda: train_cnn.main(cfg))
    cfg.cnn_run_id = cnn["run_id"]
    t_feat, feats = timed(lambda: extract_features.main(cfg))
    cfg.features_run_id = feats["run_id"]

    def lstm_off():
        with tempfile.TemporaryDirectory() as d:
            f = train_lstm.resolve_features(cfg, Path(d))
            fn = train_lstm.make_fold_fn(cfg, f, f.lineage["classes"])
            for k, fold in enumerate(f.plan.folds):
                fn(k, fold)
    t_lstm_off, _ = timed(lstm_off)
    t_lstm_on, _ = timed(lambda: train_lstm.main(cfg))

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(cs)} clips, {args.folds} folds, {args.epochs} epochs, image "
          f"{cfg.data.image_size}px x {cfg.data.sequence_length} frames")
    print(f"load clips: cold (decode) {t_cold:.2f} s, warm (cache) {t_warm:.2f} s "
          f"-> {t_cold / t_warm:.1f}x")
    for name, on, off in (("train_cnn", t_cnn_on, t_cnn_off), ("train_lstm", t_lstm_on, t_lstm_off)):
        print(f"{name}: logging on {on:.1f} s, off {off:.1f} s -> overhead "
              f"{on - off:+.1f} s ({100 * (on - off) / off:+.1f}%)")
    print(f"extract_features: {t_feat:.1f} s")


if __name__ == "__main__":
    main()
