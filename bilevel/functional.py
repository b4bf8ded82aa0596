"""Use an ``nn.Module`` with the solvers: a params dict and a functional call.

    params, model_fn = bl.functional_module(model)
    def inner(params, hparams, batch):
        x, y = batch
        return loss(model_fn(params, x), y)

``model_fn(params, *args, **kwargs)`` is ``torch.func.functional_call(model, params | buffers,
args, kwargs)``: buffers (e.g. batch-norm statistics) and frozen parameters are passed as
constants, so a model of any size works without hand-written functional code.

**Buffer policy.** Buffers are read, never written, while a hypergradient is computed: every solver
runs under :func:`buffers_read_only`, during which a :class:`FunctionalModule` call (a) runs its
batch-norm layers in train mode without tracking (normalised with the batch's statistics, exactly
as a tracking layer in train mode normalises; running statistics and ``num_batches_tracked`` are not
updated), layers in eval mode normalising with the running statistics as always, and (b) hands
the module copies of its buffers, so any other in-place buffer update (a custom module,
``InstanceNorm`` with tracking) is discarded. The outer batch, ITD's look-ahead steps and the
products' extra forward passes therefore leave the statistics alone; only the training loop's
inner update (outside the solver) updates them. The same holds in every HVP / mixed-product mode
(the functorch modes would otherwise refuse the in-place update). A model called through the
caller's own ``functional_call`` rather than a :class:`FunctionalModule` is the caller's to manage.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ._tree import Tree

__all__ = ["FunctionalModule", "buffers_read_only", "functional_module", "load_params"]

_POLICY = threading.local()


@contextmanager
def buffers_read_only() -> Iterator[None]:
    """While active (in this thread), :class:`FunctionalModule` calls read their buffers and never write
    them (see the module docstring). The solvers enter it for every hypergradient; nesting is allowed."""
    before = getattr(_POLICY, "read_only", False)
    _POLICY.read_only = True
    try:
        yield
    finally:
        _POLICY.read_only = before


def _reading_only() -> bool:
    return getattr(_POLICY, "read_only", False)


@contextmanager
def _untracked_batch_norm(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers of ``module`` in train mode stop tracking running statistics (restored after)."""
    changed = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class FunctionalModule:
    """Callable ``(params, *args, **kwargs) -> module(*args, **kwargs)`` evaluated with ``params``.

    Attributes:
        module: the wrapped module (its own parameters are not read for the keys in ``params``).
        constants: buffers and parameters with ``requires_grad=False``, by name (live references:
            in-place buffer updates such as batch-norm running statistics in train mode touch them,
            except under :func:`buffers_read_only`).
        buffer_names: the keys of ``constants`` that are buffers (copied under :func:`buffers_read_only`).
    """

    def __init__(self, module: nn.Module, constants: dict[str, Tensor], buffer_names: frozenset[str] = frozenset()):
        self.module = module
        self.constants = constants
        self.buffer_names = frozenset(buffer_names)

    def __call__(self, params: Tree, *args: Any, **kwargs: Any) -> Any:
        if not _reading_only():
            return functional_call(self.module, (params, self.constants), args, kwargs, strict=False)
        constants = {k: v.clone() if k in self.buffer_names else v for k, v in self.constants.items()}
        with _untracked_batch_norm(self.module):
            return functional_call(self.module, (params, constants), args, kwargs, strict=False)

    def __repr__(self) -> str:
        return f"FunctionalModule({type(self.module).__name__}, constants={list(self.constants)})"


def functional_module(module: nn.Module) -> tuple[Tree, FunctionalModule]:
    """Split ``module`` into trainable ``params`` (detached, sharing storage) and a functional call.

    Returns:
        ``(params, fn)``: ``params`` maps names of parameters with ``requires_grad=True`` to detached
        tensors; ``fn(params, *args, **kwargs)`` runs the module with them.

    Examples:
        >>> import torch
        >>> import bilevel as bl
        >>> model = torch.nn.Linear(3, 2)
        >>> params, model_fn = bl.functional_module(model)
        >>> {name: tuple(p.shape) for name, p in params.items()}
        {'weight': (2, 3), 'bias': (2,)}
        >>> x = torch.randn(4, 3)
        >>> torch.equal(model_fn(params, x), model(x))
        True
        >>> zeros = {name: torch.zeros_like(p) for name, p in params.items()}
        >>> model_fn(zeros, x).abs().sum().item()  # evaluated with other values, the module is untouched
        0.0
        >>> params["weight"].data_ptr() == model.weight.data_ptr()  # shares storage: follows optimizer steps
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functional_module expects an nn.Module, got {type(module).__name__}")
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters (requires_grad=True)")
    constants: dict[str, Tensor] = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())
    constants.update(buffers)
    return params, FunctionalModule(module, constants, frozenset(buffers))


@torch.no_grad()
def load_params(module: nn.Module, params: Tree) -> None:
    """Copy ``params`` (as returned by :func:`functional_module`) into ``module``'s parameters."""
    own = dict(module.named_parameters())
    missing = sorted(set(params) - set(own))
    if missing:
        raise KeyError(f"{type(module).__name__} has no parameters named {missing}")
    for name, value in params.items():
        own[name].copy_(value)
