"""Hypergradients computed by peer libraries (higher, torchopt, betty-ml), for benchmarks and oracles.

Each adapter takes the same objects as the :mod:`bilevel` solvers -- a :class:`bilevel.BilevelProblem`
whose ``g, f`` are ``(params, hparams, batch) -> 0-dim tensor`` over ``dict[str, Tensor]`` -- and
returns ``dF/dhparams`` (a detached dict shaped like ``hparams``) computed with the peer's own code:

    "itd"       unroll ``iters`` SGD steps ``theta_{t+1} = theta_t - lr grad_theta g`` from
                ``theta_0 = params`` (a constant) and backpropagate ``f(theta_T, phi)`` to ``phi``.
                higher: ``higher.innerloop_ctx`` on an ``nn.Module`` holding the params dict;
                torchopt: its functional ``torchopt.sgd`` with ``inplace=False`` updates.
                Equal to ``bl.get_solver("itd", steps=iters, lr=lr)``.
    "cg"        implicit differentiation at ``params`` (taken as ``theta*``), ``v = CG(H, grad_theta f)``,
                ``grad F = grad_phi f - J v``. torchopt: ``torchopt.diff.implicit.custom_root`` with
                ``torchopt.linear_solve.solve_cg(maxiter=iters, rtol=tol)`` (plain CG; torchopt's default
                normal-equation CG squares the condition number). betty: ``betty.hypergradient.cg`` with
                ``cg_iterations=iters, cg_alpha=1`` -- betty 0.2.1 builds the new search direction
                from the *old* residual (``p_new = r + beta p``), so it is not CG and does not converge
                to ``H^{-1} grad_theta f``; it also has no stopping test. Reported as is, not fixed.
                Compare with ``bl.get_solver("aid-cg", iters=iters, tol=tol)``.
    "neumann"   ``v = alpha sum_{j=0}^{iters} (I - alpha H)^j grad_theta f`` (``iters`` HVPs, ``iters + 1``
                terms). torchopt: ``solve_inv(ns=True, maxiter=iters, alpha=alpha)`` (alpha is always
                passed: torchopt's default 1.0 diverges unless ``L < 2``); betty: ``betty.hypergradient.neumann``
                with ``neumann_iterations=iters, neumann_alpha=alpha``.
                Equal to ``bl.get_solver("aid-fp", iters=iters, alpha=alpha)``.
    "identity"  ``H^{-1} ~ I``: ``grad F ~ grad_phi f - J grad_theta f``. torchopt: ``solve_inv(ns=True,
                maxiter=0, alpha=1)`` inside ``custom_root``; betty: ``betty.hypergradient.darts`` (a central
                finite difference of ``grad_phi g`` along ``grad_theta f`` with radius ``darts_alpha = alpha``;
                exact when ``grad_phi g`` is quadratic in ``theta``, as in ``bilevel.testing``).
                Equal to ``bl.get_solver("aid-fp-lite", scale=1.0)``.

Betty is built around ``Problem``/``Engine`` classes that own data loaders and optimizers. Rather than
train through an Engine, the betty adapter calls betty's own hypergradient dispatcher
``betty.hypergradient.get_grads(loss, [upper, lower, upper], ...)`` with two minimal stand-ins for its
``Problem`` objects (exposing exactly the attributes those functions read: ``config``, ``paths``,
``cur_batch``, ``training_step_exec``, ``parameters``, ``trainable_parameters``,
``meta_trainable_parameters``, ``_strategy``) and adds the direct gradient ``grad_phi f`` as
``Problem.backward`` does. betty has no ITD here (its unrolling lives in the Engine loop).

Install the peers with ``scripts/install_peers.sh``. Unknown peers or methods raise ``ValueError``;
a peer that does not import raises ``ImportError``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl

__all__ = ["PEERS", "PEER_METHODS", "PeerSolver", "available", "parse_peer_solver", "peer_hypergrad", "require"]

Tree = dict[str, Tensor]

#: peer name -> (import name, distribution name on PyPI)
PEERS: dict[str, tuple[str, str]] = {
    "higher": ("higher", "higher"),
    "torchopt": ("torchopt", "torchopt"),
    "betty": ("betty", "betty-ml"),
}

#: peer -> hypergradient methods its adapter implements.
PEER_METHODS: dict[str, tuple[str, ...]] = {
    "higher": ("itd",),
    "torchopt": ("itd", "cg", "neumann", "identity"),
    "betty": ("cg", "neumann", "identity"),
}

_IMPORTED: dict[str, Any] = {}


def require(peer: str) -> Any:
    """Import a peer's top-level module (cached); ``ImportError`` with an install hint if it fails.

    Any exception raised while importing (a broken install can raise more than ``ImportError``)
    is reported as ``ImportError``; an unknown ``peer`` is a ``ValueError``.
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {sorted(PEERS)}")
    if peer not in _IMPORTED:
        module, dist = PEERS[peer]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _IMPORTED[peer] = importlib.import_module(module)
        except Exception as exc:  # a broken install can fail with more than ImportError
            raise ImportError(
                f"peer {peer!r} (pip package {dist!r}) does not import: {type(exc).__name__}: {exc}; "
                "install it with scripts/install_peers.sh"
            ) from exc
    return _IMPORTED[peer]


