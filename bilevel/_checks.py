"""Option checks shared by the solvers, the linear solves and the trainer: one message style."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_choice", "check_int", "check_positive", "check_unit_interval"]


def check_int(name: str, value: Any, minimum: int) -> None:
    """``value`` is an ``int`` (not a bool) ``>= minimum``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """``value`` is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    """``value`` is a real number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
