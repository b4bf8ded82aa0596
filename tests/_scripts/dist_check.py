"""Distributed exactness check; run by tests/core/test_distributed.py as

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/_scripts/dist_check.py OUT.json

Every rank holds 1/N of every batch. Each rank also computes the single-process answers on the whole
batches locally (no collectives), so the comparison needs no second launch. Rank 0 writes a JSON of
relative errors: {"hypergrad": {case: err}, "naive_average": err, "training": {solver: err}, "resume": err}.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _ranks import data, flat, rel, shard, write
from torch import nn

import bilevel as bl
from bilevel.distributed import all_reduce_mean
from bilevel.testing import ridge_diabetes
from bilevel.training import BilevelTrainer, TrainerConfig


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    out: dict = {"world": world, "hypergrad": {}, "training": {}}
    # ---- hypergradients on ridge (quadratic) and on a small MELTR-like MLP (non-quadratic)
    r = ridge_diabetes()
    Xtr, ytr = r.inner_batch
    pieces = [(Xtr[i::3], ytr[i::3]) for i in range(3)]  # 98 rows each: StocBiO's fresh batches
    ridge = (r.problem(), {"w": torch.randn(10, dtype=torch.float64)}, r.hparams(-1.0), r.inner_batch, r.outer_batch)

    mlp = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2)).double()
    meta = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    _, fn = bl.functional_module(mlp)
    _, meta_fn = bl.functional_module(meta)

    def losses(p, b):  # per-sample losses (n, 2): the objectives below are means over samples
        x, y = b
        o = fn(p, x)
        return torch.stack([(o[:, 0] - y) ** 2, o[:, 1] ** 2], dim=1)

    def g(p, h, b):
        L = losses(p, b)
        w = nn.functional.softplus(meta_fn(h, L))[:, 0]
        return (L[:, 0] + w * L[:, 1]).mean() + 1e-2 * sum((v**2).sum() for v in p.values())

    def f(p, h, b):
        return losses(p, b)[:, 0].mean()

    mlp_case = (
        bl.BilevelProblem(g, f),
        bl.functional_module(mlp)[0],
        bl.functional_module(meta)[0],
        data(16, 1),
        data(16, 2),
    )
    solvers = {
        "aid-cg": dict(iters=40, tol=1e-14, on_negative_curvature="ignore"),
        "aid-fp": dict(iters=20, alpha=0.1, on_divergence="ignore"),  # the MLP case: H indefinite, the terms grow
        "aid-fp-lite": {},
        "stocbio": dict(iters=5, alpha=0.1, on_divergence="ignore"),
        "itd": dict(steps=5, lr=0.1),
        "itd-adam": dict(steps=4, lr=0.05, optimizer="adam"),
    }
    for case, (problem, p, h, bi, bo) in {"ridge": ridge, "mlp": mlp_case}.items():
        for name, opts in solvers.items():
            solver_name = "itd" if name.startswith("itd") else name
            full_solver, dist_solver = bl.get_solver(solver_name, **opts), bl.get_solver(solver_name, **opts)
            if name == "stocbio":
                full_pieces = pieces if case == "ridge" else [data(16, 10 + i) for i in range(3)]
                full_solver.batches = full_pieces
                dist_solver.batches = [shard(b) for b in full_pieces]
            full = full_solver.hypergrad(problem, p, h, bi, bo)
            mine = dist_solver.hypergrad(problem, p, h, shard(bi), shard(bo), reduce=all_reduce_mean)
            out["hypergrad"][f"{case}/{name}"] = rel(mine, full)
            if name == "aid-cg":
                local = bl.get_solver("aid-cg", **opts).hypergrad(problem, p, h, shard(bi), shard(bo))
                out.setdefault("naive_average", {})[case] = rel(all_reduce_mean(local), full)

    # ---- training: N-rank trainer on shards vs a 1-process trainer on whole batches
    def trainer(solver, distributed, share=False):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2)).double()
        if distributed:  # a different start on rank 1: the trainer must broadcast rank 0's parameters
            with torch.no_grad():
                for q in model.parameters():
                    q.add_(float(rank))
        m = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        _, fn2 = bl.functional_module(model)
        _, mfn2 = bl.functional_module(m)

        def losses2(p, b):
            x, y = b
            o = fn2(p, x)
            return torch.stack([(o[:, 0] - y) ** 2, o[:, 1] ** 2], dim=1)

        def g2(p, h, b):
            L = losses2(p, b)
            return (L[:, 0] + nn.functional.softplus(mfn2(h, L))[:, 0] * L[:, 1]).mean()

        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mopt = torch.optim.Adam(m.parameters(), lr=1e-2)
        cfg = TrainerConfig(
            hyper_every=2, clip_grad_norm=1.0, meta_clip_grad_norm=1.0, distributed=distributed,
            share_linearization=share,
        )  # fmt: skip
        f2 = lambda p, h, b: losses2(p, b)[:, 0].mean()  # noqa: E731
        return BilevelTrainer(model, opt, g2, outer=f2, meta_model=m, meta_optimizer=mopt, solver=solver, config=cfg)

    batches = [(data(16, 100 + i), data(16, 200 + i)) for i in range(6)]
    train_solvers = {"aid-cg": dict(iters=10, on_negative_curvature="ignore"), "aid-fp-lite": {}, "itd": dict(steps=3)}
    train_solvers |= {"aid-cg+share": train_solvers["aid-cg"], "aid-fp-lite+share": {}}  # share_linearization
    for key, opts in train_solvers.items():
        name, share = key.removesuffix("+share"), key.endswith("+share")
        ref = trainer(bl.get_solver(name, **opts), False, share)
        par = trainer(bl.get_solver(name, **opts), True, share)
        for bi, bo in batches:
            ref.step(bi, bo)
            par.step(shard(bi), shard(bo))
        out["training"][key] = rel(flat(par), flat(ref))
        out["training_hyper_steps"] = par.hyper_steps

    # ---- a collective checkpoint, then resume in a new trainer
    ckpt = sys.argv[1] + ".ckpt.pt"
    a = trainer(bl.get_solver("aid-fp-lite"), True)
    for i, (bi, bo) in enumerate(batches):
        a.step(shard(bi), shard(bo))
        if i == 2:
            a.save_checkpoint(ckpt)
    b = trainer(bl.get_solver("aid-fp-lite"), True)
    b.load_checkpoint(ckpt)
    for bi, bo in batches[3:]:
        b.step(shard(bi), shard(bo))
    out["resume"] = rel(flat(b), flat(a))
    write(out, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
