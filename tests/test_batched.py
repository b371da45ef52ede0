"""Fold batching (#15): R replicas trained in lockstep give what the serial engine gives, per
replica, with the same initial weights and batch order (no augmentation, no dropout):
different training-set sizes (one replica skips a batch of one, one runs more steps),
BatchNorm, adam / adamw / sgd, with and without a validation split."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from mexp.data.inputs import images_to_tensor, make_augment
from mexp.engine import batched as fb
from mexp.engine import training as engine
from mexp.engine.stacked import augment_inputs
from mexp.models import create_model

TOL = 1e-5


class TinyNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        # conv(bias) -> ReLU -> BN as in STSTNet; a bias straight before BN would get a ~0
        # gradient whose rounding noise Adam amplifies to +-lr steps (ill-posed to compare)
        self.f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                               nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1, bias=False),
                               nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten())
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.head(self.f(x))


def tcfg(**kw):
    base = dict(epochs=4, batch_size=8, lr=3e-3, optimizer="adam", weight_decay=1e-3,
                early_stopping=0, class_weighted=True, device="cpu")
    base.update(kw)
    return SimpleNamespace(**base)


def data(n=70, side=8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 256, (n, side, side, 3)).astype(np.uint8)
    x[..., 0] = np.clip(x[..., 0].astype(int) + 60 * (y[:, None, None] - 1), 0, 255)
    return x, y


def replicas(n, with_val, seed0=5):
    """Train sizes 33 (bs 8: last batch of 1, skipped), 20, 45 (most steps), 12."""
    perm = np.random.default_rng(123).permutation(n)
    out = []
    for r, ntr in enumerate((33, 20, 45, 12)):
        p = np.roll(perm, 11 * r)
        nva = (6 + r) if with_val else 0
        out.append(fb.Replica(train_idx=p[:ntr], val_idx=p[ntr:ntr + nva],
                              test_idx=p[ntr + nva:ntr + nva + 9 + r], seed=seed0 + 3 * r))
    return out


def serial(make_model, x, y, reps, cfg, to_input=images_to_tensor):
    """Each replica's serial fit: [(FitResult, test probabilities)]."""
    out = []
    for rep in reps:
        engine.set_seed(rep.seed)
        model = make_model()
        val = (x[rep.val_idx], y[rep.val_idx]) if len(rep.val_idx) else None
        res = engine.fit(model, (x[rep.train_idx], y[rep.train_idx]), val, cfg, 3,
                         to_input, None, seed=rep.seed)
        probs = engine.predict_proba(model, x[rep.test_idx], to_input, cfg.batch_size,
                                     torch.device("cpu"))
        out.append((res, probs))
    return out


def compare(make_model, cfg, with_val, n=70):
    x, y = data(n)
    reps = replicas(n, with_val)
    got = fb.fit_batched(make_model, x, y, reps, cfg, 3, images_to_tensor, device="cpu")
    want = serial(make_model, x, y, reps, cfg)
    worst = 0.0
    for g, (res, probs) in zip(got, want):
        assert g.probs.shape == probs.shape
        worst = max(worst, float(np.abs(g.probs - probs).max()))
        assert g.best_epoch == res.best_epoch
        assert g.selected_on == res.selected_on
        assert len(g.history) == len(res.history)
        assert list(g.state) == list(res.state)
        for k in res.state:
            assert torch.allclose(g.state[k].double(), res.state[k].double(), atol=1e-4), k
        for gh, wh in zip(g.history, res.history):
            assert set(gh) == set(wh)
            for k in wh:
                assert abs(gh[k] - wh[k]) < 1e-4, (k, gh[k], wh[k])
    print(f"max |p_batched - p_serial| = {worst:.3g}; best epochs "
          f"{[g.best_epoch for g in got]} of {[len(g.history) for g in got]}")
    assert worst < TOL
    return worst


