"""extract_flow and train_roi end to end on synthetic data through MLflow."""
import numpy as np
from mlflow.tracking import MlflowClient

from mexp import extract_flow, train_roi


def test_extract_flow_then_train_roi(tiny_cfg, tracking, tmp_path):
    cfg = tiny_cfg
    cfg.data.image_size = 64
    cfg.data.sequence_length = 8
    cfg.flow.workers = 2
    cfg.training.epochs = 3
    cfg.training.cv_folds = 3
    cfg.training.val_fraction = 0.25
    f = extract_flow.main(cfg)
    client = MlflowClient()
    run = client.get_run(f["run_id"])
    assert run.data.tags["mexp.stage"] == "extract_flow" and run.data.metrics["clips"] == 42
    d = client.download_artifacts(f["run_id"], "flow", str(tmp_path / "dl"))
    roi = np.load(f"{d}/roi_features.npy")
    img = np.load(f"{d}/flow28.npy")
    assert roi.shape == (42, 8, 14) and img.shape == (42, 28, 28, 3) and img.dtype == np.uint8
    assert np.isfinite(roi).all() and np.abs(roi[:, 0]).max() == 0     # onset: no motion yet
    again = extract_flow.main(cfg)                                      # cache: same numbers
    d2 = client.download_artifacts(again["run_id"], "flow", str(tmp_path / "dl2"))
    assert np.array_equal(np.load(f"{d2}/roi_features.npy"), roi)

    s = train_roi.main(cfg)                       # resolves the latest extract_flow run
    r = client.get_run(s["run_id"])
    assert r.data.tags["mexp.flow_run_id"] == again["run_id"]
    assert 0 <= r.data.metrics["test/uf1"] <= 1 and s["folds"] == 3
    from mexp.tracking import evaluation          # every logged metric from predictions.csv
    report, bad = evaluation.evaluate(s["run_id"])
    assert bad == [] and report["pooled"]["n"] == 42
    assert "predictions.csv" in {a.path for a in client.list_artifacts(s["run_id"])}

    # fold batching (each fold's own standardisation stacked as blocks; no dropout): the same
    # per-fold probabilities as one fold after another
    cfg.model.dropout, cfg.training.fold_workers, cfg.training.device = 0.0, 1, "cpu"
    probs = {}
    for mode in ("off", "on"):
        cfg.training.fold_batching = mode
        s = train_roi.main(cfg)
        assert client.get_run(s["run_id"]).data.tags["mexp.fold_path"] == (
            "batched on cpu" if mode == "on" else "serial")
        p = client.download_artifacts(s["run_id"], "predictions.csv", str(tmp_path / mode))
        probs[mode] = np.loadtxt(p, delimiter=",", skiprows=1, usecols=_prob_columns(p))
        assert evaluation.evaluate(s["run_id"])[1] == []
    assert np.abs(probs["on"] - probs["off"]).max() < 1e-3


def _prob_columns(path) -> list[int]:
    head = open(path).readline().strip().split(",")
    return [i for i, c in enumerate(head) if c.startswith("prob_")]


def test_normalisation_uses_training_rows_only():
    x = np.zeros((4, 2, 14), np.float32)
    x[2:] = 100.0                                  # test rows far away
    z = train_roi.standardise(x, [0, 1])
    assert np.allclose(z[:2], 0) and (z[2:] > 1e3).all()
