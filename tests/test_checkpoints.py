"""Published per-subject checkpoints: STSTNet's original architecture in the authors' key layout,
and `python -m mexp.evaluate --checkpoints` scoring one file per LOSO subject on a slice of
the real MEGC2019 flow benchmark, as a tracked run whose metrics recompute from its
predictions.csv."""
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from mexp.tracking import evaluation
from mexp import evaluate
from mexp.models import count_parameters, create_model
from tests.conftest import flow28_slice, store_at

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("sub01", "sub05", "006", "s02")          # CASME II, SAMM and SMIC: 26 samples
AUTHORS_KEYS = [f"conv{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")] + [
    f"bn{i}.{p}" for i in (1, 2, 3)
    for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")] + [
    "fc.weight", "fc.bias"]


# ---- the model -------------------------------------------------------------------------

def test_ststnet_original_has_the_authors_layout_and_size():
    model = create_model("ststnet_original", num_classes=3).eval()
    state = model.state_dict()
    assert list(state) == AUTHORS_KEYS
    assert state["conv3.weight"].shape == (8, 3, 3, 3) and state["fc.weight"].shape == (3, 400)
    assert model.conv1.padding == (2, 2)
    convs = sum(c * 3 * 3 * 3 + c for c in (3, 5, 8))            # 448
    bns = sum(2 * c for c in (3, 5, 8))                           # 32 (running stats: buffers)
    assert count_parameters(model) == convs + bns + 400 * 3 + 3 == 1683   # "about 1.7K"
    x = torch.randn(4, 3, 28, 28)
    assert model(x).shape == (4, 3) and torch.isfinite(model(x)).all()
    assert model.forward_features(x).shape == (4, 400)
    # a state_dict in the authors' layout loads strictly; mexp's own `ststnet` layout does not
    create_model("ststnet_original").load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(create_model("ststnet", num_classes=3).state_dict(), strict=True)


# ---- fixtures: a slice of the benchmark, authors'-layout checkpoints, one tracking store ----

@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory) -> Path:
    """index.csv of four subjects with their flow PNGs."""
    return flow28_slice(shared_data, tmp_path_factory.mktemp("flow28"), SUBJECTS)


