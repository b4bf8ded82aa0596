"""Shared fixtures: the reference problems of :mod:`bilevel.testing` and random quadratic problems."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor

import bilevel as bl
from bilevel.testing import logistic_breast_cancer, ridge_diabetes, ridge_synthetic


def rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """||a - b|| / ||b|| over all leaves."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread (faster for tiny problems on a shared CPU); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def diabetes():
    return ridge_diabetes()


@pytest.fixture(scope="session")
def synthetic200():
    return ridge_synthetic(d=200)


@pytest.fixture(scope="session")
def breast_cancer():
    return logistic_breast_cancer()


@dataclass
class Quadratic:
    """g = 1/2 t^T A t + t^T B p + c^T t,   f = 1/2 ||C t - s||^2 + e^T p + 1/2 p^T E p.

    t* = -A^{-1}(B p + c),  J = B^T,  grad F = e + E p - B^T A^{-1} C^T (C t* - s).
    """

    A: Tensor
    B: Tensor
    c: Tensor
    C: Tensor
    s: Tensor
    e: Tensor
    E: Tensor

    def inner(self, params, hparams, batch):
        t, p = params["t"], hparams["p"]
        return 0.5 * t @ self.A @ t + t @ self.B @ p + self.c @ t

    def outer(self, params, hparams, batch):
        t, p = params["t"], hparams["p"]
        r = self.C @ t - self.s
        return 0.5 * r @ r + self.e @ p + 0.5 * p @ self.E @ p

    def problem(self) -> bl.BilevelProblem:
        return bl.BilevelProblem(inner=self.inner, outer=self.outer)

    def solution(self, hparams):
        return {"t": -torch.linalg.solve(self.A, self.B @ hparams["p"] + self.c)}

    def exact_hypergrad(self, hparams):
        p = hparams["p"]
        t = self.solution(hparams)["t"]
        ft = self.C.T @ (self.C @ t - self.s)
        return {"p": self.e + self.E @ p - self.B.T @ torch.linalg.solve(self.A, ft)}

    @property
    def L(self) -> float:
        return float(torch.linalg.eigvalsh(self.A)[-1])

    def to(self, dtype: torch.dtype) -> Quadratic:
        return Quadratic(*(getattr(self, k).to(dtype) for k in "A B c C s e E".split()))


def make_quadratic(n: int, m: int, cond: float, seed: int, direct: bool = True) -> Quadratic:
    """Random quadratic with inner dim ``n``, outer dim ``m``, Hessian eigenvalues in [1/cond, 1]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.logspace(-np.log10(cond), 0.0, n) if n > 1 else np.array([1.0])
    A = (q * eig) @ q.T
    A = 0.5 * (A + A.T)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    E = rng.standard_normal((m, m))
    return Quadratic(
        A=t(A),
        B=t(rng.standard_normal((n, m))),
        c=t(rng.standard_normal(n)),
        C=t(rng.standard_normal((n, n))),
        s=t(rng.standard_normal(n)),
        e=t(rng.standard_normal(m) if direct else np.zeros(m)),
        E=t(0.1 * E @ E.T if direct else np.zeros((m, m))),
    )


@pytest.fixture
def tiny_meltr_args():
    """``(problem, params, hparams, inner_batch, outer_batch)`` of the MELTR objectives on a tiny float64
    UniVL (training mode, no dropout) and four digit clips per batch: a MELTR-shaped hypergradient case."""
    from examples.meltr_video.data import Collate, Tokenizer, make_digit_clips
    from examples.meltr_video.meltr import MELTR, MELTRObjectives
    from examples.meltr_video.univl import LOSS_NAMES, UniVL, UniVLConfig

    torch.manual_seed(0)
    tok = Tokenizer.for_digits()
    cfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
    meltr = MELTR(LOSS_NAMES, hidden=8, d_model=16, ff=16, nhead=2).double()
    obj = MELTRObjectives(UniVL(cfg).double(), meltr, "alignment")
    d = make_digit_clips(0, sizes={"train": 4, "meta": 4})
    c = Collate(tok)

    def batch(split):
        b = c([d[split][i] for i in range(4)])
        return {k: v.double() if v.is_floating_point() else v for k, v in b.items()}

    return obj.problem(), obj.params, obj.hparams, batch("train"), batch("meta")


def itd_unroll(
    P, theta0, lam0, steps, lr, optimizer, k=None, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, eps_root=1e-16
):
    """ITD by hand in plain autograd, the reference of the ITD tests. ``k``: truncated back-propagation, the steps
    before ``steps - k`` on detached tensors, the last ``k`` with a graph (None: all of them)."""
    k = steps if k is None else k
    lam = lam0.clone().requires_grad_(True)
    w = theta0.clone()
    buf = m = v = None
    for t in range(steps):
        graph = t >= steps - k
        if graph and t == steps - k:  # cut here: theta and the buffers become constants
            w = w.detach().requires_grad_(True)
            buf, m, v = (None if x is None else x.detach() for x in (buf, m, v))
        w_in = w if graph else w.detach().requires_grad_(True)
        lam_in = lam if graph else lam.detach()
        (g,) = torch.autograd.grad(P.inner({"w": w_in}, {"lam": lam_in}, P.inner_batch), w_in, create_graph=graph)
        if optimizer == "sgd":
            step = g
        elif optimizer == "momentum":
            buf = g if buf is None else momentum * buf + g
            step = buf
        else:
            m = (1 - betas[0]) * g if m is None else betas[0] * m + (1 - betas[0]) * g
            v = (1 - betas[1]) * g * g if v is None else betas[1] * v + (1 - betas[1]) * g * g
            mh, vh = m / (1 - betas[0] ** (t + 1)), v / (1 - betas[1] ** (t + 1))
            step = mh / (torch.sqrt(vh + eps_root) + eps)
        w = w_in - lr * step
    (hg,) = torch.autograd.grad(P.outer({"w": w}, {"lam": lam}, P.outer_batch), lam)
    return {"lam": hg}
