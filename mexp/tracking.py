"""The thin MLflow layer the stages call: tracking set-up, stage runs with config, tags and
batched metrics, lineage lookups between stages, and artifact download by run id."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mexp import __version__
from mexp.config import Config, differences, flatten, upstream_keys
from mexp.logged_models import system_metrics
from mexp.progress import interactive
from mexp.stages import STAGES
from mexp.secrets import install_log_filter, redact, redact_tree, redact_value

log = logging.getLogger(__name__)
T = "mexp."  # tag prefix
PKG = Path(__file__).resolve().parent


class TrackingError(RuntimeError):
    """The tracking server is unreachable, or a run id is wrong for what it is used for."""


class LineageError(TrackingError):
    """A parent run of the wrong stage, unfinished, or with a different fold plan or data."""


class ResumeError(LineageError):
    """A run cannot be resumed with this config, data or fold plan: results would mix."""


def tracking_uri(cfg: Config) -> str:
    return (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path('mlflow.db').resolve()}")


def configure(cfg: Config) -> str:
    """Point MLflow at the tracking store and experiment; fail fast naming the URI.
    MLflow gets the real URI; what mexp logs or prints of it has credentials masked."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    install_log_filter()                        # log records of this process are redacted
    if not interactive():                       # MLflow's own download bars: escapes in a log
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if redact(uri) != uri:                      # MLflow's "View run at <url>" would print it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        if os.environ.get("MLFLOW_RUN_ID") and not mlflow.active_run():
            # launched by `mlflow run`: use its run if it is in the configured experiment
            exp = _launcher_experiment(os.environ["MLFLOW_RUN_ID"], cfg.tracking.experiment)
            if exp:
                return exp
        if mlflow.active_run():
            return mlflow.active_run().info.experiment_id
        return mlflow.set_experiment(cfg.tracking.experiment).experiment_id
    except MlflowException as e:
        raise TrackingError(redact(f"cannot use tracking server {uri}: "
                                   f"{str(e).splitlines()[0]}")) from None
    except Exception as e:  # connection errors surface as several request exception types
        raise TrackingError(redact(f"cannot reach tracking server {uri}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:300]}")) from None


def _launcher_experiment(run_id: str, experiment: str) -> str:
    """The experiment id of `mlflow run`'s run if it is `experiment`; else the launcher run
    is left as a pointer (tagged) and the stage logs into `experiment` like any other run."""
    client = MlflowClient()
    run = client.get_run(run_id)
    if client.get_experiment(run.info.experiment_id).name == experiment:
        return run.info.experiment_id
    note = (f"mexp logged this work in experiment '{experiment}' (tracking.experiment); "
            f"`mlflow run ... --experiment-name {experiment}` puts the launcher run there too")
    client.set_tag(run_id, T + "logged_in_experiment", experiment)
    client.set_tag(run_id, "mlflow.note.content", note)
    log.warning("`mlflow run` opened run %s outside experiment '%s': %s", run_id, experiment, note)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)
    return ""


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PKG, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 (16 hex) of the package's source: the code version that reuse is keyed on."""
    h = hashlib.sha256(__version__.encode())
    for p in sorted(PKG.rglob("*.py")) + sorted(PKG.rglob("*.yaml")):
        h.update(p.relative_to(PKG).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def data_identity(cfg: Config) -> str:
    """Digest of what names the dataset and its labels (not how it is preprocessed)."""
    d = cfg.data
    return hashlib.sha256(repr((d.dataset, d.root, d.annotations, d.label_map)).encode()
                          ).hexdigest()[:16]


def log_config(cfg: Config, run_id: str) -> None:
    """config.yaml artifact and flattened params, skipping keys the run already holds
    (`mlflow run` logs its -P values first, and re-logging a param with a new value raises).
    Both have credentials masked (tracking.uri, hpo.storage...); the digests use the real config."""
    client = MlflowClient()
    have = client.get_run(run_id).data.params
    params = {k: redact_value(k, str(v))[:6000] for k, v in cfg.flat().items() if k not in have}
    items = list(params.items())
    from mlflow.entities import Param
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    mlflow.log_text(yaml.safe_dump(redact_tree(cfg.to_dict()), sort_keys=False), "config.yaml")


_ATTACH: ContextVar[bool] = ContextVar("mexp_attach_stage", default=False)


@contextmanager
def attach_stage():
    """The next stage run uses the active run (an HPO trial's) instead of nesting a new one,
    so the stage's fold runs nest directly under it."""
    token = _ATTACH.set(True)
    try:
        yield
    finally:
        _ATTACH.reset(token)


def _log_stage(cfg: Config, stage: str, run_id: str, tags: dict | None) -> None:
    base = {T + "stage": stage, T + "config_digest": cfg.digest(),
            T + "data_config": data_identity(cfg), T + "git_commit": git_commit(),
            T + "code_digest": code_digest(), T + "version": __version__}
    mlflow.set_tags({k: redact_value(k, v) for k, v in {**base, **(tags or {})}.items()})
    log_config(cfg, run_id)


@contextmanager
def stage_run(cfg: Config, stage: str, run_name: str | None = None, tags: dict | None = None,
              resume_run_id: str = ""):
    """Open the stage's run (nested under an active run, attached to `mlflow run`'s run, or
    resumed), log config and tags; a failure marks the run FAILED and re-raises."""
    configure(cfg)
    if _ATTACH.get() and mlflow.active_run() is not None:
        token = _ATTACH.set(False)              # stages this one calls nest as usual
        try:
            run = mlflow.active_run()
            _log_stage(cfg, stage, run.info.run_id, tags)
            yield run                           # the owner of the run ends it
        finally:
            _ATTACH.reset(token)
        return
    if resume_run_id:
        prior = check_resume(cfg, check_run(resume_run_id, stage, finished=False), tags)
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics())
    else:
        prior = ""
        run = mlflow.start_run(run_name=run_name or stage, nested=mlflow.active_run() is not None,
                               log_system_metrics=system_metrics())   # MEXP_SYSTEM_METRICS=0: off
    try:
        if prior:
            mlflow.set_tag(T + "resumed", "true")   # config, params and tags stay the first run's
        else:
            _log_stage(cfg, stage, run.info.run_id, tags)
        yield run
    except ResumeError:                         # refused: leave the run as it was
        mlflow.end_run(prior if prior != "RUNNING" else "KILLED")
        if prior == "RUNNING":
            MlflowClient().update_run(resume_run_id, status="RUNNING")
        raise
    except BaseException:
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run()


