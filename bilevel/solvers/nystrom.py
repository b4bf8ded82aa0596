"""Nyström: implicit differentiation with a rank-k Nyström approximation of the inner Hessian."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..linalg import LinearSolve, SolvePolicy, nystrom
from ..products import HVPMode, MixedMode
from .aid import AIDSolver


@dataclass
class Nystrom(AIDSolver):
    """Hataya & Yamada (AISTATS 2023): ``v = (H_k + rho I)^{-1} grad_theta f``, ``grad F ~ grad_phi f - J v``
    (:class:`~bilevel.AID` with ``solve=bilevel.linalg.nystrom(rank, rho, seed, probes)``), where
    ``H_k = (H Omega)(Omega^T H Omega)^+ (H Omega)^T`` from ``rank`` products with the columns of ``Omega``
    (``d x rank``), inverted with the Woodbury identity (:func:`bilevel.linalg.nystrom_solve`).

    Exact when ``rank = d`` (the parameter dimension) as ``rho -> 0``; otherwise biased: ``rho`` stands in
    for the Hessian's eigenvalues off the probes' span, and ``H_k + rho I`` over-weights the ones on it by
    ``rho``. Not iterative: no warm start, no stopping test; ``info.n_hvp == rank``.

    Args:
        rank: products (columns of ``Omega``), ``1 <= rank <= d``; a larger ``rank`` is refused at the call.
        rho: the regularisation ``rho > 0`` added to ``H_k``.
        seed: the probes' seed (the same probes at every call); None: torch's global generator, per call.
        probes: ``"gaussian"`` (default: orthonormalised standard Gaussian columns) or ``"coordinates"``
            (``rank`` distinct random coordinate vectors, i.e. ``rank`` columns of ``H``: Hataya & Yamada's).
        on_negative_curvature: ``"warn"`` (default), ``"raise"``, ``"ignore"``: sketch eigenvalues < 0 (set to 0).
        hvp: how ``H p`` is taken (see :class:`~bilevel.AIDCG`).
        mixed: how ``J v`` is taken (see :class:`~bilevel.AIDCG`).
        fd_radius: the finite differences' radius.

    Examples:
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> hg, info = bl.Nystrom(rank=5, rho=1e-12).hypergrad(*ex.args, return_info=True)  # rank = d: exact
        >>> bool((hg["lam"] - ex.exact).norm() <= 1e-8 * ex.exact.norm()), info.n_hvp
        (True, 5)
    """

    rank: int = 5
    rho: float = 0.1
    seed: int | None = 0
    probes: Literal["gaussian", "coordinates"] = "gaussian"
    on_negative_curvature: SolvePolicy = "warn"
    hvp: HVPMode = "autograd"
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "nystrom"

    def linear_solve(self) -> LinearSolve:
        return nystrom(self.rank, self.rho, self.seed, self.probes, self.on_negative_curvature)
