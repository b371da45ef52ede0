"""MEGC2019 metrics: UF1 and UAR pooled over all folds, accuracy, confusion matrix.

UF1 = mean over classes of 2TP / (2TP + FP + FN); UAR = mean over classes of TP / N_c, with
TP/FP/FN summed over every fold before dividing (the MEGC2019 guideline). A class with no
sample in the truth is left out of UAR; a class that never appears in truth or prediction is
left out of UF1. Macro *precision* is reported under its own name and is never UAR.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """(C, C) counts, rows = truth, columns = prediction."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def scores_from_confusion(cm: np.ndarray) -> dict[str, float]:
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fp, fn = predicted - tp, support - tp
    denom_f1 = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom_f1, out=np.zeros_like(tp), where=denom_f1 > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    total = cm.sum()
    return {
        "uf1": float(f1[denom_f1 > 0].mean()) if (denom_f1 > 0).any() else 0.0,
        "uar": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_precision": float(precision[support > 0].mean()) if (support > 0).any() else 0.0,
        "n": int(total),
    }


def scores(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """Pooled UF1, UAR, accuracy (and macro precision, n) of one set of predictions."""
    return scores_from_confusion(confusion(y_true, y_pred, num_classes))


def breakdown(y_true, y_pred, groups, num_classes: int) -> dict[str, dict[str, float]]:
    """Scores per group (database, subject, ...), each pooled within its group."""
    y_true, y_pred, groups = np.asarray(y_true), np.asarray(y_pred), np.asarray(groups)
    return {str(g): scores(y_true[groups == g], y_pred[groups == g], num_classes)
            for g in sorted(set(groups.tolist()))}


def parse_ststnet_log(path) -> list[dict]:
    """STSTNet's per-sample log: 'db subject' header lines, then 'filename gt pred' lines."""
    rows, db, subject = [], None, None
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 2 and parts[0] in ("casme2", "samm", "smic"):
            db, subject = parts
        elif len(parts) == 3 and db is not None:
            rows.append({"dataset": db, "subject": subject, "clip": parts[0],
                         "label": int(parts[1]), "pred": int(parts[2])})
        else:
            raise ValueError(f"{path} line {n}: cannot parse {line!r}")
    return rows
