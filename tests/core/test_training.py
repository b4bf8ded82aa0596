"""BilevelTrainer: Algorithm 1 with every solver, the baselines, options, non-finite policy, fit/logging."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import scipy.optimize as so
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bilevel as bl
from bilevel.testing import ridge_diabetes
from bilevel.training import (
    BilevelTrainer,
    Callback,
    NonFiniteError,
    TrainerConfig,
    mtl_objective,
    single_task_objective,
)

C = 1e-2  # outer L2 on lam: F has a finite stationary point (without it some lam_i drift to +-inf)
RIDGE = ridge_diabetes()
F64 = torch.float64


def outer_reg(p, h, b):
    return RIDGE.outer(p, h, b) + 0.5 * C * (h["lam"] ** 2).sum()


def exact_F(x: np.ndarray) -> tuple[float, np.ndarray]:
    """F(lam) = f(w*(lam), lam) in closed form and its exact gradient."""
    h = {"lam": torch.as_tensor(x, dtype=F64)}
    val = float(RIDGE.hyperobjective(h)) + 0.5 * C * float((h["lam"] ** 2).sum())
    return val, (RIDGE.exact_hypergrad(h)["lam"] + C * h["lam"]).numpy()


def ridge_trainer(solver=None, meta_lr=20.0, inner_steps=10, **cfg) -> BilevelTrainer:
    model = nn.ParameterDict({"w": nn.Parameter(torch.zeros(10, dtype=F64))})
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.zeros(10, dtype=F64))})
    cfg.setdefault("hyper_every", inner_steps)
    return BilevelTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5),
        RIDGE.inner,
        outer=outer_reg,
        meta_model=meta,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=meta_lr),
        solver=solver,
        config=TrainerConfig(inner_steps=inner_steps, **cfg),
    )


def test_aid_cg_converges_to_stationary_point_of_exact_F():
    ref = so.minimize(exact_F, np.zeros(10), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    tr = ridge_trainer(bl.get_solver("aid-cg", iters=20, tol=1e-12))
    for _ in range(60):
        m = tr.step(RIDGE.inner_batch, RIDGE.outer_batch)
        assert m["hyper"]
    F, g = exact_F(tr.hparams["lam"].numpy())
    assert np.abs(g).max() < 1e-6
    assert abs(F - ref.fun) / ref.fun < 1e-6
    assert tr.hyper_steps == 60 and tr.inner_updates == 600


@pytest.mark.parametrize(
    "name,opts",
    [
        ("aid-fp", {"iters": 30, "alpha": 0.15}),
        ("aid-fp-lite", {}),
        ("itd", {"steps": 10, "lr": 0.15}),
        ("stocbio", {"iters": 30, "alpha": 0.15}),
        ("aid-cg", {"iters": 5}),
    ],
)
def test_every_solver_lowers_F(name, opts):
    tr = ridge_trainer(bl.get_solver(name, **opts))
    F0 = exact_F(np.zeros(10))[0]
    for _ in range(10):
        tr.step(RIDGE.inner_batch, RIDGE.outer_batch)
    assert exact_F(tr.hparams["lam"].numpy())[0] < F0 - 1e-3


RIDGE_BATCHES = (RIDGE.inner_batch, RIDGE.outer_batch)


@pytest.mark.parametrize("name,share", [("aid-cg", False), ("aid-cg", True), ("aid-fp-lite", True)])
def test_one_step_equals_algorithm_1_by_hand(name, share):
    """theta1 = theta0 - lr grad g(theta0, phi0); phi1 = phi0 - mlr * hypergrad(theta1, phi0), or with
    share_linearization the hyper step first: phi1 = phi0 - mlr * hypergrad(theta0, phi0)."""
    torch.manual_seed(0)
    solver = bl.get_solver(name, **({"iters": 30, "tol": 1e-14} if name == "aid-cg" else {}))
    model = nn.ParameterDict({"w": nn.Parameter(torch.randn(10, dtype=F64))})
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.randn(10, dtype=F64))})
    theta0, phi0 = model["w"].detach().clone(), meta["lam"].detach().clone()
    tr = BilevelTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), RIDGE.inner, outer=outer_reg, meta_model=meta,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=0.5), solver=solver,
        config=TrainerConfig(share_linearization=share),
    )  # fmt: skip
    m = tr.step(*RIDGE_BATCHES)
    w = theta0.clone().requires_grad_()
    (gw,) = torch.autograd.grad(RIDGE.inner({"w": w}, {"lam": phi0}, RIDGE.inner_batch), w)
    theta1 = theta0 - 0.1 * gw
    at = theta0 if share else theta1
    hg = solver.hypergrad(bl.BilevelProblem(RIDGE.inner, outer_reg), {"w": at}, {"lam": phi0}, *RIDGE_BATCHES)
    torch.testing.assert_close(model["w"].detach(), theta1, rtol=0, atol=1e-15)
    torch.testing.assert_close(meta["lam"].detach(), phi0 - 0.5 * hg["lam"], rtol=0, atol=1e-15)
    assert m["hyper"] and m["step"] == 1 and math.isfinite(m["outer_loss"]) and m["hypergrad_norm"] > 0
    assert ("linearize" in m["hypergrad_info"].times) is not share
    assert m["inner_loss"] == pytest.approx(float(RIDGE.inner({"w": theta0}, {"lam": phi0}, RIDGE.inner_batch)))


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "aid-fp-lite", "stocbio"])
def test_shared_linearization_saves_one_evaluation_of_g_per_hyper_step(name):
    opts = {"aid-cg": {"iters": 3, "on_negative_curvature": "ignore"}, "aid-fp": {"iters": 3, "alpha": 0.1}}
    opts["stocbio"] = {"iters": 3, "alpha": 0.1}
    counts = {}
    for share in (False, True):
        calls: list[int] = []
        tr = meltr_like(bl.get_solver(name, **opts.get(name, {})), calls, share_linearization=share)
        meta_before = [p.detach().clone() for p in tr.meta_model.parameters()]
        for i in range(6):
            tr.step(_mlp_data(seed=i), _mlp_data(seed=100 + i))
        assert tr.hyper_steps == 3 and tr.inner_updates == 6
        assert any(not torch.equal(a, b) for a, b in zip(meta_before, tr.meta_model.parameters(), strict=True))
        counts[share] = len(calls)
    assert counts[False] - counts[True] == 3  # StocBiO without batches: its HVPs use the shared graph too


def test_shared_linearization_config_errors():
    with pytest.raises(ValueError, match="share_linearization needs inner_steps == 1"):
        TrainerConfig(share_linearization=True, inner_steps=2)
    with pytest.raises(ValueError, match="share_linearization needs inner_steps == 1"):
        TrainerConfig(share_linearization=True, grad_accumulation=2)
    with pytest.raises(ValueError, match=r"share_linearization needs an AID solver .* got ITD"):
        meltr_like(bl.get_solver("itd", steps=1), share_linearization=True)


def test_shared_linearization_nonfinite_policies():
    tr = adam_ridge(share_linearization=True)
    tr.step(*RIDGE_BATCHES)
    before = _snapshot(tr)
    with pytest.raises(NonFiniteError, match=r"step 2: inner objective g is non-finite.*inner level") as ei:
        tr.step(_nan_batch(RIDGE.inner_batch), RIDGE.outer_batch)  # step 2 is a hyper step
    assert ei.value.level == "inner"
    _assert_same(before, _snapshot(tr))
    tr = adam_ridge(share_linearization=True, rollback=False)
    tr.step(*RIDGE_BATCHES)
    before = _snapshot(tr)
    with pytest.raises(NonFiniteError, match=r"states are unchanged$"):  # the hyper step came first
        tr.step(RIDGE.inner_batch, _nan_batch(RIDGE.outer_batch))
    _assert_same(before, _snapshot(tr))
    tr = adam_ridge(share_linearization=True, on_nonfinite="skip")
    tr.step(*RIDGE_BATCHES)
    theta, phi = tr.params["w"].clone(), tr.hparams["lam"].clone()
    m = tr.step(_nan_batch(RIDGE.inner_batch), RIDGE.outer_batch)
    assert m["skipped"] == "inner" and not m["hyper"] and tr.skipped_inner == 1 and tr.hyper_steps == 0
    assert torch.equal(tr.params["w"], theta) and torch.equal(tr.hparams["lam"], phi)
    m = tr.step(RIDGE.inner_batch, _nan_batch(RIDGE.outer_batch))  # step 3 (2nd update): outer skipped
    assert m["skipped"] == "outer" and tr.skipped_outer == 1 and tr.inner_updates == 2
    assert torch.equal(tr.hparams["lam"], phi) and not torch.equal(tr.params["w"], theta)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 4), warmup=st.integers(0, 6), n=st.integers(1, 14))
def test_hyper_step_schedule(k, warmup, n):
    tr = ridge_trainer(bl.get_solver("aid-fp-lite"), inner_steps=1, hyper_every=k, warmup_steps=warmup, meta_lr=0.1)
    hyper_at = [tr.step(*RIDGE_BATCHES)["hyper"] for _ in range(n)]
    expected = [(u % k == 0 and u > warmup) for u in range(1, n + 1)]
    assert hyper_at == expected
    assert tr.hyper_steps == sum(expected)


def _mlp_losses(model_fn):
    def losses(p, batch):
        x, y = batch
        out = model_fn(p, x)
        return torch.stack([((out[:, 0] - y) ** 2).mean(), (out[:, 1] ** 2).mean(), out.abs().mean()])

    return losses


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _mlp_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=F64)
    return x, x.sum(1).sin()


def test_mtl_with_one_hot_weights_equals_single_task():
    runs = []
    for kind in ("single", "mtl"):
        model = _mlp()
        _, fn = bl.functional_module(model)
        losses = _mlp_losses(fn)
        g = (
            single_task_objective(lambda p, b, losses=losses: losses(p, b)[0])
            if kind == "single"
            else mtl_objective(losses, [1, 0, 0])
        )
        tr = BilevelTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), g)
        for i in range(5):
            tr.step(_mlp_data(seed=i))
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert tr.hyper_steps == 0 and tr.inner_updates == 5


def test_mtl_objective_sums_and_validates():
    losses = lambda p, b: torch.tensor([1.0, 2.0, 3.0])  # noqa: E731
    assert float(mtl_objective(losses)({}, {}, None)) == 6.0
    assert float(mtl_objective(losses, [0.5, 0, 1])({}, {}, None)) == 3.5
    with pytest.raises(ValueError, match="3 losses"):
        mtl_objective(losses, [1.0, 1.0])({}, {}, None)


def meltr_like(solver, calls=None, **cfg):
    """A backbone MLP and a small meta-network that combines its three losses (MELTR's shape).
    ``calls``: a list that gets one entry per evaluation of ``g``."""
    model = _mlp()
    meta = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    _, fn = bl.functional_module(model)
    _, meta_fn = bl.functional_module(meta)
    losses = _mlp_losses(fn)

    def g(p, h, b):
        if calls is not None:
            calls.append(1)
        L = losses(p, b)
        return L[0] + nn.functional.softplus(meta_fn(h, L[None])).sum() * L[1:].sum()

    def f(p, h, b):
        return losses(p, b)[0]

    return BilevelTrainer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), g, outer=f, meta_model=meta,
        meta_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-2), solver=solver,
        config=TrainerConfig(hyper_every=2, meta_clip_grad_norm=50.0, **cfg),
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(bl.SOLVERS))
def test_modules_on_both_levels_with_every_solver(name):
    opts = {"stocbio": {"iters": 3, "alpha": 0.1}, "aid-fp": {"iters": 3, "alpha": 0.1}, "itd": {"steps": 2}}
    opts["aid-cg"] = {"iters": 5, "on_negative_curvature": "ignore"}  # the MLP is not convex
    opts["nystrom"] = {"rank": 3, "on_negative_curvature": "ignore"}
    tr = meltr_like(bl.get_solver(name, **opts.get(name, {})))
    meta_before = [p.detach().clone() for p in tr.meta_model.parameters()]
    for i in range(4):
        m = tr.step(_mlp_data(seed=i), _mlp_data(seed=100 + i))
    assert tr.hyper_steps == 2 and m["hyper"]
    assert any(not torch.equal(a, b) for a, b in zip(meta_before, tr.meta_model.parameters(), strict=True))
    assert all(p.grad is None for p in tr.meta_model.parameters())  # the trainer cleans up .grad


def test_gradient_accumulation_equals_full_batch():
    x, y = _mlp_data(64)
    out = []
    for accum in (1, 2):
        model = _mlp()
        _, fn = bl.functional_module(model)
        g = single_task_objective(lambda p, b, fn=fn: ((fn(p, b[0])[:, 0] - b[1]) ** 2).mean())
        tr = BilevelTrainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), g, config=TrainerConfig(grad_accumulation=accum)
        )
        for _ in range(3):
            if accum == 1:
                tr.step((x, y))
            else:
                tr.step((x[:32], y[:32]))
                tr.step((x[32:], y[32:]))
        assert tr.inner_updates == 3
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-14)


def test_clip_grad_norm_limits_the_update():
    model = nn.ParameterDict({"w": nn.Parameter(torch.zeros(10, dtype=F64))})
    g = lambda p, h, b: 100.0 * (p["w"] - 1).pow(2).sum()  # noqa: E731
    tr = BilevelTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), g, config=TrainerConfig(clip_grad_norm=2.0))
    tr.step(None)
    assert float(model["w"].detach().norm()) == pytest.approx(
        0.1 * 2.0, rel=1e-7
    )  # clip_grad_norm_ adds 1e-6 to the norm


def _nan_batch(batch):
    X, y = batch
    X = X.clone()
    X[0, 0] = float("nan")
    return X, y


def _snapshot(tr):
    return (
        {k: v.clone() for k, v in tr.model.state_dict().items()},
        {k: v.clone() for k, v in tr.meta_model.state_dict().items()},
        repr(tr.optimizer.state_dict()),
        repr(tr.meta_optimizer.state_dict()),
        tr._counters(),
    )


def _assert_same(a, b):
    for x, y in zip(a[:2], b[:2], strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert a[2:] == b[2:]


def adam_ridge(**cfg):
    model = nn.ParameterDict({"w": nn.Parameter(torch.zeros(10, dtype=F64))})
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.zeros(10, dtype=F64))})
    return BilevelTrainer(
        model, torch.optim.Adam(model.parameters(), lr=0.01), RIDGE.inner, outer=outer_reg, meta_model=meta,
        meta_optimizer=torch.optim.Adam(meta.parameters(), lr=0.01), solver=bl.get_solver("aid-cg", iters=5),
        config=TrainerConfig(hyper_every=2, **cfg),
    )  # fmt: skip


def test_nonfinite_inner_raises_and_leaves_state_unchanged():
    tr = adam_ridge()
    for _ in range(3):
        tr.step(*RIDGE_BATCHES)
    before = _snapshot(tr)
    with pytest.raises(NonFiniteError, match=r"step 4: inner loss is non-finite \(nan\) at the inner level") as ei:
        tr.step(_nan_batch(RIDGE.inner_batch), RIDGE.outer_batch)
    assert (ei.value.step, ei.value.level) == (4, "inner") and math.isnan(ei.value.loss)
    _assert_same(before, _snapshot(tr))
    tr.step(*RIDGE_BATCHES)  # and training goes on
    assert tr.step_count == 4


def test_nonfinite_outer_raises_and_rolls_back_the_inner_update_too():
    tr = adam_ridge()
    tr.step(*RIDGE_BATCHES)
    before = _snapshot(tr)
    with pytest.raises(NonFiniteError, match=r"step 2: outer level \(hyper step\).*outer objective f is non-finite"):
        tr.step(RIDGE.inner_batch, _nan_batch(RIDGE.outer_batch))  # step 2 is a hyper step
    _assert_same(before, _snapshot(tr))


def test_nonfinite_outer_without_rollback_says_so():
    tr = adam_ridge(rollback=False)
    tr.step(*RIDGE_BATCHES)
    with pytest.raises(NonFiniteError, match="except the inner update of this step"):
        tr.step(RIDGE.inner_batch, _nan_batch(RIDGE.outer_batch))


def test_nonfinite_skip_policy_counts_and_skips():
    tr = adam_ridge(on_nonfinite="skip")
    tr.step(*RIDGE_BATCHES)
    theta, phi = tr.params["w"].clone(), tr.hparams["lam"].clone()
    m = tr.step(RIDGE.inner_batch, _nan_batch(RIDGE.outer_batch))  # inner update kept, hyper step skipped
    assert m["skipped"] == "outer" and not m["hyper"] and tr.skipped_outer == 1
    assert not torch.equal(tr.params["w"], theta) and torch.equal(tr.hparams["lam"], phi)
    theta = tr.params["w"].clone()
    m = tr.step(_nan_batch(RIDGE.inner_batch), RIDGE.outer_batch)
    assert m["skipped"] == "inner" and tr.skipped_inner == 1 and torch.equal(tr.params["w"], theta)
    assert tr.inner_updates == 2 and tr.step_count == 3


def test_hyper_step_without_outer_batch_and_bad_config():
    tr = adam_ridge()
    tr.step(*RIDGE_BATCHES)
    with pytest.raises(ValueError, match="needs an outer_batch"):
        tr.step(RIDGE.inner_batch)
    with pytest.raises(ValueError, match="hyper_every"):
        TrainerConfig(hyper_every=0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainerConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainerConfig(inner_steps=2, grad_accumulation=2)
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="outer="):
        BilevelTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), RIDGE.inner, solver=bl.get_solver("aid-cg"))


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_fit_start(self, trainer):
        self.events.append("start")

    def on_step_end(self, trainer, metrics):
        self.events.append(metrics["step"])
        if metrics["step"] == self.stop_at:
            trainer.should_stop = True

    def on_epoch_end(self, trainer, epoch):
        self.events.append(f"epoch{epoch}")

    def on_fit_end(self, trainer):
        self.events.append("end")


def _loaders():
    X, y = RIDGE.inner_batch
    ds = torch.utils.data.TensorDataset(X, y)
    inner = torch.utils.data.DataLoader(ds, batch_size=100, shuffle=True)  # 3 batches per epoch
    outer = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*RIDGE.outer_batch), batch_size=64, shuffle=True)
    return inner, outer


def test_fit_logs_jsonl_csv_and_calls_callbacks(tmp_path):
    tr = ridge_trainer(bl.get_solver("stocbio", iters=3, alpha=0.1), inner_steps=1, hyper_every=2, meta_lr=1.0)
    rec = Recorder()
    tr.callbacks.append(rec)
    inner, outer = _loaders()
    last = tr.fit(inner, outer, epochs=2, log_dir=tmp_path, progress=False, checkpoint_path=tmp_path / "c.pt")
    assert rec.events == ["start", 1, 2, 3, "epoch0", 4, 5, 6, "epoch1", "end"]
    assert last["step"] == 6 and tr.epoch == 2 and tr.hyper_steps == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[1]["hyper"] and rows[1]["outer_loss"] > 0
    with open(tmp_path / "metrics.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert len(csv_rows) == 6 and float(csv_rows[5]["inner_loss"]) == pytest.approx(rows[5]["inner_loss"])
    assert isinstance(tr.solver.batches, object) and tr._cursors["hvp"].index > 0  # StocBiO drew fresh batches
    assert (tmp_path / "c.pt").exists()


def test_fit_max_steps_and_stop_request(capsys):
    tr = ridge_trainer(bl.get_solver("aid-fp-lite"), inner_steps=1, hyper_every=1, meta_lr=0.1)
    inner, outer = _loaders()
    tr.fit(inner, outer, epochs=10, max_steps=4, progress=False)
    assert tr.step_count == 4 and tr.epoch == 1
    tr.callbacks.append(Recorder(stop_at=6))
    tr.fit(inner, outer, epochs=10, progress=True)
    assert tr.step_count == 6
    with pytest.raises(ValueError, match="outer_loader"):
        tr.fit(inner)


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    tr = ridge_trainer(None, inner_steps=1)
    inner, _ = _loaders()
    tr.fit(inner, epochs=1, log_dir=tmp_path, tensorboard=True, progress=False)
    assert list((tmp_path / "tb").glob("events.*"))
