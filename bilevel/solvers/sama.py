"""SAMA: the inverse Hessian taken as the inner optimizer's diagonal step Jacobian, first-order products only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .._tree import Tree
from ..linalg import LinearSolve, diagonal, identity
from ..products import FIRST_ORDER_MIXED, HVPMode, MixedMode
from .aid import AIDSolver
from .base import Call

__all__ = ["SAMA", "check_sama_optimizer", "sama_preconditioner"]


@dataclass
class SAMA(AIDSolver):
    """SAMA (Choe et al., NeurIPS 2023; betty's ``sama``): ``H^{-1} ~ scale * diag(P)`` with ``P`` the
    inner optimizer's step Jacobian, and the mixed product by finite differences:

        grad F ~ grad_phi f - J (scale * P * grad_theta f)

    ``P`` comes per call (``preconditioner=``, :func:`sama_preconditioner`; the training loop passes it).
    For Adam / AdamW it is the derivative of the update direction ``m / (sqrt(v) + eps)`` in the gradient
    ``g`` of the step, times the learning rate (betty's ``precondition_adam``, bias correction ignored as
    there; with ``eps -> 0`` it is exact):

        P = lr * ((1 - b1) b2 v_old - b1 (1 - b2) g m_old) / (sqrt(b2 v_old + (1 - b2) g^2) + eps)^3

    For SGD ``P`` is the identity (``preconditioner=None``; then SAMA equals :class:`~bilevel.AIDFPLite`
    with the same ``scale`` and ``mixed``). No Hessian-vector product and no second-order graph:
    ``hvp`` must be ``"fd"`` (unused) and ``mixed`` ``"fd"`` (central, two gradients of ``g`` in
    ``phi`` at ``theta +- e v``, ``e = fd_radius / ||v||``) or ``"fd-onesided"``, so ``g`` never needs a
    double backward (fused attention kernels, FSDP-style wrappers).

    Args:
        scale: a multiple of ``P`` (the outer learning rate absorbs it).
        mixed: ``"fd"`` (default) or ``"fd-onesided"``.
        hvp: ``"fd"`` (no HVP is taken; kept for the AID interface).
        fd_radius: the finite differences' radius ``r`` (betty's ``sama_adam_alpha`` plays this role).

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> from bilevel.testing import example
        >>> ex = example()  # ridge regression, d=5, L2 weights exp(lam), at theta*(phi): exact answers known
        >>> P = {"w": torch.full((5,), 0.5, dtype=torch.float64)}  # a diagonal preconditioner
        >>> hg = bl.SAMA().hypergrad(*ex.args, preconditioner=P)
        >>> lite = bl.AIDFPLite(scale=0.5, mixed="fd").hypergrad(*ex.args)  # P = 0.5 I is AID-FP-Lite's
        >>> torch.allclose(hg["lam"], lite["lam"], rtol=1e-12)
        True
    """

    scale: float = 1.0
    mixed: MixedMode = "fd"
    hvp: HVPMode = "fd"
    fd_radius: float = 1e-2

    name = "sama"
    uses_hvp = False
    takes_preconditioner = True

    def __post_init__(self) -> None:
        if self.mixed not in FIRST_ORDER_MIXED:
            raise ValueError(f"sama is first order: mixed must be one of {FIRST_ORDER_MIXED}, got {self.mixed!r}")
        if self.hvp != "fd":
            raise ValueError(
                f"sama takes no Hessian-vector product: hvp must be 'fd' (no second-order graph), got {self.hvp!r}"
            )
        super().__post_init__()

    def linear_solve(self) -> LinearSolve:
        return identity(self.scale)

    def solve_for(self, call: Call) -> LinearSolve:
        if call.preconditioner is None:
            return self.linear_solve()
        return diagonal(call.preconditioner, self.scale)


def check_sama_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an inner optimizer SAMA has no preconditioner for (only SGD and Adam / AdamW without amsgrad)."""
    if isinstance(optimizer, torch.optim.SGD):
        return
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise TypeError(
            f"sama: no preconditioner for the inner optimizer {type(optimizer).__name__}; SAMA is defined for "
            "torch.optim.SGD (identity) and torch.optim.Adam / AdamW"
        )
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        raise ValueError("sama: Adam with amsgrad=True has no SAMA preconditioner (its v is a running maximum)")


@torch.no_grad()
def sama_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    applied: bool,
) -> Tree | None:
    """SAMA's diagonal ``P`` for the inner optimizer's step with gradient ``grads`` (see :class:`SAMA`).

    Args:
        optimizer: the inner optimizer (SGD: returns None, the identity; Adam / AdamW: the formula).
        params: the parameters it steps, by name (the tensors its state is keyed by).
        grads: the step's gradient, by name.
        applied: True when the optimizer has already taken that step (its ``exp_avg`` / ``exp_avg_sq`` hold
            ``m``, ``v`` after it, and ``m_old``, ``v_old`` are recovered from them, as betty does); False
            when the step is still to come (the state holds ``m_old``, ``v_old``; a training loop's hyper
            step taken before its inner update).

    Returns:
        ``{name: P}`` (float, shaped like each parameter), or None for SGD.
    """
    check_sama_optimizer(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        return None
    missing = sorted(set(params) - set(grads))
    if missing:
        raise ValueError(f"sama_preconditioner: no gradient for {missing}")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: Tree = {}
    for name, p in params.items():
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"sama_preconditioner: parameter {name!r} is not stepped by the inner optimizer")
        (b1, b2), eps, lr = group["betas"], float(group["eps"]), float(group["lr"])
        g = grads[name].to(p.dtype)
        state = optimizer.state.get(p, {})
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        if applied:
            m_old = (m - (1 - b1) * g) / b1 if b1 != 0 else torch.zeros_like(m)
            v_old = ((v - (1 - b2) * g * g) / b2).clamp_min(0)
            v_new = v
        else:
            m_old, v_old = m, v
            v_new = b2 * v_old + (1 - b2) * g * g
        out[name] = lr * ((1 - b1) * b2 * v_old - b1 * (1 - b2) * g * m_old) / (v_new.sqrt() + eps) ** 3
    return out
