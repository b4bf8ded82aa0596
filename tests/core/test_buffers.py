"""Buffer policy (issue 14 item 4): buffers are read, never written, while a hypergradient is computed, in every
solver and every product mode; only the training loop's inner update writes them (bilevel.functional)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.functional import buffers_read_only

F64 = torch.float64
AID = ("aid-cg", "aid-fp", "aid-fp-lite", "stocbio")
OPTS = {
    "aid-cg": {"iters": 4, "on_negative_curvature": "ignore"},
    "aid-fp": {"iters": 3, "alpha": 0.05, "on_divergence": "ignore"},
    "stocbio": {"iters": 3, "alpha": 0.05, "on_divergence": "ignore"},
    "itd": {"steps": 3, "lr": 0.05},
}


def _net(track: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, track_running_stats=track), nn.Tanh(), nn.Linear(8, 1))
    return net.double()


def _data(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=F64) * 2 + 1  # batch statistics far from the initial (0, 1)
    return x, x[:, :2].sum(1).sin()


def _problem(model_fn):
    def g(p, h, b):
        x, y = b
        fit = ((model_fn(p, x).squeeze(-1) - y) ** 2).mean()
        return fit + sum((h["lam"].exp() * (v**2).sum()) for v in p.values()) * 1e-2

    def f(p, h, b):
        x, y = b
        return ((model_fn(p, x).squeeze(-1) - y) ** 2).mean()

    return bl.BilevelProblem(inner=g, outer=f)


def _buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


def _solver(name: str, **kw):
    return bl.get_solver(name, **{**OPTS.get(name, {}), **kw})


def _hvp_batches():
    while True:
        yield _data(7)


def _hypergrad(name: str, net: nn.Module, **kw):
    params, fn = bl.functional_module(net)
    hparams = {"lam": torch.tensor(-1.0, dtype=F64)}
    extra = {"hvp_batches": _hvp_batches()} if name == "stocbio" else {}
    return _solver(name, **kw).hypergrad(_problem(fn), params, hparams, _data(1), _data(2), **extra)


CASES = [("itd", {})] + [(n, {"hvp": m}) for n in AID for m in bl.products.HVP_MODES]
CASES += [("aid-cg", {"mixed": m}) for m in bl.products.MIXED_MODES if m != "autograd"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=[f"{n}-{'-'.join(kw.values()) or 'default'}" for n, kw in CASES])
def test_hypergradient_leaves_buffers_unchanged(name, kw, train):
    net = _net().train(train)
    with torch.no_grad():
        net[1].running_mean.fill_(0.5)
        net[1].running_var.fill_(2.0)
    before = _buffers(net)
    hg = _hypergrad(name, net, **kw)
    after = _buffers(net)
    assert set(after) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for k in before:
        assert torch.equal(before[k], after[k]), f"{name} {kw}: buffer {k} was written"
    assert torch.isfinite(hg["lam"]) and net[1].track_running_stats  # the layer's own flag is restored


@pytest.mark.parametrize("name", ["aid-cg", "itd"])
def test_train_mode_normalises_with_batch_statistics_as_before(name):
    """The value is unchanged by the policy: in train mode a tracking layer normalises with the batch's own
    statistics, exactly as a layer that never tracks; every HVP mode gives the same hypergradient."""
    tracking, plain = _net(True).train(), _net(False).train()
    plain.load_state_dict({k: v for k, v in tracking.state_dict().items() if "running" not in k and "tracked" not in k})
    ref = _hypergrad(name, plain)
    torch.testing.assert_close(_hypergrad(name, tracking), ref, rtol=1e-12, atol=1e-14)
    if name == "aid-cg":
        for mode in ("rev-rev", "fwd-rev"):
            torch.testing.assert_close(_hypergrad(name, tracking, hvp=mode), ref, rtol=1e-10, atol=1e-12)


def test_eval_mode_reads_the_running_statistics():
    a, b = _net().eval(), _net().eval()
    with torch.no_grad():
        b[1].running_mean.fill_(3.0)
    assert not torch.allclose(_hypergrad("aid-cg", a)["lam"], _hypergrad("aid-cg", b)["lam"])


def test_read_only_scope_nests_and_restores_after_an_error():
    net = _net().train()
    params, fn = bl.functional_module(net)
    x, _ = _data(3)
    before = _buffers(net)
    with buffers_read_only():
        with buffers_read_only():
            fn(params, x)
        fn(params, x)
        with pytest.raises(RuntimeError):
            fn(params, x[:, :3])  # wrong width: the layer's flag must still be restored
    assert net[1].track_running_stats
    assert all(torch.equal(before[k], v) for k, v in _buffers(net).items())
    fn(params, x)  # outside the scope, a train-mode call updates the statistics as usual
    assert int(net[1].num_batches_tracked) == 1 and not torch.equal(before["1.running_mean"], net[1].running_mean)


def test_other_in_place_buffer_updates_are_discarded():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()
            self.register_buffer("calls", torch.zeros((), dtype=F64))

        def forward(self, x):
            self.calls.add_(1)
            return self.lin(x)

    m = Counter()
    params, fn = bl.functional_module(m)
    with buffers_read_only():
        fn(params, torch.ones(3, 2, dtype=F64))
    assert float(m.calls) == 0
    fn(params, torch.ones(3, 2, dtype=F64))
    assert float(m.calls) == 1


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("name", ["aid-cg", "itd", "stocbio"])
def test_trainer_updates_buffers_in_inner_steps_only(name, share):
    """A step with a hyper step changes the statistics exactly as the inner update's forward pass alone."""
    if share and name == "itd":
        pytest.skip("ITD takes no shared linearisation")
    net = _net().train()
    reference = copy.deepcopy(net)
    _, fn = bl.functional_module(net)
    problem = _problem(fn)
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.tensor(-1.0, dtype=F64))})
    cfg = bl.TrainerConfig(hyper_every=1, share_linearization=share)
    tr = bl.BilevelTrainer(
        net, torch.optim.SGD(net.parameters(), lr=0.0), problem.inner, outer=problem.outer, meta_model=meta,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=0.1), solver=_solver(name), config=cfg,
        hvp_batches=_hvp_batches() if name == "stocbio" else None,
    )  # fmt: skip
    metrics = tr.step(_data(1), _data(2))
    assert metrics["hyper"]
    reference(_data(1)[0])  # one train-mode forward on the inner batch
    for k, v in _buffers(reference).items():
        torch.testing.assert_close(dict(net.named_buffers())[k], v, rtol=0, atol=0, msg=f"buffer {k}")
