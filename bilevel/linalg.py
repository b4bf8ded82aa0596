"""Linear solves ``v ~ H^{-1} b`` that touch ``H`` only through products ``p -> H p``.

A linear solve is a function ``solve(matvec, b) -> (v, SolveResult)`` (jaxopt's ``linear_solve``
shape): ``b`` and ``v`` are trees (``dict[str, Tensor]``) treated as one vector, ``matvec`` is any
callable ``p -> H p`` on such trees (e.g. :meth:`bilevel.products.Linearization.hvp`, or one that
draws a fresh batch per product, :func:`bilevel.products.resampled_hvp`). The factories fix the
options and return such a function:

=========================================== ============================================ =========
factory                                     computes                                     products
=========================================== ============================================ =========
:func:`cg` ``(iters, tol, ...)``            conjugate gradient on ``H v = b``            ``<= iters``
:func:`neumann` ``(iters, alpha, ...)``     ``alpha sum_{j=0}^{iters} (I - alpha H)^j b`` ``iters``
:func:`identity` ``(scale)``                ``scale * b`` (``H^{-1} ~ scale I``)          0
=========================================== ============================================ =========

The iterations themselves are :func:`conjugate_gradient` and :func:`neumann_series`. Both keep O(1)
trees alive, so their memory does not grow with the iteration count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from ._checks import check_choice, check_int, check_positive
from ._tree import Tree, tree_add, tree_dot, tree_norm, tree_scale, tree_zeros_like
from .errors import NegativeCurvatureError, NegativeCurvatureWarning, NeumannDivergenceError, NeumannDivergenceWarning

__all__ = [
    "LinearSolve",
    "MatVec",
    "SolvePolicy",
    "SolveResult",
    "cg",
    "conjugate_gradient",
    "identity",
    "neumann",
    "neumann_series",
]

MatVec = Callable[[Tree], Tree]
SolvePolicy = Literal["raise", "warn", "ignore"]
"""What a solve does when it meets its failure (CG: negative curvature, Neumann: divergence)."""
POLICIES: tuple[str, ...] = ("raise", "warn", "ignore")
GROWTH_TOL = 1e-8  # relative growth of a Neumann term beyond rounding that counts as divergence


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


LinearSolve = Callable[[MatVec, Tree], tuple[Tree, SolveResult]]
"""``solve(matvec, b) -> (v, result)`` with ``v ~ H^{-1} b`` for ``H`` given by ``matvec``."""


def cg(iters: int = 20, tol: float = 1e-10, on_negative_curvature: SolvePolicy = "warn") -> LinearSolve:
    """Conjugate gradient as a linear solve: ``cg(...)(matvec, b)`` is :func:`conjugate_gradient`."""
    check_int("iters", iters, 0)
    check_positive("tol", tol)
    check_choice("on_negative_curvature", on_negative_curvature, POLICIES)
    return partial(conjugate_gradient, iters=iters, tol=tol, on_negative_curvature=on_negative_curvature)


def neumann(
    iters: int = 20,
    alpha: float = 0.01,
    on_divergence: SolvePolicy = "raise",
    divergence_factor: float = 10.0,
    growth_tol: float | None = GROWTH_TOL,
) -> LinearSolve:
    """The truncated Neumann series as a linear solve: ``neumann(...)(matvec, b)`` is :func:`neumann_series`."""
    check_int("iters", iters, 0)
    check_positive("alpha", alpha)
    check_positive("divergence_factor", divergence_factor)
    check_choice("on_divergence", on_divergence, POLICIES)
    if growth_tol is not None:
        check_positive("growth_tol", growth_tol)
    return partial(
        neumann_series, iters=iters, alpha=alpha, on_divergence=on_divergence, divergence_factor=divergence_factor,
        growth_tol=growth_tol,
    )  # fmt: skip


def identity(scale: float = 1.0) -> LinearSolve:
    """``H^{-1} ~ scale * I``: ``identity(scale)(matvec, b) = (scale * b, SolveResult())``; no product."""
    check_positive("scale", scale)
    return partial(identity_solve, scale=scale)


def identity_solve(matvec: MatVec, b: Tree, scale: float = 1.0) -> tuple[Tree, SolveResult]:
    """``v = scale * b`` without calling ``matvec`` (AID-FP-Lite, MELTR eq. 11)."""
    return tree_scale(b, scale), SolveResult()


def _divergence(p_norm: float, prev: float, b_norm: float, factor: float, growth_tol: float) -> str:
    """Why the term of norm ``p_norm`` (the one before: ``prev``) shows divergence; "" when it does not."""
    if not math.isfinite(p_norm):
        return f"is non-finite (norm {p_norm}): the Hessian-vector product has NaN or inf entries"
    if p_norm > factor * b_norm:
        return f"has norm {p_norm:.3e} > {factor:g} x ||b|| = {b_norm:.3e}"
    if p_norm > (1 + growth_tol) * prev:
        return f"is longer than the one before ({p_norm:.6e} > {prev:.6e})"
    return ""


def conjugate_gradient(
    hvp: MatVec,
    b: Tree,
    iters: int,
    tol: float,
    on_negative_curvature: SolvePolicy = "warn",
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
            what = (
                f"non-finite curvature p^T H p = {php} at iteration {k}: the Hessian-vector product has NaN or "
                "inf entries"
                if not math.isfinite(php)
                else f"non-positive curvature p^T H p = {php:.3e} at iteration {k}: the inner Hessian is not "
                "positive definite at these params (not a strict minimum of g)"
            )
            _handle(
                on_negative_curvature,
                NegativeCurvatureError,
                NegativeCurvatureWarning,
                f"conjugate gradient met {what}; the hypergradient uses the iterate reached so far",
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
    hvp: MatVec,
    b: Tree,
    iters: int,
    alpha: float,
    on_divergence: SolvePolicy = "raise",
    divergence_factor: float = 10.0,
    growth_tol: float | None = 1e-8,
) -> tuple[Tree, SolveResult]:
    """Approximate ``H^{-1} b`` by the truncated Neumann series with ``iters`` + 1 terms:

        p_0 = b,  p_{j+1} = p_j - alpha H p_j,   v = alpha * (p_0 + p_1 + ... + p_iters)

    i.e. ``v = alpha sum_{j=0}^{iters} (I - alpha H)^j b``, which converges to ``H^{-1} b`` iff
    ``||I - alpha H|| < 1`` (``0 < alpha < 2/L``, ``H`` positive definite). ``iters = 0`` gives
    ``alpha * b``. The series is declared divergent when a term is non-finite, when a term is longer
    than the one before (``||p_{j+1}|| > (1 + growth_tol) ||p_j||``: impossible when ``H`` is symmetric
    positive semi-definite and ``alpha <= 2/L``, since every factor ``|1 - alpha lambda_i| <= 1``; so the
    first growth already certifies that the series does not converge, however slowly it grows; not
    applied to a matvec marked ``stochastic = True``, whose single terms may grow on a batch while the
    series converges in expectation, e.g. :func:`~bilevel.products.resampled_hvp`, nor with
    ``growth_tol=None``, the peers' plain series), or when
    ``||p_j|| > divergence_factor * ||b||``; ``on_divergence`` then raises
    :class:`~bilevel.errors.NeumannDivergenceError`, or warns / ignores and returns the sum of
    the terms before the divergent one. ``hvp`` is called once per term, in order, so a matvec
    that draws a fresh mini-batch per call gives StocBiO's stochastic series.
    """
    result = SolveResult()
    b_norm = float(tree_norm(b))
    result.residuals.append(b_norm)
    v, p, prev = b, b, b_norm
    growth = growth_tol is not None and not getattr(hvp, "stochastic", False)
    for j in range(iters):
        hp = hvp(p)
        p_next = tree_add(p, hp, -alpha)
        p_norm = float(tree_norm(p_next))
        result.iters = j + 1
        result.residuals.append(p_norm)
        why = _divergence(p_norm, prev if growth else math.inf, b_norm, divergence_factor, growth_tol or 0.0)
        if why:
            result.diverged = True
            _handle(
                on_divergence,
                NeumannDivergenceError,
                NeumannDivergenceWarning,
                f"Neumann series diverges: term {j + 1} {why}"
                + (
                    ""
                    if why.startswith("is non-finite")
                    else f"; alpha={alpha:g} is too large (it must be below 2/L, L the largest eigenvalue of the "
                    "inner Hessian) or the Hessian is not positive definite: lower alpha"
                ),
            )
            break
        p, prev = p_next, p_norm
        v = tree_add(v, p)
    return tree_scale(v, alpha), result
