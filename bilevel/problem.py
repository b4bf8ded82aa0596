"""The bilevel problem and the checks on its inputs.

    min_phi  F(phi) = f(theta*(phi), phi)                 outer objective f, on outer batches
    s.t.     theta*(phi) = argmin_theta g(theta, phi)     inner objective g, on inner batches

``theta`` are the *params* and ``phi`` the *hparams*; both are ``dict[str, Tensor]``.
Both objectives are called as ``fn(params, hparams, batch)`` and must return a 0-dim tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._tree import LOW_PRECISION, Tree

__all__ = ["BilevelProblem", "Objective", "check_differentiable", "check_finite", "check_trees"]

Objective = Callable[[Tree, Tree, Any], Tensor]

_NAMES = {"inner": "inner objective g", "outer": "outer objective f"}


@dataclass(frozen=True)
class BilevelProblem:
    """A bilevel problem given by its two objectives.

    Args:
        inner: ``g(params, hparams, batch) -> 0-dim tensor``, minimised over ``params``.
        outer: ``f(params, hparams, batch) -> 0-dim tensor``; the hypergradient is the total
            derivative of ``F(hparams) = f(params*(hparams), hparams)``. ``f`` may ignore
            ``hparams`` entirely (MELTR's case): its direct gradient is then exactly zero.

    Both functions must be written functionally (no in-place updates of their arguments and no
    ``.item()`` on results that depend on them) because they are differentiated twice.

    Examples:
        ``g = 1/2 ||w - lam||^2`` has ``w*(lam) = lam``, so for ``f = 1/2 ||w - t||^2`` the
        hypergradient is ``lam - t`` (``H = I``, ``J = -I``, ``grad_w f = w* - t``):

        >>> import torch
        >>> import bilevel as bl
        >>> g = lambda params, hparams, batch: 0.5 * ((params["w"] - hparams["lam"]) ** 2).sum()
        >>> f = lambda params, hparams, target: 0.5 * ((params["w"] - target) ** 2).sum()
        >>> problem = bl.BilevelProblem(inner=g, outer=f)
        >>> hparams = {"lam": torch.tensor([1.0, 2.0])}
        >>> params = {"w": hparams["lam"].clone()}  # the inner minimiser
        >>> hg = bl.get_solver("aid-cg").hypergrad(problem, params, hparams, None, torch.tensor([0.5, 0.5]))
        >>> hg["lam"]
        tensor([0.5000, 1.5000])
    """

    inner: Objective
    outer: Objective

    def __post_init__(self) -> None:
        for name in ("inner", "outer"):
            if not callable(getattr(self, name)):
                raise TypeError(f"BilevelProblem.{name} must be callable, got {type(getattr(self, name)).__name__}")

    def objective(self, level: str, stage: str) -> Objective:
        """The objective of ``level`` ("inner" or "outer") wrapped with a shape check.

        The wrapper raises ``ValueError`` naming the function and ``stage`` when the result is
        not a 0-dim floating tensor. (Finiteness is checked by the caller on the returned value,
        outside of any :mod:`torch.func` transform.)
        """
        fn = self.inner if level == "inner" else self.outer
        label = _NAMES[level]

        def checked(params: Tree, hparams: Tree, batch: Any) -> Tensor:
            out = fn(params, hparams, batch)
            if not isinstance(out, Tensor):
                raise ValueError(f"{label} must return a 0-dim tensor, got {type(out).__name__} (stage: {stage})")
            if out.dim() != 0:
                raise ValueError(
                    f"{label} must return a 0-dim (scalar) tensor, got shape {tuple(out.shape)} "
                    f"(stage: {stage}); reduce it with .mean() or .sum()"
                )
            if not out.is_floating_point():
                raise ValueError(f"{label} returned dtype {out.dtype}, expected a floating dtype (stage: {stage})")
            return out

        return checked


def check_finite(value: Tensor, level: str, stage: str) -> None:
    """Raise ``FloatingPointError`` if ``value`` is not finite, naming the function and stage."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{_NAMES[level]} is non-finite ({float(value)}) at stage: {stage}")


def check_differentiable(value: Tensor, level: str, stage: str) -> None:
    """Raise ``ValueError`` when ``value`` carries no autograd graph: the objective does not depend on
    ``params`` or ``hparams`` (a constant, or a result that went through ``.item()`` / ``.detach()``)."""
    if not value.requires_grad:
        raise ValueError(
            f"{_NAMES[level]} does not depend on params or hparams (its value has no autograd graph; stage: "
            f"{stage}): it returned a constant, or a result computed through .item(), .detach() or numpy"
        )


def check_trees(params: Tree, hparams: Tree) -> tuple[torch.dtype, torch.device]:
    """Validate ``params`` and ``hparams``; return the params' dtype and the common device.

    Both must be non-empty ``dict[str, Tensor]`` of floating tensors on one device. All params share
    one dtype and all hparams share one dtype, and the two dtypes are equal, with one exception (the
    mixed-precision policy): bfloat16 or float16 params beside float32 hparams. Any other mix (e.g.
    float64 params with float32 hparams, or float32 params with bfloat16 hparams) is refused: it would
    round the hypergradient, or the solve's float32 accumulators, to the lower of the two precisions
    without saying so. Raises ``TypeError`` / ``ValueError`` naming the offending key otherwise.
    """
    refs: dict[str, tuple[str, Tensor]] = {}
    device_ref: tuple[str, Tensor] | None = None
    for tname, tree in (("params", params), ("hparams", hparams)):
        if not isinstance(tree, dict):
            raise TypeError(f"{tname} must be a dict[str, Tensor], got {type(tree).__name__}")
        if not tree:
            raise ValueError(f"{tname} is empty: a hypergradient needs at least one tensor in it")
        for key, leaf in tree.items():
            where = f"{tname}[{key!r}]"
            if not isinstance(key, str):
                raise TypeError(f"{tname} keys must be str, got {key!r}")
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{where} must be a Tensor, got {type(leaf).__name__}")
            if not leaf.is_floating_point():
                raise ValueError(f"{where} has dtype {leaf.dtype}; params and hparams must be floating point")
            if device_ref is None:
                device_ref = (where, leaf)
            elif leaf.device != device_ref[1].device:
                raise ValueError(
                    f"mixed devices: {where} is on {leaf.device} but {device_ref[0]} is on {device_ref[1].device}; "
                    "params and hparams must share one device"
                )
            rwhere, rleaf = refs.setdefault(tname, (where, leaf))
            if leaf.dtype != rleaf.dtype:
                raise ValueError(
                    f"mixed dtypes: {where} is {leaf.dtype} but {rwhere} is {rleaf.dtype}; "
                    f"all {tname} must share one dtype"
                )
    (pwhere, pleaf), (hwhere, hleaf) = refs["params"], refs["hparams"]
    if pleaf.dtype != hleaf.dtype and not (pleaf.dtype in LOW_PRECISION and hleaf.dtype == torch.float32):
        raise ValueError(
            f"mixed dtypes: {hwhere} is {hleaf.dtype} but {pwhere} is {pleaf.dtype}; params and hparams must share "
            "one dtype, except bfloat16 / float16 params with float32 hparams (the mixed-precision policy)"
        )
    return pleaf.dtype, pleaf.device