@pytest.mark.parametrize("opt", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("with_val", [False, True])
def test_tiny_bn_net_matches_serial(opt, with_val):
    cfg = tcfg(optimizer=opt, lr=0.05 if opt == "sgd" else 3e-3,
               early_stopping=1 if with_val else 0, epochs=4 if with_val else 3)
    compare(TinyNet, cfg, with_val)


def test_unweighted_no_decay():
    compare(TinyNet, tcfg(class_weighted=False, weight_decay=0.0), False)


@pytest.mark.parametrize("opt,with_val", [("adamw", False), ("adam", True)])
def test_ststnet_matches_serial(opt, with_val):
    make = lambda: create_model("ststnet", num_classes=3, input_channels=3)  # noqa: E731
    x, y = data(70, side=28)
    reps = replicas(70, with_val)
    cfg = tcfg(optimizer=opt, epochs=4, early_stopping=1 if with_val else 0, lr=1e-3,
               weight_decay=1e-4)
    got = fb.fit_batched(make, x, y, reps, cfg, 3, images_to_tensor, device="cpu")
    want = serial(make, x, y, reps, cfg)
    worst = max(float(np.abs(g.probs - p).max()) for g, (_, p) in zip(got, want))
    print(f"ststnet max |p_batched - p_serial| = {worst:.3g}; best epochs "
          f"{[g.best_epoch for g in got]} of {[len(g.history) for g in got]}")
    assert [g.best_epoch for g in got] == [r.best_epoch for r, _ in want]
    assert worst < TOL


@pytest.mark.parametrize("net,opt,with_val", [("ststnet", "adam", True),
                                              ("tiny", "sgd", True), ("tiny", "adamw", False)])
def test_float64_is_exact(net, opt, with_val):
    """In float64 the batched and serial runs agree to ~1e-14: the float32 differences above
    are rounding (grouped vs single convolutions, reduction order), not semantics.
    (Unweighted: the engine's float32 class weights do not mix with float64 logits.)"""
    dt = torch.float64

    def make():
        m = create_model("ststnet", num_classes=3, input_channels=3) if net == "ststnet" \
            else TinyNet()
        return m.to(dt)

    def to_input(x):
        return images_to_tensor(x).to(dt)

    side = 28 if net == "ststnet" else 8
    x, y = data(70, side=side)
    reps = replicas(70, with_val)
    cfg = tcfg(optimizer=opt, lr=0.05 if opt == "sgd" else 3e-3, epochs=4,
               early_stopping=1 if with_val else 0, class_weighted=False)
    got = fb.fit_batched(make, x, y, reps, cfg, 3, to_input, device="cpu")
    worst = 0.0
    for g, (res, p) in zip(got, serial(make, x, y, reps, cfg, to_input)):
        worst = max(worst, float(np.abs(g.probs - p).max()))
        assert g.best_epoch == res.best_epoch and len(g.history) == len(res.history)
    print(f"float64 {net} {opt}: max |p_batched - p_serial| = {worst:.3g}")
    assert worst < 1e-10


def test_initial_states_are_used():
    """Serial models built by loading each replica's initial state (not by re-seeding)."""
    x, y = data(70)
    reps = replicas(70, False)
    torch.manual_seed(99)
    inits = [TinyNet().state_dict() for _ in reps]
    cfg = tcfg()
    got = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor, device="cpu",
                         initial_states=inits)
    for g, rep, init in zip(got, reps, inits):
        m = TinyNet()
        m.load_state_dict(init)
        engine.fit(m, (x[rep.train_idx], y[rep.train_idx]), None, cfg, 3, images_to_tensor,
                   seed=rep.seed)
        p = engine.predict_proba(m, x[rep.test_idx], images_to_tensor, 8, torch.device("cpu"))
        assert np.abs(g.probs - p).max() < TOL


def test_per_replica_lr_and_frozen_replica():
    """Per-replica lr / weight decay; a replica with lr 0 and no decay keeps its weights."""
    x, y = data(70)
    reps = replicas(70, False)
    reps[1].lr, reps[1].weight_decay = 0.0, 0.0
    reps[2].lr, reps[3].weight_decay = 1e-2, 0.1
    cfg = tcfg(optimizer="adamw")
    got = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor, device="cpu")
    engine.set_seed(reps[1].seed)
    init = TinyNet().state_dict()
    for k, v in init.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(got[1].state[k], v), k
    for r, rep in enumerate(reps):
        c = tcfg(optimizer="adamw", lr=rep.lr if rep.lr is not None else cfg.lr,
                 weight_decay=rep.weight_decay if rep.weight_decay is not None
                 else cfg.weight_decay)
        (_, p), = serial(TinyNet, x, y, [rep], c)
        assert np.abs(got[r].probs - p).max() < 1e-4


