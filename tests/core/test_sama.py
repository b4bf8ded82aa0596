"""SAMA (issue 15 item 2): the Adam step-Jacobian preconditioner by hand, the hypergradient by hand on a
quadratic, SGD = identity = AID-FP-Lite, refusals, and the training loop passing the preconditioner."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.solvers.sama import sama_preconditioner

F64 = torch.float64
B1, B2, EPS, LR = 0.8, 0.9, 1e-3, 0.05


def _adam_two_steps():
    """A 3-vector parameter stepped twice by Adam with the gradients g1, g2; returns the state by hand too."""
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    opt = torch.optim.Adam([w], lr=LR, betas=(B1, B2), eps=EPS)
    g1 = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    g2 = torch.tensor([-0.3, -0.4, 1.0], dtype=F64)
    w.grad = g1.clone()
    opt.step()
    m1, v1 = (1 - B1) * g1, (1 - B2) * g1**2
    return w, opt, g2, m1, v1


def _by_hand(g2, m1, v1, eps=EPS):
    """betty's precondition_adam at the second step: lr [(1-b1) b2 v_old - b1 (1-b2) g m_old] / (sqrt(v)+eps)^3."""
    v2 = B2 * v1 + (1 - B2) * g2**2
    return LR * ((1 - B1) * B2 * v1 - B1 * (1 - B2) * g2 * m1) / (v2.sqrt() + eps) ** 3


def test_adam_preconditioner_by_hand_before_and_after_the_step():
    w, opt, g2, m1, v1 = _adam_two_steps()
    expected = _by_hand(g2, m1, v1)
    before = sama_preconditioner(opt, {"w": w}, {"w": g2}, applied=False)  # the state holds m1, v1
    torch.testing.assert_close(before["w"], expected, rtol=1e-14, atol=0)
    w.grad = g2.clone()
    opt.step()
    after = sama_preconditioner(opt, {"w": w}, {"w": g2}, applied=True)  # m_old, v_old recovered from m2, v2
    torch.testing.assert_close(after["w"], expected, rtol=1e-12, atol=1e-15)
    # with eps -> 0 it is the derivative of Adam's direction m / sqrt(v) in the step's gradient
    g = g2.clone().requires_grad_(True)
    direction = (B1 * m1 + (1 - B1) * g) / (B2 * v1 + (1 - B2) * g**2).sqrt()
    jac = torch.autograd.grad(direction.sum(), g)[0]  # elementwise, so the sum's gradient is the diagonal
    torch.testing.assert_close(_by_hand(g2, m1, v1, eps=0.0) / LR, jac, rtol=1e-12, atol=0)


def test_adamw_equals_adam_and_sgd_is_the_identity():
    w, _, g2, m1, v1 = _adam_two_steps()
    w2 = nn.Parameter(torch.zeros(3, dtype=F64))
    opt2 = torch.optim.AdamW([w2], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=0.1)
    w2.grad = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    opt2.step()
    torch.testing.assert_close(
        sama_preconditioner(opt2, {"w": w2}, {"w": g2}, applied=False)["w"], _by_hand(g2, m1, v1), rtol=1e-14, atol=0
    )
    sgd = torch.optim.SGD([w], lr=0.1)
    assert sama_preconditioner(sgd, {"w": w}, {"w": g2}, applied=True) is None


def test_other_optimizers_and_bad_input_are_refused():
    w = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="RMSprop"):
        sama_preconditioner(torch.optim.RMSprop([w]), {"w": w}, {"w": w}, applied=True)
    with pytest.raises(ValueError, match="amsgrad"):
        sama_preconditioner(torch.optim.Adam([w], amsgrad=True), {"w": w}, {"w": w}, applied=True)
    other = nn.Parameter(torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="not stepped"):
        sama_preconditioner(torch.optim.Adam([w]), {"w": other}, {"w": w}, applied=True)
    with pytest.raises(ValueError, match="no gradient"):
        sama_preconditioner(torch.optim.Adam([w]), {"w": w}, {}, applied=True)
    with pytest.raises(ValueError, match="first order"):
        bl.SAMA(mixed="autograd")
    with pytest.raises(ValueError, match="hvp must be 'fd'"):
        bl.SAMA(hvp="autograd")


def _quadratic():
    """g = 0.5 theta^T A theta + theta^T B phi + 0.5 phi^T phi, f = 0.5 ||C theta - y||^2 + 0.1 phi^T phi
    (exact J = B^T)."""
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(4, 4, generator=gen, dtype=F64)
    A, B = M @ M.T + torch.eye(4, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)
    C, y = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, generator=gen, dtype=F64)

    def g(p, h, b):
        t, ph = p["t"], h["phi"]
        return 0.5 * t @ A @ t + t @ B @ ph + 0.5 * ph @ ph

    def f(p, h, b):
        return 0.5 * ((C @ p["t"] - y) ** 2).sum() + 0.1 * h["phi"] @ h["phi"]

    t = torch.randn(4, generator=gen, dtype=F64)
    phi = torch.randn(2, generator=gen, dtype=F64)
    return bl.BilevelProblem(inner=g, outer=f), {"t": t}, {"phi": phi}, (B, C, y)


