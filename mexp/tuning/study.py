"""The Optuna study of `hpo` in its storage: URL and name, heartbeats, sampler and pruner,
the quota every worker shares (counted in the storage), and dead workers' trials (failed by
Optuna's heartbeat check, their MLflow run trees KILLED)."""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import logging
import os
import socket
import warnings
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from mexp.config import Config, ConfigError
from mexp.util.secrets import redact
from mexp.tracking.runs import T, terminate_tree, tracking_uri  # noqa: F401  (terminate_tree: re-exported)

log = logging.getLogger(__name__)
# trial user attrs: the trial's MLflow run, its worker (host:pid), admitted to train, skipped, error
RUN, WORKER, ADMITTED, SKIPPED, ERROR = ("mlflow_run_id", "mexp_worker", "mexp_admitted",
                                         "mexp_skipped", "mexp_error")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
DEAD = "FAIL (worker died)"


def storage_url(cfg: Config) -> str:
    """hpo.storage, else an SQLite file beside the SQLite tracking store (else ./optuna.db)."""
    if cfg.hpo.storage:
        return cfg.hpo.storage
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def study_name(cfg: Config) -> str:
    """hpo.study_name, else the stage plus a digest of what defines the search (not of the
    trial budget or the worker settings, so a study can be resumed with more trials)."""
    if cfg.hpo.study_name:
        return cfg.hpo.study_name
    probe = copy.deepcopy(cfg)
    probe.hpo.trials = probe.hpo.n_workers = 0
    probe.hpo.timeout = 0.0
    for key in ("heartbeat_interval", "grace_period", "max_failures"):   # how, not what
        if hasattr(probe.hpo, key):
            setattr(probe.hpo, key, 0)
    d = probe.to_dict()
    d["hpo"].pop("trial_batch")                 # how, and newer than the names it must keep
    digest = hashlib.sha256(json.dumps({k: d[k] for k in ("data", "model", "training", "flow",
                                                          "hpo")}, sort_keys=True).encode())
    return f"{cfg.hpo.stage}-{digest.hexdigest()[:10]}"


def heartbeat(h) -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: a RUNNING trial whose worker has not
    written a heartbeat for the grace period is failed as dead (Optuna's RDBStorage)."""
    interval = int(getattr(h, "heartbeat_interval", 60))
    grace = int(getattr(h, "grace_period", 0)) or 2 * interval
    if interval < 1 or grace <= interval:
        raise ConfigError(f"hpo.heartbeat_interval must be >= 1 and hpo.grace_period > it "
                          f"(0: twice the interval), got {interval} and {grace}")
    return interval, grace


def make_storage(url: str, h) -> optuna.storages.RDBStorage:
    interval, grace = heartbeat(h)
    kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():       # heartbeat_interval is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kw, heartbeat_interval=interval,
                                              grace_period=grace,
                                              heartbeat_stale_trial_callback=on_dead_trial)
    except Exception as e:  # a bad URL, a missing driver, a database that is not there
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(redact(f"hpo.storage: cannot open the Optuna storage {url}: "
                                 f"{type(e).__name__}: {first}")) from None


def make_sampler(h, worker_id: int):
    if h.sampler == "random":
        return optuna.samplers.RandomSampler(seed=h.seed + worker_id)
    return optuna.samplers.TPESampler(seed=h.seed + worker_id)


def make_pruner(h):
    if h.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if h.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def count_done(study) -> int:
    return len(study.get_trials(deepcopy=False, states=DONE))


