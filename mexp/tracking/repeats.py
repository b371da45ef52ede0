"""Seed repeats: the whole cross-validation once per seed as nested runs, their mean and sd,
and the seed ensemble (probabilities averaged per sample) on the parent."""
from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow

from mexp.config import Config
from mexp.engine.plans import FoldPlanError
from mexp.tracking.runs import T, download
from mexp.tracking.summary import next_steps


def run_repeats(cfg: Config, main_fn, stage: str) -> dict:
    """The whole cross-validation `cfg.repeats` times with seeds s, s+1, ... as nested runs;
    mean and sd of UF1/UAR/accuracy (pooled and per database) on the parent, and the seed
    ensemble: every sample's class probabilities averaged over the repeats (each repeat's
    prediction for a sample comes from a model that never saw its subject, so the average
    is as honest as its parts), scored as ensemble/*."""
    import copy

    import numpy as np

    from mexp.tracking.runs import stage_run
    n, s0 = cfg.repeats, cfg.training.seed
    with stage_run(cfg, f"{stage}:repeats", run_name=f"{stage} x{n}",
                   tags={T + "repeats": str(n)}) as run:
        results = []
        with together(cfg):
            for i in range(n):
                c = copy.deepcopy(cfg)
                c.repeats, c.training.seed = 1, s0 + i
                results.append(main_fn(c))
        agg = {}
        for k in ("uf1", "uar", "accuracy"):
            v = np.array([r[k] for r in results], float)
            agg[k] = (float(v.mean()), float(v.std(ddof=1)) if n > 1 else 0.0)
        metrics = {f"repeats/{k}_{w}": x for k, (m, sd) in agg.items()
                   for w, x in (("mean", m), ("sd", sd))}
        for db in sorted(set().union(*(r.get("per_database", {}) for r in results))):
            for k in ("uf1", "uar"):
                v = np.array([r["per_database"][db][k] for r in results], float)
                metrics[f"repeats/{db}/{k}_mean"] = float(v.mean())
                metrics[f"repeats/{db}/{k}_sd"] = float(v.std(ddof=1)) if n > 1 else 0.0
        mlflow.log_metrics(metrics)
        mlflow.set_tag(T + "repeat_run_ids", ",".join(r["run_id"] for r in results))
        ens = seed_ensemble([r["run_id"] for r in results]) if n > 1 else None
        rid = run.info.run_id
    print(f"{stage} x{n} seeds {s0}..{s0 + n - 1}: " + "  ".join(
        f"{k.upper() if k != 'accuracy' else 'accuracy'} {m:.4f} ± {sd:.4f}"
        for k, (m, sd) in agg.items()) + (f"; ensemble of {n}: UF1 {ens['uf1']:.4f} UAR "
                                          f"{ens['uar']:.4f}" if ens else "") + f"; run {rid}")
    print(next_steps(stage, rid))
    return {"run_id": rid, "repeats": results,
            **{k: m for k, (m, _) in agg.items()}, **{f"{k}_sd": sd for k, (_, sd) in agg.items()},
            **({"ensemble": ens} if ens else {})}


def together(cfg: Config):
    """With fold batching, every seed's replicas of a fold train in the first repeat's
    vectorised model (`mexp.engine.batching.seed_batch`) when the fold plan does not depend on
    the seed (LOSO, LODO or holdout without a validation split)."""
    from contextlib import nullcontext

    from mexp.engine.batching import seed_batch
    t = cfg.training
    if t.fold_batching == "off" or t.val_fraction or t.cv_method not in ("LOSO", "LODO",
                                                                         "holdout"):
        return nullcontext()
    return seed_batch(range(t.seed, t.seed + cfg.repeats))


def seed_ensemble(run_ids: list[str]) -> dict:
    """Average the repeats' predictions.csv probabilities per sample; log the pooled and
    per-database scores (ensemble/*), the confusion matrix and ensemble_predictions.csv on
    the active run."""
    import numpy as np
    import pandas as pd

    from mexp.tracking import plots
    from mexp.tracking.evaluation import expected_metrics, recompute

    with tempfile.TemporaryDirectory() as d:
        preds = [pd.read_csv(download(r, "predictions.csv", Path(d) / r)).sort_values("sample_id")
                 .reset_index(drop=True) for r in run_ids]
    base = preds[0]
    for r, p in zip(run_ids[1:], preds[1:]):
        if not p["sample_id"].equals(base["sample_id"]):
            raise FoldPlanError(f"repeat run {r} predicted other samples than {run_ids[0]}")
    cols = [c for c in base.columns if c.startswith("prob_")]
    probs = np.mean([p[cols].to_numpy(float) for p in preds], axis=0)
    out = base[["sample_id", "dataset", "subject", "label"]].assign(pred=probs.argmax(1))
    for c, v in zip(cols, probs.T):
        out[c] = v
    classes = [c.removeprefix("prob_") for c in cols]
    report = recompute(out, classes)          # the same code `mexp.evaluate` checks it with
    mlflow.log_metrics(expected_metrics(report, "ensemble"))
    mlflow.log_figure(plots.confusion_figure(np.array(report["confusion"]), classes,
                                             f"ensemble of {len(run_ids)} seeds"),
                      "ensemble_confusion_matrix.png")
    with tempfile.TemporaryDirectory() as d:
        out.to_csv(Path(d) / "ensemble_predictions.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "ensemble_predictions.csv"))
    s = report["pooled"]
    return {**{m: s[m] for m in ("uf1", "uar", "accuracy")},
            "per_database": report["per_database"], "members": len(run_ids)}
