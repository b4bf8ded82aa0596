"""Resumable positions in the data: the training, meta and HVP-batch streams of :meth:`BilevelTrainer.fit`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..checkpoint import rng_state, set_rng_state

__all__ = ["Cursor", "Stream"]


class Cursor:
    """A resumable position in an iterable of batches: (epoch, batches consumed, RNG state when the
    epoch's iterator was created). Resuming re-creates the iterator under that RNG state and skips
    the consumed batches, so a shuffling ``DataLoader`` yields the same remaining batches."""

    def __init__(self, iterable: Iterable[Any], name: str, cycle: bool):
        self.iterable, self.name, self.cycle = iterable, name, cycle
        self.epoch, self.index = 0, 0
        self._it: Iterator[Any] | None = None
        self._rng: dict[str, Any] | None = None

    def _start(self) -> None:
        sampler = getattr(self.iterable, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        self._rng = rng_state()
        self._it = iter(self.iterable)
        self.index = 0

    @property
    def in_pass(self) -> bool:
        """A pass over the iterable is under way (False before the first batch and after the last)."""
        return self._it is not None

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                empty = self.index == 0
                self._it, self.epoch = None, self.epoch + 1
                if empty:
                    raise ValueError(f"the {self.name} data is empty") from None
                if not self.cycle:
                    raise
                continue
            self.index += 1
            return batch
        raise AssertionError("unreachable")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rng": self._rng if self._it is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._it, self._rng = int(state["epoch"]), 0, None, None
        if state["rng"] is not None:
            set_rng_state(state["rng"])
            self._start()
            for _ in range(int(state["index"])):
                next(self._it)  # type: ignore[arg-type]
            self.index = int(state["index"])


class Stream:
    """An endless iterator over a cycling cursor (the fresh HVP batches a solver draws, ``hvp_batches=``)."""

    def __init__(self, cursor: Cursor):
        self.cursor = cursor

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        return self.cursor.next()
