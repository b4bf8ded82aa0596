"""The hypergradient solvers, one module each, and :func:`get_solver`.

=============== ============================================== ===========================
name            class                                          module
=============== ============================================== ===========================
``"itd"``       :class:`~bilevel.solvers.itd.ITD`              ``bilevel/solvers/itd.py``
``"aid-cg"``    :class:`~bilevel.solvers.aid_cg.AIDCG`         ``bilevel/solvers/aid_cg.py``
``"aid-fp"``    :class:`~bilevel.solvers.aid_fp.AIDFP`         ``bilevel/solvers/aid_fp.py``
``"aid-fp-lite"`` :class:`~bilevel.solvers.aid_fp_lite.AIDFPLite` ``bilevel/solvers/aid_fp_lite.py``
``"stocbio"``   :class:`~bilevel.solvers.stocbio.StocBiO`      ``bilevel/solvers/stocbio.py``
``"nystrom"``   :class:`~bilevel.solvers.nystrom.Nystrom`      ``bilevel/solvers/nystrom.py``
``"sama"``      :class:`~bilevel.solvers.sama.SAMA`            ``bilevel/solvers/sama.py``
=============== ============================================== ===========================

The AID presets are :class:`~bilevel.solvers.aid.AIDSolver` (the formula
``grad_phi f - J solve(H, grad_theta f)``, ``bilevel/solvers/aid.py``) with a linear solve from
:mod:`bilevel.linalg`; :class:`~bilevel.solvers.aid.AID` takes any linear solve.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .aid import AID, AIDSolver
from .aid_cg import AIDCG
from .aid_fp import AIDFP
from .aid_fp_lite import AIDFPLite
from .base import Call, HypergradInfo, Solver
from .itd import ITD
from .nystrom import Nystrom
from .sama import SAMA
from .stocbio import StocBiO

__all__ = [
    "AID",
    "AIDCG",
    "AIDFP",
    "ITD",
    "SOLVERS",
    "AIDFPLite",
    "AIDSolver",
    "Call",
    "HypergradInfo",
    "Nystrom",
    "SAMA",
    "Solver",
    "StocBiO",
    "get_solver",
]

SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (ITD, AIDCG, AIDFP, AIDFPLite, StocBiO, Nystrom, SAMA)}


def get_solver(name: str, **options: Any) -> Solver:
    """Build a solver by name: ``"itd"``, ``"aid-cg"``, ``"aid-fp"``, ``"aid-fp-lite"``, ``"stocbio"``, ``"nystrom"``,
    ``"sama"``.

    ``options`` are the solver's fields (e.g. ``get_solver("aid-cg", iters=20, tol=1e-10)``).
    Raises ``ValueError`` for an unknown name and ``TypeError`` for an unknown option, listing
    the valid ones.

    Examples:
        >>> import bilevel as bl
        >>> bl.get_solver("aid-cg", iters=20, tol=1e-10)
        AIDCG(iters=20, tol=1e-10, on_negative_curvature='warn', hvp='autograd', mixed='autograd', fd_radius=0.01)
        >>> sorted(bl.SOLVERS)
        ['aid-cg', 'aid-fp', 'aid-fp-lite', 'itd', 'nystrom', 'sama', 'stocbio']
        >>> bl.get_solver("aid-cg", steps=5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        TypeError: solver 'aid-cg' has no option(s) ['steps']; valid options: ['iters', 'tol', ...]
    """
    try:
        cls = SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"solver {name!r} has no option(s) {unknown}; valid options: {valid}")
    return cls(**options)
