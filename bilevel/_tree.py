"""Arithmetic on parameter dictionaries ("trees").

A tree is a ``dict[str, Tensor]`` as used by :func:`torch.func.functional_call`.
The linear-algebra routines of :mod:`bilevel.linalg` treat a tree as one vector, the
concatenation of its flattened leaves in key order, so that for trees ``a`` and ``b``

    dot(a, b) = sum_k <a[k], b[k]>,     norm(a) = sqrt(dot(a, a)).

All functions are pure: they return new trees and never modify their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

Tree = dict[str, Tensor]
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
"""Params dtypes allowed beside float32 hparams (the mixed-precision policy, docs/math.md "Precision")."""

__all__ = [
    "Tree",
    "all_finite",
    "tree_add",
    "tree_all_finite",
    "tree_detach",
    "tree_dot",
    "tree_map",
    "tree_norm",
    "tree_scale",
    "tree_sub",
    "tree_zeros_like",
]


def tree_map(fn: Callable[..., Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise: ``{k: fn(tree[k], *(r[k] for r in rest))}``."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def tree_add(a: Tree, b: Tree, alpha: float | Tensor = 1.0) -> Tree:
    """``a + alpha * b`` leaf-wise."""
    return {k: v.add(b[k], alpha=alpha) if isinstance(alpha, float) else v + alpha * b[k] for k, v in a.items()}


def tree_sub(a: Tree, b: Tree) -> Tree:
    """``a - b`` leaf-wise."""
    return {k: v - b[k] for k, v in a.items()}


def tree_scale(a: Tree, c: float | Tensor) -> Tree:
    """``c * a`` leaf-wise."""
    return {k: v * c for k, v in a.items()}


def tree_dot(a: Tree, b: Tree) -> Tensor:
    """Inner product ``sum_k <a[k], b[k]>`` as a 0-dim tensor (a plain tensor, the same on every rank,
    also for FSDP shards)."""
    return torch.stack([_dot(v, b[k]) for k, v in a.items()]).sum()


def _dot(u: Tensor, v: Tensor) -> Tensor:
    if isinstance(u, DTensor):  # FSDP shards: vdot's flattening is undefined for uneven shards; summed over ranks
        return _whole((u * v).sum())
    return torch.vdot(u.reshape(-1), v.reshape(-1))


def _whole(t: Tensor) -> Tensor:
    """A 0-dim reduction of DTensor shards as a plain tensor (reduced over ranks); other tensors as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def tree_norm(a: Tree) -> Tensor:
    """Euclidean norm of the concatenated leaves, a 0-dim tensor."""
    return torch.linalg.vector_norm(torch.stack([_whole(torch.linalg.vector_norm(v)) for v in a.values()]))


def tree_zeros_like(a: Tree) -> Tree:
    """A tree of zeros with the keys, shapes, dtypes and devices of ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_detach(a: Tree) -> Tree:
    """Detached views of the leaves (no copy, no autograd history)."""
    return {k: v.detach() for k, v in a.items()}


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every entry of every tensor is finite (one host synchronisation); True for none."""
    flags = [torch.isfinite(v).all() for v in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def tree_all_finite(a: Tree) -> bool:
    """True when every entry of every leaf is finite (one host synchronisation)."""
    return all_finite(a.values())
