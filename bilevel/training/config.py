"""The trainer's options and its error type."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .._checks import check_int

__all__ = ["Autocast", "NonFiniteError", "NonFinitePolicy", "TrainerConfig"]

Autocast = Literal["bf16", "fp16"]
"""The reduced-precision compute of :attr:`TrainerConfig.autocast` (None: none)."""

NonFinitePolicy = Literal["raise", "skip"]
"""What a step does with a non-finite loss, gradient or hypergradient (see :mod:`bilevel.training`)."""


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or hypergradient met by :meth:`BilevelTrainer.step` with
    ``on_nonfinite="raise"``. Attributes: ``step`` (1-based index of the failing step), ``level``
    (``"inner"`` or ``"outer"``), ``loss`` (the loss value, or None where unknown)."""

    def __init__(self, message: str, step: int, level: str, loss: float | None):
        super().__init__(message)
        self.step, self.level, self.loss = step, level, loss


@dataclass
class TrainerConfig:
    """Options of :class:`BilevelTrainer`.

    Attributes:
        hyper_every: K, a hyper step after every K-th inner update (Algorithm 1; MELTR: 3 or 5).
        inner_steps: inner updates per :meth:`~BilevelTrainer.step` on the same inner batch
            (requires ``grad_accumulation == 1``).
        grad_accumulation: micro-batches (``step`` calls) whose inner gradients are summed (each loss
            divided by this number) before one inner update; hyper steps use the batches of the call
            that completes the window.
        warmup_steps: inner updates before the first hyper step (the first one happens at the first
            multiple of ``hyper_every`` strictly greater than ``warmup_steps``).
        clip_grad_norm / meta_clip_grad_norm: max global 2-norm of the inner gradient / hypergradient
            (``torch.nn.utils.clip_grad_norm_``), None for no clipping.
        on_nonfinite: ``"raise"`` or ``"skip"`` (see :mod:`bilevel.training`).
        rollback: with ``"raise"``, restore the inner model and optimizer when a later part of a step
            fails (costs a copy of the inner model and optimizer state on such steps).
        distributed: average inner gradients and reduce hypergradients over the ranks of the
            default process group; None (default) = when one with more than one rank is initialised.
        share_linearization: on hyper steps, linearise ``g`` once at ``(theta_k, phi)`` on the inner
            batch (:class:`~bilevel.Linearization`): its ``grad_theta g`` makes the inner update and
            the AID solver takes it (``solver.hypergrad_at``), which saves one forward and backward
            pass of ``g`` per hyper step. The hyper step then comes *before* that step's inner update
            (at ``theta_k`` instead of ``theta_{k+1}``); other steps are unchanged. Needs an AID
            solver (not ITD), ``inner_steps == 1`` and ``grad_accumulation == 1``.
        warm_start: start each hyper step's linear solve from the previous hyper step's
            ``v ~ H^{-1} grad_theta f`` (``v0=``: CG from ``x0 = v``, the Neumann series for the residual,
            ``v + N(b - H v)``; see :func:`bilevel.linalg.conjugate_gradient` and
            :func:`bilevel.linalg.neumann_series`) instead of from 0. One more product per hyper step
            (``H v``); CG then needs fewer iterations to reach ``tol`` when consecutive hyper steps are
            close. The kept ``v`` is saved in checkpoints. Needs a solver with ``supports_warm_start``
            (AID-CG, AID-FP, StocBiO, or AID with a CG / Neumann solve; not ITD, AID-FP-Lite or Nyström).
        autocast: None (default), ``"bf16"`` or ``"fp16"``: the inner update's forward pass (``g``) and the
            hyper step (the objectives and every product the solver takes) run under
            ``torch.autocast(device_type of the params, bfloat16 / float16)``; params, hparams, gradients,
            optimizer states and the solver's accumulators stay float32 (docs/math.md, "Precision").
            ``"fp16"`` needs the model on a CUDA device and scales the inner loss with a
            ``torch.amp.GradScaler`` (unscaled before clipping; an overflowing update is skipped by the
            scaler, not raised); it cannot be combined with ``share_linearization``. The scaler's state is
            not saved in checkpoints (it restarts at its initial scale on resume).
    """

    hyper_every: int = 1
    inner_steps: int = 1
    grad_accumulation: int = 1
    warmup_steps: int = 0
    clip_grad_norm: float | None = None
    meta_clip_grad_norm: float | None = None
    on_nonfinite: NonFinitePolicy = "raise"
    rollback: bool = True
    distributed: bool | None = None
    share_linearization: bool = False
    warm_start: bool = False
    autocast: Autocast | None = None

    def __post_init__(self) -> None:
        for name, minimum in (("hyper_every", 1), ("inner_steps", 1), ("grad_accumulation", 1), ("warmup_steps", 0)):
            check_int(f"TrainerConfig.{name}", getattr(self, name), minimum)
        if self.inner_steps > 1 and self.grad_accumulation > 1:
            raise ValueError("TrainerConfig: inner_steps > 1 and grad_accumulation > 1 cannot be combined")
        for name in ("clip_grad_norm", "meta_clip_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"TrainerConfig.{name} must be None or a finite number > 0, got {value!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"TrainerConfig.warm_start must be a bool, got {self.warm_start!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"TrainerConfig.on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"TrainerConfig.autocast must be None, 'bf16' or 'fp16', got {self.autocast!r}")
        if self.autocast == "fp16" and self.share_linearization:
            raise ValueError(
                "TrainerConfig.autocast='fp16' cannot be combined with share_linearization: the shared gradient is "
                "not scaled by the GradScaler"
            )
        if self.share_linearization and (self.inner_steps > 1 or self.grad_accumulation > 1):
            raise ValueError(
                "TrainerConfig.share_linearization needs inner_steps == 1 and grad_accumulation == 1: the shared "
                "linearisation is the gradient of one inner update on one batch"
            )
