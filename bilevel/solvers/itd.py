"""ITD: iterative differentiation, reverse mode through ``steps`` unrolled inner updates."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .._checks import check_choice, check_int, check_positive, check_unit_interval
from .._tree import Tree
from ..errors import ITDDivergenceError, ITDDivergenceWarning
from ..linalg import POLICIES, SolvePolicy
from ..problem import check_differentiable, check_finite
from ..products import Reduce, grad_tree, leaves
from .base import Solver

Optimizer = Literal["sgd", "momentum", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
STATE_KEYS: dict[str, tuple[str, ...]] = {"sgd": (), "momentum": ("buf",), "adam": ("m", "v")}
"""The optimizer buffers carried from step to step (``_step``'s ``state``)."""
_NORMS_KEY = "\0itd-adjoint-norms"  # rides along the final all-reduce of the hypergradient


@dataclass
class ITD(Solver):
    """Differentiate ``f(theta_T(phi), phi)`` through ``T = steps`` unrolled inner updates.

    ``theta_0 = params`` is a constant; with ``optimizer="sgd"``

        theta_{t+1} = theta_t - lr * grad_theta g(theta_t, phi; inner_batch)

    and ``dF/dphi`` is obtained by reverse mode through the whole trajectory (with
    :func:`torch.autograd.grad` with ``create_graph=True``: 2-3x less fixed cost per step than
    the same unroll under :func:`torch.func.grad` on small problems, and it admits collectives).
    Exact for the truncated problem; at ``theta_0 = theta*`` it equals
    :class:`~bilevel.AIDFP` with ``alpha=lr, iters=steps-1``. ``steps=1`` is Meta-Weight-Net's
    one-step look-ahead. **Memory grows linearly with ``steps``**: every step's graph is kept for
    the backward pass (measured in ``benchmarks/hypergrad_accuracy.py``), unless ``checkpoint=True``.

    Differentiable optimizers: ``"momentum"`` (heavy ball as ``torch.optim.SGD``:
    ``b_t = momentum b_{t-1} + g_t``, ``b_0 = g_0``; ``theta -= lr b_t``) and ``"adam"``
    (``theta -= lr m_hat / (sqrt(v_hat + eps_root) + eps)``; ``eps_root > 0`` keeps the derivative
    of the square root finite where a gradient entry is zero, as optax's ``eps_root``).

    **Truncated back-propagation** (``truncate=k``; Shaban et al. 2019, BOAT's RGT): the first
    ``T - k`` steps run without a graph (``theta_{T-k}`` and the optimizer buffers are constants), only
    the last ``k`` are differentiated: ``dF/dphi ~ grad_phi f + sum_{t=T-k}^{T-1} (d_phi step_t)^T a_{t+1}``
    (``d_phi step_t``: the update's derivative in ``phi`` at fixed ``theta_t``; ``a_t = dF/dtheta_t``).
    Memory and backward time are those of ``k`` steps. At ``theta_0 = theta*`` (SGD) it equals AID-FP
    with ``iters=k-1``. ``truncate=None`` (default) or ``truncate=steps`` is the full unroll, the same
    operations in the same order.

    **Checkpointing** (``checkpoint=True``): the differentiated steps run forward without a graph,
    keeping ``theta_t`` and the optimizer buffers only at the start of every segment of
    ``s = ceil(sqrt(k))`` steps (in preallocated tensors). The backward pass takes the segments from the
    last: it re-runs a segment's steps without a graph from its stored start, then re-evaluates each of
    its steps with ``create_graph=True``, takes the step's vector-Jacobian product with the adjoints of its
    outputs and frees it before the step before. Peak memory is one step's graph plus ``~2 sqrt(k)``
    parameter-sized copies instead of ``k`` graphs; the price is about two more gradient evaluations per
    step. It is a hand-written :class:`torch.autograd.Function` rather than
    :func:`torch.utils.checkpoint.checkpoint`, measured on ``ridge_synthetic(d=100, n=15000)`` with the
    unrolled step as the checkpointed function: the reentrant variant runs it under ``no_grad``, so the
    step's own ``grad_theta g`` (``create_graph`` inside) fails; the non-reentrant one works but still
    held 7.6 MiB of extra RSS at ``T=200`` (35 MiB plain; this class: flat, see
    ``python -m benchmarks.hypergrad_accuracy --only itd-memory``). With ``reduce=``, every step's
    rank-averaged gradient is stored (``k`` parameter-sized copies) and reused by the recomputation, so
    the collectives are exactly those of the plain unroll (none is recomputed). The inner objective must
    be deterministic (no dropout or sampling in ``g``): the recomputed value of ``g`` is compared with the
    forward one and a mismatch raises ``RuntimeError``. Equal to the plain unroll up to the order of
    floating-point sums (1e-12 relative in float64 in the tests).

    **Divergence** (``on_divergence``, default ``"raise"`` as :class:`~bilevel.AIDFP`'s): SGD is stable
    only for ``lr < 2/L`` (momentum ``lr < 2(1 + momentum)/L``), ``L`` the largest eigenvalue of the inner
    Hessian. Beyond it the derivative of the unrolled map grows geometrically; the result is then a
    huge, meaningless number (``lr = 3/L``, ``steps=50`` on ``ridge_synthetic``: 1e10 at ``theta*``, 1e29
    from ``theta_0 = 0``). The test is on the *adjoints* ``a_t = dF/dtheta_t`` that the backward pass
    computes (recorded in ``info.residuals`` in backward order ``||a_T||, ||a_{T-1}||, ...``; at
    ``theta_0 = theta*`` with SGD they are AID-FP's Neumann term norms ``||p_j||``): the unroll diverges
    when some ``||a_t|| > divergence_factor * ||a_T||`` (``a_T = grad_theta f(theta_T)``), AID-FP's test
    with the same factor. Not the forward gradient norm: at ``theta_0 = theta*`` the iterates do not move
    while the derivative already explodes, and the forward gradient is rounding noise whose ratio to the
    first step reached 14x on converging runs (``ridge_synthetic(d=1)``, momentum). Converging runs stay
    below 5x (measured on the reference problems from ``theta*`` and from 0, up to ``lr = 1.9/L`` for
    SGD and ``3.7/L`` for momentum). Adam is not tested for growth: its step is bounded
    (``|Delta theta| <= lr (1-beta1)/sqrt(1-beta2)`` per coordinate), so its iterates cannot run away,
    and its Jacobian is large near stationary points by design (``1/sqrt(v)``). ``"raise"``
    (default): :class:`~bilevel.ITDDivergenceError` (a ``FloatingPointError``), since a 1e10
    hypergradient silently returned would wreck training; ``"warn"`` (:class:`~bilevel.ITDDivergenceWarning`) or
    ``"ignore"``: return the computed value, the exact derivative of the ``T``-step unroll, with
    ``info.diverged = True``. A non-finite inner value after the first step or a non-finite adjoint
    always raises ``ITDDivergenceError`` naming it non-finite (there is no finite value to return).
    With ``reduce=`` the adjoint norms are the rank mean of the local ones, carried by the final
    all-reduce, so that every rank takes the same decision.

    Data-parallel (``reduce=`` an all-reduce mean over ranks, e.g.
    :func:`bilevel.distributed.all_reduce_mean`): every unrolled step uses the rank-averaged
    gradient, ``theta_{t+1} = theta_t - lr * mean_r grad_theta g_r(theta_t, phi)``, inside the
    differentiated trajectory; the backward pass through each average is again a rank average (the
    rank mean is self-adjoint), and the final result is the rank mean of the local gradients. With
    equal shards this is the whole-batch ITD hypergradient on every rank; ``reduce`` must be the
    rank *mean* (linear and self-adjoint). Works in every mode: ``steps`` all-reduces forward, one per
    differentiated step backward, and one at the end.

    Args:
        steps: ``T``, the unrolled inner steps (0: only the direct gradient ``df/dphi``).
        lr: the inner step size.
        optimizer: ``"sgd"``, ``"momentum"`` or ``"adam"``; momentum, betas, eps, eps_root: their options.
        truncate: ``k``, back-propagate through the last ``k`` steps only (``1 <= k <= steps``); None: all.
        checkpoint: recompute each differentiated step in the backward pass instead of keeping its graph.
        on_divergence: ``"raise"``, ``"warn"`` or ``"ignore"`` (see above).
        divergence_factor: adjoint growth that counts as divergence; None turns the growth test off
            (non-finite values still raise).

    Examples:
        Started at the inner minimiser, ITD with ``steps=T, lr=alpha`` equals AID-FP with
        ``iters=T-1, alpha=alpha``, in every mode (``truncate=k``: ``iters=k-1``):

        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> hg = bl.ITD(steps=30, lr=1 / ex.L).hypergrad(*ex.args)
        >>> fp = bl.AIDFP(iters=29, alpha=1 / ex.L).hypergrad(*ex.args)
        >>> torch.allclose(hg["lam"], fp["lam"], rtol=1e-8, atol=1e-12)
        True
        >>> ck = bl.ITD(steps=30, lr=1 / ex.L, checkpoint=True).hypergrad(*ex.args)  # memory flat in steps
        >>> torch.allclose(ck["lam"], hg["lam"], rtol=1e-12, atol=0)
        True
        >>> tr = bl.ITD(steps=30, lr=1 / ex.L, truncate=5).hypergrad(*ex.args)  # the last 5 steps only
        >>> fp5 = bl.AIDFP(iters=4, alpha=1 / ex.L).hypergrad(*ex.args)
        >>> torch.allclose(tr["lam"], fp5["lam"], rtol=1e-8, atol=1e-12)
        True
        >>> adam = bl.ITD(steps=5, lr=0.1, optimizer="adam")  # differentiable Adam steps
        >>> adam.hypergrad(*ex.args)["lam"].shape
        torch.Size([5])
        >>> bl.ITD(steps=50, lr=3 / ex.L).hypergrad(*ex.args)  # lr > 2/L: the unroll diverges
        Traceback (most recent call last):
        ...
        bilevel.errors.ITDDivergenceError: ITD diverges: ...
    """

    steps: int = 10
    lr: float = 0.01
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16
    truncate: int | None = None
    checkpoint: bool = False
    on_divergence: SolvePolicy = "raise"
    divergence_factor: float | None = 10.0

    name = "itd"

    def __post_init__(self) -> None:
        _check_options(self)

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, call):
        g = problem.objective("inner", "unrolled inner steps of ITD")
        f = problem.objective("outer", "f after the unrolled steps of ITD")
        reduce, info = call.reduce, call.info
        k = self.steps if self.truncate is None else self.truncate
        start = self.steps - k  # the steps before `start` run without a graph
        with call.stage("unroll_and_backward"), torch.enable_grad():
            phi = leaves(hparams)
            state: dict[str, Tree] = {}
            values: list[Tensor] = []  # g at theta_0 (one entry: per-step lists cost memory at large steps)
            theta = params
            for t in range(start):
                theta = _free_step(self, g, theta, hparams, inner_batch, reduce, state, t, values)
            theta = leaves(theta)
            sq = None  # squared adjoint norms of theta_{start+1..T}, filled in by the backward pass
            if k and self.divergence_factor is not None and self.optimizer != "adam":  # growth tested
                ref = next(iter(theta.values()))
                sq = torch.zeros(k, dtype=ref.dtype, device=ref.device)
            iterates: list[Tree] = []  # theta_{start+1..T} of the plain unroll
            if self.checkpoint and k:
                theta = _unroll_checkpointed(self, g, theta, phi, inner_batch, reduce, state, start, values, sq)
            else:
                theta = _unroll_plain(self, g, theta, phi, inner_batch, reduce, state, start, values, iterates)
            f_val = f(theta, phi, outer_batch)
            check_finite(f_val.detach(), "outer", "f after the unrolled steps of ITD")
            if sq is not None:  # hooks only now: the next step's grad_theta g would pass through them too
                for i, it in enumerate(iterates):
                    _watch_adjoint(it, sq, i)
            hg = grad_tree(f_val, phi)
        info.iters = self.steps
        info.inner_value = float(values[0]) if values else None
        info.outer_value = float(f_val.detach())
        if sq is None:
            return hg if reduce is None else reduce(hg)
        norms = sq.sqrt()
        if reduce is not None:  # one all-reduce for both, so that every rank takes the same decision
            if _NORMS_KEY in hg:
                raise ValueError(f"hparams may not have the key {_NORMS_KEY!r} (reserved by ITD)")
            hg = dict(reduce({**hg, _NORMS_KEY: norms}))
            norms = hg.pop(_NORMS_KEY)
        _check_adjoints(self, norms.tolist(), start, info)
        return hg


