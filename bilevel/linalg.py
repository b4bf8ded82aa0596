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
:func:`nystrom` ``(rank, rho, ...)``        ``(H_k + rho I)^{-1} b``, ``H_k`` rank-k      ``rank``
:func:`identity` ``(scale)``                ``scale * b`` (``H^{-1} ~ scale I``)          0
:func:`diagonal` ``(d, scale)``             ``scale * d * b`` (``H^{-1} ~ scale diag(d)``) 0
=========================================== ============================================ =========

The iterations themselves are :func:`conjugate_gradient` and :func:`neumann_series`. Both keep O(1)
trees alive, so their memory does not grow with the iteration count; both take a warm start
``x0`` (an initial guess of ``H^{-1} b``, a tree like ``b``; one more product, for ``b - H x0``).
:func:`nystrom_solve` keeps ``O(rank)`` flattened vectors of the parameter dimension.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from ._checks import check_choice, check_int, check_positive
from ._tree import LOW_PRECISION, Tree, tree_add, tree_dot, tree_norm, tree_scale, tree_zeros_like
from .errors import NegativeCurvatureError, NegativeCurvatureWarning, NeumannDivergenceError, NeumannDivergenceWarning

__all__ = [
    "LinearSolve",
    "MatVec",
    "SolvePolicy",
    "SolveResult",
    "cg",
    "conjugate_gradient",
    "diagonal",
    "identity",
    "neumann",
    "neumann_series",
    "nystrom",
    "nystrom_sketch",
    "nystrom_solve",
    "solve_accumulating",
]

MatVec = Callable[[Tree], Tree]
SolvePolicy = Literal["raise", "warn", "ignore"]
"""What a solve does when it meets its failure (CG: negative curvature, Neumann: divergence)."""
POLICIES: tuple[str, ...] = ("raise", "warn", "ignore")
PROBES: tuple[str, ...] = ("gaussian", "coordinates")
GROWTH_TOL = 1e-8  # relative growth of a Neumann term beyond rounding that counts as divergence


@dataclass
class SolveResult:
    """What a linear solve did.

    Attributes:
        iters: iterations performed (HVPs used by them); Nyström: ``rank``, its products.
        residuals: CG: ``||b - H v_k||`` for k = 0..iters; Neumann: ``||p_j|| = ||(I - alpha H)^j r_0||``
            (``r_0 = b``, or ``b - H x0`` with a warm start); Nyström: none.
        converged: CG reached ``||r|| <= tol * ||b||``; None for Neumann and Nyström (no stopping test).
        negative_curvature: CG met ``p^T H p <= 0`` and stopped there; Nyström: the sketch ``H_k`` had
            eigenvalues below zero (beyond rounding), set to zero.
        diverged: the Neumann terms grew past ``divergence_factor * ||r_0||`` and the series stopped.
        warm_hvp: products spent on a warm start (``H x0``: 1 with ``x0``, else 0); the solve used
            ``iters + warm_hvp`` products in all.
    """

    iters: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool | None = None
    negative_curvature: bool = False
    diverged: bool = False
    warm_hvp: int = 0


def _handle(policy: str, error: type[Exception], warning: type[Warning], message: str) -> None:
    if policy == "raise":
        raise error(message)
    if policy == "warn":
        warnings.warn(message, warning, stacklevel=4)


LinearSolve = Callable[..., tuple[Tree, SolveResult]]
"""``solve(matvec, b) -> (v, result)`` with ``v ~ H^{-1} b`` for ``H`` given by ``matvec``; a solve that
takes a warm start (:func:`cg`, :func:`neumann`) also takes ``solve(matvec, b, x0=tree)``."""


