"""Fold batching (`training.fold_batching`): the R replicas of one small model that a
cross-validation trains (one per fold) run in lockstep as one vectorised model.

Parameters and buffers are stacked (`torch.func.stack_module_state`); a training step is
`vmap(grad(loss))` over `functional_call` of one base module, then a stacked optimizer update
(`mexp.engine.stacked`). The data go to the device once; each step gathers every replica's
batch with one (R, B) index tensor and a (R, B) mask; the host plans an epoch ahead and reads
back once per epoch. Per replica the semantics are `mexp.engine.training.fit` + `predict_proba`
(tests/test_batched.py: float64 probabilities agree to ~1e-14, float32 to ~1e-5):
- the model is built right after `set_seed(seed)`; `rng = default_rng(seed)`; each epoch
  `order = rng.permutation(n_train)`, batches `np.sort(order[i:i + bs])`; a batch of one is
  skipped when the model holds BatchNorm;
- the loss is the replica's own class-weighted mean cross-entropy (padding weighs 0); a replica
  with no batch in a step (a shorter epoch, a BatchNorm singleton, stopped early) keeps its
  parameters, optimizer moments, BatchNorm statistics and step count: folds of different sizes
  each run their own number of steps, and none biases another;
- BatchNorm statistics over the replica's real samples only, running stats as nn.BatchNorm;
- validation selection (lowest validation loss, early stopping) or the final epoch, per replica.
- the recipes of `mexp.engine.recipes`: mixup draws `lam ~ Beta` and a permutation of the
  replica's own batch from its rng after the batch (only for batches of >= 2, as the serial
  loop); the weight EMA is updated after each of the replica's own steps (BatchNorm statistics
  included) and is what is validated, selected and kept; SWA averages the last epochs' weights
  and recomputes BatchNorm statistics over the replica's training rows in their order.
Differences from the serial loop: augmentation runs on the device (each replica's own rng,
`make_augment`'s distribution, another stream) and dropout draws per replica, so with either
the two paths differ within seed noise. Per-replica lr, weight decay, class weighting and
augmentation on or off (`Replica.lr`, `.weight_decay`, `.class_weighted`, `.augment`; a replica
without augmentation draws no augmentation numbers, as its serial fit) let a group of HPO
trials or inner folds train as one batch.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from mexp.engine.metrics import scores
from mexp.engine.stacked import (_CTX, MaskedBatchNorm, StackedOptimizer, as_augment, as_index,
                                 augment_inputs, draw_augment, pad_rows, replace_batchnorm,
                                 replace_lstm)
from mexp.engine.training import class_weights, resolve_device, set_seed


# eager steps on a side stream before the step is captured as a CUDA graph (lazy
# initialisation, cuDNN's algorithm choice); they are real steps of the first epoch
GRAPH_WARMUP = 3


@dataclass
class Replica:
    """One fold x seed. Indices point into the shared X / y given to `fit_batched`."""
    train_idx: np.ndarray
    val_idx: np.ndarray | None
    test_idx: np.ndarray
    seed: int
    lr: float | None = None                 # None: tcfg.lr
    weight_decay: float | None = None       # None: tcfg.weight_decay
    class_weighted: bool | None = None      # None: tcfg.class_weighted
    augment: bool | None = None             # None: as the fit's `augment` (on when given)
    name: str = ""


@dataclass
class ReplicaResult:
    """`mexp.engine.training.FitResult`'s fields plus the test probabilities."""
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    selected_on: str = "final"
    state: dict = field(default_factory=dict)
    probs: np.ndarray | None = None
    step_path: str = "eager"        # eager | cuda graph | static | eager (graph capture failed)


