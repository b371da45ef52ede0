"""Finding runs: an experiment's stage runs as rows (scores, lineage, digests), and
`resolve_stage_run`, which turns a pipeline or repeats parent id into the stage run it stands
for. `python -m mexp.runs` prints them."""
from __future__ import annotations

import re
from datetime import datetime

import mlflow
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mexp.tracking.runs import T, LineageError, TrackingError, tracking_uri
from mexp.util.secrets import install_log_filter, redact


KEYS = ("uf1", "uar", "accuracy")


UPSTREAM = (("parent", "parent_run_id"), ("cnn", "cnn_run_id"), ("features", "features_run_id"),
            ("flow", "flow_run_id"), ("lstm", "lstm_run_id"), ("best", "best_run_id"),
            ("train", "train_run_id"))


PIPELINE_STAGES = {"train_cnn": "cnn_run_id", "extract_features": "features_run_id",
                   "train_lstm": "lstm_run_id"}


HIDDEN = ("hpo:trial",)                 # with every `<stage>:fold`: hidden unless --all


class AmbiguousRunError(LineageError):
    """A parent run stands for several stage runs (a repeats parent's seeds): pick one."""

    def __init__(self, msg: str, candidates: list[str]):
        super().__init__(msg)
        self.candidates = candidates


def _tags(run) -> dict:
    return run.data.tags


def fetch_run(client: MlflowClient, run_id: str):
    """The run; LineageError naming the id if the store has none, TrackingError if the store
    cannot be read."""
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        uri = redact(mlflow.get_tracking_uri())
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise LineageError(f"run id {run_id!r} not found on {uri}") from None
        raise TrackingError(redact(f"cannot read run {run_id} from {uri}: "
                                   f"{str(e).splitlines()[0]}")) from None


def resolve_stage_run(run_id: str, stage: str, allow_parent: bool = False,
                      client: MlflowClient | None = None) -> str:
    """The id of the `stage` run that `run_id` names: the run itself if it is one; for a
    pipeline (`main`) run its child of that stage; for a `<stage>:repeats` parent its only seed
    run, or the parent itself if `allow_parent`. Several seeds raise AmbiguousRunError listing
    them; anything else raises LineageError naming the id."""
    client = client or MlflowClient()
    run = fetch_run(client, run_id)
    got = _tags(run).get(T + "stage", "")
    if got == stage:
        return run_id
    if got == "main":
        return _pipeline_child(client, run, stage)
    if got == f"{stage}:repeats":
        seeds = [s for s in _tags(run).get(T + "repeat_run_ids", "").split(",") if s]
        if allow_parent or len(seeds) == 1:
            return run_id if allow_parent else seeds[0]
        raise AmbiguousRunError(
            f"run {run_id} is a {stage} repeats parent of {len(seeds)} seed runs: "
            f"{', '.join(seeds) or '(none logged)'}; pass one of them (or the parent where a "
            f"repeats parent is accepted, e.g. python -m mexp.evaluate --run-id {run_id})", seeds)
    hint = ""
    if got == "hpo" and _tags(run).get(T + "hpo_stage") == stage:
        hint = f"; its best trial is run {_tags(run).get(T + 'best_run_id') or '(none yet)'}"
    raise LineageError(f"run {run_id} is a '{got or 'untagged'}' run, not a '{stage}' run nor a "
                       f"pipeline or {stage} repeats parent{hint}")


def _pipeline_child(client: MlflowClient, run, stage: str) -> str:
    """The pipeline's `stage` run: the id its tags name (a reused run may sit under an
    earlier pipeline), else its nested child of that stage."""
    rid, tags = run.info.run_id, _tags(run)
    tagged = tags.get(T + PIPELINE_STAGES.get(stage, "-"), "")
    kids = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'")
    of_stage = sorted({r.info.run_id for r in kids if _tags(r).get(T + "stage") == stage})
    found = [tagged] if tagged else of_stage
    if len(found) == 1:
        return found[0]
    if found:
        raise AmbiguousRunError(f"pipeline run {rid} has {len(found)} {stage} runs: "
                                f"{', '.join(found)}; pass one of them", found)
    have = ", ".join(f"{_tags(r).get(T + 'stage', '?')} {r.info.run_id}" for r in kids)
    raise LineageError(f"pipeline run {rid} has no {stage} run (its stage runs: {have or 'none'})")


def _pick(m: dict, prefix: str, suffix: str = "") -> tuple[dict, dict]:
    """(pooled, per database) scores: metrics `prefix/<key><suffix>`, `prefix/<db>/<key><suffix>`."""
    pooled = {k: m[f"{prefix}/{k}{suffix}"] for k in KEYS if f"{prefix}/{k}{suffix}" in m}
    per_db: dict[str, dict] = {}
    for key, v in m.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix and parts[2].endswith(suffix):
            name = parts[2][:len(parts[2]) - len(suffix)] if suffix else parts[2]
            if name in KEYS:
                per_db.setdefault(parts[1], {})[name] = v
    return pooled, per_db


