"""MELTR loss network (MATH.md section 4): shapes, input checks, regulariser, objectives, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bilevel as bl
from examples.meltr_video.meltr import (
    MELTR,
    RecentTrainBatches,
    loss_gradient,
    make_objectives,
    regulariser,
    response_curve,
)

NAMES = ("joint", "alignment", "mlm", "mfm", "m_joint", "m_align", "decoder", "m_decoder")


def small_meltr(seed: int = 0, dtype: torch.dtype = torch.float32, **kw) -> MELTR:
    torch.manual_seed(seed)
    kw = {"hidden": 16, "d_model": 32, "ff": 64} | kw
    return MELTR(NAMES, **kw).to(dtype)


def test_default_config_is_univl():
    m = MELTR(NAMES)
    assert m.scalar_embedding[0].out_features == 128
    assert m.scalar_embedding[2].out_features == 256
    assert m.encoder.linear1.out_features == 512
    assert m.encoder.self_attn.num_heads == 8
    assert m.task_embedding.weight.shape == (8, 256)
    assert m.head.bias is None and m.head.weight.shape == (1, 256)
    assert isinstance(m.encoder, nn.TransformerEncoderLayer)


def test_shapes_single_and_batch():
    m = small_meltr()
    assert m(torch.rand(8)).shape == ()
    assert m(torch.rand(5, 8)).shape == (5,)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.lists(st.floats(0, 20), min_size=8, max_size=8), min_size=1, max_size=4))
def test_batch_rows_equal_single_calls(rows):
    m = small_meltr(dtype=torch.float64)
    x = torch.tensor(rows, dtype=torch.float64)
    single = torch.stack([m(r) for r in x])
    torch.testing.assert_close(m(x), single)


def test_task_embedding_is_positional():
    """Swapping two losses changes the output (each position has its own embedding)."""
    m = small_meltr(dtype=torch.float64)
    x = torch.tensor([0.5, 2.0, 3.0, 1.0, 0.1, 4.0, 2.5, 0.7], dtype=torch.float64)
    y = x.clone()
    y[[0, 1]] = y[[1, 0]]
    with torch.no_grad():
        assert abs(float(m(x) - m(y))) > 1e-6


def test_output_may_be_negative_bias_free_head():
    m = small_meltr(dtype=torch.float64)
    x = torch.rand(3, 8, dtype=torch.float64)
    out = m(x)
    with torch.no_grad():
        m.head.weight.neg_()
    torch.testing.assert_close(m(x), -out)
    assert (out < 0).any() or (-out < 0).any()


def test_wrong_number_of_losses():
    m = small_meltr()
    with pytest.raises(ValueError, match=r"shape \[8\] or \[B, 8\]"):
        m(torch.rand(7))
    with pytest.raises(ValueError, match="shape"):
        m(torch.rand(2, 3, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_losses(bad):
    m = small_meltr()
    x = torch.rand(8)
    x[2] = bad
    with pytest.raises(FloatingPointError, match="mlm"):
        m(x)


def test_stack_checks_keys():
    m = small_meltr()
    d = {n: torch.tensor(float(i)) for i, n in enumerate(NAMES)}
    torch.testing.assert_close(m.stack(d), torch.arange(8.0))
    with pytest.raises(ValueError, match="missing \\['mfm'\\]"):
        m.stack({k: v for k, v in d.items() if k != "mfm"})
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        m.stack(d | {"extra": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="unknown task"):
        m.index("nope")


def test_constructor_checks():
    with pytest.raises(ValueError, match="unique"):
        MELTR(["a", "a"])
    with pytest.raises(ValueError, match="divisible"):
        MELTR(["a"], d_model=30, nhead=8)


def test_regulariser_hand_computed():
    losses = torch.tensor([1.0, 2.0, 0.5])
    assert float(regulariser(losses, torch.tensor(1.5))) == pytest.approx(2.0)
    assert float(regulariser(losses, torch.tensor(4.0))) == pytest.approx(0.5)
    torch.testing.assert_close(
        regulariser(torch.tensor([[1.0, 1.0], [2.0, 3.0]]), torch.tensor([0.0, 6.0])), torch.tensor([2.0, 1.0])
    )


def test_loss_gradient_matches_finite_differences():
    m = small_meltr(seed=3, dtype=torch.float64)
    x = torch.tensor([0.3, 1.2, 2.5, 0.9, 0.4, 1.7, 3.1, 2.2], dtype=torch.float64)
    g = loss_gradient(m, x)
    eps = 1e-6
    fd = torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        for t in range(8):
            e = torch.zeros(8, dtype=torch.float64)
            e[t] = eps
            fd[t] = (m(x + e) - m(x - e)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)
    assert g.abs().max() > 1e-4
    gb = loss_gradient(m, torch.stack([x, 2 * x]))
    torch.testing.assert_close(gb[0], g)
    torch.testing.assert_close(gb[1], loss_gradient(m, 2 * x))


def test_response_curve():
    m = small_meltr(dtype=torch.float64)
    x = torch.rand(8, dtype=torch.float64)
    vals = torch.linspace(0, 5, 7, dtype=torch.float64)
    curve = response_curve(m, x, "mfm", vals)
    assert curve.shape == (7,)
    for v, c in zip(vals, curve, strict=True):
        y = x.clone()
        y[3] = v
        assert float(c) == pytest.approx(float(m(y).detach()), rel=1e-12, abs=1e-12)
    assert torch.equal(response_curve(m, x, 3, vals), curve)
    with pytest.raises(ValueError, match="base point"):
        response_curve(m, x[None], "mfm", vals)


class ToyBackbone(nn.Module):
    """Eight quadratic 'losses' of a linear model: L_t = mean((X w - y_t)^2)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, dtype=torch.float64) * 0.3)

    def forward(self, batch):
        x, ys = batch
        pred = x @ self.w
        return {n: ((pred - ys[:, i]) ** 2).mean() for i, n in enumerate(NAMES)}


