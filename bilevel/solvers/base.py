"""The one interface every hypergradient solver implements.

    hg = solver.hypergrad(problem, params, hparams, inner_batch, outer_batch)

returns an estimate of ``dF/dphi`` for ``F(phi) = f(theta*(phi), phi)``, a tree shaped like
``hparams``. By the implicit function theorem at a stationary point of ``g``:

    grad F = grad_phi f - J H^{-1} grad_theta f,    H = d2g/dtheta2,  J = d2g/dphi dtheta

The AID solvers (:mod:`bilevel.solvers.aid`) differ only in the linear solve that approximates
``v = H^{-1} grad_theta f``; ITD differentiates through unrolled inner steps instead.
Solvers never read or write ``.grad`` and never modify their inputs: ``params`` and
``hparams`` are detached on entry and the result carries no autograd history. A solver holds
only its options; what belongs to one call (``reduce``, fresh HVP batches, a warm start ``v0``, the
diagnostics) travels in a :class:`Call`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, overload

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._tree import Tree, tree_all_finite, tree_detach
from ..distributed import is_sharded
from ..functional import buffers_read_only
from ..linalg import SolveResult
from ..problem import BilevelProblem, check_trees
from ..products import Reduce

__all__ = ["Call", "HypergradInfo", "Solver"]


@dataclass
class HypergradInfo:
    """Diagnostics of one hypergradient.

    Attributes:
        solver: the solver's registry name.
        iters: linear-solve iterations (AID) or unrolled steps (ITD) performed.
        residuals: CG residual norms ``||b - H v_k||``, Neumann term norms ``||p_j||``, or ITD's adjoint norms
            ``||dF/dtheta_t||`` (``t = T, T-1, ...``; :class:`~bilevel.ITD`).
        converged: CG met its tolerance (None where the solver has no stopping test).
        negative_curvature: CG met ``p^T H p <= 0``.
        diverged: the Neumann series grew (see :func:`bilevel.linalg.neumann_series`), or ITD's adjoints did
            (``on_divergence`` of :class:`~bilevel.ITD`).
        n_hvp: Hessian-vector products evaluated (with a warm start, one more than ``iters``: ``H v0``).
        inner_value, outer_value: ``g`` and ``f`` at the given point (ITD: ``f`` after unrolling).
        times: wall-clock seconds per stage and ``"total"`` (CUDA is synchronised per stage).
        v: the AID solvers' final ``v ~ H^{-1} grad_theta f`` (a detached tree like ``params``), e.g. the
            warm start ``v0`` of the next call; None for ITD.
        warm_start: the call started its linear solve from a given ``v0``.
    """

    solver: str
    iters: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool | None = None
    negative_curvature: bool = False
    diverged: bool = False
    n_hvp: int = 0
    inner_value: float | None = None
    outer_value: float | None = None
    times: dict[str, float] = field(default_factory=dict)
    v: Tree | None = field(default=None, repr=False)
    warm_start: bool = False

    def record_solve(self, res: SolveResult) -> None:
        """Copy a linear solve's result; every iteration of CG and Neumann is one product (Nyström: its
        ``rank`` products), and a warm start one more."""
        self.iters, self.residuals, self.converged = res.iters, res.residuals, res.converged
        self.negative_curvature, self.diverged = res.negative_curvature, res.diverged
        self.n_hvp += res.iters + res.warm_hvp


@dataclass
class Call:
    """What belongs to one hypergradient call.

    Attributes:
        info: the call's diagnostics, filled in as it goes.
        reduce: the all-reduce mean over data-parallel ranks, or None.
        hvp_batches: fresh inner batches for solvers that draw one per product (StocBiO), or None.
        sync: synchronise CUDA at the end of every stage (stage timings are then device times).
        v0: the warm start of the linear solve (an initial guess of ``v``, a tree like ``params``), or None.
        preconditioner: a diagonal inverse-Hessian approximation for solvers with ``takes_preconditioner``
            (SAMA: the inner optimizer's, :func:`bilevel.solvers.sama.sama_preconditioner`), or None.
    """

    info: HypergradInfo
    reduce: Reduce | None = None
    hvp_batches: Iterator[Any] | None = None
    sync: bool = False
    v0: Tree | None = None
    preconditioner: Tree | None = None

    @contextmanager
    def stage(self, key: str) -> Iterator[None]:
        """Time a stage into ``info.times[key]`` (accumulating)."""
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.info.times[key] = self.info.times.get(key, 0.0) + time.perf_counter() - t


class Solver(ABC):
    """Base class of hypergradient solvers: dataclasses of options implementing :meth:`_hypergrad`.

    ``draws_hvp_batches``: the solver uses fresh inner batches for its products (``hvp_batches=``),
    so a training loop should supply a stream of them. ``takes_preconditioner``: the solver reads a
    per-call diagonal ``preconditioner=`` built from the inner optimizer's state (SAMA), which a training
    loop should supply.
    """

    name: ClassVar[str]
    draws_hvp_batches: ClassVar[bool] = False
    takes_preconditioner: ClassVar[bool] = False

    @property
    def supports_warm_start(self) -> bool:
        """Whether a call takes ``v0=`` (a warm start of its linear solve): the AID solvers whose linear
        solve is iterative (CG, Neumann: AID-CG, AID-FP, StocBiO); not ITD, AID-FP-Lite or Nyström."""
        return False

    @overload
    def hypergrad(
        self,
        problem: BilevelProblem,
        params: Tree,
        hparams: Tree,
        inner_batch: Any,
        outer_batch: Any,
        *,
        return_info: Literal[False] = False,
        reduce: Reduce | None = None,
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> Tree: ...

    @overload
    def hypergrad(
        self,
        problem: BilevelProblem,
        params: Tree,
        hparams: Tree,
        inner_batch: Any,
        outer_batch: Any,
        *,
        return_info: Literal[True],
        reduce: Reduce | None = None,
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> tuple[Tree, HypergradInfo]: ...

    def hypergrad(
        self,
        problem: BilevelProblem,
        params: Tree,
        hparams: Tree,
        inner_batch: Any,
        outer_batch: Any,
        *,
        return_info: bool = False,
        reduce: Reduce | None = None,
        hvp_batches: Iterator[Any] | None = None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> Tree | tuple[Tree, HypergradInfo]:
        """Estimate ``dF/dhparams`` at ``(params, hparams)``.

        Args:
            problem: the two objectives.
            params: inner parameters ``theta`` (the AID solvers assume ``grad_theta g = 0`` there;
                ITD starts its unrolled steps there).
            hparams: outer parameters ``phi``.
            inner_batch: the batch passed to ``g``; outer_batch: the batch passed to ``f``.
            return_info: also return a :class:`HypergradInfo`.
            reduce: for data-parallel training, a function that averages a tree over ranks (an
                all-reduce mean). AID solvers apply it to ``grad_theta f``, ``grad_phi f``, every
                HVP and the mixed product, so that with each rank holding 1/N of each batch the
                result is the hypergradient of the whole batch (not an average of per-rank
                hypergradients). ITD averages each unrolled step's gradient over ranks instead.
            hvp_batches: for solvers with ``draws_hvp_batches`` (StocBiO): an iterator of inner
                batches, one drawn per product, for this call (it replaces the solver's own
                ``batches``).
            v0: a warm start for solvers with ``supports_warm_start``: an initial guess of
                ``v ~ H^{-1} grad_theta f`` (a tree like ``params``, e.g. the ``info.v`` of a previous call at
                a nearby point), from which the linear solve starts (:func:`bilevel.linalg.conjugate_gradient`,
                :func:`bilevel.linalg.neumann_series`); one more product.
            preconditioner: for solvers with ``takes_preconditioner`` (SAMA): the diagonal ``P`` of
                ``H^{-1} ~ P`` for this call, a tree like ``params`` (e.g.
                :func:`bilevel.solvers.sama.sama_preconditioner` of the inner optimizer); None: the identity.

        Returns:
            a dict with the keys, shapes, dtype and device of ``hparams``, without autograd history.

        Raises:
            TypeError / ValueError: malformed or empty dicts, mixed dtypes or devices, an objective
                that does not return a 0-dim floating tensor, ``hvp_batches`` for a solver that draws
                none, ``v0`` for a solver without ``supports_warm_start`` or not shaped like ``params``,
                ``preconditioner`` for a solver without ``takes_preconditioner`` or not shaped like ``params``.
            FloatingPointError: a non-finite objective or hypergradient.
        """
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        _, device = check_trees(params, hparams)
        call = self._call(device, reduce, hvp_batches, v0, preconditioner)
        if is_sharded(params):  # FSDP: the live shards themselves (see bilevel.distributed.is_sharded)
            self.check_sharded(reduce)
        else:
            params = tree_detach(params)
        return self._finish(
            call,
            lambda: self._hypergrad(problem, params, tree_detach(hparams), inner_batch, outer_batch, call),
            return_info,
        )

    def check_sharded(self, reduce: Reduce | None) -> None:
        """Raise ``ValueError`` unless this solver can run on FSDP2 shards (first-order products only)."""
        raise ValueError(
            f"{self.name} cannot run on FSDP (fully_shard) parameters: it differentiates twice through the model, "
            "which FSDP does not support; first-order solvers can: bl.SAMA(), bl.AIDFPLite(mixed='fd'), or "
            "AID-CG / AID-FP / Nyström with hvp='fd' and mixed='fd'"
        )

    def _call(
        self,
        device: torch.device,
        reduce: Reduce | None,
        hvp_batches: Iterator[Any] | None,
        v0: Tree | None = None,
        preconditioner: Tree | None = None,
    ) -> Call:
        if hvp_batches is not None and not self.draws_hvp_batches:
            raise ValueError(f"{self.name}: hvp_batches= is for solvers that draw fresh HVP batches (stocbio)")
        if v0 is not None and not self.supports_warm_start:
            raise ValueError(
                f"{self.name}: v0= (a warm start) needs an iterative linear solve (aid-cg, aid-fp, stocbio, or AID "
                f"with bilevel.linalg.cg / neumann); {type(self).__name__} has none to start"
            )
        if preconditioner is not None and not self.takes_preconditioner:
            raise ValueError(
                f"{self.name}: preconditioner= is for solvers that take the inner optimizer's diagonal preconditioner "
                "(sama)"
            )
        info = HypergradInfo(solver=self.name, warm_start=v0 is not None)
        return Call(info, reduce, hvp_batches, sync=device.type == "cuda", v0=v0, preconditioner=preconditioner)

    def _finish(self, call: Call, compute: Callable[[], Tree], return_info: bool) -> Tree | tuple[Tree, HypergradInfo]:
        """Run ``compute`` timed, with the math attention kernel, and check that its result is finite."""
        start = time.perf_counter()
        # Second derivatives through attention: the fused SDPA kernels (flash / memory-efficient) have no
        # double backward, so attention is computed by the math kernel while a hypergradient is taken.
        # Buffers (batch-norm statistics) are read, never written, during a hypergradient
        # (bilevel.functional's buffer policy).
        with sdpa_kernel([SDPBackend.MATH]), buffers_read_only():
            hg = compute()
        if call.sync:
            torch.cuda.synchronize()
        call.info.times["total"] = time.perf_counter() - start
        if not tree_all_finite(hg):
            bad = [k for k, v in hg.items() if not bool(torch.isfinite(v).all())]
            raise FloatingPointError(f"{self.name}: the hypergradient is non-finite for hparams {bad}")
        hg = tree_detach(hg)
        return (hg, call.info) if return_info else hg

    @abstractmethod
    def _hypergrad(
        self, problem: BilevelProblem, params: Tree, hparams: Tree, inner_batch: Any, outer_batch: Any, call: Call
    ) -> Tree: ...
