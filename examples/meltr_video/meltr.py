"""MELTR, the Meta Loss TRansformer (MATH.md section 4), and its bilevel objectives.

Given ``T`` scalar losses ``L_1..L_T`` of a backbone (the primary loss among them) in a fixed order::

    token_t = SE(L_t) + TE(t)          SE: Linear(1, h1) -> ReLU -> Linear(h1, d)   (on the raw loss)
                                       TE: nn.Embedding(T, d), one row per task position
    H       = TransformerEncoderLayer(d, nhead=8, dim_feedforward=ff)(tokens)     one layer, no CLS
    L_aux   = w^T mean_t H_t           w: bias-free Linear(d, 1); L_aux may be negative

Regulariser and objectives (paper eqs. 6-7)::

    R = | sum_t L_t - L_aux |                      (L1, as in the official code)
    g = L_aux                                      inner objective, minimised over the backbone theta
    f = L_primary + gamma * R                      outer objective, gamma = 0.1, minimised over MELTR phi

:class:`MELTRObjectives` gives ``g`` and ``f`` as ``fn(params, hparams, batch)`` for
``bl.BilevelProblem`` (params: the backbone's parameter dict, hparams: MELTR's). ``f`` depends on
``phi`` directly through ``R``; the solvers of :mod:`bilevel` keep that term (the official code drops it).

Attention runs on PyTorch's ``math`` SDPA kernel: the fused CPU kernel has no double backward,
which every hypergradient needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn.attention import SDPBackend, sdpa_kernel

import bilevel as bl

__all__ = [
    "MELTR",
    "MELTRObjectives",
    "RecentTrainBatches",
    "loss_gradient",
    "make_objectives",
    "regulariser",
    "response_curve",
]


def _all_finite(x: Tensor) -> bool:
    """``True`` when every entry is finite; also ``True`` where the check cannot run (under ``vmap``)."""
    try:
        return bool(torch.isfinite(x).all())
    except RuntimeError:  # data-dependent control flow under torch.func.vmap: skip the check there
        return True


class MELTR(nn.Module):
    """The loss network: ``T`` scalar losses -> one auxiliary loss.

    Args:
        task_names: the names of the ``T`` input losses, in the order the task embedding uses.
        hidden: ``h1``, width of the scalar-embedding MLP (UniVL config: 128).
        d_model: ``d``, token width (UniVL: 256).
        ff: feed-forward width of the transformer layer (UniVL: 512).
        nhead: attention heads (8).
        dropout: dropout of the transformer layer. 0 by default so that ``g`` and ``f`` are
            deterministic functions, as the second-order products of the solvers assume.

    ``forward(losses)``: ``losses`` of shape ``[T]`` -> ``[]``, or ``[B, T]`` -> ``[B]``.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        hidden: int = 128,
        d_model: int = 256,
        ff: int = 512,
        nhead: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        names = list(task_names)
        if not names:
            raise ValueError("MELTR needs at least one task name")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for n, v in (("hidden", hidden), ("d_model", d_model), ("ff", ff), ("nhead", nhead)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{n} must be a positive int, got {v!r}")
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.task_names: tuple[str, ...] = tuple(names)
        self.scalar_embedding = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, d_model))
        self.task_embedding = nn.Embedding(len(names), d_model)
        self.encoder = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=ff, dropout=dropout, batch_first=True)
        self.head = nn.Linear(d_model, 1, bias=False)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def index(self, name: str) -> int:
        """Position of task ``name`` in the input vector."""
        try:
            return self.task_names.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; MELTR was built for {list(self.task_names)}") from None

    def stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Stack a dict of 0-dim losses into the ``[T]`` vector in task order (exact key match required)."""
        missing = [n for n in self.task_names if n not in losses]
        extra = [n for n in losses if n not in self.task_names]
        if missing or extra:
            raise ValueError(
                f"losses must have exactly the keys {list(self.task_names)}; missing {missing}, unexpected {extra}"
            )
        parts = []
        for n in self.task_names:
            v = losses[n]
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise ValueError(f"loss {n!r} must be a 0-dim tensor, got {getattr(v, 'shape', type(v).__name__)}")
            parts.append(v)
        return torch.stack(parts)

    def _check(self, losses: Tensor) -> None:
        if not isinstance(losses, Tensor):
            raise TypeError(f"MELTR expects a Tensor of losses, got {type(losses).__name__} (use .stack for a dict)")
        if losses.dim() not in (1, 2) or losses.shape[-1] != self.num_tasks:
            raise ValueError(
                f"MELTR expects losses of shape [{self.num_tasks}] or [B, {self.num_tasks}] "
                f"(tasks {list(self.task_names)}), got shape {tuple(losses.shape)}"
            )
        if not losses.is_floating_point():
            raise ValueError(f"losses must be floating point, got {losses.dtype}")
        if not _all_finite(losses):
            bad = [self.task_names[i] for i in range(self.num_tasks) if not _all_finite(losses[..., i])]
            raise FloatingPointError(f"non-finite input loss(es) to MELTR: {bad}")

    def forward(self, losses: Tensor) -> Tensor:
        """``[T]`` -> ``[]`` or ``[B, T]`` -> ``[B]``: the auxiliary loss ``L_aux``."""
        self._check(losses)
        single = losses.dim() == 1
        x = losses.unsqueeze(0) if single else losses  # [B, T]
        tokens = self.scalar_embedding(x.unsqueeze(-1)) + self.task_embedding.weight  # [B, T, d]
        with sdpa_kernel(SDPBackend.MATH):
            h = self.encoder(tokens)  # [B, T, d]
        out = self.head(h.mean(dim=1)).squeeze(-1)  # [B]
        return out[0] if single else out


def regulariser(losses: Tensor, aux: Tensor) -> Tensor:
    """``R = |sum_t L_t - L_aux|`` (L1). ``losses``: ``[T]`` or ``[B, T]``; ``aux``: ``[]`` or ``[B]``."""
    return (losses.sum(dim=-1) - aux).abs()


def loss_gradient(meltr: MELTR, losses: Tensor) -> Tensor:
    """``d L_aux / d L_t`` for every input loss, shape of ``losses`` (``[T]`` or ``[B, T]``).

    For a batch, row ``b`` is the gradient of ``L_aux[b]`` (rows do not interact, so the gradient
    of the sum is the per-row gradient). MELTR's parameters are held constant.
    """
    params = {k: v.detach() for k, v in meltr.named_parameters()}
    buffers = dict(meltr.named_buffers())
    x = losses.detach()

    def total(lv: Tensor) -> Tensor:
        return functional_call(meltr, (params, buffers), (lv,)).sum()

    return grad(total)(x)


@torch.no_grad()
def response_curve(meltr: MELTR, losses: Tensor, task: str | int, values: Tensor | Sequence[float]) -> Tensor:
    """``L_aux`` as input loss ``task`` takes each of ``values`` while the others stay at ``losses``.

    Args:
        losses: the base point, shape ``[T]``.
        task: task name or position.
        values: ``[N]`` values for that loss.
    Returns:
        ``[N]`` outputs.
    """
    if losses.dim() != 1:
        raise ValueError(f"response_curve needs a base point of shape [T], got {tuple(losses.shape)}")
    i = meltr.index(task) if isinstance(task, str) else int(task)
    if not 0 <= i < meltr.num_tasks:
        raise IndexError(f"task position {i} out of range for {meltr.num_tasks} tasks")
    vals = torch.as_tensor(values, dtype=losses.dtype, device=losses.device).reshape(-1)
    batch = losses.detach().unsqueeze(0).repeat(vals.numel(), 1)
    batch[:, i] = vals
    return meltr(batch)


LossFn = Callable[[dict[str, Tensor], Any], Mapping[str, Tensor]]


class MELTRObjectives:
    """The inner and outer objectives of MELTR for :class:`bilevel.BilevelProblem`.

    ``params`` is the backbone's parameter dict and ``hparams`` MELTR's (both from
    :func:`bilevel.functional_module`). The backbone, called as ``backbone(batch)``, must return a
    mapping with exactly MELTR's task names as keys and 0-dim losses as values.

        inner(params, hparams, batch) = g = L_aux = MELTR_phi(L(theta; batch))
        outer(params, hparams, batch) = f = L_primary(theta; batch) + gamma * |sum_t L_t - L_aux|

    Attributes:
        params, hparams: initial parameter dicts (detached, sharing storage with the modules).
        backbone_fn, meltr_fn: functional calls of the two modules.
    """

    def __init__(self, backbone: nn.Module, meltr: MELTR, primary: str, gamma: float = 0.1):
        if not isinstance(meltr, MELTR):
            raise TypeError(f"meltr must be a MELTR module, got {type(meltr).__name__}")
        if not (isinstance(gamma, int | float) and gamma >= 0 and gamma == gamma):
            raise ValueError(f"gamma must be a non-negative number, got {gamma!r}")
        self.meltr = meltr
        self.primary = primary
        self.primary_index = meltr.index(primary)
        self.gamma = float(gamma)
        self.params, self.backbone_fn = bl.functional_module(backbone)
        self.hparams, self.meltr_fn = bl.functional_module(meltr)

    def losses(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """The backbone's ``[T]`` loss vector in MELTR's task order."""
        return self.meltr.stack(self.backbone_fn(params, batch))

    def inner(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        """``g = L_aux`` (0-dim)."""
        return self.meltr_fn(hparams, self.losses(params, batch))

    def outer(self, params: dict[str, Tensor], hparams: dict[str, Tensor], batch: Any) -> Tensor:
        """``f = L_primary + gamma * R`` (0-dim)."""
        lv = self.losses(params, batch)
        f = lv[self.primary_index]
        if self.gamma:
            f = f + self.gamma * regulariser(lv, self.meltr_fn(hparams, lv))
        return f

    def problem(self) -> bl.BilevelProblem:
        return bl.BilevelProblem(inner=self.inner, outer=self.outer)


def make_objectives(
    backbone: nn.Module, meltr: MELTR, primary: str, gamma: float = 0.1
) -> tuple[bl.BilevelProblem, dict[str, Tensor], dict[str, Tensor], MELTRObjectives]:
    """``(problem, params, hparams, objectives)`` for MELTR on ``backbone`` with primary loss ``primary``."""
    obj = MELTRObjectives(backbone, meltr, primary, gamma)
    return obj.problem(), obj.params, obj.hparams, obj


class RecentTrainBatches:
    """The official code's meta batch: a uniformly random one of the last ``history`` training batches
    (drawn with ``generator``; MATH.md section 7: a training batch as meta batch means no held-out meta
    data). An endless iterable for :meth:`bilevel.BilevelTrainer.fit`'s ``outer_loader``; the training
    loader is wrapped with :meth:`watch` so that every batch it yields is recorded. (The default meta
    batches, a held-out meta split, need no sampler: its DataLoader is cycled by the trainer.)"""

    def __init__(self, generator: torch.Generator, history: int = 10):
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive int, got {history!r}")
        self.recent: deque[Any] = deque(maxlen=history)
        self.generator = generator

    def observe(self, batch: Any) -> None:
        """Record a training batch."""
        self.recent.append(batch)

    def watch(self, loader: Any) -> _Watched:
        """``loader`` whose every yielded batch is first passed to :meth:`observe`."""
        return _Watched(loader, self)

    def __iter__(self) -> Iterator[Any]:
        while True:
            if not self.recent:
                raise RuntimeError("no training batch observed before the first meta batch")
            yield self.recent[int(torch.randint(len(self.recent), (1,), generator=self.generator))]


class _Watched:
    def __init__(self, loader: Any, sink: RecentTrainBatches):
        self.loader, self.sink = loader, sink

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for b in self.loader:
            self.sink.observe(b)
            yield b