def _check_options(opt: ITD) -> None:
    """Refuse bad options, naming the option and the value."""
    check_int("steps", opt.steps, 0)
    check_positive("lr", opt.lr)
    check_choice("optimizer", opt.optimizer, OPTIMIZERS)
    check_unit_interval("momentum", opt.momentum)
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {opt.betas!r}")
    check_positive("eps", opt.eps)
    if not opt.eps_root >= 0.0:
        raise ValueError(f"eps_root must be >= 0, got {opt.eps_root!r}")
    if opt.truncate is not None:
        if isinstance(opt.truncate, bool) or not isinstance(opt.truncate, int):
            raise TypeError(f"truncate must be an int or None, got {opt.truncate!r}")
        if not 1 <= opt.truncate <= opt.steps:
            raise ValueError(f"truncate must be in [1, steps={opt.steps}], got {opt.truncate!r}")
    if not isinstance(opt.checkpoint, bool):
        raise TypeError(f"checkpoint must be a bool, got {opt.checkpoint!r}")
    check_choice("on_divergence", opt.on_divergence, POLICIES)
    if opt.divergence_factor is not None:
        check_positive("divergence_factor", opt.divergence_factor)


def _unroll_plain(
    opt: ITD, g: Callable, theta: Tree, phi: Tree, batch: Any, reduce: Any, state: dict[str, Tree], start: int,
    values: list[Tensor], iterates: list[Tree],
) -> Tree:  # fmt: skip
    """The differentiated steps ``start .. T-1`` with their graphs kept (``create_graph``); appends each iterate
    to ``iterates`` and ``g(theta_0)`` to ``values`` when it is empty; returns ``theta_T``."""
    for t in range(start, opt.steps):
        g_val = g(theta, phi, batch)
        _check_inner(g_val, t)
        check_differentiable(g_val, "inner", f"unrolled step {t} of ITD")
        if not values:
            values.append(g_val.detach())
        g_theta = grad_tree(g_val, theta, create_graph=True)
        if reduce is not None:
            g_theta = dict(zip(g_theta, _ReduceMean.apply(reduce, list(g_theta), *g_theta.values()), strict=True))
        theta = _step(opt, theta, g_theta, state, t)
        iterates.append(theta)
    return theta


