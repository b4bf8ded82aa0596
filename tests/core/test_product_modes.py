"""The product modes: ``mixed="jvp"`` (exact, forward mode), ``"fd"`` / ``"fd-onesided"`` and ``hvp="fd"``
(first-order finite differences, error O(e^2) / O(e))."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from bilevel.products import Linearization
from bilevel.testing import logistic_breast_cancer, ridge_synthetic

RIDGE = ridge_synthetic(d=20, n=200)
LOGISTIC = logistic_breast_cancer()


def _point(ref, lam, shift):
    hp = ref.hparams(lam)
    sol = ref.solution(hp)
    w = sol["w"] + shift * torch.linspace(-1, 1, sol["w"].numel(), dtype=sol["w"].dtype)
    return hp, {"w": w}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("ref", [RIDGE, LOGISTIC], ids=["ridge", "logistic"])
@pytest.mark.parametrize("shift", [0.0, 0.05])
@pytest.mark.parametrize("hvp", ["autograd", "rev-rev", "fwd-rev"])
def test_jvp_mixed_product_equals_autograd(ref, shift, hvp):
    hp, params = _point(ref, -1.0, shift)
    args = (ref.problem(), params, hp, ref.inner_batch, ref.outer_batch)
    for cls, opts in ((bl.AIDCG, {"iters": 10, "tol": 1e-14}), (bl.AIDFPLite, {"scale": 0.3})):
        want = cls(**opts, hvp=hvp).hypergrad(*args)["lam"]
        got = cls(**opts, hvp=hvp, mixed="jvp").hypergrad(*args)["lam"]
        assert _rel(got, want) < 1e-10, cls.name


def _quartic(p, h, batch):
    """Logistic loss + 1/4 sum exp(lam) w^4: grad_phi g is quartic in w, so differences have an error."""
    return LOGISTIC.loss(p["w"], batch) + 0.25 * (h["lam"].exp() * p["w"] ** 4).sum()


def test_finite_differences_converge_at_their_order():
    """Central differences O(e^2), one-sided O(e), for J v and H p (g not quadratic in theta)."""
    hp, params = _point(LOGISTIC, -1.0, 0.05)
    problem = bl.BilevelProblem(inner=_quartic, outer=LOGISTIC.outer)
    v = {"w": torch.linspace(1, -2, params["w"].numel(), dtype=torch.float64)}
    exact = Linearization(problem, params, hp, LOGISTIC.inner_batch)
    errors = {}
    for mode in ("fd", "fd-onesided"):
        for r in (1e-2, 1e-3):
            lin = Linearization(problem, params, hp, LOGISTIC.inner_batch, "fd", None, mode, r)
            errors[mode, r] = _rel(lin.mixed(v)["lam"], exact.mixed(v)["lam"])
    assert errors["fd", 1e-2] < 1e-3 and errors["fd", 1e-2] / errors["fd", 1e-3] > 50  # ~100 for O(e^2)
    assert 5 < errors["fd-onesided", 1e-2] / errors["fd-onesided", 1e-3] < 20  # ~10 for O(e)
    hvp_errs = []
    for r in (1e-2, 1e-3):
        lin = Linearization(problem, params, hp, LOGISTIC.inner_batch, "fd", None, "fd", r)
        hvp_errs.append(_rel(lin.hvp(v)["w"], exact.hvp(v)["w"]))
    assert hvp_errs[0] < 1e-4 and hvp_errs[0] / hvp_errs[1] > 50


def test_first_order_modes_need_no_double_backward():
    """A g whose gradient cannot be differentiated again works with hvp="fd" and a first-order mixed mode."""

    class Square(torch.autograd.Function):  # like an op (a fused kernel) without a double backward
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            if torch.is_grad_enabled():  # create_graph=True: a double backward is being built
                raise RuntimeError("Square has no double backward")
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    def g(p, h, batch):  # 1/2 sum exp(lam) w^2 + ||X w - y||^2 / 2n, the square through Square
        X, y = batch
        return 0.5 * (h["lam"].exp() * Square.apply(p["w"])).sum() + 0.5 * ((X @ p["w"] - y) ** 2).mean()

    problem = bl.BilevelProblem(inner=g, outer=RIDGE.outer)
    hp, params = _point(RIDGE, -1.0, 0.0)
    args = (problem, params, hp, RIDGE.inner_batch, RIDGE.outer_batch)
    with pytest.raises(RuntimeError, match="no double backward"):
        bl.AIDCG(iters=5).hypergrad(*args)
    first = bl.AIDCG(iters=30, tol=1e-12, hvp="fd", mixed="fd", fd_radius=1e-4).hypergrad(*args)["lam"]
    ref = bl.AIDCG(iters=30, tol=1e-12).hypergrad(RIDGE.problem(), params, hp, RIDGE.inner_batch, RIDGE.outer_batch)
    assert _rel(first, ref["lam"]) < 1e-6  # the same g written without the custom function


def test_modes_compose_with_a_shared_linearisation_and_reduce():
    hp, params = _point(LOGISTIC, -1.0, 0.05)
    double = lambda t: {k: 2.0 * x for k, x in t.items()}  # noqa: E731 (a reduce that shows in the result)
    for mixed in ("jvp", "fd", "fd-onesided"):
        solver = bl.AIDCG(iters=10, tol=1e-12, hvp="fd", mixed=mixed)
        args = (LOGISTIC.problem(), params, hp, LOGISTIC.inner_batch, LOGISTIC.outer_batch)
        own = solver.hypergrad(*args, reduce=double)
        lin = solver.linearize(LOGISTIC.problem(), params, hp, LOGISTIC.inner_batch, double)
        shared = solver.hypergrad_at(lin, LOGISTIC.outer_batch)
        torch.testing.assert_close(shared["lam"], own["lam"], rtol=1e-12, atol=0)


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="mixed must be one of"):
        bl.AIDFPLite(mixed="central")
    with pytest.raises(ValueError, match="fd_radius must be a finite number > 0"):
        bl.AIDCG(fd_radius=0.0)
    with pytest.raises(ValueError, match="unknown mixed-product mode"):
        Linearization(RIDGE.problem(), *_point(RIDGE, 0.0, 0.0)[::-1], RIDGE.inner_batch, mixed="x")


def test_jvp_through_stacked_layer_norms_is_exact():
    """torch's forward-mode layer_norm is not differentiable in its input (pytorch/pytorch#196700): phi
    reaching a LayerNorm's input (here the weight of the first of two) must still give the exact J v."""
    torch.manual_seed(0)
    X, w2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def g(p, h, batch):
        z = torch.nn.functional.layer_norm(X * p["w"], (5,), h["lam"])
        return (torch.nn.functional.layer_norm(z, (5,), w2) ** 2).sum() + 0.5 * (p["w"] ** 2).sum()

    problem = bl.BilevelProblem(inner=g, outer=lambda p, h, b: (p["w"] ** 2).sum())
    params, hp = {"w": torch.randn(5, dtype=torch.float64)}, {"lam": torch.randn(5, dtype=torch.float64) + 2}
    v = {"w": torch.randn(5, dtype=torch.float64)}
    want = Linearization(problem, params, hp, None).mixed(v)["lam"]
    got = Linearization(problem, params, hp, None, mixed="jvp").mixed(v)["lam"]
    assert _rel(got, want) < 1e-10
    assert torch.nn.functional.layer_norm.__module__ == "torch.nn.functional"  # restored after the product


