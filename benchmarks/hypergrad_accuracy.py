"""Hypergradient accuracy and cost: every solver (and peer library) against the exact answer.

    python -m benchmarks.hypergrad_accuracy            # default run (<~5 min on 2 CPU cores), writes docs/
    python -m benchmarks.hypergrad_accuracy --quick    # seconds; writes to a temporary directory
    python -m benchmarks.hypergrad_accuracy --full     # budgets up to 500, more repeats

Problems (``bilevel.testing``, float64), all evaluated at ``hparams = .hparams(-2.0)`` (every
``lam_i = -2``, i.e. L2 weights ``exp(-2)``) and ``params = .solution(hparams)`` (the exact inner
minimiser, so every AID solver's implicit-function assumption holds):

    ridge-diabetes      ridge_diabetes()                 294 train rows x 10 features
    ridge-d2000         ridge_synthetic(d=2000)          4000 train rows x 2000 features (n = 3 d)
    logistic-cancer     logistic_breast_cancer()         379 train rows x 30 features

For each solver and budget (``iters`` for the AID solvers, ``steps`` for ITD):

    relative error   ||hg - exact|| / ||exact||   (exact: a dense solve with the Hessian)
    cosine           <hg, exact> / (||hg|| ||exact||)   (scale-free: the only fair score of aid-fp-lite)
    ms               median wall-clock milliseconds of one hypergradient over ``repeats`` runs after warm-up
    x grad           ms / (median ms of one ``torch.func.grad(problem.inner)`` at the same point)

Step sizes: AID-FP and StocBiO ``alpha = 1/L`` and ITD ``lr = 1/L``, ``L`` the largest eigenvalue of
the inner Hessian (``.curvature()``); AID-CG ``tol = 1e-14`` (it may stop before its budget: the
HVP column says how many products it used). AID-FP-Lite and the peers' "identity" use ``scale = 1``
(MELTR's ``H^{-1} ~ I``). StocBiO draws every Hessian-vector product from one of four random
quarters of the training rows (fixed seed), cycled; its error is the median over the timed runs.

Also measured: ``hvp="autograd"`` (the default) against ``"rev-rev"`` and ``"fwd-rev"`` for AID-CG at
a fixed budget, and the peak memory of one hypergradient against the iteration count in fresh subprocesses
(:mod:`benchmarks._measure`). Results are printed and written to ``docs/results.md`` between the
``hypergrad_accuracy`` markers, with PNG plots in ``docs/img/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import bilevel as bl
from bilevel import testing
from examples.results_md import write_section as write_results_section

from ._measure import MemoryPoint, measure_memory, time_call

Tree = dict[str, torch.Tensor]

HPARAM_VALUE = -2.0
CG_TOL = 1e-14
N_QUARTERS = 4
SECTION = "hypergrad_accuracy"
REPO = Path(__file__).resolve().parents[1]

PROBLEMS: dict[str, Callable[[], testing.RidgeL2]] = {
    "ridge-diabetes": testing.ridge_diabetes,
    "ridge-d2000": partial(testing.ridge_synthetic, d=2000),
    "logistic-cancer": testing.logistic_breast_cancer,
}

# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    """What one run measures.

    Attributes:
        mode: "quick", "default" or "full".
        problems: names from :data:`PROBLEMS`.
        budgets: iteration budgets per problem.
        repeats, warmup: timed and untimed runs per point (the median of ``repeats`` is reported).
        hvp_iters: AID-CG budget of the HVP-mode comparison.
        memory_solvers, memory_budgets: the grid of peak-memory points (one subprocess each).
        memory_n, memory_d: size of ``ridge_synthetic(d, n)`` for the memory points.
        peers: also run the peer libraries of :mod:`benchmarks.peers`.
    """

    mode: str
    problems: tuple[str, ...]
    budgets: dict[str, tuple[int, ...]]
    repeats: int = 5
    warmup: int = 1
    hvp_iters: int = 10
    memory_solvers: tuple[str, ...] = ("aid-cg", "aid-fp", "itd")
    memory_budgets: tuple[int, ...] = (1, 10, 50, 100, 200)
    memory_n: int = 15_000
    memory_d: int = 100
    peers: bool = True


SMALL = (1, 2, 5, 10, 20, 50, 100, 200)


def make_config(mode: str, peers: bool = True, memory: bool = True) -> Config:
    """The preset for ``mode`` ("quick", "default", "full"); ``memory=False`` drops the memory points."""
    if mode == "quick":
        cfg = Config(
            mode, ("ridge-diabetes", "logistic-cancer"), dict.fromkeys(PROBLEMS, (1, 5, 20)), repeats=1,
            hvp_iters=5, memory_solvers=("itd",), memory_budgets=(1, 50), memory_n=3000, memory_d=20,
            peers=peers,
        )  # fmt: skip
    elif mode == "default":
        budgets = dict.fromkeys(PROBLEMS, SMALL) | {"ridge-d2000": (1, 2, 5, 10, 20, 50)}
        cfg = Config(mode, tuple(PROBLEMS), budgets, memory_budgets=(1, 10, 50, 200), peers=peers)
    elif mode == "full":
        cfg = Config(
            mode, tuple(PROBLEMS), dict.fromkeys(PROBLEMS, (*SMALL, 500)), repeats=9, hvp_iters=20,
            memory_budgets=(1, 10, 50, 100, 200, 500), memory_n=30_000, peers=peers,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown mode {mode!r}; choose quick, default or full")
    if not memory:
        cfg = dataclasses.replace(cfg, memory_budgets=())
    return cfg


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One reference problem at its evaluation point, with everything the solvers need."""

    name: str
    ref: testing.RidgeL2
    problem: bl.BilevelProblem
    params: Tree
    hparams: Tree
    exact: Tree
    mu: float
    L: float
    quarters: list[tuple[torch.Tensor, torch.Tensor]]
    grad_ms: float = float("nan")

    @property
    def shape(self) -> str:
        return f"{self.ref.X_tr.shape[0]} x {self.ref.dim} (val {self.ref.X_val.shape[0]})"


def quarters(batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four disjoint random quarters of the rows of ``(X, y)`` (fixed seed): StocBiO's mini-batches."""
    X, y = batch
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(X.shape[0]))
    return [(X[idx], y[idx]) for idx in perm.tensor_split(N_QUARTERS)]


def make_case(name: str) -> Case:
    ref = PROBLEMS[name]()
    hp = ref.hparams(HPARAM_VALUE)
    mu, L = ref.curvature(hp)
    case = Case(
        name, ref, ref.problem(), ref.solution(hp), hp, ref.exact_hypergrad(hp), mu, L, quarters(ref.inner_batch)
    )
    grad_inner = torch.func.grad(ref.inner)
    case.grad_ms, _ = time_call(lambda: grad_inner(case.params, case.hparams, ref.inner_batch), repeats=21, warmup=2)
    return case


# ---------------------------------------------------------------------------------------------- methods


@dataclass
class Estimate:
    """One computed hypergradient: the tree, the HVPs used (None where unknown), a note on flags,
    and our solvers' stage times (``HypergradInfo.times``, seconds)."""

    hg: Tree
    n_hvp: int | None = None
    note: str = ""
    times: dict[str, float] = field(default_factory=dict)


Thunk = Callable[[], Estimate]


@dataclass(frozen=True)
class SolverSpec:
    """One of our solvers: registry name, the option its budget sets (None: no budget), fixed options, and the
    label in tables and plots (None: the name)."""

    name: str
    budget_key: str | None
    options: Callable[[Case], dict[str, Any]]
    label: str | None = None


OUR_SOLVERS: tuple[SolverSpec, ...] = (
    SolverSpec("aid-cg", "iters", lambda c: {"tol": CG_TOL, "on_negative_curvature": "raise"}),
    SolverSpec("aid-fp", "iters", lambda c: {"alpha": 1.0 / c.L}),
    SolverSpec("stocbio", "iters", lambda c: {"alpha": 1.0 / c.L, "batches": c.quarters, "on_divergence": "ignore"}),
    SolverSpec("itd", "steps", lambda c: {"lr": 1.0 / c.L}),
    SolverSpec("aid-fp-lite", None, lambda c: {"scale": 1.0}),
    # first order: J v by central differences of grad_phi g with theta held constant (DARTS' product, as
    # betty/identity takes it); exact up to rounding on the ridge problems, whose g is quadratic
    SolverSpec("aid-fp-lite", None, lambda c: {"scale": 1.0, "mixed": "fd"}, "aid-fp-lite (fd)"),
)