def in_flight(study) -> list[FrozenTrial]:
    """RUNNING trials other than quota-skipped ones (those end within milliseconds)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if SKIPPED not in t.user_attrs]


def worker_name(pid: int | None = None) -> str:
    """host:pid of this process (or of `pid` on this host): the trial user attr mexp_worker."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def trial_runs(client: MlflowClient, parent_id: str, number: int) -> list[str]:
    """The MLflow run ids of trial `number` (by the tag, so a run whose id never reached the
    study is found too)."""
    exp = client.get_run(parent_id).info.experiment_id
    return [r.info.run_id for r in client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`{T}trial` = '{number}'")]


def close_dead_trial(study, trial: FrozenTrial) -> list[str]:
    """The runs of a trial whose worker died: every RUNNING run under it KILLED, the trial
    run KILLED (even if the worker ended it before the trial was told) and tagged."""
    client, parent = MlflowClient(), study.user_attrs.get(RUN)
    ids = {trial.user_attrs[RUN]} if RUN in trial.user_attrs else set()
    if parent:
        ids |= set(trial_runs(client, parent, trial.number))
    ended = []
    for rid in sorted(ids):
        client.set_tag(rid, T + "trial_state", DEAD)
        ended += terminate_tree(client, rid, "KILLED")
        if rid not in ended:
            client.set_terminated(rid, "KILLED")
    return ended


def on_dead_trial(study, trial: FrozenTrial) -> None:
    """Optuna's heartbeat_stale_trial_callback: runs in the worker that failed the trial."""
    log.warning("trial %d: its worker %s sent no heartbeat for the grace period: trial FAIL, "
                "its runs KILLED", trial.number, trial.user_attrs.get(WORKER, "?"))
    try:
        close_dead_trial(study, trial)
    except Exception as e:  # the study goes on; the final summary closes the runs again
        log.warning("trial %d: could not end its MLflow runs yet: %s", trial.number, redact(str(e)))


def close_runs(study, parent_id: str) -> None:
    """Every run of a finished trial is terminal: RUNNING trial runs of dead workers (found by
    tag, even if their id never reached the study) and RUNNING fold runs under failed ones."""
    client = MlflowClient()
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    exp = client.get_run(parent_id).info.experiment_id
    for r in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                       "attributes.status = 'RUNNING'"):
        t = trials.get(int(r.data.tags.get(T + "trial", -1)))
        if t is not None and t.state.is_finished():
            close_dead_trial(study, t)
    for t in trials.values():
        if t.state == TrialState.FAIL and RUN in t.user_attrs:
            terminate_tree(client, t.user_attrs[RUN], "KILLED")


def fail_dead_trials(study, grace: int) -> None:
    """Fail the trials of dead workers: by Optuna's heartbeat check, and RUNNING trials that
    never got past admission within the grace period (a worker killed in its first
    milliseconds, or a study left by a version without heartbeats)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    old = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ADMITTED not in t.user_attrs and SKIPPED not in t.user_attrs \
                and t.datetime_start and t.datetime_start < old:
            ft = study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            if ft.state == TrialState.FAIL and ERROR not in ft.user_attrs:
                on_dead_trial(study, ft)


def admit(study, trial, n: int) -> tuple[bool, int]:
    """Whether this trial may train: fewer than `n` trials are done or ahead of it in flight
    (older RUNNING ones, or younger ones already admitted); (admitted, trials ahead).
    Counted in the storage, so every worker shares the quota. Optuna numbers trials under a
    lock on the study row, so a trial sees every older one: of two trials racing for the last
    slot the younger yields, and done + admitted never exceeds `n`."""
    ahead = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in DONE:
            ahead += 1
        elif (t.state == TrialState.RUNNING and t.number != trial.number
              and SKIPPED not in t.user_attrs
              and (t.number < trial.number or ADMITTED in t.user_attrs)):
            ahead += 1
    return ahead < n, ahead


def last_worker(study) -> str:
    """The worker (host:pid) that completed the study's last complete-or-pruned trial."""
    done = study.get_trials(deepcopy=False, states=DONE)
    last = max(done, key=lambda t: (t.datetime_complete or datetime.datetime.min, t.number))
    return last.user_attrs.get(WORKER, "")


def why_no_best(study, cfg: Config) -> str:
    """Why the study has no completed trial, with the first failure's (redacted) error."""
    trials = [t for t in study.get_trials(deepcopy=False) if SKIPPED not in t.user_attrs]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    head = (f"study '{study.study_name}' has no completed trial ({pruned} pruned, "
            f"{len(failed)} failed)")
    if failed:
        t = next((t for t in failed if ERROR in t.user_attrs), failed[0])
        cause = t.user_attrs.get(ERROR) or ("its worker died" if ADMITTED in t.user_attrs
                                            else "its worker died before it started")
        return redact(f"{head}; first error, trial {t.number}: {cause}")
    if pruned:
        return f"{head}: every trial was pruned (hpo.pruner={cfg.hpo.pruner})"
    return head
