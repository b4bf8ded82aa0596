"""Our solvers against peer libraries used as oracles (float64; see benchmarks/peers.py).

    ITD (steps=T, lr)             == higher / torchopt unrolled SGD (same T, lr, start)       to 1e-10
    AID-CG (converged)            == torchopt custom_root + solve_cg (converged)               to 1e-8
    AID-FP (iters=K, alpha)       == torchopt solve_inv(ns=True, maxiter=K, alpha) == betty neumann
                                     (neumann_iterations=K): K HVPs, K + 1 terms               to 1e-10
    AID-FP-Lite (scale=1)         == torchopt Neumann with 0 terms == betty darts               to 1e-8

Each test skips with a reason where its peer does not import (install: scripts/install_peers.sh).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from benchmarks import peers  # the repository root is on sys.path (pyproject: pythonpath)


def need(peer: str) -> None:
    """Skip (with the import error as reason) where ``peer`` does not import, broken installs included."""
    try:
        peers.require(peer)
    except ImportError as exc:
        pytest.skip(f"{exc}")


def perturbed(sol: dict, scale: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in sol.items()}


def setup(request, which: str, start: str = "solution"):
    """(reference problem, problem, params, hparams, 1/L) at lam = -2 (+ noise)."""
    P = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(1)
    hp = {"lam": -2.0 + 0.3 * torch.randn(P.dim, generator=g, dtype=torch.float64)}
    sol = P.solution(hp)
    params = sol if start == "solution" else perturbed(sol, 0.3)
    _, L = P.curvature(hp)
    return P, P.problem(), params, hp, 1.0 / L


def ours(name: str, P, pr, params, hp, **opts) -> dict:
    return bl.get_solver(name, **opts).hypergrad(pr, params, hp, P.inner_batch, P.outer_batch)


def theirs(peer: str, method: str, P, pr, params, hp, **opts) -> dict:
    return peers.peer_hypergrad(peer, method, pr, params, hp, P.inner_batch, P.outer_batch, **opts)


WHICH = ["diabetes", "breast_cancer"]


# ------------------------------------------------------------------------------------------------- ITD


@pytest.mark.parametrize("peer", ["higher", "torchopt"])
@pytest.mark.parametrize("start", ["solution", "perturbed"])
@pytest.mark.parametrize("which", WHICH)
def test_itd_equals_peer_unrolled_sgd(peer, start, which, request):
    need(peer)
    P, pr, params, hp, a = setup(request, which, start)
    for T in (1, 10):
        ref = theirs(peer, "itd", P, pr, params, hp, iters=T, lr=a)
        assert rel_err(ours("itd", P, pr, params, hp, steps=T, lr=a), ref) <= 1e-10
        # the comparison resolves one unrolled step
        assert rel_err(ours("itd", P, pr, params, hp, steps=T + 1, lr=a), ref) > 1e-4


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 6), st.floats(0.05, 1.5), st.floats(-4.0, 1.0), st.integers(0, 2**16))
def test_itd_equals_higher_property(diabetes, steps, lr_times_inv_l, lam, seed):
    need("higher")
    P = diabetes
    hp = P.hparams(lam)
    params = perturbed(P.solution(hp), 0.5, seed)
    lr = lr_times_inv_l / P.curvature(hp)[1]
    ref = theirs("higher", "itd", P, P.problem(), params, hp, iters=steps, lr=lr)
    got = ours("itd", P, P.problem(), params, hp, steps=steps, lr=lr)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- AID-CG


@pytest.mark.parametrize("which", WHICH)
def test_aid_cg_equals_torchopt_implicit_cg(which, request):
    need("torchopt")
    P, pr, params, hp, _ = setup(request, which)
    hg, info = bl.get_solver("aid-cg", iters=300, tol=1e-13).hypergrad(
        pr, params, hp, P.inner_batch, P.outer_batch, return_info=True
    )
    assert info.converged
    ref = theirs("torchopt", "cg", P, pr, params, hp, iters=300, tol=1e-13)
    exact = P.exact_hypergrad(hp)
    assert rel_err(ref, exact) <= 1e-10  # torchopt converged too
    assert rel_err(hg, ref) <= 1e-8


@pytest.mark.parametrize("which", WHICH)
def test_aid_cg_truncated_equals_torchopt(which, request):
    """Same K and stopping rule (||r|| <= tol ||b||) -> same truncated iterate, also away from theta*."""
    need("torchopt")
    P, pr, params, hp, _ = setup(request, which, "perturbed")
    for K in (2, 5):
        ref = theirs("torchopt", "cg", P, pr, params, hp, iters=K, tol=1e-13)
        assert rel_err(ours("aid-cg", P, pr, params, hp, iters=K, tol=1e-13), ref) <= 1e-10
        assert rel_err(ours("aid-cg", P, pr, params, hp, iters=K + 1, tol=1e-13), ref) > 1e-6


# ------------------------------------------------------------------------------------ AID-FP / Neumann


@pytest.mark.parametrize("peer", ["torchopt", "betty"])
@pytest.mark.parametrize("which", WHICH)
def test_aid_fp_equals_peer_neumann(peer, which, request):
    """Ours: v = alpha sum_{j=0}^{K} (I - alpha H)^j b (K HVPs); the peers' K iterations are the same sum."""
    need(peer)
    P, pr, params, hp, a = setup(request, which)
    for K in (0, 3, 15):
        ref = theirs(peer, "neumann", P, pr, params, hp, iters=K, alpha=a)
        assert rel_err(ours("aid-fp", P, pr, params, hp, iters=K, alpha=a), ref) <= 1e-10
        assert rel_err(ours("aid-fp", P, pr, params, hp, iters=K + 1, alpha=a), ref) > 1e-6  # no off-by-one