def _info_note(info: bl.HypergradInfo) -> str:
    flags = [name for name in ("diverged", "negative_curvature") if getattr(info, name)]
    return ",".join(flags)


def solver_thunk(spec: SolverSpec, case: Case, budget: int | None, **extra: Any) -> Thunk:
    """A thunk computing one hypergradient with our solver ``spec`` on ``case`` (``extra``: more options)."""
    opts = spec.options(case) | extra
    if spec.budget_key is not None:
        opts[spec.budget_key] = budget
    solver = bl.get_solver(spec.name, **opts)
    ref = case.ref

    def run() -> Estimate:
        hg, info = solver.hypergrad(
            case.problem, case.params, case.hparams, ref.inner_batch, ref.outer_batch, return_info=True
        )
        return Estimate(hg, info.n_hvp, _info_note(info), info.times)

    return run


@dataclass(frozen=True)
class Method:
    """A row label of the grid and how to build its thunk for a case and budget."""

    label: str
    budgeted: bool
    build: Callable[[Case, int | None], Thunk]
    peer: bool = False


def our_methods() -> list[Method]:
    return [Method(s.label or s.name, s.budget_key is not None, partial(solver_thunk, s)) for s in OUR_SOLVERS]


def _peer_thunk(peers_mod: Any, peer: str, method: str, case: Case, budget: int | None) -> Thunk:
    ref = case.ref
    kw = {"iters": budget or 0, "lr": 1.0 / case.L, "alpha": 1.0 / case.L, "tol": CG_TOL}

    def run() -> Estimate:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hg = peers_mod.peer_hypergrad(
                peer, method, case.problem, case.params, case.hparams, ref.inner_batch, ref.outer_batch, **kw
            )
        return Estimate(hg, None, "non-finite" if any("not finite" in str(w.message) for w in caught) else "")

    return run


def peer_methods() -> tuple[list[Method], list[str]]:
    """Methods of the importable peers, and "skipped: <reason>" lines for the rest."""
    try:
        from . import peers as peers_mod
    except Exception as exc:  # the module may be missing or broken: report and go on
        return [], [f"skipped: all peers: benchmarks.peers does not import ({type(exc).__name__}: {exc})"]
    methods, skipped = [], []
    for peer, version in peers_mod.available().items():
        if version is None:
            skipped.append(f"skipped: {peer}: does not import (install with scripts/install_peers.sh)")
            continue
        for m in peers_mod.PEER_METHODS.get(peer, ()):
            label = f"{peer}/{m}"
            methods.append(Method(label, m != "identity", partial(_peer_thunk, peers_mod, peer, m), peer=True))
    return methods, skipped


# ------------------------------------------------------------------------------------------------- rows


@dataclass
class AccuracyRow:
    """One (problem, method, budget) point: error against the exact hypergradient and time."""

    problem: str
    method: str
    budget: int | None
    rel_error: float
    cosine: float
    ms: float
    cost_grads: float
    n_hvp: int | None = None
    note: str = ""
    peer: bool = False


@dataclass
class HVPRow:
    """AID-CG with one HVP mode at a fixed budget."""

    problem: str
    mode: str
    iters: int
    ms: float
    solve_ms_per_hvp: float
    rel_error: float


def _flat(tree: Tree, keys: Iterable[str] | None = None) -> torch.Tensor:
    """All leaves of ``tree`` as one vector, in the order of ``keys`` (default: the tree's own)."""
    return torch.cat([tree[k].reshape(-1) for k in (tree if keys is None else keys)])


def rel_error(hg: Tree, exact: Tree) -> float:
    """``||hg - exact|| / ||exact||`` over the whole tree (nan if ``hg`` is not finite)."""
    a, b = _flat(hg, exact), _flat(exact)
    return float((a - b).norm() / b.norm()) if bool(torch.isfinite(a).all()) else float("nan")


def cosine(hg: Tree, exact: Tree) -> float:
    """``<hg, exact> / (||hg|| ||exact||)`` (nan if ``hg`` is not finite)."""
    a, b = _flat(hg, exact), _flat(exact)
    return float(a @ b / (a.norm() * b.norm())) if bool(torch.isfinite(a).all()) else float("nan")


def measure_point(case: Case, method: Method, budget: int | None, cfg: Config) -> AccuracyRow:
    """Time ``method`` at ``budget`` on ``case``; failures become a row with a note, not an exception."""
    row = AccuracyRow(case.name, method.label, budget, float("nan"), float("nan"), float("nan"), float("nan"))
    row.peer = method.peer
    try:
        ms, outs = time_call(method.build(case, budget), cfg.repeats, cfg.warmup)
    except Exception as exc:
        row.note = f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        return row
    errors = [rel_error(o.hg, case.exact) for o in outs]
    row.rel_error = float(np.median(errors))
    row.cosine = float(np.median([cosine(o.hg, case.exact) for o in outs]))
    row.ms, row.cost_grads = ms, ms / case.grad_ms
    row.n_hvp, row.note = outs[-1].n_hvp, ",".join(sorted({o.note for o in outs if o.note}))
    return row


def accuracy_grid(cases: list[Case], methods: list[Method], cfg: Config) -> list[AccuracyRow]:
    tasks = [(c, m, b) for c in cases for m in methods for b in (cfg.budgets[c.name] if m.budgeted else (None,))]
    return [measure_point(c, m, b, cfg) for c, m, b in tqdm(tasks, desc="accuracy grid", unit="pt", file=sys.stderr)]


def hvp_comparison(cases: list[Case], cfg: Config) -> list[HVPRow]:
    """AID-CG with each ``hvp`` mode at ``cfg.hvp_iters`` (tol 1e-300: the full budget runs)."""
    spec = OUR_SOLVERS[0]
    rows = []
    tasks = [(c, mode) for c in cases for mode in ("autograd", "rev-rev", "fwd-rev")]
    for case, mode in tqdm(tasks, desc="hvp modes", unit="pt", file=sys.stderr):
        thunk = solver_thunk(spec, case, cfg.hvp_iters, hvp=mode, tol=1e-300, on_negative_curvature="ignore")
        ms, outs = time_call(thunk, cfg.repeats, cfg.warmup)
        solve_ms = 1e3 * float(np.median([o.times["solve"] for o in outs]))
        n_hvp = max(outs[-1].n_hvp or 1, 1)
        rows.append(HVPRow(case.name, mode, n_hvp, ms, solve_ms / n_hvp, rel_error(outs[-1].hg, case.exact)))
    return rows


def memory_grid(cfg: Config) -> list[MemoryPoint]:
    tasks = [(s, b) for s in cfg.memory_solvers for b in cfg.memory_budgets]
    return [
        measure_memory(s, b, cfg.memory_n, cfg.memory_d)
        for s, b in tqdm(tasks, desc="memory (subprocesses)", unit="pt", file=sys.stderr)
    ]


# --------------------------------------------------------------------- ITD memory: plain, truncated, checkpointed
#
#     python -m benchmarks.hypergrad_accuracy --only itd-memory      # this section only (``hypergrad_itd_memory``)

ITD_MEMORY_SECTION = "hypergrad_itd_memory"
ITD_MEMORY_STEPS = (1, 10, 50, 200)
ITD_TRUNCATE = 5
ITD_VARIANTS: dict[str, Callable[[int], dict[str, Any]]] = {
    "plain": lambda T: {},
    f"truncate={ITD_TRUNCATE}": lambda T: {"truncate": min(ITD_TRUNCATE, T)},
    "checkpoint": lambda T: {"checkpoint": True},
}


@dataclass
class ItdMemoryRow:
    """One ITD variant at ``steps``: extra peak RSS in a fresh process (:func:`benchmarks._measure.measure_memory`,
    as the main memory table) and the peak of the bytes held by torch's allocator during the call."""

    variant: str
    steps: int
    point: MemoryPoint
    alloc_mb: float | None