def test_augment_matches_numpy_make_augment():
    """Given the same draws, the device augmentation equals make_augment('flow') on uint8
    images followed by images_to_tensor."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 7, 9, 3)).astype(np.uint8)
    flip = rng.random(10) < 0.5
    shifts = rng.integers(-2, 3, (10, 2))

    class Replay:                                   # feeds make_augment these draws
        def __init__(self):
            self.i = 0

        def random(self, n):
            return np.where(flip, 0.25, 0.75)

        def integers(self, lo, hi, n):
            self.i += 1
            return shifts[self.i - 1]

    want = images_to_tensor(make_augment("flow")(x, Replay()))
    t = images_to_tensor(x)[None]                    # (1, 10, C, H, W): R=1, B=10
    got = augment_inputs(t, torch.as_tensor(flip)[None], torch.as_tensor(shifts[:, 0])[None],
                            torch.as_tensor(shifts[:, 1])[None], negate_channel=0)[0]
    assert torch.equal(got, want)
    want_f = images_to_tensor(make_augment("frames")(x, Replay()))
    got_f = augment_inputs(t, torch.as_tensor(flip)[None], torch.as_tensor(shifts[:, 0])[None],
                              torch.as_tensor(shifts[:, 1])[None], negate_channel=None)[0]
    assert torch.equal(got_f, want_f)


def test_augmented_run_trains_and_is_reproducible():
    x, y = data(70, side=28)
    reps = replicas(70, False)
    make = lambda: create_model("ststnet", num_classes=3, input_channels=3)  # noqa: E731
    a = fb.fit_batched(make, x, y, reps, tcfg(epochs=2), 3, images_to_tensor, "flow",
                       device="cpu")
    b = fb.fit_batched(make, x, y, reps[:2], tcfg(epochs=2), 3, images_to_tensor, "flow",
                       device="cpu")
    for g, h in zip(a[:2], b):            # a replica's run does not depend on its neighbours
        assert np.abs(g.probs - h.probs).max() < TOL
    assert all(np.isfinite(g.probs).all() for g in a)


def test_a_stage_trains_its_folds_batched_as_it_does_one_by_one(shared_data, tmp_path):
    """train_cnn on four real MEGC2019 subjects (LOSO, STSTNet) with fold batching on and off:
    without augmentation and dropout every fold's test probabilities agree, the run says which
    path it took, and `mexp.evaluate` reproduces the batched run's metrics (its fold runs
    logged by two worker processes)."""
    from pathlib import Path

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from mexp import train_cnn
    from mexp.config import load_config
    from mexp.tracking import evaluation
    from tests.conftest import flow28_slice, store_at
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    data_root = flow28_slice(shared_data, tmp_path / "data", ("sub06", "sub17", "016", "s15"))
    got = {}
    with store_at(tmp_path):
        for mode in ("off", "on"):
            cfg = load_config(root / "configs/megc2019_flow.yaml", [
                f"data.root={data_root}", "repeats=1", "training.epochs=3",
                f"output.local={mode == 'on'}", f"output.dir={tmp_path / 'out'}",
                "training.fold_workers=1", "training.device=cpu", "data.augmentation=false",
                "model.dropout=0", f"training.fold_batching={mode}",
                f"tracking.log_workers={2 if mode == 'on' else 0}"])   # on: logged by processes
            s = train_cnn.main(cfg)
            client = MlflowClient()
            tags = client.get_run(s["run_id"]).data.tags
            assert tags["mexp.fold_path"] == ("batched on cpu" if mode == "on" else "serial")
            assert tags["mexp.fold_logging"] == ("2 processes" if mode == "on" else "a thread")
            assert tags.get("mexp.fold_steps") == ("eager" if mode == "on" else None)
            folds = client.search_runs([client.get_run(s["run_id"]).info.experiment_id],
                                       f"tags.mlflow.parentRunId = '{s['run_id']}'")
            assert len(folds) == 4 and {f.info.status for f in folds} == {"FINISHED"}
            if mode == "on":        # the processes wrote each fold's local files too
                assert len(list((tmp_path / "out").glob("fold_*/best_model.pth"))) == 4
            got[mode] = pd.read_csv(client.download_artifacts(
                s["run_id"], "predictions.csv", str(tmp_path / mode))).sort_values("sample_id")
            report, bad = evaluation.evaluate(s["run_id"])
            assert bad == [] and report["pooled"]["n"] == s["n"] == 44
    cols = [c for c in got["on"].columns if c.startswith("prob_")]
    diff = np.abs(got["on"][cols].to_numpy() - got["off"][cols].to_numpy()).max()
    assert diff < 1e-3, diff        # float32 rounding of stacked vs single convolutions, trained
    assert (got["on"]["pred"].to_numpy() == got["off"]["pred"].to_numpy()).all()
    assert (got["on"]["fold"].to_numpy() == got["off"]["fold"].to_numpy()).all()


def test_repeats_train_every_seed_in_one_vectorised_model(shared_data, tmp_path, batched_fits):
    """`repeats` with fold batching: the second seed's folds train in the first repeat's
    vectorised model (one fit for 2 seeds x 4 folds) and give what that seed gives alone."""
    from pathlib import Path

    import pandas as pd
    from mlflow.tracking import MlflowClient

    from mexp import train_cnn
    from mexp.config import load_config
    from tests.conftest import flow28_slice, store_at
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    data_root = flow28_slice(shared_data, tmp_path / "data", ("sub06", "sub17", "016", "s15"))
    base = [f"data.root={data_root}", "training.epochs=3", "output.local=false",
            "training.device=cpu", "data.augmentation=false", "model.dropout=0",
            "training.fold_batching=on"]
    preds = lambda rid, d: pd.read_csv(MlflowClient().download_artifacts(  # noqa: E731
        rid, "predictions.csv", str(tmp_path / d))).sort_values("sample_id")
    with store_at(tmp_path):
        both = train_cnn.main(load_config(root / "configs/megc2019_flow.yaml",
                                          base + ["repeats=2", "training.seed=5"]))
        seeds = [sorted({r.seed for r in reps}) for reps in batched_fits]
        assert seeds == [[5, 6, 7, 8, 9]], seeds       # 4 folds x seeds 5 and 6: s + k
        alone = train_cnn.main(load_config(root / "configs/megc2019_flow.yaml",
                                           base + ["repeats=1", "training.seed=6"]))
        assert sorted({r.seed for r in batched_fits[1]}) == [6, 7, 8, 9]
        assert len(batched_fits) == 2
        second = preds(both["repeats"][1]["run_id"], "second")
        solo = preds(alone["run_id"], "solo")
    cols = [c for c in solo.columns if c.startswith("prob_")]
    assert np.abs(second[cols].to_numpy() - solo[cols].to_numpy()).max() < 1e-3
    assert (second["pred"].to_numpy() == solo["pred"].to_numpy()).all()


@pytest.mark.slow
def test_batched_and_serial_accuracy_agree_within_seed_noise(tmp_path):
    """#15's statistical test, on a synthetic set with augmentation (the two paths draw other
    random numbers): pooled LOSO UF1 over 6 seeds a path, Welch's t-test p > 0.01; and the
    test has power: the batched path on shuffled labels is told apart (3 seeds, p < 0.01)."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "bench"
    p = {}
    for control in (False, True):
        out = subprocess.run([sys.executable, "batching_noise.py", "--seeds",
                              "3" if control else "6", "--epochs", "10",
                              "--workdir", str(tmp_path)] + ["--control"] * control,
                             cwd=bench, capture_output=True, text=True, timeout=1500)
        assert out.returncode == 0, out.stderr[-2000:]
        p[control] = float(re.search(r"Welch p = ([0-9.]+)", out.stdout).group(1))
    assert p[False] > 0.01 and p[True] < 0.01, (p, out.stdout)


