"""bilevel: hypergradients for bilevel optimisation in PyTorch.

    min_phi F(phi) = f(theta*(phi), phi),   theta*(phi) = argmin_theta g(theta, phi)

    grad F = grad_phi f - J H^{-1} grad_theta f     (H = d2g/dtheta2, J = d2g/dphi dtheta)

Quick use::

    import bilevel as bl
    problem = bl.BilevelProblem(inner=g, outer=f)
    solver = bl.get_solver("aid-cg", iters=20, tol=1e-10)
    hg = solver.hypergrad(problem, params, hparams, inner_batch, outer_batch)

Solvers: ``"itd"`` (:class:`ITD`), ``"aid-cg"`` (:class:`AIDCG`), ``"aid-fp"`` (:class:`AIDFP`),
``"aid-fp-lite"`` (:class:`AIDFPLite`), ``"stocbio"`` (:class:`StocBiO`).
"""

from .errors import NegativeCurvatureError, NegativeCurvatureWarning, NeumannDivergenceError, NeumannDivergenceWarning
from .functional import FunctionalModule, functional_module, load_params
from .problem import BilevelProblem
from .solvers import AIDCG, AIDFP, ITD, SOLVERS, AIDFPLite, HypergradInfo, Solver, StocBiO, get_solver
from .training import BilevelTrainer, Callback, NonFiniteError, TrainerConfig, mtl_objective, single_task_objective

__version__ = "0.1.0"

__all__ = [
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
    "NegativeCurvatureError",
    "NegativeCurvatureWarning",
    "NeumannDivergenceError",
    "NeumannDivergenceWarning",
    "NonFiniteError",
    "Solver",
    "StocBiO",
    "TrainerConfig",
    "functional_module",
    "get_solver",
    "load_params",
    "mtl_objective",
    "single_task_objective",
]
