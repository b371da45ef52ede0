"""The field's honest MEGC2019 baselines in the registry: OFF-ApexNet, SSSNet, Dual-Inception and
the scikit-learn members (logistic regression, RBF SVM), their published shapes, and one tiny
LOSO run of each through `train_cnn.main` on a slice of the real flow28 benchmark."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from mexp.data.inputs import images
from mexp.tracking import evaluation
from mexp import train_cnn
from mexp.engine.setup import fold_plan
from mexp.config import load_config
from mexp.engine.crossval import assert_no_leak
from mexp.data.datasets import load_dataset
from mexp.models.registry import model_keys
from mexp.models import count_parameters, create_model
from tests.conftest import flow28_slice, store_at

ROOT = Path(__file__).resolve().parents[1]
NETS = ("off_apexnet", "sssnet", "dual_inception")
ESTIMATORS = ("logreg", "svm_rbf")
SUBJECTS = ("sub06", "016", "s15")     # CASME II, SAMM, SMIC: 13 samples, all 3 classes in each


# ---- shapes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NETS + ESTIMATORS)
@pytest.mark.parametrize("size", (28, 64))
def test_forward_shape_and_no_nan_at_28_and_64(name, size):
    torch.manual_seed(0)
    shape = {"num_classes": 3, "input_channels": 3}        # the estimators take no channel count
    model = create_model(name, **{k: v for k, v in shape.items() if k in model_keys(name)}).eval()
    x = torch.randn(4, 3, size, size)
    logits = model(x)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()
    assert model.num_classes == 3 and torch.isfinite(model.forward_features(x)).all()


@pytest.mark.parametrize("name,kwargs,expected", [
    # two streams of [5x5 conv 6, pool, 5x5 conv 16, pool] -> 1568 -> 1024 -> 1024 -> 3: 2.66M
    ("off_apexnet", {}, 2 * (6 * 25 + 6 + 16 * 6 * 25 + 16) + 1568 * 1024 + 1024
     + 1024 * 1024 + 1024 + 1024 * 3 + 3),
    # meb's SSSNet at its paper's 64x64 input: 9x9x64 -> 256 -> 3: 1.35M
    ("sssnet", dict(image_size=64), 3 * 32 * 25 + 32 + 64 + 32 * 64 * 9 + 64 + 128
     + 9 * 9 * 64 * 256 + 256 + 256 * 3 + 3),
    # per stream inception(1 -> 4x6) + inception(24 -> 4x16), 6272 -> 1024 -> 3: 6.45M
    ("dual_inception", {}, 2 * (1284 + 10336) + 6272 * 1024 + 1024 + 1024 * 3 + 3),
])
def test_parameter_counts_match_the_papers(name, kwargs, expected):
    n = count_parameters(create_model(name, num_classes=3, **kwargs))
    assert n == expected
    published = {"off_apexnet": 2.66e6, "sssnet": 1.35e6, "dual_inception": 6.45e6}[name]
    assert abs(n - published) < 0.005e6


def test_two_stream_nets_ignore_the_strain_channel():
    for name in ("off_apexnet", "dual_inception"):
        torch.manual_seed(0)
        model = create_model(name, num_classes=3).eval()
        x = torch.randn(2, 3, 28, 28)
        y = x.clone()
        y[:, 2] = torch.randn(2, 28, 28)
        assert torch.equal(model(x), model(y))
        assert not torch.equal(model(x), model(torch.flip(x, [-1])))
        with pytest.raises(ValueError, match="input_channels must be >= 2"):
            create_model(name, input_channels=1)


# ---- the scikit-learn members --------------------------------------------------------------

def _blobs(n=60, d=48, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, 3, 4, 4)) + y[:, None, None, None] * rng.normal(size=(1, 3, 4, 4))
    return x.astype(np.float32), y


def test_logreg_and_svm_reproduce_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC
    x, y = _blobs()
    xt, _ = _blobs(seed=1)
    z = x.reshape(len(x), -1).astype(np.float64)
    mean, sd = z.mean(0), z.std(0)
    zt = (xt.reshape(len(xt), -1) - mean) / sd
    lr = create_model("logreg", num_classes=3).fit_numpy(x, y)
    ref = LogisticRegression(max_iter=2000).fit((z - mean) / sd, y)
    assert np.allclose(lr.predict_proba_numpy(xt), ref.predict_proba(zt), atol=1e-4)
    svm = create_model("svm_rbf", num_classes=3).fit_numpy(x, y)
    ref = SVC(gamma=float(svm.gamma)).fit((z - mean) / sd, y)
    ours = svm(torch.as_tensor(xt)).detach().numpy()
    assert np.allclose(ours, ref.decision_function(zt), atol=1e-3)
    assert (ours.argmax(1) == ref.predict(zt)).all()


def test_estimators_handle_absent_classes_and_round_trip_their_state():
    x, y = _blobs()
    two = y != 1                                              # class 1 absent from training
    for name in ESTIMATORS:
        model = create_model(name, num_classes=4).fit_numpy(x[two], y[two], np.ones(4))
        p = model.predict_proba_numpy(x)
        assert p.shape == (60, 4) and np.isfinite(p).all() and p[:, [1, 3]].max() < 1e-6
        assert (p.argmax(1)[two] == y[two]).mean() > 0.9
        fresh = create_model(name, num_classes=4)
        fresh.load_state_dict(model.state_dict())             # fitted shapes are data-dependent
        assert np.array_equal(fresh.predict_proba_numpy(x), p)
        one = create_model(name, num_classes=3).fit_numpy(x[y == 2], y[y == 2])
        assert (one.predict_proba_numpy(x).argmax(1) == 2).all()


# ---- end to end on a slice of the real benchmark -------------------------------------------

@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory) -> Path:
    """index.csv of three subjects (one per database) with their flow PNGs."""
    return flow28_slice(shared_data, tmp_path_factory.mktemp("flow28"), SUBJECTS)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite tracking store for the module (see conftest.store_at)."""
    with store_at(tmp_path_factory.mktemp("store")) as uri:
        yield uri


