"""A caller's Linearization given to an AID solver: ``solver.hypergrad_at(lin, outer_batch)``."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.products import Linearization
from bilevel.testing import logistic_breast_cancer, ridge_synthetic

REF = ridge_synthetic(d=20, n=200)
HP = REF.hparams(-1.0)
MU, L = REF.curvature(HP)
SOL = REF.solution(HP)
# off the minimiser too: the AID formulas are evaluated wherever they are asked, shared or not
_NOISE = torch.randn(SOL["w"].shape, generator=torch.Generator().manual_seed(0), dtype=SOL["w"].dtype)
OFF = {"w": SOL["w"] + 0.1 * _NOISE}

AID = {
    "aid-cg": {"iters": 15, "tol": 1e-14},
    "aid-fp": {"iters": 15, "alpha": 1 / L},
    "aid-fp-lite": {"scale": 0.5},
    "stocbio": {"iters": 15, "alpha": 1 / L},
}


@pytest.mark.parametrize("mode", ["autograd", "rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name", sorted(AID))
@pytest.mark.parametrize("point", ["solution", "off"])
def test_shared_linearization_gives_the_same_hypergradient(name, mode, point):
    params = SOL if point == "solution" else OFF
    solver = bl.get_solver(name, hvp=mode, **AID[name])
    args = (REF.problem(), params, HP, REF.inner_batch, REF.outer_batch)
    own, own_info = solver.hypergrad(*args, return_info=True)
    lin = Linearization(REF.problem(), params, HP, REF.inner_batch, mode)
    shared, info = solver.hypergrad_at(lin, REF.outer_batch, return_info=True)
    torch.testing.assert_close(shared["lam"], own["lam"], rtol=1e-13, atol=1e-15)
    assert "linearize" in own_info.times and "linearize" not in info.times
    assert info.n_hvp == own_info.n_hvp and info.inner_value == own_info.inner_value
    assert not [k for k, v in vars(solver).items() if isinstance(v, Linearization)]  # the graph is not kept


def test_shared_linearization_on_logistic_regression_matches_exact():
    ref = logistic_breast_cancer()
    hp = ref.hparams(-2.0)
    sol = ref.solution(hp)
    lin = Linearization(ref.problem(), sol, hp, ref.inner_batch)
    hg = bl.AIDCG(iters=60, tol=1e-13).hypergrad_at(lin, ref.outer_batch)
    exact = ref.exact_hypergrad(hp)["lam"]
    assert float((hg["lam"] - exact).norm() / exact.norm()) < 1e-8


def _lin(params=SOL, hparams=HP, mode="autograd", reduce=None):
    return Linearization(REF.problem(), params, hparams, REF.inner_batch, mode, reduce)


def test_the_linearisation_supplies_point_mode_and_reduce():
    """Nothing is re-derived or re-checked: the point, the products' mode and reduce are ``lin``'s."""
    cg = bl.AIDCG(iters=15, tol=1e-14)  # hvp="autograd"
    for mode in ("rev-rev", "fwd-rev"):
        want = bl.AIDCG(iters=15, tol=1e-14, hvp=mode).hypergrad(
            REF.problem(), OFF, HP, REF.inner_batch, REF.outer_batch
        )
        torch.testing.assert_close(cg.hypergrad_at(_lin(params=OFF, mode=mode), REF.outer_batch)["lam"], want["lam"])
    calls = []

    def reduce(tree):
        calls.append(sorted(tree))
        return {k: 2.0 * v for k, v in tree.items()}  # not a mean: visible in the result

    lite = bl.AIDFPLite(scale=0.5)
    doubled = lite.hypergrad_at(_lin(reduce=reduce), REF.outer_batch)
    plain = lite.hypergrad(REF.problem(), SOL, HP, REF.inner_batch, REF.outer_batch, reduce=reduce)
    torch.testing.assert_close(doubled["lam"], plain["lam"], rtol=1e-13, atol=0)
    assert calls.count(["w"]) == 2 and calls.count(["lam"]) == 4  # grad_theta f; grad_phi f, J v (twice each)


def test_bad_linearisations_are_refused_with_a_message():
    with pytest.raises(TypeError, match=r"aid-cg: lin must be a bilevel\.Linearization, got dict"):
        bl.AIDCG(iters=3).hypergrad_at({"w": SOL["w"]}, REF.outer_batch)
    assert not hasattr(bl.ITD(), "hypergrad_at")  # ITD does not linearise g
    with pytest.raises(TypeError, match="linearization"):
        bl.AIDCG(iters=3).hypergrad(REF.problem(), SOL, HP, REF.inner_batch, REF.outer_batch, linearization=_lin())
    with pytest.raises(ValueError, match=r"hvp_batches= is for solvers that draw fresh HVP batches"):
        bl.AIDCG(iters=3).hypergrad_at(_lin(), REF.outer_batch, hvp_batches=iter([REF.inner_batch]))


def test_params_updated_in_place_after_linearising_are_refused():
    params = {"w": SOL["w"].clone()}
    lin = _lin(params=params)
    params["w"].add_(1.0)  # an optimizer step on the same storage
    with pytest.raises(ValueError, match=r"is stale: \['w'\] were updated in place"):
        bl.AIDCG(iters=3).hypergrad_at(lin, REF.outer_batch)


def test_stocbio_draws_its_products_from_the_calls_batches():
    X, y = REF.inner_batch
    quarters = [(X[i::4], y[i::4]) for i in range(4)]
    solver = bl.StocBiO(iters=6, alpha=1 / L)
    own = bl.StocBiO(iters=6, alpha=1 / L, batches=quarters).hypergrad(
        REF.problem(), SOL, HP, REF.inner_batch, REF.outer_batch
    )
    given = solver.hypergrad_at(_lin(), REF.outer_batch, hvp_batches=iter(quarters * 2))
    torch.testing.assert_close(given["lam"], own["lam"], rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"the HVP batches ran out after 3 product\(s\)"):
        solver.hypergrad_at(_lin(), REF.outer_batch, hvp_batches=iter(quarters[:3]))