def _check_adjoints(opt: ITD, norms: list[float], start: int, info: Any) -> None:
    """Apply ``on_divergence`` to the adjoint norms ``||a_t||``, ``t = start+1 .. T`` (in that order)."""
    info.residuals = norms[::-1]
    ref, factor = norms[-1], opt.divergence_factor
    for i in range(len(norms) - 1, -1, -1):  # backward order: t = T, T-1, ...
        t, a = start + 1 + i, norms[i]
        if not math.isfinite(a):
            info.diverged = True
            raise ITDDivergenceError(
                f"ITD diverges: the adjoint dF/dtheta_{t} (unrolled step {t - 1}) is non-finite ({a}); lower lr "
                f"(={opt.lr:g})"
            )
        if a > factor * ref:  # type: ignore[operator]
            info.diverged = True
            msg = (
                f"ITD diverges: the adjoint dF/dtheta_{t} has norm {a:.3e} > {factor:g} x ||grad_theta f("
                f"theta_T)|| = {ref:.3e}, {opt.steps - t} steps before the end: the unrolled {opt.optimizer} "
                f"steps are unstable, lr={opt.lr:g} is too large (SGD needs lr < 2/L, momentum lr < "
                "2 (1 + momentum)/L, L the largest eigenvalue of the inner Hessian): lower lr"
            )
            if opt.on_divergence == "raise":
                raise ITDDivergenceError(msg)
            if opt.on_divergence == "warn":
                warnings.warn(msg, ITDDivergenceWarning, stacklevel=6)
            return


