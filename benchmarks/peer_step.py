"""One MELTR hyper step, like for like against the peers: the same hypergradient, tested equal in the same run.

    python -m benchmarks.peer_step [--reps 20] [--iters 3] [--alpha 0.01] [--mu 100] [--threads 1]
        [--markdown docs/results.md] [--tiny]

State: the MELTR example (UniVL-tiny from the shipped testbed checkpoint, batch 16, MELTR's loss network,
``K=1``) after ``--inner-steps`` (default 1) training steps from the pretrained point; then one inner batch and
one meta batch, both fixed for every call. Each pair computes the same quantity with the same iterations:

* Neumann: ours ``bl.AID(solve=bl.linalg.neumann(iters, alpha, on_divergence="ignore", growth_tol=None))``
  (the plain series, every term summed, as betty) vs betty's Neumann (``neumann_iterations=iters``).
* CG: the MELTR inner Hessian is indefinite (our CG stops at negative curvature, torchopt's does not), so
  both solve with ``g_mu = g + mu/2 ||theta - theta0||^2`` (theta0: the state's params, constants; its
  Hessian is ``H + mu I``). Ours ``bl.AIDCG(iters, tol=1e-30, on_negative_curvature="raise")`` vs
  ``torchopt.linear_solve.solve_cg(maxiter=iters, rtol=1e-30)``: both run all ``iters`` iterations (a
  negative curvature met by ours raises: raise ``--mu``). Difference left: torchopt also forms the first
  residual ``b - A x0`` with ``x0 = 0``, one more product than ours (its own design, kept).

Each pair's hypergradients are compared in the run (``max|ours - peer| / max|peer|``); a pair above
:data:`THRESHOLD` is marked "NOT EQUAL" and gets no speedup. Context rows (not like for like): our AID-FP as
the example runs it (stops at the first growing term) and AID-FP-Lite, against betty's Neumann. All calls
are interleaved (random order per round, after a warm-up round); the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import bilevel as bl
from benchmarks.peers import available, peer_hypergrad
from bilevel.products import first_order_gradients
from examples.results_md import write_section as write_results_section

Tree = dict[str, torch.Tensor]
THRESHOLD = 1e-4  # float32: max|ours - peer| / max|peer| below this counts as the same hypergradient
CG_TOL = 1e-30  # CG relative tolerance of both: never met in float32, so both run all iterations
DEFAULT_MU = 100.0  # seed 0, 1 step: our CG meets p^T H p <= 0 in 3 iterations up to mu = 20, in 12 below 100


@dataclass
class State:
    """A MELTR hyper step: the problem, theta (params), phi (hparams) and the two batches."""

    problem: bl.BilevelProblem
    params: Tree
    hparams: Tree
    inner: Any
    outer: Any

    @property
    def args(self) -> tuple[Any, ...]:
        return self.problem, self.params, self.hparams, self.inner, self.outer


@functools.cache
def meltr_state(inner_steps: int = 1) -> State:
    """The MELTR example's state after ``inner_steps`` training steps (each with a hyper step, ``K=1``) from the
    shipped pretrained backbone (seed 0); the next training batch and meta batch are the hyper step's batches.
    Cached (one build per ``inner_steps``): the solvers and peer adapters do not modify their inputs."""
    from examples.meltr_video.finetune import SHIPPED_CHECKPOINT, FinetuneConfig, FinetuneRun

    cfg = FinetuneConfig(method="meltr", K=1, pretrained=str(SHIPPED_CHECKPOINT), batch_size=16, progress=False)
    run = FinetuneRun(cfg)
    tr, train, meta = run.trainer, iter(run.loader), iter(run.meta_loader)
    for _ in range(inner_steps):
        tr.step(next(train), next(meta))
    assert tr.problem is not None
    clone = lambda t: {k: v.detach().clone() for k, v in t.items()}  # noqa: E731
    return State(tr.problem, clone(tr.params), clone(tr.hparams), next(train), next(meta))


def proximal(problem: bl.BilevelProblem, theta0: Tree, mu: float) -> bl.BilevelProblem:
    """``g_mu(theta, phi, b) = g(theta, phi, b) + mu/2 sum_k ||theta_k - theta0_k||^2`` (``f`` unchanged): the
    inner Hessian becomes ``H + mu I``, positive definite once ``mu`` exceeds ``-lambda_min(H)``."""
    theta0 = {k: v.detach() for k, v in theta0.items()}

    def inner(p: Tree, h: Tree, b: Any) -> torch.Tensor:
        prox = sum(((p[k] - theta0[k]) ** 2).sum() for k in theta0)
        return problem.inner(p, h, b) + 0.5 * mu * prox

    return bl.BilevelProblem(inner=inner, outer=problem.outer)


def rel_diff(a: Tree, b: Tree) -> float:
    """``max_k max|a_k - b_k| / max_k max|b_k|`` over the leaves of ``b``."""
    num = max(float((a[k] - b[k]).abs().max()) for k in b)
    return num / max(float(b[k].abs().max()) for k in b)


def check_cg(state: State, iters: int) -> bl.HypergradInfo:
    """Our CG on ``state`` with ``iters`` iterations: ``ValueError`` (telling to raise ``--mu``) when it meets
    ``p^T H p <= 0`` or stops before ``iters`` iterations; else its info."""
    solver = bl.AIDCG(iters=iters, tol=CG_TOL, on_negative_curvature="ignore")
    _, info = solver.hypergrad(*state.args, return_info=True)
    if info.negative_curvature or info.iters != iters:
        raise ValueError(
            f"our CG met negative curvature (or stopped early: {info.iters} of {iters} iterations) on the proximal "
            "MELTR problem: H + mu I is not positive definite along its Krylov space; raise --mu"
        )
    return info


@dataclass
class Row:
    """One timed row: our call, the peer's call (a pair), or a context row compared with a pair's peer."""

    label: str
    ours: Callable[[], Tree]
    peer: Callable[[], Tree] | None  # None: a context row (timed against `against`)
    against: str = ""  # the pair label whose peer a context row is compared with
    note: str = ""
    iters: str = ""  # the iterations column of a context row (a pair: --iters)


def _shared_step(solver: bl.AIDSolver, state: State) -> Tree:
    """A MELTR training step's work with ``share_linearization``: one linearisation of ``g`` gives the inner
    gradient (``lin.grad_theta``) and serves the hypergradient (what ``bl.BilevelTrainer`` does)."""
    lin = solver.linearize(state.problem, state.params, state.hparams, state.inner)
    return solver.hypergrad_at(lin, state.outer)


def _peer_step(state: State, peer: str, method: str, iters: int, opt: float) -> Tree:
    """The same step with a peer: the inner gradient (one first-order pass of ``g``), then the peer's
    hypergradient (which linearises ``g`` itself). ``opt``: Neumann's alpha or CG's tolerance."""
    first_order_gradients(state.problem.inner, state.params, state.hparams, state.inner)
    kw = {"alpha": opt} if method == "neumann" else {"tol": opt}
    return peer_hypergrad(peer, method, *state.args, iters=iters, **kw)


def rows(state: State, iters: int, alpha: float, mu: float, peers: dict[str, str | None]) -> tuple[list[Row], list]:
    """The pairs (and context rows) to time, and notes on the pairs skipped."""
    out, notes = [], []
    if peers.get("betty"):
        neumann = bl.AID(solve=bl.linalg.neumann(iters, alpha, on_divergence="ignore", growth_tol=None))
        out.append(Row(
            "Neumann: ours (plain series) vs betty", lambda: neumann.hypergrad(*state.args),
            lambda: peer_hypergrad("betty", "neumann", *state.args, iters=iters, alpha=alpha),
        ))  # fmt: skip
        out.append(Row(
            "Neumann, training step (inner gradient + hyper step): ours shared vs betty",
            lambda: _shared_step(neumann, state), lambda: _peer_step(state, "betty", "neumann", iters, alpha),
        ))  # fmt: skip
        fp = bl.AIDFP(iters=iters, alpha=alpha, on_divergence="ignore")
        lite = bl.AIDFPLite(scale=alpha)
        out.append(Row("AID-FP default (growth check) vs betty Neumann", lambda: fp.hypergrad(*state.args),
                       None, out[0].label, "context: stops at the first growing term", f"<= {iters}"))  # fmt: skip
        out.append(Row("AID-FP-Lite vs betty Neumann", lambda: lite.hypergrad(*state.args), None, out[0].label,
                       "context: no HVP (H^-1 ~ alpha I)", "0"))  # fmt: skip
    else:
        notes.append("betty does not import: Neumann pair skipped")
    if peers.get("torchopt"):
        prox = State(proximal(state.problem, state.params, mu), state.params, state.hparams, state.inner, state.outer)
        check_cg(prox, iters)
        cg = bl.AIDCG(iters=iters, tol=CG_TOL, on_negative_curvature="raise")
        out.append(Row(
            f"CG (mu={mu:g}): ours vs torchopt", lambda: cg.hypergrad(*prox.args),
            lambda: peer_hypergrad("torchopt", "cg", *prox.args, iters=iters, tol=CG_TOL),
        ))  # fmt: skip
        out.append(Row(
            f"CG (mu={mu:g}), training step (inner gradient + hyper step): ours shared vs torchopt",
            lambda: _shared_step(cg, prox), lambda: _peer_step(prox, "torchopt", "cg", iters, CG_TOL),
        ))  # fmt: skip
    else:
        notes.append("torchopt does not import: CG pair skipped")
    return out, notes


def measure(table: list[Row], reps: int) -> list[dict[str, Any]]:
    """Warm-up, the equality test per pair, then ``reps`` interleaved rounds; a dict of results per row."""
    fns: dict[str, Callable[[], Tree]] = {}
    for r in table:
        fns[f"{r.label}|ours"] = r.ours
        if r.peer is not None:
            fns[f"{r.label}|peer"] = r.peer
    values = {k: f() for k, f in fns.items()}  # warm-up; the values of the equality test
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(reps):
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    results = []
    for r in table:
        pair = r.label if r.peer is not None else r.against
        rel = rel_diff(values[f"{r.label}|ours"], values[f"{pair}|peer"])
        equal = rel < THRESHOLD if r.peer is not None else None  # a pair: the same hypergradient, or no speedup
        results.append({"label": r.label, "ours_ms": med[f"{r.label}|ours"], "peer_ms": med[f"{pair}|peer"],
                        "rel": rel, "equal": equal, "note": r.note, "iters": r.iters})  # fmt: skip
    return results


def table_text(results: list[dict[str, Any]], iters: int) -> str:
    lines = ["| pair | iters | ours ms | peer ms | speedup (peer / ours) | rel. difference | equal |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        ok = r["equal"]
        speed = f"{r['peer_ms'] / r['ours_ms']:.2f}x" if ok is not False else "- (NOT EQUAL)"
        eq = "yes" if ok else ("NOT EQUAL" if ok is False else f"n/a, not like for like ({r['note']})")
        lines.append(f"| {r['label']} | {r['iters'] or iters} | {r['ours_ms']:.1f} | {r['peer_ms']:.1f} | {speed} | "
                     f"{r['rel']:.1e} | {eq} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--iters", type=int, default=3, help="HVPs of both Neumann series; iterations of both CGs")
    ap.add_argument("--alpha", type=float, default=0.01, help="the Neumann step (and AID-FP-Lite's scale)")
    ap.add_argument("--mu", type=float, default=DEFAULT_MU, help="the CG pair's proximal weight (g + mu/2 ||.||^2)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--inner-steps", type=int, default=1, help="training steps before the measured hyper step")
    ap.add_argument("--markdown", type=Path, default=None, help="write the section meltr_peer_step of this file")
    ap.add_argument("--tiny", action="store_true", help="2 rounds (a smoke test)")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.threads < 1 or args.iters < 1 or args.inner_steps < 0 or args.mu < 0:
        ap.error("--reps, --threads and --iters must be >= 1, --inner-steps and --mu >= 0")
    reps = 2 if args.tiny else args.reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    start = time.perf_counter()
    peers = available()
    state = meltr_state(args.inner_steps)
    table, notes = rows(state, args.iters, args.alpha, args.mu, peers)
    results = measure(table, reps)
    cmd = "python -m benchmarks.peer_step " + " ".join(argv if argv is not None else sys.argv[1:])
    versions = ", ".join(f"{p} {v}" for p, v in peers.items() if p != "higher" and v)
    text = "\n".join([
        f"Command: `{cmd.strip()}` (torch {torch.__version__}, {versions}; {datetime.date.today()}; "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {args.threads} thread(s); "
        f"{reps} interleaved rounds, median; {time.perf_counter() - start:.0f} s). One MELTR hyper step (UniVL-tiny, "
        f"shipped testbed checkpoint, batch 16, after {args.inner_steps} training step(s)); alpha {args.alpha:g}; "
        f"the CG pair on g + mu/2 ||theta - theta0||^2 (mu {args.mu:g}; our CG met no negative curvature), both CGs "
        f"run all {args.iters} iterations (tol {CG_TOL:g}; torchopt takes one more product, A x0 with x0 = 0). "
        f"Equal: max|ours - peer| / max|peer| < {THRESHOLD:g}.",
        "", table_text(results, args.iters), *(["", *notes] if notes else []),
    ])  # fmt: skip
    print(text)
    if args.markdown is not None:
        title = "## One MELTR hyper step against the peers, like for like (`benchmarks/peer_step.py`)"
        write_results_section(args.markdown, "meltr_peer_step", f"{title}\n\n{text}")
    return results


if __name__ == "__main__":
    main()