def itd_alloc_peak_mb(steps: int, n: int, d: int, options: dict[str, Any]) -> float | None:
    """Peak, over one ITD hypergradient on ``ridge_synthetic(d, n)`` at its solution (``lr = 1/L``), of the bytes
    allocated by torch and not yet freed (the running sum of :mod:`torch.profiler` memory events, MiB), after a
    warm-up call; None where the profiler gives no memory events. In-process: it counts tensors only, not the
    Python objects, allocator slack and library state that the RSS also sees."""
    from torch.profiler import ProfilerActivity, profile

    ref = testing.ridge_synthetic(d=d, n=n)
    hp = ref.hparams(HPARAM_VALUE)
    params = ref.solution(hp)
    solver = bl.ITD(steps=steps, lr=1.0 / ref.curvature(hp)[1], **options)
    args = (ref.problem(), params, hp, ref.inner_batch, ref.outer_batch)
    solver.hypergrad(*args)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        solver.hypergrad(*args)
    try:
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    except AttributeError:
        return None
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak / 2**20 if events else None


def itd_memory_grid(n: int, d: int, steps: tuple[int, ...] = ITD_MEMORY_STEPS) -> list[ItdMemoryRow]:
    tasks = [(v, T) for v in ITD_VARIANTS for T in steps]
    rows = []
    for variant, T in tqdm(tasks, desc="ITD memory", unit="pt", file=sys.stderr):
        opts = ITD_VARIANTS[variant](T)
        point = measure_memory("itd", T, n, d, options=opts)
        rows.append(ItdMemoryRow(variant, T, point, itd_alloc_peak_mb(T, n, d, opts)))
    return rows


def render_itd_memory(rows: list[ItdMemoryRow], n: int, d: int, command: str, started: str, seconds: float) -> str:
    """The ``hypergrad_itd_memory`` section: the table and the checkpointed / plain ratios."""
    header = ["variant", "steps T", "extra RSS (MiB)", "x plain T=1", "torch peak allocated (MiB)", "x plain T=1",
              "error"]  # fmt: skip
    base = {r.steps: r for r in rows if r.variant == "plain"}.get(min(r.steps for r in rows))
    b_rss, b_alloc = (base.point.rss_extra_mb, base.alloc_mb) if base else (None, None)
    lines = []
    for r in rows:
        rss, alloc = r.point.rss_extra_mb, r.alloc_mb
        lines.append([
            r.variant, str(r.steps), _fmt(rss, ".2f") + ("" if r.point.reset else " (lower bound)"),
            _fmt(rss / b_rss if rss is not None and b_rss else None, ".2f"), _fmt(alloc, ".3f"),
            _fmt(alloc / b_alloc if alloc is not None and b_alloc else None, ".2f"), r.point.error or "",
        ])  # fmt: skip
    out = [
        "## ITD memory vs unrolled steps: plain, truncated, checkpointed",
        "",
        f"Command: `{command}`, run {started} in {seconds:.0f} s, measured while other jobs (fine-tuning runs, "
        "tests) loaded the machine (memory, not time, is measured).  ",
        f"Machine: {machine()}.",
        "",
        f"One `bl.ITD(steps=T, lr=1/L)` hypergradient on `ridge_synthetic(d={d}, n={n})` at `hparams(-2.0)` and the "
        f"exact inner solution (the problem of the main memory table). `truncate={ITD_TRUNCATE}`: back-propagation "
        f"through the last {ITD_TRUNCATE} steps only (`min(5, T)`); `checkpoint`: `checkpoint=True` (segments of "
        "`ceil(sqrt(T))` steps recomputed in the backward pass). Extra RSS: peak RSS during the call minus RSS "
        "before it, in a fresh process per point, exactly as in the main memory table (`VmHWM` reset through "
        "`/proc/self/clear_refs`, `MALLOC_MMAP_THRESHOLD_=65536`, `malloc_trim(0)`); it also counts Python "
        "objects and allocator slack, a few tenths of a MiB of noise at this size. Torch peak allocated: the "
        "peak of the bytes held by torch's CPU allocator during the call (running sum of `torch.profiler` "
        "memory events, after a warm-up call in the benchmark's process): tensors only. `x plain T=1`: "
        "the figure over plain ITD's at the smallest `T`.",
        "",
        _table(header, lines),
    ]
    return "\n".join(out) + "\n"


def run_itd_memory(quick: bool, out_dir: Path, command: str) -> list[ItdMemoryRow]:
    """Measure, print and write the ``hypergrad_itd_memory`` section of ``out_dir/results.md``."""
    import time

    cfg = make_config("quick" if quick else "default")
    steps = (1, 50) if quick else ITD_MEMORY_STEPS
    start, started = time.perf_counter(), datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    rows = itd_memory_grid(cfg.memory_n, cfg.memory_d, steps)
    text = render_itd_memory(rows, cfg.memory_n, cfg.memory_d, command, started, time.perf_counter() - start)
    print(text)
    write_section(out_dir / "results.md", text, ITD_MEMORY_SECTION)
    return rows


# -------------------------------------------------------------------------------------------------- run


@dataclass
class Results:
    """Everything one run measured, plus what is needed to describe it."""

    cfg: Config
    command: str
    cases: list[Case]
    rows: list[AccuracyRow] = field(default_factory=list)
    hvp_rows: list[HVPRow] = field(default_factory=list)
    memory: list[MemoryPoint] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    peer_versions: dict[str, str | None] = field(default_factory=dict)
    started: str = ""
    seconds: float = 0.0


def run(cfg: Config, command: str = "python -m benchmarks.hypergrad_accuracy") -> Results:
    """Measure everything ``cfg`` asks for (no output written)."""
    import time

    start = time.perf_counter()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cases = [make_case(name) for name in tqdm(cfg.problems, desc="problems (exact answers)", file=sys.stderr)]
    methods = our_methods()
    res = Results(cfg, command, cases, started=started)
    if cfg.peers:
        peer_list, res.skipped = peer_methods()
        methods += peer_list
        try:
            from .peers import available

            res.peer_versions = available()
        except Exception:
            res.peer_versions = {}
    else:
        res.skipped = ["skipped: peers: disabled with --no-peers"]
    res.rows = accuracy_grid(cases, methods, cfg)
    res.hvp_rows = hvp_comparison(cases, cfg)
    res.memory = memory_grid(cfg)
    res.seconds = time.perf_counter() - start
    return res


# --------------------------------------------------------------------------------------------- markdown


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pivot(rows: list[AccuracyRow], budgets: tuple[int, ...], cell: Callable[[AccuracyRow], str]) -> str:
    methods = list(dict.fromkeys(r.method for r in rows))
    by = {(r.method, r.budget): r for r in rows}
    body = []
    for m in methods:
        if (m, None) in by:  # no budget: one point, shown under every column would mislead
            r = by[(m, None)]
            body.append([m, cell(r) + " (no budget)"] + [""] * (len(budgets) - 1))
        else:
            body.append([m] + [cell(by[(m, b)]) if (m, b) in by else "" for b in budgets])
    return _table(["method \\ budget"] + [str(b) for b in budgets], body)


def _err_cell(r: AccuracyRow) -> str:
    return (_fmt(r.rel_error) + (f" ({r.note})" if r.note else "")) if not r.note.startswith("failed") else r.note


def _ms_cell(r: AccuracyRow) -> str:
    return "-" if math.isnan(r.ms) else f"{r.ms:.3g} ({r.cost_grads:.3g}x)"


