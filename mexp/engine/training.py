"""The training loop: `fit`, `train_one_epoch`, `evaluate`, `predict_proba`. No tracking here.

Data are in-memory numpy arrays; `to_input` turns a batch into the model's tensor. Model
selection uses the validation split (training subjects held out) or the final epoch: the test
subject is never seen here.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from mexp.util.progress import progress

from mexp.engine.metrics import scores
from mexp.engine.recipes import WeightAverage, mixed_loss, recompute_batchnorm

Batch = Callable[[np.ndarray], torch.Tensor]
SHOW_PROGRESS = True        # per-epoch bars; off in fold worker processes (mexp.engine.pool)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device=cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def make_optimizer(model: nn.Module, tcfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    if tcfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    return torch.optim.SGD(params, lr=tcfg.lr, momentum=0.9, weight_decay=tcfg.weight_decay)


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights from the *training* labels (absent classes get weight 0)."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    w = np.divide(counts.sum(), num_classes * counts, out=np.zeros_like(counts), where=counts > 0)
    return torch.tensor(w, dtype=torch.float32)


def train_one_epoch(model, x, y, opt, loss_fn, to_input: Batch, batch_size: int,
                    rng: np.random.Generator, device, augment=None, mixup: float = 0.0,
                    average: WeightAverage | None = None) -> float:
    """One pass over (x, y) in shuffled minibatches; `mixup` and `average` as in
    `mexp.engine.recipes` (off: the rng draws and the steps are the plain ones)."""
    model.train()
    order = rng.permutation(len(x))
    total = 0.0
    for i in range(0, len(order), batch_size):
        idx = np.sort(order[i:i + batch_size])
        xb = x[idx] if augment is None else augment(x[idx], rng)
        inp, target = to_input(xb).to(device), torch.as_tensor(y[idx]).to(device)
        if len(idx) == 1 and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            continue  # BatchNorm cannot train on a batch of one
        opt.zero_grad(set_to_none=True)
        loss = mixed_loss(model, inp, target, loss_fn, mixup, rng)
        loss.backward()
        opt.step()
        if average is not None:
            average.after_step(model)
        total += loss.item() * len(idx)
    return total / max(len(x), 1)


@torch.no_grad()
def predict_proba(model, x, to_input: Batch, batch_size: int, device) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(to_input(x[i:i + batch_size]).to(device)), 1).cpu().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, getattr(model, "num_classes", 0)))


def evaluate(model, x, y, to_input: Batch, batch_size: int, device, num_classes: int) -> dict:
    """Loss and UF1/UAR/accuracy of the model on (x, y)."""
    probs = predict_proba(model, x, to_input, batch_size, device)
    nll = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean() if len(y) else 0.0
    s = scores(y, probs.argmax(1), num_classes)
    return {"loss": float(nll), "uf1": s["uf1"], "uar": s["uar"], "accuracy": s["accuracy"]}


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)   # one row per epoch
    best_epoch: int = 0                                  # 1-based epoch whose weights are kept
    selected_on: str = "final"                           # 'validation' or 'final'
    state: dict = field(default_factory=dict)            # the kept weights


def fit(model, train: tuple, val: tuple | None, tcfg, num_classes: int, to_input: Batch,
        augment=None, seed: int = 0, desc: str = "epochs") -> FitResult:
    """Train for `tcfg.epochs`; keep the epoch with the lowest validation loss when a
    validation split exists (early stopping after `tcfg.early_stopping` epochs without
    improvement, if set), else the final epoch. With `training.ema` / `training.swa_epochs`
    the averaged weights are the ones scored and kept (`mexp.engine.recipes`). A closed-form
    model (one with `fit_numpy`, e.g. the scikit-learn members) is fitted once instead:
    `fit_closed_form`."""
    device = resolve_device(tcfg.device)
    if hasattr(model, "fit_numpy"):
        return fit_closed_form(model, train, val, tcfg, num_classes, to_input, seed, device)
    model.to(device)
    rng = np.random.default_rng(seed)
    x, y = train
    weight = class_weights(y, num_classes).to(device) if tcfg.class_weighted else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = make_optimizer(model, tcfg)
    res = FitResult(selected_on="validation" if val is not None and len(val[1]) else "final")
    mixup, ema = getattr(tcfg, "mixup", 0.0), getattr(tcfg, "ema", 0.0)   # recipes: off
    swa_from = tcfg.epochs - getattr(tcfg, "swa_epochs", 0) + 1
    average = (WeightAverage(model, "ema", ema) if ema else
               WeightAverage(model, "swa") if swa_from <= tcfg.epochs else None)
    scored = copy.deepcopy(model) if average is not None else model   # what is scored and kept
    best, stale = float("inf"), 0
    bar = progress(range(1, tcfg.epochs + 1), desc=desc, unit="ep", leave=False,
               disable=not SHOW_PROGRESS)
    for epoch in bar:
        row = {"epoch": epoch, "train/loss": train_one_epoch(
            model, x, y, opt, loss_fn, to_input, tcfg.batch_size, rng, device, augment,
            mixup, average if average and average.kind == "ema" else None)}
        if average is not None and epoch >= swa_from:
            average.add_epoch(model)
        if average is not None and average.kind == "ema":
            scored.load_state_dict(average.avg)
        if res.selected_on == "validation":
            row.update({f"val/{k}": v for k, v in evaluate(
                scored, val[0], val[1], to_input, tcfg.batch_size, device, num_classes).items()})
            if row["val/loss"] < best - 1e-6:
                best, stale, res.best_epoch = row["val/loss"], 0, epoch
                res.state = copy.deepcopy(scored.state_dict())
            else:
                stale += 1
        res.history.append(row)
        bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in row.items() if k != "epoch"})
        if tcfg.early_stopping and stale >= tcfg.early_stopping:
            break
    if average is not None and average.kind == "swa":
        scored.load_state_dict(average.avg)
        recompute_batchnorm(scored, x, to_input, tcfg.batch_size, device)
    if res.selected_on == "final" or not res.state:
        res.best_epoch, res.state = len(res.history), copy.deepcopy(scored.state_dict())
    model.load_state_dict(res.state)
    return res


def _as_array(x: np.ndarray, to_input: Batch, batch_size: int) -> np.ndarray:
    """The model's input for every sample, as one float array: (N, ...)."""
    return np.concatenate([to_input(x[i:i + batch_size]).numpy()
                           for i in range(0, len(x), batch_size)])


def fit_closed_form(model, train: tuple, val: tuple | None, tcfg, num_classes: int,
                    to_input: Batch, seed: int, device) -> FitResult:
    """One fit on all of `train` (no epochs, no augmentation; `tcfg.class_weighted` gives the
    nets' inverse-frequency weights). Nothing is selected: the validation split, if any, is
    only scored. The FitResult has best_epoch 0 and one history row (epoch 0) holding the
    training loss, and the validation scores if there is a split."""
    x, y = train
    weight = class_weights(y, num_classes).numpy() if tcfg.class_weighted else None
    model.fit_numpy(_as_array(x, to_input, tcfg.batch_size), y, weight, seed=seed)
    model.to(device)
    train_scores = evaluate(model, x, y, to_input, tcfg.batch_size, device, num_classes)
    row = {"epoch": 0, "train/loss": train_scores["loss"]}
    if val is not None and len(val[1]):
        row.update({f"val/{k}": v for k, v in evaluate(
            model, val[0], val[1], to_input, tcfg.batch_size, device, num_classes).items()})
    return FitResult(history=[row], best_epoch=0, selected_on="final",
                     state=copy.deepcopy(model.state_dict()))
