"""MLflow 3's own concepts on mexp's runs: each fold's model as a LoggedModel (weights, signature,
input example, params, linked metrics) and system metrics on stage runs.

A fold model is cheap on purpose (no pyfunc, no environment inference): its artifacts are
`model.pth`, an `MLmodel` holding the signature and `input_example.json`. Find and rank them:

    mlflow.search_logged_models(experiment_ids=[exp], filter_string="params.stage = 'train_cnn'",
                                order_by=[{"field_name": "metrics.test/uf1", "ascending": False}])
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput
from mlflow.models import Model, ModelSignature
from mlflow.models.utils import _save_example
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

log = logging.getLogger(__name__)
FOLD_MODEL_TYPE = "mexp-fold"
EXAMPLE_MAX = 16384     # values: a (1, 16, 1, 128, 128) clip is a 14 MB JSON, ~0.9 s a fold
OFF = ("0", "false", "no", "off")


def system_metrics() -> bool:
    """`log_system_metrics` for a stage run: CPU, memory, disk, network (and GPU where pynvml
    finds one) every `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` s (MLflow's default 10 s), as
    `system/*` metrics. On unless `MEXP_SYSTEM_METRICS=0`, or psutil is missing."""
    if os.environ.get("MEXP_SYSTEM_METRICS", "").strip().lower() in OFF:
        return False
    if importlib.util.find_spec("psutil") is None:
        log.warning("psutil is not installed: no system metrics on this run (pip install psutil)")
        return False
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)   # 3 INFO lines a run
    return True


@lru_cache(maxsize=64)
def _stage_facts(parent_id: str) -> tuple[str, str, str]:
    """(model name, dataset name, data digest) of a stage run, read once per stage run."""
    tags = MlflowClient().get_run(parent_id).data.tags
    return (tags.get("mexp.model", ""), tags.get("mexp.dataset", ""),
            tags.get("mexp.data_digest", ""))


def model_name(*parts: str) -> str:
    """A LoggedModel name (MLflow refuses / : . % and quotes in one)."""
    return re.sub(r"[/:.%\"'\s]+", "_", "-".join(p for p in parts if p))


def fold_signature(example, num_classes: int) -> ModelSignature:
    """The fold network's signature: its input batch (when an example is known) -> logits."""
    out = Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")])
    if example is None:
        return ModelSignature(inputs=None, outputs=out)
    x = np.asarray(example)
    return ModelSignature(inputs=Schema([TensorSpec(x.dtype, (-1, *x.shape[1:]))]), outputs=out)


def artifact_repo(uri: str):
    """The artifact repository at `uri` (a run's `artifact_uri`, a LoggedModel's
    `artifact_location`), from the URI the caller already holds: `MlflowClient.log_artifacts`
    first looks the run (or model) up again, ~8 ms a call on a SQLite store, paid once per
    fold run."""
    return get_artifact_repository(uri, tracking_uri=mlflow.get_tracking_uri())


def open_fold_model(client: MlflowClient, experiment_id: str, run_id: str, parent_id: str,
                    stage: str, fold: str, num_classes: int, params: dict | None = None):
    """A PENDING LoggedModel for fold run `run_id`'s network, linked as the run's output;
    `params` join the model's own (model, fold, stage, num_classes)."""
    name = _stage_facts(parent_id)[0]
    lm = client.create_logged_model(
        experiment_id, name=model_name(name or stage, f"fold={fold}"), source_run_id=run_id,
        params={"model": name or stage, "fold": fold, "stage": stage,
                "num_classes": str(num_classes), **(params or {})},
        tags={"mexp.stage": f"{stage}:fold", "mexp.fold": fold, "mexp.stage_run_id": parent_id},
        model_type=FOLD_MODEL_TYPE)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, 0)])
    except BaseException:
        client.finalize_logged_model(lm.model_id, "FAILED")
        raise
    return lm


def late_params(out) -> dict:
    """The fold model's params known only once it has trained."""
    return {"best_epoch": str(out.fit.best_epoch), "selected_on": out.fit.selected_on}


def save_fold_model(client: MlflowClient, model_id: str, location: str, run_id: str,
                    parent_id: str, stage: str, out, classes) -> dict:
    """The fold network's artifacts into LoggedModel `model_id` at `location` (its
    `artifact_location`): the weights, an MLmodel with the signature, the input example when
    `out.example` holds a small one. Returns the metric link kwargs for the caller's metrics;
    a failure marks the model FAILED."""
    name, dataset, digest = _stage_facts(parent_id)
    example = getattr(out, "example", None)
    try:
        with tempfile.TemporaryDirectory() as d:
            torch.save(out.fit.state, Path(d) / "model.pth")
            sig = fold_signature(example, len(classes))
            mm = Model(run_id=run_id, model_id=model_id, signature=sig,
                       metadata={"weights": "model.pth", "classes": list(classes),
                                 "model": name or stage})
            if example is not None and np.size(example) <= EXAMPLE_MAX:
                _save_example(mm, np.asarray(example), d)
            elif example is not None:           # the signature still has the input shape
                mm.metadata["input_example"] = f"omitted: {np.size(example)} values"
            mm.save(str(Path(d) / "MLmodel"))
            artifact_repo(location).log_artifacts(d)
    except BaseException:
        client.finalize_logged_model(model_id, "FAILED")
        raise
    link = {"model_id": model_id}
    if dataset and digest:
        link |= {"dataset_name": dataset, "dataset_digest": digest}
    return link


def fail_pending_models(client: MlflowClient, experiment_id: str, run_ids) -> int:
    """Mark FAILED the still-PENDING LoggedModels of runs whose process died (a fold killed
    between creating its model and finalizing it); how many. For the resume clean-up."""
    n = 0
    for rid in run_ids:
        for m in client.search_logged_models([experiment_id],
                                             filter_string=f"source_run_id = '{rid}'"):
            if m.status == "PENDING":
                client.finalize_logged_model(m.model_id, "FAILED")
                n += 1
    return n
