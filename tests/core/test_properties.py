"""Hypothesis: random quadratic bilevel problems (inner dims 1..40, condition numbers up to 1e3)."""

from __future__ import annotations

import itertools

import torch
from conftest import make_quadratic, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from bilevel.linalg import conjugate_gradient, neumann_series

quadratics = st.builds(
    make_quadratic,
    n=st.integers(1, 40),
    m=st.integers(1, 8),
    cond=st.floats(1.0, 1e3),
    seed=st.integers(0, 2**31 - 1),
    direct=st.booleans(),
)
SETTINGS = settings(max_examples=25, deadline=None)


def _point(q, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = {"p": torch.randn(q.B.shape[1], generator=g, dtype=q.A.dtype)}
    return q.solution(h), h


@SETTINGS
@given(quadratics)
def test_cg_exact_within_tol(q):
    theta, h = _point(q)
    n = q.A.shape[0]
    hg, info = bl.AIDCG(iters=5 * n, tol=1e-13).hypergrad(q.problem(), theta, h, None, None, return_info=True)
    assert info.converged and not info.negative_curvature
    assert info.residuals[-1] <= 1e-13 * info.residuals[0]
    assert rel_err(hg, q.exact_hypergrad(h)) <= 1e-7


@SETTINGS
@given(quadratics, st.floats(0.05, 1.0))
def test_neumann_error_shrinks_monotonically(q, frac):
    """For alpha <= 1/L every eigencomponent of the error (I - alpha A)^(K+1) A^-1 b shrinks."""
    alpha = frac / q.L
    b = {"x": q.C.T @ q.s}
    exact = torch.linalg.solve(q.A, b["x"])
    errs = []
    for k in range(0, 60, 6):
        v, res = neumann_series(lambda p: {"x": q.A @ p["x"]}, b, k, alpha)
        assert res.iters == k and not res.diverged
        errs.append(float((v["x"] - exact).norm()))
    assert all(e1 <= e0 * (1 + 1e-12) + 1e-14 for e0, e1 in itertools.pairwise(errs))
    # the hypergradient error is J (v_K - v*) mixed by B^T: not monotone in K (hypothesis found a case), but
    # it vanishes once the series has converged: after 200 terms the solve error is at most rate^201
    theta, h = _point(q)
    ex = q.exact_hypergrad(h)
    rate = 1 - alpha * float(torch.linalg.eigvalsh(q.A).min())
    if rate**201 < 1e-9:
        assert rel_err(bl.AIDFP(iters=200, alpha=alpha).hypergrad(q.problem(), theta, h, None, None), ex) < 1e-5


@SETTINGS
@given(quadratics, st.floats(0.1, 2.0))
def test_lite_equals_fp_with_no_terms(q, frac):
    theta, h = _point(q)
    a = frac / q.L
    lite = bl.get_solver("aid-fp-lite", scale=a).hypergrad(q.problem(), theta, h, None, None)
    fp0 = bl.get_solver("aid-fp", iters=0, alpha=a).hypergrad(q.problem(), theta, h, None, None)
    torch.testing.assert_close(lite, fp0, rtol=1e-14, atol=1e-14)


@SETTINGS
@given(quadratics, st.integers(1, 25), st.floats(0.1, 1.0))
def test_itd_at_solution_equals_fp(q, steps, frac):
    theta, h = _point(q)
    a = frac / q.L
    itd = bl.get_solver("itd", steps=steps, lr=a).hypergrad(q.problem(), theta, h, None, None)
    fp = bl.get_solver("aid-fp", iters=steps - 1, alpha=a).hypergrad(q.problem(), theta, h, None, None)
    scale = max(1.0, max(float(v.abs().max()) for v in fp.values()))
    torch.testing.assert_close(itd, fp, rtol=1e-9, atol=1e-9 * scale)


@SETTINGS
@given(
    st.builds(
        make_quadratic,
        n=st.integers(1, 40),
        m=st.integers(1, 8),
        cond=st.floats(1.0, 100.0),
        seed=st.integers(0, 2**31 - 1),
    ),
    st.sampled_from(["aid-cg", "aid-fp", "aid-fp-lite", "itd", "stocbio"]),
)
def test_float32_agrees_with_float64(q, name):
    """Condition numbers up to 1e2 here: float32 CG on cond 1e3 loses ~cond * eps32 ~ 1e-4 by itself."""
    theta, h = _point(q)
    opts = {
        "aid-cg": {"iters": 200, "tol": 1e-7},
        "aid-fp": {"iters": 20, "alpha": 1 / q.L},
        "stocbio": {"iters": 20, "alpha": 1 / q.L},
        "aid-fp-lite": {"scale": 1 / q.L},
        "itd": {"steps": 20, "lr": 1 / q.L},
    }[name]
    solver = bl.get_solver(name, **opts)
    hg64 = solver.hypergrad(q.problem(), theta, h, None, None)
    q32 = q.to(torch.float32)
    to32 = lambda t: {k: v.float() for k, v in t.items()}  # noqa: E731
    hg32 = solver.hypergrad(q32.problem(), to32(theta), to32(h), None, None)
    assert hg32["p"].dtype == torch.float32
    assert rel_err({"p": hg32["p"].double()}, hg64) <= 1e-4


def test_cg_solver_matches_dense_solve():
    """The shared CG helper on an SPD system given as a matrix (two leaves treated as one vector)."""
    q = make_quadratic(12, 2, 100.0, 3)
    A = q.A
    b = {"a": q.c[:5], "b": q.c[5:]}

    def hvp(p):
        x = torch.cat([p["a"], p["b"]])
        y = A @ x
        return {"a": y[:5], "b": y[5:]}

    v, res = conjugate_gradient(hvp, b, 100, 1e-14)
    torch.testing.assert_close(torch.cat([v["a"], v["b"]]), torch.linalg.solve(A, q.c), rtol=1e-10, atol=1e-12)
    assert res.converged and res.iters <= 30
