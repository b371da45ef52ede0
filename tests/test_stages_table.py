"""The stage table (mexp/stages.py) is the one place that says what a stage is: MLproject,
the HPO choices and spaces, lineage matching, promote and the README follow it."""
import importlib
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mexp import stages
from mexp.config import _CHOICES
from mexp.tracking.lineage import UPSTREAM_SECTIONS
from mexp.tracking.runs import LineageError

ROOT = Path(__file__).resolve().parents[1]


def test_mlproject_entry_points_are_exactly_the_stages_and_commands():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    entry, table = set(project["entry_points"]), set(stages.STAGES) | set(stages.COMMANDS)
    assert entry == table, f"MLproject only: {sorted(entry - table)}; table only: {sorted(table - entry)}"
    for name in entry:
        assert f"python -m mexp.{name} " in project["entry_points"][name]["command"]


def test_every_stage_module_has_main_and_upstreams_exist():
    for name in stages.COMMANDS + stages.TOOLS:
        assert callable(importlib.import_module(f"mexp.{name}").main), name
    for s in stages.STAGES.values():
        assert callable(s.main()), s.name
        if s.upstream:
            assert s.upstream in stages.STAGES and s.upstream_key, s.name
            assert hasattr(importlib.import_module("mexp.config").Config(), s.upstream_key)


def test_hpo_choices_and_default_spaces_follow_the_table():
    spaces = yaml.safe_load((ROOT / "mexp/resources/hpo_spaces.yaml").read_text())
    assert set(spaces) == set(stages.searchable())
    assert tuple(_CHOICES["hpo.stage"]) == stages.searchable()
    assert UPSTREAM_SECTIONS == {n: s.output_sections for n, s in stages.STAGES.items()}


def test_readme_entry_point_table_lists_every_entry_point():
    readme = (ROOT / "README.md").read_text()
    for name in (*stages.STAGES, *stages.COMMANDS, *stages.TOOLS):
        assert f"| `{name}` |" in readme or f"mexp.{name}" in readme, name


def test_a_stage_the_table_marks_not_promotable_is_refused_clearly(tracking):
    from mexp.promote import source
    client = MlflowClient()
    exp = client.create_experiment("table")
    roi = client.create_run(exp, tags={"mexp.stage": "train_roi"})
    client.log_metric(roi.info.run_id, "test/uf1", 0.5)
    client.set_terminated(roi.info.run_id, "FINISHED")
    assert not stages.stage("train_roi").promotable
    with pytest.raises(LineageError, match="'train_roi' run, which is not promotable: serving"):
        source(roi.info.run_id, "uf1")
    study = client.create_run(exp, tags={"mexp.stage": "hpo", "mexp.hpo_stage": "train_roi",
                                         "mexp.best_run_id": roi.info.run_id})
    client.log_metric(study.info.run_id, "best/uf1", 0.5)
    client.set_terminated(study.info.run_id, "FINISHED")
    with pytest.raises(LineageError, match="best trial of hpo run .* not promotable"):
        source(study.info.run_id, "uf1")
