"""AID-FP-Lite: the inverse Hessian taken as a multiple of the identity (MELTR, Algorithm 1)."""

from __future__ import annotations

from dataclasses import dataclass

from ..linalg import LinearSolve, identity
from ..products import HVPMode, MixedMode
from .aid import AIDSolver


@dataclass
class AIDFPLite(AIDSolver):
    """``H^{-1} ~ scale * I`` (MELTR eq. 11):

        grad F ~ grad_phi f - scale * J grad_theta f

    (:class:`~bilevel.AID` with ``solve=bilevel.linalg.identity(scale)``). One gradient of ``f``, one
    gradient of ``g`` and one mixed product; no HVP. Biased unless
    ``H = I / scale``; the outer learning rate absorbs ``scale``. Equals :class:`~bilevel.AIDFP`
    with ``iters=0, alpha=scale``.

    Args:
        scale: the multiple of the identity that replaces ``H^{-1}``.
        hvp: HVP mode of the linearisation (only the mixed product is used here).
        mixed: how ``J v`` is taken: ``"autograd"`` (default), ``"jvp"``, ``"fd"`` or ``"fd-onesided"``
            (see :mod:`bilevel.products`).
        fd_radius: the finite differences' radius ``r`` (step ``r / ||v||``). With any ``mixed`` but
            ``"autograd"``, no second-order graph is built (no HVP is taken, so ``hvp`` does not matter).

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> hg = bl.AIDFPLite().hypergrad(*ex.args)
        >>> cosine = torch.nn.functional.cosine_similarity(hg["lam"], ex.exact, dim=0)
        >>> bool(cosine > 0.5), bool((hg["lam"] - ex.exact).norm() > 0.01 * ex.exact.norm())  # a direction, biased
        (True, True)
        >>> same = bl.AIDFP(iters=0, alpha=1.0).hypergrad(*ex.args)
        >>> torch.allclose(hg["lam"], same["lam"])
        True
    """

    scale: float = 1.0
    hvp: HVPMode = "autograd"
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "aid-fp-lite"
    uses_hvp = False

    def linear_solve(self) -> LinearSolve:
        return identity(self.scale)
