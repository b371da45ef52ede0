"""The field's honest baselines on the MEGC2019 composite benchmark, through `mexp.train_cnn`.

    python bench/baselines.py [--models logreg,svm_rbf,sssnet,off_apexnet,dual_inception]
                              [--workdir /tmp/mexp-baselines] [--epochs N]

Each model is one full 68-subject LOSO run of the shipped `configs/megc2019_flow.yaml` with
`model.name=<model>`, one seed (`repeats=1`) and `training.fold_workers=0` (one process per
core); everything else is the shipped recipe (40 epochs, final epoch, AdamW, class-weighted,
flip/shift augmentation for the nets; the scikit-learn members are fitted once per fold and
ignore epochs and augmentation). Runs are tracked in `<workdir>/mlflow.db`; fold weights are
not written locally (`output.local=false`). Prints UF1 / UAR / accuracy, per database, and the
wall time of each run. Data: `$MEXP_DATA/megc2019_flow28` (default ../shared/data).
"""
from __future__ import annotations

import argparse
import sys
import time

from _setup import REPO, workdir
from mexp.config import load_config
from mexp.data.datasets import shared_data_dir

MODELS = ("logreg", "svm_rbf", "sssnet", "off_apexnet", "dual_inception")


def run(model: str, extra: list[str]) -> tuple[dict, float]:
    from mexp import train_cnn
    cfg = load_config(REPO / "configs/megc2019_flow.yaml", [
        f"model.name={model}", f"data.root={shared_data_dir() / 'megc2019_flow28'}",
        "repeats=1", "training.fold_workers=0", "output.local=false", *extra])
    t0 = time.perf_counter()
    out = train_cnn.main(cfg)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workdir", default="")
    ap.add_argument("--epochs", type=int, default=0, help="override training.epochs (nets)")
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-baselines-")
    extra = [f"training.epochs={args.epochs}"] if args.epochs else []
    rows = []
    for model in args.models.split(","):
        out, wall = run(model, extra)
        rows.append((model, out, wall))
        db = out["per_database"]
        print(f"RESULT {model}: UF1 {out['uf1']:.4f} UAR {out['uar']:.4f} acc "
              f"{out['accuracy']:.4f} | " + " ".join(
                  f"{d} {db[d]['uf1']:.4f}/{db[d]['uar']:.4f}" for d in sorted(db))
              + f" | {wall:.0f} s | run {out['run_id']}", flush=True)
    print(f"\n{' '.join(sys.argv)}  (work: {work})")
    print("| model | UF1 | UAR | CASME II UF1/UAR | SAMM UF1/UAR | SMIC UF1/UAR | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for model, out, wall in rows:
        db = out["per_database"]
        cells = " | ".join(f"{db[d]['uf1']:.4f} / {db[d]['uar']:.4f}"
                           for d in ("casme2", "samm", "smic"))
        print(f"| {model} | {out['uf1']:.4f} | {out['uar']:.4f} | {cells} | {wall:.0f} |")


if __name__ == "__main__":
    main()