@pytest.mark.parametrize("peer", ["torchopt", "betty"])
@pytest.mark.parametrize("which", WHICH)
def test_aid_fp_lite_equals_peer_identity(peer, which, request):
    need(peer)
    P, pr, params, hp, _ = setup(request, which)
    ref = theirs(peer, "identity", P, pr, params, hp, alpha=1e-3)  # betty: darts' finite-difference radius
    assert rel_err(ours("aid-fp-lite", P, pr, params, hp, scale=1.0), ref) <= 1e-8
    assert rel_err(ours("aid-fp-lite", P, pr, params, hp, scale=1.1), ref) > 1e-3


def test_betty_cg_is_not_conjugate_gradient(diabetes, request):
    """betty-ml 0.2.1 builds p_{k+1} from the old residual: equal to CG after one step, wrong after."""
    need("betty")
    if peers.available()["betty"] != "0.2.1":
        pytest.skip("documents a defect of betty-ml 0.2.1 specifically")
    P, pr, params, hp, _ = setup(request, "diabetes")
    one = theirs("betty", "cg", P, pr, params, hp, iters=1)
    assert rel_err(ours("aid-cg", P, pr, params, hp, iters=1, tol=1e-13), one) <= 1e-10
    exact = P.exact_hypergrad(hp)
    assert rel_err(ours("aid-cg", P, pr, params, hp, iters=30, tol=1e-13), exact) <= 1e-10
    assert rel_err(theirs("betty", "cg", P, pr, params, hp, iters=30), exact) > 1e-2


# -------------------------------------------------------------------------------- several leaves, errors


def test_multi_leaf_trees(diabetes):
    """Trees with several keys (weights split in two, two hparam leaves) map leaf-by-leaf."""
    need("torchopt")
    need("higher")
    P = diabetes

    def split(w):
        return {"a": w[:4], "b": w[4:]}

    def inner(params, hparams, batch):
        w = torch.cat([params["a"], params["b"]])
        return P.inner({"w": w}, {"lam": torch.cat([hparams["l1"], hparams["l2"]])}, batch)

    def outer(params, hparams, batch):
        return P.outer({"w": torch.cat([params["a"], params["b"]])}, hparams, batch) + 0.1 * hparams["l2"].sum() ** 2

    pr = bl.BilevelProblem(inner=inner, outer=outer)
    lam = P.hparams(-1.0)["lam"]
    hp = {"l1": lam[:3].clone(), "l2": lam[3:].clone()}
    sol = split(P.solution({"lam": lam})["w"])
    args = (pr, sol, hp, P.inner_batch, P.outer_batch)
    ref = peers.peer_hypergrad("torchopt", "cg", *args, iters=200, tol=1e-13)
    assert set(ref) == {"l1", "l2"} and ref["l2"].shape == (7,)
    assert rel_err(bl.get_solver("aid-cg", iters=200, tol=1e-13).hypergrad(*args), ref) <= 1e-8
    start = perturbed(sol, 0.2)
    args = (pr, start, hp, P.inner_batch, P.outer_batch)
    ref = peers.peer_hypergrad("higher", "itd", *args, iters=5, lr=0.1)
    assert rel_err(bl.get_solver("itd", steps=5, lr=0.1).hypergrad(*args), ref) <= 1e-10


def test_peer_inputs_not_modified(diabetes):
    need("betty")
    P, hp = diabetes, diabetes.hparams(-2.0)
    sol = P.solution(hp)
    before = (sol["w"].clone(), hp["lam"].clone())
    peers.peer_hypergrad("betty", "identity", P.problem(), sol, hp, P.inner_batch, P.outer_batch)
    assert torch.equal(sol["w"], before[0]) and torch.equal(hp["lam"], before[1])


def test_adapter_errors(diabetes):
    P, hp = diabetes, diabetes.hparams(-2.0)
    args = (P.problem(), P.solution(hp), hp, P.inner_batch, P.outer_batch)
    with pytest.raises(ValueError, match="unknown peer"):
        peers.peer_hypergrad("jaxopt", "cg", *args)
    with pytest.raises(ValueError, match="no method"):
        peers.peer_hypergrad("higher", "cg", *args)
    with pytest.raises(ValueError, match="iters"):
        peers.peer_hypergrad("torchopt", "cg", *args, iters=-1)
    with pytest.raises(ValueError, match="alpha"):
        peers.peer_hypergrad("torchopt", "neumann", *args, alpha=0.0)
    assert set(peers.available()) == set(peers.PEER_METHODS) == {"higher", "torchopt", "betty"}
