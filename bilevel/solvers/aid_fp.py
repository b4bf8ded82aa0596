"""AID-FP: implicit differentiation with a truncated Neumann series (fixed-point iteration)."""

from __future__ import annotations

from dataclasses import dataclass

from ..linalg import LinearSolve, SolvePolicy, neumann
from ..products import HVPMode, MixedMode
from .aid import AIDSolver


@dataclass
class AIDFP(AIDSolver):
    """Neumann series (AuxiLearn's scheme; :class:`~bilevel.AID` with ``solve=bilevel.linalg.neumann(...)``):

        v = alpha * sum_{j=0}^{iters} (I - alpha H)^j grad_theta f,    grad F ~ grad_phi f - J v

    equal to ``iters + 1`` steps of the fixed point ``v <- (I - alpha H) v + alpha grad_theta f``
    from ``v = 0``. Converges for ``0 < alpha < 2/L`` (``L`` the largest eigenvalue of ``H``), the
    error shrinking like ``(1 - alpha mu)^(iters+1)`` (``mu`` the smallest). ``iters=0`` equals
    :class:`~bilevel.AIDFPLite` with ``scale=alpha``; ITD with ``steps=T, lr=alpha`` started at
    the inner minimiser equals ``iters=T-1``.

    Args:
        iters: number of HVPs (series terms after the first).
        alpha: step of the series; must be below ``2/L``.
        on_divergence: ``"raise"`` (default) :class:`~bilevel.NeumannDivergenceError` when a term
            grows past ``divergence_factor * ||grad_theta f||`` or is non-finite, ``"warn"`` or
            ``"ignore"`` (stop summing there; ``info.diverged`` is set).
        divergence_factor: growth that counts as divergence.
        check_every: test for divergence every ``k`` terms (one host synchronisation per ``k`` terms; see
            :func:`bilevel.linalg.neumann_series`); the same result.
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
        >>> errors = []
        >>> for iters in (2, 10, 50):
        ...     hg = bl.AIDFP(iters=iters, alpha=1 / ex.L).hypergrad(*ex.args)
        ...     errors.append(float((hg["lam"] - ex.exact).norm() / ex.exact.norm()))
        >>> errors[0] > errors[1] > errors[2], errors[2] < 1e-12  # geometric, rate 1 - mu/L here
        (True, True)
    """

    iters: int = 20
    alpha: float = 0.01
    on_divergence: SolvePolicy = "raise"
    divergence_factor: float = 10.0
    check_every: int = 1
    hvp: HVPMode = "autograd"
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "aid-fp"

    def linear_solve(self) -> LinearSolve:
        return neumann(self.iters, self.alpha, self.on_divergence, self.divergence_factor, check_every=self.check_every)
