"""Fold batching against the serial loop and the fold-process pool, through `mexp.train_cnn`.

    python bench/fold_batching.py [--paths serial,pool,batched] [--seeds 1] [--epochs 40]
                                  [--device auto] [--workdir /tmp/mexp-fold-batching]

Each path is one full 68-subject LOSO run of `configs/megc2019_flow.yaml` (STSTNet, 40
epochs, AdamW, class-weighted, flip/shift augmentation; `--config` another, e.g.
`configs/megc2019_nested.yaml`) with `repeats=--seeds`:
- serial: `training.fold_workers=1 training.fold_batching=off` (one fold after another),
- pool: `training.fold_workers=0 training.fold_batching=off` (one 1-thread process per core),
- batched: `training.fold_batching=on` (all 68 folds as one vectorised model; on CUDA its
  training step is captured once as a CUDA graph and replayed),
- batched-eager: the same with `training.cuda_graphs=false` (each step's kernels launched from
  Python), to measure what the graph saves.
Prints wall time, process CPU time, the run's `mexp.fold_path` tag and the 3-seed mean (or the
one seed's) UF1/UAR, on CUDA the GPU utilisation sampled by nvidia-ml-py during the run, and
where the time went (`phases`: vectorised training, nested preparation, waiting for the fold
runs' logging, the rest).
Data: `$MEXP_DATA/megc2019_flow28` (default ../shared/data).

    python bench/fold_batching.py --workload demo [--paths ...] [--epochs 15] [--seeds 1]

The demo LOSO pipeline instead: `configs/demo.yaml` with `training.cv_method=LOSO` on the
synthetic CASME II-sized set (26 subjects; train_cnn -> extract_features -> train_lstm, 26
folds per stage), each path with its own SQLite store and a warm clip cache; per-stage times
and both training stages' fold-path tags.
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
         "batched": ["training.fold_batching=on"],
         "batched-eager": ["training.fold_batching=on", "training.cuda_graphs=false"]}


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


class Phases:
    """Where a run's wall time went: vectorised training (`fit_batched`, the device synchronised
    at its end), nested selection's `prepare` (batched nets and the closed-form members' worker
    processes), waiting for the fold runs to be logged after the loop (`FoldLogger.drain`),
    loading the data set (`load_dataset`), logging the dataset input and fold plan (`log_plan`)
    and the pooled metrics, plots and files (`summarise`), the CUDA device's first use
    (`device_startup`); the rest is start-up, the leak checks, serial training."""

    def __init__(self):
        self.t: dict[str, float] = {}

    def __enter__(self):
        from mexp.engine import batching, nested
        from mexp.tracking import folds
        names = {"fit_batched": "train", "prepare": "prepare", "drain": "log wait",
                 "load_dataset": "data", "log_plan": "plan log", "summarise": "summary"}
        self.patched = [(batching, "fit_batched"), (nested.NestedFolds, "prepare"),
                        (folds.FoldLogger, "drain"), (folds, "load_dataset"),
                        (folds, "log_plan"), (folds, "summarise")]
        self.saved = [getattr(o, n) for o, n in self.patched]
        for (o, n), f in zip(self.patched, self.saved):
            setattr(o, n, self.timed(names[n], f))
        return self

    def timed(self, key, f):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                import torch
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.t[key] = self.t.get(key, 0.0) + dt
                print(f"phase {key}: {dt:.1f} s", flush=True)
        return wrapper

    def __exit__(self, *exc):
        for (o, n), f in zip(self.patched, self.saved):
            setattr(o, n, f)

    def line(self, wall: float) -> str:
        inside = {"train"} if "prepare" in self.t else set()     # nested: training is in prepare
        rest = wall - sum(v for k, v in self.t.items() if k not in inside)
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.t.items()) + f", rest {rest:.1f} s"


def device_startup(device: str) -> float:
    """Seconds of the CUDA device's first use (context, the conv and matmul libraries'
    loading), timed inside the run's wall time, where the run would pay it at its first
    kernel: the "rest" without it is mexp's own. 0 on the CPU."""
    import torch
    from mexp.engine.training import resolve_device
    dev = resolve_device(device)
    if dev.type != "cuda":
        return 0.0
    t = time.perf_counter()
    x = torch.randn(8, 3, 28, 28, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    (torch.nn.functional.conv2d(x, w).flatten(1) @ torch.randn(2704, 3, device=dev)).sum().backward()
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t


def measured(main, cfg) -> tuple[dict, float, float, str, str]:
    """`main(cfg)`'s summary, wall and CPU seconds, the GPU utilisation meanwhile and where
    the time went (`Phases`). The tracking store's tables are made first (a new SQLite
    store takes seconds once; users' stores exist), so no path pays that."""
    import mlflow
    mlflow.search_experiments()
    gpu = GPUSampler()
    gpu.start()
    c0, t0 = cpu_seconds(), time.perf_counter()
    with Phases() as ph:
        if (up := device_startup(cfg.training.device)):
            ph.t["device start-up"] = up
        out = main(cfg)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    gpu.stop.set()
    return out, wall, cpu, gpu.summary(), ph.line(wall)


def run(path: str, seeds: int, extra: list[str], config: str) -> dict:
    from mlflow.tracking import MlflowClient

    from mexp import train_cnn
    cfg = load_config(REPO / config, [
        f"data.root={shared_data_dir() / 'megc2019_flow28'}", f"repeats={seeds}",
        "output.local=false", *PATHS[path], *extra])
    out, wall, cpu, gpu, phases = measured(train_cnn.main, cfg)
    first = out["repeats"][0]["run_id"] if seeds > 1 else out["run_id"]
    tags = MlflowClient().get_run(first).data.tags
    tag = tags.get("mexp.fold_path", "?") + (
        f" ({tags['mexp.fold_steps']})" if "mexp.fold_steps" in tags else "")
    return {"path": path, "wall": wall, "cpu": cpu, "tag": tag, "uf1": out["uf1"],
            "uar": out["uar"], "gpu": gpu, "run": out["run_id"], "phases": phases}


def run_demo(path: str, seeds: int, extra: list[str], work) -> dict:
    """The two-stage demo pipeline under LOSO through one path, in its own store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from _setup import synthetic_overrides
    from mexp import main as pipeline
    mlflow.set_tracking_uri(f"sqlite:///{work / (path + '.db')}")
    cfg = load_config(REPO / "configs/demo.yaml", synthetic_overrides(work) + [
        "training.cv_method=LOSO", "output.local=false", f"repeats={seeds}", *PATHS[path],
        *extra])
    out, wall, cpu, gpu, phases = measured(pipeline.main, cfg)
    client, stages, tags = MlflowClient(), {}, []
    for stage in ("cnn", "features", "lstm"):
        info = client.get_run(out[f"{stage}_run_id"])
        stages[stage] = (info.info.end_time - info.info.start_time) / 1000
        if stage != "features":
            tags.append(info.data.tags.get("mexp.fold_path", "?"))
    return {"path": path, "wall": wall, "cpu": cpu, "tag": " / ".join(tags), "uf1": out["uf1"],
            "uar": out.get("uar", float("nan")), "gpu": gpu, "run": out["run_id"],
            "stages": stages, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("megc", "demo"), default="megc")
    ap.add_argument("--paths", default="serial,pool,batched")
    ap.add_argument("--config", default="configs/megc2019_flow.yaml",
                    help="the MEGC2019 workload's config (configs/megc2019_nested.yaml: nested "
                         "selection, where batched trains outer x inner folds per candidate)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every path (e.g. a smaller synthetic set)")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-fold-batching-", tracking=args.workload == "megc")
    extra = [f"training.device={args.device}"] + (
        [f"training.epochs={args.epochs}"] if args.epochs else []) + args.set
    if args.workload == "demo":
        from _setup import synthetic_config
        from mexp.data.datasets import load_dataset
        load_dataset(synthetic_config("demo.yaml", work, extra).data)     # warm the clip cache
    rows = []
    for path in args.paths.split(","):
        r = run_demo(path, args.seeds, extra, work) if args.workload == "demo" else \
            run(path, args.seeds, extra, args.config)
        if "stages" in r:
            print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items()))
        print(f"phases {path}: {r['phases']}")
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