def _check_inner(g_val: Tensor, t: int) -> None:
    """A non-finite ``g``: bad ``params`` at step 0 (``FloatingPointError``), a divergent unroll after it."""
    if t == 0:
        check_finite(g_val.detach(), "inner", f"unrolled step {t} of ITD")
    elif not bool(torch.isfinite(g_val.detach())):
        raise ITDDivergenceError(
            f"ITD diverges: the inner objective g is non-finite ({float(g_val.detach())}) at unrolled step {t}: the "
            "iterates ran away; lower lr (below 2/L, L the largest eigenvalue of the inner Hessian)"
        )


def _watch_adjoint(theta: Tree, sq: Tensor, i: int) -> None:
    """Add ``||d f / d theta||^2`` into ``sq[i]`` when the backward pass reaches ``theta`` (values untouched)."""

    def hook(grad: Tensor) -> None:
        sq[i] += grad.detach().pow(2).sum()

    for v in theta.values():
        v.register_hook(hook)


def _free_step(
    opt: ITD, g: Callable, theta: Tree, phi: Tree, batch: Any, reduce: Reduce | None, state: dict[str, Tree], t: int,
    values: list[Tensor],
) -> Tree:  # fmt: skip
    """One inner update without a graph (truncated back-propagation's first steps); returns detached ``theta``."""
    th = leaves(theta)
    g_val = g(th, phi, batch)
    _check_inner(g_val, t)
    check_differentiable(g_val, "inner", f"unrolled step {t} of ITD")
    if not values:
        values.append(g_val.detach())
    g_theta = grad_tree(g_val, th)
    if reduce is not None:
        g_theta = reduce(g_theta)
    with torch.no_grad():
        return _step(opt, {k: v.detach() for k, v in th.items()}, g_theta, state, t)