def accepts_warm_start(solve: Callable[..., object]) -> bool:
    """Whether ``solve`` takes a warm start, i.e. a keyword argument ``x0`` (:func:`cg` and :func:`neumann` do;
    :func:`nystrom` and :func:`identity` do not)."""
    import inspect

    try:
        params = inspect.signature(solve).parameters
    except (TypeError, ValueError):
        return False
    return "x0" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_x0(x0: object, b: Tree) -> Tree:
    """``x0`` is a tree with the keys, shapes, dtypes and devices of ``b``; returned detached."""
    if not isinstance(x0, dict):
        raise TypeError(f"x0 (the warm start) must be a dict of tensors like b, got {type(x0).__name__}")
    if list(x0) != list(b):
        raise ValueError(f"x0 (the warm start) must have the keys of b {list(b)}, got {list(x0)}")
    for k, v in b.items():
        x = x0[k]
        if not isinstance(x, Tensor):
            raise TypeError(f"x0[{k!r}] (the warm start) must be a Tensor, got {type(x).__name__}")
        if x.shape != v.shape or x.dtype != v.dtype or x.device != v.device:
            raise ValueError(
                f"x0[{k!r}] (the warm start) is {tuple(x.shape)} {x.dtype} on {x.device}; b[{k!r}] is "
                f"{tuple(v.shape)} {v.dtype} on {v.device}"
            )
    return {k: v.detach() for k, v in x0.items()}


ACCUMULATOR = torch.float32
"""The dtype in which :func:`solve_accumulating` runs a solve whose right-hand side is low precision."""


def solve_accumulating(solve: LinearSolve, matvec: MatVec, b: Tree, **kwargs: object) -> tuple[Tree, SolveResult]:
    """``solve(matvec, b, **kwargs)`` with float32 accumulators when ``b`` has bfloat16 / float16 leaves.

    The mixed-precision policy (docs/math.md, "Precision"): products are taken in the params' dtype, the
    solve accumulates in float32. The leaves of ``b`` (and of a warm start ``x0``) that are bfloat16 or
    float16 are upcast to float32; ``matvec`` is wrapped so that each direction ``p`` is cast down to
    that leaf's dtype before the product and ``H p`` is cast back up to float32. CG's residual, direction
    and dot products, the Neumann sum and Nyström's sketch and small dense solve are then float32. The
    returned ``v`` is float32 on those leaves (cast it down before a product in the params' dtype).
    Without low-precision leaves this is ``solve(matvec, b, **kwargs)`` unchanged.
    """
    low = {k: v.dtype for k, v in b.items() if v.dtype in LOW_PRECISION}
    if not low:
        return solve(matvec, b, **kwargs)

    def up(tree: Tree) -> Tree:
        return {k: t.to(ACCUMULATOR) if k in low else t for k, t in tree.items()}

    def matvec32(p: Tree) -> Tree:
        return up(matvec({k: t.to(low[k]) if k in low else t for k, t in p.items()}))

    x0 = kwargs.get("x0")
    if isinstance(x0, dict):
        kwargs = {**kwargs, "x0": up(x0)}
    return solve(matvec32, up(b), **kwargs)


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
    check_every: int = 1,
) -> LinearSolve:
    """The truncated Neumann series as a linear solve: ``neumann(...)(matvec, b)`` is :func:`neumann_series`."""
    check_int("iters", iters, 0)
    check_positive("alpha", alpha)
    check_positive("divergence_factor", divergence_factor)
    check_choice("on_divergence", on_divergence, POLICIES)
    check_int("check_every", check_every, 1)
    if growth_tol is not None:
        check_positive("growth_tol", growth_tol)
    return partial(
        neumann_series, iters=iters, alpha=alpha, on_divergence=on_divergence, divergence_factor=divergence_factor,
        growth_tol=growth_tol, check_every=check_every,
    )  # fmt: skip


