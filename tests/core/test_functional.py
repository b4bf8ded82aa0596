"""nn.Module helper, and the distributed ``reduce`` hook simulated with two threads."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import rel_err
from torch import nn

import bilevel as bl


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.frozen = nn.Linear(3, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.bn(self.lin(x))).squeeze(-1)


def test_functional_module_matches_module():
    torch.manual_seed(0)
    net = Net().double().eval()
    net.bn.running_mean.fill_(0.3)
    params, fn = bl.functional_module(net)
    assert sorted(params) == ["bn.bias", "bn.weight", "lin.bias", "lin.weight"]
    assert "bn.running_mean" in fn.constants and "frozen.weight" in fn.constants
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fn(params, x), net(x))
    new = {k: v + 1.0 for k, v in params.items()}
    bl.load_params(net, new)
    torch.testing.assert_close(fn(new, x), net(x))
    with pytest.raises(KeyError, match="nope"):
        bl.load_params(net, {"nope": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"nn\.Module"):
        bl.functional_module(lambda x: x)


def test_hypergrad_through_module(diabetes):
    """Ridge written as nn.Linear (no bias) gives the exact hypergradient of the dict version."""
    P = diabetes
    h = P.hparams(-1.0)
    model = nn.Linear(P.dim, 1, bias=False).double()
    params, fn = bl.functional_module(model)
    params = {"weight": P.solution(h)["w"][None, :]}

    def inner(p, hp, batch):
        X, y = batch
        return 0.5 * ((fn(p, X).squeeze(-1) - y) ** 2).mean() + 0.5 * (hp["lam"].exp() * p["weight"][0] ** 2).sum()

    def outer(p, hp, batch):
        X, y = batch
        return 0.5 * ((fn(p, X).squeeze(-1) - y) ** 2).mean()

    hg = bl.AIDCG(iters=50, tol=1e-14).hypergrad(
        bl.BilevelProblem(inner, outer), params, h, P.inner_batch, P.outer_batch
    )
    assert rel_err(hg, P.exact_hypergrad(h)) < 1e-9


class ThreadAllReduce:
    """Mean of a tree over ``n`` threads, a stand-in for torch.distributed.all_reduce."""

    def __init__(self, n):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def fn(self, rank):
        def reduce(tree):
            self.slots[rank] = tree
            self.barrier.wait()
            out = {k: sum(s[k] for s in self.slots) / self.n for k in tree}
            self.barrier.wait()
            return out

        return reduce


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "aid-fp-lite", "stocbio", "itd"])
def test_reduce_gives_whole_batch_hypergradient(diabetes, name):
    """Two 'ranks' with half of every batch each + reduce == one process on the whole batch.

    Averaging the two per-rank hypergradients instead is measurably wrong.
    """
    P = diabetes
    h = P.hparams(-1.0)
    theta = P.solution(h)
    _, L = P.curvature(h)
    opts = {
        "aid-cg": {"iters": 30},
        "aid-fp": {"iters": 30, "alpha": 1 / L},
        "stocbio": {"iters": 30, "alpha": 1 / L},
        "itd": {"steps": 30, "lr": 0.5 / L, "optimizer": "momentum"},
    }
    opts = opts.get(name, {})
    whole = bl.get_solver(name, **opts).hypergrad(P.problem(), theta, h, P.inner_batch, P.outer_batch)
    (Xi, yi), (Xo, yo) = P.inner_batch, P.outer_batch
    # equal shards, so the mean of shard means is the whole-batch mean
    ni, no = (len(Xi) // 2) * 2, (len(Xo) // 2) * 2
    assert ni == len(Xi) and no == len(Xo)
    shards = [((Xi[r::2], yi[r::2]), (Xo[r::2], yo[r::2])) for r in range(2)]
    red, out, errors = ThreadAllReduce(2), [None, None], []

    def run(rank):
        try:
            s = bl.get_solver(name, **opts)
            if name == "stocbio":
                s.batches = [shards[rank][0]]
            out[rank] = s.hypergrad(P.problem(), theta, h, *shards[rank], reduce=red.fn(rank))
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
            red.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in range(2):
        torch.testing.assert_close(out[r], whole, rtol=1e-9, atol=1e-12)
    naive = [bl.get_solver(name, **opts).hypergrad(P.problem(), theta, h, *shards[r]) for r in range(2)]
    naive_mean = {"lam": (naive[0]["lam"] + naive[1]["lam"]) / 2}
    if name != "aid-fp-lite":  # here J = diag(exp(lam) w) does not depend on the data, so lite is linear in it
        assert rel_err(naive_mean, whole) > 1e-6
