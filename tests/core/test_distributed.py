"""Data-parallel exactness: 2 gloo ranks started by torchrun vs the 1-process answers on whole batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bilevel as bl
from bilevel.distributed import all_reduce_mean, all_reduce_mean_tensors, is_distributed, rank, world_size
from bilevel.testing import ridge_diabetes

SCRIPT = Path(__file__).resolve().parents[1] / "_scripts" / "dist_check.py"
ROOT = Path(__file__).resolve().parents[2]


def test_helpers_are_identities_outside_a_process_group():
    assert not is_distributed() and rank() == 0 and world_size() == 1
    t = {"a": torch.ones(3)}
    assert all_reduce_mean(t)["a"] is t["a"]
    assert all_reduce_mean_tensors([t["a"]])[0] is t["a"]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_itd_reduce_path_equals_the_torch_func_path(optimizer):
    """With reduce = identity (one rank), ITD's plain-autograd data-parallel path gives the same numbers."""
    r = ridge_diabetes()
    p = {"w": torch.linspace(-1, 1, 10, dtype=torch.float64)}
    solver = bl.get_solver("itd", steps=6, lr=0.1, optimizer=optimizer)
    a, info = solver.hypergrad(r.problem(), p, r.hparams(-1.0), r.inner_batch, r.outer_batch, return_info=True)
    calls = []

    def ident(tree):
        calls.append(1)
        return tree

    b = solver.hypergrad(r.problem(), p, r.hparams(-1.0), r.inner_batch, r.outer_batch, reduce=ident)
    torch.testing.assert_close(a["lam"], b["lam"], rtol=1e-13, atol=1e-15)
    assert len(calls) == 2 * 6 + 1  # forward and backward of each step, and the final gradient
    assert info.iters == 6


def test_two_ranks_equal_one_process(tmp_path):
    out = tmp_path / "dist.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    # every solver (ITD included), on a quadratic and on an MLP with a meta network
    assert len(res["hypergrad"]) == 12
    for case, err in res["hypergrad"].items():
        assert err < 1e-12, (case, err)
    # averaging per-rank hypergradients is wrong: the check above can fail
    assert min(res["naive_average"].values()) > 1e-3
    assert len(res["training"]) == 5  # aid-cg, aid-fp-lite, itd; aid-cg and aid-fp-lite with share_linearization
    for name, err in res["training"].items():
        assert err < 1e-12, (name, err)
    assert res["training_hyper_steps"] == 3
    assert res["resume"] == 0.0
