"""The parts of fold batching (`mexp.engine.batched`) that stack R replicas of one model:
a BatchNorm whose batch statistics skip padded samples and whose running-stat updates are
returned (so it runs under vmap + grad), an LSTM unrolled into matmuls (vmap has no rule for
torch's fused one), augmentation of stacked batches on the device, and
Adam / AdamW / SGD over stacked tensors with per-replica lr, weight decay and step counts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn


# ------------------------------------------------------------------------ masked batch norm
class _Ctx:
    mask: torch.Tensor | None = None        # (B,) 1 for real samples, 0 for padding
    updates: dict | None = None              # module name -> (new running_mean, new running_var)


_CTX = _Ctx()


class MaskedBatchNorm(nn.Module):
    """nn.BatchNorm{1,2,3}d whose batch statistics skip padded samples (mask from the step
    function's context) and whose running-stat updates are *returned* (through the context),
    not written in place, so it runs under vmap + grad. Same parameter / buffer names."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, name: str):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.weight = bn.weight if bn.affine else None
        self.bias = bn.bias if bn.affine else None
        if bn.track_running_stats:
            self.register_buffer("running_mean", bn.running_mean)
            self.register_buffer("running_var", bn.running_var)
            self.register_buffer("num_batches_tracked", bn.num_batches_tracked)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = bn.training
        self._fb_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[1] = -1
        if self.training or self.running_mean is None:
            mask = _CTX.mask
            per = 1
            for s in x.shape[2:]:
                per *= s
            if mask is None:
                mask = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
            mk = mask.to(x.dtype)
            n = mk.sum() * per
            n1 = torch.clamp(n, min=1.0)
            # per-sample channel sums first (one read of x, (B, C) out), then the masked sum
            # over samples: no full-size masked copy of x
            hw = list(range(2, x.dim()))
            s1 = x.sum(hw) if hw else x
            mean = (s1 * mk[:, None]).sum(0) / n1
            xc = x - mean.reshape(shape)
            s2 = (xc * xc).sum(hw) if hw else xc * xc
            var = (s2 * mk[:, None]).sum(0) / n1
            if self.training and self.running_mean is not None and _CTX.updates is not None:
                if self.momentum is None:
                    factor = 1.0 / (self.num_batches_tracked + 1).to(x.dtype)
                else:
                    factor = self.momentum
                unbiased = var * n / torch.clamp(n - 1, min=1.0)
                _CTX.updates[self._fb_name] = (
                    factor * mean.detach() + (1 - factor) * self.running_mean,
                    factor * unbiased.detach() + (1 - factor) * self.running_var)
            scale = torch.rsqrt(var + self.eps)
            if self.affine:
                return torch.addcmul(self.bias.reshape(shape), xc,
                                     (scale * self.weight).reshape(shape))
            return xc * scale.reshape(shape)
        else:
            y = (x - self.running_mean.reshape(shape)) * torch.rsqrt(
                self.running_var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def replace_batchnorm(model: nn.Module) -> list[str]:
    """In place: every nn.BatchNorm* -> MaskedBatchNorm. Returns their qualified names."""
    names = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                q = f"{name}.{cname}" if name else cname
                setattr(mod, cname, MaskedBatchNorm(child, q))
                names.append(q)
    return names


# ------------------------------------------------------------------------------- recurrent
class UnrolledLSTM(nn.Module):
    """nn.LSTM written out as matmuls and a loop over time, so that it runs under vmap (torch
    has no batching rule for aten::lstm). Same parameter names and gate order (i, f, g, o), the
    same inter-layer dropout; unidirectional or bidirectional, batch_first or not, no
    proj_size. Returns (output, (h_n, c_n)) as nn.LSTM."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        if lstm.proj_size:
            raise ValueError("fold batching cannot unroll an LSTM with proj_size")
        self.num_layers, self.hidden_size = lstm.num_layers, lstm.hidden_size
        self.bidirectional, self.batch_first = lstm.bidirectional, lstm.batch_first
        self.dropout, self.bias = float(lstm.dropout), lstm.bias
        for name in lstm._flat_weights_names:
            setattr(self, name, getattr(lstm, name))
        self.training = lstm.training

    def _direction(self, x: torch.Tensor, layer: int, suffix: str, h, c):
        w_ih = getattr(self, f"weight_ih_l{layer}{suffix}")
        w_hh = getattr(self, f"weight_hh_l{layer}{suffix}")
        gx = x @ w_ih.T                                             # (T, B, 4H), all steps
        if self.bias:
            gx = gx + getattr(self, f"bias_ih_l{layer}{suffix}") + \
                getattr(self, f"bias_hh_l{layer}{suffix}")
        steps = range(x.shape[0] - 1, -1, -1) if suffix else range(x.shape[0])
        out = [None] * x.shape[0]
        for t in steps:
            i, f, g, o = (gx[t] + h @ w_hh.T).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out[t] = h
        return torch.stack(out), h, c

    def forward(self, x: torch.Tensor, hc=None):
        if self.batch_first:
            x = x.transpose(0, 1)                                   # (T, B, D)
        dirs = ("", "_reverse") if self.bidirectional else ("",)
        B, H = x.shape[1], self.hidden_size
        hs, cs = [], []
        for layer in range(self.num_layers):
            if layer and self.dropout and self.training:
                x = nn.functional.dropout(x, self.dropout, True)
            outs = []
            for d, suffix in enumerate(dirs):
                j = layer * len(dirs) + d
                h0 = x.new_zeros(B, H) if hc is None else hc[0][j]
                c0 = x.new_zeros(B, H) if hc is None else hc[1][j]
                o, h, c = self._direction(x, layer, suffix, h0, c0)
                outs.append(o)
                hs.append(h)
                cs.append(c)
            x = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(hs), torch.stack(cs))


def replace_lstm(model: nn.Module) -> list[str]:
    """In place: every nn.LSTM -> UnrolledLSTM. Returns their qualified names."""
    names = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.LSTM):
                setattr(mod, cname, UnrolledLSTM(child))
                names.append(f"{name}.{cname}" if name else cname)
    return names


# ----------------------------------------------------------------------------- augmentation
def draw_augment(rng: np.random.Generator, n: int, max_shift: int = 2):
    """make_augment's draws for n samples: flip ~ Bernoulli(0.5), (dy, dx) ~ U{-s..s}^2."""
    flip = rng.random(n) < 0.5
    shift = rng.integers(-max_shift, max_shift + 1, size=(n, 2)) if max_shift else \
        np.zeros((n, 2), np.int64)
    return flip, shift


def augment_inputs(x: torch.Tensor, flip: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   negate_channel: int | None = 0) -> torch.Tensor:
    """Torch version of mexp.data.inputs.make_augment on model inputs.

    x: (*lead, *rest, C, H, W) with flip / dy / dx of shape `lead` (one draw per sample; any
    axes between lead and (C, H, W), e.g. time, share the sample's draw). Horizontal flip,
    then np.roll by (dy, dx) over (H, W); channel `negate_channel` is negated on a flip
    ('flow': u; None for 'frames'). One gather, no Python loop."""
    lead = flip.shape
    C, H, W = x.shape[-3:]
    M = flip.numel()
    xf = x.reshape(M, -1, C, H, W)
    f, dy, dx = flip.reshape(M), dy.reshape(M).long(), dx.reshape(M).long()
    dev = x.device
    rows = (torch.arange(H, device=dev)[None, :] - dy[:, None]) % H                 # (M, H)
    cols = (torch.arange(W, device=dev)[None, :] - dx[:, None]) % W                 # (M, W)
    cols = torch.where(f[:, None], W - 1 - cols, cols)
    mi = torch.arange(M, device=dev)[:, None, None, None, None]
    out = xf[mi, torch.arange(xf.shape[1], device=dev)[None, :, None, None, None],
             torch.arange(C, device=dev)[None, None, :, None, None],
             rows[:, None, None, :, None], cols[:, None, None, None, :]]
    if negate_channel is not None:
        sign = torch.ones(M, 1, C, 1, 1, dtype=x.dtype, device=dev)
        sign[:, :, negate_channel] = torch.where(f, -1.0, 1.0).to(x.dtype)[:, None, None, None]
        out = out * sign
    return out.reshape(*lead, *x.shape[len(lead):])


@dataclass
class TorchAugment:
    kind: str = "flow"          # 'flow' (u negated on a flip) | 'frames'
    max_shift: int = 2
    u_channel: int = 0


def as_augment(augment) -> TorchAugment | None:
    if augment is None or augment is False:
        return None
    if isinstance(augment, TorchAugment):
        return augment
    if isinstance(augment, str):
        if augment not in ("flow", "frames"):
            raise ValueError(f"augment must be 'flow', 'frames' or a TorchAugment, got {augment!r}")
        return TorchAugment(augment)
    raise TypeError("fit_batched augments on the device: pass 'flow', 'frames' or a "
                    f"TorchAugment, not {type(augment).__name__} (numpy augment functions "
                    "cannot run on stacked device batches)")


# ------------------------------------------------------------------------ stacked optimizer
class StackedOptimizer:
    """Adam / AdamW / SGD(momentum 0.9) over stacked (R, ...) tensors, each replica with its
    own lr, weight decay and step count; `active` (R,) selects who steps."""

    def __init__(self, kind: str, params: dict, lr: np.ndarray, wd: np.ndarray,
                 betas=(0.9, 0.999), eps=1e-8, momentum=0.9):
        self.kind, self.beta1, self.beta2, self.eps, self.momentum = kind, *betas, eps, momentum
        self.lr, self.wd = np.asarray(lr, np.float64), np.asarray(wd, np.float64)
        self.R = len(self.lr)
        self.steps = np.zeros(self.R, np.int64)           # host copy, as torch's state["step"]
        self.uniform_lr = bool(np.all(self.lr == self.lr[0]))
        self.uniform_wd = bool(np.all(self.wd == self.wd[0]))
        self.state = {k: {} for k in params}
        any_p = next(iter(params.values()), None)
        dev = any_p.device if any_p is not None else torch.device("cpu")
        dt = any_p.dtype if any_p is not None else torch.float32
        # per-replica constants, on the device once (no host->device copy inside a step)
        self.decay_t = torch.as_tensor(1 - self.lr * self.wd, dtype=dt, device=dev)
        self.wd_t = torch.as_tensor(self.wd, dtype=dt, device=dev)
        self.neg_lr_t = torch.as_tensor(-self.lr, dtype=dt, device=dev)
        self.keys, self.flat = list(params), None
        if params and all(p.dtype == dt and p.device == dev for p in params.values()):
            # one (R, P) tensor holds every parameter and `params` gets views into it, so a
            # step is a dozen elementwise ops on it, not a dozen per parameter tensor (kernel
            # launches on a GPU); per element the arithmetic is the same
            self.flat = torch.cat([p.reshape(self.R, -1) for p in params.values()], 1)
            off = 0
            for k, p in list(params.items()):
                n = p[0].numel()
                params[k] = self.flat[:, off:off + n].view(p.shape)
                off += n
        for k, p in ({"flat": self.flat} if self.flat is not None else params).items():
            if kind in ("adam", "adamw"):
                self.state[k] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            else:
                self.state[k] = {"buf": torch.zeros_like(p)}

    def plan(self, active: np.ndarray) -> np.ndarray:
        """Per-step scalars for an epoch: active (S, R) bool -> (S, K, R) float64 rows
        [active, a, b, c], cast to float32 on the device. Advances the host step counts."""
        S = active.shape[0]
        out = np.zeros((S, 4, self.R), np.float64)
        for s in range(S):
            self.steps = self.steps + active[s]
            st = np.maximum(self.steps, 1).astype(np.float64)
            out[s, 0] = active[s]
            if self.kind in ("adam", "adamw"):
                bc1 = np.array([1 - self.beta1 ** float(t) for t in st])
                bc2 = np.array([1 - self.beta2 ** float(t) for t in st])
                out[s, 1] = -(self.lr / bc1)                       # -step_size
                out[s, 2] = np.array([b ** 0.5 for b in bc2])      # bias_correction2_sqrt
            else:
                out[s, 1] = (self.steps == 1)                      # first momentum step
        return out

    @torch.no_grad()
    def step(self, params: dict, grads: dict, sc: torch.Tensor, sc_first: torch.Tensor) -> None:
        """sc: (4, R) float32 of this step on the device; updates params in place (where):
        the one flat tensor `params` are views of, or each parameter tensor."""
        act = sc[0] > 0
        if self.flat is not None:
            g = torch.cat([grads[k].reshape(self.R, -1) for k in self.keys], 1)
            self._update("flat", self.flat, g, act, sc, sc_first)
            return
        for k, p in params.items():
            self._update(k, p, grads[k], act, sc, sc_first)

    def _update(self, k: str, p: torch.Tensor, g: torch.Tensor, act: torch.Tensor,
                sc: torch.Tensor, sc_first: torch.Tensor) -> None:
        """One (R, ...) tensor's update, its state under `k`."""
        bshape = (self.R,) + (1,) * (p.dim() - 1)
        a = act.reshape(bshape)
        st = self.state[k]
        if self.kind in ("adam", "adamw"):
            new_p = p
            if self.kind == "adamw":
                if self.uniform_lr and self.uniform_wd:
                    if self.wd[0] != 0:
                        new_p = p.mul(1 - self.lr[0] * self.wd[0])
                else:
                    new_p = p * self.decay_t.reshape(bshape)
            else:
                if self.uniform_wd:
                    if self.wd[0] != 0:
                        g = g.add(p, alpha=float(self.wd[0]))
                else:
                    g = g + self.wd_t.reshape(bshape) * p
            exp_avg = st["exp_avg"].lerp(g, 1 - self.beta1)
            exp_avg_sq = st["exp_avg_sq"].mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / sc[2].reshape(bshape)).add_(self.eps)
            new_p = torch.addcdiv(new_p, sc[1].reshape(bshape) * exp_avg, denom)
            # in place, so a CUDA graph of the step keeps its addresses
            st["exp_avg"].copy_(torch.where(a, exp_avg, st["exp_avg"]))
            st["exp_avg_sq"].copy_(torch.where(a, exp_avg_sq, st["exp_avg_sq"]))
        else:   # sgd, momentum 0.9, dampening 0, no nesterov
            if self.uniform_wd:
                if self.wd[0] != 0:
                    g = g.add(p, alpha=float(self.wd[0]))
            else:
                g = g + self.wd_t.reshape(bshape) * p
            first = sc_first.reshape(bshape)
            buf = torch.where(first, g, st["buf"].mul(self.momentum).add_(g))
            if self.uniform_lr:
                new_p = p.add(buf, alpha=-float(self.lr[0]))
            else:
                new_p = p + self.neg_lr_t.reshape(bshape) * buf
            st["buf"].copy_(torch.where(a, buf, st["buf"]))
        p.copy_(torch.where(a, new_p, p))


def as_index(a) -> np.ndarray:
    return np.zeros(0, np.int64) if a is None else np.asarray(a, np.int64).reshape(-1)


def pad_rows(groups: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index lists -> (R, L) padded with 0 and the (R, L) mask."""
    L = max([len(g) for g in groups] + [1])
    idx = np.zeros((len(groups), L), np.int64)
    mask = np.zeros((len(groups), L), bool)
    for r, g in enumerate(groups):
        idx[r, :len(g)] = g
        mask[r, :len(g)] = True
    return idx, mask