def _case_cells(c: Case) -> list[str]:
    norm = float(_flat(c.exact).norm())
    return [c.name, c.shape, f"{c.mu:.3g}", f"{c.L:.3g}", f"{c.L / c.mu:.3g}", f"{norm:.3g}", f"{c.grad_ms:.3g}"]


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def render_markdown(res: Results, images: dict[str, str]) -> str:
    """The docs section: setup, per-problem tables, HVP modes, memory, plots (``images``: title -> path)."""
    cfg = res.cfg
    out = [
        "## Hypergradient accuracy and cost",
        "",
        f"Command: `{res.command}` (mode `{cfg.mode}`), run {res.started} in {res.seconds:.0f} s.  ",
        f"Machine: {machine()}.  ",
        "Timings are medians of "
        f"{cfg.repeats} runs after {cfg.warmup} warm-up run(s), wall clock, on a machine possibly shared with "
        "other work: treat them as indicative.",
        "",
        f"Point: `hparams = .hparams({HPARAM_VALUE})` (every `lam_i = {HPARAM_VALUE}`), `params = .solution(hparams)` "
        "(exact inner minimiser). AID-FP / StocBiO `alpha = 1/L`, ITD `lr = 1/L` (`L` from `.curvature()`), "
        f"AID-CG `tol = {CG_TOL:g}` (may stop before its budget), AID-FP-Lite and peers' identity `scale = 1`, "
        f"StocBiO's HVPs on {N_QUARTERS} random quarters of the training rows (error: median over the timed runs). "
        "Peers get the same `lr`, `alpha`, `tol` and budget (`iters`).",
        "",
        _table(
            ["problem", "train x d (val)", "mu", "L", "L/mu", "||exact||", "1 inner grad (ms)"],
            [_case_cells(c) for c in res.cases],
        ),
    ]
    versions = ", ".join(f"{k} {v}" for k, v in res.peer_versions.items() if v)
    if versions:
        out += ["", f"Peers: {versions}."]
    if res.skipped:
        out += [""] + [f"- {s}" for s in res.skipped]
    for case in res.cases:
        rows = [r for r in res.rows if r.problem == case.name]
        budgets = cfg.budgets[case.name]
        out += [
            "",
            f"### {case.name}: relative error `||hg - exact|| / ||exact||`",
            "",
            _pivot(rows, budgets, _err_cell),
            "",
            f"### {case.name}: ms per hypergradient (in units of one inner gradient)",
            "",
            _pivot(rows, budgets, _ms_cell),
        ]
    cos_rows = [r for r in res.rows if r.budget is None]
    if cos_rows:
        out += ["", "Cosine with the exact hypergradient of the no-budget methods (identity Hessian):", ""]
        cells = [[r.problem, r.method, _fmt(r.cosine, ".4f"), _fmt(r.rel_error)] for r in cos_rows]
        out.append(_table(["problem", "method", "cosine", "rel. error"], cells))
    out += [
        "",
        f"### HVP mode: AID-CG, {cfg.hvp_iters} iterations",
        "",
        '`"autograd"` (default: `torch.autograd.grad` with `create_graph=True`; one first-order graph, one pruned '
        'backward per product), `"rev-rev"` (`torch.func.vjp` of the gradient; the graph is built once and reused) '
        'and `"fwd-rev"` (`torch.func.jvp` of the gradient, re-traced at every product).',
        "",
        _table(
            ["problem", "hvp", "HVPs", "ms / hypergradient", "ms / HVP (solve stage)", "rel. error"],
            [
                [h.problem, h.mode, str(h.iters), f"{h.ms:.3g}", f"{h.solve_ms_per_hvp:.3g}", _fmt(h.rel_error)]
                for h in res.hvp_rows
            ],
        ),
    ]
    for mode, ratios in _hvp_ratios(res.hvp_rows).items():
        if ratios:
            out += [
                "",
                f"{mode} / autograd time per hypergradient: " + ", ".join(f"{k} {v:.3g}x" for k, v in ratios.items()),
            ]
    if res.memory:
        out += [
            "",
            f"### Peak memory vs iterations: `ridge_synthetic(d={cfg.memory_d}, n={cfg.memory_n})`",
            "",
            "Extra MiB = peak RSS during one hypergradient minus RSS just before it, in a fresh process after a "
            "warm-up on a tiny problem (peak counter `VmHWM` = `ru_maxrss` reset via `/proc/self/clear_refs`; "
            "glibc with `MALLOC_MMAP_THRESHOLD_=65536` and `malloc_trim(0)` so freed memory is not silently "
            "reused). CUDA column: `torch.cuda.max_memory_allocated` above the allocation before the call.",
            "",
            _memory_table(res.memory),
        ]
    if any(r.peer for r in res.rows):
        out += ["", render_frontier(frontier_report(res.rows))]
    for title, path in images.items():
        out += ["", f"![{title}]({path})"]
    return "\n".join(out) + "\n"


def _hvp_ratios(rows: list[HVPRow]) -> dict[str, dict[str, float]]:
    """Time per hypergradient of each non-default mode over the default ``"autograd"``, per problem."""
    by = {(h.problem, h.mode): h.ms for h in rows}
    probs = dict.fromkeys(h.problem for h in rows)
    return {
        mode: {p: by[(p, mode)] / by[(p, "autograd")] for p in probs if (p, mode) in by and (p, "autograd") in by}
        for mode in ("rev-rev", "fwd-rev")
    }


# ---------------------------------------------------------------------- error-vs-time frontier (issue 15)
#
# Per problem, our lower envelope over every one of our (ms, error) points (all our methods, every budget,
# AID-FP-Lite included) is checked against each peer point (identity methods included): a peer point is
# matched when one of our points is at most FRONTIER_TIME_SLACK slower and at most FRONTIER_ERR_REL_SLACK
# (relative) + FRONTIER_ERR_ABS_FLOOR (absolute, for round-off-level errors) less accurate.

FRONTIER_TIME_SLACK, FRONTIER_ERR_REL_SLACK, FRONTIER_ERR_ABS_FLOOR = 0.05, 0.01, 1e-14


def _label(r: AccuracyRow) -> str:
    return r.method if r.budget is None else f"{r.method}@{r.budget}"


@dataclass
class PeerGap:
    """A peer point not matched: the peer's (ms, error), our smallest error within ``ms * (1 + time slack)``
    (None: no point of ours that fast) and our smallest ms reaching ``error`` within the error slack (None: never)."""

    row: AccuracyRow
    best_err: AccuracyRow | None
    fastest: AccuracyRow | None


@dataclass
class FrontierCheck:
    """One problem: how many peer points (finite ms and error) our envelope matches, the others, and the
    peer points left out for lack of a finite error or time."""

    problem: str
    n_peer: int
    gaps: list[PeerGap]
    n_peer_nan: int

    @property
    def ok(self) -> bool:
        return not self.gaps


def frontier_report(
    rows: list[AccuracyRow], time_slack: float = FRONTIER_TIME_SLACK, rel_slack: float = FRONTIER_ERR_REL_SLACK,
    abs_floor: float = FRONTIER_ERR_ABS_FLOOR,
) -> list[FrontierCheck]:  # fmt: skip
    """Per problem (in order of first appearance), every peer point against our lower envelope: matched when some
    point of ours has ``ms <= ms_p (1 + time_slack)`` and ``error <= err_p (1 + rel_slack) + abs_floor``. Points
    with a NaN error or ms are left out (ours: not on the envelope; peers': counted in ``n_peer_nan``)."""
    checks = []
    for prob in dict.fromkeys(r.problem for r in rows):
        pts = [r for r in rows if r.problem == prob]
        finite = [r for r in pts if math.isfinite(r.ms) and math.isfinite(r.rel_error)]
        ours, peers = [r for r in finite if not r.peer], [r for r in finite if r.peer]
        gaps = []
        for p in peers:
            t, err = p.ms * (1 + time_slack), p.rel_error * (1 + rel_slack) + abs_floor
            fast, good = [r for r in ours if r.ms <= t], [r for r in ours if r.rel_error <= err]
            if not any(r.rel_error <= err for r in fast):
                best = min(fast, key=lambda r: r.rel_error, default=None)
                gaps.append(PeerGap(p, best, min(good, key=lambda r: r.ms, default=None)))
        checks.append(FrontierCheck(prob, len(peers), gaps, sum(r.peer for r in pts) - len(peers)))
    return checks


