"""Fold batching against the serial loop and the fold-process pool, through `mexp.train_cnn`.

    python bench/fold_batching.py [--paths serial,pool,batched] [--seeds 1] [--epochs 40]
                                  [--device auto] [--workdir /tmp/mexp-fold-batching]

Each path is one full 68-subject LOSO run of `configs/megc2019_flow.yaml` (STSTNet, 40
epochs, AdamW, class-weighted, flip/shift augmentation) with `repeats=--seeds`:
- serial: `training.fold_workers=1 training.fold_batching=off` (one fold after another),
- pool: `training.fold_workers=0 training.fold_batching=off` (one 1-thread process per core),
- batched: `training.fold_batching=on` (all 68 folds as one vectorised model).
Prints wall time, process CPU time, the run's `mexp.fold_path` tag and the 3-seed mean (or the
one seed's) UF1/UAR, and on CUDA the GPU utilisation sampled by nvidia-ml-py during the run.
Data: `$MEXP_DATA/megc2019_flow28` (default ../shared/data).
"""
from __future__ import annotations

import argparse
import resource
import sys
import threading
import time

from _setup import REPO, workdir
from mexp.config import load_config
from mexp.data.datasets import shared_data_dir

PATHS = {"serial": ["training.fold_workers=1", "training.fold_batching=off"],
         "pool": ["training.fold_workers=0", "training.fold_batching=off"],
         "batched": ["training.fold_batching=on"]}


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class GPUSampler(threading.Thread):
    """Mean and peak GPU utilisation (%) every 0.2 s while running (none without a GPU)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()

    def run(self) -> None:
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:               # no NVIDIA driver: nothing to sample
            return
        while not self.stop.wait(0.2):
            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)

    def summary(self) -> str:
        if not self.samples:
            return "-"
        return f"{sum(self.samples) / len(self.samples):.0f}% mean, {max(self.samples)}% peak"


def run(path: str, seeds: int, extra: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    from mexp import train_cnn
    cfg = load_config(REPO / "configs/megc2019_flow.yaml", [
        f"data.root={shared_data_dir() / 'megc2019_flow28'}", f"repeats={seeds}",
        "output.local=false", *PATHS[path], *extra])
    gpu = GPUSampler()
    gpu.start()
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = train_cnn.main(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    gpu.stop.set()
    first = out["repeats"][0]["run_id"] if seeds > 1 else out["run_id"]
    tag = MlflowClient().get_run(first).data.tags.get("mexp.fold_path", "?")
    return {"path": path, "wall": wall, "cpu": cpu, "tag": tag, "uf1": out["uf1"],
            "uar": out["uar"], "gpu": gpu.summary(), "run": out["run_id"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="serial,pool,batched")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-fold-batching-")
    extra = [f"training.device={args.device}"] + (
        [f"training.epochs={args.epochs}"] if args.epochs else [])
    rows = []
    for path in args.paths.split(","):
        r = run(path, args.seeds, extra)
        rows.append(r)
        print(f"RESULT {path}: {r['wall']:.1f} s wall, {r['cpu']:.0f} s CPU, UF1 {r['uf1']:.4f} "
              f"UAR {r['uar']:.4f}, {r['tag']}, GPU {r['gpu']}, run {r['run']}", flush=True)
    print(f"\n{' '.join(sys.argv)}  (work: {work})")
    print("| path | seeds | wall (s) | CPU (s) | UF1 | UAR | fold path (tag) | GPU utilisation |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {args.seeds} | {r['wall']:.1f} | {r['cpu']:.0f} | {r['uf1']:.4f} "
              f"| {r['uar']:.4f} | {r['tag']} | {r['gpu']} |")


if __name__ == "__main__":
    main()
