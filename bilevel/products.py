"""First- and second-order products of the objectives, computed with :mod:`torch.func`.

With ``H = d2 g / d theta d theta`` (|theta| x |theta|) and ``J = d2 g / d phi d theta``
(|phi| x |theta|), the implicit hypergradient needs only

    H p = d/d theta < grad_theta g(theta, phi), p >      Hessian-vector product (HVP)
    J v = d/d phi   < grad_theta g(theta, phi), v >      mixed product, v held constant

and never forms ``H`` or ``J``. :class:`Linearization` evaluates ``grad_theta g`` once and
returns closures for these products. Two HVP modes are offered:

``"rev-rev"`` (default)
    reverse-over-reverse: ``torch.func.vjp`` of ``torch.func.grad(g)`` in ``(theta, phi)``
    builds the first-order graph once; each product is then one backward pass through it,
    returning ``(H p, J p)`` together. Its memory is that graph, whatever the number of products.
``"fwd-rev"``
    forward-over-reverse: ``torch.func.jvp(torch.func.grad(g), theta, p)`` per product. It
    re-runs (and re-traces) the first-order computation at every call, so it costs about one
    gradient evaluation more per product than ``"rev-rev"`` but keeps no graph alive between
    products. ``benchmarks/hypergrad_accuracy.py`` measures both; see ``docs/results.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp

from ._tree import Tree
from .problem import BilevelProblem, check_finite

__all__ = ["HVPMode", "Linearization", "Reduce", "outer_gradients"]

HVPMode = Literal["rev-rev", "fwd-rev"]
HVP_MODES: tuple[str, ...] = ("rev-rev", "fwd-rev")


Reduce = Callable[[Tree], Tree]


def _identity(tree: Tree) -> Tree:
    return tree


def outer_gradients(
    problem: BilevelProblem, params: Tree, hparams: Tree, batch: Any, reduce: Reduce | None = None
) -> tuple[Tensor, Tree, Tree]:
    """Return ``(f, grad_theta f, grad_phi f)`` at ``(params, hparams)`` on ``batch``.

    ``grad_phi f`` is a tree of exact zeros for hparams that ``f`` does not use.
    ``reduce`` (e.g. an all-reduce mean over data-parallel ranks) is applied to both gradients.
    Raises ``FloatingPointError`` if ``f`` is not finite.
    """
    red = reduce or _identity
    f = problem.objective("outer", "grad of f")
    (g_theta, g_phi), value = grad_and_value(f, argnums=(0, 1))(params, hparams, batch)
    check_finite(value, "outer", "grad of f")
    return value, red(g_theta), red(g_phi)


class Linearization:
    """The inner objective linearised at ``(params, hparams)`` on one batch.

    Attributes:
        value: ``g(theta, phi)``, a 0-dim tensor (checked finite).
        grad_theta: ``grad_theta g`` (a tree shaped like ``params``).
        n_hvp: number of Hessian-vector products evaluated so far.

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
        mode: HVPMode = "rev-rev",
        reduce: Reduce | None = None,
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES}")
        g = problem.objective("inner", "grad/Hessian of g")
        self._params, self._hparams, self._batch, self._g, self.mode = params, hparams, batch, g, mode
        self.n_hvp = 0
        self._reduce = reduce or _identity
        grad_g = grad_and_value(g, argnums=0)
        if mode == "rev-rev":
            self.grad_theta, self._vjp, self.value = vjp(
                lambda t, h: grad_g(t, h, batch), params, hparams, has_aux=True
            )
        else:
            self.grad_theta, self.value = grad_g(params, hparams, batch)
            self._vjp = None
        check_finite(self.value, "inner", "grad/Hessian of g")

    def hvp(self, p: Tree) -> Tree:
        """``H p`` with ``H`` the Hessian of ``g`` in ``params`` (shape of ``params``)."""
        self.n_hvp += 1
        if self._vjp is not None:
            return self._reduce(self._vjp(p)[0])
        g, h, b = self._g, self._hparams, self._batch
        return self._reduce(jvp(lambda t: grad(g)(t, h, b), (self._params,), (p,))[1])

    def mixed(self, v: Tree) -> Tree:
        """``J v = grad_phi < grad_theta g(theta, phi), v >`` (shape of ``hparams``; zeros where
        a hparam does not reach ``grad_theta g``)."""
        if self._vjp is not None:
            return self._reduce(self._vjp(v)[1])
        g, t, b = self._g, self._params, self._batch
        return self._reduce(vjp(lambda h: grad(g)(t, h, b), self._hparams)[1](v)[0])