def bgr_raw(root: Path, index: pd.DataFrame) -> torch.Tensor:
    """The authors' input, read as their main.py reads it: cv2.imread, float 0..255."""
    imgs = np.stack([cv2.imread(str(root / p)) for p in index["flow_png"]])
    return torch.Tensor(imgs).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def ckpts(subset, tmp_path_factory) -> Path:
    """One seeded ststnet_original state_dict per subject, saved as <subject>.pth, with batch
    norm statistics taken from the images so the predictions depend on the input."""
    d = tmp_path_factory.mktemp("ckpts")
    index = pd.read_csv(subset / "index.csv", dtype={"subject": str})
    x = bgr_raw(subset, index)
    for k, subject in enumerate(SUBJECTS):
        torch.manual_seed(100 + k)
        model = create_model("ststnet_original", num_classes=3)
        for bn in (model.bn1, model.bn2, model.bn3):
            bn.momentum = None                                  # cumulative average
        with torch.no_grad():
            model.train()(x)
        torch.save(model.state_dict(), d / f"{subject}.pth")
    return d


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for the module (see conftest.store_at)."""
    with store_at(tmp_path_factory.mktemp("store")) as uri:
        yield uri


def score(subset, ckpt_dir, out: Path, *extra) -> tuple[int, dict]:
    """The command, in-process: (exit code, the --out summary)."""
    rc = evaluate.main(["--checkpoints", str(ckpt_dir), "--model", "ststnet_original",
                        "--config", str(ROOT / "configs/megc2019_flow.yaml"), "--out", str(out),
                        *extra, f"data.root={subset}", f"data.cache_dir={out.parent / 'cache'}",
                        "training.device=cpu"])
    return rc, (json.loads(out.read_text()) if rc == 0 else {})


@pytest.fixture(scope="module")
def bgr(subset, ckpts, store, tmp_path_factory) -> dict:
    """The command with its defaults (channel order bgr), run once for the module."""
    rc, out = score(subset, ckpts, tmp_path_factory.mktemp("bgr") / "out.json")
    assert rc == 0
    return out


def predictions(run_id: str, tmp_path: Path) -> pd.DataFrame:
    return pd.read_csv(MlflowClient().download_artifacts(run_id, "predictions.csv", str(tmp_path)))


def n_runs() -> int:
    client = MlflowClient()
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


# ---- the command ---------------------------------------------------------------------------

def test_scores_each_subject_with_its_own_checkpoint(subset, ckpts, bgr, tmp_path):
    out = bgr
    assert out["subjects"] == 4 and out["channel_order"] == "bgr" and out["missing"] == []
    run = MlflowClient().get_run(out["run_id"])
    assert run.data.tags["mexp.stage"] == "evaluate_checkpoints"
    assert run.data.tags["mexp.channel_order"] == "bgr" and run.data.tags["mexp.partial"] == "false"
    assert run.data.params["checkpoints.channel_order"] == "bgr"
    assert run.data.params["checkpoints.pixel_scale"] == "raw"
    pred = predictions(out["run_id"], tmp_path)
    index = pd.read_csv(subset / "index.csv", dtype={"subject": str})
    assert len(pred) == len(index) == 26 and set(pred["sample_id"]) == set(index["sample_id"])
    assert {"sample_id", "dataset", "subject", "fold", "label", "pred", "prob_negative",
            "prob_positive", "prob_surprise", "checkpoint"} <= set(pred.columns)
    # every sample scored by its own subject's file, as the authors' main.py scores it
    index = index.set_index("sample_id").loc[pred["sample_id"]].reset_index()
    assert (pred["checkpoint"] == index["subject"] + ".pth").all()
    x = bgr_raw(subset, index)
    for subject in SUBJECTS:
        rows = np.flatnonzero(index["subject"] == subject)
        model = create_model("ststnet_original").eval()
        model.load_state_dict(torch.load(ckpts / f"{subject}.pth"), strict=True)
        with torch.no_grad():
            want = torch.softmax(model(x[rows]), 1).numpy()
        got = pred.loc[rows, ["prob_negative", "prob_positive", "prob_surprise"]].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert (pred.loc[rows, "pred"].to_numpy() == want.argmax(1)).all()
    # the logged metrics are what the metric code makes of predictions.csv
    report = evaluation.recompute(pred, ["negative", "positive", "surprise"])
    logged = run.data.metrics
    for key, value in evaluation.expected_metrics(report, "test").items():
        assert logged[key] == pytest.approx(value, abs=1e-12), key
    assert {"test/uf1", "test/uar", "test/casme2/uf1", "test/samm/uf1",
            "test/smic/uf1"} <= set(logged)
    assert evaluation.evaluate(out["run_id"])[1] == []          # `mexp.evaluate --run-id` agrees


def test_channel_order_is_an_explicit_live_option(subset, ckpts, bgr, tmp_path):
    rc, rgb = score(subset, ckpts, tmp_path / "rgb.json", "--channel-order", "rgb")
    assert rc == 0
    assert MlflowClient().get_run(rgb["run_id"]).data.tags["mexp.channel_order"] == "rgb"
    a, b = predictions(bgr["run_id"], tmp_path / "a"), predictions(rgb["run_id"], tmp_path / "b")
    probs = [c for c in a.columns if c.startswith("prob_")]
    assert not np.allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=1e-3)
    assert (a["pred"] != b["pred"]).any()


def test_a_missing_subject_is_an_error_unless_partial_is_allowed(subset, ckpts, store, tmp_path,
                                                                  capsys):
    d = tmp_path / "ckpts"
    shutil.copytree(ckpts, d)
    (d / "s02.pth").unlink()
    before = n_runs()
    rc, _ = score(subset, d, tmp_path / "out.json")
    err = capsys.readouterr().err
    assert rc == 2 and "smic/s02 (s02.pth)" in err and str(d) in err and "--allow-partial" in err
    assert n_runs() == before                                 # nothing was logged
    rc, out = score(subset, d, tmp_path / "out.json", "--allow-partial")
    assert rc == 0 and out["missing"] == ["smic/s02"] and out["subjects"] == 3
    assert MlflowClient().get_run(out["run_id"]).data.tags["mexp.partial"] == "true"
    assert "smic/s02" not in set(predictions(out["run_id"], tmp_path)["subject"])


@pytest.mark.parametrize("bad,expect", [
    (lambda: create_model("ststnet", num_classes=3).state_dict(), "missing key.*conv1.weight"),
    (lambda: create_model("ststnet_original", num_classes=4).state_dict(),
     "size mismatch for fc.weight"),
    (lambda: "not weights", "holds a str, not a state_dict"),
])
def test_a_checkpoint_of_another_layout_names_the_file(subset, ckpts, store, tmp_path, capsys,
                                                       bad, expect):
    d = tmp_path / "ckpts"
    shutil.copytree(ckpts, d)
    torch.save(bad(), d / "006.pth")
    rc, _ = score(subset, d, tmp_path / "out.json")
    err = capsys.readouterr().err
    assert rc == 2 and str(d / "006.pth") in err
    assert re.search(expect, err), err