def available() -> dict[str, str | None]:
    """``{"higher": version or None, "torchopt": ..., "betty": ...}``: None where the peer does not import."""
    out: dict[str, str | None] = {}
    for peer, (_, dist) in PEERS.items():
        try:
            require(peer)
        except ImportError:
            out[peer] = None
            continue
        try:
            out[peer] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[peer] = getattr(_IMPORTED[peer], "__version__", "unknown")
    return out


def _check_args(peer: str, method: str, params: Tree, hparams: Tree, iters: int, lr: float, alpha: float) -> None:
    if peer not in PEER_METHODS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {sorted(PEER_METHODS)}")
    if method not in PEER_METHODS[peer]:
        raise ValueError(f"peer {peer!r} has no method {method!r}; it supports {PEER_METHODS[peer]}")
    bl.problem.check_trees(params, hparams)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    for name, value in (("lr", lr), ("alpha", alpha)):
        if not value > 0.0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def _leaves(tree: Tree, requires_grad: bool) -> list[Tensor]:
    """Fresh leaf copies of the tensors of ``tree`` (in key order), cut from any caller graph."""
    return [t.detach().clone().requires_grad_(requires_grad) for t in tree.values()]


def _as_tree(keys: list[str], tensors: Any) -> Tree:
    return dict(zip(keys, tensors, strict=True))


