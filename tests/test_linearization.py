"""A caller's Linearization passed to an AID solver (``hypergrad(..., linearization=lin)``)."""

from __future__ import annotations

import numpy as np
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
    shared, info = solver.hypergrad(*args, return_info=True, linearization=lin)
    torch.testing.assert_close(shared["lam"], own["lam"], rtol=1e-13, atol=1e-15)
    assert "linearize" in own_info.times and "linearize" not in info.times
    assert info.n_hvp == own_info.n_hvp and info.inner_value == own_info.inner_value
    assert solver._linearization is None  # the caller's graph is not kept


def test_shared_linearization_on_logistic_regression_matches_exact():
    ref = logistic_breast_cancer()
    hp = ref.hparams(-2.0)
    sol = ref.solution(hp)
    lin = Linearization(ref.problem(), sol, hp, ref.inner_batch)
    hg = bl.AIDCG(iters=60, tol=1e-13).hypergrad(
        ref.problem(), sol, hp, ref.inner_batch, ref.outer_batch, linearization=lin
    )
    exact = ref.exact_hypergrad(hp)["lam"]
    assert float((hg["lam"] - exact).norm() / exact.norm()) < 1e-8


def _lin(params=SOL, hparams=HP, batch=None, mode="autograd", reduce=None):
    return Linearization(REF.problem(), params, hparams, REF.inner_batch if batch is None else batch, mode, reduce)


def _call(solver, lin, params=SOL, reduce=None):
    args = (REF.problem(), params, HP, REF.inner_batch, REF.outer_batch)
    return solver.hypergrad(*args, linearization=lin, reduce=reduce)


def test_linearization_errors_name_the_mismatch():
    cg = bl.AIDCG(iters=3)
    with pytest.raises(ValueError, match="itd: linearization= is for the AID solvers"):
        _call(bl.ITD(steps=2), _lin())
    with pytest.raises(TypeError, match=r"must be a bilevel\.products\.Linearization, got dict"):
        _call(cg, {"w": SOL["w"]})
    with pytest.raises(ValueError, match="hvp mode 'rev-rev', this solver uses 'autograd'"):
        _call(cg, _lin(mode="rev-rev"))
    with pytest.raises(ValueError, match="another batch than inner_batch"):
        _call(cg, _lin(batch=(REF.X_tr[:-1], REF.y_tr[:-1])))
    with pytest.raises(ValueError, match="another batch than inner_batch"):
        _call(cg, _lin(batch=(REF.X_tr, REF.y_tr + 1.0)))
    _call(cg, _lin(batch=(REF.X_tr.clone(), REF.y_tr.clone())))  # equal data in other tensors: accepted
    with pytest.raises(ValueError, match=r"other params values \(\['w'\] differ\)"):
        _call(cg, _lin(params=OFF))
    with pytest.raises(ValueError, match="hparams keys"):
        _call(cg, _lin(hparams={**HP, "extra": torch.zeros(2, dtype=HP["lam"].dtype)}))
    with pytest.raises(ValueError, match="another reduce="):
        _call(cg, _lin(), reduce=lambda t: t)
    lin_r = _lin(reduce=(red := lambda t: t))
    _call(cg, lin_r, reduce=red)  # the same reduce: accepted


def test_params_updated_in_place_after_linearising_are_refused():
    params = {"w": SOL["w"].clone()}
    lin = _lin(params=params)
    params["w"].add_(1.0)  # an optimizer step on the same storage
    with pytest.raises(ValueError, match=r"is stale: \['w'\] were updated in place"):
        _call(bl.AIDCG(iters=3), lin, params=params)


def test_batches_are_compared_by_content():
    from bilevel.solvers.base import _same_batch

    x = torch.arange(6.0).reshape(2, 3)
    assert _same_batch((x, {"y": x.clone(), "n": 3}), (x.clone(), {"y": x, "n": 3}))
    assert not _same_batch((x, 1), (x, 2)) and not _same_batch((x,), [x]) and not _same_batch(x, x.double())
    assert _same_batch(np.arange(3), np.arange(3)) and not _same_batch(np.arange(3), np.arange(1, 4))
    assert not _same_batch(np.arange(3), torch.arange(3)) and _same_batch(None, None)