def logged_config(run) -> dict:
    """The flat config a run was started with (its config.yaml, else its params)."""
    try:
        with tempfile.TemporaryDirectory() as d:
            text = Path(mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="config.yaml", dst_path=d)).read_text()
        return flatten(yaml.safe_load(text) or {})
    except (MlflowException, OSError):
        return dict(run.data.params)


_LINEAGE_TAGS = ("parent_run_id", "cnn_run_id", "features_run_id", "flow_run_id")


def check_resume(cfg: Config, run, tags: dict | None) -> str:
    """Refuse to resume `run` unless only result-neutral keys (config.is_neutral) differ and
    it reads the same upstream run; return the run's status before the resume."""
    want = {k: redact_value(k, v) for k, v in cfg.flat().items()}
    have = {k: redact_value(k, v) for k, v in logged_config(run).items()}
    diffs = [f"{k} (run: {b!r}, now: {a!r})" for k, a, b in differences(want, have)]
    for name in _LINEAGE_TAGS:
        a, b = (tags or {}).get(T + name), run.data.tags.get(T + name)
        if a is not None and b is not None and a != b:
            diffs.append(f"upstream {name} (run: {b}, now: {a})")
    if diffs:
        raise ResumeError(
            f"cannot resume run {run.info.run_id}: it was started with another config; "
            f"differs in {'; '.join(diffs)}. Only result-neutral keys may differ on resume "
            f"(output.*, tracking.*, worker counts, cache folders, the HPO budget): resume with "
            f"the run's own config.yaml, or start a new run")
    return run.info.status


def terminate_tree(client: MlflowClient, run_id: str, status: str = "KILLED",
                   _why: str = "found dead", root: bool = True) -> list[str]:
    """End every RUNNING run under `run_id` (children first, recursively through
    mlflow.parentRunId, every page) and the run itself with `status`, tagged
    `mexp.terminated`; the ids it ended. For runs whose process is gone. `root=False`
    leaves the run itself alone (a resumed run's own status is its new process's)."""
    run = client.get_run(run_id)
    ended, token = [], None
    while True:
        page = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'", page_token=token)
        for child in page:
            ended += terminate_tree(client, child.info.run_id, status, "parent found dead")
        token = page.token
        if not token:
            break
    if root and run.info.status == "RUNNING":
        client.set_terminated(run_id, status)
        client.set_tag(run_id, T + "terminated", _why)
        ended.append(run_id)
    return ended


def terminate_children(parent_id: str, status: str = "KILLED") -> int:
    """Every RUNNING run under `parent_id` (not the run itself) ended `status`: their
    process died with the run's earlier process. How many were ended."""
    return len(terminate_tree(MlflowClient(), parent_id, status, root=False))


