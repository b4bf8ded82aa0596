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

``"fd"``
    first order, central finite differences of gradients: ``H p ~ (grad_theta g(theta + e p) -
    grad_theta g(theta - e p)) / (2 e)`` with ``e = fd_radius / ||p||`` (DARTS' radius), two gradient
    evaluations without a second-order graph; error ``O(e^2)``.

The mixed product ``J v`` has its own modes (``mixed=``):

``"autograd"`` (default)
    a backward pass to ``phi`` through the first-order graph of the HVP mode (exact).
``"jvp"``
    exact, reverse over forward: ``J v = grad_phi [ d/de g(theta + e v, phi) ]_{e=0}``, one
    forward-mode directional derivative of ``g`` along ``v`` (:func:`torch.func.jvp`), then a backward
    pass to ``phi`` only; no double backward through the parts of ``g`` that ``phi`` does not reach.
    torch's forward-mode formula of ``layer_norm`` is not differentiable in its input (its saved
    mean and variance carry no gradient; pytorch/pytorch#196700, measured wrong by a factor of 10^3
    on a transformer layer): while this product is taken, ``torch.nn.functional.layer_norm`` is
    computed by its composite formula ``(x - mean) / sqrt(var + eps) * w + b`` instead (tested
    equal to ``"autograd"`` to 1e-10 on MELTR's transformer). Other fused normalisations
    (batch / group / RMS norm) are not patched: check ``"jvp"`` against ``"autograd"`` on such models.
``"fd"``
    first order, central: ``J v ~ (grad_phi g(theta + e v) - grad_phi g(theta - e v)) / (2 e)``, ``e =
    fd_radius / ||v||``: two forward and first-order backward passes, error ``O(e^2)`` (SAMA, DARTS).
``"fd-onesided"``
    ``J v ~ (grad_phi g(theta + e v) - grad_phi g(theta)) / e``: one pass more than the linearisation
    (``grad_phi g(theta)`` is taken once from it), error ``O(e)``.

With ``hvp="fd"`` and a first-order ``mixed`` mode, no second-order graph is ever built, so the peak
memory is that of a gradient of ``g``. These are also the only modes that run on a model sharded by
FSDP2 (``fully_shard``; params given as its live DTensor parameters, :func:`bilevel.distributed.is_sharded`):
FSDP evaluates the module only at its own parameter values and returns gradients only through
``backward()`` into ``.grad``, so every gradient is taken by writing the point into the shards, one
``backward()``, reading ``.grad`` and restoring values and ``.grad`` exactly (``_sharded_first_order``).
Each exact mode's products are equal to rounding (tested).
``docs/results.md`` has the measurements behind the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._tree import Tree, tree_add, tree_norm
from .distributed import is_sharded
from .problem import BilevelProblem, Objective, check_differentiable, check_finite

__all__ = [
    "HVPMode",
    "Linearization",
    "MixedMode",
    "Reduce",
    "grad_tree",
    "first_order_gradients",
    "leaves",
    "outer_gradients",
    "resampled_hvp",
]

HVPMode = Literal["rev-rev", "autograd", "fwd-rev", "fd"]
HVP_MODES: tuple[str, ...] = ("rev-rev", "autograd", "fwd-rev", "fd")
MixedMode = Literal["autograd", "jvp", "fd", "fd-onesided"]
MIXED_MODES: tuple[str, ...] = ("autograd", "jvp", "fd", "fd-onesided")
FIRST_ORDER_MIXED: tuple[str, ...] = ("fd", "fd-onesided")


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
    ``mode="autograd"`` and ``"fd"`` use :func:`torch.autograd.grad`, the others :func:`torch.func.grad`.
    Raises ``FloatingPointError`` if ``f`` is not finite.
    """
    red = reduce or _identity
    f = problem.objective("outer", "grad of f")
    if mode in ("autograd", "fd") or is_sharded(params):
        value, g_theta, g_phi = first_order_gradients(f, params, hparams, batch, "outer", "grad of f")
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
        problem, params, hparams, batch, mode, reduce, mixed_mode, fd_radius: what it was built from
            (read-only; ``mode`` is the HVP mode).

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
        mixed: MixedMode = "autograd",
        fd_radius: float = 1e-2,
    ):
        if mode not in HVP_MODES:
            raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES}")
        if mixed not in MIXED_MODES:
            raise ValueError(f"unknown mixed-product mode {mixed!r}; choose one of {MIXED_MODES}")
        if isinstance(fd_radius, bool) or not isinstance(fd_radius, (int, float)) or not 0 < fd_radius < math.inf:
            raise ValueError(f"fd_radius must be a finite number > 0, got {fd_radius!r}")
        self._sharded = is_sharded(params)
        if self._sharded:
            check_sharded_modes(mixed, reduce)
        self.mixed_mode: MixedMode = mixed
        self.fd_radius = float(fd_radius)
        self._grad_phi0: Tree | None = None
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
        if not self._sharded and (mode == "autograd" or (mode == "fd" and self.mixed_mode == "autograd")):
            with torch.enable_grad():
                self._th, self._ph = leaves(params), leaves(hparams)
                value = g(self._th, self._ph, batch)
                check_finite(value.detach(), "inner", "grad/Hessian of g")
                check_differentiable(value, "inner", "grad/Hessian of g")
                g_theta = grad_tree(value, self._th, create_graph=True)
                if self.mixed_mode == "fd-onesided":  # grad_phi g(theta) from the same graph
                    self._grad_phi0 = grad_tree(value, self._ph, retain_graph=True)
            self.value = value.detach()
            self.grad_theta = {k: v.detach() for k, v in g_theta.items()}
            # only the entries of grad_theta g that depend on (theta, phi) carry a graph
            self._graph = {k: v for k, v in g_theta.items() if v.requires_grad}
            return
        if mode == "fd" or self._sharded:  # first order (FSDP shards always): no graph kept
            # both (grad_phi costs a backward through the part phi reaches only): checks that g has a graph
            value, self.grad_theta, grad_phi = first_order_gradients(g, params, hparams, batch)
            self.value = value
            self._grad_phi0 = grad_phi if self.mixed_mode == "fd-onesided" else None
            return
        grad_g = grad_and_value(g, argnums=0)
        if mode == "rev-rev":
            self.grad_theta, self._vjp, self.value = vjp(
                lambda t, h: grad_g(t, h, batch), params, hparams, has_aux=True
            )
        else:
            self.grad_theta, self.value = grad_g(params, hparams, batch)
        check_finite(self.value, "inner", "grad/Hessian of g")
        if self.mixed_mode == "fd-onesided":
            self._grad_phi0 = first_order_gradients(g, params, hparams, batch, wrt="hparams")[2]

    def _gradients_at(self, point: Tree, wrt: Literal["params", "hparams"]) -> Tree:
        """``grad_theta g`` or ``grad_phi g`` (``wrt``) at ``theta = point`` (first order, no graph kept)."""
        if self._sharded:
            out = _sharded_first_order(self._g, self._params, point, self._hparams, self._batch)
        else:
            out = first_order_gradients(self._g, point, self._hparams, self._batch, wrt=wrt)
        return out[1] if wrt == "params" else out[2]

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
        if self.mode == "fd":
            return self._reduce(self._difference(p, lambda t: self._gradients_at(t, "params")))
        if self._sharded:
            raise ValueError(f"hvp={self.mode!r} cannot run on FSDP shards (it needs double backward): use hvp='fd'")
        if self.mode == "autograd":
            return self._reduce(self._backward(p, self._th))
        if self.mode == "rev-rev":
            return self._reduce(self._vjp(p)[0])
        g, h, b = self._g, self._hparams, self._batch
        return self._reduce(jvp(lambda t: grad(g)(t, h, b), (self._params,), (p,))[1])

    def mixed(self, v: Tree) -> Tree:
        """``J v = grad_phi < grad_theta g(theta, phi), v >`` (shape of ``hparams``; zeros where
        a hparam does not reach ``grad_theta g``), by the ``mixed_mode``."""
        g, h, b = self._g, self._hparams, self._batch
        if self.mixed_mode == "jvp":
            with _composite_layer_norm():
                return self._reduce(grad(lambda hp: jvp(lambda t: g(t, hp, b), (self._params,), (v,))[1])(h))
        if self.mixed_mode == "fd":
            return self._reduce(self._difference(v, lambda t: self._gradients_at(t, "hparams")))
        if self.mixed_mode == "fd-onesided":
            assert self._grad_phi0 is not None
            return self._reduce(self._difference(v, lambda t: self._gradients_at(t, "hparams"), self._grad_phi0))
        if self.mode == "autograd" or self.mode == "fd":
            return self._reduce(self._backward(v, self._ph))
        if self.mode == "rev-rev":
            return self._reduce(self._vjp(v)[1])
        g, t, b = self._g, self._params, self._batch
        return self._reduce(vjp(lambda h: grad(g)(t, h, b), self._hparams)[1](v)[0])

    def _difference(self, d: Tree, grad_at: Callable[[Tree], Tree], at_theta: Tree | None = None) -> Tree:
        """``(G(theta + e d) - G(theta - e d)) / (2 e)``, or ``(G(theta + e d) - at_theta) / e`` when
        ``at_theta = G(theta)`` is given, with ``e = fd_radius / ||d||`` (zeros for ``d = 0``)."""
        norm = float(tree_norm(d))
        if norm == 0.0:
            ref = at_theta if at_theta is not None else grad_at(self._params)
            return {k: torch.zeros_like(x) for k, x in ref.items()}
        e = self.fd_radius / norm
        fresh = self._sharded and not self.modified()
        plus = grad_at(tree_add(self._params, d, e))
        minus = grad_at(tree_add(self._params, d, -e)) if at_theta is None else None
        if fresh:  # the shards were written and restored (same values): still current
            self._versions = [{k: v._version for k, v in tree.items()} for tree in (self._params, self._hparams)]
        if minus is None:
            return {k: (plus[k] - at_theta[k]) / e for k in plus}  # type: ignore[index]
        return {k: (plus[k] - minus[k]) / (2 * e) for k in plus}

    def _backward(self, cotangent: Tree, inputs: dict[str, Tensor]) -> Tree:
        """``d/d inputs < grad_theta g, cotangent >`` through the retained first-order graph."""
        if not self._graph:  # grad_theta g is constant: every second derivative is zero
            return {k: torch.zeros_like(v) for k, v in inputs.items()}
        keys = list(self._graph)
        with torch.enable_grad():
            return grad_tree(
                [self._graph[k] for k in keys], inputs, grad_outputs=[cotangent[k] for k in keys], retain_graph=True
            )


def _layer_norm(
    input: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """``layer_norm`` by its composite formula (forward-mode derivatives that reverse mode can differentiate)."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dim=dims, keepdim=True)
    var = ((input - mean) ** 2).mean(dim=dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


@contextmanager
def _composite_layer_norm() -> Iterator[None]:
    """``torch.nn.functional.layer_norm`` (which ``nn.LayerNorm`` calls) replaced by :func:`_layer_norm` in the
    block (see the ``"jvp"`` mixed mode; not thread-safe)."""
    original = torch.nn.functional.layer_norm
    torch.nn.functional.layer_norm = _layer_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.layer_norm = original


def first_order_gradients(
    fn: Objective,
    params: Tree,
    hparams: Tree,
    batch: Any,
    level: str = "inner",
    stage: str = "first-order gradient of g (finite differences)",
    wrt: Literal["both", "params", "hparams"] = "both",
) -> tuple[Tensor, Tree, Tree]:
    """``(fn, grad_theta fn, grad_phi fn)`` by one forward and one first-order backward pass (no graph kept);
    for FSDP2 parameters by their own gradient path (:func:`_sharded_first_order`, always both).

    ``wrt="params"`` / ``"hparams"`` takes one of the two (the other is returned as ``{}``) and holds the
    other tree constant during the forward pass, so the operations only it reaches record no graph: with
    ``"hparams"`` and MELTR's ``g`` (``phi`` enters at the loss network only), the backbone's forward is an
    inference forward and the backward pass touches the loss network alone (the ``"fd"`` mixed product).
    """
    if is_sharded(params):
        return _sharded_first_order(fn, params, params, hparams, batch, level, stage)
    with torch.enable_grad():
        th = leaves(params) if wrt != "hparams" else {k: v.detach() for k, v in params.items()}
        ph = leaves(hparams) if wrt != "params" else {k: v.detach() for k, v in hparams.items()}
        value = fn(th, ph, batch)
        check_finite(value.detach(), level, stage)
        if wrt == "both":
            check_differentiable(value, level, stage)
        inputs = {**({} if wrt == "hparams" else {("p", k): v for k, v in th.items()}),
                  **({} if wrt == "params" else {("h", k): v for k, v in ph.items()})}  # fmt: skip
        if value.requires_grad:
            out = torch.autograd.grad(value, list(inputs.values()), allow_unused=True, materialize_grads=True)
        else:  # fn does not depend on the tree asked for (e.g. g without hparams): exact zeros
            out = tuple(torch.zeros_like(v) for v in inputs.values())
    grads = dict(zip(inputs, out, strict=True))
    g_theta = {k: grads[("p", k)] for k in th} if wrt != "hparams" else {}
    g_phi = {k: grads[("h", k)] for k in ph} if wrt != "params" else {}
    return value.detach(), g_theta, g_phi


def check_sharded_modes(mixed: str, reduce: Reduce | None) -> None:
    """Refuse what cannot run on FSDP2 shards: an exact mixed product (double backward) and, with more than
    one rank, a missing ``reduce`` (FSDP averages ``grad_theta`` over ranks; ``grad_phi`` must be too)."""
    if mixed not in FIRST_ORDER_MIXED:
        raise ValueError(
            f"mixed={mixed!r} cannot run on FSDP shards (it needs double backward, which FSDP does not support): "
            f"use mixed in {FIRST_ORDER_MIXED} (and hvp='fd' where HVPs are taken), e.g. bl.SAMA() or "
            "bl.AIDFPLite(mixed='fd')"
        )
    if reduce is None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "params are FSDP shards on several ranks: pass reduce=bilevel.distributed.all_reduce_mean (FSDP already "
            "averages the parameters' gradients over ranks; the hparams' gradients need the same mean)"
        )


def _sharded_first_order(
    fn: Objective,
    live: Tree,
    point: Tree,
    hparams: Tree,
    batch: Any,
    level: str = "inner",
    stage: str = "first-order gradient of g (finite differences)",
) -> tuple[Tensor, Tree, Tree]:
    """``(fn, grad_theta fn, grad_phi fn)`` at ``theta = point`` for FSDP2 parameters ``live`` (the module's own).

    ``point`` is copied into the shards (skipped when it is ``live``), ``fn(live, hparams, batch).backward()``
    runs FSDP's gradient path (all-gather, backward, reduce-scatter: ``grad_theta`` is the rank mean, a
    sharded DTensor like ``live``), and the shards' values and ``.grad`` are restored exactly (copies), also
    when ``fn`` raises. Every rank must make the same calls (FSDP's collectives).
    """
    keys = list(live)
    moved = point is not live
    saved_grad = {k: live[k].grad for k in keys}
    saved = {k: live[k].detach().clone() for k in keys} if moved else {}
    try:
        with torch.no_grad():
            for k in keys:
                live[k].grad = None
                if moved:
                    live[k].copy_(point[k])
        with torch.enable_grad():
            ph = leaves(hparams)
            value = fn(live, ph, batch)
            check_finite(value.detach(), level, stage)
            check_differentiable(value, level, stage)
            value.backward()
        g_theta = {k: torch.zeros_like(live[k]) if live[k].grad is None else live[k].grad for k in keys}
        g_phi = {k: torch.zeros_like(t) if t.grad is None else t.grad for k, t in ph.items()}
    finally:
        with torch.no_grad():
            for k in keys:
                if moved:
                    live[k].copy_(saved[k])
                live[k].grad = saved_grad[k]
    return value.detach(), g_theta, g_phi


def resampled_hvp(lin: Linearization, batches: Iterator[Any]) -> Callable[[Tree], Tree]:
    """A matvec ``p -> H_B p`` whose every call linearises ``g`` at ``lin``'s point on the next batch
    ``B = next(batches)`` (StocBiO's stochastic products), in ``lin``'s mode and with its ``reduce``.

    Each product costs one gradient of ``g`` with its graph plus one backward pass. The matvec carries
    ``stochastic = True`` (:func:`bilevel.linalg.neumann_series` then does not read a growing term as
    divergence).
    """

    drawn = 0

    def matvec(p: Tree) -> Tree:
        nonlocal drawn
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"the HVP batches ran out after {drawn} product(s); pass an endless stream") from None
        drawn += 1
        # only its HVP is used: "jvp" (not "autograd") so that an "fd" HVP builds no graph
        mixed = lin.mixed_mode if lin._sharded else "jvp"  # FSDP shards: first order throughout
        return Linearization(lin.problem, lin.params, lin.hparams, batch, lin.mode, lin.reduce, mixed).hvp(p)

    matvec.stochastic = True  # type: ignore[attr-defined]  (a term may grow on one batch: see neumann_series)
    return matvec
