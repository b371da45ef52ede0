"""Stage `promote`: refit the final model on all subjects, register it, and move the aliases.

    python -m mexp.promote promote.run_id=<training or hpo run id> [promote.dry_run=true]

The new version gets the alias `challenger`; it becomes `champion` only when its
cross-validated metric (from the source run) beats the current champion's, or when there is
no champion. Both scores and source runs are recorded as tags on the version. A failed refit
registers nothing.
"""
from __future__ import annotations

import logging
import tempfile
import time
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mexp import cli
from mexp.config import Config
from mexp.tracking.logged_models import model_name
from mexp.serving.refit import refit
from mexp.util.secrets import redact
from mexp.serving.pyfunc import signature
from mexp.stages import check_promotable
from mexp.tracking.runs import T, LineageError, check_run, configure, stage_run

log = logging.getLogger(__name__)
STAGE = "promote"
PKG = Path(__file__).resolve().parent
MODEL_CODE = PKG / "serving" / "model_code.py"       # models from code: no pickled python_model
REQUIREMENTS = ("torch", "numpy", "pandas", "opencv-contrib-python-headless", "pyyaml",
                "scikit-learn", "mlflow", "tqdm", "openpyxl")


def pinned() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def source(run_id: str, metric: str):
    """(training run, its stage, cross-validated score) for a stage run or an hpo study."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        raise LineageError(f"promote.run_id {run_id!r} not found on "
                           f"{redact(mlflow.get_tracking_uri())}") from None
    stage = run.data.tags.get(T + "stage")
    if stage == "main":                         # a pipeline: promote its train_lstm run
        from mexp.tracking.finder import resolve_stage_run
        child = resolve_stage_run(run_id, "train_lstm")
        log.info("pipeline run %s: promoting its train_lstm run %s", run_id, child)
        return source(child, metric)
    if stage == "hpo":
        check_run(run_id, "hpo")
        best = run.data.tags.get(T + "best_run_id")
        if not best:
            raise LineageError(f"hpo run {run_id} has no completed trial to promote")
        if f"best/{metric}" not in run.data.metrics:
            raise LineageError(f"hpo run {run_id} did not optimise {metric} (no best/{metric})")
        check_promotable(run.data.tags[T + "hpo_stage"], f"{best} (best trial of hpo run {run_id})")
        return MlflowClient().get_run(best), run.data.tags[T + "hpo_stage"], run.data.metrics[f"best/{metric}"]
    check_promotable(stage or "?", run_id)
    check_run(run_id, stage or "?")
    key = f"test/{metric}"
    if key not in run.data.metrics:
        raise LineageError(f"run {run_id} ({stage}) has no cross-validated metric '{key}'")
    return run, stage, run.data.metrics[key]


def champion(client: MlflowClient, name: str, metric: str):
    """(version, score) of the current champion, or (None, None)."""
    try:
        mv = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None, None
    return mv, float(mv.tags.get(f"mexp.cv_{metric}", "nan"))


def log_and_register(bundle, name: str, params: dict | None = None,
                     metrics: dict | None = None) -> object:
    """Log the pyfunc from code (`serving/model_code.py`, the class shipped in code_paths) with its
    signature and input example as a LoggedModel of the active run, link `metrics` (the source
    run's cross-validated scores) to it, and register it as a new version of `name`."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = bundle.save(Path(d) / "bundle")
        log.info("logging model %s (%s) with its bundle and code to %s", model_name(name),
                 bundle.kind, redact(mlflow.get_tracking_uri()))
        sig, example = signature(bundle.kind, bundle.classes)
        info = mlflow.pyfunc.log_model(name=model_name(name), python_model=str(MODEL_CODE),
                                       artifacts={"bundle": str(path)}, code_paths=[str(PKG)],
                                       signature=sig, input_example=example,
                                       pip_requirements=pinned(), model_type="mexp-promoted",
                                       params={"kind": bundle.kind, **(params or {})})
    log.info("logged model %s in %.1f s", info.model_id, time.perf_counter() - t0)
    if metrics:
        mlflow.log_metrics(metrics, model_id=info.model_id)
    log.info("registering %s as a new version of %s", info.model_uri, name)
    mv = mlflow.register_model(info.model_uri, name)
    log.info("registered %s v%s", name, mv.version)
    return mv


def cv_metrics(train_run, metric: str, score: float) -> dict:
    """The source run's cross-validated scores, as `cv/*` metrics of the promoted model (it is
    refitted on every subject: these estimate it, they were not measured on it)."""
    m = {f"cv/{k.split('/', 1)[1]}": v for k, v in train_run.data.metrics.items()
         if k in ("test/uf1", "test/uar", "test/accuracy")}
    return m | {f"cv/{metric}": float(score)}


def main(cfg: Config) -> dict:
    p = cfg.promote
    if not p.run_id:
        raise ValueError("set promote.run_id: the training or hpo run to promote")
    configure(cfg)
    client = MlflowClient()
    train_run, stage, score = source(p.run_id, p.metric)
    name = p.name or f"mexp-{train_run.data.tags.get(T + 'model', stage)}"
    current, best = champion(client, name, p.metric)
    wins = current is None or not (best >= score)      # NaN champion score: the new one wins
    verdict = (f"{p.metric} {score:.4f} vs champion v{current.version} {best:.4f}" if current
               else f"{p.metric} {score:.4f}, no champion yet")
    if p.dry_run:
        print(f"promote (dry run): {name}: {verdict} -> "
              f"{'would become champion' if wins else 'would stay challenger'}; nothing changed")
        return {"dry_run": True, "wins": wins, "score": score, "name": name}
    tags = {T + "source_run_id": p.run_id, T + "train_run_id": train_run.info.run_id}
    with stage_run(cfg, STAGE, tags=tags) as run:
        log.info("refit started: %s run %s on all subjects", stage, train_run.info.run_id)
        t0 = time.perf_counter()
        bundle = refit(train_run, stage)                 # raises before anything is registered
        log.info("refit finished in %.1f s (%s)", time.perf_counter() - t0, bundle.kind)
        mv = log_and_register(bundle, name, metrics=cv_metrics(train_run, p.metric, score),
                              params={"stage": STAGE, "source_stage": stage,
                                      "source_run_id": p.run_id,
                                      "train_run_id": train_run.info.run_id})
        vt = {f"mexp.cv_{p.metric}": repr(float(score)), "mexp.source_run_id": p.run_id,
              "mexp.train_run_id": train_run.info.run_id, "mexp.promote_run_id": run.info.run_id,
              "mexp.kind": bundle.kind,
              "mexp.compared_with": f"v{current.version}" if current else "none",
              f"mexp.champion_{p.metric}": repr(best) if current else "none",
              "mexp.decision": "champion" if wins else "challenger"}
        log.info("tagging %s v%s and moving aliases (%s)", name, mv.version,
                 "champion" if wins else "challenger")
        for k, v in vt.items():
            client.set_model_version_tag(name, mv.version, k, v)
        client.set_registered_model_alias(name, "challenger", mv.version)
        if wins:
            client.set_registered_model_alias(name, "champion", mv.version)
        rid = run.info.run_id
    print(f"promote: {name} v{mv.version} ({bundle.kind}); {verdict} -> "
          f"{'champion' if wins else 'challenger'}; run {rid}; "
          f"serve: mlflow models serve -m 'models:/{name}@champion' --env-manager local")
    return {"name": name, "version": mv.version, "wins": wins, "score": score, "run_id": rid}


if __name__ == "__main__":
    cli.run(main, __doc__)
