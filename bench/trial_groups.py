"""HPO trial groups (`hpo.trial_batch`) against trials one after another, through `mexp.hpo`.

    python bench/trial_groups.py [--trials 8] [--groups 1,8] [--epochs 40] [--device auto]
                                 [--set KEY=VALUE ...] [--workdir DIR]

Each `--groups` value is one study of `configs/hpo_megc2019.yaml` (STSTNet on the MEGC2019
composite, 68-subject LOSO; learning rate, weight decay and class weighting searched; no
pruning) with `hpo.trials=--trials` and `hpo.trial_batch` that value, fold batching on, in
its own SQLite tracking store and Optuna storage: with 1 every trial trains its 68 folds as one
model, with 8 a group of 8 trials trains 8 x 68 replicas as one. Prints wall time, where it
went (`fold_batching.Phases`), the GPU utilisation and the best value. The sampler's seed is
fixed, so both studies sample the same parameters; their values differ within seed noise, as
dropout masks are drawn for the whole vectorised model at once (without dropout a trial's value
equals its run alone: tests/test_trial_batch.py). On a GPU this is the
run to do (`--device cuda`); on 2 CPU cores it is a smoke check. Data:
`$MEXP_DATA/megc2019_flow28`.
"""
from __future__ import annotations

import argparse
import os

from _setup import REPO, workdir
from fold_batching import measured
from mexp.config import load_config
from mexp.data.datasets import shared_data_dir


def study(group: int, args, work) -> dict:
    from mexp import hpo
    folder = work / f"group{group}"
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    import mlflow
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    cfg = load_config(REPO / "configs/hpo_megc2019.yaml", [
        f"data.root={shared_data_dir() / 'megc2019_flow28'}", f"hpo.trials={args.trials}",
        f"hpo.trial_batch={group}", "training.fold_batching=on", "output.local=false",
        f"training.device={args.device}", f"hpo.storage=sqlite:///{folder / 'optuna.db'}",
        *([f"training.epochs={args.epochs}"] if args.epochs else []), *args.set])
    out, wall, cpu, gpu, phases = measured(hpo.main, cfg)
    return {"group": group, "wall": wall, "cpu": cpu, "gpu": gpu, "phases": phases,
            "best": out["best_value"], "complete": out["complete"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--groups", default="1,8")
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-trial-groups-", tracking=False)
    rows = []
    for g in (int(v) for v in args.groups.split(",")):
        r = study(g, args, work)
        print(f"phases trial_batch={g}: {r['phases']}")
        print(f"RESULT trial_batch={g}: {r['wall']:.1f} s wall, {r['cpu']:.0f} s CPU, "
              f"{r['complete']} complete, best UF1 {r['best']:.4f}, GPU {r['gpu']}", flush=True)
        rows.append(r)
    print("\n| hpo.trial_batch | trials | wall (s) | CPU (s) | best UF1 | GPU utilisation |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {args.trials} | {r['wall']:.1f} | {r['cpu']:.0f} | "
              f"{r['best']:.4f} | {r['gpu']} |")


if __name__ == "__main__":
    main()
