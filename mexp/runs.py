"""Find runs: a table of an experiment's stage runs with their scores, lineage and digests
(the finding itself is `mexp.tracking.finder`).

    python -m mexp.runs [--stage train_lstm] [--status FINISHED] [--experiment mexp] [--all]
                        [--limit 20] [--tracking-uri URI] [--json]

By default the table holds the runs a person or the pipeline started (newest first): fold runs,
HPO trials and a repeats parent's per-seed runs are hidden unless `--all` (or asked for by stage,
`--stage train_cnn:fold`). `--stage train_cnn` also lists `train_cnn:repeats` parents.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from mexp import cli
from mexp.tracking.finder import find_runs, open_experiment, row, score_text, short, ui_hint
from mexp.util.secrets import redact

log = logging.getLogger(__name__)
# upstream tags, shown as name=<short id>


COLUMNS = (("run id", lambda r: r["run_id"]), ("stage", lambda r: r["stage"] or "-"),
           ("status", lambda r: r["status"]), ("start", lambda r: r["start"]),
           ("UF1", score_text), ("UAR", lambda r: score_text(r, "uar")),
           ("acc", lambda r: score_text(r, "accuracy")),
           ("upstream", lambda r: " ".join(f"{k}={short(v)}" for k, v in r["upstream"].items())
            or "-"),
           ("data", lambda r: r["data_digest"][:8] or "-"),
           ("config", lambda r: r["config_digest"][:8] or "-"))


def table(rows: list[dict]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[f(r) for _, f in COLUMNS] for r in rows]
    width = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, width)).rstrip() for line in cells)


def next_steps(rows: list[dict], uri: str, exp_id: str, flag: str = "") -> str:
    """What to run next on these rows: evaluate and report the newest scored stage runs."""
    ids = [r["run_id"] for r in rows if r["kind"] in ("test", "repeats", "oracle")
           and r["stage"] not in ("main", "hpo") and not r["stage"].endswith(":fold")]
    steps = [f"python -m mexp.evaluate --run-id {ids[0]}{flag}"] if ids else []
    if len(ids) > 1:
        steps.append(f"python -m mexp.report --runs {ids[0]},{ids[1]}{flag}")
    if not rows:
        steps.append("python -m mexp.main --config configs/demo.yaml")
    return "next: " + "; ".join(steps + [f"see: {ui_hint(uri, exp_id)}"])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default="", help="train_cnn, main, hpo, train_cnn:fold...")
    ap.add_argument("--status", default="", help="FINISHED, RUNNING, FAILED, KILLED, SCHEDULED")
    ap.add_argument("--experiment", default="", help="name or id (default: tracking.experiment)")
    cli.switch(ap, "--all", "also fold runs, HPO trials and repeats' seed runs", dest="every")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--tracking-uri", default="")
    cli.switch(ap, "--json", "the rows as JSON on stdout")
    ap.add_argument("--config", default="", help="YAML config (its tracking section is used)")
    ap.add_argument("--overrides", default="", help="dotted overrides: tracking.experiment=x")
    return ap.parse_args(argv)


def find(args: argparse.Namespace) -> dict:
    uri, exp = open_experiment(cli.load_tool_config(args), args.experiment)
    runs = find_runs([exp.experiment_id], args.stage, args.status, args.every, args.limit)
    rows = [row(r) for r in runs]
    flag = f" --tracking-uri {redact(args.tracking_uri)}" if args.tracking_uri else ""
    nxt = next_steps(rows, uri, exp.experiment_id, flag)
    if args.json:
        print(json.dumps(rows, indent=1))
        log.info("%s", nxt)
    else:
        print(table(rows) if rows else f"no runs match in experiment '{exp.name}'")
        print(f"{len(rows)} run(s) in experiment '{exp.name}' ({exp.experiment_id}); {nxt}")
    return {"runs": rows, "experiment_id": exp.experiment_id, "next": nxt}


def main(argv=None) -> dict:
    """The command: parse, list; a bad flag, config or server exits 2 with one line."""
    return cli.run_tool(find, parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
