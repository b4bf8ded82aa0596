"""Data-parallel helpers on :mod:`torch.distributed` (launch with ``torchrun``).

With N ranks each holding ``1/N`` of every batch and objectives that are batch *means* (equal
shard sizes), the whole-batch quantities are rank averages:

    grad g(batch) = mean_r grad g(shard_r),   H p = mean_r H_r p,   J v = mean_r J_r v,   grad f = mean_r grad f_r

but the hypergradient is *not* the average of per-rank hypergradients
(``J H^{-1} b != mean_r J_r H_r^{-1} b_r``). :func:`all_reduce_mean` is the ``reduce`` that the
solvers apply to every gradient and product, which makes their result the whole-batch
hypergradient on every rank. See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ._tree import Tree

__all__ = [
    "all_reduce_mean",
    "is_sharded",
    "all_reduce_mean_tensors",
    "broadcast_module",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_sharded(tree: dict[str, Tensor]) -> bool:
    """True when the leaves of ``tree`` are parameters sharded by FSDP2 (``fully_shard``): DTensor
    ``nn.Parameter`` objects, the module's own (see "FSDP" in ``docs/distributed.md``).

    FSDP evaluates its module only at its parameters' values and delivers gradients only through
    ``backward()`` into their ``.grad``, so the solvers work on the live parameters (writing a point into
    them and restoring it). Raises ``ValueError`` when only some leaves are DTensors, or when DTensor
    leaves are not parameters (e.g. ``p.detach()``: pass ``dict(model.named_parameters())``).
    """
    flags = [isinstance(v, DTensor) for v in tree.values()]
    if not any(flags):
        return False
    if not all(flags):
        mixed = [k for k, f in zip(tree, flags, strict=True) if not f][:3]
        raise ValueError(f"some leaves are FSDP shards (DTensor), some are not (e.g. {mixed}): shard the whole model")
    plain = [k for k, v in tree.items() if not isinstance(v, nn.Parameter)][:3]
    if plain:
        raise ValueError(
            f"{plain} are DTensors but not parameters: with an FSDP2 (fully_shard) model pass its live parameters, "
            "dict(model.named_parameters()), not detached copies (FSDP evaluates the module at its own parameters)"
        )
    return True


def all_reduce_mean_tensors(tensors: list[Tensor]) -> list[Tensor]:
    """Rank means of ``tensors`` (new tensors; the inputs are untouched).

    All tensors are flattened into one buffer per dtype and reduced with one ``all_reduce(SUM)``
    each (gloo and NCCL reduce with SUM; the mean divides by the world size afterwards). Outside a
    multi-rank process group the inputs are returned as they are. DTensors (gradients of FSDP2
    shards) are returned as they are: FSDP's reduce-scatter has already averaged them over ranks,
    and each rank holds a different shard.
    """
    if not is_distributed() or not tensors:
        return list(tensors)
    n = dist.get_world_size()
    out: list[Tensor | None] = [t if isinstance(t, DTensor) else None for t in tensors]
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            continue
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for i in idx:
            numel = tensors[i].numel()
            out[i] = flat[offset : offset + numel].view_as(tensors[i])
            offset += numel
    return out  # type: ignore[return-value]


def all_reduce_mean(tree: Tree) -> Tree:
    """``{k: mean over ranks of tree[k]}``: the ``reduce`` argument of ``solver.hypergrad``.

    The identity outside a multi-rank process group. Linear and self-adjoint (the adjoint of the
    rank mean is the rank mean), which is what :class:`~bilevel.ITD` needs to differentiate through it.
    """
    keys = list(tree)
    return dict(zip(keys, all_reduce_mean_tensors([tree[k] for k in keys]), strict=True))


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``src`` to all ranks (as DDP does at start).
    FSDP2 shards (DTensors) are left alone: each rank holds a different piece of them."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        if not isinstance(t, DTensor):
            dist.broadcast(t.data, src=src)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` outside a process group)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool, device: torch.device | None = None) -> bool:
    """Logical AND of ``flag`` over ranks (one tiny all-reduce; ``flag`` itself outside a process group)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)