def nystrom(
    rank: int,
    rho: float,
    seed: int | None = 0,
    probes: Literal["gaussian", "coordinates"] = "gaussian",
    on_negative_curvature: SolvePolicy = "warn",
) -> LinearSolve:
    """The rank-``rank`` Nyström approximation as a linear solve: ``nystrom(...)(matvec, b)`` is
    :func:`nystrom_solve`, ``v = (H_k + rho I)^{-1} b`` from ``rank`` products."""
    check_int("rank", rank, 1)
    check_positive("rho", rho)
    if seed is not None:
        check_int("seed", seed, 0)
    check_choice("probes", probes, PROBES)
    check_choice("on_negative_curvature", on_negative_curvature, POLICIES)
    return partial(
        nystrom_solve, rank=rank, rho=rho, seed=seed, probes=probes, on_negative_curvature=on_negative_curvature
    )


def identity(scale: float = 1.0) -> LinearSolve:
    """``H^{-1} ~ scale * I``: ``identity(scale)(matvec, b) = (scale * b, SolveResult())``; no product."""
    check_positive("scale", scale)
    return partial(identity_solve, scale=scale)


def identity_solve(matvec: MatVec, b: Tree, scale: float = 1.0) -> tuple[Tree, SolveResult]:
    """``v = scale * b`` without calling ``matvec`` (AID-FP-Lite, MELTR eq. 11)."""
    return tree_scale(b, scale), SolveResult()


def diagonal(d: Tree, scale: float = 1.0) -> LinearSolve:
    """``H^{-1} ~ scale * diag(d)``: ``diagonal(d, scale)(matvec, b) = (scale * d * b, SolveResult())``
    (elementwise, ``d`` a tree like ``b``, e.g. SAMA's Adam preconditioner); no product.

    Raises ``ValueError`` when ``d`` is not a non-empty dict of tensors or holds non-finite entries, and when
    ``b`` does not have ``d``'s keys and shapes."""
    check_positive("scale", scale)
    if not isinstance(d, dict) or not d or not all(isinstance(t, Tensor) for t in d.values()):
        raise ValueError(f"diagonal: d must be a non-empty dict of tensors, got {type(d).__name__}")
    bad = [k for k, t in d.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"diagonal: d has non-finite entries in {bad}")
    return partial(diagonal_solve, d=d, scale=scale)


