"""Exceptions and warnings raised by :mod:`bilevel`.

Every error names the function (``inner`` objective ``g`` or ``outer`` objective ``f``) and the
stage of the computation where the problem was met, so that a wrong number is never returned
silently.
"""

from __future__ import annotations

__all__ = [
    "ITDDivergenceError",
    "ITDDivergenceWarning",
    "NegativeCurvatureError",
    "NegativeCurvatureWarning",
    "NeumannDivergenceError",
    "NeumannDivergenceWarning",
]


class NegativeCurvatureError(ArithmeticError):
    """Conjugate gradient met a direction ``p`` with ``p^T H p <= 0``.

    The inner Hessian is not positive definite at the given ``params``: they are not at a strict
    local minimum of the inner objective, and the implicit-function-theorem hypergradient is not
    defined by a positive-definite system there.
    """


class NegativeCurvatureWarning(RuntimeWarning):
    """Warning form of :class:`NegativeCurvatureError` (policy ``on_negative_curvature="warn"``)."""


class NeumannDivergenceError(FloatingPointError):
    """The Neumann series ``sum_j (I - alpha H)^j b`` grows instead of shrinking.

    It converges only when ``||I - alpha H|| < 1``, i.e. ``0 < alpha < 2 / L`` with ``L`` the
    largest eigenvalue of the inner Hessian ``H`` (and ``H`` positive definite). Lower ``alpha``.
    """


class NeumannDivergenceWarning(RuntimeWarning):
    """Warning form of :class:`NeumannDivergenceError` (policy ``on_divergence="warn"``)."""


class ITDDivergenceError(FloatingPointError):
    """ITD's unrolled inner steps diverge: their derivative (or the iterates themselves) blow up.

    Raised by :class:`~bilevel.ITD` when the adjoint ``dF/dtheta_t`` of an unrolled iterate grows past
    ``divergence_factor`` times ``||grad_theta f(theta_T)||`` going back through the steps (SGD and
    momentum: their steps are stable only for ``lr < 2 / L``, resp. ``lr < 2 (1 + momentum) / L``, with
    ``L`` the largest eigenvalue of the inner Hessian), or when the inner objective or an adjoint is
    non-finite after the first step. Lower ``lr``.
    """


class ITDDivergenceWarning(RuntimeWarning):
    """Warning form of :class:`ITDDivergenceError` (policy ``on_divergence="warn"``)."""
