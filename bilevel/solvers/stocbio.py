"""StocBiO: the Neumann series with every Hessian-vector product on a fresh mini-batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..linalg import LinearSolve, MatVec, SolvePolicy, neumann
from ..products import HVPMode, Linearization, MixedMode, resampled_hvp
from .aid import AIDSolver
from .base import Call


@dataclass
class StocBiO(AIDSolver):
    """Stochastic Neumann series (Ji et al. 2021):

        p_0 = grad_theta f,  p_{j+1} = p_j - alpha H_{B_j} p_j,  v = alpha sum_{j=0}^{iters} p_j

    where ``H_{B_j}`` is the inner Hessian on the ``j``-th batch drawn from ``batches``; the mixed
    product ``J v`` uses ``inner_batch``. Each term costs one gradient of ``g`` with its graph plus
    one backward pass on a new batch (:func:`~bilevel.products.resampled_hvp`, the matvec given to
    :func:`bilevel.linalg.neumann`). Without batches every term uses ``inner_batch``, and the result
    equals :class:`~bilevel.AIDFP` with the same options (the options of AID-FP plus ``batches``).

    Args:
        iters: number of HVPs (series terms after the first), as in :class:`~bilevel.AIDFP`.
        alpha: step of the series; must be below ``2/L`` (``L`` the largest eigenvalue of ``H``).
        on_divergence: ``"raise"`` (default), ``"warn"`` or ``"ignore"``, as in :class:`~bilevel.AIDFP`.
        divergence_factor: growth of a term (relative to ``||grad_theta f||``) that counts as divergence.
        check_every: test for divergence every ``k`` terms (see :func:`bilevel.linalg.neumann_series`).
        hvp: ``"autograd"`` (default), ``"rev-rev"``, ``"fwd-rev"`` or ``"fd"`` (see :mod:`bilevel.products`).
        mixed: how ``J v`` is taken: ``"autograd"`` (default), ``"jvp"``, ``"fd"`` or ``"fd-onesided"``
            (see :mod:`bilevel.products`).
        fd_radius: the finite differences' radius ``r`` (step ``r / ||v||``).
        batches: an iterable of inner batches (e.g. a ``DataLoader``), re-iterated when exhausted,
            or an iterator (an error is raised when it runs out). May be assigned later
            (``solver.batches = loader``). A call's ``hvp_batches=`` (an iterator, e.g. the training
            loop's resumable stream) replaces it for that call.

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> X, y = ex.ref.inner_batch
        >>> quarters = [(X[i::4], y[i::4]) for i in range(4)]  # each HVP on the next quarter, cycled
        >>> hg, info = bl.StocBiO(iters=50, alpha=1 / ex.L, batches=quarters).hypergrad(*ex.args, return_info=True)
        >>> info.n_hvp, bool((hg["lam"] - ex.exact).norm() < ex.exact.norm())
        (50, True)
    """

    iters: int = 10
    alpha: float = 0.01
    on_divergence: SolvePolicy = "raise"
    divergence_factor: float = 10.0
    check_every: int = 1
    hvp: HVPMode = "autograd"
    batches: Iterable[Any] | None = field(default=None, repr=False)
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "stocbio"
    draws_hvp_batches: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_batches(self.batches)

    def linear_solve(self) -> LinearSolve:
        return neumann(self.iters, self.alpha, self.on_divergence, self.divergence_factor, check_every=self.check_every)

    def matvec(self, lin: Linearization, call: Call) -> MatVec:
        batches = call.hvp_batches if call.hvp_batches is not None else self._own_batches()
        return lin.hvp if batches is None else resampled_hvp(lin, batches)

    def _own_batches(self) -> Iterator[Any] | None:
        """``batches`` as an iterator that continues across calls (re-iterating an exhausted iterable)."""
        source = self.batches
        if source is None:
            return None
        _check_batches(source)
        if getattr(self, "_cycle_of", None) is not source:
            self._cycle, self._cycle_of = _cycle(source), source
        return self._cycle


def _check_batches(batches: Any) -> None:
    if batches is not None and not isinstance(batches, Iterable):
        raise TypeError(f"StocBiO.batches must be an iterable of inner batches (e.g. a DataLoader), got {batches!r}")


def _cycle(source: Iterable[Any]) -> Iterator[Any]:
    it = iter(source)
    while True:
        drawn = False
        for batch in it:
            drawn = True
            yield batch
        if it is source:
            raise ValueError("StocBiO.batches is an exhausted iterator; pass a re-iterable (e.g. a DataLoader)")
        if not drawn:
            raise ValueError("StocBiO.batches is empty")
        it = iter(source)