@pytest.mark.parametrize("recipe,dtype", [
    (dict(mixup=0.4), "float64"), (dict(ema=0.9), "float64"), (dict(swa_epochs=2), "float64"),
    (dict(ema=0.8, mixup=0.3), "float32"), (dict(swa_epochs=3, mixup=0.2), "float32")])
def test_recipes_batched_match_serial(recipe, dtype):
    """Mixup, the weight EMA and SWA (`mexp.engine.recipes`) batched give each replica what
    its serial fit gives: the same mixup draws from its own rng, the EMA of its own steps
    (validated and kept when there is a split), SWA's mean of its last epochs with BatchNorm
    statistics recomputed on its own training rows; different training-set sizes and a
    skipped batch of one included."""
    dt = getattr(torch, dtype)
    with_val = "swa_epochs" not in recipe          # SWA keeps the final epoch only

    def make():
        return TinyNet().to(dt)

    def to_input(x):
        return images_to_tensor(x).to(dt)

    x, y = data(70)
    reps = replicas(70, with_val)
    cfg = tcfg(**{"epochs": 4, "early_stopping": 1 if with_val else 0,
                  "class_weighted": dtype == "float32", **recipe})
    got = fb.fit_batched(make, x, y, reps, cfg, 3, to_input, device="cpu")
    worst = 0.0
    for g, (res, p) in zip(got, serial(make, x, y, reps, cfg, to_input)):
        worst = max(worst, float(np.abs(g.probs - p).max()))
        assert g.best_epoch == res.best_epoch and len(g.history) == len(res.history)
        for k in res.state:
            assert torch.allclose(g.state[k].double(), res.state[k].double(), atol=1e-4), k
        for gh, wh in zip(g.history, res.history):
            assert abs(gh["train/loss"] - wh["train/loss"]) < 1e-4
    print(f"{recipe} {dtype}: max |p_batched - p_serial| = {worst:.3g}")
    assert worst < (1e-10 if dtype == "float64" else TOL)


