"""Recompute a stage run's metrics from its `predictions.csv`, or score published checkpoints.

    python -m mexp.evaluate --run-id <id> [--out report.json]
    python -m mexp.evaluate --checkpoints DIR --model ststnet_original --config CONFIG

Prints pooled UF1/UAR/accuracy, the per-database, per-subject and per-class scores and the
confusion matrix, and checks each `test/*` (or `oracle/*`) metric logged on the run against the
recomputed value. On a `repeats=N` parent run it checks the seed ensemble (`ensemble/*`
against `ensemble_predictions.csv`). Exits 1 when any differs: the run's numbers are then not what its
predictions say.

With `--checkpoints` it scores published weights instead, one file per LOSO subject
(`DIR/<subject>.pth`), as a tracked `evaluate_checkpoints` run (`mexp.serving.checkpoints`); the
channel order (`--channel-order bgr|rgb`, default bgr as the STSTNet authors' cv2.imread) and
pixel scale (`--pixel-scale raw|standard`, default raw 0..255) are logged with it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mexp.config import Config
from mexp.tracking.evaluation import evaluate, render
from mexp.tracking.runs import T, TrackingError, configure

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--run-id", help="check a stage run's logged metrics")
    what.add_argument("--checkpoints", metavar="DIR",
                      help="score published per-subject checkpoints: DIR/<subject>.pth")
    ap.add_argument("--out", default="",
                    help="write the full report (--checkpoints: the run's summary) as JSON here")
    ap.add_argument("--tracking-uri", default="")
    ck = ap.add_argument_group("with --checkpoints")
    ck.add_argument("--model", default="", help="registry name of the checkpoints' model")
    ck.add_argument("--config", default="",
                    help="YAML config naming the data (data.dataset, data.root)")
    ck.add_argument("--channel-order", choices=("bgr", "rgb"), default="bgr",
                    help="order of the image channels fed to the model (default bgr: cv2.imread, "
                         "as STSTNet's authors; the data are stored RGB)")
    ck.add_argument("--pixel-scale", choices=("raw", "standard"), default="raw",
                    help="raw: float 0..255 (the authors'); standard: mexp's (x - 127.5) / 64")
    ck.add_argument("--allow-partial", action="store_true",
                    help="score only the subjects that have a checkpoint (tagged partial)")
    ck.add_argument("items", nargs="*", help="dotted config overrides: data.root=...")
    args = ap.parse_args(argv)
    if args.items and not args.checkpoints:
        ap.error(f"unrecognised arguments: {' '.join(args.items)}")
    return args


def score_checkpoints(args: argparse.Namespace) -> int:
    from mexp.serving import checkpoints
    from mexp.config import load_config
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config or None, [*args.items] + (
            [f"model.name={args.model}"] if args.model else []))
        if args.tracking_uri:
            cfg.tracking.uri = args.tracking_uri
        out = checkpoints.main(cfg, args.checkpoints, args.channel_order, args.pixel_scale,
                               args.allow_partial)
    except (TrackingError, ValueError, OSError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def stage_run_of(run_id: str) -> str:
    """A pipeline (`main`) run id stands for its train_lstm run; any other id is itself
    (a repeats parent is checked as such: its seed ensemble)."""
    from mlflow.tracking import MlflowClient

    from mexp.tracking.finder import resolve_stage_run
    if MlflowClient().get_run(run_id).data.tags.get(T + "stage") != "main":
        return run_id
    child = resolve_stage_run(run_id, "train_lstm")
    print(f"evaluate: pipeline run {run_id} -> its train_lstm run {child}")
    return child


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoints:
        return score_checkpoints(args)
    logging.basicConfig(level=logging.WARNING)
    cfg = Config()
    cfg.tracking.uri = args.tracking_uri
    try:
        configure(cfg)
        report, bad = evaluate(stage_run_of(args.run_id))
    except (TrackingError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a run id the store does not know
        print(f"evaluate: run {args.run_id}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(render(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if bad:
        print("MISMATCH between logged and recomputed metrics:\n  " + "\n  ".join(bad))
        return 1
    print(f"all {len(report['checked'])} logged metrics reproduced exactly from predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
