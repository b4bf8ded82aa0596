"""A solver in your own meta-learning loop: Meta-Weight-Net-style sample re-weighting on noisy labels.

python -m examples.own_meta_learning [--solver itd|aid-fp-lite|aid-cg|aid-fp|stocbio] [--steps 300] [--share]

--share (AID solvers): one Linearization of g per step gives both the inner step's gradient and the
hypergradient's first-order graph (one forward and backward of g less per step; the hyper step is then
taken before the inner update).
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import bilevel as bl
from bilevel.products import Linearization

OPTIONS = {"itd": {"steps": 1, "lr": 0.1}, "aid-fp-lite": {}, "aid-cg": {"iters": 5, "on_negative_curvature": "ignore"},
           "aid-fp": {"iters": 5, "alpha": 0.1}, "stocbio": {"iters": 5, "alpha": 0.1}}  # fmt: skip


def main(solver: str = "itd", steps: int = 300, seed: int = 0, share: bool = False) -> dict[str, float]:
    torch.manual_seed(seed)
    w = torch.randn(10)
    X, Xv = torch.randn(1000, 10), torch.randn(200, 10)  # training set, small clean meta set
    y, yv = (X @ w > 0).long(), (Xv @ w > 0).long()
    noisy = torch.rand(1000) < 0.4
    y = torch.where(noisy, 1 - y, y)  # 40% of the training labels flipped
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))  # inner: theta
    meta = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())  # outer: loss -> weight
    params, model_fn = bl.functional_module(model)  # detached views: they follow the in-place updates
    hparams, meta_fn = bl.functional_module(meta)

    def g(p, h, batch):  # inner objective: per-sample losses weighted by the meta-network
        losses = F.cross_entropy(model_fn(p, batch[0]), batch[1], reduction="none")
        return (meta_fn(h, losses.detach()[:, None]).squeeze(1) * losses).mean()

    def f(p, h, batch):  # outer objective: plain loss on the clean meta set
        return F.cross_entropy(model_fn(p, batch[0]), batch[1])

    problem, hg_solver = bl.BilevelProblem(inner=g, outer=f), bl.get_solver(solver, **OPTIONS[solver])
    opt, meta_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.Adam(meta.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, 1000, (100,))
        batch = (X[idx], y[idx])
        if share:  # g linearised once: its graph serves the hypergradient, its gradient the inner step
            lin = Linearization(problem, params, hparams, batch)
            hg = hg_solver.hypergrad_at(lin, (Xv, yv))
            for name, p in model.named_parameters():
                p.grad = lin.grad_theta[name]
            opt.step()  # after the hypergradient: the step changes theta in place, which lin's graph holds
        else:
            opt.zero_grad()
            g(dict(model.named_parameters()), hparams, batch).backward()  # inner step on theta
            opt.step()
            hg = hg_solver.hypergrad(problem, params, hparams, batch, (Xv, yv))  # dF/dphi, shaped like hparams
        for name, p in meta.named_parameters():
            p.grad = hg[name]
        meta_opt.step()  # outer step on phi
    with torch.no_grad():
        weights = meta(F.cross_entropy(model(X), y, reduction="none")[:, None]).squeeze(1)
        acc = (model(Xv).argmax(1) == yv).float().mean()
    return {"meta_acc": float(acc), "w_clean": float(weights[~noisy].mean()), "w_noisy": float(weights[noisy].mean())}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--solver", default="itd", choices=sorted(OPTIONS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--share", action="store_true", help="AID solvers: one linearisation of g per step")
    print(main(**vars(ap.parse_args())))
