"""Reference bilevel problems with a known hypergradient, for tests and benchmarks.

Both problems tune one L2 weight per feature, ``exp(lam_i)``, on real data shipped offline with
scikit-learn (``load_diabetes``, ``load_breast_cancer``) or on a synthetic design:

    g(w, lam) = loss(X_tr w, y_tr) + 1/2 sum_i exp(lam_i) w_i^2        (inner, on the train split)
    f(w, lam) = loss(X_val w, y_val)                                   (outer, on the validation split)

so ``J = d2g/dlam dw = diag(exp(lam) * w)`` and the exact hypergradient is

    grad F(lam) = -(exp(lam) * w*) * (H^{-1} grad_w f(w*)),   H = d2g/dw2 at w* = argmin_w g.

``loss`` is ``1/2 mean((X w - y)^2)`` (ridge: ``w*`` in closed form) or the mean logistic loss
with labels in {-1, +1} (``w*`` by Newton's method to machine precision). The Hessians here are
formed explicitly on purpose: these are the reference answers the solvers are checked against.
Requires scikit-learn for the real data sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import softplus

from ._tree import Tree
from .problem import BilevelProblem

__all__ = ["Example", "LogisticL2", "RidgeL2", "example", "logistic_breast_cancer", "ridge_diabetes", "ridge_synthetic"]


def _standardize_split(X: np.ndarray, y: np.ndarray, seed: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))
    X = (X - X.mean(0)) / X.std(0)
    cut = (2 * len(X)) // 3
    tr, va = idx[:cut], idx[cut:]
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    return t(X[tr]), t(y[tr]), t(X[va]), t(y[va])


@dataclass
class RidgeL2:
    """Ridge regression with per-feature L2 weights ``exp(lam)`` (see the module docstring)."""

    X_tr: Tensor
    y_tr: Tensor
    X_val: Tensor
    y_val: Tensor

    @property
    def dim(self) -> int:
        return self.X_tr.shape[1]

    @property
    def inner_batch(self) -> tuple[Tensor, Tensor]:
        return self.X_tr, self.y_tr

    @property
    def outer_batch(self) -> tuple[Tensor, Tensor]:
        return self.X_val, self.y_val

    @staticmethod
    def loss(w: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, y = batch
        return 0.5 * ((X @ w - y) ** 2).mean()

    def inner(self, params: Tree, hparams: Tree, batch: tuple[Tensor, Tensor]) -> Tensor:
        w = params["w"]
        return self.loss(w, batch) + 0.5 * (hparams["lam"].exp() * w * w).sum()

    def outer(self, params: Tree, hparams: Tree, batch: tuple[Tensor, Tensor]) -> Tensor:
        return self.loss(params["w"], batch)

    def problem(self) -> BilevelProblem:
        return BilevelProblem(inner=self.inner, outer=self.outer)

    def hparams(self, value: float = 0.0) -> Tree:
        return {"lam": torch.full((self.dim,), float(value), dtype=self.X_tr.dtype)}

    def hessian(self, lam: Tensor) -> Tensor:
        n = self.X_tr.shape[0]
        return self.X_tr.T @ self.X_tr / n + torch.diag(lam.exp())

    def solution(self, hparams: Tree) -> Tree:
        """``w* = (X^T X / n + diag(exp(lam)))^{-1} X^T y / n``."""
        n = self.X_tr.shape[0]
        return {"w": torch.linalg.solve(self.hessian(hparams["lam"]), self.X_tr.T @ self.y_tr / n)}

    def hyperobjective(self, hparams: Tree) -> Tensor:
        """``F(lam) = f(w*(lam))``."""
        return self.loss(self.solution(hparams)["w"], self.outer_batch)

    def exact_hypergrad(self, hparams: Tree) -> Tree:
        lam = hparams["lam"]
        w = self.solution(hparams)["w"]
        m = self.X_val.shape[0]
        f_w = self.X_val.T @ (self.X_val @ w - self.y_val) / m
        return {"lam": -(lam.exp() * w) * torch.linalg.solve(self.hessian(lam), f_w)}

    def curvature(self, hparams: Tree) -> tuple[float, float]:
        """``(mu, L)``: the smallest and largest eigenvalues of the inner Hessian."""
        ev = torch.linalg.eigvalsh(self.hessian(hparams["lam"]))
        return float(ev[0]), float(ev[-1])


@dataclass
class LogisticL2(RidgeL2):
    """L2-regularised logistic regression (labels in {-1, +1}); the inner problem is solved by Newton."""

    @staticmethod
    def loss(w: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        X, y = batch
        return softplus(-y * (X @ w)).mean()

    def hessian_at(self, w: Tensor, lam: Tensor) -> Tensor:
        X = self.X_tr
        s = torch.sigmoid(X @ w)
        return (X.T * (s * (1 - s))) @ X / X.shape[0] + torch.diag(lam.exp())

    def hessian(self, lam: Tensor) -> Tensor:
        return self.hessian_at(self.solution({"lam": lam})["w"], lam)

    def solution(self, hparams: Tree, max_iter: int = 100) -> Tree:
        """``w* = argmin_w g(w, lam)`` by Newton's method, to ``||grad g|| <= 1e-14``."""
        lam = hparams["lam"]
        X, y = self.X_tr, self.y_tr
        w = torch.zeros(X.shape[1], dtype=X.dtype)
        for _ in range(max_iter):
            grad = -(X.T @ (y * torch.sigmoid(-y * (X @ w)))) / X.shape[0] + lam.exp() * w
            if float(grad.norm()) <= 1e-14:
                break
            w = w - torch.linalg.solve(self.hessian_at(w, lam), grad)
        else:
            raise RuntimeError("Newton's method did not converge in LogisticL2.solution")
        return {"w": w}

    def exact_hypergrad(self, hparams: Tree) -> Tree:
        lam = hparams["lam"]
        w = self.solution(hparams)["w"]
        Xv, yv = self.X_val, self.y_val
        f_w = -(Xv.T @ (yv * torch.sigmoid(-yv * (Xv @ w)))) / Xv.shape[0]
        return {"lam": -(lam.exp() * w) * torch.linalg.solve(self.hessian_at(w, lam), f_w)}


