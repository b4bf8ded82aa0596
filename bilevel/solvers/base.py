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

import numpy as np
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


def _same_batch(a: Any, b: Any) -> bool:
    """Whether two batches hold the same data: the same object, or containers (tuple, list, dict) of
    equal structure whose tensors are equal (``torch.equal``) and whose other leaves compare equal."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_batch, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # objects without a meaningful ==
        return False


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
    _linearization: Linearization | None = None

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
        linearization: Linearization | None = None,
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
        linearization: Linearization | None = None,
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
        linearization: Linearization | None = None,
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
            linearization: AID solvers only: a :class:`~bilevel.products.Linearization` of ``g`` at
                exactly these ``(params, hparams)`` on ``inner_batch``, built with the solver's ``hvp``
                mode and the same ``reduce``, e.g. by the training loop's inner step, whose
                ``grad_theta`` then serves both the inner update and the hypergradient. It replaces the
                solver's own ``grad_theta g`` evaluation (the ``"linearize"`` stage: one forward and
                backward of ``g``); the result is the same. Take the hypergradient before any in-place
                update of ``params``: autograd refuses a graph whose saved tensors were modified.

        Returns:
            a dict with the keys, shapes, dtype and device of ``hparams``, without autograd history.

        Raises:
            TypeError / ValueError: malformed or empty dicts, mixed dtypes or devices, an objective
                that does not return a 0-dim floating tensor, a ``linearization`` given to ITD or taken
                at another point, batch, mode or ``reduce``.
            FloatingPointError: a non-finite objective or hypergradient.
        """
        if not isinstance(problem, BilevelProblem):
            raise TypeError(f"problem must be a bilevel.BilevelProblem, got {type(problem).__name__}")
        _, device = check_trees(params, hparams)
        info = HypergradInfo(solver=self.name)
        if linearization is not None:
            self._check_linearization(linearization, params, hparams, inner_batch, reduce)
        self._reduce, self._linearization = reduce, linearization
        self._sync = device.type == "cuda"
        start = time.perf_counter()
        # Second derivatives through attention: the fused SDPA kernels (flash / memory-efficient) have no
        # double backward, so attention is computed by the math kernel while a hypergradient is taken.
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                hg = self._hypergrad(problem, tree_detach(params), tree_detach(hparams), inner_batch, outer_batch, info)
        finally:
            self._linearization = None  # never keep the caller's graph alive past the call
        if self._sync:
            torch.cuda.synchronize(device)
        info.times["total"] = time.perf_counter() - start
        if not tree_all_finite(hg):
            bad = [k for k, v in hg.items() if not bool(torch.isfinite(v).all())]
            raise FloatingPointError(f"{self.name}: the hypergradient is non-finite for hparams {bad}")
        hg = tree_detach(hg)
        return (hg, info) if return_info else hg

    def _check_linearization(
        self, lin: Any, params: Tree, hparams: Tree, inner_batch: Any, reduce: Reduce | None
    ) -> None:
        raise ValueError(
            f"{self.name}: linearization= is for the AID solvers (aid-cg, aid-fp, aid-fp-lite, stocbio); "
            f"{type(self).__name__} does not linearise g"
        )

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

    Cost: one gradient of ``f``, one gradient of ``g`` with its graph (none when the caller passes
    its own ``linearization``), ``n_hvp`` HVPs and one mixed product. Peak memory: one first-order
    graph of ``g``, independent of the iteration count.
    Subclasses implement :meth:`solve`.
    """

    hvp: HVPMode

    def _check_linearization(self, lin, params, hparams, inner_batch, reduce):
        where = f"{self.name}: linearization="
        if not isinstance(lin, Linearization):
            raise TypeError(f"{where} must be a bilevel.products.Linearization, got {type(lin).__name__}")
        if lin.mode != self.hvp:
            raise ValueError(f"{where} was built with hvp mode {lin.mode!r}, this solver uses {self.hvp!r}")
        if not _same_batch(lin.batch, inner_batch):
            raise ValueError(f"{where} was built on another batch than inner_batch")
        if not lin.uses_reduce(reduce):
            raise ValueError(f"{where} was built with another reduce= than this call's")
        stale = lin.modified()
        if stale:
            raise ValueError(f"{where} is stale: {stale[:3]} were updated in place after it was built")
        for tname, given, held in (("params", params, lin.params), ("hparams", hparams, lin.hparams)):
            if given.keys() != held.keys():
                raise ValueError(f"{where} has {tname} keys {sorted(held)}, this call {sorted(given)}")
            moved = [k for k in given if not torch.equal(given[k], held[k])]
            if moved:
                raise ValueError(f"{where} was taken at other {tname} values ({moved[:3]} differ)")

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, info):
        with self._stage(info, "grad_outer"):
            f_val, f_theta, f_phi = outer_gradients(problem, params, hparams, outer_batch, self._reduce, self.hvp)
        lin = self._linearization
        if lin is None:
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