def render_frontier(checks: list[FrontierCheck]) -> str:
    """Markdown: the per-problem summary table and the peer points our envelope does not match."""
    summary = [
        [c.problem, str(c.n_peer), str(c.n_peer - len(c.gaps)), str(c.n_peer_nan), "yes" if c.ok else "no"]
        for c in checks
    ]
    out = [
        "### Error-vs-time frontier: ours against every peer point",
        "",
        "Our envelope: all our points of a problem (every method and budget, AID-FP-Lite included). A peer point "
        f"(ms_p, err_p) is matched when one of ours has ms <= ms_p x {1 + FRONTIER_TIME_SLACK:g} (timings are "
        f"medians on a shared machine) and error <= err_p x {1 + FRONTIER_ERR_REL_SLACK:g} + "
        f"{FRONTIER_ERR_ABS_FLOOR:g} (round-off-level errors). Points without a finite error or time are left out.",
        "",
        _table(
            ["problem", "peer points", "matched", "left out (NaN)", "our frontier at or below every peer point"],
            summary,
        ),
    ]
    gaps = [(c.problem, g) for c in checks for g in c.gaps]
    if gaps:
        cells = [
            [prob, _label(g.row), f"{g.row.ms:.3g}", _fmt(g.row.rel_error),
             f"{_fmt(g.best_err.rel_error)} ({_label(g.best_err)})" if g.best_err else "none that fast",
             f"{g.fastest.ms:.3g} ({_label(g.fastest)})" if g.fastest else "never"]
            for prob, g in gaps
        ]  # fmt: skip
        head = ["problem", "peer point", "peer ms", "peer error", "our best error within peer ms (+slack)",
                "our fastest ms to peer error (+slack)"]  # fmt: skip
        out += ["", "Peer points not matched:", "", _table(head, cells)]
    return "\n".join(out)


def _memory_table(points: list[MemoryPoint]) -> str:
    rows = []
    for p in points:
        rows.append([
            p.solver, str(p.budget), str(p.iters_done) if p.iters_done is not None else "-",
            _fmt(p.rss_extra_mb, ".1f") + ("" if p.reset else " (lower bound)"), _fmt(p.cuda_extra_mb, ".1f"),
            p.error or "",
        ])  # fmt: skip
    return _table(["solver", "budget", "iters run", "extra RSS (MiB)", "extra CUDA (MiB)", "error"], rows)


def write_section(path: Path, body: str, name: str = SECTION) -> None:
    """Write section ``name`` (default: this benchmark's) of the results file."""
    write_results_section(path, name, body)


# ------------------------------------------------------------------------------------------------ plots


# colour = algorithm, line style and marker = library (ours solid)
KIND_OF = {
    "aid-cg": "cg", "aid-fp": "neumann", "stocbio": "stocbio", "itd": "itd", "aid-fp-lite": "identity",
    "aid-fp-lite (fd)": "identity",
}  # fmt: skip
KIND_COLOR = {"cg": "C0", "neumann": "C1", "stocbio": "C2", "itd": "C3", "identity": "C4"}
LIB_STYLE = {"bilevel": ("-", "o"), "torchopt": ("--", "s"), "higher": (":", "^"), "betty": ("-.", "D")}


def _style(method: str) -> dict[str, Any]:
    lib, _, kind = method.rpartition("/")
    lib, kind = (lib, kind) if lib else ("bilevel", KIND_OF.get(method, method))
    ls, marker = LIB_STYLE.get(lib, ("--", "x"))
    return {"color": KIND_COLOR.get(kind, "C7"), "linestyle": ls, "marker": marker, "ms": 4}


