"""Numbers and pictures for `mexp.report` from runs' predictions: subject-bootstrap 95%
intervals of pooled UF1/UAR (overall and per database), the runs x subjects heatmap, and the
paired McNemar test of two runs on the same samples.

The bootstrap resamples subjects (a subject is `dataset/subject`) with replacement, since
samples of one subject are not independent, and rescores each resample with the project's
metric code: the resample's confusion matrix is the sum of its subjects' matrices (a subject
drawn twice counts twice), exactly the matrix `metrics.scores` builds from the resampled rows.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from mexp.engine.metrics import scores as score
from mexp.engine.metrics import scores_from_confusion

RESAMPLES, SEED, KEYS = 1000, 0, ("uf1", "uar")


def num_classes(pred: pd.DataFrame) -> int:
    """Classes of a predictions table: its prob_<class> columns, else the largest label + 1."""
    n = sum(c.startswith("prob_") for c in pred.columns)
    return n or int(max(pred["label"].max(), pred["pred"].max())) + 1


def subject_keys(pred: pd.DataFrame) -> pd.Series:
    """`dataset/subject` (subject ids repeat across databases), or the subject alone."""
    if "dataset" in pred.columns:
        return pred["dataset"].astype(str) + "/" + pred["subject"].astype(str)
    return pred["subject"].astype(str)


def draws(n_subjects: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(B, S) subject indices, drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n_subjects, size=(resamples, n_subjects))


def interval(pred: pd.DataFrame, n_classes: int, resamples: int = RESAMPLES,
             seed: int = SEED) -> dict[str, tuple[float, float, float]]:
    """{"uf1": (point, lo, hi), "uar": ...}: pooled scores and their 2.5/97.5 percentiles."""
    codes, subjects = pd.factorize(subject_keys(pred))
    cms = np.zeros((len(subjects), n_classes, n_classes), np.int64)     # (S, C, C)
    np.add.at(cms, (codes, pred["label"].to_numpy(int), pred["pred"].to_numpy(int)), 1)
    idx = draws(len(subjects), resamples, seed)                           # (B, S)
    weight = np.zeros(idx.shape, np.int64)
    np.add.at(weight, (np.arange(len(idx))[:, None], idx), 1)
    boot = [scores_from_confusion(cm) for cm in np.einsum("bs,scd->bcd", weight, cms)]
    point = scores_from_confusion(cms.sum(axis=0))
    out = {}
    for k in KEYS:
        lo, hi = np.percentile([b[k] for b in boot], [2.5, 97.5])
        out[k] = (point[k], float(lo), float(hi))
    return out


def bootstrap(pred: pd.DataFrame, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{"all": interval(...), "per_db": {db: interval(...)}} of one predictions table; each
    database resamples only its own subjects."""
    n = num_classes(pred)
    per_db = {}
    if "dataset" in pred.columns:
        per_db = {str(db): interval(part, n, resamples, seed)
                  for db, part in pred.groupby("dataset", sort=True)}
    return {"all": interval(pred, n, resamples, seed), "per_db": per_db}


def subject_accuracy(pred: pd.DataFrame) -> pd.Series:
    """Accuracy per subject, keyed `dataset/subject` so that runs line up in one heatmap."""
    return (pred["pred"] == pred["label"]).groupby(subject_keys(pred).to_numpy()).mean()


def heatmap_png(table: pd.DataFrame, title: str = "per-subject accuracy") -> bytes:
    """A runs x subjects heatmap (blank where a run has no sample of a subject) as PNG bytes."""
    rows, cols = table.shape
    fig = Figure(figsize=(min(24, max(4, 0.32 * cols + 2)), max(1.6, 0.35 * rows + 1.2)), dpi=100)
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(table.to_numpy(float))
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(data, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(cols), [str(c) for c in table.columns], rotation=90, fontsize=6)
    ax.set_yticks(range(rows), [str(r) for r in table.index], fontsize=7)
    if rows * cols <= 300:
        for (i, j), v in np.ndenumerate(table.to_numpy(float)):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                        color="black" if v > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> tuple[int, int, float]:
    """(A right & B wrong, A wrong & B right, two-sided exact McNemar p-value)."""
    b, c = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n, k = b + c, min(b, c)
    if n == 0:
        return b, c, 1.0
    try:
        from scipy.stats import binomtest
        return b, c, float(binomtest(k, n, 0.5).pvalue)
    except ImportError:                 # the binomial tail by hand: 2 P(X <= k), X ~ Bin(n, 1/2)
        return b, c, min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(a: dict, b: dict) -> str:
    """The paired comparison line for two report rows, or why there is none."""
    if a["pred"] is None or b["pred"] is None:
        return "no paired comparison: both runs need predictions.csv"
    pa, pb = (r["pred"].set_index("sample_id").sort_index() for r in (a, b))
    if set(pa.index) != set(pb.index):
        return (f"no paired comparison: the runs predicted different samples "
                f"({len(set(pa.index) & set(pb.index))} shared of {len(pa)} and {len(pb)})")
    pb = pb.loc[pa.index]
    if not (pa["label"].to_numpy() == pb["label"].to_numpy()).all():
        return "no paired comparison: the runs disagree on the samples' labels"
    y, n_cls = pa["label"].to_numpy(int), sum(c.startswith("prob_") for c in pa.columns)
    ua, ub = (score(y, p["pred"].to_numpy(int), n_cls)["uf1"] for p in (pa, pb))
    only_a, only_b, pval = mcnemar(pa["pred"].to_numpy() == y, pb["pred"].to_numpy() == y)
    ia, ib = a["run_id"][:8], b["run_id"][:8]
    return (f"paired on {len(y)} samples: {ia} right & {ib} wrong {only_a}, {ia} wrong & {ib} "
            f"right {only_b}; McNemar exact p = {pval:.4f}; UF1 {ia} - {ib} = {ua - ub:+.4f} "
            f"({ua:.4f} vs {ub:.4f})")


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;white-space:nowrap}
th{background:#eef;cursor:pointer;user-select:none}th:after{content:" \\2195";color:#889}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even){background:#f8f8fb}
code{font-size:12px}section{border-top:1px solid #ddd;margin-top:16px}
figure{display:inline-block;vertical-align:top;margin:8px 16px 8px 0}img{max-width:560px;border:1px solid #ddd}
img.wide{max-width:100%}details{margin:4px 0 16px}
.meta{color:#666}.paired{background:#ffd;padding:6px 10px;display:inline-block}"""

SCRIPT = """document.querySelectorAll("table.sortable th").forEach(function(th,i){
th.addEventListener("click",function(){var tb=th.closest("table").tBodies[0],
rows=Array.from(tb.rows),asc=th.dataset.dir!=="asc";th.dataset.dir=asc?"asc":"desc";
rows.sort(function(a,b){var x=a.cells[i].dataset.v||a.cells[i].textContent,
y=b.cells[i].dataset.v||b.cells[i].textContent,nx=parseFloat(x),ny=parseFloat(y);
var d=(isNaN(nx)||isNaN(ny))?x.localeCompare(y):nx-ny;return asc?d:-d;});
rows.forEach(function(r){tb.appendChild(r);});});});
window.addEventListener("load",function(){var n=0;document.querySelectorAll("img").forEach(
function(im){if(im.complete&&im.naturalWidth>0)n++;});document.body.dataset.imagesLoaded=n;});"""

