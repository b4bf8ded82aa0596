"""StocBiO: the Neumann series with every Hessian-vector product on a fresh mini-batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..linalg import neumann_series
from ..products import Linearization
from .aid_fp import AIDFP


@dataclass
class StocBiO(AIDFP):
    """Stochastic Neumann series (Ji et al. 2021):

        p_0 = grad_theta f,  p_{j+1} = p_j - alpha H_{B_j} p_j,  v = alpha sum_{j=0}^{iters} p_j

    where ``H_{B_j}`` is the inner Hessian on the ``j``-th batch drawn from ``batches``; the mixed
    product ``J v`` uses ``inner_batch``. Each term costs one gradient of ``g`` with its graph plus
    one backward pass on a new batch. Without ``batches`` every term uses ``inner_batch``, and the
    result equals :class:`~bilevel.AIDFP` with the same options (StocBiO subclasses it: same options
    and checks, plus ``batches``).

    Args:
        iters: number of HVPs (series terms after the first), as in :class:`~bilevel.AIDFP`.
        alpha: step of the series; must be below ``2/L`` (``L`` the largest eigenvalue of ``H``).
        on_divergence: ``"raise"`` (default), ``"warn"`` or ``"ignore"``, as in :class:`~bilevel.AIDFP`.
        divergence_factor: growth of a term (relative to ``||grad_theta f||``) that counts as divergence.
        hvp: ``"autograd"`` (default), ``"rev-rev"`` or ``"fwd-rev"`` (see :mod:`bilevel.products`).
        batches: an iterable of inner batches (e.g. a ``DataLoader``), re-iterated when exhausted,
            or an iterator (an error is raised when it runs out). May be assigned later
            (``solver.batches = loader``).

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import ridge_synthetic
        >>> ref = ridge_synthetic(d=5)  # ridge regression with L2 weights exp(lam), exact answers
        >>> hparams = ref.hparams(-2.0)
        >>> params = ref.solution(hparams)  # the inner minimiser theta*(phi)
        >>> exact = ref.exact_hypergrad(hparams)["lam"]
        >>> mu, L = ref.curvature(hparams)  # extreme eigenvalues of the inner Hessian
        >>> args = (ref.problem(), params, hparams, ref.inner_batch, ref.outer_batch)
        >>> X, y = ref.inner_batch
        >>> quarters = [(X[i::4], y[i::4]) for i in range(4)]  # each HVP on the next quarter, cycled
        >>> hg, info = bl.StocBiO(iters=50, alpha=1 / L, batches=quarters).hypergrad(*args, return_info=True)
        >>> info.n_hvp, bool((hg["lam"] - exact).norm() < exact.norm())
        (50, True)
    """

    iters: int = 10
    batches: Iterable[Any] | None = field(default=None, repr=False)

    name = "stocbio"

    def __post_init__(self) -> None:
        super().__post_init__()  # the options of AIDFP
        self._iter: Iterator[Any] | None = None
        self._iter_of: Iterable[Any] | None = None

    def _next_batch(self) -> Any:
        source = self.batches
        if self._iter is None or self._iter_of is not source:
            self._iter, self._iter_of = iter(source), source  # type: ignore[arg-type]
        try:
            return next(self._iter)
        except StopIteration:
            if iter(source) is source:  # type: ignore[arg-type]
                raise ValueError(
                    "StocBiO.batches is an exhausted iterator; pass a re-iterable (e.g. a DataLoader)"
                ) from None
            self._iter = iter(source)  # type: ignore[arg-type]
            try:
                return next(self._iter)
            except StopIteration:
                raise ValueError("StocBiO.batches is empty") from None

    def solve(self, problem, lin, b, params, hparams, info):
        if self.batches is None:
            hvp = lambda p, j: lin.hvp(p)  # noqa: E731
        else:

            def hvp(p, j):
                fresh = Linearization(problem, params, hparams, self._next_batch(), self.hvp, self._reduce)
                info.n_hvp += 1
                return fresh.hvp(p)

        v, res = neumann_series(
            hvp, b, self.iters, self.alpha, self.on_divergence, self.divergence_factor, stochastic=True
        )
        info.record_solve(res)
        return v