def plot_error_vs_time(res: Results, path: Path) -> None:
    """Log-log relative error vs ms per hypergradient, one panel per problem, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res.cases), figsize=(5 * len(res.cases) + 2, 4.5), squeeze=False)
    for ax, case in zip(axes[0], res.cases, strict=True):
        rows = [r for r in res.rows if r.problem == case.name and not math.isnan(r.rel_error)]
        for m in dict.fromkeys(r.method for r in rows):
            pts = [(r.ms, max(r.rel_error, 1e-17)) for r in rows if r.method == m]  # in budget order
            ax.plot(*zip(*pts, strict=True), label=m, **_style(m))
        ax.set(xscale="log", yscale="log", title=case.name, xlabel="ms per hypergradient", ylabel="relative error")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(points: list[MemoryPoint], path: Path) -> None:
    """Extra peak memory (MiB) vs iterations/steps, one line per solver (and CUDA if measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for solver in dict.fromkeys(p.solver for p in points):
        ok = [p for p in points if p.solver == solver and p.rss_extra_mb is not None]
        ax.plot([p.budget for p in ok], [p.rss_extra_mb for p in ok], "-o", label=f"{solver} (RSS)")
        cuda = [p for p in ok if p.cuda_extra_mb is not None]
        if cuda:
            ax.plot([p.budget for p in cuda], [p.cuda_extra_mb for p in cuda], ":s", label=f"{solver} (CUDA)")
    ax.set(
        xlabel="iterations / unrolled steps", ylabel="extra peak memory (MiB)", title="peak memory of one hypergradient"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: Results, out_dir: Path) -> Path:
    """PNG plots under ``out_dir/img`` and the section of ``out_dir/results.md``; returns the markdown path."""
    images = {"relative error vs time": "img/hypergrad_error_vs_time.png"}
    plot_error_vs_time(res, out_dir / images["relative error vs time"])
    if any(p.rss_extra_mb is not None for p in res.memory):
        images["peak memory vs iterations"] = "img/hypergrad_memory.png"
        plot_memory(res.memory, out_dir / images["peak memory vs iterations"])
    md = out_dir / "results.md"
    write_section(md, render_markdown(res, images))
    return md


# --------------------------------------------------------------------------- Nyström and warm starts (issue 16)
#
#     python -m benchmarks.hypergrad_accuracy --only nystrom warm-start     # these two sections only, ~4 min
#
# ``--only`` runs just the named parts and writes only their sections of results.md (``hypergrad_nystrom``,
# ``warm_start``), leaving the main ``hypergrad_accuracy`` section as it is.

PARTS = ("nystrom", "warm-start", "itd-memory", "sama", "neumann-sync", "bf16")
NYSTROM_SECTION, WARM_SECTION = "hypergrad_nystrom", "warm_start"
NYSTROM_BUDGETS = (1, 2, 5, 10, 20, 30, 50, 100, 200)  # ranks above a problem's dimension are left out
NYSTROM_RHO_DEFAULT = 0.1  # Hataya & Yamada's default (hypergrad docs: nystrom(..., rank=5, rho=0.1))
# one torch thread for this grid: on a loaded 2-core machine LAPACK's threaded QR waited for busy cores
# (measured: 16 ms with 2 threads vs 0.07 ms with 1 for a 2000 x 10 QR), which swamped Nyström's time
NYSTROM_THREADS = 1


def nystrom_budgets(case: Case, quick: bool = False) -> tuple[int, ...]:
    """The ranks (and CG / Neumann iteration budgets) measured on ``case``: at most its dimension."""
    return tuple(b for b in ((1, 5, 10) if quick else NYSTROM_BUDGETS) if b <= case.ref.dim)


def _nystrom_thunk(case: Case, budget: int | None, rho: str, probes: str) -> Thunk:
    value = case.mu if rho == "mu" else NYSTROM_RHO_DEFAULT
    spec = SolverSpec("nystrom", "rank", lambda c: {"rho": value, "probes": probes, "seed": 0})
    return solver_thunk(spec, case, budget)


def nystrom_methods() -> list[Method]:
    """AID-CG and AID-FP (Neumann, ``alpha = 1/L``) as in the main grid, and Nyström with ``rho = mu`` (the
    smallest Hessian eigenvalue, Gaussian and coordinate probes) and ``rho = 0.1`` (Hataya & Yamada's default)."""
    cg_fp = [m for m in our_methods() if m.label in ("aid-cg", "aid-fp")]
    nys = [
        Method(f"nystrom rho={rho}" + ("" if probes == "gaussian" else " coord"), True,
               partial(_nystrom_thunk, rho=rho, probes=probes))
        for rho, probes in (("mu", "gaussian"), ("mu", "coordinates"), (str(NYSTROM_RHO_DEFAULT), "gaussian"))
    ]  # fmt: skip
    return cg_fp + nys


@dataclass
class NystromResults:
    cfg: Config
    command: str
    cases: list[Case]
    budgets: dict[str, tuple[int, ...]]
    rows: list[AccuracyRow] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0


def run_nystrom(cfg: Config, command: str) -> NystromResults:
    """Error and ms of CG, Neumann and Nyström at equal HVP budgets (rank = iterations) on every problem."""
    import time

    start = time.perf_counter()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    threads = torch.get_num_threads()
    torch.set_num_threads(NYSTROM_THREADS)
    try:
        problems = cfg.problems if cfg.mode == "quick" else tuple(PROBLEMS)
        cases = [make_case(name) for name in problems]
        res = NystromResults(cfg, command, cases, {c.name: nystrom_budgets(c, cfg.mode == "quick") for c in cases})
        tasks = [(c, m, b) for c in cases for m in nystrom_methods() for b in res.budgets[c.name]]
        res.rows = [measure_point(c, m, b, cfg) for c, m, b in tqdm(tasks, desc="nystrom grid", file=sys.stderr)]
    finally:
        torch.set_num_threads(threads)
    res.seconds, res.started = time.perf_counter() - start, started
    return res


def _ratio_line(rows: list[AccuracyRow], num: str, den: str, budgets: tuple[int, ...]) -> str:
    by = {(r.method, r.budget): r.ms for r in rows}
    cells = [f"{b}: {by[(num, b)] / by[(den, b)]:.2f}" for b in budgets if (num, b) in by and (den, b) in by]
    return f"ms of `{num}` / ms of `{den}` at the same budget: " + ", ".join(cells)


def render_nystrom(res: NystromResults) -> str:
    out = [
        "## Nyström vs CG and Neumann at equal HVP budgets",
        "",
        f"Command: `{res.command}`, run {res.started} in {res.seconds:.0f} s.  ",
        f"Machine: {machine()}; this grid ran with {NYSTROM_THREADS} torch thread (LAPACK's threaded QR waited "
        "~15 ms per call for busy cores with 2).  ",
        f"Timings: medians of {res.cfg.repeats} runs after {res.cfg.warmup} warm-up run(s), wall clock, measured "
        "while other jobs (fine-tuning runs, tests) loaded the machine: compare only ratios within this run "
        "(the `x` column is ms over one inner gradient measured in the same run).",
        "",
        "Same point and problems as the main accuracy table (`hparams = .hparams(-2.0)`, exact inner minimiser, "
        f"AID-CG `tol = {CG_TOL:g}`, AID-FP `alpha = 1/L`). Budget = HVPs: CG / Neumann iterations, Nyström's rank "
        "(`bl.Nystrom(rank, rho)`: `v = (H_k + rho I)^{-1} grad_theta f`, `H_k` the rank-k Nyström sketch from k "
        "HVPs; ranks above the parameter dimension are refused, so each problem stops at its dimension). "
        "`rho=mu`: rho is the smallest Hessian eigenvalue (known here); `coord`: Hataya & Yamada's coordinate "
        f"probes (k random columns of H) instead of Gaussian ones; `rho={NYSTROM_RHO_DEFAULT}`: their default.",
        "",
        _table(
            ["problem", "train x d (val)", "mu", "L", "L/mu", "||exact||", "1 inner grad (ms)"],
            [_case_cells(c) for c in res.cases],
        ),
    ]
    for case in res.cases:
        rows = [r for r in res.rows if r.problem == case.name]
        budgets = res.budgets[case.name]
        out += [
            "",
            f"### {case.name}: relative error `||hg - exact|| / ||exact||` (Nyström)",
            "",
            _pivot(rows, budgets, _err_cell),
            "",
            f"### {case.name}: ms per hypergradient (in units of one inner gradient) (Nyström)",
            "",
            _pivot(rows, budgets, _ms_cell),
            "",
            _ratio_line(rows, "nystrom rho=mu", "aid-cg", budgets),
        ]
    return "\n".join(out) + "\n"


@dataclass
class WarmRun:
    """One hyper-cleaning run: per hyper step CG iterations, HVPs (incl. the warm start's ``H v0``) and
    convergence; the final ``lam``, validation loss and F1."""

    warm: bool
    tol: float
    iters: list[int]
    hvps: list[int]
    converged: list[bool]
    lam: torch.Tensor
    val_loss: float
    f1: float


def warm_start_cleaning(
    tol: float, warm: bool, outer_steps: int = 100, T: int = 10, max_iters: int = 1000, seed: int = 0
) -> WarmRun:
    """Hyper-cleaning (``examples.hyper_cleaning``: ``load_digits``, 800 training images of which half get a
    wrong label, a linear classifier, ``reg = 1e-3``) in float64 with AID-CG (``iters = max_iters``, ``tol``):
    ``outer_steps`` trainer steps of ``T`` warm-started SGD steps and one Adam step on ``lam`` (lr 0.1), with
    ``TrainerConfig(warm_start=warm)``."""
    from torch import nn

    from examples.hyper_cleaning.cleaning import (
        f1_corrupted,
        inner_objective,
        load_cleaning_data,
        outer_objective,
        smoothness,
    )

    data = load_cleaning_data(seed=seed, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(64, 10).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.zeros(data.n_train, dtype=torch.float64))})
    rec: dict[str, list[Any]] = {"iters": [], "hvps": [], "converged": []}

    class Record(bl.Callback):
        def on_step_end(self, trainer: bl.BilevelTrainer, metrics: dict[str, Any]) -> None:
            info = metrics.get("hypergrad_info")
            if info is not None:
                rec["iters"].append(info.iters)
                rec["hvps"].append(info.n_hvp)
                rec["converged"].append(bool(info.converged))

    trainer = bl.BilevelTrainer(
        model, torch.optim.SGD(model.parameters(), lr=1.0 / smoothness(data, 1e-3)), inner_objective(1e-3),
        outer=outer_objective, meta_model=meta, meta_optimizer=torch.optim.Adam(meta.parameters(), lr=0.1),
        solver=bl.AIDCG(iters=max_iters, tol=tol, on_negative_curvature="raise"),
        config=bl.TrainerConfig(inner_steps=T, hyper_every=1, warm_start=warm), callbacks=[Record()],
    )  # fmt: skip
    trainer.fit([data.train] * outer_steps, [data.val], epochs=1, progress=False)
    lam = meta["lam"].detach().clone()
    with torch.no_grad():
        val = float(outer_objective(trainer.params, trainer.hparams, data.val))
    return WarmRun(warm, tol, rec["iters"], rec["hvps"], rec["converged"], lam, val,
                   f1_corrupted(torch.sigmoid(lam), data.corrupted))  # fmt: skip


@dataclass
class WarmResults:
    command: str
    outer_steps: int
    T: int
    runs: list[WarmRun] = field(default_factory=list)
    started: str = ""
    seconds: float = 0.0


def run_warm_start(command: str, quick: bool = False, tols: tuple[float, ...] = (1e-4, 1e-6, 1e-8)) -> WarmResults:
    """Cold vs warm AID-CG on hyper-cleaning at each ``tol`` (the same seed, data and steps)."""
    import time

    start = time.perf_counter()
    res = WarmResults(command, 20 if quick else 100, 10)
    res.started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for tol in tols[1:2] if quick else tols:
        for warm in (False, True):
            res.runs.append(warm_start_cleaning(tol, warm, outer_steps=res.outer_steps, T=res.T))
    res.seconds = time.perf_counter() - start
    return res


