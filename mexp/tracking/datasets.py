"""The data on a run: the dataset as an MLflow input (with its digest) and the fold plan
(`fold_plan.json`), each checked against what a resumed run started with."""
from __future__ import annotations

import tempfile
import warnings

import mlflow

from mexp.engine.plans import FoldPlan, check_plan
from mexp.tracking.runs import T, ResumeError, download, raced


def log_plan(plan: FoldPlan, sample_ids) -> None:
    """fold_plan.json on the active run, checked against the data first; on a resumed run
    the plan must be the one the run started with."""
    check_plan(plan, sample_ids)
    run = mlflow.active_run()
    have = run.data.tags.get(T + "fold_plan_digest") if run else None
    if have and have != plan.digest:
        raise ResumeError(f"cannot resume run {run.info.run_id}: it was started with fold plan "
                          f"{have}, not {plan.digest}; resume it with the same config and data")
    mlflow.set_tag(T + "fold_plan_digest", plan.digest)
    mlflow.set_tag(T + "cv_method", plan.method)
    mlflow.log_text(plan.to_json(), "fold_plan.json")


def fetch_plan(run_id: str) -> FoldPlan:
    with tempfile.TemporaryDirectory() as d:
        return FoldPlan.load(download(run_id, "fold_plan.json", d))


def log_dataset(table, digest: str, name: str) -> None:
    """The dataset as an MLflow input (name, digest, size) plus its digest as a tag."""
    run = mlflow.active_run()
    have = run.data.tags.get(T + "data_digest") if run else None
    if have and have != digest:
        raise ResumeError(f"cannot resume run {run.info.run_id}: it was started on data {have}, "
                          f"but the data now load as {digest} (frames or sheet changed)")
    cols = [c for c in ("sample_id", "dataset", "subject", "label") if c in table.columns]
    with warnings.catch_warnings():  # MLflow's schema hint about integer columns is noise here
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(table[cols], name=name, digest=digest, targets="label")
        raced(lambda: mlflow.log_input(ds, context="training"))   # HPO workers at once
    mlflow.set_tags({T + "data_digest": digest, T + "dataset": name, T + "n_samples": len(table)})
    fixes = table.attrs.get("annotation_fixes") or []
    mlflow.set_tag(T + "annotation_fixes", len(fixes))
    if fixes:
        mlflow.log_dict(fixes, "annotation_fixes.json")
    mismatch = table.attrs.get("gt_mismatch")
    if mismatch:                        # data.accept_gt_mismatch: the differences, on the run
        mlflow.set_tag(T + "gt_mismatch", len(mismatch) if hasattr(mismatch, "__len__") else 1)
        mlflow.log_dict(mismatch if isinstance(mismatch, (dict, list)) else str(mismatch),
                        "gt_mismatch.json")