def test_recipes_change_what_batched_training_keeps():
    """The recipes are not silently ignored by the batched path."""
    x, y = data(70)
    reps = replicas(70, False)
    plain = fb.fit_batched(TinyNet, x, y, reps, tcfg(), 3, images_to_tensor, device="cpu")
    for recipe in (dict(mixup=0.4), dict(ema=0.9), dict(swa_epochs=2)):
        other = fb.fit_batched(TinyNet, x, y, reps, tcfg(**recipe), 3, images_to_tensor,
                               device="cpu")
        assert max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(plain, other)) > 1e-3


@pytest.mark.parametrize("layers,bidirectional,batch_first", [(2, False, True), (1, True, False)])
def test_unrolled_lstm_is_torch_lstm(layers, bidirectional, batch_first):
    """The vmap-able LSTM (`stacked.UnrolledLSTM`) computes what nn.LSTM computes, with the
    same parameters: outputs, final states and gradients, with and without initial states."""
    from mexp.engine.stacked import UnrolledLSTM
    torch.manual_seed(0)
    ref = nn.LSTM(5, 4, layers, batch_first=batch_first, bidirectional=bidirectional).double()
    mine = UnrolledLSTM(ref)
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    if not batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    d = 2 if bidirectional else 1
    h0 = (torch.randn(layers * d, 3, 4, dtype=torch.float64),
          torch.randn(layers * d, 3, 4, dtype=torch.float64))
    for hc in (None, h0):
        (o1, (h1, c1)), (o2, (h2, c2)) = ref(x, hc), mine(x, hc)
        for a, b in ((o1, o2), (h1, h2), (c1, c2)):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
        g1 = torch.autograd.grad(o1.square().sum(), [x, ref.weight_hh_l0])
        g2 = torch.autograd.grad(o2.square().sum(), [x, mine.weight_hh_l0])
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-10)


def test_lstm_replicas_match_serial():
    """The stage-2 LSTM, batched (unrolled under vmap), gives each replica what its serial fit
    gives in float64."""
    dt = torch.float64
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(70, 6, 12)), rng.integers(0, 3, 70)

    def make():
        return create_model("lstm", num_classes=3, input_dim=12, hidden_size=8,
                            dropout=0.0).to(dt)

    def to_input(a):
        return torch.as_tensor(a, dtype=dt)

    reps = replicas(70, True)
    cfg = tcfg(epochs=3, early_stopping=1, class_weighted=False)
    got = fb.fit_batched(make, x, y, reps, cfg, 3, to_input, device="cpu")
    for g, (res, p) in zip(got, serial(make, x, y, reps, cfg, to_input)):
        assert g.best_epoch == res.best_epoch
        assert np.abs(g.probs - p).max() < 1e-10


