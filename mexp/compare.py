"""Are two runs' scores really different? A paired subject-level test on their predictions.

    python -m mexp.compare RUN_A RUN_B [--n-boot 2000] [--n-perm 2000] [--seed 0]
                                       [--tracking-uri URI] [--experiment NAME]

Both runs must have predicted the same sample ids with the same labels. Subjects are the unit
(LOSO folds are subjects, and a subject's clips are not independent): a bootstrap resamples
subjects with replacement, the same subjects for both runs, and recomputes pooled UF1/UAR
(mexp.engine.metrics; confusion counts add up over subjects) to give a 95% percentile CI of A - B;
a permutation test swaps the two runs' predictions for each subject with probability 1/2 and
gives a two-sided p-value on |A - B|. Full set and per database. A repeats parent is compared
through its seed ensemble (`ensemble_predictions.csv`), a pipeline (`main`) run through its
train_lstm run. The result is a run of its own (`mexp.stage=compare`, tags `mexp.run_a`,
`mexp.run_b`; `compare/*` metrics, `compare.json`, `compare_bootstrap.png`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from mexp.config import Config
from mexp.engine.metrics import confusion, scores_from_confusion
from mexp.tracking.finder import fetch_run, resolve_stage_run, short
from mexp.util.secrets import redact, redacted_output
from mexp.tracking.runs import T, LineageError, TrackingError, download, stage_run, tracking_uri

log = logging.getLogger(__name__)
STAGE = "compare"
KEYS = ("uf1", "uar")
PLOT = "compare_bootstrap.png"


def predictions(client: MlflowClient, run_id: str) -> tuple[pd.DataFrame, str]:
    """(predictions table, where it came from) for a stage run, a repeats parent (its seed
    ensemble) or a pipeline run (its train_lstm run)."""
    run = fetch_run(client, run_id)
    tags = run.data.tags
    src, name = run_id, "predictions.csv"
    if tags.get(T + "stage") == "main":
        src = resolve_stage_run(run_id, "train_lstm", client=client)
    elif T + "repeats" in tags:
        seeds = [s for s in tags.get(T + "repeat_run_ids", "").split(",") if s]
        if len(seeds) > 1:
            name = "ensemble_predictions.csv"
        elif seeds:                              # repeats=1: no ensemble, the one seed run
            src = seeds[0]
    with tempfile.TemporaryDirectory() as d:
        table = pd.read_csv(download(src, name, d))
    missing = {"sample_id", "subject", "label", "pred"} - set(table.columns)
    if missing:
        raise LineageError(f"run {src}: {name} lacks column(s) {', '.join(sorted(missing))}")
    if table["sample_id"].duplicated().any():
        raise LineageError(f"run {src}: {name} holds duplicate sample ids")
    if "dataset" not in table.columns:
        table["dataset"] = ""
    return table, f"{name} of run {src}"


def align(a: pd.DataFrame, b: pd.DataFrame, id_a: str, id_b: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(A's rows, B's predictions in A's order); ValueError naming both runs when they did not
    predict the same samples, or disagree on a sample's label, subject or database."""
    sa, sb = set(a["sample_id"]), set(b["sample_id"])
    if sa != sb:
        only_a, only_b = sorted(map(str, sa - sb)), sorted(map(str, sb - sa))
        raise ValueError(
            f"runs {id_a} (A) and {id_b} (B) predicted different samples: {len(only_a)} id(s) "
            f"only in A{' (' + ', '.join(only_a[:3]) + ')' if only_a else ''}, {len(only_b)} "
            f"only in B{' (' + ', '.join(only_b[:3]) + ')' if only_b else ''}, "
            f"{len(sa & sb)} shared; compare needs the same sample ids")
    a = a.sort_values("sample_id").reset_index(drop=True)
    b = b.set_index("sample_id").loc[a["sample_id"]].reset_index()
    for col in ("label", "subject", "dataset"):
        bad = int((a[col].astype(str) != b[col].astype(str)).sum())
        if bad:
            raise ValueError(f"runs {id_a} (A) and {id_b} (B) disagree on the {col} of {bad} "
                             f"sample(s); they were not run on the same data")
    return a, b["pred"].to_numpy(int)


