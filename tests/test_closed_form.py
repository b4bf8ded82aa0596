"""Every solver against exact hypergradients (float64) on problems with a known answer."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import bilevel as bl


def _solvers_for(P, hparams):
    _, L = P.curvature(hparams)
    a = 1.0 / L
    return {
        "aid-cg": (bl.get_solver("aid-cg", iters=400, tol=1e-14), 1e-8),
        "aid-fp": (bl.get_solver("aid-fp", iters=4000, alpha=a), 1e-8),
        "stocbio": (bl.get_solver("stocbio", iters=4000, alpha=a), 1e-8),
        "itd": (bl.get_solver("itd", steps=4000, lr=a), 1e-6),
    }


def _hparams(P, seed):
    g = torch.Generator().manual_seed(seed)
    return {"lam": -2.0 + 0.5 * torch.randn(P.dim, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "stocbio", "itd"])
@pytest.mark.parametrize("which", ["diabetes", "synthetic200", "breast_cancer"])
def test_converges_to_exact(name, which, request):
    P = request.getfixturevalue(which)
    h = _hparams(P, 1)
    if which == "synthetic200" and name in ("aid-fp", "stocbio", "itd"):
        mu, L = P.curvature(h)
        assert L / mu < 50  # keeps the 4000-term budget sufficient
    solver, tol = _solvers_for(P, h)[name]
    theta = P.solution(h)
    hg, info = solver.hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch, return_info=True)
    exact = P.exact_hypergrad(h)
    assert hg.keys() == exact.keys() and hg["lam"].shape == exact["lam"].shape
    assert hg["lam"].dtype == torch.float64
    assert rel_err(hg, exact) <= tol, (name, rel_err(hg, exact), info)
    if name == "aid-cg":
        assert info.converged and info.iters <= P.dim + 5


def test_aid_fp_lite_is_its_formula(diabetes):
    """-scale * J grad_theta f with J = diag(exp(lam) w)."""
    P = diabetes
    h = _hparams(P, 2)
    theta = P.solution(h)
    w = theta["w"]
    X, y = P.outer_batch
    f_w = X.T @ (X @ w - y) / X.shape[0]
    hg = bl.get_solver("aid-fp-lite", scale=0.7).hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch)
    torch.testing.assert_close(hg["lam"], -0.7 * h["lam"].exp() * w * f_w, rtol=1e-13, atol=0)
    # biased: far from the exact hypergradient on this problem
    assert rel_err(hg, P.exact_hypergrad(h)) > 1e-2


def _fd_hypergrad(P, h, eps=1e-5):
    lam = h["lam"]
    out = torch.empty_like(lam)
    for i in range(lam.numel()):
        d = torch.zeros_like(lam)
        d[i] = eps
        out[i] = (P.hyperobjective({"lam": lam + d}) - P.hyperobjective({"lam": lam - d})) / (2 * eps)
    return {"lam": out}


def test_logistic_ift_matches_finite_differences(breast_cancer):
    """The explicit-Hessian IFT reference itself agrees with central differences of F (Newton inner)."""
    P = breast_cancer
    h = _hparams(P, 3)
    assert rel_err(P.exact_hypergrad(h), _fd_hypergrad(P, h)) < 1e-6


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "itd"])
def test_logistic_solvers_match_finite_differences(breast_cancer, name):
    P = breast_cancer
    h = _hparams(P, 3)
    solver, _ = _solvers_for(P, h)[name]
    hg = solver.hypergrad(P.problem(), P.solution(h), h, P.inner_batch, P.outer_batch)
    assert rel_err(hg, _fd_hypergrad(P, h)) < 1e-6


def test_hvp_modes_agree(breast_cancer):
    P = breast_cancer
    h = _hparams(P, 4)
    theta = P.solution(h)
    a, ia = bl.AIDCG(iters=10, hvp="rev-rev").hypergrad(
        P.problem(), theta, h, P.inner_batch, P.outer_batch, return_info=True
    )
    b, ib = bl.AIDCG(iters=10, hvp="fwd-rev").hypergrad(
        P.problem(), theta, h, P.inner_batch, P.outer_batch, return_info=True
    )
    assert ia.n_hvp == ib.n_hvp == 10
    assert rel_err(a, b) < 1e-12


def test_stocbio_minibatches(diabetes):
    """Each Neumann term uses the next batch; full-data batches reproduce AID-FP exactly."""
    P = diabetes
    h = _hparams(P, 5)
    theta = P.solution(h)
    _, L = P.curvature(h)
    fp = bl.AIDFP(iters=30, alpha=1 / L).hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch)
    full = [P.inner_batch] * 7  # re-iterated when exhausted
    s = bl.StocBiO(iters=30, alpha=1 / L, batches=full)
    hg, info = s.hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch, return_info=True)
    assert info.n_hvp == 30
    torch.testing.assert_close(hg["lam"], fp["lam"], rtol=1e-13, atol=1e-16)
    X, y = P.inner_batch
    halves = [(X[::2], y[::2]), (X[1::2], y[1::2])]
    hs = bl.StocBiO(iters=30, alpha=1 / L, batches=halves).hypergrad(
        P.problem(), theta, h, P.inner_batch, P.outer_batch
    )
    err = rel_err(hs, P.exact_hypergrad(h))
    assert 1e-6 < err < 0.5  # stochastic: different from the exact answer, but close


def test_no_side_effects(diabetes):
    """Inputs are not modified, no .grad is written, the result has no autograd history."""
    P = diabetes
    h0 = _hparams(P, 6)
    w = torch.nn.Parameter(P.solution(h0)["w"].clone())
    lam = torch.nn.Parameter(h0["lam"].clone())
    w_before, lam_before = w.detach().clone(), lam.detach().clone()
    for name in bl.SOLVERS:
        hg = bl.get_solver(name).hypergrad(P.problem(), {"w": w}, {"lam": lam}, P.inner_batch, P.outer_batch)
        assert hg["lam"].grad_fn is None and not hg["lam"].requires_grad
    assert w.grad is None and lam.grad is None
    assert torch.equal(w.detach(), w_before) and torch.equal(lam.detach(), lam_before)


@pytest.mark.parametrize("name", sorted(bl.SOLVERS))
def test_unused_hparams_give_exact_zeros(name):
    """f without direct dependence on hparams (MELTR's case) and a hparam that reaches no loss."""

    def g(p, h, b):
        return 0.5 * ((p["w"] - h["target"]) ** 2).sum() + 0.5 * (p["w"] ** 2).sum()

    def f(p, h, b):
        return ((p["w"] - 1.0) ** 2).sum()

    h = {"target": torch.tensor([0.5, -1.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    w = {"w": h["target"] / 2}  # argmin of g
    hg = bl.get_solver(name).hypergrad(bl.BilevelProblem(g, f), w, h, None, None)
    assert torch.equal(hg["unused"], torch.zeros(3, dtype=torch.float64))
    assert hg["target"].abs().sum() > 0
    if name == "aid-cg":  # H = 2 I, J = -I:  dF/dtarget = 1/2 * 2 (w - 1) = w - 1
        torch.testing.assert_close(hg["target"], w["w"] - 1.0)