def _grads_or_zeros(grads: Any, like: list[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


def _finish(keys: list[str], grads: list[Tensor], peer: str, method: str) -> Tree:
    out = {k: g.detach() for k, g in zip(keys, grads, strict=True)}
    if not all(bool(torch.isfinite(g).all()) for g in out.values()):
        warnings.warn(f"{peer} {method!r} hypergradient is not finite", RuntimeWarning, stacklevel=3)
    return out


# ----------------------------------------------------------------------------------------------- higher


class _DictModule(nn.Module):
    """An ``nn.Module`` whose parameters are the tensors of a params dict; ``forward()`` returns the dict."""

    def __init__(self, params: Tree) -> None:
        super().__init__()
        self.keys = list(params)
        for i, t in enumerate(params.values()):
            self.register_parameter(f"p{i}", nn.Parameter(t.detach().clone()))

    def forward(self) -> Tree:
        return {k: getattr(self, f"p{i}") for i, k in enumerate(self.keys)}


def _higher_itd(problem, params, hparams, inner_batch, outer_batch, iters, lr) -> Tree:
    higher = require("higher")
    hkeys = list(hparams)
    phi = _leaves(hparams, True)
    hp = _as_tree(hkeys, phi)
    module = _DictModule(params)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    with higher.innerloop_ctx(module, opt, copy_initial_weights=True, track_higher_grads=True) as (fmodel, diffopt):
        for _ in range(iters):
            diffopt.step(problem.inner(fmodel(), hp, inner_batch))
        loss = problem.outer(fmodel(), hp, outer_batch)
        grads = torch.autograd.grad(loss, phi, allow_unused=True)
    return _finish(hkeys, _grads_or_zeros(grads, phi), "higher", "itd")


# --------------------------------------------------------------------------------------------- torchopt


def _torchopt_itd(problem, params, hparams, inner_batch, outer_batch, iters, lr) -> Tree:
    torchopt = require("torchopt")
    hkeys = list(hparams)
    phi = _leaves(hparams, True)
    hp = _as_tree(hkeys, phi)
    theta: Tree = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
    optimizer = torchopt.sgd(lr)
    state = optimizer.init(theta)
    for _ in range(iters):
        loss = problem.inner(theta, hp, inner_batch)
        g = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        updates, state = optimizer.update(_as_tree(list(theta), g), state, inplace=False)
        theta = torchopt.apply_updates(theta, updates, inplace=False)
    loss = problem.outer(theta, hp, outer_batch)
    grads = torch.autograd.grad(loss, phi, allow_unused=True)
    return _finish(hkeys, _grads_or_zeros(grads, phi), "torchopt", "itd")


def _torchopt_implicit(
    problem, params, hparams, inner_batch, outer_batch, solve: Callable[..., Any], method: str
) -> Tree:
    """``custom_root`` with optimality condition ``grad_theta g(theta, phi) = 0`` at ``theta = params``."""
    torchopt = require("torchopt")
    pkeys, hkeys = list(params), list(hparams)

    def optimality(theta: tuple[Tensor, ...], phi: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def g(th: tuple[Tensor, ...]) -> Tensor:
            return problem.inner(_as_tree(pkeys, th), _as_tree(hkeys, phi), inner_batch)

        return tuple(torch.func.grad(g)(tuple(theta)))

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(theta0: tuple[Tensor, ...], phi: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # params are taken as the inner solution, as the bilevel AID solvers do
        return tuple(t.detach().clone() for t in theta0)

    phi = tuple(_leaves(hparams, True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)  # torchopt 0.7.3 calls functorch.vjp
        warnings.simplefilter("ignore", category=UserWarning)
        theta = solver(tuple(_leaves(params, False)), phi)
        loss = problem.outer(_as_tree(pkeys, theta), _as_tree(hkeys, phi), outer_batch)
        grads = torch.autograd.grad(loss, phi, allow_unused=True)
    return _finish(hkeys, _grads_or_zeros(grads, list(phi)), "torchopt", method)


def _torchopt_solve(method: str, iters: int, alpha: float, tol: float) -> Callable[..., Any]:
    from torchopt import linear_solve

    if method == "cg":
        return linear_solve.solve_cg(maxiter=iters, rtol=tol, atol=0.0)
    if method == "neumann":
        return linear_solve.solve_inv(ns=True, maxiter=iters, alpha=alpha)
    return linear_solve.solve_inv(ns=True, maxiter=0, alpha=1.0)  # identity: v = b


# ------------------------------------------------------------------------------------------------ betty


class _BettyLevel:
    """The part of ``betty.problems.Problem`` that ``betty.hypergradient`` reads, over fixed leaf tensors."""

    def __init__(self, tensors: list[Tensor], loss: Callable[[Any], Tensor] | None, config: Any, batch: Any) -> None:
        self._tensors = tensors
        self._loss = loss
        self.config = config
        self.cur_batch = batch
        self.paths: list[Any] = []
        self._strategy = "default"

    def training_step_exec(self, batch: Any) -> Tensor:
        assert self._loss is not None
        return self._loss(batch)

    def parameters(self) -> list[Tensor]:
        return self._tensors

    def trainable_parameters(self) -> list[Tensor]:
        return self._tensors

    def meta_trainable_parameters(self) -> list[Tensor]:
        return self._tensors


def _betty(problem, params, hparams, inner_batch, outer_batch, method, iters, alpha) -> Tree:
    require("betty")
    from betty.configs import Config
    from betty.hypergradient import get_grads

    pkeys, hkeys = list(params), list(hparams)
    theta, phi = _leaves(params, True), _leaves(hparams, True)
    if method == "cg":
        config = Config(type="cg", cg_iterations=iters, cg_alpha=1.0)
    elif method == "neumann":
        config = Config(type="neumann", neumann_iterations=iters, neumann_alpha=alpha)
    else:
        config = Config(type="darts", darts_alpha=alpha)

    def inner_loss(batch: Any) -> Tensor:
        # betty differentiates grad_theta g w.r.t. every phi without allow_unused, and fails when some phi
        # does not enter grad_theta g (MELTR: the bias of the last LayerNorm only shifts L_aux by w^T b).
        # Adding 0 * sum(phi) * sum(theta_0) links them in the graph without changing any value.
        link = sum(p.sum() for p in phi) * theta[0].sum()
        return problem.inner(_as_tree(pkeys, theta), _as_tree(hkeys, phi), batch) + 0.0 * link

    lower = _BettyLevel(theta, inner_loss, config, inner_batch)
    upper = _BettyLevel(phi, None, Config(), outer_batch)
    loss = problem.outer(_as_tree(pkeys, theta), _as_tree(hkeys, phi), outer_batch)
    # as betty's Problem.backward: the direct gradient, then the best-response term along the path
    direct = _grads_or_zeros(torch.autograd.grad(loss, phi, retain_graph=True, allow_unused=True), phi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        implicit = get_grads(loss, [upper, lower, upper], retain_graph=False, do_sync=False)
    implicit = _grads_or_zeros(implicit, phi)
    return _finish(hkeys, [d + i for d, i in zip(direct, implicit, strict=True)], "betty", method)


# -------------------------------------------------------------------------------------------------- API


def peer_hypergrad(
    peer: str,
    method: str,
    problem: bl.BilevelProblem,
    params: dict,
    hparams: dict,
    inner_batch: Any,
    outer_batch: Any,
    *,
    iters: int = 20,
    lr: float = 0.01,
    alpha: float = 0.01,
    tol: float = 1e-10,
) -> dict[str, torch.Tensor]:
    """The hypergradient ``dF/dhparams`` computed by ``peer`` with ``method`` (see the module docstring).

    Args:
        peer: ``"higher"``, ``"torchopt"`` or ``"betty"``.
        method: one of ``PEER_METHODS[peer]`` (``"itd"``, ``"cg"``, ``"neumann"``, ``"identity"``).
        problem: the bilevel problem (``problem.inner`` = g, ``problem.outer`` = f).
        params: ``theta``: the start of the unrolled steps (itd) or the inner solution (implicit methods).
        hparams: ``phi``, the tensors the hypergradient is taken with respect to.
        inner_batch, outer_batch: passed to g and f.
        iters: itd: unrolled steps; cg: maximum CG iterations; neumann: HVPs (``iters + 1`` terms).
        lr: itd step size.
        alpha: neumann step (must be below ``2/L``); betty identity: darts' finite-difference radius.
        tol: cg relative residual tolerance (torchopt; betty's CG has none).

    Returns:
        A detached dict shaped like ``hparams``. Inputs are copied: the caller's tensors are not modified.
    """
    _check_args(peer, method, params, hparams, iters, lr, alpha)
    require(peer)
    if peer == "higher":
        return _higher_itd(problem, params, hparams, inner_batch, outer_batch, iters, lr)
    if peer == "torchopt":
        if method == "itd":
            return _torchopt_itd(problem, params, hparams, inner_batch, outer_batch, iters, lr)
        solve = _torchopt_solve(method, iters, alpha, tol)
        return _torchopt_implicit(problem, params, hparams, inner_batch, outer_batch, solve, method)
    return _betty(problem, params, hparams, inner_batch, outer_batch, method, iters, alpha)


@dataclass
class PeerSolver(bl.Solver):
    """A peer's hypergradient behind the :class:`bilevel.Solver` interface, so that a peer can be
    dropped into :class:`bilevel.BilevelTrainer` (e.g. as a row of the Table 8 benchmark).

    ``hypergrad(problem, params, hparams, inner_batch, outer_batch)`` returns
    :func:`peer_hypergrad` ``(peer, method, ...)`` with this instance's options; ``info.times``
    has the total only (the peers' stages are not separable) and ``info.n_hvp`` the HVP count the
    method implies (cg: at most ``iters``, neumann: ``iters``, identity: 0; itd: none).
    ``reduce`` (data-parallel training) is not supported: the peers have no such hook.

    Args:
        peer, method: as in :func:`peer_hypergrad` (``PEER_METHODS[peer]``).
        iters, lr, alpha, tol: as in :func:`peer_hypergrad`.
    """

    peer: str
    method: str
    iters: int = 3
    lr: float = 0.01
    alpha: float = 0.01
    tol: float = 1e-10

    name = "peer"

    def __post_init__(self) -> None:
        if self.peer not in PEER_METHODS:
            raise ValueError(f"unknown peer {self.peer!r}; expected one of {sorted(PEER_METHODS)}")
        if self.method not in PEER_METHODS[self.peer]:
            raise ValueError(f"peer {self.peer!r} has no method {self.method!r}; it supports {PEER_METHODS[self.peer]}")
        require(self.peer)
        self.name = f"{self.peer}:{self.method}"  # type: ignore[misc]

    def _hypergrad(self, problem, params, hparams, inner_batch, outer_batch, call):
        info = call.info
        if call.reduce is not None:
            raise NotImplementedError(f"{self.name}: the peers have no data-parallel reduce hook")
        hg = peer_hypergrad(
            self.peer, self.method, problem, params, hparams, inner_batch, outer_batch,
            iters=self.iters, lr=self.lr, alpha=self.alpha, tol=self.tol,
        )  # fmt: skip
        info.iters = 0 if self.method == "identity" else self.iters
        info.n_hvp = self.iters if self.method in ("cg", "neumann") else 0
        return hg


def parse_peer_solver(spec: str, iters: int = 3, alpha: float = 0.01) -> PeerSolver:
    """``"torchopt:cg"`` -> ``PeerSolver("torchopt", "cg", iters=iters, alpha=alpha, lr=alpha)``.

    ``alpha`` is the Neumann step / darts radius and ``lr`` the ITD step, as in the MELTR fine-tuning
    CLI. ``ValueError`` for a malformed spec, an unknown peer or method; ``ImportError`` when the peer
    does not import.
    """
    peer, sep, method = spec.partition(":")
    if not sep or not peer or not method:
        raise ValueError(f"a peer solver is written PEER:METHOD (e.g. 'torchopt:cg'), got {spec!r}")
    return PeerSolver(peer, method, iters=iters, lr=alpha, alpha=alpha)


def _self_check() -> None:
    """Print each adapter against our solver with the same settings and against the exact answer."""
    import time

    from bilevel.testing import logistic_breast_cancer, ridge_diabetes

    def rel(a: Tree, b: Tree) -> float:
        num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
        return (num / sum(float((b[k] ** 2).sum()) for k in b)) ** 0.5

    print(f"peers: {available()}")
    print(f"{'problem':9s} {'peer':9s} {'method':9s} {'rel vs ours':>12s} {'rel vs exact':>12s} {'ms':>7s}")
    for name, P in (("ridge", ridge_diabetes()), ("logistic", logistic_breast_cancer())):
        hp = P.hparams(-2.0)
        sol, pr, exact = P.solution(hp), P.problem(), P.exact_hypergrad(hp)
        a = 1.0 / P.curvature(hp)[1]
        settings = {
            "itd": ({"iters": 20, "lr": a}, bl.get_solver("itd", steps=20, lr=a)),
            "cg": ({"iters": 100, "tol": 1e-12}, bl.get_solver("aid-cg", iters=100, tol=1e-12)),
            "neumann": ({"iters": 20, "alpha": a}, bl.get_solver("aid-fp", iters=20, alpha=a)),
            "identity": ({"alpha": 1e-3}, bl.get_solver("aid-fp-lite", scale=1.0)),
        }
        for peer, methods in PEER_METHODS.items():
            for method in methods:
                opts, solver = settings[method]
                try:
                    t0 = time.perf_counter()
                    hg = peer_hypergrad(peer, method, pr, sol, hp, P.inner_batch, P.outer_batch, **opts)
                    ms = 1e3 * (time.perf_counter() - t0)
                except ImportError as exc:
                    print(f"{name:9s} {peer:9s} {method:9s} skipped: {exc}")
                    continue
                ref = solver.hypergrad(pr, sol, hp, P.inner_batch, P.outer_batch)
                print(f"{name:9s} {peer:9s} {method:9s} {rel(hg, ref):12.2e} {rel(hg, exact):12.2e} {ms:7.1f}")


if __name__ == "__main__":
    _self_check()