def render_warm_start(res: WarmResults) -> str:
    rows = []
    by = {(r.tol, r.warm): r for r in res.runs}
    for (tol, warm), r in by.items():
        cold = by[(tol, False)]
        n = len(r.iters)
        rows.append([
            f"{tol:g}", "warm" if warm else "cold", f"{np.mean(r.iters):.1f}", f"{np.median(r.iters):.0f}",
            f"{np.mean(r.iters[: n // 10]):.1f} / {np.mean(r.iters[-(n // 10):]):.1f}", str(sum(r.hvps)),
            f"{sum(r.hvps) / sum(cold.hvps):.2f}", f"{sum(r.converged)}/{n}", f"{r.val_loss:.4f}", f"{100 * r.f1:.1f}",
            _fmt(float((r.lam - cold.lam).abs().max()), ".1e"),
        ])  # fmt: skip
    header = ["tol", "start", "CG iters / step (mean)", "median", "first / last 10 %", "HVPs in all",
              "HVPs vs cold", "converged", "final val loss", "F1 (%)", "max abs dlam"]  # fmt: skip
    text = [
        "## Warm starts: CG iterations per hyper step (hyper-cleaning)",
        "",
        f"Command: `{res.command}`, run {res.started} in {res.seconds:.0f} s (no timings: iteration counts).",
        "",
        "`examples/hyper_cleaning` (load_digits, 800 training images, 50 % wrong labels, linear classifier, "
        f"`reg = 1e-3`), float64, seed 0: {res.outer_steps} trainer steps of T={res.T} warm-started full-batch SGD "
        "steps and one Adam step (lr 0.1) on the 800 example weights, AID-CG with `iters = 1000` and the given "
        "`tol` (`||b - H v|| <= tol ||b||`). Cold: every solve starts at `v = 0`; warm: "
        "`TrainerConfig(warm_start=True)` starts it at the previous hyper step's `v` (one more HVP for `H v0`, "
        "counted in the HVP column). First / last 10 %: mean iterations over the first and last tenth of the hyper "
        "steps. `max abs dlam`: largest difference of the learned `lam` from the cold run's (both runs reach the "
        "same tolerance at every step, so they differ within the solves' tolerance, carried along the run).",
        "",
        _table(header, rows),
    ]
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------------ SAMA's direction
#
#     python -m benchmarks.hypergrad_accuracy --only sama      # section ``hypergrad_sama`` only, seconds
#
# SAMA needs the inner optimizer's state: on each reference problem, Adam (lr 1e-2, betas 0.9 / 0.999)
# trains theta from 0 for SAMA_STEPS steps at phi; at its last iterate, SAMA (P of the last Adam step) and
# AID-FP-Lite (scale 1; both with central finite-difference mixed products, radius 1e-2) are compared with
# the exact hypergradient at theta*(phi) and with AID-CG (50 iterations) at the same iterate. Cosine is the
# fair score of the two biased solvers (their scale is absorbed by the outer learning rate).

SAMA_SECTION, SAMA_STEPS, SAMA_LR = "hypergrad_sama", (100, 1000), 1e-2


def sama_rows(steps: tuple[int, ...] = SAMA_STEPS) -> list[list[str]]:
    """One row per (problem, Adam steps, method): cosine and relative error against the exact answer."""
    from bilevel.solvers.sama import sama_preconditioner

    rows = []
    for name, make in PROBLEMS.items():
        ref = make()
        hp = ref.hparams(HPARAM_VALUE)
        exact, problem = ref.exact_hypergrad(hp), ref.problem()
        star = ref.solution(hp)
        for T in steps:
            theta = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in star.items()}
            opt = torch.optim.Adam(theta.values(), lr=SAMA_LR)
            for _ in range(T):
                grads = torch.autograd.grad(problem.inner(dict(theta), hp, ref.inner_batch), list(theta.values()))
                for v, g in zip(theta.values(), grads, strict=True):
                    v.grad = g
                opt.step()
            applied = {k: v.grad.detach().clone() for k, v in theta.items()}
            point = {k: v.detach().clone() for k, v in theta.items()}
            dist = float(_flat(tree_sub_(point, star)).norm() / _flat(star).norm())
            P = sama_preconditioner(opt, theta, applied, applied=True)
            args = (problem, point, hp, ref.inner_batch, ref.outer_batch)
            ests = {
                "sama (Adam's P)": bl.SAMA().hypergrad(*args, preconditioner=P),
                "aid-fp-lite (scale 1, fd)": bl.AIDFPLite(mixed="fd").hypergrad(*args),
                "aid-cg (50 iters)": bl.AIDCG(iters=50, tol=1e-14, on_negative_curvature="ignore").hypergrad(*args),
            }
            for method, hg in ests.items():
                cells = [f"{cosine(hg, exact):.4f}", f"{rel_error(hg, exact):.2e}"]
                rows.append([name, str(T), f"{dist:.1e}", method, *cells])
    return rows


def tree_sub_(a: Tree, b: Tree) -> Tree:
    return {k: a[k] - b[k] for k in a}


def render_sama(rows: list[list[str]], command: str, seconds: float) -> str:
    head = ["problem", "Adam steps", "||theta - theta*|| / ||theta*||", "method", "cosine", "rel. error"]
    return "\n".join(
        [
            "## SAMA's direction against the exact hypergradient (`benchmarks/hypergrad_accuracy.py --only sama`)",
            "",
            f"Command: `{command}` ({seconds:.0f} s; no timings). Adam (lr {SAMA_LR:g}) trains theta from 0 on each "
            "reference problem at phi = -2; at its last iterate SAMA (the preconditioner of that Adam step), "
            "AID-FP-Lite (scale 1) and AID-CG (50 iterations) are compared with the exact hypergradient at "
            "theta*(phi). Cosine is the fair score of the two biased solvers.",
            "",
            _table(head, rows),
        ]
    )


# ------------------------------------------------------------------------------------ bfloat16 params
#
#     python -m benchmarks.hypergrad_accuracy --only bf16      # section ``hypergrad_bf16`` only, ~1 min
#
# The mixed-precision policy (docs/math.md, "Precision"): params and batches in bfloat16, hparams in float32
# (products in bfloat16, the linear solve accumulating in float32, the hypergradient in float32), against
# the same solver with float32 params and batches, at phi = -2 and the exact inner minimiser. Errors against
# the exact hypergradient and against the same solver in float64 (which isolates rounding from the solver's
# own bias); ms: median of BF16_REPEATS runs on one thread.

BF16_SECTION, BF16_REPEATS = "hypergrad_bf16", 5
BF16_PROBLEMS = ("ridge-diabetes", "logistic-cancer", "ridge-d2000")


def bf16_options(name: str, ref: testing.RidgeL2, mu: float, L: float, batch: Any) -> dict[str, Any]:
    """Fixed options per solver for the bf16 comparison (the same for every dtype); ``mu``, ``L``: the inner
    Hessian's extreme eigenvalues."""
    return {
        "itd": {"steps": 50, "lr": 1.0 / L},
        "aid-cg": {"iters": 30, "tol": 1e-12, "on_negative_curvature": "ignore"},
        "aid-fp": {"iters": 100, "alpha": 1.0 / L, "on_divergence": "ignore"},
        "stocbio": {"iters": 100, "alpha": 1.0 / L, "batches": [batch], "on_divergence": "ignore"},
        "nystrom": {"rank": min(ref.dim, 30), "rho": mu},
    }.get(name, {})


