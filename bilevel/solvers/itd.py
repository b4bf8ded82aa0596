"""ITD: iterative differentiation, reverse mode through ``steps`` unrolled inner updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .._checks import check_choice, check_int, check_positive, check_unit_interval
from .._tree import Tree
from ..problem import check_differentiable, check_finite
from ..products import grad_tree, leaves
from .base import Solver

Optimizer = Literal["sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")


@dataclass
class ITD(Solver):
    """Differentiate ``f(theta_T(phi), phi)`` through ``T = steps`` unrolled inner updates.

    ``theta_0 = params`` is a constant; with ``optimizer="sgd"``

        theta_{t+1} = theta_t - lr * grad_theta g(theta_t, phi; inner_batch)

    and ``dF/dphi`` is obtained by reverse mode through the whole trajectory (with
    :func:`torch.autograd.grad` with ``create_graph=True``: 2-3x less fixed cost per step than
    the same unroll under :func:`torch.func.grad` on small problems, and it admits collectives).
    Exact for the truncated problem; at ``theta_0 = theta*`` it equals
    :class:`~bilevel.AIDFP` with ``alpha=lr, iters=steps-1``. ``steps=1`` is Meta-Weight-Net's
    one-step look-ahead. **Memory grows linearly with ``steps``**: every step's graph is kept for
    the backward pass (measured in ``benchmarks/hypergrad_accuracy.py``).

    Differentiable optimizers: ``"momentum"`` (heavy ball as ``torch.optim.SGD``:
    ``b_t = momentum b_{t-1} + g_t``, ``b_0 = g_0``; ``theta -= lr b_t``) and ``"adam"``
    (``theta -= lr m_hat / (sqrt(v_hat + eps_root) + eps)``; ``eps_root > 0`` keeps the derivative
    of the square root finite where a gradient entry is zero, as optax's ``eps_root``).

    Data-parallel (``reduce=`` an all-reduce mean over ranks, e.g.
    :func:`bilevel.distributed.all_reduce_mean`): every unrolled step uses the rank-averaged
    gradient, ``theta_{t+1} = theta_t - lr * mean_r grad_theta g_r(theta_t, phi)``, inside the
    differentiated trajectory; the backward pass through each average is again a rank average (the
    rank mean is self-adjoint), and the final result is the rank mean of the local gradients. With
    equal shards this is the whole-batch ITD hypergradient on every rank; ``reduce`` must be the
    rank *mean* (linear and self-adjoint).

    Examples:
        Started at the inner minimiser, ITD with ``steps=T, lr=alpha`` equals AID-FP with
        ``iters=T-1, alpha=alpha``:

        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import ridge_synthetic
        >>> ref = ridge_synthetic(d=5)  # ridge regression with L2 weights exp(lam), exact answers
        >>> hparams = ref.hparams(-2.0)
        >>> params = ref.solution(hparams)  # the inner minimiser theta*(phi)
        >>> exact = ref.exact_hypergrad(hparams)["lam"]
        >>> mu, L = ref.curvature(hparams)  # extreme eigenvalues of the inner Hessian
        >>> args = (ref.problem(), params, hparams, ref.inner_batch, ref.outer_batch)
        >>> hg = bl.ITD(steps=30, lr=1 / L).hypergrad(*args)
        >>> fp = bl.AIDFP(iters=29, alpha=1 / L).hypergrad(*args)
        >>> torch.allclose(hg["lam"], fp["lam"], rtol=1e-8, atol=1e-12)
        True
        >>> adam = bl.ITD(steps=5, lr=0.1, optimizer="adam")  # differentiable Adam steps
        >>> adam.hypergrad(*args)["lam"].shape
        torch.Size([5])
    """

    steps: int = 10
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16

    name = "itd"

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 0)
        check_positive("lr", self.lr)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_unit_interval("momentum", self.momentum)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        check_positive("eps", self.eps)
        if not self.eps_root >= 0.0:
            raise ValueError(f"eps_root must be >= 0, got {self.eps_root!r}")

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, call):
        g = problem.objective("inner", "unrolled inner steps of ITD")
        f = problem.objective("outer", "f after the unrolled steps of ITD")
        reduce, info = call.reduce, call.info
        with call.stage("unroll_and_backward"), torch.enable_grad():
            phi, theta = leaves(hparams), leaves(params)
            state: dict[str, Tree] = {}
            values = []
            for t in range(self.steps):
                g_val = g(theta, phi, inner_batch)
                check_finite(g_val.detach(), "inner", f"unrolled step {t} of ITD")
                check_differentiable(g_val, "inner", f"unrolled step {t} of ITD")
                values.append(g_val.detach())
                g_theta = grad_tree(g_val, theta, create_graph=True)
                if reduce is not None:
                    g_theta = dict(
                        zip(g_theta, _ReduceMean.apply(reduce, list(g_theta), *g_theta.values()), strict=True)
                    )
                theta = _step(self, theta, g_theta, state, t)
            f_val = f(theta, phi, outer_batch)
            check_finite(f_val.detach(), "outer", "f after the unrolled steps of ITD")
            hg = grad_tree(f_val, phi)
        info.iters = self.steps
        info.inner_value = float(values[0]) if values else None
        info.outer_value = float(f_val.detach())
        return hg if reduce is None else reduce(hg)


def _step(opt: ITD, theta: Tree, g: Tree, state: dict[str, Tree], t: int) -> Tree:
    """One differentiable update ``theta_{t+1}`` of ``opt.optimizer`` (``state`` carries its buffers)."""
    lr = opt.lr
    if opt.optimizer == "sgd":
        return {k: theta[k] - lr * g[k] for k in theta}
    if opt.optimizer == "momentum":
        buf = g if t == 0 else {k: opt.momentum * state["buf"][k] + g[k] for k in g}
        state["buf"] = buf
        return {k: theta[k] - lr * buf[k] for k in theta}
    b1, b2 = opt.betas
    m = {k: (b1 * state["m"][k] if t else 0.0) + (1 - b1) * g[k] for k in g}
    v = {k: (b2 * state["v"][k] if t else 0.0) + (1 - b2) * g[k] * g[k] for k in g}
    state["m"], state["v"] = m, v
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    return {k: theta[k] - lr * (m[k] / c1) / (torch.sqrt(v[k] / c2 + opt.eps_root) + opt.eps) for k in theta}


class _ReduceMean(torch.autograd.Function):
    """``y = reduce(x)`` (a rank mean) whose backward is ``reduce`` of the incoming gradient."""

    @staticmethod
    def forward(ctx, reduce, keys, *tensors):  # type: ignore[override]
        ctx.reduce, ctx.keys = reduce, keys
        out = reduce(dict(zip(keys, (t.detach() for t in tensors), strict=True)))
        return tuple(out[k].clone() for k in keys)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        red = ctx.reduce(dict(zip(ctx.keys, grads, strict=True)))  # grads are materialised (never None)
        return (None, None, *(red[k] for k in ctx.keys))
