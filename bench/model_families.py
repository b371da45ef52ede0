"""Each model family on the synthetic data, same folds: what temporal modelling and flow buy.

    python bench/model_families.py [--workdir /tmp/mexp-families] [--epochs 15]

Families: apex-frame CNN (train_cnn), CNN -> LSTM (train_cnn, extract_features, train_lstm),
end-to-end CNN-LSTM (train_cnn_lstm), ROI Transformer on optical flow (extract_flow,
train_roi). 5-fold StratifiedGroupKFold over subjects, selection on validation subjects.
"""
from __future__ import annotations

import argparse
import time

from _setup import REPO, synthetic_config, synthetic_overrides, workdir
from mexp.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    work = workdir(args.workdir, "mexp-families-")
    from mexp import extract_features, extract_flow, train_cnn, train_cnn_lstm, train_lstm, train_roi

    extra = [f"training.epochs={args.epochs}", "output.local=false"]
    base = synthetic_overrides(work) + extra          # for the other configs below
    cfg = synthetic_config("demo.yaml", work, extra)
    rows = []

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append((name, out, time.perf_counter() - t0))
        return out

    cnn = timed("apex-frame CNN (train_cnn)", lambda: train_cnn.main(cfg))
    cfg.cnn_run_id = cnn["run_id"]
    t0 = time.perf_counter()
    f = extract_features.main(cfg)
    cfg.features_run_id = f["run_id"]
    lstm = train_lstm.main(cfg)
    rows.append(("CNN -> LSTM (two-stage)", lstm, rows[0][2] + time.perf_counter() - t0))
    ccfg = load_config(REPO / "configs/cnn_lstm.yaml", base)
    timed("CNN-LSTM end to end", lambda: train_cnn_lstm.main(ccfg))
    rcfg = load_config(REPO / "configs/roi.yaml", base + ["training.epochs=60"])
    t0 = time.perf_counter()
    extract_flow.main(rcfg)
    t_flow = time.perf_counter() - t0
    roi = timed("ROI Transformer (Farneback flow)", lambda: train_roi.main(rcfg))
    rows[-1] = (rows[-1][0], roi, rows[-1][2] + t_flow)
    print("\n| family | UF1 | UAR | accuracy | wall time (s) |\n|---|---|---|---|---|")
    for name, s, t in rows:
        print(f"| {name} | {s['uf1']:.4f} | {s['uar']:.4f} | {s['accuracy']:.4f} | {t:.0f} |")


if __name__ == "__main__":
    main()
