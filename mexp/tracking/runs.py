"""The thin MLflow layer the stages call: tracking set-up, stage runs with config, tags and
batched metrics, lineage lookups between stages, and artifact download by run id."""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import mlflow
import yaml
from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mexp import __version__
from mexp.config import Config, flatten
from mexp.engine.setup import setup_torch
from mexp.tracking.keys import code_digest, data_identity, differences, git_commit
from mexp.tracking.logged_models import system_metrics
from mexp.util.progress import interactive
from mexp.util.secrets import install_log_filter, redact, redact_tree, redact_value

log = logging.getLogger(__name__)
T = "mexp."  # tag prefix
PKG = Path(__file__).resolve().parents[1]   # the mexp package


class TrackingError(RuntimeError):
    """The tracking server is unreachable, or a run id is wrong for what it is used for."""


class LineageError(TrackingError):
    """A parent run of the wrong stage, unfinished, or with a different fold plan or data."""


class ResumeError(LineageError):
    """A run cannot be resumed with this config, data or fold plan: results would mix."""


def tracking_uri(cfg: Config) -> str:
    return (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{Path('mlflow.db').resolve()}")


RACE = re.compile(r"unique|duplicate|already exists", re.I)


def raced(call, tries: int = 3):
    """`call()`, retried when another process created the same thing (experiment, dataset) at
    the same moment and the store's unique constraint refused the second insert (seen with
    three HPO workers starting at once); the retry finds it. Other errors propagate."""
    for attempt in range(tries):
        try:
            return call()
        except MlflowException as e:
            if attempt == tries - 1 or not RACE.search(str(e)):
                raise
            time.sleep(0.2 * (attempt + 1))


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
        return raced(lambda: mlflow.set_experiment(cfg.tracking.experiment).experiment_id)
    except MlflowException as e:
        raise TrackingError(redact(f"cannot use tracking server {uri}: "
                                   f"{str(e).splitlines()[0]}")) from None
    except Exception as e:  # connection errors surface as several request exception types
        raise TrackingError(redact(f"cannot reach tracking server {uri}: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:300]}")) from None


def start(cfg: Config) -> str:
    """A training command's first step: torch set up as the config says, and the tracking store
    reached (an unreachable server fails here, before any work). Returns the experiment id."""
    setup_torch(cfg)
    return configure(cfg)


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
    """Refuse to resume `run` unless only result-neutral keys (tracking.keys.is_neutral) differ and
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


def history_metrics(history: list[dict], now: int, prefix: str = "") -> list[Metric]:
    """Per-epoch rows as MLflow metrics (step = epoch)."""
    return [Metric(prefix + k, float(v), now, int(row["epoch"]))
            for row in history for k, v in row.items() if k != "epoch"]


def log_metric_list(client: MlflowClient, run_id: str, metrics: list[Metric],
                    tags: list | None = None) -> None:
    """Metrics in batches of 1000, MLflow's limit per call (one call per metric is 10-300x
    slower); `tags` (RunTag) ride with the first."""
    for i in range(0, max(len(metrics), 1 if tags else 0), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else ())


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


# Config sections an upstream stage's output depends on beyond data.* and the fold plan.
_UPSTREAM_NOTE: ContextVar[str] = ContextVar("mexp_upstream_note", default="")


def download(run_id: str, path: str, dst: str | Path) -> Path:
    """Fetch an artifact through MLflow (works for local stores and remote servers)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as e:
        raise LineageError(f"run {run_id} has no artifact '{path}': {str(e).splitlines()[0]}") from None


