"""HPO trial groups as one vectorised model (#15, `hpo.trial_batch`): the trials of a group
whose configs differ only in learning rate, weight decay, class weighting or augmentation on
or off train every fold
together (per-replica hyperparameters), and each trial still gets its run, folds and value,
equal to its stage run alone. On four real MEGC2019 subjects, STSTNet, 2 epochs."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mexp import hpo, train_cnn
from mexp.config import ConfigError, load_config
from mexp.engine import batching
from mexp.hpo_train import trial_config
from mexp.tuning import study as hpo_study
from tests.conftest import flow28_slice

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("sub06", "sub17", "016", "s15")


@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory) -> Path:
    return flow28_slice(shared_data, tmp_path_factory.mktemp("flow28"), SUBJECTS)


def _cfg(root, *extra):
    return load_config(ROOT / "configs/megc2019_flow.yaml", [
        f"data.root={root}", "repeats=1", "training.device=cpu", "training.fold_workers=1",
        "training.fold_batching=on", "training.epochs=2", "data.augmentation=false",
        "model.dropout=0", "output.local=false", "hpo.stage=train_cnn", "hpo.trials=3",
        "hpo.pruner=none", "hpo.seed=3",
        "hpo.space={training.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}, "
        "training.weight_decay: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}}", *extra])


def test_a_trial_group_trains_as_one_model_and_each_trial_equals_its_run_alone(
        subset, tracking, batched_fits):
    cfg = _cfg(subset, "hpo.trial_batch=3")
    out = hpo.main(cfg)
    assert [len(r) for r in batched_fits] == [3 * len(SUBJECTS)]   # 3 trials x 4 folds, one model
    study = optuna.load_study(study_name=out["study"], storage=hpo_study.storage_url(cfg))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and len({t.params["training.lr"] for t in done}) == 3
    client = MlflowClient()
    for t in done:
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.data.tags["mexp.trial_state"] == "COMPLETE"
        folds = client.search_runs([run.info.experiment_id],
                                   f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert len(folds) == len(SUBJECTS)
    batched_fits.clear()
    for t in done:                                    # each trial alone: its own model
        alone = train_cnn.main(trial_config(cfg, t.params))
        assert alone["uf1"] == pytest.approx(t.value, abs=1e-9)
    assert [len(r) for r in batched_fits] == [len(SUBJECTS)] * 3


def test_only_per_replica_hyperparameters_join_a_group(subset):
    cfg = _cfg(subset)
    lr, drop = _cfg(subset, "training.lr=0.01", "training.class_weighted=false"), _cfg(
        subset, "model.dropout=0.3")
    aug = _cfg(subset, "data.augmentation=true")
    with batching.trial_group([cfg, lr, drop, aug]):
        members = batching._group_members(cfg)
    own = {"lr": cfg.training.lr, "weight_decay": cfg.training.weight_decay,
           "class_weighted": cfg.training.class_weighted, "augment": False}
    assert [hp for _, hp in members] == [{**own, "lr": 0.01, "class_weighted": False},
                                         {**own, "augment": True}]
    with pytest.raises(ConfigError, match="hpo.trial_batch"):
        _cfg(subset, "hpo.trial_batch=0")