def _weighted_ce(out: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """nn.CrossEntropyLoss(weight)'s mean: sum(w * nll) / sum(w) (0 for an empty batch)."""
    tot = w.sum()
    return (F.cross_entropy(out, target, reduction="none") * w).sum() / torch.where(
        tot > 0, tot, torch.ones_like(tot))


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per replica (leading axis) `new` where mask, else `old`."""
    return torch.where(mask.reshape((len(mask),) + (1,) * (old.dim() - 1)), new, old)


class Lockstep:
    """The state of one batched fit: stacked weights, optimizer, data on the device."""

    def __init__(self, make_model, X, y, replicas, tcfg, num_classes, to_input, augment,
                 device, initial_states, eval_chunk, vmap_chunk, graphs="auto"):
        self.R, self.tcfg, self.num_classes = len(replicas), tcfg, num_classes
        self.dev = resolve_device(device) if not isinstance(device, torch.device) else device
        self.bs, self.epochs = int(tcfg.batch_size), int(tcfg.epochs)
        self.patience = int(getattr(tcfg, "early_stopping", 0) or 0)
        self.aug, self.eval_chunk = as_augment(augment), eval_chunk
        self.y = np.array(y, np.int64)
        if vmap_chunk == "auto":       # the CPU ran ~1.5x faster with a cache-sized working set
            vmap_chunk = None if self.dev.type == "cuda" else 4
        self._stack(make_model, replicas, initial_states)
        with torch.no_grad():
            self.Xd = torch.cat([to_input(X[i:i + 1024]) for i in range(0, len(X), 1024)]
                                ).to(self.dev)
        self.Yd = torch.as_tensor(self.y, device=self.dev)
        self._settings(replicas)
        self.vmap_chunk = vmap_chunk
        self.step_fn = vmap(grad(self._loss, has_aux=True), randomness="different",
                            chunk_size=vmap_chunk)
        self.eval_fn = vmap(self._logits, randomness="different")
        self._recipes(tcfg)
        self.total = torch.zeros(self.R, dtype=torch.float64, device=self.dev)
        # the step as a CUDA graph (`_graphed_epoch`): "cuda" there with "auto"; "static"
        # runs the same static-buffer steps eagerly (the CPU tests of that logic); None: eager
        if graphs == "auto":
            graphs = "cuda" if self.dev.type == "cuda" else None
        if graphs not in (None, False, "cuda", "static"):
            raise ValueError(f"graphs must be 'auto', 'cuda', 'static' or None, got {graphs!r}")
        if graphs == "cuda" and self.dev.type != "cuda":
            raise ValueError("graphs='cuda' needs a CUDA device")
        self.graphs = graphs or None
        self._gplan, self._graph, self._ctr, self.graph_error = None, None, None, None

    def _recipes(self, tcfg) -> None:
        """Mixup, weight EMA and SWA (`mexp.engine.recipes`), all off by default."""
        self.mixup = float(getattr(tcfg, "mixup", 0.0) or 0.0)
        self.ema = float(getattr(tcfg, "ema", 0.0) or 0.0)
        swa = int(getattr(tcfg, "swa_epochs", 0) or 0)
        self.swa_from = self.epochs - swa + 1 if swa else None
        self.swa_count = 0
        self.averaging = bool(self.ema) or self.swa_from is not None
        if self.averaging:                      # the average starts at the initial weights
            self.avg_p = {k: v.clone() for k, v in self.params.items()}
            self.avg_b = {k: v.clone() for k, v in self.buffers.items()}
            if self.use_val.any():              # the kept best is of the averaged weights
                self.best_p = {k: v.clone() for k, v in self.avg_p.items()}
                self.best_b = {k: v.clone() for k, v in self.avg_b.items()}
        if self.mixup:
            self.mix_fn = vmap(grad(self._mixed_loss, has_aux=True), randomness="different",
                               chunk_size=self.vmap_chunk)

    def scored(self) -> tuple[dict, dict]:
        """The weights that are validated and kept: the average under EMA / SWA."""
        return (self.avg_p, self.avg_b) if self.averaging else (self.params, self.buffers)

    def _stack(self, make_model, replicas, initial_states) -> None:
        models = []
        for r, rep in enumerate(replicas):
            set_seed(rep.seed)                      # as the serial fold recipe seeds its model
            m = make_model()
            if initial_states is not None:
                m.load_state_dict(initial_states[r])
            models.append(m.to(self.dev))
        self.keys = list(models[0].state_dict().keys())
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for m in models[0].modules())
        self.base = copy.deepcopy(models[0])
        replace_batchnorm(self.base)
        replace_lstm(self.base)
        params_all, buffers = stack_module_state(models)
        trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
        self.params = {k: v.detach().clone() for k, v in params_all.items() if k in trainable}
        self.frozen = {k: v.detach().clone() for k, v in params_all.items() if k not in trainable}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.nbt_keys = [k for k in self.buffers if k.endswith("num_batches_tracked")]

    def _settings(self, replicas) -> None:
        t, C = self.tcfg, self.num_classes
        # who augments: the fit's augmentation, unless a replica says otherwise
        self.rep_aug = np.array([self.aug is not None and rep.augment is not False
                                 for rep in replicas], bool)
        if self.aug is not None and not self.rep_aug.any():
            self.aug = None
        self.tr = [as_index(rep.train_idx) for rep in replicas]
        self.va = [as_index(rep.val_idx) for rep in replicas]
        self.te = [as_index(rep.test_idx) for rep in replicas]
        lr = np.array([t.lr if rep.lr is None else rep.lr for rep in replicas], np.float64)
        wd = np.array([t.weight_decay if rep.weight_decay is None else rep.weight_decay
                       for rep in replicas], np.float64)
        self.cw = torch.stack([
            class_weights(self.y[i], C)
            if (t.class_weighted if rep.class_weighted is None else rep.class_weighted)
            else torch.ones(C) for rep, i in zip(replicas, self.tr)]).to(self.dev)   # (R, C)
        self.opt_kind = t.optimizer if t.optimizer in ("adam", "adamw") else "sgd"
        self.opt = StackedOptimizer(self.opt_kind, self.params, lr, wd)
        self.rngs = [np.random.default_rng(rep.seed) for rep in replicas]
        self.use_val = np.array([len(v) > 0 for v in self.va])
        self.results = [ReplicaResult(selected_on="validation" if u else "final")
                        for u in self.use_val]
        self.best, self.stale = np.full(self.R, np.inf), np.zeros(self.R, np.int64)
        self.done = np.zeros(self.R, bool)
        keep = self.use_val.any()
        self.best_p = {k: v.clone() for k, v in self.params.items()} if keep else None
        self.best_b = {k: v.clone() for k, v in self.buffers.items()} if keep else None

    def _forward(self, p, fz, b, x, mask):
        """One replica's logits and its BatchNorm running-stat updates (training mode)."""
        _CTX.mask, _CTX.updates = mask, {}
        try:
            return functional_call(self.base, (p, fz, b), (x,)), _CTX.updates
        finally:
            _CTX.mask, _CTX.updates = None, None

    def _loss(self, p, fz, b, x, yb, sw, mask):
        out, upd = self._forward(p, fz, b, x, mask)
        loss = _weighted_ce(out, yb, sw)
        return loss, (loss.detach(), upd)

    def _mixed_loss(self, p, fz, b, x, yb, sw, yb2, sw2, lam, mask):
        """`recipes.mixed_loss` for one replica: x is already mixed; lam its Beta draw."""
        out, upd = self._forward(p, fz, b, x, mask)
        loss = lam * _weighted_ce(out, yb, sw) + (1.0 - lam) * _weighted_ce(out, yb2, sw2)
        return loss, (loss.detach(), upd)

    def _logits(self, p, fz, b, x, mask):
        _CTX.mask, _CTX.updates = mask, None
        try:
            return functional_call(self.base, (p, fz, b), (x,))
        finally:
            _CTX.mask = None

    @torch.no_grad()
    def predict(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities of the scored weights (`scored`) on each replica's rows."""
        self.base.eval()
        params, buffers = self.scored()
        idx, mask = pad_rows(groups)
        out = []
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)     # its fused kernel has no vmap rule
        try:
            for i in range(0, idx.shape[1], self.eval_chunk):
                it = torch.as_tensor(idx[:, i:i + self.eval_chunk], device=self.dev)
                mt = torch.as_tensor(mask[:, i:i + self.eval_chunk], device=self.dev)
                out.append(torch.softmax(self.eval_fn(params, self.frozen, buffers,
                                                      self.Xd[it], mt.float()), -1))
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        probs = torch.cat(out, 1).cpu().numpy()
        return [probs[r, :len(g)] for r, g in enumerate(groups)]

    def plan_epoch(self, live: np.ndarray) -> dict:
        """Every step's batch indices, masks and augmentation draws for one epoch (host): per
        replica the draws in the serial loop's order (permutation, augmentation, then each
        step's mixup draws), the epoch's batches sorted as blocks of one array."""
        bs, R, tr = self.bs, self.R, self.tr
        steps = np.array([math.ceil(len(tr[r]) / bs) if not self.done[r] else 0 for r in range(R)])
        S = int(steps.max()) if len(steps) else 0
        B = min(bs, max(len(t) for t in tr)) if S else 1
        idx, msk = np.zeros((S, R, B), np.int64), np.zeros((S, R, B), bool)
        flip, shift = np.zeros((S, R, B), bool), np.zeros((S, R, B, 2), np.int64)
        active = np.zeros((S, R), bool)
        lam = np.ones((S, R))
        perm = np.broadcast_to(np.arange(B), (S, R, B)).copy() if self.mixup else None
        for r in live:
            n, st = len(tr[r]), int(steps[r])
            order = self.rngs[r].permutation(n)
            aug = self.rep_aug[r]
            if aug:
                fl, sh = draw_augment(self.rngs[r], n, self.aug.max_shift)
            if not st:
                continue
            blk = np.full(st * bs, n, np.int64)          # padding (n) sorts after every row
            blk[:n] = order
            blk = blk.reshape(st, bs)
            j = np.argsort(blk, axis=1, kind="stable")[:, :B]
            srt = np.take_along_axis(blk, j, 1)           # np.sort(order[i:i + bs]) per step
            ok = srt < n
            k = ok.sum(1)
            idx[:st, r] = np.where(ok, tr[r][np.minimum(srt, n - 1)], 0)
            msk[:st, r] = ok
            active[:st, r] = (k >= 2) | ((k == 1) & (not self.has_bn))
            if aug:                                       # each sample keeps its draw
                pos = np.minimum(np.arange(st)[:, None] * bs + j, n - 1)
                flip[:st, r] = ok & fl[pos]
                shift[:st, r] = np.where(ok[..., None], sh[pos], 0)
            if self.mixup:                                # recipes.mixed_loss's draws
                for s in np.flatnonzero(k >= 2):
                    lam[s, r] = self.rngs[r].beta(self.mixup, self.mixup)
                    perm[s, r, :k[s]] = self.rngs[r].permutation(k[s])
        t = lambda a: torch.as_tensor(a, device=self.dev)      # noqa: E731
        sc = torch.as_tensor(self.opt.plan(active), dtype=self.Xd.dtype, device=self.dev)
        return {"S": S, "idx": t(idx), "mask": t(msk & active[:, :, None]).float(),
                "active": t(active), "flip": t(flip), "shift": t(shift), "sc": sc,
                "lam": torch.as_tensor(lam, dtype=self.Xd.dtype, device=self.dev),
                "perm": t(perm) if perm is not None else None}

    def run_epoch(self, plan: dict) -> np.ndarray:
        """The epoch's steps, with no host sync inside; the mean training loss per replica.
        On CUDA (`graphs`) the step is captured once as a CUDA graph and replayed."""
        self.base.train()
        self.total.zero_()
        if self.graphs is not None:
            self._graphed_epoch(plan)
        else:
            for s in range(plan["S"]):
                self._step({k: plan[k][s] for k in self._STEP if plan[k] is not None})
        return self.total.cpu().numpy() / np.maximum([len(t) for t in self.tr], 1)

    _STEP = ("idx", "mask", "active", "flip", "shift", "sc", "lam", "perm")

    def _step(self, cur: dict) -> None:
        """One step of every replica from its slice of the epoch plan (`cur`: idx, mask,
        active, flip, shift, sc, lam, perm of this step): device work only, no host sync and
        no branch on data, so that a CUDA graph of it replays it exactly."""
        it = cur["idx"]
        xb, yb = self.Xd[it], self.Yd[it]
        if self.aug is not None:
            xb = augment_inputs(xb, cur["flip"], cur["shift"][..., 0], cur["shift"][..., 1],
                                self.aug.u_channel if self.aug.kind == "flow" else None)
        mk = cur["mask"]
        sw = torch.gather(self.cw, 1, yb) * mk
        if self.mixup:
            pm, lam = cur["perm"], cur["lam"]
            rows = torch.arange(self.R, device=self.dev)[:, None]
            lx = lam.reshape((self.R,) + (1,) * (xb.dim() - 1))
            xb = lx * xb + (1.0 - lx) * xb[rows, pm]
            yb2 = yb[rows, pm]
            sw2 = torch.gather(self.cw, 1, yb2) * mk
            grads, (loss, upd) = self.mix_fn(self.params, self.frozen, self.buffers, xb, yb,
                                             sw, yb2, sw2, lam, mk)
        else:
            grads, (loss, upd) = self.step_fn(self.params, self.frozen, self.buffers, xb, yb,
                                              sw, mk)
        sc = cur["sc"]
        self.opt.step(self.params, grads, sc, sc[1] > 0.5 if self.opt_kind == "sgd" else None)
        a = cur["active"]
        with torch.no_grad():
            self._apply_bn(upd, a)
            if self.ema:
                self._average(a, self.ema)
            self.total += torch.where(a, loss.double() * mk.sum(1).double(), 0.0)

    def _static_step(self) -> None:
        """`_step` on step `self._ctr` of the static plan (`self._gplan`), then the counter
        advances: the same addresses every step, as a CUDA graph needs."""
        self._step({k: v.index_select(0, self._ctr).squeeze(0) for k, v in self._gplan.items()})
        self._ctr.add_(1)

    def _graphed_epoch(self, plan: dict) -> None:
        """The epoch through `_static_step`: the plan copied into static buffers (allocated at
        the first epoch: later epochs have at most as many steps), on CUDA the first
        `GRAPH_WARMUP` steps run eagerly on a side stream, the next one is captured (recorded,
        not run) and every later step, this epoch and after, replays the graph. A capture
        that fails falls back to eager steps (`graph_error` says why)."""
        S = plan["S"]
        cur = {k: plan[k] for k in self._STEP if plan[k] is not None}
        if self._gplan is None or any(v.shape[0] < S or v.shape[1:] != cur[k].shape[1:]
                                      for k, v in self._gplan.items()):
            self._gplan, self._graph = {k: v.clone() for k, v in cur.items()}, None
            self._ctr = torch.zeros(1, dtype=torch.long, device=self.dev)
        else:
            for k, v in cur.items():
                self._gplan[k][:S].copy_(v)
        self._ctr.zero_()
        s = 0
        if self._graph is None and self.graphs == "cuda" and S > GRAPH_WARMUP:
            side = torch.cuda.Stream(self.dev)
            side.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP):
                    self._static_step()
            torch.cuda.current_stream(self.dev).wait_stream(side)
            s = GRAPH_WARMUP
            try:
                g = torch.cuda.CUDAGraph()
                # captured on the warm-up's stream: its library handles and workspaces (cuBLAS
                # keeps them per stream) exist by then, none is created mid-capture
                with torch.cuda.graph(g, stream=side):
                    self._static_step()
                self._graph = g
            except Exception as e:              # noqa: BLE001: eager steps are always right
                torch.cuda.synchronize(self.dev)
                self.graphs, self.graph_error = None, f"{type(e).__name__}: {e}"
                self._ctr.fill_(s)
        for _ in range(s, S):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._static_step()

    def _apply_bn(self, upd: dict, a: torch.Tensor, buffers: dict | None = None) -> None:
        """BatchNorm running-stat updates of the replicas that stepped (`a`), into `buffers`
        (the live ones by default)."""
        buffers = self.buffers if buffers is None else buffers
        for name, (rm, rv) in upd.items():
            for suffix, new in ((".running_mean", rm), (".running_var", rv)):
                old = buffers[name + suffix]
                old.copy_(_where(a, new, old))
        for k in self.nbt_keys:
            buffers[k].add_(a.to(buffers[k].dtype))

    @torch.no_grad()
    def _average(self, a: torch.Tensor, decay: float | None) -> None:
        """Fold the current weights into the average of the replicas in `a`: an EMA step
        (`decay`) or an SWA epoch (decay None: equal weights over the epochs so far), as
        `recipes.WeightAverage`; integer buffers are copied."""
        if decay is None:
            self.swa_count += 1
        for src, dst in ((self.params, self.avg_p), (self.buffers, self.avg_b)):
            for k, v in src.items():
                avg = dst[k]
                if not v.is_floating_point():
                    new = v
                elif decay is None:
                    new = avg.add(v - avg, alpha=1.0 / self.swa_count)
                else:
                    new = avg.mul(decay).add(v, alpha=1.0 - decay)
                avg.copy_(_where(a, new, avg))

    def end_epoch(self, epoch: int) -> None:
        """SWA: the epoch's weights join the average from `swa_from` on."""
        if self.swa_from is not None and epoch >= self.swa_from:
            self._average(torch.ones(self.R, dtype=torch.bool, device=self.dev), None)

    @torch.no_grad()
    def recompute_batchnorm(self) -> None:
        """`recipes.recompute_batchnorm` for every replica's averaged weights: statistics
        reset, then the cumulative mean over the replica's training rows in batches, in their
        order, skipping batches of one (no augmentation)."""
        bns = [m for m in self.base.modules() if isinstance(m, MaskedBatchNorm)]
        if not bns:
            return
        for m in bns:
            if m.running_mean is not None:
                self.avg_b[m._fb_name + ".running_mean"].zero_()
                self.avg_b[m._fb_name + ".running_var"].fill_(1.0)
                self.avg_b[m._fb_name + ".num_batches_tracked"].zero_()
        moments = [m.momentum for m in bns]
        for m in bns:
            m.momentum = None
        self.base.train()

        def stats(p, fz, b, x, mask):
            _CTX.mask, _CTX.updates = mask, {}
            try:
                functional_call(self.base, (p, fz, b), (x,))
                return _CTX.updates
            finally:
                _CTX.mask, _CTX.updates = None, None
        pass_fn = vmap(stats, randomness="different")
        try:
            for i in range(0, max(len(t) for t in self.tr), self.bs):
                groups = [t[i:i + self.bs] for t in self.tr]
                idx, mask = pad_rows(groups)
                a = torch.as_tensor([len(g) > 1 for g in groups], device=self.dev)
                mt = torch.as_tensor(mask, device=self.dev).float() * a[:, None]
                upd = pass_fn(self.avg_p, self.frozen, self.avg_b,
                              self.Xd[torch.as_tensor(idx, device=self.dev)], mt)
                self._apply_bn(upd, a, self.avg_b)
        finally:
            for m, mom in zip(bns, moments):
                m.momentum = mom

    def validate(self, epoch: int, live: np.ndarray, rows: dict) -> None:
        """Validation scores per replica with a split; keep each replica's best weights."""
        vl = [r for r in live if self.use_val[r]]
        if not vl:
            return
        probs = self.predict([self.va[r] if r in set(vl) else self.va[r][:0] for r in range(self.R)])
        improved = np.zeros(self.R, bool)
        for r in vl:
            yv, pv = self.y[self.va[r]], probs[r]
            nll = -np.log(np.clip(pv[np.arange(len(yv)), yv], 1e-12, None)).mean()
            s = scores(yv, pv.argmax(1), self.num_classes)
            ev = {"loss": float(nll), "uf1": s["uf1"], "uar": s["uar"], "accuracy": s["accuracy"]}
            rows[r].update({f"val/{k}": v for k, v in ev.items()})
            if ev["loss"] < self.best[r] - 1e-6:
                self.best[r], self.stale[r], self.results[r].best_epoch = ev["loss"], 0, epoch
                improved[r] = True
            else:
                self.stale[r] += 1
        if improved.any():
            imp = torch.as_tensor(improved, device=self.dev)
            with torch.no_grad():
                for src, dst in zip(self.scored(), (self.best_p, self.best_b)):
                    for k, v in src.items():
                        dst[k].copy_(_where(imp, v, dst[k]))

    def finish(self) -> list[ReplicaResult]:
        """Kept weights (the best validation epoch, else the final one), test probabilities."""
        res = self.results
        keep_best = np.array([self.use_val[r] and res[r].best_epoch > 0 for r in range(self.R)])
        if self.swa_from is not None:
            self.recompute_batchnorm()
        if self.averaging:                      # from here on the kept weights are the average
            self.params, self.buffers = self.avg_p, self.avg_b
            self.averaging = False
        with torch.no_grad():
            if keep_best.any():
                kb = torch.as_tensor(keep_best, device=self.dev)
                for src, dst in ((self.best_p, self.params), (self.best_b, self.buffers)):
                    for k, v in src.items():
                        dst[k].copy_(_where(kb, v, dst[k]))
        for r in range(self.R):
            if not keep_best[r]:
                res[r].best_epoch = len(res[r].history)
        probs = self.predict(self.te)
        allp = {**self.params, **self.frozen, **self.buffers}
        host = {k: allp[k].detach().cpu() for k in self.keys}   # one copy a tensor, not a replica
        for r in range(self.R):         # each its own storage (a view would pickle them all)
            res[r].state = {k: host[k][r].clone() for k in self.keys}
            res[r].probs = probs[r]
        return res


