"""ITD's truncated back-propagation, checkpointing, divergence policy and data-parallel modes.

References are independent plain-autograd unrolls (not the solver's code); the divergence cases are
``lr = 3/L`` (SGD is stable only below ``2/L``) on :mod:`bilevel.testing` problems.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from conftest import itd_unroll as _unroll
from conftest import rel_err

import bilevel as bl
from bilevel.errors import ITDDivergenceError, ITDDivergenceWarning
from bilevel.testing import ridge_diabetes, ridge_synthetic

OPTIMIZERS = ["sgd", "momentum", "adam"]


def _args(P, start="random", value=-1.5):
    h = P.hparams(value)
    if start == "solution":
        p = P.solution(h)
    else:
        p = {"w": 0.1 * torch.randn(P.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)}
    return P.problem(), p, h, P.inner_batch, P.outer_batch


def _lr(P, optimizer, args):
    return 0.05 if optimizer == "adam" else 1.0 / P.curvature(args[2])[1]


# ------------------------------------------------------------------------------------------ truncation


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_truncate_all_steps_is_the_plain_unroll_bit_for_bit(breast_cancer, optimizer):
    P = breast_cancer
    args = _args(P)
    lr = _lr(P, optimizer, args)
    plain = bl.ITD(steps=12, lr=lr, optimizer=optimizer).hypergrad(*args)
    full = bl.ITD(steps=12, lr=lr, optimizer=optimizer, truncate=12).hypergrad(*args)
    assert torch.equal(plain["lam"], full["lam"])
    shorter = bl.ITD(steps=12, lr=lr, optimizer=optimizer, truncate=11).hypergrad(*args)
    assert not torch.equal(plain["lam"], shorter["lam"])  # the comparison can fail


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncate_matches_hand_truncated_unroll(breast_cancer, optimizer, checkpoint):
    P = breast_cancer
    args = _args(P)
    lr = _lr(P, optimizer, args)
    ours = bl.ITD(steps=12, lr=lr, optimizer=optimizer, truncate=4, checkpoint=checkpoint).hypergrad(*args)
    ref = _unroll(P, args[1]["w"], args[2]["lam"], 12, lr, optimizer, k=4)
    assert rel_err(ours, ref) < 1e-10
    full = _unroll(P, args[1]["w"], args[2]["lam"], 12, lr, optimizer)
    assert rel_err(full, ref) > 1e-3  # truncation changes the answer away from the minimiser


@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncated_itd_at_the_minimiser_is_aid_fp_with_k_terms(diabetes, checkpoint):
    P = diabetes
    args = _args(P, "solution", -2.0)
    L = P.curvature(args[2])[1]
    for k in (1, 3, 8):
        hg = bl.ITD(steps=40, lr=1 / L, truncate=k, checkpoint=checkpoint).hypergrad(*args)
        fp = bl.AIDFP(iters=k - 1, alpha=1 / L).hypergrad(*args)
        torch.testing.assert_close(hg["lam"], fp["lam"], rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize(
    ("kw", "err", "word"),
    [
        ({"truncate": 0}, ValueError, "truncate"),
        ({"truncate": 11}, ValueError, r"\[1, steps=10\]"),
        ({"truncate": 2.0}, TypeError, "truncate"),
        ({"truncate": True}, TypeError, "truncate"),
        ({"checkpoint": 1}, TypeError, "checkpoint"),
        ({"on_divergence": "stop"}, ValueError, "on_divergence"),
        ({"divergence_factor": 0.0}, ValueError, "divergence_factor"),
        ({"divergence_factor": float("inf")}, ValueError, "divergence_factor"),
    ],
)
def test_bad_options(kw, err, word):
    with pytest.raises(err, match=word):
        bl.ITD(steps=10, **kw)


# ---------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_checkpoint_equals_plain(diabetes, optimizer, steps):
    """Segments of ceil(sqrt(k)) steps: 1, 7 (3 segments, the last short) and 30 (6 segments)."""
    P = diabetes
    args = _args(P)
    lr = _lr(P, optimizer, args)
    plain, i1 = bl.ITD(steps=steps, lr=lr, optimizer=optimizer).hypergrad(*args, return_info=True)
    ck, i2 = bl.ITD(steps=steps, lr=lr, optimizer=optimizer, checkpoint=True).hypergrad(*args, return_info=True)
    assert rel_err(ck, plain) < 1e-12
    assert float(plain["lam"].abs().max()) > 0
    assert i1.inner_value == i2.inner_value and i1.outer_value == i2.outer_value and i2.iters == steps
    torch.testing.assert_close(torch.tensor(i2.residuals), torch.tensor(i1.residuals), rtol=1e-12, atol=0)


def test_checkpoint_itd_at_the_minimiser_is_aid_fp(diabetes):
    P = diabetes
    args = _args(P, "solution", -2.0)
    L = P.curvature(args[2])[1]
    hg = bl.ITD(steps=30, lr=1 / L, checkpoint=True).hypergrad(*args)
    fp = bl.AIDFP(iters=29, alpha=1 / L).hypergrad(*args)
    torch.testing.assert_close(hg["lam"], fp["lam"], rtol=1e-8, atol=1e-13)


def test_checkpoint_refuses_a_random_inner_objective(diabetes):
    P = diabetes

    def noisy(p, h, b):
        return P.inner(p, h, b) * (1 + 0.1 * torch.rand((), dtype=torch.float64))

    args = _args(P)
    prob = bl.BilevelProblem(noisy, P.outer)
    bl.ITD(steps=3, lr=0.1).hypergrad(prob, *args[1:])  # the plain unroll takes it
    with pytest.raises(RuntimeError, match="not deterministic"):
        bl.ITD(steps=3, lr=0.1, checkpoint=True).hypergrad(prob, *args[1:])


# ------------------------------------------------------------------------------------------- divergence


def test_lr_above_2_over_L_raises(diabetes):
    P = diabetes
    for start in ("solution", "random"):
        args = _args(P, start, -2.0)
        L = P.curvature(args[2])[1]
        for kw in ({}, {"checkpoint": True}, {"truncate": 20}):
            with pytest.raises(ITDDivergenceError, match=r"diverges.*lower lr"):
                bl.ITD(steps=50, lr=3 / L, **kw).hypergrad(*args)


@pytest.mark.parametrize(("optimizer", "factor"), [("sgd", 0.5), ("sgd", 1.0), ("sgd", 1.9), ("momentum", 3.0)])
def test_converging_runs_are_not_flagged(diabetes, optimizer, factor):
    """Momentum is stable up to lr < 2 (1 + momentum) / L = 3.8 / L."""
    P = diabetes
    for start in ("solution", "random"):
        args = _args(P, start, -2.0)
        L = P.curvature(args[2])[1]
        _, info = bl.ITD(steps=50, lr=factor / L, optimizer=optimizer).hypergrad(*args, return_info=True)
        assert not info.diverged and len(info.residuals) == 50
        assert max(info.residuals) < 10 * info.residuals[0]


def test_ignore_returns_the_value_and_records_it(diabetes):
    P = diabetes
    args = _args(P, "random", -2.0)
    L = P.curvature(args[2])[1]
    hg, info = bl.ITD(steps=30, lr=3 / L, on_divergence="ignore").hypergrad(*args, return_info=True)
    assert info.diverged and max(info.residuals) > 1e6 * info.residuals[0]
    ref = _unroll(P, args[1]["w"], args[2]["lam"], 30, 3 / L, "sgd")
    assert rel_err(hg, ref) < 1e-10 and float(hg["lam"].abs().max()) > 1e6  # the exact (huge) derivative
    off, info_off = bl.ITD(steps=30, lr=3 / L, divergence_factor=None).hypergrad(*args, return_info=True)
    assert torch.equal(hg["lam"], off["lam"]) and not info_off.diverged and info_off.residuals == []
    with pytest.warns(ITDDivergenceWarning, match="diverges"):
        bl.ITD(steps=30, lr=3 / L, on_divergence="warn", checkpoint=True).hypergrad(*args)


def test_adjoint_norms_at_the_minimiser_are_the_neumann_terms(diabetes):
    P = diabetes
    args = _args(P, "solution", -2.0)
    L = P.curvature(args[2])[1]
    _, fp = bl.AIDFP(iters=19, alpha=1 / L).hypergrad(*args, return_info=True)
    for kw in ({}, {"checkpoint": True}):
        _, info = bl.ITD(steps=20, lr=1 / L, **kw).hypergrad(*args, return_info=True)
        torch.testing.assert_close(torch.tensor(info.residuals), torch.tensor(fp.residuals), rtol=1e-8, atol=1e-14)
    _, adam = bl.ITD(steps=5, lr=0.01, optimizer="adam").hypergrad(*args, return_info=True)
    assert adam.residuals == [] and not adam.diverged  # Adam's bounded steps are not growth-tested


@pytest.mark.parametrize("policy", ["raise", "ignore"])
def test_non_finite_iterates_are_named_non_finite(policy):
    P = ridge_synthetic(d=3)
    args = _args(P, "random", -2.0)
    L = P.curvature(args[2])[1]
    with pytest.raises(ITDDivergenceError, match=r"non-finite \((inf|nan)\) at unrolled step"):
        bl.ITD(steps=700, lr=3 / L, on_divergence=policy).hypergrad(*args)


# ------------------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize(
    ("kw", "n_calls"),
    [({}, 2 * 6 + 1), ({"checkpoint": True}, 2 * 6 + 1), ({"truncate": 2}, 6 + 2 + 1),
     ({"truncate": 2, "checkpoint": True}, 6 + 2 + 1), ({"optimizer": "adam", "lr": 0.01, "checkpoint": True}, 13)],
)  # fmt: skip
def test_reduce_identity_in_every_mode(kw, n_calls):
    """One all-reduce per step forward, one per differentiated step backward, one at the end (the adjoint
    norms of the divergence test ride along with it); none recomputed by checkpointing."""
    r = ridge_diabetes()
    p = {"w": torch.linspace(-1, 1, 10, dtype=torch.float64)}
    solver = bl.ITD(**({"steps": 6, "lr": 0.1} | kw))
    args = (r.problem(), p, r.hparams(-1.0), r.inner_batch, r.outer_batch)
    a, ia = solver.hypergrad(*args, return_info=True)
    calls = []

    def ident(tree):
        calls.append(sorted(tree))
        return tree

    b, ib = solver.hypergrad(*args, reduce=ident, return_info=True)
    torch.testing.assert_close(a["lam"], b["lam"], rtol=1e-13, atol=1e-15)
    assert len(calls) == n_calls and set(b) == {"lam"}
    assert ia.residuals == ib.residuals


class _ThreadMean:
    """An all-reduce mean across ``n`` threads (one per rank), with a timeout instead of a hang."""

    def __init__(self, n: int) -> None:
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=60)

    def for_rank(self, r: int):
        def reduce(tree):
            self.slots[r] = {k: v.detach().clone() for k, v in tree.items()}
            self.barrier.wait()
            out = {k: sum(s[k] for s in self.slots) / self.n for k in tree}
            self.barrier.wait()
            return out

        return reduce


@pytest.mark.parametrize("kw", [{"checkpoint": True}, {"checkpoint": True, "truncate": 3, "optimizer": "momentum"}])
def test_two_thread_ranks_equal_the_whole_batch(kw):
    r = ridge_diabetes()
    n = r.inner_batch[0].shape[0] // 2 * 2
    inner = tuple(t[:n] for t in r.inner_batch)
    shards = [tuple(t[i::2] for t in inner) for i in range(2)]  # equal shards: the mean of means is the mean
    h = r.hparams(-1.0)
    p = {"w": torch.linspace(-1, 1, 10, dtype=torch.float64)}
    solver = bl.ITD(**({"steps": 8, "lr": 0.1} | kw))
    whole = bl.ITD(**({"steps": 8, "lr": 0.1} | kw | {"checkpoint": False})).hypergrad(
        r.problem(), p, h, inner, r.outer_batch
    )
    mean, out, errors = _ThreadMean(2), [None, None], []

    def rank(i):
        try:
            out[i] = solver.hypergrad(r.problem(), p, h, shards[i], r.outer_batch, reduce=mean.for_rank(i))
        except Exception as e:  # surfaced below
            errors.append(e)
            mean.barrier.abort()

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(2):
        assert rel_err(out[i], whole) < 1e-12
    local = solver.hypergrad(r.problem(), p, h, shards[0], r.outer_batch)
    assert rel_err(local, whole) > 1e-4  # one shard alone is not the answer: the check can fail


def test_reduce_divergence_is_decided_on_the_rank_mean():
    r = ridge_diabetes()
    args = _args(r, "random", -2.0)
    L = r.curvature(args[2])[1]
    calls = []

    def ident(tree):
        calls.append(1)
        return tree

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ITDDivergenceError, match="diverges"):
            bl.ITD(steps=20, lr=3 / L).hypergrad(*args, reduce=ident)
    assert len(calls) == 2 * 20 + 1


# ------------------------------------------------------------------------------------------------ memory


def test_checkpointing_keeps_torch_memory_flat_in_steps():
    """torch's peak allocated bytes (the benchmark's in-process measure) at 60 steps: plain ITD holds 60 step
    graphs (about 0.4 of the first step's peak each), checkpointed ITD one and a few parameter copies,
    truncated ITD five."""
    from benchmarks.hypergrad_accuracy import itd_alloc_peak_mb

    one = itd_alloc_peak_mb(1, 3000, 20, {})
    plain = itd_alloc_peak_mb(60, 3000, 20, {})
    ck = itd_alloc_peak_mb(60, 3000, 20, {"checkpoint": True})
    tr = itd_alloc_peak_mb(60, 3000, 20, {"truncate": 5})
    if one is None:
        pytest.skip("this torch's profiler gives no memory events")
    assert plain > 15 * one  # 25x measured
    assert ck < 1.2 * one  # 1.06x measured
    assert 1.5 * one < tr < 5 * one  # 2.6x measured
