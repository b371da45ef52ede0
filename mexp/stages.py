"""The stage table: one entry per training or feature stage says what the stage is, and the
commands that are not stages are listed beside it. MLproject, `hpo.stage`'s choices, lineage
matching, promote and the README's entry-point table are checked against it by a test
(tests/test_stages_table.py), so adding a stage means adding one row here.

Plain data only: nothing here imports a command (modules are named, imported on use).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: str = ""           # the stage whose run this one consumes
    upstream_key: str = ""       # the config key naming that run (empty: picked by config)
    output_sections: tuple[str, ...] = ()   # sections beyond data.* and the fold plan that shape its output
    searchable: bool = False     # a default HPO space in resources/hpo_spaces.yaml; a valid hpo.stage
    promotable: bool = False     # promote refits it on all subjects and serves it
    serve_kind: str = ""         # what the served model takes (serving.MERModel kinds)
    why_not_promotable: str = ""

    @property
    def module(self) -> str:
        return f"mexp.{self.name}"

    def main(self):
        return importlib.import_module(self.module).main


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("train_cnn", output_sections=("stage1",), searchable=True, promotable=True,
          serve_kind="frame_cnn | flow_cnn"),
    Stage("extract_features", upstream="train_cnn", upstream_key="cnn_run_id",
          output_sections=("stage1",)),
    Stage("train_lstm", upstream="extract_features", upstream_key="features_run_id",
          searchable=True, promotable=True, serve_kind="two_stage"),
    Stage("train_cnn_lstm", searchable=True, promotable=True, serve_kind="cnn_lstm"),
    Stage("extract_flow", output_sections=("flow",)),
    Stage("train_roi", upstream="extract_flow", upstream_key="flow_run_id", searchable=True,
          why_not_promotable="serving takes frames or flow images, not ROI sequences: a served "
                             "train_roi model would need optical flow and face ROIs at request "
                             "time, which mexp does not serve yet"),
)}

# MLproject entry points that are commands, not stages of the cross-validation workflow.
COMMANDS = ("main", "synthesize", "hpo", "hpo_train", "promote", "runs", "report")
# Commands run as modules only (their arguments are not a config): `python -m mexp.<name>`.
TOOLS = ("evaluate", "sheets", "compare")


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    return STAGES[name]


def searchable() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.searchable)


def promotable() -> tuple[str, ...]:
    return tuple(n for n, s in STAGES.items() if s.promotable)


def check_promotable(name: str, run_id: str) -> None:
    """A clear refusal for a run whose stage the table marks not promotable."""
    from mexp.tracking.runs import LineageError      # lazy: this table is imported by config
    s = STAGES.get(name)
    if s is None:
        raise LineageError(f"run {run_id} is a '{name}' run; promote takes a run of "
                           f"{', '.join(promotable())} or an hpo study over one of them")
    if not s.promotable:
        raise LineageError(f"run {run_id} is a '{name}' run, which is not promotable: "
                           f"{s.why_not_promotable}")
