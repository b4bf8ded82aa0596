"""Two small helpers shared by the MELTR example's modules: atomic file writes and a thread-count scope."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["atomic_write", "num_threads"]


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto ``path`` (atomic);
    on any error the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
