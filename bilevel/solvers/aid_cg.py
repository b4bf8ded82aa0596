"""AID-CG: implicit differentiation with conjugate gradient on ``H v = grad_theta f``."""

from __future__ import annotations

from dataclasses import dataclass

from ..linalg import LinearSolve, SolvePolicy, cg
from ..products import HVPMode, MixedMode
from .aid import AIDSolver


@dataclass
class AIDCG(AIDSolver):
    """Conjugate gradient: ``v = CG_iters(H, grad_theta f)``, ``grad F ~ grad_phi f - J v``
    (:class:`~bilevel.AID` with ``solve=bilevel.linalg.cg(iters, tol, on_negative_curvature)``).

    Exact (up to ``tol``) when ``params`` minimise ``g`` and ``H`` is positive definite; at most
    ``|theta|`` iterations in exact arithmetic, ``O(sqrt(kappa) log(1/tol))`` in practice.

    Args:
        iters: maximum CG iterations (HVPs). ``0`` gives ``v = 0``, i.e. ``grad_phi f`` only.
        tol: stop when ``||grad_theta f - H v|| <= tol * ||grad_theta f||``.
        on_negative_curvature: policy when ``p^T H p <= 0`` is met: ``"warn"`` (default: warn,
            stop CG, use the iterate so far), ``"raise"`` (:class:`~bilevel.NegativeCurvatureError`)
            or ``"ignore"`` (stop silently; ``info.negative_curvature`` is set in every case).
        hvp: how ``H p`` is taken: ``"autograd"`` (default), ``"rev-rev"``, ``"fwd-rev"`` or ``"fd"``
            (see :mod:`bilevel.products`).
        mixed: how ``J v`` is taken: ``"autograd"`` (default), ``"jvp"``, ``"fd"`` or ``"fd-onesided"``
            (see :mod:`bilevel.products`).
        fd_radius: the finite differences' radius ``r`` (step ``r / ||v||``).

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> hg, info = bl.AIDCG(iters=20, tol=1e-12).hypergrad(*ex.args, return_info=True)
        >>> bool((hg["lam"] - ex.exact).norm() <= 1e-10 * ex.exact.norm()), info.converged, info.n_hvp <= 5
        (True, True, True)
    """

    iters: int = 20
    tol: float = 1e-10
    on_negative_curvature: SolvePolicy = "warn"
    hvp: HVPMode = "autograd"
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "aid-cg"

    def linear_solve(self) -> LinearSolve:
        return cg(self.iters, self.tol, self.on_negative_curvature)
