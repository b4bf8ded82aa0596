"""Helpers shared by the torchrun check scripts (dist_check.py, fsdp_check.py), imported from their folder."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist


def rel(a: dict, b: dict) -> float:
    """``max |a - b| / max |b|`` over the leaves of two trees."""
    num = max(float((a[k] - b[k]).abs().max()) for k in a)
    den = max(float(b[k].abs().max()) for k in b)
    return num / max(den, 1e-300)


def shard(batch: tuple) -> tuple:
    """This rank's equal share of every tensor of ``batch`` (split along the first dimension)."""
    return tuple(t.chunk(dist.get_world_size())[dist.get_rank()] for t in batch)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, sin(sum x))``: ``n`` rows of 5 float64 features, deterministic from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x, x.sum(1).sin()


def flat(trainer) -> dict:
    """A trainer's model and meta-model parameters, each as one vector (FSDP shards gathered whole)."""
    theta = [q.detach().full_tensor() if hasattr(q, "full_tensor") else q.detach() for q in trainer.model.parameters()]
    phi = [q.detach().reshape(-1) for q in trainer.meta_model.parameters()]
    return {"theta": torch.cat([q.reshape(-1) for q in theta]), "phi": torch.cat(phi)}


def write(out: dict, path: str) -> None:
    """Rank 0 writes ``out`` as JSON to ``path``."""
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