def scores(run) -> dict:
    """A run's UF1/UAR/accuracy, whichever kind it logged: a repeats parent's mean (`*_sd`,
    `seeds`, `ensemble_uf1`), pooled `test/*`, `oracle/*` (flagged) or an HPO study's `best/*`;
    `per_db` holds per-database scores. `kind` says which ("" when there are none)."""
    m = run.data.metrics
    for kind, prefix, suffix in (("repeats", "repeats", "_mean"), ("test", "test", ""),
                                 ("oracle", "oracle", ""), ("best", "best", "")):
        pooled, per_db = _pick(m, prefix, suffix)
        if pooled:
            out = {"kind": kind, **pooled, "per_db": per_db}
            if kind == "repeats":
                out |= {f"{k}_sd": m[f"repeats/{k}_sd"] for k in KEYS if f"repeats/{k}_sd" in m}
                out["seeds"] = int(_tags(run).get(T + "repeats", "0") or 0)
                if "ensemble/uf1" in m:
                    out["ensemble_uf1"] = m["ensemble/uf1"]
            return out
    return {"kind": "", "per_db": {}}


def row(run) -> dict:
    """One run as a flat record: ids, stage, status, start, tags people compare, scores."""
    t = _tags(run)
    up = {name: t[T + tag] for name, tag in UPSTREAM if t.get(T + tag)}
    return {"run_id": run.info.run_id, "name": run.info.run_name or "",
            "stage": t.get(T + "stage", ""), "status": run.info.status,
            "start": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
            if run.info.start_time else "", "start_time": run.info.start_time,
            "model": t.get(T + "model", ""), "dataset": t.get(T + "dataset", ""),
            "data_digest": t.get(T + "data_digest", ""),
            "config_digest": t.get(T + "config_digest", ""),
            "nested_in": t.get("mlflow.parentRunId", ""), "upstream": up,
            "leak": t.get(T + "leak") == "true", **scores(run)}


def _shown(run, stage: str, every: bool, parent_stage: dict) -> bool:
    got = _tags(run).get(T + "stage", "")
    if ":" in stage and got == stage:
        return True                     # a child stage asked for by name: train_cnn:fold
    if stage and got.split(":")[0] != stage or not (got or every):   # untagged: not mexp's
        return False
    parent = _tags(run).get("mlflow.parentRunId")
    return every or not (got.endswith(":fold") or got in HIDDEN
                         or parent and parent_stage.get(parent, "").endswith(":repeats"))


def _parent_stages(client: MlflowClient, exp_ids: list[str], runs) -> dict:
    """The stage of each run's parent (one query per 100 parents)."""
    ids = sorted({_tags(r).get("mlflow.parentRunId") for r in runs} - {None, ""})
    out = {}
    for i in range(0, len(ids), 100):
        quoted = ", ".join(f"'{x}'" for x in ids[i:i + 100])
        for p in client.search_runs(exp_ids, f"attributes.run_id IN ({quoted})", max_results=100):
            out[p.info.run_id] = _tags(p).get(T + "stage", "")
    return out


def find_runs(exp_ids: list[str], stage: str = "", status: str = "", every: bool = False,
              limit: int = 20, client: MlflowClient | None = None, keep=None) -> list:
    """The newest `limit` runs of the experiments that match (see the module docstring) and,
    if given, satisfy `keep(run)`."""
    client = client or MlflowClient()
    flt = []
    if stage and not re.fullmatch(r"[\w.:-]+", stage):
        raise ValueError(f"not a stage name: {stage!r}")
    if stage:
        flt.append(f"tags.`{T}stage` LIKE '{stage.split(':')[0]}%'")
    if status:
        valid = [RunStatus.to_string(s) for s in RunStatus.all_status()]
        if status.upper() not in valid:
            raise ValueError(f"unknown status {status!r}; valid: {', '.join(valid)}")
        flt.append(f"attributes.status = '{status.upper()}'")
    found, token = [], None
    while len(found) < limit:
        page = client.search_runs(exp_ids, " and ".join(flt), max_results=max(100, 2 * limit),
                                  order_by=["attributes.start_time DESC"], page_token=token)
        parents = _parent_stages(client, exp_ids, page)
        found += [r for r in page if _shown(r, stage, every, parents) and (keep or bool)(r)]
        token = page.token
        if not token:
            break
    return found[:limit]


def ui_hint(uri: str, experiment_id: str) -> str:
    """Where a person sees the runs: the experiment's page on a server, else `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}"
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def open_experiment(cfg, name: str = "") -> tuple[str, object]:
    """(tracking uri, experiment) by name or id, without creating it; fails naming the URI."""
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    install_log_filter()
    name = name or cfg.tracking.experiment
    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(name)
        if exp is None and name.isdigit():
            exp = client.get_experiment(name)
        if exp is None:
            known = [e.name for e in client.search_experiments(max_results=20)]
            raise TrackingError(f"no experiment {name!r} on {redact(uri)}; it has: "
                                f"{', '.join(known) or 'none'}")
    except MlflowException as e:
        raise TrackingError(redact(f"cannot use tracking server {uri}: "
                                   f"{str(e).splitlines()[0]}")) from None
    except OSError as e:                        # refused, reset, timed out (requests' errors too)
        raise TrackingError(redact(f"cannot reach tracking server {uri}: {e}")) from None
    return uri, exp


def short(run_id: str) -> str:
    return run_id[:8]


def score_text(r: dict, key: str = "uf1") -> str:
    if key not in r:
        return "-"
    text = f"{r[key]:.4f}"
    if f"{key}_sd" in r:
        text += f"±{r[key + '_sd']:.4f}"
    return text + {"oracle": " ORACLE", "best": " best"}.get(r["kind"], "")