def per_subject(y, pa, pb, subjects, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, C*C) confusion counts of each subject for A and B: pooled scores of any multiset
    of subjects are scores_from_confusion of a weighted sum of these rows."""
    keys = sorted(set(subjects))
    ca = np.stack([confusion(y[subjects == s], pa[subjects == s], num_classes).ravel() for s in keys])
    cb = np.stack([confusion(y[subjects == s], pb[subjects == s], num_classes).ravel() for s in keys])
    return ca, cb


def _scores(counts: np.ndarray, c: int) -> np.ndarray:
    """(N, 2) UF1, UAR of each row of (N, C*C) confusion counts."""
    rows = [scores_from_confusion(m.reshape(c, c)) for m in counts]
    return np.array([[r[k] for k in KEYS] for r in rows], float).reshape(-1, len(KEYS))


def paired_test(ca: np.ndarray, cb: np.ndarray, c: int, n_boot: int, n_perm: int,
                rng: np.random.Generator) -> dict:
    """Point scores, bootstrap CI and permutation p of A - B over one set of subjects."""
    s = len(ca)
    sa, sb = _scores(ca.sum(0, keepdims=True), c)[0], _scores(cb.sum(0, keepdims=True), c)[0]
    w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot)          # (n_boot, S) same for both
    boot = _scores(w @ ca, c) - _scores(w @ cb, c)                     # (n_boot, 2)
    swap = rng.random((n_perm, s)) < 0.5                               # (n_perm, S)
    keep = ~swap
    perm = _scores(keep @ ca + swap @ cb, c) - _scores(swap @ ca + keep @ cb, c)
    diff = sa - sb
    out = {"subjects": s, "n": int(ca.sum()), "boot": boot}
    for i, k in enumerate(KEYS):
        lo, hi = np.percentile(boot[:, i], [2.5, 97.5])
        hits = int((np.abs(perm[:, i]) >= abs(diff[i]) - 1e-12).sum())
        out[k] = {"a": float(sa[i]), "b": float(sb[i]), "diff": float(diff[i]),
                  "ci_lo": float(lo), "ci_hi": float(hi), "p": (hits + 1) / (n_perm + 1)}
    return out


def compare(a: pd.DataFrame, pb: np.ndarray, n_boot: int, n_perm: int, seed: int) -> dict:
    """{"all": result, <db>: result...}: the paired test on the full set and per database
    (when there is more than one); each result as paired_test's."""
    y, pa = a["label"].to_numpy(int), a["pred"].to_numpy(int)
    prob = [col for col in a.columns if col.startswith("prob_")]
    c = max(len(prob), int(max(y.max(), pa.max(), pb.max())) + 1)
    db = a["dataset"].astype(str).to_numpy()
    subj = np.char.add(np.char.add(db, "/"), a["subject"].astype(str).to_numpy())
    groups = {"all": np.ones(len(a), bool)}
    if len(set(db)) > 1:
        groups |= {d: db == d for d in sorted(set(db))}
    out = {}
    for i, (name, m) in enumerate(groups.items()):
        ca, cb = per_subject(y[m], pa[m], pb[m], subj[m], c)
        out[name] = paired_test(ca, cb, c, n_boot, n_perm, np.random.default_rng([seed, i]))
    return out


def verdict(r: dict) -> str:
    if r["ci_lo"] <= 0 <= r["ci_hi"]:
        return "no measurable difference"
    return "A measurably better" if r["diff"] > 0 else "B measurably better"


def metrics(results: dict) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        pre = "compare/" if name == "all" else f"compare/{name}/"
        for k in KEYS:
            out |= {f"{pre}{k}_{f}": r[k][f] for f in ("diff", "ci_lo", "ci_hi", "p", "a", "b")}
    return out


