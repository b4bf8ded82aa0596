"""The one interface every hypergradient solver implements.

    hg = solver.hypergrad(problem, params, hparams, inner_batch, outer_batch)

returns an estimate of ``dF/dphi`` for ``F(phi) = f(theta*(phi), phi)``, a tree shaped like
``hparams``. By the implicit function theorem at a stationary point of ``g``:

    grad F = grad_phi f - J H^{-1} grad_theta f,    H = d2g/dtheta2,  J = d2g/dphi dtheta

The AID solvers (:class:`AIDSolver` subclasses) differ only in how they approximate
``v = H^{-1} grad_theta f``; ITD differentiates through unrolled inner steps instead.
Solvers never read or write ``.grad`` and never modify their inputs: ``params`` and
``hparams`` are detached on entry and the result carries no autograd history.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, overload

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._tree import Tree, tree_all_finite, tree_detach, tree_sub
from ..linalg import SolveResult
from ..problem import BilevelProblem, check_trees
from ..products import HVP_MODES, HVPMode, Linearization, Reduce, outer_gradients

__all__ = ["AIDSolver", "HypergradInfo", "Solver"]


@dataclass
class HypergradInfo:
    """Diagnostics of one hypergradient.

    Attributes:
        solver: the solver's registry name.
        iters: linear-solver iterations (AID) or unrolled steps (ITD) performed.
        residuals: CG residual norms ``||b - H v_k||``, or Neumann term norms ``||p_j||``.
        converged: CG met its tolerance (None where the solver has no stopping test).
        negative_curvature: CG met ``p^T H p <= 0``.
        diverged: the Neumann series grew (see :func:`bilevel.linalg.neumann_series`).
        n_hvp: Hessian-vector products evaluated.
        inner_value, outer_value: ``g`` and ``f`` at the given point (ITD: ``f`` after unrolling).
        times: wall-clock seconds per stage and ``"total"`` (CUDA is synchronised per stage).
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

    def record_solve(self, res: SolveResult) -> None:
        self.iters, self.residuals, self.converged = res.iters, res.residuals, res.converged
        self.negative_curvature, self.diverged = res.negative_curvature, res.diverged


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class Solver(ABC):
    """Base class of hypergradient solvers; subclasses implement :meth:`_hypergrad`.

    A solver holds its options and, during one :meth:`hypergrad` call, that call's ``reduce`` and
    device flags: use one instance per thread (the instances are cheap dataclasses).
    """

    name: ClassVar[str]
    _reduce: Reduce | None = None

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

        Returns:
            a dict with the keys, shapes, dtype and device of ``hparams``, without autograd history.

        Raises:
            TypeError / ValueError: malformed or empty dicts, mixed dtypes or devices, an objective
                that does not return a 0-dim floating tensor.
            FloatingPointError: a non-finite objective or hypergradient.
        """
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        _, device = check_trees(params, hparams)
        info = HypergradInfo(solver=self.name)
        self._reduce = reduce
        self._sync = device.type == "cuda"
        start = time.perf_counter()
        # Second derivatives through attention: the fused SDPA kernels (flash / memory-efficient) have no
        # double backward, so attention is computed by the math kernel while a hypergradient is taken.
        with sdpa_kernel([SDPBackend.MATH]):
            hg = self._hypergrad(problem, tree_detach(params), tree_detach(hparams), inner_batch, outer_batch, info)
        if self._sync:
            torch.cuda.synchronize(device)
        info.times["total"] = time.perf_counter() - start
        if not tree_all_finite(hg):
            bad = [k for k, v in hg.items() if not bool(torch.isfinite(v).all())]
            raise FloatingPointError(f"{self.name}: the hypergradient is non-finite for hparams {bad}")
        hg = tree_detach(hg)
        return (hg, info) if return_info else hg

    @contextmanager
    def _stage(self, info: HypergradInfo, key: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        if self._sync:
            torch.cuda.synchronize()
        info.times[key] = info.times.get(key, 0.0) + time.perf_counter() - t

    @abstractmethod
    def _hypergrad(
        self,
        problem: BilevelProblem,
        params: Tree,
        hparams: Tree,
        inner_batch: Any,
        outer_batch: Any,
        info: HypergradInfo,
    ) -> Tree: ...


class AIDSolver(Solver):
    """Approximate implicit differentiation: ``grad F ~ grad_phi f - J v`` with ``v ~ H^{-1} grad_theta f``.

    Cost: one gradient of ``f``, one gradient of ``g`` with its graph, ``n_hvp`` HVPs and one mixed
    product. Peak memory: one first-order graph of ``g``, independent of the iteration count.
    Subclasses implement :meth:`solve`.
    """

    hvp: HVPMode

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, info):
        with self._stage(info, "grad_outer"):
            f_val, f_theta, f_phi = outer_gradients(problem, params, hparams, outer_batch, self._reduce, self.hvp)
        with self._stage(info, "linearize"):
            lin = Linearization(problem, params, hparams, inner_batch, self.hvp, self._reduce)
        with self._stage(info, "solve"):
            v = self.solve(problem, lin, f_theta, params, hparams, info)
        with self._stage(info, "mixed"):
            jv = lin.mixed(v)
        info.n_hvp += lin.n_hvp
        info.inner_value, info.outer_value = float(lin.value), float(f_val)
        return tree_sub(f_phi, jv)

    @abstractmethod
    def solve(
        self, problem: BilevelProblem, lin: Linearization, b: Tree, params: Tree, hparams: Tree, info: HypergradInfo
    ) -> Tree:
        """Return ``v ~ H^{-1} b`` (``b = grad_theta f``), recording what was done in ``info``."""


def check_aid_options(solver: AIDSolver) -> None:
    """Validate the option shared by all AID solvers."""
    _check_choice("hvp", solver.hvp, HVP_MODES)
