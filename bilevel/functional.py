"""Use an ``nn.Module`` with the solvers: a params dict and a functional call.

    params, model_fn = bl.functional_module(model)
    def inner(params, hparams, batch):
        x, y = batch
        return loss(model_fn(params, x), y)

``model_fn(params, *args, **kwargs)`` is ``torch.func.functional_call(model, params | buffers,
args, kwargs)``: buffers (e.g. batch-norm statistics) and frozen parameters are passed as
constants, so a model of any size works without hand-written functional code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._tree import Tree

__all__ = ["FunctionalModule", "functional_module", "load_params"]


class FunctionalModule:
    """Callable ``(params, *args, **kwargs) -> module(*args, **kwargs)`` evaluated with ``params``.

    Attributes:
        module: the wrapped module (its own parameters are not read for the keys in ``params``).
        constants: buffers and parameters with ``requires_grad=False``, by name (live references:
            in-place buffer updates such as batch-norm running statistics in train mode touch them).
    """

    def __init__(self, module: nn.Module, constants: dict[str, Tensor]):
        self.module = module
        self.constants = constants

    def __call__(self, params: Tree, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.module, (params, self.constants), args, kwargs, strict=False)

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
    constants.update(dict(module.named_buffers()))
    return params, FunctionalModule(module, constants)


@torch.no_grad()
def load_params(module: nn.Module, params: Tree) -> None:
    """Copy ``params`` (as returned by :func:`functional_module`) into ``module``'s parameters."""
    own = dict(module.named_parameters())
    missing = sorted(set(params) - set(own))
    if missing:
        raise KeyError(f"{type(module).__name__} has no parameters named {missing}")
    for name, value in params.items():
        own[name].copy_(value)
