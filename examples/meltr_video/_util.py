"""A helper shared by the MELTR example's modules: a thread-count scope. (Atomic file writes are
:func:`bilevel.checkpoint.atomic_write`.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["num_threads"]


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (nothing when ``n`` is None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
