"""scikit-learn baselines on the flattened input, behind the one model interface: `logreg`
(multinomial logistic regression) and `svm_rbf` (an RBF-kernel SVM).

They are fitted in closed form, not by epochs: `mexp.engine.training.fit` sees `fit_numpy` and calls it
with the fold's training samples (after the stage's own `to_input`) and, if the config asks
for it, the same inverse-frequency class weights the nets' loss gets. Features are standardised
with the training samples' mean and sd only. What the estimator learned is copied into buffers
and `forward` recomputes its scores in torch, so `state_dict` is the fitted model (the fold's
weights file, refit, serving) and `predict_proba` is the engine's. Hyperparameters are
scikit-learn's defaults (C = 1; gamma = 'scale'), fixed in advance, never tuned on test folds.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from mexp.models.registry import register_model

ABSENT = -1e4        # logit of a class the training samples did not have: probability 0


class FlatEstimator(nn.Module):
    """A closed-form classifier on standardised flattened inputs: (B, ...) -> (B, num_classes).
    Unfitted, it scores every class 0 (uniform probabilities)."""

    def __init__(self, num_classes: int = 3, C: float = 1.0):
        super().__init__()
        self.num_classes, self.C = num_classes, C
        self.register_buffer("mean", torch.zeros(0))          # (D,)
        self.register_buffer("scale", torch.ones(0))          # (D,)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))  # (m,) seen in training

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)                                       # (B, C, H, W) -> (B, D)
        return (z - self.mean) / self.scale if self.fitted else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.forward_features(x)
        out = z.new_zeros(len(z), self.num_classes)
        if not self.fitted:
            return out
        out.fill_(ABSENT)
        scores = self._scores(z) if len(self.classes) > 1 else z.new_zeros(len(z), 1)
        out[:, self.classes] = scores                          # (B, m) into (B, num_classes)
        return out

    def fit_numpy(self, x: np.ndarray, y: np.ndarray, class_weight=None, seed: int = 0):
        """Fit on (N, ...) inputs and labels; `class_weight`: per-class weights (length
        num_classes) or None."""
        z = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        mean, scale = z.mean(0), z.std(0)
        scale[scale < 1e-8] = 1.0                              # constant pixels stay 0
        z = (z - mean) / scale
        present = np.unique(y)
        self._store(mean=mean, scale=scale)
        self.classes = torch.as_tensor(present, dtype=torch.long)
        if len(present) > 1:
            from threadpoolctl import threadpool_limits
            weights = None if class_weight is None else \
                {int(c): float(class_weight[c]) for c in present}
            with threadpool_limits(1):      # small problems: more BLAS threads only contend
                self._fit(z, np.asarray(y), weights, seed)
        return self

    @torch.no_grad()
    def predict_proba_numpy(self, x: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.mean.device)
        return torch.softmax(self(x), 1).cpu().numpy()                 # (N, num_classes)

    def _store(self, **arrays) -> None:
        for name, a in arrays.items():
            setattr(self, name, torch.as_tensor(np.asarray(a), dtype=torch.float32))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Fitted buffers have data-dependent shapes: take the checkpoint's shapes."""
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if saved is not None and buf is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty_like(saved, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fit(self, z, y, weights, seed) -> None:
        raise NotImplementedError

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_model("logreg")
class LogReg(FlatEstimator):
    """L2 multinomial logistic regression (lbfgs). Its softmax is scikit-learn's predict_proba."""

    def __init__(self, num_classes: int = 3, C: float = 1.0, max_iter: int = 2000):
        super().__init__(num_classes, C)
        self.max_iter = max_iter
        self.register_buffer("coef", torch.zeros(0, 0))       # (m, D)
        self.register_buffer("intercept", torch.zeros(0))     # (m,)

    def _fit(self, z, y, weights, seed) -> None:
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=weights,
                                 random_state=seed).fit(z, y)
        coef, b = clf.coef_, clf.intercept_
        if len(clf.classes_) == 2:          # binary: one row, the log-odds of classes_[1]
            coef, b = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, b]
        self._store(coef=coef, intercept=b)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.coef.T + self.intercept               # (B, m)


@register_model("svm_rbf")
class SVMRBF(FlatEstimator):
    """RBF-kernel SVM (libsvm one-vs-one, C = 1, gamma = 1 / (D * var) as 'scale'). Its logits
    are scikit-learn's one-vs-rest `decision_function` (pairwise votes plus a confidence term in
    (-1/3, 1/3)), so the argmax is SVC's prediction; the softmax of them is a ranking, not a
    calibrated probability (Platt scaling, `probability=True`, would run a random internal
    5-fold CV over samples and can disagree with the prediction)."""

    def __init__(self, num_classes: int = 3, C: float = 1.0):
        super().__init__(num_classes, C)
        self.register_buffer("support", torch.zeros(0, 0))    # (S, D) support vectors
        self.register_buffer("pair_coef", torch.zeros(0, 0))  # (S, P) dual coefficients per pair
        self.register_buffer("pair_bias", torch.zeros(0))     # (P,)
        self.register_buffer("gamma", torch.zeros(()))

    def _fit(self, z, y, weights, seed) -> None:
        from sklearn.svm import SVC
        gamma = 1.0 / (z.shape[1] * z.var()) if z.var() > 0 else 1.0
        svc = SVC(C=self.C, kernel="rbf", gamma=gamma, class_weight=weights,
                  random_state=seed).fit(z, y)
        m, dual = len(svc.classes_), svc.dual_coef_           # (m - 1, S), grouped by class
        start = np.r_[0, np.cumsum(svc.n_support_)]
        pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        coef = np.zeros((dual.shape[1], len(pairs)))
        for p, (i, j) in enumerate(pairs):   # libsvm's layout of one-vs-one coefficients
            coef[start[i]:start[i + 1], p] = dual[j - 1, start[i]:start[i + 1]]
            coef[start[j]:start[j + 1], p] = dual[i, start[j]:start[j + 1]]
        bias = svc.intercept_
        if m == 2:                           # scikit-learn flips the binary case's signs
            coef, bias = -coef, -bias
        self._store(support=svc.support_vectors_, pair_coef=coef, pair_bias=bias, gamma=gamma)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        k = torch.exp(-self.gamma * torch.cdist(z, self.support).square())   # (B, S)
        dec = k @ self.pair_coef + self.pair_bias            # (B, P): >= 0 votes for i
        pairs = torch.combinations(torch.arange(len(self.classes), device=z.device), 2)
        first = nn.functional.one_hot(pairs[:, 0], len(self.classes)).to(z.dtype)   # (P, m)
        second = nn.functional.one_hot(pairs[:, 1], len(self.classes)).to(z.dtype)
        votes = (dec >= 0).to(z.dtype) @ first + (dec < 0).to(z.dtype) @ second
        conf = dec @ first - dec @ second                     # (B, m)
        return votes + conf / (3 * (conf.abs() + 1))          # scikit-learn's ovr transform