def ridge_diabetes(seed: int = 0, dtype: torch.dtype = torch.float64) -> RidgeL2:
    """Ridge on scikit-learn's ``load_diabetes`` (442 x 10; standardised; 2/3 train, 1/3 validation)."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    return RidgeL2(*_standardize_split(X, (y - y.mean()) / y.std(), seed, dtype))


def ridge_synthetic(d: int = 200, n: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float64) -> RidgeL2:
    """Ridge on a Gaussian design with ``n = 3 d`` rows (default), a sparse truth and noise 0.5."""
    rng = np.random.default_rng(seed)
    n = 3 * d if n is None else n
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d) * (rng.random(d) < 0.2)
    y = X @ w + 0.5 * rng.standard_normal(n)
    return RidgeL2(*_standardize_split(X, y, seed, dtype))


def logistic_breast_cancer(seed: int = 0, dtype: torch.dtype = torch.float64) -> LogisticL2:
    """Logistic regression on scikit-learn's ``load_breast_cancer`` (569 x 30; standardised)."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    return LogisticL2(*_standardize_split(X, 2.0 * y - 1.0, seed, dtype))


@dataclass(frozen=True)
class Example:
    """A reference problem at one point, ready for a solver (the setup the solvers' examples share).

    Attributes:
        ref: the problem (:class:`RidgeL2`); hparams: ``{"lam": [d]}``; params: the inner minimiser
            ``theta*(phi)``; args: ``(problem, params, hparams, inner_batch, outer_batch)``, a solver's
            ``hypergrad`` arguments; exact: the exact ``dF/dlam`` [d]; mu, L: the extreme eigenvalues of the inner
            Hessian.
    """

    ref: RidgeL2
    hparams: dict[str, Tensor]
    params: dict[str, Tensor]
    args: tuple[Any, ...]
    exact: Tensor
    mu: float
    L: float


def example(d: int = 5, lam: float = -2.0) -> Example:
    """:func:`ridge_synthetic` with ``d`` parameters at ``lam`` (every L2 weight ``exp(lam)``), at its inner
    minimiser, with the exact hypergradient: the shared setup of the solver examples.

    Examples:
        >>> from bilevel.testing import example
        >>> ex = example()
        >>> ex.exact.shape, len(ex.args), bool(ex.mu <= ex.L)
        (torch.Size([5]), 5, True)
    """
    ref = ridge_synthetic(d=d)
    hparams = ref.hparams(lam)
    params = ref.solution(hparams)
    mu, L = ref.curvature(hparams)
    args = (ref.problem(), params, hparams, ref.inner_batch, ref.outer_batch)
    return Example(ref, hparams, params, args, ref.exact_hypergrad(hparams)["lam"], float(mu), float(L))
