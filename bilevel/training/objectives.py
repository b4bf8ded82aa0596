"""The baselines' inner objectives, for the same loop without a meta model or a solver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._tree import Tree
from ..problem import Objective

__all__ = ["mtl_objective", "single_task_objective"]


def single_task_objective(primary: Callable[[Tree, Any], Tensor]) -> Objective:
    """The single-task baseline's inner objective ``g(params, hparams, batch) = primary(params, batch)``."""

    def g(params: Tree, hparams: Tree, batch: Any) -> Tensor:
        return primary(params, batch)

    return g


def mtl_objective(losses: Callable[[Tree, Any], Tensor], weights: Tensor | list[float] | None = None) -> Objective:
    """The multi-task baseline ``g = sum_t w_t L_t(params, batch)``; ``losses`` returns the vector ``(T,)``
    of task losses; ``weights`` default to ones."""
    w = None if weights is None else torch.as_tensor(weights)

    def g(params: Tree, hparams: Tree, batch: Any) -> Tensor:
        vec = losses(params, batch)
        if vec.dim() != 1:
            raise ValueError(f"mtl_objective: losses must return a 1-D tensor of task losses, got {tuple(vec.shape)}")
        if w is None:
            return vec.sum()
        if w.shape != vec.shape:
            raise ValueError(f"mtl_objective: {w.numel()} weights for {vec.numel()} losses")
        return (w.to(vec) * vec).sum()

    return g
