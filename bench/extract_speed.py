"""extract_features' embedding step: the code before #17 against the shipped one, and the
variants tried, on a finished train_cnn run's fold CNNs and data; every variant's features are
checked against the old code's.

    python bench/extract_speed.py --tracking-uri sqlite:////path/mlflow.db [--cnn-run-id <id>]
        [--repeats 3] [--variants all] [--clips N] [--reference-dir <features written before>]

Without --cnn-run-id the newest FINISHED train_cnn run of the store is used. Variants run
interleaved, `--repeats` rounds, and the median is printed, so load from other jobs hits them
alike; `--clips N` times the first N clips only. `--reference-dir` also compares a stored
`features/fold=*.npy` set (e.g. the one the stage wrote before the change) with the shipped
code's output. Exits 1 if the shipped code's features differ from the old code's (or the stored
ones) by more than --atol (1e-5). Run it from the repository root with PYTHONPATH=. so the
checkout's mexp is the one imported.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def old_embed(model, clips, device, batch=256):
    """extract_features.embed before #17, verbatim: one model, no_grad, batch 256."""
    from mexp.data.inputs import images_to_tensor
    with torch.no_grad():
        model.eval().to(device)
        n, t = clips.shape[:2]
        frames = clips.reshape(n * t, *clips.shape[2:])
        out = [model.forward_features(images_to_tensor(frames[i:i + batch]).to(device)).cpu()
               for i in range(0, len(frames), batch)]
        return torch.cat(out).numpy().astype(np.float16).reshape(n, t, -1)


def channels_last(models, clips, device, batch=512):
    """The shipped loop with the models and each batch in channels-last memory format."""
    from mexp.data.inputs import images_to_tensor
    models = [m.eval().to(device).to(memory_format=torch.channels_last) for m in models]
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, *clips.shape[2:])
    outs = [[] for _ in models]
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = images_to_tensor(frames[i:i + batch]).to(device).contiguous(
                memory_format=torch.channels_last)
            for o, m in zip(outs, models):
                o.append(m.forward_features(x).cpu())
    return [torch.cat(o).numpy().astype(np.float16).reshape(n, t, -1) for o in outs]


def vmapped(models, clips, device, batch=512):
    """All fold CNNs stacked (torch.func.stack_module_state) and run with vmap on each batch."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    from mexp.data.inputs import images_to_tensor
    models = [m.eval().to(device) for m in models]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x):
        return functional_call(base, (p, b), (x,), strict=False)

    class Feat(torch.nn.Module):          # functional_call on forward_features
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.forward_features(x)
    base = Feat(base)
    params = {f"m.{k}": v for k, v in params.items()}
    buffers = {f"m.{k}": v for k, v in buffers.items()}
    n, t = clips.shape[:2]
    frames = clips.reshape(n * t, *clips.shape[2:])
    outs = []
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = images_to_tensor(frames[i:i + batch]).to(device)
            outs.append(vmap(one, in_dims=(0, 0, None))(params, buffers, x).cpu())
    f = torch.cat(outs, 1).numpy().astype(np.float16)          # (models, frames, D)
    return [a.reshape(n, t, -1) for a in f]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--cnn-run-id", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--reference-dir", default="")
    ap.add_argument("--atol", type=float, default=1e-5)
    ap.add_argument("--clips", type=int, default=0, help="only the first N clips (0: all)")
    args = ap.parse_args()
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    import mlflow

    from mexp import extract_features as ef
    from mexp.tracking.datasets import fetch_plan
    from mexp.data.datasets import load_dataset
    from mexp.data.inputs import images
    from mexp.models.build import build_cnn

    rid = args.cnn_run_id or mlflow.search_runs(
        search_all_experiments=True, output_format="list", max_results=1,
        filter_string="tags.`mexp.stage` = 'train_cnn' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])[0].info.run_id
    ccfg = ef.cnn_config(rid)
    cs = load_dataset(ccfg.data)
    clips = images(ccfg, cs)
    if args.clips:
        clips = clips[:args.clips]
    plan = fetch_plan(rid)
    models = []
    for fold in plan.folds:
        m = build_cnn(ccfg, clips.shape[-1], len(cs.classes))
        m.load_state_dict(ef.fold_weights(rid, fold.name, False))
        models.append(m)
    cpu = torch.device("cpu")
    print(f"train_cnn run {rid}: {len(models)} fold CNNs x {clips.shape[0]} clips x "
          f"{clips.shape[1]} frames of {clips.shape[2]} px; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}")

    variants = {
        "before: per fold, no_grad, batch 256": lambda: [old_embed(m, clips, cpu) for m in models],
        "shipped: embed_all, inference_mode, batch 512": lambda: ef.embed_all(models, clips, cpu),
        "embed_all, batch 256": lambda: ef.embed_all(models, clips, cpu, 256),
        "embed_all, batch 1024": lambda: ef.embed_all(models, clips, cpu, 1024),
        "embed_all, batch 2048": lambda: ef.embed_all(models, clips, cpu, 2048),
        "channels_last, batch 512": lambda: channels_last(models, clips, cpu),
        "vmap over stacked folds, batch 512": lambda: vmapped(models, clips, cpu),
    }
    names = list(variants) if args.variants == "all" else \
        [n for n in variants if any(v in n for v in args.variants.split(","))]
    if names[0] != list(variants)[0]:
        names.insert(0, list(variants)[0])
    wall = {n: [] for n in names}
    cpus = {n: [] for n in names}
    result = {}
    for _ in range(args.repeats):
        for n in names:
            c0, t0 = cpu_seconds(), time.perf_counter()
            result[n] = variants[n]()
            wall[n].append(time.perf_counter() - t0)
            cpus[n].append(cpu_seconds() - c0)
            print(f"  {n}: {wall[n][-1]:.2f} s wall, {cpus[n][-1]:.2f} s CPU", flush=True)
    ref = result[names[0]]
    bad = False
    base = statistics.median(wall[names[0]])
    print(f"\n| variant | wall s (median of {args.repeats}) | CPU s | vs before | "
          "max abs diff vs before | elements differing |")
    print("|---|---|---|---|---|---|")
    for n in names:
        d = [np.abs(a.astype(np.float32) - b.astype(np.float32)) for a, b in zip(result[n], ref)]
        mx, ndiff = max(float(x.max()) for x in d), sum(int((x > 0).sum()) for x in d)
        w = statistics.median(wall[n])
        print(f"| {n} | {w:.2f} | {statistics.median(cpus[n]):.2f} | {base / w:.2f}x | "
              f"{mx:.2e} | {ndiff} of {sum(x.size for x in d)} |")
        bad |= n.startswith("shipped") and mx > args.atol
    if args.reference_dir and not args.clips:
        shipped = result[names[1]] if len(names) > 1 and names[1].startswith("shipped") else \
            ef.embed_all(models, clips, cpu)
        mx = 0.0
        for fold, a in zip(plan.folds, shipped):
            stored = np.load(Path(args.reference_dir) / f"fold={fold.name}.npy")
            assert stored.shape == a.shape and stored.dtype == a.dtype, (stored.shape, a.shape)
            mx = max(mx, float(np.abs(stored.astype(np.float32) - a.astype(np.float32)).max()))
        print(f"\nstored features in {args.reference_dir} vs the shipped code: "
              f"max abs diff {mx:.2e}")
        bad |= mx > args.atol
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