@pytest.mark.parametrize("kw", [
    dict(optimizer="adamw", lr=0.05, epochs=8, early_stopping=1, with_val=True),  # some stop
    dict(optimizer="sgd", lr=0.05, mixup=0.3, ema=0.9, with_val=False),
    dict(optimizer="adam", swa_epochs=2, augment="frames", with_val=False)])
def test_static_step_path_equals_the_eager_loop(kw):
    """The step a CUDA graph replays (`graphs='static'`: the epoch plan copied into buffers
    allocated once, each step reading its slice by a device counter) computes exactly what
    the plain eager loop does, bit for bit: the same batches, draws, optimizer state, BatchNorm
    statistics, recipes, and epochs with fewer steps once replicas stop early."""
    kw = dict(kw)
    with_val, augment = kw.pop("with_val"), kw.pop("augment", None)
    x, y = data(70)
    reps = replicas(70, with_val)
    cfg = tcfg(**{"epochs": 4, **kw})
    eager = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor, augment=augment,
                           device="cpu")
    static = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor, augment=augment,
                            device="cpu", graphs="static")
    assert {r.step_path for r in eager} == {"eager"}
    assert {r.step_path for r in static} == {"static"}
    if with_val:      # the early stop happened, so later epochs planned fewer steps
        assert len({len(r.history) for r in eager}) > 1
    for a, b in zip(eager, static):
        assert np.array_equal(a.probs, b.probs)
        assert a.best_epoch == b.best_epoch and a.history == b.history
        for k in a.state:
            assert torch.equal(a.state[k], b.state[k]), k


def test_each_replicas_weights_own_their_storage():
    """A replica's weights are handed to the fold logger (a worker process, pickled): each
    tensor holds only its replica's values, not a view of the stacked (R, ...) tensor."""
    x, y = data(70)
    out = fb.fit_batched(TinyNet, x, y, replicas(70, False), tcfg(epochs=1), 3,
                         images_to_tensor, device="cpu")
    for r in out:
        for k, v in r.state.items():
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k


def test_cuda_graphs_setting():
    """`training.cuda_graphs: false` keeps eager steps; graphs are only asked of CUDA."""
    x, y = data(30)
    reps = [fb.Replica(np.arange(20), None, np.arange(20, 30), seed=1)]
    with pytest.raises(ValueError, match="CUDA device"):
        fb.fit_batched(TinyNet, x, y, reps, tcfg(epochs=1), 3, images_to_tensor,
                       device="cpu", graphs="cuda")
    with pytest.raises(ValueError, match="graphs must be"):
        fb.fit_batched(TinyNet, x, y, reps, tcfg(epochs=1), 3, images_to_tensor,
                       device="cpu", graphs="yes")
    for flag in (True, False):        # on the CPU 'auto' is eager either way
        out = fb.fit_batched(TinyNet, x, y, reps, tcfg(epochs=1, cuda_graphs=flag), 3,
                             images_to_tensor, device="cpu")
        assert out[0].step_path == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [dict(optimizer="adamw", augment="flow"),
                                dict(optimizer="sgd", lr=0.05, mixup=0.3, ema=0.9)])
def test_cuda_graph_replays_the_eager_steps(kw):
    """On CUDA the step is captured once and replayed: the run says so, and its predictions
    equal the eager steps' (float32, cuDNN's choices aside) for STSTNet on flow images."""
    kw = dict(kw)
    augment = kw.pop("augment", None)
    rng = np.random.default_rng(0)
    n = 90
    x = rng.normal(size=(n, 3, 28, 28)).astype(np.float32)
    y = rng.integers(0, 3, n)
    x[:, 0] += (y - 1)[:, None, None]
    reps = [fb.Replica(np.delete(np.arange(n), np.arange(r, n, 6)), None,
                       np.arange(r, n, 6), seed=r) for r in range(6)]
    cfg = tcfg(epochs=3, batch_size=16, **kw)
    out = {}
    for g in ("auto", None):
        out[g] = fb.fit_batched(lambda: create_model("ststnet", num_classes=3), x, y, reps,
                                cfg, 3, torch.as_tensor, augment=augment, device="cuda",
                                graphs=g)
    assert {r.step_path for r in out["auto"]} == {"cuda graph"}
    worst = max(float(np.abs(a.probs - b.probs).max()) for a, b in zip(out["auto"], out[None]))
    assert worst < 1e-4, worst