def diagonal_solve(matvec: MatVec, b: Tree, d: Tree, scale: float = 1.0) -> tuple[Tree, SolveResult]:
    """``v = scale * d * b`` (elementwise) without calling ``matvec``."""
    if d.keys() != b.keys() or any(d[k].shape != b[k].shape for k in b):
        shapes = {k: tuple(t.shape) for k, t in d.items()}
        raise ValueError(f"diagonal: d {shapes} does not match b {({k: tuple(t.shape) for k, t in b.items()})}")
    return {k: scale * d[k].to(b[k].dtype) * b[k] for k in b}, SolveResult()


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
    x0: Tree | None = None,
) -> tuple[Tree, SolveResult]:
    """Solve ``H v = b`` by at most ``iters`` steps of conjugate gradient from ``v_0 = 0``, or from
    ``v_0 = x0`` (a warm start: one more product, for the first residual ``r_0 = b - H x0``).

    ``H`` must be symmetric. Stops when ``||b - H v_k|| <= tol * ||b||`` (relative to ``b`` also with
    a warm start, so a good ``x0`` reaches the same tolerance in fewer iterations; ``iters = 0`` if
    ``x0`` already does). If a search direction has ``p^T H p <= 0`` (``H`` not positive definite),
    CG stops and returns its current iterate, or, if this happens at the first step, ``b`` itself
    from a cold start (the identity approximation, as AID-FP-Lite) and ``x0`` from a warm start;
    ``on_negative_curvature`` decides whether this raises
    :class:`~bilevel.errors.NegativeCurvatureError`, warns, or is only recorded in the result.
    """
    result = SolveResult(converged=False)
    b_norm = float(tree_norm(b))
    if b_norm == 0.0:
        result.residuals.append(b_norm)
        result.converged = True
        return tree_zeros_like(b), result
    if x0 is None:
        v, r = tree_zeros_like(b), b
        r_norm = b_norm
    else:
        v = check_x0(x0, b)
        r = tree_add(b, hvp(v), -1.0)
        result.warm_hvp = 1
        r_norm = float(tree_norm(r))
    result.residuals.append(r_norm)
    if r_norm <= tol * b_norm:
        result.converged = True
        return v, result
    p = r
    rs = r_norm**2
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
            return (b if k == 0 and x0 is None else v), result
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
    x0: Tree | None = None,
    check_every: int = 1,
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

    Warm start: with ``x0`` the series is summed for the residual ``r_0 = b - H x0`` and added to ``x0``:

        v = x0 + alpha sum_{j=0}^{iters} (I - alpha H)^j (b - H x0)

    (``p_0 = r_0`` above, and the divergence tests compare with ``||r_0||``). This equals ``iters + 1``
    steps of the fixed point ``v <- v + alpha (b - H v)`` started at ``x0`` (the cold series is the
    same from ``0``), so its error is ``(I - alpha H)^{iters+1} (x0 - H^{-1} b)``: a good ``x0`` gives a
    small one. It costs one more product (``H x0``, on its own fresh batch for a stochastic matvec).

    ``check_every = k``: the term norms stay on the device and the divergence tests run every ``k`` terms
    (and after the last), one host synchronisation per ``k`` terms instead of one per term (on a GPU each
    ``float(norm)`` waits for the device). The up to ``k`` unchecked terms are kept (``k`` trees of
    memory) so that a divergence found late returns exactly what ``check_every=1`` returns: the sum of the
    terms before the first divergent one (and ``k - 1`` more products may have been spent past it). The
    result is bitwise that of ``check_every=1`` otherwise.
    """
    result = SolveResult()
    base: Tree | None = None
    if x0 is not None:
        base = check_x0(x0, b)
        b = tree_add(b, hvp(base), -1.0)
        result.warm_hvp = 1
    b_norm = float(tree_norm(b))
    result.residuals.append(b_norm)
    v, p, prev = b, b, b_norm
    growth = growth_tol is not None and not getattr(hvp, "stochastic", False)
    pending: list[tuple[Tree, Tensor]] = []  # terms computed, not yet checked: (p_j, ||p_j|| on the device)
    for j in range(iters):
        p = tree_add(p, hvp(p), -alpha)
        pending.append((p, tree_norm(p)))
        if len(pending) < check_every and j + 1 < iters:
            continue
        norms = torch.stack([n for _, n in pending]).tolist()  # the one host synchronisation
        first = j + 2 - len(pending)  # the index of pending[0]'s term
        for i, ((term, _), p_norm) in enumerate(zip(pending, norms, strict=True)):
            result.iters = first + i
            result.residuals.append(p_norm)
            why = _divergence(p_norm, prev if growth else math.inf, b_norm, divergence_factor, growth_tol or 0.0)
            if why:
                result.diverged = True
                _handle(
                    on_divergence,
                    NeumannDivergenceError,
                    NeumannDivergenceWarning,
                    f"Neumann series diverges: term {first + i} {why}"
                    + (
                        ""
                        if why.startswith("is non-finite")
                        else f"; alpha={alpha:g} is too large (it must be below 2/L, L the largest eigenvalue of "
                        "the inner Hessian) or the Hessian is not positive definite: lower alpha"
                    ),
                )
                break
            prev = p_norm
            v = tree_add(v, term)
        if result.diverged:
            break
        pending.clear()
    v = tree_scale(v, alpha)
    return (v if base is None else tree_add(base, v)), result


def _flatten(tree: Tree) -> Tensor:
    """The leaves of ``tree`` as one vector, in key order (the vector :mod:`bilevel._tree` treats a tree as)."""
    return torch.cat([v.reshape(-1) for v in tree.values()])


def _unflatten(vec: Tensor, like: Tree) -> Tree:
    """The inverse of :func:`_flatten`: ``vec`` cut into leaves shaped like ``like``'s."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].view_as(v)
        i += v.numel()
    return out