def _cfg(name: str, root: Path, *extra):
    return load_config(ROOT / "configs/megc2019_flow.yaml", [
        f"model.name={name}", f"data.root={root}", "repeats=1", "training.epochs=1",
        "training.fold_workers=1", "training.device=cpu", "output.local=false", *extra])


@pytest.mark.parametrize("name", ("sssnet", "dual_inception"))   # off_apexnet: the full run below
def test_every_net_runs_a_fold_of_the_benchmark(name, subset):
    """The fold recipe as train_cnn builds it (build_cnn, augmentation, fit_and_score)."""
    cfg = _cfg(name, subset)
    cs = load_dataset(cfg.data)
    plan = fold_plan(cfg, cs.table["sample_id"], cs.groups, cs.labels, cs.table["dataset"])
    fold = plan.folds[0]
    out = train_cnn.make_fold_fn(cfg, cs, images(cfg, cs))(0, fold)
    assert out.probs.shape == (len(fold.test_ids), 3) and np.isfinite(out.probs).all()
    assert out.fit.best_epoch == 1 and len(out.fit.history) == 1
    assert_no_leak(fold, out, dict(zip(cs.table["sample_id"], cs.groups)))


@pytest.mark.parametrize("name", ("off_apexnet",) + ESTIMATORS)
def test_loso_through_train_cnn(name, subset, store, tmp_path):
    out = train_cnn.main(_cfg(name, subset))
    assert out["folds"] == len(SUBJECTS) and np.isfinite([out["uf1"], out["uar"]]).all()
    assert set(out["per_database"]) == {"casme2", "samm", "smic"}
    client = MlflowClient()
    pred = pd.read_csv(client.download_artifacts(out["run_id"], "predictions.csv", str(tmp_path)))
    ids = pd.read_csv(subset / "index.csv")["sample_id"]
    assert sorted(pred["sample_id"]) == sorted(ids)
    probs = pred.filter(like="prob_").to_numpy()
    assert probs.shape == (len(ids), 3) and np.isfinite(probs).all()
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert set(pred["best_epoch"]) == ({0} if name in ESTIMATORS else {1})
    report, bad = evaluation.evaluate(out["run_id"])
    assert bad == [] and report["pooled"]["n"] == len(ids)
    if name == "svm_rbf":       # resuming the finished run recomputes nothing: same metrics
        again = train_cnn.main(_cfg(name, subset, f"resume_run_id={out['run_id']}"))
        assert again["run_id"] == out["run_id"]
        assert (again["uf1"], again["uar"]) == (out["uf1"], out["uar"])
