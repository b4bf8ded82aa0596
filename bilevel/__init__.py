"""bilevel: hypergradients for bilevel optimisation in PyTorch.

    min_phi F(phi) = f(theta*(phi), phi),   theta*(phi) = argmin_theta g(theta, phi)

    grad F = grad_phi f - J H^{-1} grad_theta f     (H = d2g/dtheta2, J = d2g/dphi dtheta)

Quick use::

    import bilevel as bl
    problem = bl.BilevelProblem(inner=g, outer=f)
    solver = bl.get_solver("aid-cg", iters=20, tol=1e-10)
    hg = solver.hypergrad(problem, params, hparams, inner_batch, outer_batch)

Solvers: ``"itd"`` (:class:`ITD`), ``"aid-cg"`` (:class:`AIDCG`), ``"aid-fp"`` (:class:`AIDFP`),
``"aid-fp-lite"`` (:class:`AIDFPLite`), ``"stocbio"`` (:class:`StocBiO`), ``"nystrom"`` (:class:`Nystrom`),
``"sama"`` (:class:`SAMA`).
The AID presets are one formula with a linear solve from :mod:`bilevel.linalg` (``cg``, ``neumann``,
``nystrom``, ``identity``);
:class:`AID` takes any. A caller's :class:`Linearization` of ``g`` (e.g. the one its inner step
made) serves an AID hypergradient directly: ``solver.hypergrad_at(lin, outer_batch)``.
"""

from . import linalg
from .errors import (
    ITDDivergenceError,
    ITDDivergenceWarning,
    NegativeCurvatureError,
    NegativeCurvatureWarning,
    NeumannDivergenceError,
    NeumannDivergenceWarning,
)
from .functional import FunctionalModule, functional_module, load_params
from .problem import BilevelProblem
from .products import Linearization
from .solvers import (
    AID,
    AIDCG,
    AIDFP,
    ITD,
    SAMA,
    SOLVERS,
    AIDFPLite,
    HypergradInfo,
    Nystrom,
    Solver,
    StocBiO,
    get_solver,
)
from .training import BilevelTrainer, Callback, NonFiniteError, TrainerConfig, mtl_objective, single_task_objective

__version__ = "0.1.0"

__all__ = [
    "AID",
    "AIDCG",
    "AIDFP",
    "ITD",
    "SOLVERS",
    "AIDFPLite",
    "BilevelProblem",
    "BilevelTrainer",
    "Callback",
    "FunctionalModule",
    "HypergradInfo",
    "ITDDivergenceError",
    "ITDDivergenceWarning",
    "Linearization",
    "NegativeCurvatureError",
    "NegativeCurvatureWarning",
    "NeumannDivergenceError",
    "NeumannDivergenceWarning",
    "NonFiniteError",
    "Nystrom",
    "SAMA",
    "Solver",
    "StocBiO",
    "TrainerConfig",
    "functional_module",
    "get_solver",
    "linalg",
    "load_params",
    "mtl_objective",
    "single_task_objective",
]
