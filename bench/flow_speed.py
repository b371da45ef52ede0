"""Optical-flow extraction speed: clips per second per method, serial against the process pool.

    python bench/flow_speed.py [--clips 255] [--tvl1-clips 8] [--workdir /tmp/mexp-flow-bench]

Synthetic clips in CASME II's layout at the ROI config's size (128 px, 16 frames, head jitter),
through `mexp.extract_flow.compute` (face box, onset->frame flow, head-motion compensation,
7 ROIs, the 28x28 image) with `flow.workers=1` and with one process per core. TV-L1 is ~100x
slower than the others, so it gets fewer clips.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from types import SimpleNamespace

from _setup import synthetic_config, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=255)
    ap.add_argument("--tvl1-clips", type=int, default=8)
    ap.add_argument("--methods", default="dis,farneback,tvl1")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-flow-bench-", tracking=False)

    from mexp.data.datasets import load_dataset
    from mexp.extract_flow import compute

    cfg = synthetic_config("roi.yaml", work, ["synth.image_size=128"])
    cs = load_dataset(cfg.data)
    cores = os.cpu_count() or 1
    print(f"machine: {platform.machine()}, {cores} cores; clips {cs.clips.shape[1:]} "
          f"(frames, H, W, C)")
    print("| method | clips | serial clips/s | pool clips/s (%d processes) | pool / serial |" % cores)
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        n = args.tvl1_clips if method == "tvl1" else args.clips
        n = max(n, 4 * cores)               # compute() pools only from 4 clips per worker
        sub = SimpleNamespace(clips=cs.clips[:n], apex=cs.apex[:n], table=cs.table.iloc[:n])
        rates = {}
        for workers in (1, cores):
            fcfg = SimpleNamespace(**{**vars(cfg.flow), "method": method, "workers": workers})
            t0 = time.perf_counter()
            compute(sub, fcfg)
            rates[workers] = n / (time.perf_counter() - t0)
        print(f"| {method} | {n} | {rates[1]:.2f} | {rates[cores]:.2f} | "
              f"{rates[cores] / rates[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