def toy_setup(gamma=0.1):
    torch.manual_seed(1)
    backbone = ToyBackbone()
    meltr = small_meltr(seed=2, dtype=torch.float64)
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64))
    return backbone, meltr, batch, make_objectives(backbone, meltr, "alignment", gamma)


def test_objectives_values():
    backbone, meltr, batch, (problem, params, hparams, _) = toy_setup(gamma=0.1)
    with torch.no_grad():
        losses = meltr.stack(backbone(batch))
        aux = meltr(losses)
    assert float(problem.inner(params, hparams, batch)) == pytest.approx(float(aux))
    expected = float(losses[1]) + 0.1 * abs(float(losses.sum()) - float(aux))
    assert float(problem.outer(params, hparams, batch)) == pytest.approx(expected)
    assert isinstance(problem, bl.BilevelProblem)
    with pytest.raises(ValueError, match="gamma"):
        make_objectives(backbone, meltr, "alignment", gamma=-1.0)
    with pytest.raises(KeyError, match="unknown task"):
        make_objectives(backbone, meltr, "primary?")


def test_aid_fp_lite_hypergradient_matches_autograd():
    """grad F ~ grad_phi f - J grad_theta f, computed by hand with torch.autograd."""
    _, _, batch, (problem, params, hparams, obj) = toy_setup(gamma=0.1)
    hg = bl.get_solver("aid-fp-lite").hypergrad(problem, params, hparams, batch, batch)
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    h = {k: v.clone().requires_grad_() for k, v in hparams.items()}
    f = obj.outer(p, h, batch)
    gtf = torch.autograd.grad(f, list(p.values()), retain_graph=True)
    gphif = torch.autograd.grad(f, list(h.values()), allow_unused=True)
    g = obj.inner(p, h, batch)
    gtg = torch.autograd.grad(g, list(p.values()), create_graph=True)
    dot = sum((a * b.detach()).sum() for a, b in zip(gtg, gtf, strict=True))
    jv = torch.autograd.grad(dot, list(h.values()), allow_unused=True)
    for (k, _), a, b in zip(h.items(), gphif, jv, strict=True):
        a = torch.zeros_like(h[k]) if a is None else a
        b = torch.zeros_like(h[k]) if b is None else b
        torch.testing.assert_close(hg[k], a - b, rtol=1e-8, atol=1e-12)
    assert sum(float(v.abs().sum()) for v in hg.values()) > 0
    # gamma > 0: f depends on phi directly, so the direct term is non-zero
    assert any(a is not None and float(a.abs().sum()) > 0 for a in gphif)


def test_recent_train_batches_draw_from_the_last_ten_training_batches():
    recent = RecentTrainBatches(torch.Generator().manual_seed(0), history=10)
    with pytest.raises(RuntimeError, match="no training batch observed"):
        next(iter(recent))
    seen = list(recent.watch(range(25)))  # the training loader, watched
    assert seen == list(range(25)) and len(recent.watch(range(25))) == 25
    it = iter(recent)
    assert {next(it) for _ in range(300)} == set(range(15, 25))
    twins = [RecentTrainBatches(torch.Generator().manual_seed(0), 10) for _ in range(2)]
    for r in twins:
        list(r.watch(range(25)))
    a, b = iter(twins[0]), iter(twins[1])
    assert [next(a) for _ in range(20)] == [next(b) for _ in range(20)]  # deterministic from the generator
    with pytest.raises(ValueError, match="history must be a positive int"):
        RecentTrainBatches(torch.Generator(), history=0)


def test_meltr_gradient_is_finite_for_large_losses():
    m = small_meltr(dtype=torch.float64)
    g = loss_gradient(m, torch.full((8,), 1e3, dtype=torch.float64))
    assert torch.isfinite(g).all()
    assert not math.isnan(float(m(torch.zeros(8, dtype=torch.float64)).detach()))


@pytest.mark.parametrize("mixed", ["jvp", "fd"])
def test_meltr_hypergradient_in_every_mixed_mode(mixed, tiny_meltr_args):
    """On the MELTR objectives (tiny UniVL + the loss transformer, float64): forward mode equals the
    double backward to 1e-10; central differences are close (O(r^2))."""
    # training mode (no dropout in the tiny configs): torch's fused inference path of nn.TransformerEncoderLayer
    # (eval mode, no grad required) has no forward-mode derivative, so "jvp" needs training mode there
    args = tiny_meltr_args
    want = bl.AIDFPLite(scale=0.5).hypergrad(*args)
    got = bl.AIDFPLite(scale=0.5, mixed=mixed, fd_radius=1e-4).hypergrad(*args)
    num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want) ** 0.5
    den = sum(float((want[k] ** 2).sum()) for k in want) ** 0.5
    assert den > 0 and num <= (1e-10 if mixed == "jvp" else 1e-5) * den
