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


@pytest.fixture(scope="module")
def logistic_fd(breast_cancer):
    h = _hparams(breast_cancer, 3)
    return h, _fd_hypergrad(breast_cancer, h)


def test_logistic_ift_matches_finite_differences(breast_cancer, logistic_fd):
    """The explicit-Hessian IFT reference itself agrees with central differences of F (Newton inner)."""
    h, fd = logistic_fd
    assert rel_err(breast_cancer.exact_hypergrad(h), fd) < 1e-6


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "itd"])
def test_logistic_solvers_match_finite_differences(breast_cancer, logistic_fd, name):
    P = breast_cancer
    h, fd = logistic_fd
    solver, _ = _solvers_for(P, h)[name]
    hg = solver.hypergrad(P.problem(), P.solution(h), h, P.inner_batch, P.outer_batch)
    assert rel_err(hg, fd) < 1e-6


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "aid-fp-lite", "stocbio"])
def test_hvp_modes_agree(breast_cancer, name):
    P = breast_cancer
    h = _hparams(P, 4)
    theta = P.solution(h)
    opts = {"aid-fp-lite": {}}.get(name, {"iters": 10})
    out = {}
    for mode in ("rev-rev", "autograd", "fwd-rev"):
        solver = bl.get_solver(name, hvp=mode, **opts)
        out[mode], info = solver.hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch, return_info=True)
        assert info.n_hvp == opts.get("iters", 0)
    assert rel_err(out["autograd"], out["rev-rev"]) < 1e-12
    assert rel_err(out["fwd-rev"], out["rev-rev"]) < 1e-12


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


@pytest.mark.parametrize("name", [*sorted(bl.SOLVERS), "aid-cg:autograd", "aid-fp-lite:autograd"])
def test_unused_hparams_give_exact_zeros(name):
    """f without direct dependence on hparams (MELTR's case) and a hparam that reaches no loss."""

    def g(p, h, b):
        return 0.5 * ((p["w"] - h["target"]) ** 2).sum() + 0.5 * (p["w"] ** 2).sum()

    def f(p, h, b):
        return ((p["w"] - 1.0) ** 2).sum()

    h = {"target": torch.tensor([0.5, -1.0], dtype=torch.float64), "unused": torch.ones(3, dtype=torch.float64)}
    w = {"w": h["target"] / 2}  # argmin of g
    name, _, mode = name.partition(":")
    rank = {"rank": 2} if name == "nystrom" else {}  # at most the 2 parameters
    solver = bl.get_solver(name, **({"hvp": mode} if mode else {}), **rank)
    hg = solver.hypergrad(bl.BilevelProblem(g, f), w, h, None, None)
    assert torch.equal(hg["unused"], torch.zeros(3, dtype=torch.float64))
    assert hg["target"].abs().sum() > 0
    if name == "aid-cg":  # H = 2 I, J = -I:  dF/dtarget = 1/2 * 2 (w - 1) = w - 1
        torch.testing.assert_close(hg["target"], w["w"] - 1.0)
