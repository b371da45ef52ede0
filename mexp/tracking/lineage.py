"""Lineage: which upstream run a stage consumes. A given run id is checked (stage, status,
config); with none given, the newest FINISHED run whose output-shaping keys match the config
is picked, and the summary line says which and why (`upstream_note`)."""
from __future__ import annotations

import logging
from contextvars import ContextVar

from mlflow.tracking import MlflowClient

from mexp.config import Config
from mexp.tracking.keys import differences, upstream_keys
from mexp.stages import STAGES
from mexp.tracking.runs import T, LineageError, check_run, configure

log = logging.getLogger(__name__)

_UPSTREAM_NOTE: ContextVar[str] = ContextVar("mexp_upstream_note", default="")


def _newest_finished(cfg: Config, stage: str, tag: str, value: str):
    """The newest FINISHED run of `stage` in the experiment whose tag `tag` equals `value`."""
    exp = configure(cfg)
    flt = (f"tags.`{T}stage` = '{stage}' and tags.`{T}{tag}` = '{value}' "
           f"and attributes.status = 'FINISHED'")
    runs = MlflowClient().search_runs([exp], flt, order_by=["attributes.start_time DESC"],
                                      max_results=1)
    return runs[0] if runs else None


UPSTREAM_SECTIONS = {n: s.output_sections for n, s in STAGES.items()}   # the stage table


def upstream_note() -> str:
    """Which upstream run the current stage picked by itself, and why ("" if given)."""
    return _UPSTREAM_NOTE.get()


def upstream_used(note: str) -> None:
    """Record the upstream choice for the stage's summary line."""
    _UPSTREAM_NOTE.set(note)


def match_upstream(cfg: Config, stage: str, limit: int = 200):
    """(run, note): the newest FINISHED `stage` run in the experiment that agrees with `cfg`
    on every key shaping its output (tracking.keys.upstream_keys), or (None, why not) listing the
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


def find_reusable(cfg: Config, stage: str, reuse_key: str):
    """A FINISHED run of `stage` with this reuse key (same config, data, code, upstream)."""
    return _newest_finished(cfg, stage, "reuse_key", reuse_key)
