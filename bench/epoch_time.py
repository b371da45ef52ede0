"""One training epoch per model, at the input sizes its configs use, on the CPU (all cores and
one thread) and on CUDA when there is a GPU.

    python bench/epoch_time.py [--repeats 3] [--models cnn,lstm,...]

Each model trains on random inputs of its config's shape (CASME II scale, 255 samples; the
MEGC2019 flow models 442): one warm-up epoch, then the median of `--repeats` timed epochs
through `mexp.engine.train_one_epoch` (the stages' own loop). The ratio printed is CPU time
over GPU time when a GPU is present, else all-cores over one thread.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn as nn

from mexp.data.inputs import features_to_tensor
from mexp.engine.training import train_one_epoch
from mexp.models import count_parameters, create_model

# model -> (samples, input shape per sample, constructor kwargs, batch size, where the size comes from)
SHAPES = {
    "cnn": (255, (1, 128, 128), dict(input_channels=1), 32, "configs/cnn_stage1.yaml"),
    "lstm": (255, (16, 256), dict(input_dim=256, hidden_size=128, num_layers=2), 16,
             "configs/lstm_stage2.yaml"),
    "cnn_lstm": (255, (8, 1, 48, 48), dict(input_channels=1), 16, "configs/cnn_lstm.yaml"),
    "roi_transformer": (255, (16, 14), dict(dim=64, heads=4, num_layers=3), 32, "configs/roi.yaml"),
    "flow_cnn": (442, (3, 28, 28), dict(width=16), 32, "MEGC2019 flow images"),
    "ststnet": (442, (3, 28, 28), dict(), 32, "configs/megc2019_flow.yaml"),
}


def epoch_seconds(name: str, device: torch.device, repeats: int) -> float:
    n, shape, kwargs, bs, _ = SHAPES[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, 3, n)
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.CrossEntropyLoss()

    def one():
        t0 = time.perf_counter()
        train_one_epoch(model, x, y, opt, loss, features_to_tensor, bs, rng, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    one()                                                   # warm-up (allocator, kernels)
    return statistics.median(one() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(SHAPES))
    args = ap.parse_args()
    names = args.models.split(",")
    cores = torch.get_num_threads()
    gpu = torch.cuda.is_available()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if gpu else ", no GPU"))
    head = f"| model | params | samples x input | CPU {cores} threads | CPU 1 thread |"
    print(head + (" GPU | CPU/GPU |" if gpu else " 1 thread / all |"))
    print("|---" * (6 if gpu else 5) + "|---|")
    for name in names:
        n, shape, kwargs, _, _ = SHAPES[name]
        params = count_parameters(create_model(name, num_classes=3, **kwargs))
        torch.set_num_threads(cores)
        t_all = epoch_seconds(name, torch.device("cpu"), args.repeats)
        torch.set_num_threads(1)
        t_one = epoch_seconds(name, torch.device("cpu"), args.repeats)
        torch.set_num_threads(cores)
        row = f"| {name} | {params:,} | {n} x {shape} | {t_all:.3f} s | {t_one:.3f} s |"
        if gpu:
            t_gpu = epoch_seconds(name, torch.device("cuda"), args.repeats)
            row += f" {t_gpu:.3f} s | {min(t_all, t_one) / t_gpu:.1f}x |"
        else:
            row += f" {t_one / t_all:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