@pytest.mark.parametrize("mixed", ["jvp", "fd", "fd-onesided"])
def test_a_solve_without_hvps_linearises_without_a_graph(mixed):
    """AID-FP-Lite / SAMA take no HVP: with a mixed mode that needs no first-order graph, none is kept."""
    ex = bl.testing.example()
    problem, params, hparams, inner, outer = ex.args
    lite = bl.AIDFPLite(mixed=mixed)  # hvp left at "autograd"
    lin = lite.linearize(problem, params, hparams, inner)
    assert lin.mode == "fd" and not hasattr(lin, "_graph")
    exact = bl.AIDFPLite().hypergrad(*ex.args)
    tol = 1e-10 if mixed == "jvp" else 1e-3
    torch.testing.assert_close(lite.hypergrad_at(lin, outer)["lam"], exact["lam"], rtol=tol, atol=tol)
    assert bl.AIDFPLite().linearize(problem, params, hparams, inner).mode == "autograd"
    assert bl.AIDCG(mixed=mixed).linearize(problem, params, hparams, inner).mode == "autograd"  # CG takes HVPs


@pytest.mark.parametrize("mixed", ["fd", "fd-onesided"])
def test_fd_mixed_product_records_no_graph_where_phi_does_not_reach(mixed):
    """phi enters at the loss only (MELTR's case): the fd mixed product runs the model as an inference forward."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    seen: list[bool] = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    params, fn = bl.functional_module(model)
    g = lambda p, h, x: (torch.nn.functional.softplus(h["w"]) * fn(p, x) ** 2).mean()  # noqa: E731
    problem = bl.BilevelProblem(g, g)
    hparams, x = {"w": torch.randn(3, dtype=torch.float64)}, torch.randn(8, 4, dtype=torch.float64)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    lin = Linearization(problem, params, hparams, x, mode="fd", mixed=mixed, fd_radius=1e-4)
    seen.clear()
    jv = lin.mixed(v)
    assert seen and not any(seen)  # every model forward of the product kept no graph
    exact = Linearization(problem, params, hparams, x).mixed(v)
    atol = 1e-6 if mixed == "fd" else 1e-4  # central O(e^2), one-sided O(e), e = 1e-4 / ||v||
    torch.testing.assert_close(jv["w"], exact["w"], rtol=1e-3, atol=atol)
    seen.clear()
    lin.hvp(v)  # the HVP needs grad_theta: the model's forward does record a graph there
    assert seen and all(seen)
