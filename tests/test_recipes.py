"""Training recipes offered to nested selection (#16 item 5): mixup, weight EMA, SWA. Each is
checked against its definition on a tiny net, and each bad setting fails before any run."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from mexp.config import ConfigError, load_config
from mexp.data.inputs import images_to_tensor
from mexp.engine import training as engine
from mexp.engine.recipes import WeightAverage, mixed_loss, recompute_batchnorm


class Plain(nn.Module):
    """No BatchNorm: averaged weights need no statistics recomputed."""

    def __init__(self):
        super().__init__()
        self.num_classes = 3
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.f(x)


def tcfg(**kw):
    base = dict(epochs=5, batch_size=8, lr=3e-3, optimizer="adam", weight_decay=0.0,
                early_stopping=0, class_weighted=False, device="cpu", mixup=0.0, ema=0.0,
                swa_epochs=0)
    base.update(kw)
    return SimpleNamespace(**base)


def data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    x[..., 0] = np.clip(x[..., 0].astype(int) + 60 * (y[:, None, None] - 1), 0, 255)
    return x, y


def trained(t, seed=1, model_cls=Plain):
    torch.manual_seed(seed)
    m = model_cls()
    res = engine.fit(m, data(), None, t, 3, images_to_tensor, seed=7)
    return m, res


def close(a: dict, b: dict, tol=1e-6) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < tol


def test_swa_is_the_mean_of_the_last_epochs_weights():
    states = [trained(tcfg(epochs=e))[1].state for e in (3, 4, 5)]   # same batches, prefixes
    mean = {k: sum(s[k] for s in states) / 3 for k in states[0]}
    _, res = trained(tcfg(epochs=5, swa_epochs=3))
    assert close(res.state, mean)
    assert not close(res.state, states[-1])              # averaging changed something
    assert res.best_epoch == 5 and res.selected_on == "final"


def test_ema_keeps_the_running_average_of_every_step():
    _, plain = trained(tcfg())
    _, near = trained(tcfg(ema=1e-9))                     # decay ~0: the last weights
    assert close(near.state, plain.state, 1e-5)
    _, avg = trained(tcfg(ema=0.9))
    assert not close(avg.state, plain.state, 1e-3)
    m = Plain()
    wa = WeightAverage(m, "ema", 0.9)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    wa.after_step(m)
    assert close(wa.avg, {k: 0.9 * v + 0.1 * (v + 1.0) for k, v in before.items()})


def test_ema_weights_are_the_ones_validated():
    x, y = data()
    t = tcfg(ema=0.9, epochs=4)
    torch.manual_seed(1)
    m = Plain()
    res = engine.fit(m, (x[:30], y[:30]), (x[30:], y[30:]), t, 3, images_to_tensor, seed=7)
    got = engine.evaluate(m, x[30:], y[30:], images_to_tensor, 8, "cpu", 3)["loss"]
    assert res.selected_on == "validation"
    assert got == pytest.approx(res.history[res.best_epoch - 1]["val/loss"], abs=1e-6)


def test_mixup_mixes_inputs_and_losses_with_one_beta_draw():
    torch.manual_seed(0)
    m, loss_fn = Plain(), nn.CrossEntropyLoss()
    inp, target = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    got = mixed_loss(m, inp, target, loss_fn, 0.4, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    lam, perm = rng.beta(0.4, 0.4), torch.as_tensor(rng.permutation(6))
    out = m(lam * inp + (1 - lam) * inp[perm])
    want = lam * loss_fn(out, target) + (1 - lam) * loss_fn(out, target[perm])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert mixed_loss(m, inp, target, loss_fn, 0.0, rng).item() == pytest.approx(
        loss_fn(m(inp), target).item())
    _, plain = trained(tcfg())
    _, mixed = trained(tcfg(mixup=0.4))
    assert not close(mixed.state, plain.state, 1e-4)
    assert np.isfinite(mixed.history[-1]["train/loss"])


def test_batchnorm_statistics_recomputed_on_the_training_data():
    bn = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48))
    x, _ = data(n=32)
    recompute_batchnorm(bn, x, images_to_tensor, 8, "cpu")
    batches = [images_to_tensor(x[i:i + 8]).flatten(1) for i in range(0, 32, 8)]
    want = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert torch.allclose(bn[1].running_mean, want, atol=1e-5)
    assert bn[1].momentum == 0.1 and bn.training


@pytest.mark.parametrize("override, words", [
    (["training.ema=1.0"], "training.ema"),
    (["training.mixup=-0.1"], "training.mixup"),
    (["training.swa_epochs=60", "training.epochs=50"], "training.swa_epochs"),
    (["training.swa_epochs=5"], "val_fraction=0"),                   # default val_fraction 0.2
    (["training.ema=0.9", "training.swa_epochs=3", "training.val_fraction=0"], "one of them"),
])
def test_bad_recipe_settings_fail_before_any_run(override, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_config(None, override)


def test_recipes_are_nested_candidates_and_are_batched():
    from mexp.engine.batching import choose
    from mexp.engine.crossval import RowFolds
    from mexp.engine.nested import candidate_configs
    cfg = load_config(None, ["training.val_fraction=0", "selection.mode=best",
                             "selection.candidates={plain: {training.epochs: 5}, "
                             "mix: {training.mixup: 0.2, training.ema: 0.99}}"])
    cands = candidate_configs(cfg)
    assert cands["mix"].training.mixup == 0.2 and cands["plain"].training.mixup == 0
    fn = RowFolds(cands["mix"], Plain, *data(), np.arange(40), None, images_to_tensor)
    ok, why = choose("auto", fn, torch.device("cuda"))     # tests/test_batched.py: as serial
    assert ok and "CUDA" in why
    assert choose("on", fn, torch.device("cpu"))[0]
    load_config(None, ["training.mixup=0.2", "training.fold_batching=on"])    # no refusal
