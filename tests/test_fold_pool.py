"""Fold-level process parallelism gives exactly the serial run's folds, in plan order."""
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mexp import train_cnn
from mexp.engine.pool import fold_outputs


def _square(k, fold):
    if fold == "bad":
        raise ValueError(f"fold {k} is bad")
    return k * k


def test_outputs_come_back_in_plan_order_and_errors_surface():
    todo = list(enumerate(["a", "b", "c", "d"]))
    assert list(fold_outputs(_square, todo, workers=2)) == [(0, "a", 0), (1, "b", 1),
                                                           (2, "c", 4), (3, "d", 9)]
    with pytest.raises(ValueError, match="fold 1 is bad"):
        list(fold_outputs(_square, list(enumerate(["a", "bad", "c"])), workers=2))


def test_two_workers_reproduce_the_serial_stage(tiny_cfg, tracking, tmp_path):
    cfg = tiny_cfg
    cfg.data.input = "diff"
    cfg.data.sequence_length = 6
    cfg.training.epochs = 2
    cfg.training.cv_folds = 3
    cfg.training.num_threads = 1          # the same thread count in both runs
    serial = train_cnn.main(cfg)
    cfg.training.fold_workers = 2
    parallel = train_cnn.main(cfg)
    assert parallel["run_id"] != serial["run_id"]
    client = MlflowClient()
    a, b = (client.get_run(r["run_id"]).data for r in (serial, parallel))
    assert b.params["training.fold_workers"] == "2"
    for m in ("test/uf1", "test/uar", "test/accuracy"):
        assert a.metrics[m] == pytest.approx(b.metrics[m], abs=1e-9), m
    pa, pb = (_probs(client, r["run_id"], tmp_path / name)
              for r, name in ((serial, "a"), (parallel, "b")))
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    assert len(client.search_runs([client.get_run(parallel["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parallel['run_id']}'")) == 3


def _probs(client, run_id, d):
    d.mkdir()
    pred = pd.read_csv(client.download_artifacts(run_id, "predictions.csv", str(d)))
    return pred.sort_values("sample_id").filter(like="prob_").to_numpy()


def test_zero_fold_workers_means_one_per_core_and_negative_is_refused(tiny_cfg, monkeypatch):
    import os

    from mexp.engine.setup import fold_workers
    tiny_cfg.training.device = "cpu"
    tiny_cfg.training.fold_workers = 0
    assert fold_workers(tiny_cfg) == (os.cpu_count() or 1)
    tiny_cfg.training.fold_workers = -1
    with pytest.raises(ValueError, match="fold_workers must be >= 0"):
        fold_workers(tiny_cfg)
