"""Neumann divergence tests every k terms (issue 15 item 3): the same result as checking every term, bit for
bit, whether the series converges or diverges (the sum before the first divergent term), and for a
stochastic matvec; one host synchronisation per k terms."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.linalg import neumann_series
from bilevel.testing import ridge_synthetic

F64 = torch.float64


def _spd(d: int = 6, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=F64)
    return M @ M.T / d + 0.1 * torch.eye(d, dtype=F64), {"x": torch.randn(d, generator=g, dtype=F64)}


def _matvec(H):
    return lambda p: {"x": H @ p["x"]}


@pytest.mark.parametrize("k", [2, 3, 7, 50])
@pytest.mark.parametrize("iters", [0, 1, 5, 20])
def test_converging_series_equals_checking_every_term(k, iters):
    H, b = _spd()
    L = float(torch.linalg.eigvalsh(H).max())
    ref, r1 = neumann_series(_matvec(H), b, iters, 1 / L)
    got, rk = neumann_series(_matvec(H), b, iters, 1 / L, check_every=k)
    assert torch.equal(ref["x"], got["x"])
    assert (r1.iters, r1.residuals, r1.diverged) == (rk.iters, rk.residuals, rk.diverged)


@pytest.mark.parametrize("k", [2, 4, 9])
@pytest.mark.parametrize("policy", ["ignore", "warn"])
@pytest.mark.parametrize("growth_tol", [1e-8, None], ids=["growth", "factor-only"])
def test_divergence_found_late_returns_the_same_sum(k, policy, growth_tol):
    """alpha = 2.5/L: the terms grow by 1.5x per term along the top eigenvector; a chunk of k terms is checked
    at once, and the result is the sum before the first divergent term, as with per-term checks (without the
    growth test the 10x factor fires mid-chunk, at term 8 here, inside the first chunk of 9)."""
    H, b = _spd()
    alpha = 2.5 / float(torch.linalg.eigvalsh(H).max())
    kw = {"on_divergence": policy, "growth_tol": growth_tol}
    with pytest.warns(bl.NeumannDivergenceWarning) if policy == "warn" else _nothing():
        ref, r1 = neumann_series(_matvec(H), b, 12, alpha, **kw)
    with pytest.warns(bl.NeumannDivergenceWarning) if policy == "warn" else _nothing():
        got, rk = neumann_series(_matvec(H), b, 12, alpha, check_every=k, **kw)
    assert r1.diverged and rk.diverged and (growth_tol is not None or r1.iters > 2)
    assert torch.equal(ref["x"], got["x"]) and (r1.iters, r1.residuals) == (rk.iters, rk.residuals)
    with pytest.raises(bl.NeumannDivergenceError, match=f"term {r1.iters} "):
        neumann_series(_matvec(H), b, 12, alpha, check_every=k, growth_tol=growth_tol)


def test_non_finite_term_is_named_with_checks_every_k():
    H, b = _spd()
    calls = []

    def bad(p):
        calls.append(1)
        return {"x": H @ p["x"] * (float("nan") if len(calls) == 3 else 1.0)}

    with pytest.raises(bl.NeumannDivergenceError, match="term 3 is non-finite"):
        neumann_series(bad, b, 10, 0.1, check_every=5)


def test_presets_take_check_every_and_stay_exact():
    ref = ridge_synthetic(d=5)
    hp = ref.hparams(-2.0)
    _, L = ref.curvature(hp)
    args = (ref.problem(), ref.solution(hp), hp, ref.inner_batch, ref.outer_batch)
    one = bl.AIDFP(iters=30, alpha=1 / L).hypergrad(*args)
    assert torch.equal(bl.AIDFP(iters=30, alpha=1 / L, check_every=8).hypergrad(*args)["lam"], one["lam"])
    batches = [ref.inner_batch] * 3
    s1 = bl.StocBiO(iters=10, alpha=1 / L, batches=batches).hypergrad(*args)
    s4 = bl.StocBiO(iters=10, alpha=1 / L, batches=batches, check_every=4).hypergrad(*args)
    assert torch.equal(s1["lam"], s4["lam"])
    for bad in (0, -1, 1.5):
        with pytest.raises((ValueError, TypeError), match="check_every"):
            bl.AIDFP(check_every=bad)


def test_one_synchronisation_per_k_terms(monkeypatch):
    H, b = _spd()
    calls = []
    real = torch.Tensor.tolist

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    neumann_series(_matvec(H), b, 20, 0.01, check_every=5)
    assert len(calls) == 4


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
