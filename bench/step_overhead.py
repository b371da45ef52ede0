"""What one vectorised training step costs the host, and what the epoch plan costs, in the
shapes of the MEGC2019 benchmark (STSTNet, 442 flow images 3x28x28, LOSO: 68 replicas of ~435
training rows, batch 32, AdamW, class weights, flip/shift augmentation on the device).

    python bench/step_overhead.py [--device auto] [--replicas 68] [--steps 60]

- plan: `Lockstep.plan_epoch` for every replica (host: permutations, augmentation draws,
  batches sorted, optimizer scalars), ms per epoch;
- steps: ms per training step, the device synchronised, for each way a step can run: `eager`
  (every kernel issued from Python), `static` (the same from buffers allocated once, what a
  CUDA graph records) and on CUDA `cuda graph` (captured once, replayed);
- with `--tiny` the replicas' batches are 2 rows, so on the CPU the step time is nearly all
  host dispatch (what a GPU step costs when launch-bound).
Random inputs; the figures are of time, not accuracy.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from mexp.engine.batched import Lockstep, Replica
from mexp.engine.training import resolve_device
from mexp.models import create_model


def lockstep(dev, R: int, bs: int, graphs, n: int = 442) -> Lockstep:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 28, 28)).astype(np.float32)
    y = rng.integers(0, 3, n)
    folds = np.array_split(rng.permutation(n), R)
    reps = [Replica(np.setdiff1d(np.arange(n), f), None, f, seed=r) for r, f in enumerate(folds)]
    t = SimpleNamespace(batch_size=bs, epochs=1000, lr=5e-4, optimizer="adamw",
                        weight_decay=1e-3, class_weighted=True, early_stopping=0, device=dev.type)
    return Lockstep(lambda: create_model("ststnet", num_classes=3), x, y, reps, t, 3,
                    torch.as_tensor, "flow", dev, None, 256, "auto", graphs)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--replicas", type=int, default=68)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="batches of 2 rows (host dispatch)")
    a = ap.parse_args()
    dev = resolve_device(a.device)
    bs = 2 if a.tiny else 32
    ls = lockstep(dev, a.replicas, bs, None)
    t0 = time.perf_counter()
    for _ in range(5):
        ls.plan_epoch(np.arange(a.replicas))
    plan_ms = (time.perf_counter() - t0) / 5 * 1e3
    print(f"plan: {plan_ms:.1f} ms per epoch ({a.replicas} replicas, batch {bs})")
    modes = [("eager", None), ("static", "static")] + ([("cuda graph", "cuda")]
                                                     if dev.type == "cuda" else [])
    rows = []
    for name, graphs in modes:
        ls = lockstep(dev, a.replicas, bs, graphs)
        live = np.arange(a.replicas)
        ls.run_epoch(ls.plan_epoch(live))          # warm-up (and the capture)
        sync(dev)
        plans = [ls.plan_epoch(live) for _ in range(a.epochs)]
        sync(dev)
        t0 = time.perf_counter()
        for p in plans:
            ls.run_epoch(p)
        sync(dev)
        steps = sum(p["S"] for p in plans)
        ms = (time.perf_counter() - t0) / steps * 1e3
        path = "cuda graph" if ls._graph is not None else (ls.graph_error or name)
        rows.append((name, ms, path))
        print(f"steps {name}: {ms:.2f} ms per step ({steps} steps; ran as: {path})", flush=True)
    print(f"\n{dev}, {a.replicas} replicas, batch {bs}")
    print("| step | ms per step | ran as |\n|---|---|---|")
    for name, ms, path in rows:
        print(f"| {name} | {ms:.2f} | {path} |")


if __name__ == "__main__":
    main()