@pytest.mark.parametrize("mixed", ["fd", "fd-onesided"])
def test_hypergradient_by_hand_on_a_quadratic(mixed):
    problem, params, hparams, (B, C, y) = _quadratic()
    P = {"t": torch.tensor([0.3, 1.0, 0.5, 2.0], dtype=F64)}
    hg, info = bl.SAMA(scale=0.7, mixed=mixed).hypergrad(
        problem, params, hparams, None, None, preconditioner=P, return_info=True
    )
    grad_theta_f = C.T @ (C @ params["t"] - y)
    expected = 0.2 * hparams["phi"] - B.T @ (0.7 * P["t"] * grad_theta_f)
    # g is quadratic: central differences are exact up to rounding; one-sided ones too (J is constant)
    torch.testing.assert_close(hg["phi"], expected, rtol=1e-7, atol=1e-9)
    assert info.n_hvp == 0
    lite = bl.AIDFPLite(scale=0.7, mixed=mixed).hypergrad(problem, params, hparams, None, None)
    sama_id = bl.SAMA(scale=0.7, mixed=mixed).hypergrad(problem, params, hparams, None, None)
    torch.testing.assert_close(sama_id, lite, rtol=1e-12, atol=0)  # no preconditioner: the identity (SGD)


def test_preconditioner_is_checked():
    problem, params, hparams, _ = _quadratic()
    with pytest.raises(ValueError, match="preconditioner= is for solvers"):
        bl.AIDCG().hypergrad(problem, params, hparams, None, None, preconditioner={"t": torch.ones(4, dtype=F64)})
    with pytest.raises(ValueError, match="does not match"):
        bl.SAMA().hypergrad(problem, params, hparams, None, None, preconditioner={"t": torch.ones(3, dtype=F64)})
    with pytest.raises(ValueError, match="non-finite"):
        bl.SAMA().hypergrad(problem, params, hparams, None, None, preconditioner={"t": torch.full((4,), float("nan"))})


def _trainer(optimizer_cls, share: bool, **opt_kw):
    problem, params, hparams, _ = _quadratic()
    model = nn.ParameterDict({"t": nn.Parameter(params["t"].clone())})
    meta = nn.ParameterDict({"phi": nn.Parameter(hparams["phi"].clone())})
    tr = bl.BilevelTrainer(
        model, optimizer_cls(model.parameters(), **opt_kw), problem.inner, outer=problem.outer, meta_model=meta,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=1.0), solver=bl.SAMA(),
        config=bl.TrainerConfig(hyper_every=2, share_linearization=share),
    )  # fmt: skip
    return tr, problem


@pytest.mark.parametrize("share", [False, True])
def test_trainer_passes_the_adam_preconditioner(share):
    tr, problem = _trainer(torch.optim.Adam, share, lr=LR, betas=(B1, B2), eps=EPS)
    tr.step(0, 0)  # an inner step (the Adam state becomes non-zero)
    model_t = tr.model["t"]
    theta, phi = model_t.detach().clone(), tr.meta_model["phi"].detach().clone()
    g = torch.autograd.grad(problem.inner({"t": theta.requires_grad_(True)}, {"phi": phi}, None), theta)[0]
    state = {k: v.clone() for k, v in tr.optimizer.state[model_t].items()}
    tr.step(0, 0)  # inner update + hyper step (shared: the hyper step first, at theta)
    m_old, v_old = state["exp_avg"], state["exp_avg_sq"]
    # shared: the hyper step at theta, before the update; else at theta_{k+1}, P of the update just taken. Both
    # use the preconditioner of the Adam step from theta with gradient g
    point = theta.detach() if share else tr.model["t"].detach().clone()
    P = LR * ((1 - B1) * B2 * v_old - B1 * (1 - B2) * g * m_old) / ((B2 * v_old + (1 - B2) * g**2).sqrt() + EPS) ** 3
    expected = bl.SAMA().hypergrad(problem, {"t": point}, {"phi": phi}, None, None, preconditioner={"t": P})
    torch.testing.assert_close(phi - tr.meta_model["phi"].detach(), expected["phi"], rtol=1e-10, atol=1e-12)


def test_trainer_refuses_an_optimizer_without_a_preconditioner():
    with pytest.raises(TypeError, match="RMSprop"):
        _trainer(torch.optim.RMSprop, False, lr=0.1)
    tr, _ = _trainer(torch.optim.SGD, False, lr=0.1)  # SGD: the identity
    tr.step(0, 0)
    assert tr.step(0, 0)["hyper"]
