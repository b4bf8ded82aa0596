"""Atomic checkpoint files and the random-number-generator state they carry.

    save_checkpoint(state, path)      # atomic: temp file in the same folder, flush + fsync, os.replace, fsync folder
    state = load_checkpoint(path)     # torch.load(..., weights_only=True); clear error for a broken or foreign file
    atomic_write(path, write)         # the same atomic write for any content: write(fh) fills a binary file

A crash (even SIGKILL or a power cut after the rename) at any moment of :func:`save_checkpoint` leaves
either the previous complete file or the new complete file at ``path``, never a truncated one.
The state must consist of tensors, numbers, strings, ``None`` and lists/tuples/dicts of these (what
``weights_only=True`` accepts): :func:`rng_state` stores numpy's generator as a tensor for that reason.
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

#: marker stored in every trainer checkpoint (key ``"format"``), checked on load
FORMAT = "bilevel.trainer/1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, not a torch file, unsafe to load, or not a trainer checkpoint."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` with :func:`torch.save`, atomically (:func:`atomic_write`).
    Returns ``path`` as a :class:`~pathlib.Path`."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """``write(fh)`` into a binary file that replaces ``path`` atomically.

    The data go to a temporary file in the same folder, which is flushed and ``fsync``-ed, then
    renamed over ``path`` with :func:`os.replace` (atomic on POSIX and Windows), and the folder is
    ``fsync``-ed so that the rename itself is durable. On any error the temporary file is removed
    and ``path`` is untouched. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu", *, expect_format: str | None = None
) -> dict[str, Any]:
    """Load a file written by :func:`save_checkpoint` with ``torch.load(..., weights_only=True)``.

    Args:
        path: the file.
        map_location: passed to :func:`torch.load` (default: everything on the CPU).
        expect_format: when given, the loaded dict must carry ``state["format"] == expect_format``.

    Raises:
        CheckpointError: naming ``path``, when the file is missing, empty, truncated, fails the
            zip archive's CRC-32 check (a bit flipped after writing), is not a torch file, holds
            objects that ``weights_only`` refuses (a foreign pickle), is not a dict, or has another
            format marker.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    _check_integrity(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zipfile / pickle / unpickler errors differ between torch versions
        raise CheckpointError(
            f"cannot load checkpoint {str(path)!r}: the file is truncated, corrupt, or not a weights-only torch "
            f"file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    if expect_format is not None and state.get("format") != expect_format:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a {expect_format!r} checkpoint (format marker: {state.get('format')!r})"
        )
    return state


def _check_integrity(path: Path) -> None:
    """Refuse a torch zip file whose members fail their CRC-32 (``torch.load`` does not check it: a flipped
    bit inside a tensor would load as a wrong number). Files that are not zip archives are left to
    ``torch.load`` (legacy format; it refuses what it cannot read)."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is a corrupt zip archive ({exc})") from exc
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt: member {bad!r} fails its CRC-32 check (the file was altered "
            "after it was written); it was not loaded"
        )


def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global generator, torch's CPU generator and (when
    CUDA is initialised) every CUDA generator, in a form that ``weights_only=True`` can load."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
