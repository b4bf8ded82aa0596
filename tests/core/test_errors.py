"""Bad input gives a clear error (type and a word of the message), never a silent wrong number."""

from __future__ import annotations

import warnings

import pytest
import torch

import bilevel as bl

F64 = torch.float64


def quad_problem(inner_scale=1.0):
    """g = 1/2 s |w|^2 - <w, h>,  f = |w - 1|^2 (w* = h / s)."""

    def g(p, h, b):
        return 0.5 * inner_scale * (p["w"] ** 2).sum() - (p["w"] * h["h"]).sum()

    def f(p, h, b):
        return ((p["w"] - 1.0) ** 2).sum()

    return bl.BilevelProblem(g, f)


P = {"w": torch.zeros(3, dtype=F64)}
H = {"h": torch.zeros(3, dtype=F64)}
ALL = [*sorted(bl.SOLVERS), "aid-cg:autograd", "aid-fp-lite:fwd-rev"]


def make(name):
    """``"aid-cg:autograd"`` -> AIDCG(hvp="autograd")."""
    name, _, mode = name.partition(":")
    return bl.get_solver(name, **({"hvp": mode} if mode else {}))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("level", ["inner", "outer"])
def test_non_scalar_loss(name, level):
    def bad(p, h, b):
        return p["w"] ** 2 + h["h"]

    good = quad_problem()
    prob = bl.BilevelProblem(bad, good.outer) if level == "inner" else bl.BilevelProblem(good.inner, bad)
    with pytest.raises(ValueError, match=rf"{level} objective .* 0-dim .*shape \(3,\)"):
        make(name).hypergrad(prob, P, H, None, None)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("level", ["inner", "outer"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss(name, level, value):
    def bad(p, h, b):
        return (p["w"] ** 2).sum() + (h["h"] * 0).sum() + value

    good = quad_problem()
    prob = bl.BilevelProblem(bad, good.outer) if level == "inner" else bl.BilevelProblem(good.inner, bad)
    with pytest.raises(FloatingPointError, match=rf"{level} objective . is non-finite .* stage"):
        make(name).hypergrad(prob, P, H, None, None)


def test_non_tensor_and_integer_losses():
    prob = bl.BilevelProblem(lambda p, h, b: 1.0, quad_problem().outer)
    with pytest.raises(ValueError, match="inner objective g must return a 0-dim tensor, got float"):
        bl.AIDCG().hypergrad(prob, P, H, None, None)


@pytest.mark.parametrize("name", ALL)
def test_empty_and_malformed_dicts(name):
    s, prob = make(name), quad_problem()
    with pytest.raises(ValueError, match="params is empty"):
        s.hypergrad(prob, {}, H, None, None)
    with pytest.raises(ValueError, match="hparams is empty"):
        s.hypergrad(prob, P, {}, None, None)
    with pytest.raises(TypeError, match="dict"):
        s.hypergrad(prob, [torch.zeros(3)], H, None, None)
    with pytest.raises(TypeError, match=r"params\['w'\] must be a Tensor"):
        s.hypergrad(prob, {"w": [0.0]}, H, None, None)
    with pytest.raises(ValueError, match="floating point"):
        s.hypergrad(prob, {"w": torch.zeros(3, dtype=torch.int64)}, H, None, None)
    with pytest.raises(TypeError, match="BilevelProblem"):
        s.hypergrad(lambda: 0, P, H, None, None)


@pytest.mark.parametrize("name", ALL)
def test_mixed_dtypes_and_devices(name):
    s, prob = make(name), quad_problem()
    with pytest.raises(ValueError, match=r"mixed dtypes: hparams\['h'\] is torch.float32"):
        s.hypergrad(prob, P, {"h": torch.zeros(3)}, None, None)
    with pytest.raises(ValueError, match="mixed dtypes"):
        s.hypergrad(prob, {"w": torch.zeros(3, dtype=F64), "v": torch.zeros(2)}, H, None, None)
    with pytest.raises(ValueError, match=r"mixed devices: hparams\['h'\] is on meta"):
        s.hypergrad(prob, P, {"h": torch.zeros(3, dtype=F64, device="meta")}, None, None)


def test_problem_needs_callables():
    with pytest.raises(TypeError, match="inner must be callable"):
        bl.BilevelProblem(3, lambda p, h, b: 0)


def test_get_solver_names_and_options():
    with pytest.raises(ValueError, match=r"unknown solver 'cg'.*aid-cg"):
        bl.get_solver("cg")
    with pytest.raises(TypeError, match=r"no option\(s\) \['alpha'\].*valid options"):
        bl.get_solver("aid-cg", alpha=0.1)
    for name, bad in [
        ("aid-cg", {"iters": -1}),
        ("aid-cg", {"tol": float("nan")}),
        ("aid-cg", {"on_negative_curvature": "maybe"}),
        ("aid-fp", {"alpha": 0.0}),
        ("aid-fp", {"iters": 2.5}),
        ("aid-fp-lite", {"scale": -1.0}),
        ("itd", {"steps": True}),
        ("itd", {"optimizer": "rmsprop"}),
        ("itd", {"momentum": 1.0}),
        ("stocbio", {"hvp": "fwd-fwd"}),
    ]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            bl.get_solver(name, **bad)


def _indefinite():
    """g = 1/2 w^T diag(1, -1) w - <w, h>: a saddle, not a minimum."""
    D = torch.tensor([1.0, -1.0], dtype=F64)

    def g(p, h, b):
        return 0.5 * (D * p["w"] ** 2).sum() - (p["w"] * h["h"]).sum()

    def f(p, h, b):
        return (p["w"] ** 2).sum() + p["w"].sum()

    return (
        bl.BilevelProblem(g, f),
        {"w": torch.tensor([0.3, -0.2], dtype=F64)},
        {"h": torch.tensor([0.3, 0.2], dtype=F64)},
    )


def test_negative_curvature_policies():
    prob, p, h = _indefinite()
    with pytest.warns(bl.NegativeCurvatureWarning, match="non-positive curvature"):
        _, info = bl.AIDCG(iters=10).hypergrad(prob, p, h, None, None, return_info=True)
    assert info.negative_curvature and not info.converged
    with pytest.raises(bl.NegativeCurvatureError, match="not positive definite"):
        bl.AIDCG(iters=10, on_negative_curvature="raise").hypergrad(prob, p, h, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hg, info = bl.AIDCG(iters=10, on_negative_curvature="ignore").hypergrad(
            prob, p, h, None, None, return_info=True
        )
    assert info.negative_curvature and torch.isfinite(hg["h"]).all()


def test_neumann_divergence_detected():
    prob = quad_problem(inner_scale=4.0)  # H = 4 I, L = 4: alpha must be < 0.5
    h = {"h": torch.tensor([1.0, 2.0, 3.0], dtype=F64)}
    p = {"w": h["h"] / 4.0}
    for name in ("aid-fp", "stocbio"):
        with pytest.raises(bl.NeumannDivergenceError, match="lower alpha"):
            bl.get_solver(name, iters=50, alpha=0.6).hypergrad(prob, p, h, None, None)
        with pytest.warns(bl.NeumannDivergenceWarning, match="too large"):
            _, info = bl.get_solver(name, iters=50, alpha=0.6, on_divergence="warn").hypergrad(
                prob, p, h, None, None, return_info=True
            )
        assert info.diverged and info.iters < 50
    # alpha < 2/L converges (slowly near 2/L) and is not flagged
    _, info = bl.AIDFP(iters=50, alpha=0.45).hypergrad(prob, p, h, None, None, return_info=True)
    assert not info.diverged


def test_non_finite_hypergradient_is_an_error():
    def g(p, h, b):
        return 0.5 * (p["w"] ** 2).sum() - (p["w"] * h["h"].sqrt()).sum()  # d/dh sqrt(h) = inf at 0

    prob = bl.BilevelProblem(g, quad_problem().outer)
    with pytest.raises(FloatingPointError, match=r"hypergradient is non-finite for hparams \['h'\]"):
        bl.AIDFPLite().hypergrad(prob, P, H, None, None)


def test_stocbio_exhausted_iterator():
    prob = quad_problem()
    s = bl.StocBiO(iters=3, alpha=0.1, batches=iter([None, None]))
    with pytest.raises(ValueError, match="exhausted iterator"):
        s.hypergrad(prob, P, H, None, None)
    with pytest.raises(ValueError, match="empty"):
        bl.StocBiO(iters=3, alpha=0.1, batches=[]).hypergrad(prob, P, H, None, None)


def test_an_objective_without_a_graph_is_named():
    import bilevel as bl
    from bilevel.testing import ridge_synthetic

    ref = ridge_synthetic(d=5)
    hp = ref.hparams(-1.0)
    sol = ref.solution(hp)
    const = lambda p, h, b: torch.tensor(1.0, dtype=torch.float64)  # noqa: E731
    through_item = lambda p, h, b: torch.tensor(float(ref.outer(p, h, b).item()), dtype=torch.float64)  # noqa: E731
    for solver in (bl.AIDCG(iters=3), bl.AIDFPLite(), bl.ITD(steps=2), bl.AIDCG(hvp="fd", mixed="fd")):
        with pytest.raises(ValueError, match="inner objective g does not depend on params or hparams"):
            solver.hypergrad(bl.BilevelProblem(const, ref.outer), sol, hp, ref.inner_batch, ref.outer_batch)
    with pytest.raises(ValueError, match=r"outer objective f does not depend on params or hparams.*\.item\(\)"):
        bl.AIDCG(iters=3).hypergrad(
            bl.BilevelProblem(ref.inner, through_item), sol, hp, ref.inner_batch, ref.outer_batch
        )


def test_stocbio_batches_must_be_iterable():
    import bilevel as bl

    with pytest.raises(TypeError, match=r"StocBiO\.batches must be an iterable of inner batches"):
        bl.get_solver("stocbio", batches=5)


def test_slow_neumann_growth_is_divergence_and_nan_is_named():
    """alpha just above 2/L: the terms grow by 1.2x per step, far from the x10 bound within 20 terms
    (the old test passed it with a 169 % error); the first growth is now divergence. A NaN Hessian is
    named as non-finite by both CG and the Neumann series."""
    from bilevel.testing import ridge_synthetic

    ref = ridge_synthetic(d=20, n=200)
    hp = ref.hparams(-1.0)
    sol = ref.solution(hp)
    _, L = ref.curvature(hp)
    args = (ref.problem(), sol, hp, ref.inner_batch, ref.outer_batch)
    with pytest.raises(bl.NeumannDivergenceError, match="is longer than the one before"):
        bl.AIDFP(iters=20, alpha=2.2 / L).hypergrad(*args)
    _, info = bl.AIDFP(iters=20, alpha=2.2 / L, on_divergence="ignore").hypergrad(*args, return_info=True)
    assert info.diverged and info.iters < 20
    nan = {"w": torch.full((20,), float("nan"), dtype=torch.float64)}
    from bilevel.linalg import conjugate_gradient, neumann_series

    b = {"w": torch.ones(20, dtype=torch.float64)}
    with pytest.raises(bl.NegativeCurvatureError, match="non-finite curvature"):
        conjugate_gradient(lambda p: nan, b, 5, 1e-10, on_negative_curvature="raise")
    with pytest.raises(bl.NeumannDivergenceError, match="is non-finite"):
        neumann_series(lambda p: nan, b, 5, 0.1)
