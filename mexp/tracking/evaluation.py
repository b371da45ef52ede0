"""Scores recomputed from a run's predictions table, and the check of a run's logged metrics
against them (what `python -m mexp.evaluate --run-id` prints)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mexp.engine.metrics import breakdown, confusion, scores
from mexp.tracking.runs import LineageError, download


def per_class(cm: np.ndarray, classes) -> dict:
    tp = np.diag(cm).astype(float)
    out = {}
    for i, c in enumerate(classes):
        p = tp[i] / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp[i] / cm[i].sum() if cm[i].sum() else 0.0
        f = 2 * tp[i] / (cm[i].sum() + cm[:, i].sum()) if cm[i].sum() + cm[:, i].sum() else 0.0
        out[c] = {"precision": p, "recall": r, "f1": f, "support": int(cm[i].sum())}
    return out


def recompute(pred: pd.DataFrame, classes) -> dict:
    """All scores from a predictions table (label, pred, dataset, subject columns)."""
    y, p, n = pred["label"].to_numpy(int), pred["pred"].to_numpy(int), len(classes)
    cm = confusion(y, p, n)
    return {"pooled": scores(y, p, n),
            "per_database": breakdown(y, p, pred["dataset"], n) if pred["dataset"].nunique() > 1 else {},
            "per_subject": breakdown(y, p, pred["subject"], n),
            "per_class": per_class(cm, classes), "confusion": cm.tolist(), "classes": list(classes)}


def expected_metrics(report: dict, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/{k}": v for k, v in report["pooled"].items() if k != "n"}
    for db, s in report["per_database"].items():
        out |= {f"{prefix}/{db}/{k}": v for k, v in s.items() if k != "n"}
    return out


def evaluate(run_id: str) -> tuple[dict, list[str]]:
    """(report, mismatches) for a run that logged predictions.csv, or for a `repeats=N` parent:
    its seed ensemble (ensemble_predictions.csv against the ensemble/* metrics)."""
    client = MlflowClient()
    run = client.get_run(run_id)
    ensemble = "mexp.repeats" in run.data.tags
    with tempfile.TemporaryDirectory() as d:
        pred = pd.read_csv(download(run_id, "ensemble_predictions.csv" if ensemble
                                    else "predictions.csv", d))
        try:
            classes = json.loads(Path(download(run_id, "confusion_matrix.json", d)).read_text())["classes"]
        except LineageError:
            classes = [c[len("prob_"):] for c in pred.columns if c.startswith("prob_")]
    prefix = "ensemble" if ensemble else (
        "oracle" if run.data.tags.get("mexp.oracle") == "true" else "test")
    report = recompute(pred, classes)
    logged = run.data.metrics
    bad = [f"{k}: logged {logged.get(k)!r}, recomputed {v!r}"
           for k, v in expected_metrics(report, prefix).items()
           if k not in logged or abs(logged[k] - v) > 1e-9]
    report["checked"] = sorted(expected_metrics(report, prefix))
    return report, bad


def render(report: dict) -> str:
    p = report["pooled"]
    lines = [f"pooled: UF1 {p['uf1']:.4f}  UAR {p['uar']:.4f}  accuracy {p['accuracy']:.4f}  "
             f"(n={p['n']}; macro precision {p['macro_precision']:.4f})"]
    for db, s in report["per_database"].items():
        lines.append(f"  {db:<8} UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  n={s['n']}")
    lines.append("per class: " + ", ".join(f"{c} F1 {v['f1']:.3f} (n={v['support']})"
                                           for c, v in report["per_class"].items()))
    worst = sorted(report["per_subject"].items(), key=lambda kv: kv[1]["accuracy"])[:5]
    lines.append("lowest subjects: " + ", ".join(f"{s} {v['accuracy']:.2f}" for s, v in worst))
    lines.append("confusion (rows true, columns predicted; " + ", ".join(report["classes"]) + "):")
    lines += ["  " + " ".join(f"{v:4d}" for v in row) for row in report["confusion"]]
    return "\n".join(lines)
