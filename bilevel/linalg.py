"""Linear solvers for ``H v = b`` that touch ``H`` only through products ``p -> H p``.

``b`` and ``v`` are trees (``dict[str, Tensor]``) treated as one vector; ``hvp`` is any
callable ``p -> H p`` on such trees (e.g. :meth:`bilevel.products.Linearization.hvp`).
Both solvers keep O(1) trees alive, so their memory does not grow with the iteration count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ._tree import Tree, tree_add, tree_dot, tree_norm, tree_scale, tree_zeros_like
from .errors import NegativeCurvatureError, NegativeCurvatureWarning, NeumannDivergenceError, NeumannDivergenceWarning

__all__ = ["Policy", "SolveResult", "conjugate_gradient", "neumann_series"]

HVP = Callable[[Tree], Tree]
Policy = Literal["raise", "warn", "ignore"]
POLICIES: tuple[str, ...] = ("raise", "warn", "ignore")


@dataclass
class SolveResult:
    """What a linear solve did.

    Attributes:
        iters: iterations performed (HVPs used).
        residuals: CG: ``||b - H v_k||`` for k = 0..iters; Neumann: ``||p_j|| = ||(I - alpha H)^j b||``.
        converged: CG reached ``||r|| <= tol * ||b||``; None for Neumann (no stopping test).
        negative_curvature: CG met ``p^T H p <= 0`` and stopped there.
        diverged: the Neumann terms grew past ``divergence_factor * ||b||`` and the series stopped.
    """

    iters: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool | None = None
    negative_curvature: bool = False
    diverged: bool = False


def _handle(policy: str, error: type[Exception], warning: type[Warning], message: str) -> None:
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, warning, stacklevel=4)


def conjugate_gradient(
    hvp: HVP,
    b: Tree,
    iters: int,
    tol: float,
    on_negative_curvature: Policy = "warn",
) -> tuple[Tree, SolveResult]:
    """Solve ``H v = b`` by at most ``iters`` steps of conjugate gradient from ``v_0 = 0``.

    ``H`` must be symmetric. Stops when ``||b - H v_k|| <= tol * ||b||`` (relative residual).
    If a search direction has ``p^T H p <= 0`` (``H`` not positive definite), CG stops and returns
    its current iterate, or ``b`` itself if this happens at the first step (the identity
    approximation, as AID-FP-Lite); ``on_negative_curvature`` decides whether this raises
    :class:`~bilevel.errors.NegativeCurvatureError`, warns, or is only recorded in the result.
    """
    result = SolveResult(converged=False)
    b_norm = float(tree_norm(b))
    result.residuals.append(b_norm)
    v = tree_zeros_like(b)
    if b_norm == 0.0:
        result.converged = True
        return v, result
    r, p = b, b
    rs = b_norm**2
    for k in range(iters):
        hp = hvp(p)
        php = float(tree_dot(p, hp))
        result.iters = k + 1
        if not php > 0.0:  # also catches NaN
            result.negative_curvature = True
            _handle(
                on_negative_curvature,
                NegativeCurvatureError,
                NegativeCurvatureWarning,
                f"conjugate gradient met non-positive curvature p^T H p = {php:.3e} at iteration {k}: "
                "the inner Hessian is not positive definite at these params (not a strict minimum of g); "
                "the hypergradient uses the iterate reached so far",
            )
            return (b if k == 0 else v), result
        a = rs / php
        v = tree_add(v, p, a)
        r = tree_add(r, hp, -a)
        rs_new = float(tree_dot(r, r))
        result.residuals.append(math.sqrt(max(rs_new, 0.0)))
        if math.sqrt(max(rs_new, 0.0)) <= tol * b_norm:
            result.converged = True
            break
        p = tree_add(r, p, rs_new / rs)
        rs = rs_new
    return v, result


def neumann_series(
    hvp: HVP | Callable[[Tree, int], Tree],
    b: Tree,
    iters: int,
    alpha: float,
    on_divergence: Policy = "raise",
    divergence_factor: float = 10.0,
    stochastic: bool = False,
) -> tuple[Tree, SolveResult]:
    """Approximate ``H^{-1} b`` by the truncated Neumann series with ``iters`` + 1 terms:

        p_0 = b,  p_{j+1} = p_j - alpha H p_j,   v = alpha * (p_0 + p_1 + ... + p_iters)

    i.e. ``v = alpha sum_{j=0}^{iters} (I - alpha H)^j b``, which converges to ``H^{-1} b`` iff
    ``||I - alpha H|| < 1`` (``0 < alpha < 2/L``, ``H`` positive definite). ``iters = 0`` gives
    ``alpha * b``. The series is declared divergent when a term is non-finite or
    ``||p_j|| > divergence_factor * ||b||``; ``on_divergence`` then raises
    :class:`~bilevel.errors.NeumannDivergenceError`, or warns / ignores and returns the sum of
    the terms before the divergent one. With ``stochastic=True``, ``hvp`` is called as
    ``hvp(p, j)`` so that each term may use a fresh mini-batch (StocBiO).
    """
    result = SolveResult()
    b_norm = float(tree_norm(b))
    result.residuals.append(b_norm)
    v, p = b, b
    for j in range(iters):
        hp = hvp(p, j) if stochastic else hvp(p)  # type: ignore[call-arg]
        p_next = tree_add(p, hp, -alpha)
        p_norm = float(tree_norm(p_next))
        result.iters = j + 1
        result.residuals.append(p_norm)
        if not math.isfinite(p_norm) or p_norm > divergence_factor * b_norm:
            result.diverged = True
            _handle(
                on_divergence,
                NeumannDivergenceError,
                NeumannDivergenceWarning,
                f"Neumann series diverges: term {j + 1} has norm {p_norm:.3e} > {divergence_factor:g} x "
                f"||b|| = {b_norm:.3e}; alpha={alpha:g} is too large (it must be below 2/L, L the largest "
                "eigenvalue of the inner Hessian) or the Hessian is not positive definite: lower alpha",
            )
            break
        p = p_next
        v = tree_add(v, p)
    return tree_scale(v, alpha), result
