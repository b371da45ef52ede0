"""Training recipes beyond plain minibatch descent, each off by default and each a config key
that nested selection can offer as a candidate (#16): none of them is ever picked on the outer
test subject.

- `training.mixup` (alpha > 0): each minibatch is mixed with a shuffled copy of itself,
  `lam * x + (1 - lam) * x[perm]` with `lam ~ Beta(alpha, alpha)`, and the loss mixed likewise
  (Zhang et al. 2018). Applied after augmentation, on the model's input tensor.
- `training.ema` (decay in (0, 1)): an exponential moving average of the weights (and of the
  BatchNorm statistics), updated after every optimizer step; the averaged weights are the ones
  scored, selected and kept.
- `training.swa_epochs` (N > 0): stochastic weight averaging, the equal-weight mean of the
  weights at the end of each of the last N epochs; BatchNorm statistics are then recomputed
  with one pass over the training data (no augmentation). Only with the final epoch (no
  validation split), as there is no epoch left to select.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn


def recipe_keys(tcfg) -> list[str]:
    """The recipe keys a training config turns on (config checks: `mexp.config`)."""
    return [f"training.{k}" for k in ("mixup", "ema", "swa_epochs") if getattr(tcfg, k, 0)]


def mixed_loss(model, inp: torch.Tensor, target: torch.Tensor, loss_fn, alpha: float,
               rng: np.random.Generator) -> torch.Tensor:
    """The mixup loss of one minibatch (the plain loss when alpha is 0)."""
    if not alpha or len(target) < 2:
        return loss_fn(model(inp), target)
    lam = float(rng.beta(alpha, alpha))
    perm = torch.as_tensor(rng.permutation(len(target)), device=inp.device)
    out = model(lam * inp + (1.0 - lam) * inp[perm])
    return lam * loss_fn(out, target) + (1.0 - lam) * loss_fn(out, target[perm])


class WeightAverage:
    """A running average of a model's state: `ema` (decay d: avg = d * avg + (1 - d) * w after
    every step) or `swa` (equal-weight mean of the states given to `add_epoch`)."""

    def __init__(self, model: nn.Module, kind: str, decay: float = 0.0):
        self.kind, self.decay, self.count = kind, decay, 0
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def after_step(self, model: nn.Module) -> None:
        if self.kind != "ema":
            return
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    self.avg[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
                else:
                    self.avg[k].copy_(v)

    def add_epoch(self, model: nn.Module) -> None:
        if self.kind != "swa":
            return
        self.count += 1
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    self.avg[k].add_(v.detach() - self.avg[k], alpha=1.0 / self.count)
                else:
                    self.avg[k].copy_(v)

    def state(self) -> dict:
        return copy.deepcopy(self.avg)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: np.ndarray, to_input, batch_size: int,
                        device) -> None:
    """BatchNorm running statistics of `model` recomputed on the training data, as the mean of
    the per-batch statistics (what averaged weights need: an average of statistics belongs to
    no set of weights)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not len(x):
        return
    moments = {}
    for m in norms:
        m.reset_running_stats()
        moments[m] = m.momentum
        m.momentum = None                          # cumulative average over the batches
    was = model.training
    model.train()
    for i in range(0, len(x), batch_size):
        if len(x[i:i + batch_size]) > 1:
            model(to_input(x[i:i + batch_size]).to(device))
    for m in norms:
        m.momentum = moments[m]
    model.train(was)
