"""First- and second-order products of the objectives.

With ``H = d2 g / d theta d theta`` (|theta| x |theta|) and ``J = d2 g / d phi d theta``
(|phi| x |theta|), the implicit hypergradient needs only

    H p = d/d theta < grad_theta g(theta, phi), p >      Hessian-vector product (HVP)
    J v = d/d phi   < grad_theta g(theta, phi), v >      mixed product, v held constant

and never forms ``H`` or ``J``. :class:`Linearization` evaluates ``grad_theta g`` once and
returns closures for these products. Three modes are offered (``hvp=`` of the AID solvers):

``"autograd"`` (default)
    reverse-over-reverse with ``torch.autograd.grad(..., create_graph=True)``: one first-order
    graph of ``g``, then one backward pass through it per product, pruned to ``theta`` (HVP) or
    to ``phi`` (mixed product). Memory: that one graph, whatever the number of products.
``"rev-rev"``
    reverse-over-reverse with :mod:`torch.func`: ``torch.func.vjp`` of ``torch.func.grad(g)`` in
    ``(theta, phi)`` builds the first-order graph once; each product is one backward pass through
    it, returning ``(H p, J p)`` together (the ``phi`` part is computed and dropped in an HVP).
    Composes with other :mod:`torch.func` transforms, but its per-op functorch wrapping costs:
    measured 1.0-3.2x slower per hypergradient than ``"autograd"`` (ridge/diabetes, ridge d=2000,
    an 85k-parameter MLP with a meta-network), the gap largest for AID-FP-Lite.
``"fwd-rev"``
    forward-over-reverse: ``torch.func.jvp(torch.func.grad(g), theta, p)`` per product. It re-runs
    and re-traces the first-order computation at every call: 8-10x slower per HVP than the
    reverse-over-reverse modes in ``benchmarks/hypergrad_accuracy.py``, but keeps no graph alive
    between products.

Each mode's products are equal to rounding (tested). ``docs/results.md`` has the measurements
behind the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._tree import Tree
from .problem import BilevelProblem, Objective, check_finite

__all__ = ["HVPMode", "Linearization", "Reduce", "grad_tree", "leaves", "outer_gradients", "resampled_hvp"]

HVPMode = Literal["rev-rev", "autograd", "fwd-rev"]
HVP_MODES: tuple[str, ...] = ("rev-rev", "autograd", "fwd-rev")


Reduce = Callable[[Tree], Tree]


def _identity(tree: Tree) -> Tree:
    return tree


def leaves(tree: Tree) -> dict[str, Tensor]:
    """Fresh autograd leaves with the values of ``tree``."""
    return {k: v.detach().requires_grad_(True) for k, v in tree.items()}


def grad_tree(outputs: Tensor | list[Tensor], inputs: dict[str, Tensor], **kw: Any) -> Tree:
    """``torch.autograd.grad`` over a dict of inputs; exact zeros for inputs that are not reached."""
    out = torch.autograd.grad(outputs, list(inputs.values()), allow_unused=True, materialize_grads=True, **kw)
    return dict(zip(inputs, out, strict=True))


def outer_gradients(
    problem: BilevelProblem,
    params: Tree,
    hparams: Tree,
    batch: Any,
    reduce: Reduce | None = None,
    mode: HVPMode = "autograd",
) -> tuple[Tensor, Tree, Tree]:
    """Return ``(f, grad_theta f, grad_phi f)`` at ``(params, hparams)`` on ``batch``.

    ``grad_phi f`` is a tree of exact zeros for hparams that ``f`` does not use.
    ``reduce`` (e.g. an all-reduce mean over data-parallel ranks) is applied to both gradients.
    ``mode="autograd"`` uses :func:`torch.autograd.grad`, the others :func:`torch.func.grad`.
    Raises ``FloatingPointError`` if ``f`` is not finite.
    """
    red = reduce or _identity
    f = problem.objective("outer", "grad of f")
    if mode == "autograd":
        with torch.enable_grad():
            th, ph = leaves(params), leaves(hparams)
            value = f(th, ph, batch)
            check_finite(value.detach(), "outer", "grad of f")
            out = torch.autograd.grad(value, [*th.values(), *ph.values()], allow_unused=True, materialize_grads=True)
        g_theta, g_phi = dict(zip(th, out[: len(th)], strict=True)), dict(zip(ph, out[len(th) :], strict=True))
        value = value.detach()
    else:
        (g_theta, g_phi), value = grad_and_value(f, argnums=(0, 1))(params, hparams, batch)
        check_finite(value, "outer", "grad of f")
    return value, red(g_theta), red(g_phi)


class Linearization:
    """The inner objective linearised at ``(params, hparams)`` on one batch.

    Attributes:
        value: ``g(theta, phi)``, a 0-dim tensor (checked finite).
        grad_theta: ``grad_theta g`` (a tree shaped like ``params``), without autograd history.
        n_hvp: number of Hessian-vector products evaluated so far.
        problem, params, hparams, batch, mode, reduce: what it was built from (read-only).

    It is everything an AID hypergradient needs of ``g``: ``solver.hypergrad_at(lin, outer_batch)``
    takes the point, the products and ``reduce`` from it. One linearisation can serve both an inner
    update (``grad_theta``) and a hypergradient, which saves the solver one forward and backward pass
    of ``g``. Its retained graph refers to the storage of ``params``: use it before any in-place
    update of them (autograd raises otherwise; :meth:`modified` tells).

    ``reduce``, when given, is applied to every product (``H p`` and ``J v``): with an all-reduce
    mean over data-parallel ranks, the products are those of the rank-averaged objective.
    ``grad_theta`` and ``value`` stay local to the batch.
    """

    def __init__(
        self,
        problem: BilevelProblem,
        params: Tree,
        hparams: Tree,
        batch: Any,
        mode: HVPMode = "autograd",
        reduce: Reduce | None = None,
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES}")
        g = problem.objective("inner", "grad/Hessian of g")
        self._problem, self._params, self._hparams, self._batch, self._g = problem, params, hparams, batch, g
        self.mode: HVPMode = mode
        self.n_hvp = 0
        self._given_reduce = reduce
        self._reduce = reduce or _identity
        self._versions = [{k: v._version for k, v in tree.items()} for tree in (params, hparams)]
        # the fused SDPA kernels have no double backward: the graph is built with the math kernel
        with sdpa_kernel([SDPBackend.MATH]):
            self._build(g, params, hparams, batch, mode)

    def _build(self, g: Objective, params: Tree, hparams: Tree, batch: Any, mode: HVPMode) -> None:
        if mode == "autograd":
            with torch.enable_grad():
                self._th, self._ph = leaves(params), leaves(hparams)
                value = g(self._th, self._ph, batch)
                check_finite(value.detach(), "inner", "grad/Hessian of g")
                g_theta = grad_tree(value, self._th, create_graph=True)
            self.value = value.detach()
            self.grad_theta = {k: v.detach() for k, v in g_theta.items()}
            # only the entries of grad_theta g that depend on (theta, phi) carry a graph
            self._graph = {k: v for k, v in g_theta.items() if v.requires_grad}
            return
        grad_g = grad_and_value(g, argnums=0)
        if mode == "rev-rev":
            self.grad_theta, self._vjp, self.value = vjp(
                lambda t, h: grad_g(t, h, batch), params, hparams, has_aux=True
            )
        else:
            self.grad_theta, self.value = grad_g(params, hparams, batch)
        check_finite(self.value, "inner", "grad/Hessian of g")

    @property
    def problem(self) -> BilevelProblem:
        return self._problem

    @property
    def reduce(self) -> Reduce | None:
        """The reduction applied to every product (None: not reduced)."""
        return self._given_reduce

    @property
    def params(self) -> Tree:
        return self._params

    @property
    def hparams(self) -> Tree:
        return self._hparams

    @property
    def batch(self) -> Any:
        return self._batch

    def modified(self) -> list[str]:
        """Keys of ``params`` / ``hparams`` updated in place since the linearisation (their version
        counter moved): products through the graph would be refused by autograd, or be stale."""
        trees = zip((self._params, self._hparams), self._versions, strict=True)
        return [k for tree, seen in trees for k, v in tree.items() if v._version != seen[k]]

    def hvp(self, p: Tree) -> Tree:
        """``H p`` with ``H`` the Hessian of ``g`` in ``params`` (shape of ``params``)."""
        self.n_hvp += 1
        if self.mode == "autograd":
            return self._reduce(self._backward(p, self._th))
        if self.mode == "rev-rev":
            return self._reduce(self._vjp(p)[0])
        g, h, b = self._g, self._hparams, self._batch
        return self._reduce(jvp(lambda t: grad(g)(t, h, b), (self._params,), (p,))[1])

    def mixed(self, v: Tree) -> Tree:
        """``J v = grad_phi < grad_theta g(theta, phi), v >`` (shape of ``hparams``; zeros where
        a hparam does not reach ``grad_theta g``)."""
        if self.mode == "autograd":
            return self._reduce(self._backward(v, self._ph))
        if self.mode == "rev-rev":
            return self._reduce(self._vjp(v)[1])
        g, t, b = self._g, self._params, self._batch
        return self._reduce(vjp(lambda h: grad(g)(t, h, b), self._hparams)[1](v)[0])

    def _backward(self, cotangent: Tree, inputs: dict[str, Tensor]) -> Tree:
        """``d/d inputs < grad_theta g, cotangent >`` through the retained first-order graph."""
        if not self._graph:  # grad_theta g is constant: every second derivative is zero
            return {k: torch.zeros_like(v) for k, v in inputs.items()}
        keys = list(self._graph)
        with torch.enable_grad():
            return grad_tree(
                [self._graph[k] for k in keys], inputs, grad_outputs=[cotangent[k] for k in keys], retain_graph=True
            )


def resampled_hvp(lin: Linearization, batches: Iterator[Any]) -> Callable[[Tree], Tree]:
    """A matvec ``p -> H_B p`` whose every call linearises ``g`` at ``lin``'s point on the next batch
    ``B = next(batches)`` (StocBiO's stochastic products), in ``lin``'s mode and with its ``reduce``.

    Each product costs one gradient of ``g`` with its graph plus one backward pass.
    """

    drawn = 0

    def matvec(p: Tree) -> Tree:
        nonlocal drawn
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"the HVP batches ran out after {drawn} product(s); pass an endless stream") from None
        drawn += 1
        return Linearization(lin.problem, lin.params, lin.hparams, batch, lin.mode, lin.reduce).hvp(p)

    return matvec
