"""Nyström (issue 16, item 1): ``bilevel.linalg.nystrom`` and the ``bl.Nystrom`` preset.

The reference problems of ``bilevel.testing`` give exact hypergradients; the Hessians are formed here (and
only here) to check the products-only implementation against the dense formulas.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import bilevel as bl
from bilevel import linalg, testing
from bilevel.products import Linearization

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=["ridge-diabetes", "logistic-cancer"])
def case(request):
    ref = testing.ridge_diabetes() if request.param == "ridge-diabetes" else testing.logistic_breast_cancer()
    hp = ref.hparams(-2.0)
    params = ref.solution(hp)
    H = ref.hessian_at(params["w"], hp["lam"]) if hasattr(ref, "hessian_at") else ref.hessian(hp["lam"])
    args = (ref.problem(), params, hp, ref.inner_batch, ref.outer_batch)
    return ref, hp, params, H, args, ref.exact_hypergrad(hp)["lam"]


@pytest.mark.parametrize("probes", ["gaussian", "coordinates"])
def test_exact_at_full_rank_and_tiny_rho(case, probes):
    ref, hp, params, H, args, exact = case  # noqa: RUF059
    hg, info = bl.Nystrom(rank=ref.dim, rho=1e-12, probes=probes).hypergrad(*args, return_info=True)
    assert _rel(hg["lam"], exact) <= 1e-8
    assert info.n_hvp == info.iters == ref.dim and info.converged is None and info.solver == "nystrom"


def test_solve_equals_the_dense_formula(case):
    """``(Y W^+ Y^T + rho I)^{-1} b`` with the same probes, formed densely, for several ranks and rhos."""
    ref, hp, params, H, args, exact = case  # noqa: RUF059
    lin = Linearization(ref.problem(), params, hp, ref.inner_batch)
    b = {"w": torch.randn(ref.dim, dtype=F64, generator=torch.Generator().manual_seed(1))}
    for rank in (1, ref.dim // 2):
        for rho in (1e-3, 10.0):
            for probes in ("gaussian", "coordinates"):
                omega = linalg.nystrom_probes(ref.dim, rank, 7, probes, F64, torch.device("cpu"))
                Y = H @ omega
                Hk = Y @ torch.linalg.pinv(omega.T @ Y) @ Y.T
                want = torch.linalg.solve(Hk + rho * torch.eye(ref.dim, dtype=F64), b["w"])
                got, res = linalg.nystrom(rank, rho, seed=7, probes=probes)(lin.hvp, b)
                assert _rel(got["w"], want) <= 1e-9, (rank, rho, probes)
                assert res.iters == rank and not res.negative_curvature


def test_equals_hataya_yamada_woodbury_form(case):
    """Their ``hypergrad.approx_hypergrad.nystrom``: ``C`` = ``rank`` rows of ``H`` at random coordinates,
    ``M = C[:, idx]``, ``x = v / rho - C^T (M + C C^T / rho)^{-1} C v / rho^2``."""
    ref, hp, params, H, args, exact = case  # noqa: RUF059
    lin = Linearization(ref.problem(), params, hp, ref.inner_batch)
    v = torch.randn(ref.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    rank, rho = 4, 0.5
    idx = torch.randperm(ref.dim, generator=torch.Generator().manual_seed(3))[:rank]
    C = H[idx]
    M = C[:, idx]
    want = v / rho - C.T @ torch.linalg.solve(M + C @ C.T / rho, C @ v) / rho**2
    got, _ = linalg.nystrom(rank, rho, seed=3, probes="coordinates")(lin.hvp, {"w": v})
    assert _rel(got["w"], want) <= 1e-10


def test_sketch_error_falls_with_rank_and_hypergradient_error_with_full_rank(case):
    """``H - H_k`` is PSD and shrinks (spectral norm) as nested probes grow, to 0 at ``rank = d``; the
    hypergradient error at ``rank = d`` is far below rank 1's (at fixed ``rho = mu``: between them it
    need not fall monotonically on these flat spectra, see docs/results.md)."""
    ref, hp, params, H, args, exact = case
    lin = Linearization(ref.problem(), params, hp, ref.inner_batch)
    like = {"w": params["w"]}
    errs = []
    for rank in sorted({1, 2, 3, 5, 8, ref.dim // 2, ref.dim - 1, ref.dim}):
        U, lam, _ = linalg.nystrom_sketch(lin.hvp, like, rank, seed=0)
        E = H - U @ torch.diag(lam) @ U.T
        assert float(torch.linalg.eigvalsh(E)[0]) >= -1e-10 * float(H.norm())  # H_k <= H
        errs.append(float(torch.linalg.matrix_norm(E, 2)))
    assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] <= 1e-10 * float(torch.linalg.matrix_norm(H, 2)) < errs[0]
    mu, _ = ref.curvature(hp)
    e1 = _rel(bl.Nystrom(rank=1, rho=mu).hypergrad(*args)["lam"], exact)
    ed = _rel(bl.Nystrom(rank=ref.dim, rho=mu).hypergrad(*args)["lam"], exact)
    assert ed < 0.6 * e1 and ed <= 0.55  # at full rank only the bias of rho = mu is left (<= 1/2 per direction)


def test_cost_is_rank_products():
    ref = testing.ridge_synthetic(d=40)
    hp = ref.hparams(-2.0)
    lin = Linearization(ref.problem(), ref.solution(hp), hp, ref.inner_batch)
    calls = []

    def counting(p):
        calls.append(1)
        return lin.hvp(p)

    _, res = linalg.nystrom(7, 0.1)(counting, {"w": torch.ones(40, dtype=F64)})
    assert len(calls) == res.iters == 7
    args = (ref.problem(), ref.solution(hp), hp, ref.inner_batch, ref.outer_batch)
    _, info = bl.get_solver("nystrom", rank=7, rho=0.1).hypergrad(*args, return_info=True)
    assert info.n_hvp == 7 and info.v is not None and info.v["w"].shape == (40,)


def test_deterministic_given_seed():
    ref = testing.ridge_synthetic(d=30)
    hp = ref.hparams(-2.0)
    args = (ref.problem(), ref.solution(hp), hp, ref.inner_batch, ref.outer_batch)
    a = bl.Nystrom(rank=5, seed=3).hypergrad(*args)["lam"]
    b = bl.Nystrom(rank=5, seed=3).hypergrad(*args)["lam"]
    c = bl.Nystrom(rank=5, seed=4).hypergrad(*args)["lam"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d1 = bl.Nystrom(rank=5, seed=None).hypergrad(*args)["lam"]
    d2 = bl.Nystrom(rank=5, seed=None).hypergrad(*args)["lam"]  # fresh probes from the global generator
    torch.manual_seed(0)
    d3 = bl.Nystrom(rank=5, seed=None).hypergrad(*args)["lam"]
    assert torch.equal(d1, d3) and not torch.equal(d1, d2)


def test_float32():
    ref = testing.ridge_diabetes(dtype=torch.float32)
    hp = ref.hparams(-2.0)
    args = (ref.problem(), ref.solution(hp), hp, ref.inner_batch, ref.outer_batch)
    exact = testing.ridge_diabetes().exact_hypergrad(testing.ridge_diabetes().hparams(-2.0))["lam"]
    hg, info = bl.Nystrom(rank=10, rho=1e-6).hypergrad(*args, return_info=True)
    assert hg["lam"].dtype == torch.float32 and info.n_hvp == 10
    assert _rel(hg["lam"].double(), exact) < 1e-3  # float32 rounding (kappa ~ 31) plus rho / mu ~ 1e-5


def test_multi_leaf_trees():
    """Probes are cut into trees like b (leaves of several shapes); the result matches the dense solve."""
    A = torch.randn(10, 10, dtype=F64, generator=torch.Generator().manual_seed(0))
    H = A @ A.T + torch.eye(10, dtype=F64)

    def hvp(p):
        x = H @ torch.cat([p["a"].reshape(-1), p["b"]])
        return {"a": x[:6].reshape(2, 3), "b": x[6:]}

    b = {"a": torch.ones(2, 3, dtype=F64), "b": torch.arange(4.0, dtype=F64)}
    x, _ = linalg.nystrom(10, 1e-12)(hvp, b)
    want = torch.linalg.solve(H, torch.cat([b["a"].reshape(-1), b["b"]]))
    assert x["a"].shape == (2, 3) and _rel(torch.cat([x["a"].reshape(-1), x["b"]]), want) <= 1e-9


def test_bad_options_and_rank_above_dimension():
    for bad in ({"rank": 0}, {"rank": 2.5}, {"rank": True}, {"rho": 0.0}, {"rho": -1.0}, {"rho": float("nan")},
                {"seed": -1}, {"probes": "rademacher"}, {"on_negative_curvature": "maybe"}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            bl.get_solver("nystrom", **bad)
    ref = testing.ridge_diabetes()
    hp = ref.hparams(-2.0)
    args = (ref.problem(), ref.solution(hp), hp, ref.inner_batch, ref.outer_batch)
    with pytest.raises(ValueError, match=r"rank=11 is larger than the parameter dimension d=10"):
        bl.Nystrom(rank=11).hypergrad(*args)
    assert "nystrom" in bl.SOLVERS and isinstance(bl.get_solver("nystrom"), bl.Nystrom)


def test_negative_curvature_policies():
    D = torch.tensor([2.0, -1.0, 1.0], dtype=F64)
    b = {"w": torch.tensor([1.0, 1.0, 1.0], dtype=F64)}

    def hvp(p):
        return {"w": D * p["w"]}

    with pytest.raises(bl.NegativeCurvatureError, match="negative eigenvalue"):
        linalg.nystrom(3, 0.1, on_negative_curvature="raise")(hvp, b)
    with pytest.warns(bl.NegativeCurvatureWarning):
        linalg.nystrom(3, 0.1, on_negative_curvature="warn")(hvp, b)
    x, res = linalg.nystrom(3, 0.1, on_negative_curvature="ignore")(hvp, b)
    assert res.negative_curvature  # the PSD part diag(2, 0, 1) is inverted: x = b / (max(D, 0) + rho)
    torch.testing.assert_close(x["w"], b["w"] / (D.clamp(min=0) + 0.1), rtol=1e-10, atol=1e-12)