def log_history(run_id: str, history: list[dict], prefix: str = "") -> None:
    """Per-epoch metrics in batches of 1000 (one call per metric is 10-300x slower)."""
    now = int(time.time() * 1000)
    metrics = [Metric(prefix + k, float(v), now, int(row["epoch"]))
               for row in history for k, v in row.items() if k != "epoch"]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def check_run(run_id: str, stage: str, finished: bool = True):
    """The run, after checking that it exists, is of `stage`, and (if asked) FINISHED."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LineageError(f"run id {run_id!r} not found on "
                           f"{redact(mlflow.get_tracking_uri())}") from None
    got = run.data.tags.get(T + "stage")
    if got != stage:
        raise LineageError(f"run {run_id} is a '{got}' run, not a '{stage}' run")
    if finished and run.info.status != "FINISHED":
        raise LineageError(f"run {run_id} ({stage}) is {run.info.status}, not FINISHED")
    return run


def _newest_finished(cfg: Config, stage: str, tag: str, value: str):
    """The newest FINISHED run of `stage` in the experiment whose tag `tag` equals `value`."""
    exp = configure(cfg)
    flt = (f"tags.`{T}stage` = '{stage}' and tags.`{T}{tag}` = '{value}' "
           f"and attributes.status = 'FINISHED'")
    runs = MlflowClient().search_runs([exp], flt, order_by=["attributes.start_time DESC"],
                                      max_results=1)
    return runs[0] if runs else None


# Config sections an upstream stage's output depends on beyond data.* and the fold plan.
UPSTREAM_SECTIONS = {n: s.output_sections for n, s in STAGES.items()}   # the stage table
_UPSTREAM_NOTE: ContextVar[str] = ContextVar("mexp_upstream_note", default="")


def upstream_note() -> str:
    """Which upstream run the current stage picked by itself, and why ("" if given)."""
    return _UPSTREAM_NOTE.get()


def upstream_used(note: str) -> None:
    """Record the upstream choice for the stage's summary line."""
    _UPSTREAM_NOTE.set(note)


def match_upstream(cfg: Config, stage: str, limit: int = 200):
    """(run, note): the newest FINISHED `stage` run in the experiment that agrees with `cfg`
    on every key shaping its output (config.upstream_keys), or (None, why not) listing the
    nearest candidates and what differs."""
    exp = configure(cfg)
    keys = upstream_keys(cfg, UPSTREAM_SECTIONS.get(stage, ()))
    runs = MlflowClient().search_runs(
        [exp], f"tags.`{T}stage` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=limit)
    want, near = cfg.flat(), []
    for r in runs:
        diff = differences(want, r.data.params, keys)
        if not diff:
            return r, (f"{stage} run {r.info.run_id} picked automatically: the newest FINISHED one "
                       f"whose {len(keys)} input keys (data.*, fold plan"
                       + "".join(f", {x}.*" for x in UPSTREAM_SECTIONS.get(stage, ())) + ") match")
        near.append((len(diff), r.info.run_id, diff))
    if not near:
        return None, f"no FINISHED '{stage}' run in experiment '{cfg.tracking.experiment}'"
    near.sort(key=lambda t: t[0])
    lines = "; ".join(f"{rid} differs in " + ", ".join(f"{k} (run: {b}, now: {a})"
                                                      for k, a, b in d[:4])
                      + (f" and {len(d) - 4} more" if len(d) > 4 else "")
                      for _, rid, d in near[:3])
    return None, (f"no FINISHED '{stage}' run in experiment '{cfg.tracking.experiment}' matches "
                  f"this config's input keys; nearest: {lines}")


def resolve_parent(cfg: Config, run_id: str, stage: str):
    """The given run (checked), or the newest FINISHED `stage` run that matches the config
    on every input key (see match_upstream); the choice is noted for the summary line."""
    upstream_used("")
    if run_id:
        return check_run(run_id, stage)
    run, note = match_upstream(cfg, stage)
    if run is None:
        raise LineageError(f"{note}; run {stage} with this config first or pass its run id")
    log.info("using %s", note)
    upstream_used(note)
    return run


def download(run_id: str, path: str, dst: str | Path) -> Path:
    """Fetch an artifact through MLflow (works for local stores and remote servers)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise LineageError(f"run {run_id} has no artifact '{path}': {str(e).splitlines()[0]}") from None


def find_reusable(cfg: Config, stage: str, reuse_key: str):
    """A FINISHED run of `stage` with this reuse key (same config, data, code, upstream)."""
    return _newest_finished(cfg, stage, "reuse_key", reuse_key)