def figure(results: dict, ids: tuple[str, str]) -> Figure:
    """Histograms of the bootstrap differences A - B (full set), CI and observed marked;
    each database's distribution as an outline."""
    fig = Figure(figsize=(10, 3.8), dpi=100)
    for i, k in enumerate(KEYS):
        ax = fig.add_subplot(1, len(KEYS), i + 1)
        r = results["all"]
        ax.hist(r["boot"][:, i], bins=40, color="tab:blue", alpha=0.6, label="all")
        for name, rd in results.items():
            if name != "all":
                ax.hist(rd["boot"][:, i], bins=40, histtype="step", label=name)
        ax.axvline(0, color="grey", lw=1)
        ax.axvline(r[k]["diff"], color="black", lw=2, label=f"observed {r[k]['diff']:+.4f}")
        for edge in ("ci_lo", "ci_hi"):
            ax.axvline(r[k][edge], color="tab:red", ls="--", lw=1,
                       label="95% CI" if edge == "ci_lo" else None)
        ax.set_xlabel(f"{k.upper()} A - B (bootstrap over subjects)")
        ax.set_title(f"{k.upper()}: 95% CI [{r[k]['ci_lo']:+.3f}, {r[k]['ci_hi']:+.3f}], "
                     f"p = {r[k]['p']:.2g}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"A = {short(ids[0])}  B = {short(ids[1])}", fontsize=9)
    fig.tight_layout()
    return fig


def report(results: dict, args, sources: tuple[str, str]) -> dict:
    """compare.json: inputs, settings and per set the scores, CI, p and verdict (no draws)."""
    return {"run_a": args.run_a, "run_b": args.run_b, "source_a": sources[0],
            "source_b": sources[1], "n_boot": args.n_boot, "n_perm": args.n_perm,
            "seed": args.seed, "diff": "A - B", "ci": "95% percentile, subjects resampled",
            "p": "two-sided paired permutation (predictions swapped per subject)",
            "results": {name: {"subjects": r["subjects"], "n": r["n"],
                               **{k: {**r[k], "verdict": verdict(r[k])} for k in KEYS}}
                        for name, r in results.items()}}


def log_result(cfg: Config, args, results: dict, sources: tuple[str, str]) -> tuple[str, dict]:
    """The comparison as a `compare` run, linked to both inputs by tags; (run id, json)."""
    tags = {T + "run_a": args.run_a, T + "run_b": args.run_b,
            "mlflow.note.content": f"Paired comparison of run {args.run_a} (A) and run "
                                   f"{args.run_b} (B): {sources[0]} vs {sources[1]}."}
    body = report(results, args, sources)
    with stage_run(cfg, STAGE, run_name=f"compare {short(args.run_a)} vs {short(args.run_b)}",
                   tags=tags) as run:
        mlflow.log_params({"compare.n_boot": args.n_boot, "compare.n_perm": args.n_perm,
                           "compare.seed": args.seed})
        mlflow.log_metrics(metrics(results))
        mlflow.log_dict(body, "compare.json")
        mlflow.log_figure(figure(results, (args.run_a, args.run_b)), PLOT)
        return run.info.run_id, body


def summary(results: dict, rid: str) -> str:
    u, r = results["all"]["uf1"], results["all"]["uar"]
    return (f"compare: UF1 A {u['a']:.4f} vs B {u['b']:.4f}, diff {u['diff']:+.4f} "
            f"[{u['ci_lo']:+.3f}, {u['ci_hi']:+.3f}], p = {u['p']:.2g}: {verdict(u)}; "
            f"UAR diff {r['diff']:+.4f} [{r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}], "
            f"p = {r['p']:.2g}; {results['all']['subjects']} subjects; run {rid}")


def run_compare(args) -> dict:
    cfg = Config()
    cfg.tracking.uri = args.tracking_uri
    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    (ta, src_a), (tb, src_b) = predictions(client, args.run_a), predictions(client, args.run_b)
    a, pb = align(ta, tb, args.run_a, args.run_b)
    results = compare(a, pb, args.n_boot, args.n_perm, args.seed)
    cfg.tracking.experiment = args.experiment or client.get_experiment(
        fetch_run(client, args.run_a).info.experiment_id).name
    rid, body = log_result(cfg, args, results, (src_a, src_b))
    print(summary(results, rid))
    return {"run_id": rid, **body}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", metavar="RUN_A")
    ap.add_argument("run_b", metavar="RUN_B")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of subjects")
    ap.add_argument("--n-perm", type=int, default=2000, help="random per-subject swaps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--experiment", default="",
                    help="where the compare run goes (default: RUN_A's experiment)")
    args = ap.parse_args(argv)
    if args.n_boot < 1 or args.n_perm < 1:
        ap.error("--n-boot and --n-perm must be at least 1")
    return args


def main(argv=None) -> dict:
    """The command: parse, compare, log; a bad run id, input or server exits 2 with one line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # one line on stderr
    with redacted_output():
        try:
            return run_compare(args)
        except (TrackingError, ValueError) as e:    # LineageError is a TrackingError
            print(f"compare: {redact(str(e))}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
