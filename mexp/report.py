"""One self-contained HTML page that compares runs: scores with subject-bootstrap 95% intervals
(pooled and per database), seeds, protocol, leak/oracle flags, a runs x subjects accuracy
heatmap, confusion matrices, learning curves, per-subject plots, and a paired test when two
runs predicted the same samples.

    python -m mexp.report [--experiment mexp | --runs id1,id2,...] [--out report.html] [--log-to-run]

Inline CSS and script, images as base64 data URIs: the file opens offline and can be mailed.
Intervals resample the subjects of a run's predictions.csv (`mexp.tracking.report_parts`, which also holds
the paired test); a logged score that is not the point those predictions give (a repeats
parent's mean, against its ensemble) is shown before it.
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
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mexp import cli
from mexp.tracking import report_parts as parts
from mexp.tracking.report_parts import paired
from mexp.tracking import finder
from mexp.util.secrets import redact
from mexp.tracking.runs import T, LineageError, stage_run, tracking_uri

log = logging.getLogger(__name__)
IMAGES = (("confusion matrix", ("confusion_matrix.png", "ensemble_confusion_matrix.png")),
          ("learning curve", ("learning_curve.png",)), ("per subject", ("per_subject.png",)))
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


def _describe(r: dict, tags: dict, params: dict) -> None:
    """Protocol, flags and seed of a row, from the tags and params of the run (or its donor)."""
    for key in ("data_digest", "dataset", "model"):
        r[key] = r[key] or tags.get(T + key, "")
    method, folds = tags.get(T + "cv_method", ""), params.get("training.cv_folds", "")
    r["protocol"] = f"{method} ({folds} folds)" if method == "StratifiedGroupKFold" and folds \
        else method
    r["leak"] = r["leak"] or tags.get(T + "leak") == "true"
    r["oracle"] = r["kind"] == "oracle" or tags.get(T + "oracle") == "true"
    r["seed"] = params.get("training.seed", "")


def gather(client: MlflowClient, run) -> dict:
    """A report row: the run's record (mexp.tracking.finder.row), protocol and flags, images, predictions."""
    r = finder.row(run)
    src = r["source"] = _source(client, r)
    seeds = [s for s in run.data.tags.get(T + "repeat_run_ids", "").split(",") if s]
    donor = seeds[0] if seeds else src          # a repeats parent or a pipeline: data tags
    tags, params = run.data.tags, run.data.params               # are on its stage runs
    if donor != r["run_id"]:
        d = client.get_run(donor).data
        tags, params = {**d.tags, **tags}, {**d.params, **params}
    _describe(r, tags, params)
    have = {a.path for a in client.list_artifacts(src)}
    r["images"], r["pred"], r["pred_file"] = {}, None, ""
    with tempfile.TemporaryDirectory() as d:
        for title, names in IMAGES:
            p = _fetch(src, names, have, d)
            if p is not None:
                r["images"][title] = base64.b64encode(p.read_bytes()).decode("ascii")
        p = _fetch(src, PREDICTIONS, have, d)
        if p is not None:
            r["pred"], r["pred_file"] = pd.read_csv(p), p.name
    return r


def _cell(text: str, value=None) -> str:
    if value is None:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num" data-v="{value:.6f}">{html.escape(text)}</td>'


def _seeds(r: dict) -> str:
    if r["kind"] != "repeats":
        return f"seed {r['seed']}" if r["seed"] != "" else "-"
    ens = f"; ensemble UF1 {r['ensemble_uf1']:.4f}" if "ensemble_uf1" in r else ""
    return f"{r.get('seeds') or '?'} seeds: UF1 {r['uf1']:.4f} ± {r.get('uf1_sd', 0):.4f}{ens}"


def _score(logged, text: str, ci, source: str) -> str:
    """A score cell: 'point [lo, hi]' from the predictions, after a logged score that differs."""
    if ci is None:
        return _cell(text, logged)
    est = f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}]"
    if logged is None or abs(logged - ci[0]) <= 1e-9:
        return _cell(est, ci[0])
    return _cell(f"{text}; {'ensemble' if 'ensemble' in source else source} {est}", logged)


def _ci(r: dict, db: str = "") -> dict:
    b = r["boot"] or {}
    return (b.get("per_db", {}).get(db) if db else b.get("all")) or {}


