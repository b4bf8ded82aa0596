"""Approximate implicit differentiation (AID): one hypergradient, any linear solve.

    grad F ~ grad_phi f - J v,    v = solve(H, grad_theta f) ~ H^{-1} grad_theta f

with ``H`` and ``J`` the inner objective's Hessian and mixed second derivative at ``(theta, phi)``,
touched only through products (:class:`~bilevel.products.Linearization`). A preset is this formula
plus a linear solve from :mod:`bilevel.linalg`: AID-CG uses :func:`~bilevel.linalg.cg`, AID-FP
:func:`~bilevel.linalg.neumann`, AID-FP-Lite :func:`~bilevel.linalg.identity`, StocBiO the Neumann
series with products on fresh batches. :class:`AID` takes any linear solve.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, overload

from .._checks import check_choice, check_positive
from .._tree import Tree, tree_sub
from ..distributed import is_sharded
from ..linalg import LinearSolve, MatVec, accepts_warm_start, solve_accumulating
from ..problem import BilevelProblem
from ..products import (
    HVP_MODES,
    MIXED_MODES,
    HVPMode,
    Linearization,
    MixedMode,
    Reduce,
    check_sharded_modes,
    outer_gradients,
)
from .base import Call, HypergradInfo, Solver

__all__ = ["AID", "AIDSolver"]


class AIDSolver(Solver):
    """The AID hypergradient; subclasses give :meth:`linear_solve` (and may give :meth:`matvec`).

    Cost: one gradient of ``f``, one gradient of ``g`` with its graph (none with :meth:`hypergrad_at`),
    ``n_hvp`` products and one mixed product. Peak memory: one first-order graph of ``g``, whatever
    the iteration count.
    """

    hvp: HVPMode
    mixed: MixedMode
    fd_radius: float

    def __post_init__(self) -> None:
        check_choice("hvp", self.hvp, HVP_MODES)
        check_choice("mixed", self.mixed, MIXED_MODES)
        check_positive("fd_radius", self.fd_radius)
        self.linear_solve()  # the factory validates the solve's options

    uses_hvp = True
    """Whether :meth:`linear_solve` takes Hessian-vector products (the identity solves do not)."""

    def check_sharded(self, reduce: Reduce | None) -> None:
        """FSDP2 shards: the mixed product must be first order, and so must the HVP where the solve takes any."""
        if self.uses_hvp and self.hvp != "fd":
            raise ValueError(
                f"{self.name} with hvp={self.hvp!r} cannot run on FSDP (fully_shard) parameters (double backward): "
                "use hvp='fd' and mixed='fd', or bl.SAMA() / bl.AIDFPLite(mixed='fd')"
            )
        check_sharded_modes(self.mixed, reduce)

    @property
    def supports_warm_start(self) -> bool:
        """Whether :meth:`linear_solve` takes a warm start ``x0`` (CG and Neumann do)."""
        return accepts_warm_start(self.linear_solve())

    def linearize(
        self, problem: BilevelProblem, params: Tree, hparams: Tree, batch: Any, reduce: Reduce | None = None
    ) -> Linearization:
        """``g`` linearised at ``(params, hparams)`` on ``batch`` with this solver's product modes, e.g.
        for a training loop's inner step whose linearisation then serves :meth:`hypergrad_at`."""
        if is_sharded(params):
            self.check_sharded(reduce)
        return Linearization(problem, params, hparams, batch, self._lin_mode, reduce, self.mixed, self.fd_radius)

    @property
    def _lin_mode(self) -> HVPMode:
        """The linearisation's HVP mode: ``hvp``, except for a solve that takes no HVP with a mixed mode that
        needs no first-order graph (``"jvp"``, ``"fd"``, ``"fd-onesided"``): then ``"fd"``, which keeps none."""
        return self.hvp if self.uses_hvp or self.mixed == "autograd" else "fd"

    @abstractmethod
    def linear_solve(self) -> LinearSolve:
        """The solve ``(matvec, b) -> (v ~ H^{-1} b, SolveResult)`` this solver's options define."""

    def solve_for(self, call: Call) -> LinearSolve:
        """The linear solve of this call: :meth:`linear_solve`, unless the call brings what the solve needs
        (SAMA's ``call.preconditioner``)."""
        return self.linear_solve()

    def matvec(self, lin: Linearization, call: Call) -> MatVec:
        """The product ``p -> H p`` the linear solve uses: ``lin``'s Hessian-vector product."""
        return lin.hvp

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, call):
        with call.stage("grad_outer"):
            outer = outer_gradients(problem, params, hparams, outer_batch, call.reduce, self.hvp)
        with call.stage("linearize"):
            lin = self.linearize(problem, params, hparams, inner_batch, call.reduce)
        return self._implicit(lin, outer, call)

    def _implicit(self, lin: Linearization, outer: tuple[Any, Tree, Tree], call: Call) -> Tree:
        """``grad_phi f - J solve(H, grad_theta f)`` from ``outer = (f, grad_theta f, grad_phi f)``; the solve
        starts from ``call.v0`` when given. ``call.info.v`` is set to ``v``."""
        f_val, f_theta, f_phi = outer
        solve, warm = self.solve_for(call), {} if call.v0 is None else {"x0": call.v0}
        with call.stage("solve"):
            v, result = solve_accumulating(solve, self.matvec(lin, call), f_theta, **warm)
        with call.stage("mixed"):  # v is float32 where f_theta is bf16 / fp16: the product is in f_theta's dtype
            jv = lin.mixed({k: t.to(f_theta[k].dtype) for k, t in v.items()})
        call.info.record_solve(result)
        call.info.v = {k: t.detach() for k, t in v.items()}
        call.info.inner_value, call.info.outer_value = float(lin.value), float(f_val)
        return tree_sub(f_phi, jv)

    @overload
    def hypergrad_at(
        self,
        lin: Linearization,
        outer_batch: Any,
        *,
        return_info: Literal[False] = False,
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> Tree: ...

    @overload
    def hypergrad_at(
        self,
        lin: Linearization,
        outer_batch: Any,
        *,
        return_info: Literal[True],
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> tuple[Tree, HypergradInfo]: ...

    def hypergrad_at(
        self,
        lin: Linearization,
        outer_batch: Any,
        *,
        return_info: bool = False,
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> Tree | tuple[Tree, HypergradInfo]:
        """The hypergradient at a caller's linearisation of ``g``: ``grad_phi f - J solve(H, grad_theta f)``
        with ``H``, ``J``, the point ``(params, hparams)``, the HVP mode and ``reduce`` all taken from
        ``lin`` (e.g. the training loop's inner step, whose ``grad_theta g`` also makes the inner
        update). Equal to :meth:`hypergrad` at ``lin``'s point and batch, without its ``"linearize"``
        stage (one forward and backward pass of ``g``). ``v0`` (a warm start) and ``preconditioner`` as in
        :meth:`hypergrad`.

        Raises ``TypeError`` when ``lin`` is not a :class:`~bilevel.products.Linearization` and
        ``ValueError`` when its ``params`` / ``hparams`` were updated in place after it was built
        (take the hypergradient before the update).
        """
        if not isinstance(lin, Linearization):
            raise TypeError(f"{self.name}: lin must be a bilevel.Linearization, got {type(lin).__name__}")
        stale = lin.modified()
        if stale:
            raise ValueError(f"{self.name}: the linearisation is stale: {stale[:3]} were updated in place after it")
        first = next(iter(lin.params.values()))
        call = self._call(first.device, lin.reduce, hvp_batches, v0, preconditioner)

        def compute() -> Tree:
            with call.stage("grad_outer"):
                outer = outer_gradients(lin.problem, lin.params, lin.hparams, outer_batch, lin.reduce, lin.mode)
            return self._implicit(lin, outer, call)

        return self._finish(call, compute, return_info)


@dataclass
class AID(AIDSolver):
    """AID with any linear solve: ``grad F ~ grad_phi f - J solve(H, grad_theta f)``.

    Args:
        solve: a linear solve ``(matvec, b) -> (v, SolveResult)``, e.g. ``bilevel.linalg.cg(iters=10)``.
        hvp: how ``H p`` is taken: ``"autograd"`` (default), ``"rev-rev"``, ``"fwd-rev"`` or ``"fd"``.
        mixed: how ``J v`` is taken: ``"autograd"`` (default), ``"jvp"``, ``"fd"``, ``"fd-onesided"``.
        fd_radius: the finite differences' radius ``r`` (step ``e = r / ||v||``).

    Examples:
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> mine = bl.AID(solve=bl.linalg.cg(iters=20, tol=1e-12)).hypergrad(*ex.args)
        >>> preset = bl.AIDCG(iters=20, tol=1e-12).hypergrad(*ex.args)
        >>> bool((mine["lam"] == preset["lam"]).all())
        True
    """

    solve: LinearSolve
    hvp: HVPMode = "autograd"
    mixed: MixedMode = "autograd"
    fd_radius: float = 1e-2

    name = "aid"

    def __post_init__(self) -> None:
        if not callable(self.solve):
            raise TypeError(f"solve must be a linear solve (matvec, b) -> (v, SolveResult), got {self.solve!r}")
        super().__post_init__()

    def linear_solve(self) -> LinearSolve:
        return self.solve