def _step(opt: ITD, theta: Tree, g: Tree, state: dict[str, Tree], t: int) -> Tree:
    """One differentiable update ``theta_{t+1}`` of ``opt.optimizer`` (``state`` carries its buffers)."""
    lr = opt.lr
    if opt.optimizer == "sgd":
        return {k: theta[k] - lr * g[k] for k in theta}
    if opt.optimizer == "momentum":
        buf = g if t == 0 else {k: opt.momentum * state["buf"][k] + g[k] for k in g}
        state["buf"] = buf
        return {k: theta[k] - lr * buf[k] for k in theta}
    b1, b2 = opt.betas
    m = {k: (b1 * state["m"][k] if t else 0.0) + (1 - b1) * g[k] for k in g}
    v = {k: (b2 * state["v"][k] if t else 0.0) + (1 - b2) * g[k] * g[k] for k in g}
    state["m"], state["v"] = m, v
    c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    return {k: theta[k] - lr * (m[k] / c1) / (torch.sqrt(v[k] / c2 + opt.eps_root) + opt.eps) for k in theta}


class _ReduceMean(torch.autograd.Function):
    """``y = reduce(x)`` (a rank mean) whose backward is ``reduce`` of the incoming gradient."""

    @staticmethod
    def forward(ctx, reduce, keys, *tensors):  # type: ignore[override]
        ctx.reduce, ctx.keys = reduce, keys
        out = reduce(dict(zip(keys, (t.detach() for t in tensors), strict=True)))
        return tuple(out[k].clone() for k in keys)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        red = ctx.reduce(dict(zip(ctx.keys, grads, strict=True)))  # grads are materialised (never None)
        return (None, None, *(red[k] for k in ctx.keys))


class _Reduced(torch.autograd.Function):
    """``y = `` the stored rank mean of ``x`` (computed in the forward pass), backward ``reduce`` as
    :class:`_ReduceMean`: the checkpointed recomputation's stand-in that does not all-reduce again."""

    @staticmethod
    def forward(ctx, reduce, keys, stored, *tensors):  # type: ignore[override]
        ctx.reduce, ctx.keys = reduce, keys
        return tuple(stored[k].clone() for k in keys)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        red = ctx.reduce(dict(zip(ctx.keys, grads, strict=True)))
        return (None, None, None, *(red[k] for k in ctx.keys))


def _unroll_checkpointed(
    opt: ITD, g: Callable, theta: Tree, phi: Tree, batch: Any, reduce: Reduce | None, state: dict[str, Tree],
    start: int, values: list[Tensor], sq: Tensor | None,
) -> Tree:  # fmt: skip
    """Steps ``start .. T-1`` as one :class:`_Unroll` node: ``theta_T`` as a function of ``phi``."""
    keys = list(theta)
    names = STATE_KEYS[opt.optimizer] if start else ()  # the buffers entering the first step (none at t = 0)
    ctx_args = _UnrollArgs(opt, g, batch, reduce, keys, list(phi), names, start, values, sq)
    state_in = [state[n][key].detach() for n in names for key in keys]
    out = _Unroll.apply(ctx_args, *(v.detach() for v in theta.values()), *state_in, *phi.values())
    return dict(zip(keys, out, strict=True))