def runs_table(rows: list[dict]) -> str:
    head = ("run", "stage", "model", "dataset", "protocol", "flags", "data digest",
            "UF1 [95% CI]", "UAR [95% CI]", "accuracy", "seeds (mean ± sd)", "date")
    body = []
    for r in rows:
        rid, ci = html.escape(r["run_id"]), _ci(r)
        flags = " ".join(f for f, on in (("LEAK", r["leak"]), ("ORACLE", r["oracle"])) if on)
        cells = [f'<td><a href="#run-{rid}"><code>{rid}</code></a></td>', _cell(r["stage"]),
                 _cell(r["model"] or "-"), _cell(r["dataset"] or "-"), _cell(r["protocol"] or "-"),
                 f'<td class="flags">{flags or "-"}</td>', _cell(r["data_digest"][:12] or "-")]
        cells += [_score(r.get(k), finder.score_text(r, k), ci.get(k), r["pred_file"])
                  for k in ("uf1", "uar")]
        cells += [_cell(finder.score_text(r, "accuracy"), r.get("accuracy")), _cell(_seeds(r)),
                  _cell(r["start"])]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="runs"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}'
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def db_table(rows: list[dict]) -> str:
    dbs = sorted({db for r in rows
                  for db in (*r["per_db"], *((r["boot"] or {}).get("per_db", {})))})
    if not dbs:
        return "<p class=meta>no per-database scores (test/&lt;db&gt;/uf1, predictions)</p>"
    head = "".join(f"<th>{html.escape(db)} {k} [95% CI]</th>" for db in dbs for k in ("UF1", "UAR"))
    body = []
    for r in rows:
        cells = "".join(_score(s.get(k), f"{s[k]:.4f}" if k in s else "-", _ci(r, db).get(k),
                               r["pred_file"])
                        for db, s in ((db, r["per_db"].get(db, {})) for db in dbs)
                        for k in ("uf1", "uar"))
        body.append(f"<tr><td><code>{html.escape(finder.short(r['run_id']))}</code></td>{cells}</tr>")
    return (f'<table class="sortable" id="per-database"><thead><tr><th>run</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def subjects_section(rows: list[dict]) -> str:
    """The runs x subjects accuracy heatmap, with its numbers in a folded table."""
    acc = {f"{finder.short(r['run_id'])} {r['stage']}": parts.subject_accuracy(r["pred"])
           for r in rows if r["pred"] is not None}
    if not acc:
        return "<p class=meta>no predictions.csv on these runs: no per-subject scores</p>"
    table = pd.DataFrame(acc).T.sort_index(axis=1)             # (runs, subjects)
    png = base64.b64encode(parts.heatmap_png(table)).decode("ascii")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(f"<tr><td><code>{html.escape(str(run))}</code></td>"
                   + "".join(_cell("-") if np.isnan(v) else _cell(f"{v:.2f}", v) for v in vals)
                   + "</tr>" for run, vals in zip(table.index, table.to_numpy(float)))
    return (f'<img class="wide" id="heatmap" alt="per-subject accuracy, runs x subjects" '
            f'src="data:image/png;base64,{png}"><details><summary>values</summary>'
            f'<table class="sortable" id="per-subject"><thead><tr><th>run</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></details>")


def run_section(r: dict) -> str:
    rid = html.escape(r["run_id"])
    src = "" if r["source"] == r["run_id"] else f" (plots of its run {html.escape(r['source'])})"
    figs = "".join(f'<figure><img alt="{t} of run {rid}" src="data:image/png;base64,{b}">'
                   f"<figcaption>{t}</figcaption></figure>" for t, b in r["images"].items())
    missing = ", ".join(t for t, _ in IMAGES if t not in r["images"])
    return (f'<section id="run-{rid}"><h3>{html.escape(r["stage"])} run <code>{rid}</code>{src}</h3>'
            f'<p class=meta>{html.escape(r["name"])}, started {html.escape(r["start"])}, UF1 '
            f'{html.escape(finder.score_text(r))}</p>{figs}'
            + (f"<p class=meta>not logged: {missing}</p>" if missing else "") + "</section>")


def render(rows: list[dict], pair: str, title: str, where: str, note: str = "") -> str:
    now = datetime.now().strftime("%Y-%m-%d %H:%M")
    pair_html = f'<h2>Paired comparison</h2><p class="paired" id="paired">{html.escape(pair)}</p>' \
        if pair else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{parts.CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=meta>{len(rows)} run(s) from {html.escape(where)}; made {now} by "
            f"<code>python -m mexp.report</code>. Click a column to sort. {html.escape(note)}</p>"
            f"{runs_table(rows)}<h2>Per database</h2>{db_table(rows)}{pair_html}"
            f"<h2>Per subject</h2>{subjects_section(rows)}<h2>Runs</h2>"
            + "".join(run_section(r) for r in rows) + f"<script>{parts.SCRIPT}</script></body></html>")


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
    cfg = cli.load_tool_config(args)
    client = MlflowClient(tracking_uri(cfg))
    found, uri, exp = select(client, args, cfg)
    if not found:
        raise ValueError(f"no FINISHED run with scores in experiment '{exp.name}'"
                         + (f" of stage {args.stage}" if args.stage else ""))
    rows = [gather(client, r) for r in found]
    for r in rows:
        r["boot"] = None if r["pred"] is None else parts.bootstrap(r["pred"], args.resamples,
                                                                   args.seed)
    pair = paired(*rows) if len(rows) == 2 else ""
    where = f"experiment '{exp.name}' ({exp.experiment_id}) on {redact(uri)}"
    note = (f"[lo, hi]: 95% percentile interval over {args.resamples} resamples of the run's "
            f"subjects with replacement (seed {args.seed}), from its predictions.")
    text = render(rows, pair, args.title, where, note)
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
    ap.add_argument("--resamples", type=int, default=parts.RESAMPLES,
                    help="subject-bootstrap resamples per interval")
    ap.add_argument("--seed", type=int, default=parts.SEED, help="seed of the bootstrap draws")
    cli.switch(ap, "--log-to-run", "log report.html on a new run tagged mexp.stage=report")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--config", default="", help="YAML config (its tracking section is used)")
    ap.add_argument("--overrides", default="", help="dotted overrides: tracking.experiment=x")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    """The command: parse, build the page; a bad flag, config, run id or server exits 2."""
    return cli.run_tool(build, parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