def fit_batched(make_model: Callable[[], nn.Module], X: np.ndarray, y: np.ndarray,
                replicas: Sequence[Replica], tcfg, num_classes: int,
                to_input: Callable[[np.ndarray], torch.Tensor], augment=None,
                device=None, initial_states: Sequence[dict] | None = None,
                eval_chunk: int = 256, vmap_chunk: int | str | None = "auto",
                on_epoch: Callable[[int], None] | None = None,
                graphs: str | None = None) -> list[ReplicaResult]:
    """Train every replica in lockstep (the module docstring says how). `X` is every sample
    any replica uses, as `to_input` takes it; `tcfg` has epochs, batch_size, lr, optimizer,
    weight_decay, early_stopping, class_weighted, device (and cuda_graphs); `augment` is None,
    'flow', 'frames' or a `stacked.TorchAugment`; `graphs` 'auto' (the step as a CUDA graph
    on CUDA), 'static' or None (default: 'auto' unless `tcfg.cuda_graphs` is false). One
    ReplicaResult per replica, in order; its `step_path` says how the steps ran."""
    if not replicas:
        return []
    device = device if device is not None else getattr(tcfg, "device", "auto")
    if graphs is None:
        graphs = "auto" if getattr(tcfg, "cuda_graphs", True) else None
    with sdpa_kernel([SDPBackend.MATH]):    # attention as plain ops: the fused kernels have no vmap rule
        return _fit(make_model, X, y, replicas, tcfg, num_classes, to_input, augment, device,
                    initial_states, eval_chunk, vmap_chunk, on_epoch, graphs)


def _fit(make_model, X, y, replicas, tcfg, num_classes, to_input, augment, device,
         initial_states, eval_chunk, vmap_chunk, on_epoch, graphs) -> list[ReplicaResult]:
    ls = Lockstep(make_model, X, y, replicas, tcfg, num_classes, to_input, augment,
                  device, initial_states, eval_chunk, vmap_chunk, graphs)
    for epoch in range(1, ls.epochs + 1):
        live = np.flatnonzero(~ls.done)
        if not len(live):
            break
        train_loss = ls.run_epoch(ls.plan_epoch(live))
        ls.end_epoch(epoch)
        rows = {r: {"epoch": epoch, "train/loss": float(train_loss[r])} for r in live}
        ls.validate(epoch, live, rows)
        for r in live:
            ls.results[r].history.append(rows[r])
            if ls.patience and ls.stale[r] >= ls.patience:
                ls.done[r] = True
        if on_epoch is not None:
            on_epoch(epoch)
    results = ls.finish()
    path = ("cuda graph" if ls._graph is not None else
            f"eager (graph capture failed: {ls.graph_error})" if ls.graph_error else
            "static" if ls.graphs == "static" else "eager")
    for r in results:
        r.step_path = path
    return results