def bf16_rows(problems: tuple[str, ...] = BF16_PROBLEMS, repeats: int = BF16_REPEATS) -> list[list[str]]:
    """One row per (problem, solver): errors and ms with float32 and with bfloat16 params and batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for pname in problems:
            ref = PROBLEMS[pname]()
            hp64 = ref.hparams(HPARAM_VALUE)
            exact, star, (mu, L) = ref.exact_hypergrad(hp64), ref.solution(hp64), ref.curvature(hp64)
            for name in sorted(bl.SOLVERS):
                out: dict[torch.dtype, tuple[Tree, float]] = {}
                for dtype in (torch.float64, torch.float32, torch.bfloat16):
                    hp = {k: v.to(torch.float64 if dtype == torch.float64 else torch.float32) for k, v in hp64.items()}
                    params = {k: v.to(dtype) for k, v in star.items()}
                    inner = tuple(t.to(dtype) for t in ref.inner_batch)
                    outer = tuple(t.to(dtype) for t in ref.outer_batch)
                    solver = bl.get_solver(name, **bf16_options(name, ref, mu, L, inner))
                    call = partial(solver.hypergrad, ref.problem(), params, hp, inner, outer)
                    ms, hgs = time_call(call, repeats=1 if dtype == torch.float64 else repeats)
                    out[dtype] = hgs[-1], ms
                hg64 = out[torch.float64][0]
                (h32, ms32), (h16, ms16) = out[torch.float32], out[torch.bfloat16]
                rows.append([
                    pname, name, f"{rel_error(h32, exact):.2e}", f"{rel_error(h16, exact):.2e}",
                    f"{rel_error(h32, hg64):.1e}", f"{rel_error(h16, hg64):.1e}",
                    f"{ms32:.2f}", f"{ms16:.2f}", f"{ms16 / ms32:.2f}",
                ])  # fmt: skip
        return rows
    finally:
        torch.set_num_threads(threads)


def render_bf16(rows: list[list[str]], command: str, seconds: float) -> str:
    head = [
        "problem", "solver", "rel. error vs exact (f32)", "(bf16)", "vs same solver in f64 (f32)", "(bf16)",
        "ms (f32)", "ms (bf16)", "bf16 / f32",
    ]  # fmt: skip
    ratios = [float(r[-1]) for r in rows]
    return "\n".join(
        [
            "## bfloat16 params (`benchmarks/hypergrad_accuracy.py --only bf16`)",
            "",
            f"Command: `{command}` ({seconds:.0f} s, {machine()}, one thread; **measured while the machine ran "
            "other jobs**: compare the bf16 / f32 ratio of a row, not milliseconds across runs). The policy of "
            "[the math](math.md#precision): params and batches bfloat16, hparams float32, products in bfloat16, "
            "the linear solve accumulating in float32, the hypergradient float32; against float32 params and "
            "batches with the same options (itd 50 steps, aid-cg 30 iterations, aid-fp / stocbio 100 terms, "
            "nystrom rank min(d, 30) with rho = mu, the smallest eigenvalue; SAMA without a preconditioner, i.e. "
            "scale 1 and central finite differences). `vs same solver in f64` isolates rounding from the solver's"
            " own bias (aid-fp-lite, sama and a low-rank nystrom are biased, so their error against the exact "
            "answer is mostly bias in every dtype). Nyström draws its probes in the dtype of the solve: float64 "
            "in the reference run, float32 in the other two, so below full rank its `vs f64` column also holds "
            f"the change of probes. Time ratio bf16 / f32 in this run: {min(ratios):.2f} to {max(ratios):.2f} "
            "(above 1: slower; a CPU without bfloat16 matmul instructions gains memory, not time).",
            "",
            _table(head, rows),
        ]
    )


# ------------------------------------------------------------------------- Neumann host synchronisation
#
#     python -m benchmarks.hypergrad_accuracy --only neumann-sync      # section ``hypergrad_neumann_sync``
#
# Issue 15 item 3: ms per AID-FP hypergradient with 200 Neumann terms on each reference problem, with the
# divergence test every term (check_every=1, the default) and every 10 / 50 terms, beside betty's Neumann
# (no divergence test) where it imports; one thread, median of 7 after a warm-up, interleaved per problem.

NEUMANN_SYNC_SECTION, NEUMANN_SYNC_TERMS = "hypergrad_neumann_sync", 200


def neumann_sync_rows(terms: int = NEUMANN_SYNC_TERMS, repeats: int = 7) -> list[list[str]]:
    try:
        from . import peers as peers_mod

        betty = peers_mod.available().get("betty") is not None
    except Exception:  # a missing peer is left out, not fatal
        peers_mod, betty = None, False
    rows = []
    for name in PROBLEMS:
        case = make_case(name)
        args = (case.problem, case.params, case.hparams, case.ref.inner_batch, case.ref.outer_batch)
        alpha = 1.0 / case.L
        thunks = {
            f"aid-fp, check_every={k}": partial(bl.AIDFP(iters=terms, alpha=alpha, check_every=k).hypergrad, *args)
            for k in (1, 10, 50)
        }
        if betty:
            thunks["betty neumann"] = partial(
                peers_mod.peer_hypergrad, "betty", "neumann", *args, iters=terms, alpha=alpha, lr=alpha, tol=CG_TOL
            )
        ms = {label: time_call(fn, repeats=repeats, warmup=1)[0] for label, fn in thunks.items()}
        base = ms["aid-fp, check_every=1"]
        rows += [[name, label, f"{v:.1f}", f"{v / base:.2f}"] for label, v in ms.items()]
    return rows


def run_parts(parts: list[str], quick: bool, out_dir: Path, command: str) -> dict[str, Any]:
    """Run the ``--only`` parts, print and write their sections of ``out_dir/results.md``."""
    cfg = make_config("quick" if quick else "default", peers=False, memory=False)
    md, done = out_dir / "results.md", {}
    if "nystrom" in parts:
        done["nystrom"] = nres = run_nystrom(cfg, command)
        text = render_nystrom(nres)
        print(text)
        write_section(md, text, NYSTROM_SECTION)
    if "warm-start" in parts:
        done["warm-start"] = wres = run_warm_start(command, quick)
        text = render_warm_start(wres)
        print(text)
        write_section(md, text, WARM_SECTION)
    if "itd-memory" in parts:
        done["itd-memory"] = run_itd_memory(quick, out_dir, command)
    if "neumann-sync" in parts:
        start = time.perf_counter()
        torch.set_num_threads(1)
        done["neumann-sync"] = rows = neumann_sync_rows(20 if quick else NEUMANN_SYNC_TERMS, 3 if quick else 7)
        text = "\n".join([
            "## Neumann series: host synchronisation every k terms "
            "(`benchmarks/hypergrad_accuracy.py --only neumann-sync`)",
            "",
            f"Command: `{command}` ({time.perf_counter() - start:.0f} s, one torch thread, median of 7 after a "
            "warm-up; "
            f"{NEUMANN_SYNC_TERMS} terms, alpha = 1/L, at the inner minimiser). `x check_every=1`: time relative to "
            "our default on the same problem, same run.",
            "",
            _table(["problem", "method", "ms per hypergradient", "x check_every=1"], rows),
        ])  # fmt: skip
        print(text)
        write_section(md, text, NEUMANN_SYNC_SECTION)
    if "sama" in parts:
        start = time.perf_counter()
        done["sama"] = rows = sama_rows((20,) if quick else SAMA_STEPS)
        text = render_sama(rows, command, time.perf_counter() - start)
        print(text)
        write_section(md, text, SAMA_SECTION)
    if "bf16" in parts:
        start = time.perf_counter()
        done["bf16"] = rows = bf16_rows(BF16_PROBLEMS[:1] if quick else BF16_PROBLEMS, 1 if quick else BF16_REPEATS)
        text = render_bf16(rows, command, time.perf_counter() - start)
        print(text)
        write_section(md, text, BF16_SECTION)
    sections = {
        "nystrom": NYSTROM_SECTION, "warm-start": WARM_SECTION, "itd-memory": ITD_MEMORY_SECTION, "sama": SAMA_SECTION,
        "neumann-sync": NEUMANN_SYNC_SECTION,
        "bf16": BF16_SECTION,
    }  # fmt: skip
    print(f"wrote sections {[sections[p] for p in parts]} of {md}")
    return done


# -------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> Results | dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="seconds: 2 small problems, 3 budgets (smoke test)")
    group.add_argument("--full", action="store_true", help="budgets up to 500, 9 repeats, bigger memory problem")
    parser.add_argument(
        "--out-dir", type=Path, help="where results.md and img/ go (default: docs/, or a temp dir with --quick)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, help="run only these parts and write only their sections "
        f"({NYSTROM_SECTION}, {WARM_SECTION}, {ITD_MEMORY_SECTION}, {SAMA_SECTION}, {BF16_SECTION}); the main grid "
        "is not run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="hypergrad_quick_")) if args.quick else REPO / "docs")
    if args.only:
        return run_parts(args.only, args.quick, out_dir, " ".join(["python -m benchmarks.hypergrad_accuracy", *argv]))
    cfg = make_config(mode, peers=not args.no_peers, memory=not args.no_memory)
    res = run(cfg, " ".join(["python -m benchmarks.hypergrad_accuracy", *argv]))
    md = write_outputs(res, out_dir)
    print(render_markdown(res, {}))
    print(f"wrote {md} and plots under {out_dir / 'img'} ({res.seconds:.0f} s)")
    return res


if __name__ == "__main__":
    main()
