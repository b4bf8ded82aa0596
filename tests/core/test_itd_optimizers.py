"""ITD's differentiable optimizers against an independent unrolled reference in plain autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import itd_unroll as _reference
from conftest import rel_err

import bilevel as bl


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_itd_matches_autograd_unroll(breast_cancer, optimizer):
    P = breast_cancer
    lam = torch.full((P.dim,), -1.5, dtype=torch.float64)
    theta0 = 0.1 * torch.randn(P.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr = 0.05 if optimizer == "adam" else 0.5
    ours = bl.ITD(steps=15, lr=lr, optimizer=optimizer).hypergrad(
        P.problem(), {"w": theta0}, {"lam": lam}, P.inner_batch, P.outer_batch
    )
    ref = _reference(P, theta0, lam, 15, lr, optimizer)
    assert rel_err(ours, ref) < 1e-10
    assert float(ours["lam"].abs().sum()) > 0


def test_itd_zero_steps_is_direct_gradient(diabetes):
    P = diabetes
    h = P.hparams(-1.0)
    hg = bl.ITD(steps=0).hypergrad(P.problem(), P.solution(h), h, P.inner_batch, P.outer_batch)
    assert torch.equal(hg["lam"], torch.zeros_like(h["lam"]))  # f does not depend on lam directly


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_itd_checkpoint_matches_autograd_unroll(breast_cancer, optimizer):
    """Checkpointed ITD (segments of ceil(sqrt(15)) = 4 steps recomputed in the backward pass) against the
    plain autograd unroll: equal up to the order of floating-point sums."""
    P = breast_cancer
    lam = torch.full((P.dim,), -1.5, dtype=torch.float64)
    theta0 = 0.1 * torch.randn(P.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lr = 0.05 if optimizer == "adam" else 0.5
    ours = bl.ITD(steps=15, lr=lr, optimizer=optimizer, checkpoint=True).hypergrad(
        P.problem(), {"w": theta0}, {"lam": lam}, P.inner_batch, P.outer_batch
    )
    ref = _reference(P, theta0, lam, 15, lr, optimizer)
    assert rel_err(ours, ref) < 1e-12
