"""One self-contained HTML page that compares runs: scores, per-database scores, confusion
matrices, per-subject plots, and a paired test when two runs predicted the same samples.

    python -m mexp.report [--experiment mexp | --runs id1,id2,...] [--out report.html] [--log-to-run]

Inline CSS and script, images as base64 data URIs: the file opens offline and can be mailed.
Pipeline (`main`) runs show their train_lstm run's plots; repeats parents their seed ensemble's.
With two runs whose `predictions.csv` hold the same sample ids it adds McNemar's exact test on
per-sample correctness and the UF1 difference. `--log-to-run` logs the page as `report.html`
on a new run tagged `mexp.stage=report`.
"""
from __future__ import annotations

import argparse
import base64
import html
import logging
import math
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mexp import runs as finder
from mexp.config import ConfigError
from mexp.metrics import scores as score
from mexp.secrets import redact, redacted_output
from mexp.tracking import T, LineageError, TrackingError, stage_run, tracking_uri

log = logging.getLogger(__name__)
IMAGES = (("confusion matrix", ("confusion_matrix.png", "ensemble_confusion_matrix.png")),
          ("per subject", ("per_subject.png",)))
PREDICTIONS = ("predictions.csv", "ensemble_predictions.csv")


def _source(client: MlflowClient, r: dict) -> str:
    """The run holding a row's plots: a pipeline's train_lstm run, else the run itself."""
    if r["stage"] == "main":
        try:
            return finder.resolve_stage_run(r["run_id"], "train_lstm", client=client)
        except LineageError as e:
            log.warning("%s", e)
    return r["run_id"]


def _fetch(run_id: str, names: tuple[str, ...], have: set[str], d: str) -> Path | None:
    for name in names:
        if name in have:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                            dst_path=d))
    return None


def gather(client: MlflowClient, run) -> dict:
    """A report row: the run's record (mexp.runs.row), its images and predictions."""
    r = finder.row(run)
    src = r["source"] = _source(client, r)
    seeds = [s for s in run.data.tags.get(T + "repeat_run_ids", "").split(",") if s]
    donor = seeds[0] if seeds else src          # a repeats parent or a pipeline: data tags
    if donor != r["run_id"] and not (r["data_digest"] and r["model"]):   # are on its stage runs
        tags = client.get_run(donor).data.tags
        for key in ("data_digest", "dataset", "model"):
            r[key] = r[key] or tags.get(T + key, "")
    have = {a.path for a in client.list_artifacts(src)}
    r["images"], r["pred"] = {}, None
    with tempfile.TemporaryDirectory() as d:
        for title, names in IMAGES:
            p = _fetch(src, names, have, d)
            if p is not None:
                r["images"][title] = base64.b64encode(p.read_bytes()).decode("ascii")
        p = _fetch(src, PREDICTIONS, have, d)
        if p is not None:
            r["pred"] = pd.read_csv(p)
    return r


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
    ia, ib = finder.short(a["run_id"]), finder.short(b["run_id"])
    return (f"paired on {len(y)} samples: {ia} right & {ib} wrong {only_a}, {ia} wrong & {ib} "
            f"right {only_b}; McNemar exact p = {pval:.4f}; UF1 {ia} - {ib} = {ua - ub:+.4f} "
            f"({ua:.4f} vs {ub:.4f})")


CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #ccc;padding:4px 8px;white-space:nowrap}
th{background:#eef;cursor:pointer;user-select:none}th:after{content:" \\2195";color:#889}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even){background:#f8f8fb}
code{font-size:12px}section{border-top:1px solid #ddd;margin-top:16px}
figure{display:inline-block;vertical-align:top;margin:8px 16px 8px 0}img{max-width:560px;border:1px solid #ddd}
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


def _cell(text: str, value=None) -> str:
    if value is None:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num" data-v="{value:.6f}">{html.escape(text)}</td>'


def _seeds(r: dict) -> str:
    if r["kind"] != "repeats":
        return "-"
    ens = f"; ensemble UF1 {r['ensemble_uf1']:.4f}" if "ensemble_uf1" in r else ""
    return f"{r.get('seeds') or '?'} seeds: UF1 {r['uf1']:.4f} ± {r.get('uf1_sd', 0):.4f}{ens}"


def runs_table(rows: list[dict]) -> str:
    head = ("run", "stage", "model", "dataset", "data digest", "UF1", "UAR", "accuracy",
            "seeds (mean ± sd)", "date")
    body = []
    for r in rows:
        rid = html.escape(r["run_id"])
        cells = [f'<td><a href="#run-{rid}"><code>{rid}</code></a></td>',
                 _cell(r["stage"] + (" (LEAK)" if r["leak"] else "")), _cell(r["model"] or "-"),
                 _cell(r["dataset"] or "-"), _cell(r["data_digest"][:12] or "-")]
        cells += [_cell(finder.score_text(r, k), r.get(k)) for k in finder.KEYS]
        cells += [_cell(_seeds(r)), _cell(r["start"])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="runs"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def db_table(rows: list[dict]) -> str:
    dbs = sorted({db for r in rows for db in r["per_db"]})
    if not dbs:
        return "<p class=meta>no per-database metrics (test/&lt;db&gt;/uf1) on these runs</p>"
    head = "".join(f"<th>{html.escape(db)} UF1</th><th>{html.escape(db)} UAR</th>" for db in dbs)
    body = []
    for r in rows:
        cells = "".join(_cell(f"{s[k]:.4f}" if k in s else "-", s.get(k))
                        for s in (r["per_db"].get(db, {}) for db in dbs) for k in ("uf1", "uar"))
        body.append(f"<tr><td><code>{html.escape(finder.short(r['run_id']))}</code></td>{cells}</tr>")
    return (f'<table class="sortable" id="per-database"><thead><tr><th>run</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def run_section(r: dict) -> str:
    rid = html.escape(r["run_id"])
    src = "" if r["source"] == r["run_id"] else f" (plots of its run {html.escape(r['source'])})"
    figs = "".join(f'<figure><img alt="{t} of run {rid}" src="data:image/png;base64,{b}">'
                   f"<figcaption>{t}</figcaption></figure>" for t, b in r["images"].items())
    return (f'<section id="run-{rid}"><h3>{html.escape(r["stage"])} run <code>{rid}</code>{src}</h3>'
            f'<p class=meta>{html.escape(r["name"])}, started {html.escape(r["start"])}, UF1 '
            f'{html.escape(finder.score_text(r))}</p>{figs or "<p class=meta>no plots logged</p>"}'
            "</section>")


def render(rows: list[dict], pair: str, title: str, where: str) -> str:
    now = datetime.now().strftime("%Y-%m-%d %H:%M")
    pair_html = f'<h2>Paired comparison</h2><p class="paired" id="paired">{html.escape(pair)}</p>' \
        if pair else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=meta>{len(rows)} run(s) from {html.escape(where)}; made {now} by "
            f"<code>python -m mexp.report</code>. Click a column to sort.</p>"
            f"{runs_table(rows)}<h2>Per database</h2>{db_table(rows)}{pair_html}<h2>Runs</h2>"
            + "".join(run_section(r) for r in rows) + f"<script>{SCRIPT}</script></body></html>")


def select(client: MlflowClient, args, cfg) -> tuple[list, str, object]:
    """(runs, tracking uri, experiment): the ids given, or the experiment's scored runs."""
    if args.runs:
        uri = tracking_uri(cfg)
        mlflow.set_tracking_uri(uri)
        ids = [i.strip() for i in args.runs.split(",") if i.strip()]
        found = [finder.fetch_run(client, rid) for rid in ids]
        return found, uri, client.get_experiment(found[0].info.experiment_id)
    uri, exp = finder.open_experiment(cfg, args.experiment)
    runs = finder.find_runs([exp.experiment_id], args.stage, "FINISHED", limit=args.limit,
                            keep=lambda r: bool(finder.scores(r)["kind"]))
    return runs, uri, exp


def log_report(cfg, text: str, exp_name: str, ids: list[str]) -> str:
    """report.html on a new run tagged mexp.stage=report (or on `mlflow run`'s run)."""
    cfg.tracking.experiment = exp_name
    with stage_run(cfg, "report", run_name="report",
                   tags={T + "report_run_ids": ",".join(ids)[:5000]}) as run:
        mlflow.log_text(text, "report.html")
        return run.info.run_id


def build(args) -> dict:
    cfg = finder.load(args)
    client = MlflowClient(tracking_uri(cfg))
    found, uri, exp = select(client, args, cfg)
    if not found:
        raise ValueError(f"no FINISHED run with scores in experiment '{exp.name}'"
                         + (f" of stage {args.stage}" if args.stage else ""))
    rows = [gather(client, r) for r in found]
    pair = paired(*rows) if len(rows) == 2 else ""
    where = f"experiment '{exp.name}' ({exp.experiment_id}) on {redact(uri)}"
    text = render(rows, pair, args.title, where)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    ids = [r["run_id"] for r in rows]
    rid = log_report(cfg, text, exp.name, ids) if args.log_to_run else ""
    flag = f" --tracking-uri {redact(args.tracking_uri)}" if args.tracking_uri else ""
    print(f"report: {len(rows)} run(s) -> {out}" + (f"; logged as report.html on run {rid}"
                                                     if rid else "") + (f"; {pair}" if pair else ""))
    ev = next((r["run_id"] for r in rows if r["stage"] not in ("main", "hpo")), "")
    print(f"next: open file://{out} in a browser; "
          + (f"python -m mexp.evaluate --run-id {ev}{flag}; " if ev else "")
          + f"see: {finder.ui_hint(uri, exp.experiment_id)}")
    return {"out": str(out), "run_ids": ids, "paired": pair, "report_run_id": rid,
            "experiment_id": exp.experiment_id}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--experiment", default="", help="name or id (default: tracking.experiment)")
    which.add_argument("--runs", default="", help="run ids, comma-separated")
    ap.add_argument("--stage", default="", help="with --experiment: only this stage's runs")
    ap.add_argument("--limit", type=int, default=20, help="with --experiment: the newest N runs")
    ap.add_argument("--out", default="report.html")
    ap.add_argument("--title", default="mexp report")
    finder.switch(ap, "--log-to-run", "log report.html on a new run tagged mexp.stage=report")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--config", default="", help="YAML config (its tracking section is used)")
    ap.add_argument("--overrides", default="", help="dotted overrides: tracking.experiment=x")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """The command: parse, build the page; a bad flag, config, run id or server exits 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    with redacted_output():
        try:
            return build(args)
        except (TrackingError, ConfigError, ValueError) as e:
            log.error("%s: %s", type(e).__name__, redact(str(e)))
            raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