def test_augmentation_on_or_off_per_replica():
    """`Replica.augment`: in one fit, a replica without augmentation trains as in a fit without
    any (it draws no augmentation numbers), and one with it as in a fit where all augment."""
    x, y = data(70)
    reps = replicas(70, False)
    cfg = tcfg(epochs=3)
    mixed = [fb.Replica(r.train_idx, r.val_idx, r.test_idx, r.seed, augment=bool(i % 2))
             for i, r in enumerate(reps)]
    got = fb.fit_batched(TinyNet, x, y, mixed, cfg, 3, images_to_tensor, augment="frames",
                         device="cpu")
    plain = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor, device="cpu")
    augmented = fb.fit_batched(TinyNet, x, y, reps, cfg, 3, images_to_tensor,
                               augment="frames", device="cpu")
    for i, g in enumerate(got):
        want = augmented[i] if i % 2 else plain[i]
        other = plain[i] if i % 2 else augmented[i]
        assert np.abs(g.probs - want.probs).max() < TOL
        assert np.abs(g.probs - other.probs).max() > 1e-3      # augmentation did change it


def test_fold_logging_processes_auto(monkeypatch):
    """`tracking.log_workers: 0` logs a batched run's folds in up to 4 processes, leaving 2
    cores, on machines with 4 or more; one thread otherwise; a number is taken as given."""
    import os

    from mexp.tracking.folds import log_workers
    for cpus, batched, want in ((16, True, 4), (16, False, 1), (5, True, 3), (4, True, 2),
                                (2, True, 1), (None, True, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        assert log_workers(0, batched) == want, (cpus, batched)
    assert log_workers(3, False) == 3 and log_workers(1, True) == 1


class _FakeCuda:
    """Stand-ins for torch.cuda's streams and graphs, so `_graphed_epoch`'s CUDA branch runs on
    the CPU: a "capture" runs the step and then puts every state tensor back (recorded, not
    run), a replay runs it; or the capture fails."""

    def __init__(self, ls, fail: bool):
        self.ls, self.fail, self.captures, self.replays = ls, fail, 0, 0

    def state(self):
        ls = self.ls
        ts = [ls.opt.flat, ls.total, ls._ctr, *ls.buffers.values(),
              *(t for st in ls.opt.state.values() for t in st.values())]
        if ls.averaging:
            ts += [*ls.avg_p.values(), *ls.avg_b.values()]
        return ts

    def install(self, monkeypatch):
        from contextlib import contextmanager, nullcontext
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                fake.ls._static_step()

        @contextmanager
        def graph(g, stream=None):
            if fake.fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            saved = [t.clone() for t in fake.state()]
            yield
            for t, s in zip(fake.state(), saved):
                t.copy_(s)
            fake.captures += 1

        class Stream:
            def __init__(self, *a):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


@pytest.mark.parametrize("fail", [False, True])
def test_graphed_epochs_control_flow_on_the_cpu(monkeypatch, fail):
    """`_graphed_epoch` with torch.cuda's graph API stood in for: three warm-up steps, one
    capture, replays for every later step of this epoch and the next ones (fewer once replicas
    stop early), or after a failed capture eager steps; either way every replica ends bit for
    bit where the eager loop does, and the run says how its steps ran."""
    x, y = data(70)
    reps = replicas(70, True)
    cfg = tcfg(optimizer="adamw", lr=0.05, epochs=8, early_stopping=1, ema=0.9)

    def run(graphs):
        ls = fb.Lockstep(TinyNet, x, y, reps, cfg, 3, images_to_tensor, None,
                         torch.device("cpu"), None, 256, None, None)
        fake = None
        if graphs:
            ls.graphs = "cuda"              # as on a CUDA device
            fake = _FakeCuda(ls, fail)
            fake.install(monkeypatch)
        steps = []
        for epoch in range(1, ls.epochs + 1):
            live = np.flatnonzero(~ls.done)
            if not len(live):
                break
            plan = ls.plan_epoch(live)
            steps.append(plan["S"])
            ls.run_epoch(plan)
            ls.end_epoch(epoch)
            rows = {r: {"epoch": epoch} for r in live}
            ls.validate(epoch, live, rows)
            for r in live:
                ls.results[r].history.append(rows[r])
                if ls.stale[r] >= ls.patience:
                    ls.done[r] = True
            if epoch == 3:                  # the replica with the most steps stops
                ls.done[2] = True
        monkeypatch.undo()
        return ls, ls.finish(), fake, steps

    _, want, _, steps = run(False)
    ls, got, fake, steps_g = run(True)
    assert steps_g == steps and len(set(steps)) > 1          # later epochs had fewer steps
    if fail:
        assert fake.captures == 0 and fake.replays == 0 and ls._graph is None
        assert "operation not permitted" in ls.graph_error and ls.graphs is None
    else:
        assert fake.captures == 1 and ls.graph_error is None
        assert fake.replays == sum(steps) - fb.GRAPH_WARMUP   # every step after the warm-up
    for a, b in zip(want, got):
        assert np.array_equal(a.probs, b.probs) and a.best_epoch == b.best_epoch
        for k in a.state:
            assert torch.equal(a.state[k], b.state[k]), k


# aten ops that need the host mid-step (a value read back, an output sized by the data, a
# tensor made from Python data and copied over): under CUDA graph capture they fail it, or the
# graph would replay a stale value
_HOST_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "masked_scatter",
             "is_nonzero", "equal", "unique", "_unique2", "unique_consecutive", "bincount",
             "_assert_async", "lift_fresh", "repeat_interleave", "allclose"}


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op that runs (below vmap and grad), and those that need the host."""
    def __init__(self):
        super().__init__()
        self.n, self.host = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        name = func.overloadpacket.__name__
        if name in _HOST_OPS or (name.startswith("index") and len(args) > 1 and isinstance(
                args[1], (list, tuple)) and any(t is not None and t.dtype == torch.bool
                                                for t in args[1])):
            self.host.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name,kw,aug", [
    ("tiny", dict(optimizer="adamw", lr=0.05), None),
    ("tiny", dict(optimizer="sgd", lr=0.05, mixup=0.3, ema=0.9), None),
    ("tiny", dict(optimizer="adam", swa_epochs=2), "frames"),
    ("ststnet", dict(optimizer="adamw", lr=0.01), "flow"),
    ("off_apexnet", dict(optimizer="sgd", lr=0.05, mixup=0.3, ema=0.9), "flow"),
    ("sssnet", dict(optimizer="adamw", lr=0.01), "flow"),
    ("roi_transformer", dict(optimizer="adamw", lr=0.01), None),
    ("lstm", dict(optimizer="adam", lr=0.01), None)])
def test_the_step_a_cuda_graph_records_asks_nothing_of_the_host(name, kw, aug):
    """What `_graphed_epoch` captures, `_static_step`, for the field's small models and the
    recipes: no aten op in it reads a value back to the host, sizes an output by the data or
    copies Python data over (each would fail the capture on a GPU, or replay a stale value).
    Checked on the CPU below vmap and grad, where the capture itself cannot run."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 70)
    if name == "tiny":
        make, x, to_input = TinyNet, data(70)[0], images_to_tensor
    elif name in ("roi_transformer", "lstm"):
        x = rng.normal(size=(70, 10, 14)).astype(np.float32)
        extra = dict(hidden_size=8) if name == "lstm" else {}
        make = lambda: create_model(name, num_classes=3, input_dim=14, **extra)  # noqa: E731
        to_input = torch.as_tensor
    else:
        x = rng.normal(size=(70, 28, 28, 3)).astype(np.float32)
        make = lambda: create_model(name, num_classes=3, input_channels=3)     # noqa: E731
        to_input = images_to_tensor
    ls = fb.Lockstep(make, x, y, replicas(70, False), tcfg(epochs=2, **kw), 3, to_input, aug,
                     torch.device("cpu"), None, 256, None, "static")
    ls.run_epoch(ls.plan_epoch(np.flatnonzero(~ls.done)))     # the static buffers, warm
    ls._ctr.zero_()
    with _OpLog() as ops:
        ls._static_step()
    assert ops.n > 100                       # the whole step ran under the log
    assert not ops.host, ops.host
