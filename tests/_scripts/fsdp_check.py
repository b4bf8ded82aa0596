"""FSDP2 exactness check; run by tests/core/test_fsdp.py as

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/_scripts/fsdp_check.py OUT.json

The inner model is sharded with ``fully_shard`` (gloo, CPU, float64); every rank holds 1/N of every
batch. Each rank also computes the single-process answers with an unsharded copy on the whole batches
(no collectives), so one launch compares both. Rank 0 writes a JSON:
{"hypergrad": {solver: rel err}, "restored": bool, "errors": {case: message}, "training": {case: rel err}}.
"""

from __future__ import annotations

import copy
import gc
import sys

import torch
import torch.distributed as dist
from _ranks import data, flat, rel, shard, write
from torch import nn
from torch.distributed.fsdp import fully_shard

import bilevel as bl
from bilevel.distributed import all_reduce_mean
from bilevel.training import BilevelTrainer, TrainerConfig


def shard_model(model: nn.Module) -> nn.Module:
    sharded = copy.deepcopy(model)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    return sharded


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)

    def objectives(model, meta):
        _, fn = bl.functional_module(model)
        _, meta_fn = bl.functional_module(meta)

        def losses(p, b):  # per-sample (n, 2); objectives are sample means, so the rank mean is the whole batch
            x, y = b
            o = fn(p, x)
            return torch.stack([(o[:, 0] - y) ** 2, o[:, 1] ** 2], dim=1)

        def g(p, h, b):
            L = losses(p, b)
            return (L[:, 0] + nn.functional.softplus(meta_fn(h, L))[:, 0] * L[:, 1]).mean()

        def f(p, h, b):
            return losses(p, b)[:, 0].mean()

        return bl.BilevelProblem(g, f)

    # 7 rows in the first layer: unevenly sharded over 2 ranks
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    meta = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
    sharded = shard_model(mlp)
    problem, problem_sharded = objectives(mlp, meta), objectives(sharded, meta)
    p_ref, h = bl.functional_module(mlp)[0], bl.functional_module(meta)[0]
    live = dict(sharded.named_parameters())
    bi, bo = data(16, 1), data(16, 2)
    pre_ref = {k: 0.1 + v**2 for k, v in p_ref.items()}  # a positive diagonal for SAMA
    pre_live = {k: 0.1 + v.detach() ** 2 for k, v in live.items()}

    out: dict = {"world": world, "hypergrad": {}, "errors": {}, "training": {}}
    before = {k: v.detach().full_tensor().clone() for k, v in live.items()}
    cases = {
        "sama": (bl.SAMA(), {}),
        "sama+preconditioner": (bl.SAMA(), {"preconditioner": "yes"}),
        "sama-onesided": (bl.SAMA(mixed="fd-onesided"), {}),
        "aid-fp-lite-fd": (bl.AIDFPLite(mixed="fd"), {}),
        "aid-cg-fd": (bl.AIDCG(iters=5, hvp="fd", mixed="fd", on_negative_curvature="ignore"), {}),
        "aid-fp-fd": (bl.AIDFP(iters=5, alpha=0.1, hvp="fd", mixed="fd", on_divergence="ignore"), {}),
    }
    for name, (solver, extra) in cases.items():
        kw_ref = {"preconditioner": pre_ref} if extra else {}
        kw_live = {"preconditioner": pre_live} if extra else {}
        ref = solver.hypergrad(problem, p_ref, h, bi, bo, **kw_ref)
        mine = solver.hypergrad(problem_sharded, live, h, shard(bi), shard(bo), reduce=all_reduce_mean, **kw_live)
        out["hypergrad"][name] = rel(mine, ref)
    after = {k: v.detach().full_tensor() for k, v in live.items()}
    out["restored"] = all(torch.equal(before[k], after[k]) for k in before) and all(
        v.grad is None for v in live.values()
    )

    def error(name, fn):
        try:
            fn()
        except (ValueError, NotImplementedError) as exc:
            out["errors"][name] = str(exc)

    args = (problem_sharded, live, h, shard(bi), shard(bo))
    error("aid-fp-lite-autograd", lambda: bl.AIDFPLite().hypergrad(*args, reduce=all_reduce_mean))
    error("aid-cg-exact-hvp", lambda: bl.AIDCG(mixed="fd").hypergrad(*args, reduce=all_reduce_mean))
    error("itd", lambda: bl.ITD(steps=2).hypergrad(*args, reduce=all_reduce_mean))
    error("no-reduce", lambda: bl.SAMA().hypergrad(*args))
    detached = {k: v.detach() for k, v in live.items()}
    error("detached", lambda: bl.SAMA().hypergrad(problem_sharded, detached, h, shard(bi), shard(bo)))

    # ---- training: the FSDP trainer on shards vs a 1-process trainer on whole batches
    def trainer(solver, fsdp, share=False):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
        m = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()
        if fsdp:
            model = shard_model(model)
        prob = objectives(model, m)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        mopt = torch.optim.Adam(m.parameters(), lr=1e-2)
        cfg = TrainerConfig(
            hyper_every=2, clip_grad_norm=1.0, meta_clip_grad_norm=1.0, distributed=fsdp, share_linearization=share
        )
        return BilevelTrainer(
            model, opt, prob.inner, outer=prob.outer, meta_model=m, meta_optimizer=mopt, solver=solver, config=cfg
        )

    batches = [(data(16, 100 + i), data(16, 200 + i)) for i in range(6)]
    for key, make in {
        "sama": lambda: bl.SAMA(),
        "sama+share": lambda: bl.SAMA(),
        "aid-fp-lite-fd": lambda: bl.AIDFPLite(mixed="fd"),
        "aid-fp-lite-fd+share": lambda: bl.AIDFPLite(mixed="fd"),
    }.items():
        share = key.endswith("+share")
        ref, par = trainer(make(), False, share), trainer(make(), True, share)
        for b_in, b_out in batches:
            ref.step(b_in, b_out)
            par.step(shard(b_in), shard(b_out))
        out["training"][key] = rel(flat(par), flat(ref))
        out["training_hyper_steps"] = par.hyper_steps
    error("trainer-exact", lambda: trainer(bl.AIDFPLite(), True))
    error("checkpoint", lambda: trainer(bl.SAMA(), True).save_checkpoint(sys.argv[1] + ".ckpt.pt"))
    write(out, sys.argv[1])
    dist.barrier()


if __name__ == "__main__":
    main()
    # the process group is destroyed after the sharded models are gone (destroyed while they were alive, a
    # rank aborted at exit now and then: "terminate called without an active exception")
    gc.collect()
    dist.destroy_process_group()
