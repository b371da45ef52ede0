"""How a command ends: the one-line result, then the next steps as commands with the real ids
(evaluate, promote, and where to look at the run)."""
from __future__ import annotations

import re

import mlflow

from mexp.stages import promotable
from mexp.tracking.lineage import upstream_note
from mexp.util.secrets import redact


PROMOTABLE = promotable()                   # from the stage table


def where_to_look(run_id: str) -> str:
    """How to open a run: its page on a tracking server, else `mlflow ui` on the local store
    (credentials never printed)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        from mlflow.tracking import MlflowClient
        exp = MlflowClient().get_run(run_id).info.experiment_id
        base = re.sub(r"//[^/@]*@", "//", uri).rstrip("/")   # a browser logs in by itself
        return f"open it at {base}/#/experiments/{exp}/runs/{run_id}"
    return f"see it with: mlflow ui --backend-store-uri {redact(uri)}"


def next_steps(stage: str, run_id: str) -> str:
    """The commands a user runs next on this run, with its id filled in."""
    steps = [f"python -m mexp.evaluate --run-id {run_id}"]
    if stage.split(":")[0] in PROMOTABLE:
        steps.append(f"python -m mexp.promote promote.run_id={run_id}")
    return "next: " + "  |  ".join(steps) + f"  |  {where_to_look(run_id)}"


def summary_line(stage: str, s: dict, run_id: str, extra: str = "") -> str:
    """The stage's one-line result, then a line of next steps with the real ids."""
    if upstream_note():
        extra += f"; input: {upstream_note()}"
    if s.get("oracle"):
        extra += " -- ORACLE: epochs chosen on the test subjects, not an honest estimate"
    line = (f"{stage}: UF1 {s['uf1']:.4f}  UAR {s['uar']:.4f}  accuracy {s['accuracy']:.4f} "
            f"over {s['folds']} folds ({s['n']} clips); run {run_id}{extra}")
    return line + "\n" + next_steps(stage, run_id)