def nystrom_probes(
    d: int, rank: int, seed: int | None, probes: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The ``d x rank`` probe matrix ``Omega`` with orthonormal columns, in ``dtype`` on ``device``:
    ``"gaussian"``, the Q factor (thin QR, on ``device``) of a standard Gaussian matrix, which has the same
    column space, hence the same ``H_k``, better conditioned; ``"coordinates"``, ``rank`` distinct coordinate
    vectors ``e_i`` drawn uniformly (Hataya & Yamada's choice: ``H Omega`` are ``rank`` columns of ``H``).
    Drawn on the CPU, one column at a time (so a larger ``rank`` with the same seed extends the same
    columns), from ``torch.Generator().manual_seed(seed)``: the same probes for a given seed and dtype
    on every device (up to the QR's rounding); from torch's global CPU generator when ``seed`` is None
    (fresh probes per call). Memory: one ``d x rank`` matrix on the CPU and one on ``device``."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if probes == "coordinates":
        idx = torch.randperm(d, generator=gen)[:rank]
        omega = torch.zeros(d, rank, dtype=dtype)
        omega[idx, torch.arange(rank)] = 1.0
        return omega.to(device)
    # one draw per column: torch's sampler depends on the size of the draw, and nested columns need the same
    cols = [torch.randn(d, generator=gen, dtype=dtype) for _ in range(rank)]
    return torch.linalg.qr(torch.stack(cols, dim=1).to(device)).Q


def nystrom_solve(
    hvp: MatVec,
    b: Tree,
    rank: int,
    rho: float,
    seed: int | None = 0,
    probes: str = "gaussian",
    on_negative_curvature: SolvePolicy = "warn",
) -> tuple[Tree, SolveResult]:
    """``v = (H_k + rho I)^{-1} b`` with ``H_k`` the rank-``k`` Nyström approximation of ``H`` (``k = rank``):

        Y = H Omega  (d x k, from k products),   H_k = Y (Omega^T Y)^+ Y^T

    ``Omega`` the ``d x k`` probes of :func:`nystrom_probes` (``d`` the number of entries of ``b``;
    the products see its columns as trees like ``b``); no ``d x d`` matrix is formed. ``H_k`` is
    exact on the column space of ``Omega`` and equals ``H`` when ``k = d``. This is the approximation of
    Hataya & Yamada (AISTATS 2023, "Nyström method for accurate and scalable implicit
    differentiation"; their ``hypergrad.approx_hypergrad.nystrom`` probes ``k`` random coordinates, i.e.
    takes ``k`` random columns of ``H``, and applies the Woodbury identity
    ``(H_k + rho I)^{-1} = I/rho - C^T (M + C C^T / rho)^{-1} C / rho^2`` with ``C = Omega^T H``, ``M =
    Omega^T H Omega``). The value is the same; it is computed here in the eigen form of the same identity
    (Frangella, Tropp & Udell, SIAM J. Matrix Anal. Appl. 2023, "Randomized Nyström preconditioning",
    sec. 2), which avoids that form's cancellation of ``1/rho^2`` terms when ``rho`` is small:

        W = Omega^T Y = V D V^T,  D+ = D's eigenvalues above rounding (the pseudo-inverse ^+),
        Y V+ = Q R (thin QR),  R D+^{-1} R^T = P Lambda P^T,  U = Q P  (so H_k = U Lambda U^T),
        v = U (Lambda + rho I)^{-1} U^T b + (b - U U^T b) / rho

    (the last term vanishes, and is skipped, when ``U`` spans all ``d`` dimensions). The ``k x k``
    eigenproblems are solved in float64; the ``d x k`` products stay in ``b``'s dtype. Eigenvalues of
    ``H_k`` below ``-sqrt(eps) * ||Lambda||`` (``H`` not positive semi-definite on the probes; rounding
    aside) are set to zero, ``H_k``'s PSD part, as Frangella et al. do; ``on_negative_curvature`` then
    raises :class:`~bilevel.errors.NegativeCurvatureError`, warns, or only records it in the result.

    Cost: ``rank`` products (``result.iters``), ``O(d k^2)`` arithmetic and a few ``d x k`` matrices.

    Raises:
        ValueError: ``rank`` larger than ``d``.
    """
    u, lam, result = nystrom_sketch(hvp, b, rank, seed, probes, on_negative_curvature)
    bvec = _flatten(b)
    c = u.T @ bvec
    x = u @ (c.double() / (lam + rho)).to(bvec.dtype)
    if u.shape[1] < bvec.numel():
        x = x + (bvec - u @ c) / rho
    return _unflatten(x, b), result


def nystrom_sketch(
    hvp: MatVec,
    like: Tree,
    rank: int,
    seed: int | None = 0,
    probes: str = "gaussian",
    on_negative_curvature: SolvePolicy = "warn",
) -> tuple[Tensor, Tensor, SolveResult]:
    """The Nyström approximation ``H_k = Y (Omega^T Y)^+ Y^T = U diag(lam) U^T`` of :func:`nystrom_solve`
    (the steps before ``rho``), from ``rank`` products with probes cut into trees like ``like``.

    Returns ``U`` (``d x r``, orthonormal columns, ``like``'s dtype and device; ``r <= rank``, fewer when
    ``Omega^T H Omega`` is singular), ``lam`` (``r`` eigenvalues in float64, negative ones set to zero)
    and the :class:`SolveResult` (``iters = rank``, ``negative_curvature``). With nested probes (the same
    ``seed``), ``H - H_k`` is positive semi-definite and non-increasing in ``rank`` for a PSD ``H``
    (it is the Schur complement of ``H`` off the probes' span), and zero at ``rank = d``.
    """
    d = sum(v.numel() for v in like.values())
    if rank > d:
        raise ValueError(f"nystrom: rank={rank} is larger than the parameter dimension d={d} (entries of b); "
                         f"use rank <= {d}")  # fmt: skip
    first = next(iter(like.values()))
    dtype, device = first.dtype, first.device
    omega = nystrom_probes(d, rank, seed, probes, dtype, device)
    cols = omega.T.contiguous()  # the probes as rows, each cut into a tree like b
    y = torch.stack([_flatten(hvp(_unflatten(cols[j], like))) for j in range(rank)], dim=1)
    result = SolveResult(iters=rank)
    eps = torch.finfo(dtype).eps
    w = (omega.T @ y).double()
    dvals, vecs = torch.linalg.eigh(0.5 * (w + w.T))
    keep = dvals.abs() > rank * eps * float(dvals.abs().max())
    if not bool(keep.any()):  # H vanishes on the probes: H_k = 0
        return torch.zeros(d, 0, dtype=dtype, device=device), torch.zeros(0, dtype=torch.float64), result
    q, r = torch.linalg.qr(y @ vecs[:, keep].to(dtype))
    r64 = r.double()
    t = r64 @ torch.diag(1.0 / dvals[keep]) @ r64.T
    lam, pvecs = torch.linalg.eigh(0.5 * (t + t.T))
    lam_scale = float(lam.abs().max())
    if float(lam.min()) < -math.sqrt(eps) * lam_scale:
        result.negative_curvature = True
        _handle(
            on_negative_curvature,
            NegativeCurvatureError,
            NegativeCurvatureWarning,
            f"nystrom: the rank-{rank} sketch of the inner Hessian has a negative eigenvalue {float(lam.min()):.3e} "
            f"(largest {lam_scale:.3e}): the Hessian is not positive semi-definite at these params (not a minimum "
            "of g); its negative eigenvalues are set to zero",
        )
    return q @ pvecs.to(dtype), lam.clamp(min=0.0).to(device), result