@dataclass
class _UnrollArgs:
    """The non-tensor arguments of :class:`_Unroll`."""

    opt: ITD
    g: Callable
    batch: Any
    reduce: Reduce | None
    keys: list[str]
    phi_keys: list[str]
    names: tuple[str, ...]
    start: int
    values: list[Tensor]
    sq: Tensor | None


class _Unroll(torch.autograd.Function):
    """``theta_T`` from ``(theta_start, buffers, phi)`` by ``k = T - start`` steps, checkpointed (see :class:`ITD`).

    Forward: the steps without a graph, storing ``theta_t`` and the buffers entering every ``s``-th step,
    ``s = ceil(sqrt(k))`` (and with ``reduce`` every step's rank-averaged gradient), in preallocated
    tensors. Backward, segment by segment from the last: re-run the segment's steps without a graph from
    its stored start (the iterates of one segment, at most ``s``), then for each of its steps from the
    last re-evaluate the step with ``create_graph=True`` and take the vector-Jacobian product with the
    adjoints of its outputs; only ``phi`` receives a gradient.
    """

    @staticmethod
    def forward(ctx, a: _UnrollArgs, *tensors):  # type: ignore[override]
        opt, keys, nk = a.opt, a.keys, len(a.keys)
        theta = dict(zip(keys, tensors[:nk], strict=True))
        n_state = len(a.names) * nk
        state = _unflatten(a.names, keys, tensors[nk : nk + n_state])
        phi = {k: v.detach() for k, v in zip(a.phi_keys, tensors[nk + n_state :], strict=True)}
        k_steps = opt.steps - a.start
        seg = math.isqrt(k_steps - 1) + 1  # ceil(sqrt(k)): k/s stored starts + s iterates of one segment
        n_seg = -(-k_steps // seg)
        every = STATE_KEYS[opt.optimizer]
        store_theta = {key: v.new_empty((n_seg, *v.shape)) for key, v in theta.items()}
        store_state = {n: {key: v.new_empty((n_seg, *v.shape)) for key, v in theta.items()} for n in every}
        store_red = {key: v.new_empty((k_steps, *v.shape)) for key, v in theta.items()} if a.reduce else None
        g_vals = torch.empty(k_steps, dtype=tensors[0].dtype, device=tensors[0].device)
        for i, t in enumerate(range(a.start, opt.steps)):
            if i % seg == 0:
                for key in keys:
                    store_theta[key][i // seg] = theta[key]
                    for n in state:
                        store_state[n][key][i // seg] = state[n][key]
            g_val, g_theta = _forward_gradient(a.g, theta, phi, a.batch, t)
            if not a.values:
                a.values.append(g_val)
            g_vals[i] = g_val
            if a.reduce is not None:
                g_theta = a.reduce(g_theta)
                for key in keys:
                    store_red[key][i] = g_theta[key]  # type: ignore[index]
            theta = _step(opt, theta, g_theta, state, t)
        ctx.a, ctx.g_vals, ctx.seg = a, g_vals, seg
        ctx.store = (store_theta, store_state, store_red)
        ctx.save_for_backward(*tensors[nk + n_state :])
        return tuple(theta[key] for key in keys)

    @staticmethod
    def backward(ctx, *a_out):  # type: ignore[override]
        a, seg, (store_theta, store_state, store_red) = ctx.a, ctx.seg, ctx.store
        opt, keys = a.opt, a.keys
        phi_saved = ctx.saved_tensors
        phi_c = {key: p.detach() for key, p in zip(a.phi_keys, phi_saved, strict=True)}
        adj = dict(zip(keys, a_out, strict=True))
        adj_state: dict[str, Tree] | None = None
        phi_grad = [torch.zeros_like(p) for p in phi_saved]
        k_steps = opt.steps - a.start
        for first in range(seg * ((k_steps - 1) // seg), -1, -seg):
            # the segment's iterates theta_i and entering buffers, i = first .. last, without a graph
            j = first // seg
            theta = {key: store_theta[key][j] for key in keys}
            state = {n: {key: store_state[n][key][j] for key in keys} for n in (STATE_KEYS[opt.optimizer] if
                     a.start + first else ())}  # fmt: skip
            seg_in = [(theta, state)]
            for i in range(first, min(first + seg, k_steps) - 1):
                t = a.start + i
                if a.reduce is not None:
                    g_theta = {key: store_red[key][i] for key in keys}
                else:
                    g_theta = _forward_gradient(a.g, theta, phi_c, a.batch, t)[1]
                state = dict(state)
                theta = _step(opt, theta, g_theta, state, t)
                seg_in.append((theta, state))
            for i in range(first + len(seg_in) - 1, first - 1, -1):
                t = a.start + i
                if a.sq is not None:
                    a.sq[i] = sum(v.pow(2).sum() for v in adj.values())
                theta_i, state_i = seg_in.pop()
                with torch.enable_grad():
                    th = {key: v.detach().requires_grad_(True) for key, v in theta_i.items()}
                    st = {n: {key: v.detach().requires_grad_(True) for key, v in b.items()} for n, b in state_i.items()}
                    phi = {key: p.detach().requires_grad_(True) for key, p in phi_c.items()}
                    g_val = a.g(th, phi, a.batch)
                    _check_recomputed(g_val, ctx.g_vals[i], t)
                    g_theta = grad_tree(g_val, th, create_graph=True)
                    if a.reduce is not None:
                        stored = {key: store_red[key][i] for key in keys}
                        g_theta = dict(
                            zip(keys, _Reduced.apply(a.reduce, keys, stored, *g_theta.values()), strict=True)
                        )
                    new_state = dict(st)
                    new = _step(opt, th, g_theta, new_state, t)
                    outs = [new[key] for key in keys]
                    grads_out = [adj[key] for key in keys]
                    if adj_state is not None:
                        for n in adj_state:
                            outs += [new_state[n][key] for key in keys]
                            grads_out += [adj_state[n][key] for key in keys]
                    need_state = i > 0 and bool(st)  # the buffers' adjoints feed step t-1 (not the constants at start)
                    ins = [*(th.values() if i > 0 else ()), *(v for n in st for v in st[n].values() if need_state)]
                    ins += list(phi.values())
                    got = torch.autograd.grad(outs, ins, grads_out, allow_unused=True, materialize_grads=True)
                n_th = len(keys) if i > 0 else 0
                if i > 0:
                    adj = dict(zip(keys, got[:n_th], strict=True))
                    adj_state = _unflatten(tuple(st), keys, got[n_th : len(got) - len(phi)]) if need_state else None
                for jj, gp in enumerate(got[len(got) - len(phi) :]):
                    phi_grad[jj] += gp
                del th, st, phi, g_val, g_theta, new_state, new, outs, got
        return (None, *([None] * (len(keys) * (1 + len(a.names)))), *phi_grad)


def _forward_gradient(g: Callable, theta: Tree, phi: Tree, batch: Any, t: int) -> tuple[Tensor, Tree]:
    """``(g, grad_theta g)`` at ``theta`` without a graph beyond this call (checks as the plain unroll)."""
    with torch.enable_grad():
        th = leaves(theta)
        g_val = g(th, phi, batch)
        _check_inner(g_val, t)
        check_differentiable(g_val, "inner", f"unrolled step {t} of ITD")
        return g_val.detach(), grad_tree(g_val, th)


def _unflatten(names: tuple[str, ...], keys: list[str], flat: Any) -> dict[str, Tree]:
    flat = list(flat)
    return {n: dict(zip(keys, flat[j * len(keys) : (j + 1) * len(keys)], strict=True)) for j, n in enumerate(names)}


def _check_recomputed(g_val: Tensor, forward: Tensor, t: int) -> None:
    """The backward pass's re-evaluation of ``g`` must reproduce the forward one (``checkpoint=True``)."""
    now, before = float(g_val.detach()), float(forward)
    if not abs(now - before) <= 1e-6 * max(abs(now), abs(before)):
        raise RuntimeError(
            f"ITD(checkpoint=True) re-evaluates the inner objective g in the backward pass and got {now!r} at "
            f"unrolled step {t} instead of {before!r}: g is not deterministic (dropout? sampling?); use "
            "checkpoint=False"
        )
