"""FSDP2 (``fully_shard``): 2 gloo ranks with a sharded model vs 1 process with the unsharded model on whole
batches; first-order solvers run and agree to rounding, the others refuse with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bilevel as bl
from bilevel.distributed import is_sharded

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "_scripts" / "fsdp_check.py"


def test_plain_params_are_not_sharded():
    assert not is_sharded({"w": torch.zeros(3), "b": torch.nn.Parameter(torch.zeros(2))})


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(SCRIPT), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_first_order_hypergradients_on_shards_equal_one_process(result):
    assert result["world"] == 2
    expected = {"sama", "sama+preconditioner", "sama-onesided", "aid-fp-lite-fd", "aid-cg-fd", "aid-fp-fd"}
    assert set(result["hypergrad"]) == expected
    for case, err in result["hypergrad"].items():
        assert err < 1e-10, (case, err)
    assert result["restored"]  # the shards' values and .grad are as before every hypergradient


def test_fsdp_trainer_equals_one_process_trainer(result):
    assert set(result["training"]) == {"sama", "sama+share", "aid-fp-lite-fd", "aid-fp-lite-fd+share"}
    for case, err in result["training"].items():
        assert err < 1e-10, (case, err)
    assert result["training_hyper_steps"] == 3


def test_what_cannot_run_on_shards_says_what_can(result):
    errors = result["errors"]
    assert set(errors) == {
        "aid-fp-lite-autograd", "aid-cg-exact-hvp", "itd", "no-reduce", "detached", "trainer-exact", "checkpoint"
    }  # fmt: skip
    for case in ("aid-fp-lite-autograd", "aid-cg-exact-hvp", "itd", "trainer-exact"):
        assert "FSDP" in errors[case] and "mixed='fd'" in errors[case], case
    assert "all_reduce_mean" in errors["no-reduce"]
    assert "named_parameters" in errors["detached"]
    assert "torch.distributed.checkpoint" in errors["checkpoint"]


def test_sama_default_is_first_order():
    solver = bl.SAMA()
    solver.check_sharded(None)  # single process: no reduce needed
    with pytest.raises(ValueError, match="FSDP"):
        bl.AIDFPLite().check_sharded(None)
