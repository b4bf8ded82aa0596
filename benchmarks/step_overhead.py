"""Cost of one BilevelTrainer step per method, relative to the single-task step.

    python -m benchmarks.step_overhead [--reps 40] [--device cpu] [--markdown docs/results.md]

Methods, all through the same :meth:`bilevel.BilevelTrainer.step` (so the loop's own overhead is
the same for all): ``single`` (primary loss only), ``mtl`` (fixed sum of the task losses) and a
hyper step at *every* step (``hyper_every=1``, the worst case) with each solver, and AID-FP-Lite and
AID-CG once more with ``TrainerConfig.share_linearization`` ("shared": the inner step's gradient graph
serves the hyper step). MELTR runs a
hyper step every K = 3 or 5 steps; the column ``K=3`` estimates that amortised cost as
``1 + (ratio - 1) / 3``. Steps of all methods are interleaved (a random order in each round) and the
median over rounds is reported, so background load drifts affect all methods alike.

Models: a small MLP (3 task losses on regression data) and a small ``nn.TransformerEncoder``
(3 task losses on token sequences); each with a small meta-network that combines the losses
(``g = L_primary + softplus(meta(L)) . L_aux``) and ``f = L_primary``.

Memory: the peak memory of one ITD hypergradient as a function of the unrolled steps (see
:func:`peak_memory_mib`), against AID-CG, whose memory does not grow with its iterations.

MELTR memory (``--only meltr-memory``, its own section ``meltr_memory``): the peak memory of one training
step of the MELTR example (UniVL-tiny from the shipped checkpoint on the testbed, batch 16, MELTR's loss
network) with a hyper step, per solver and product mode (``hvp=`` / ``mixed=``, with and without a shared
linearisation), against one MTL step of the same model and batch (:func:`meltr_memory`).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import bilevel as bl
from examples.results_md import write_section as write_results_section

SOLVERS = {
    "aid-fp-lite": {},
    "aid-fp (K=5)": {"iters": 5, "alpha": 0.05, "on_divergence": "ignore"},  # a cost benchmark: a stop is counted
    "aid-cg (K=5)": {"iters": 5, "on_negative_curvature": "ignore"},
    "stocbio (K=5)": {"iters": 5, "alpha": 0.05, "on_divergence": "ignore"},
    "itd (T=5)": {"steps": 5, "lr": 0.05},
}
# the same solvers with TrainerConfig.share_linearization: the inner step's graph serves the hyper step
SHARED = " shared"
SOLVERS |= {f"{m}{SHARED}": SOLVERS[m] for m in ("aid-fp-lite", "aid-cg (K=5)")}
# product modes of the mixed product (bilevel.products): AID-FP-Lite shared with each, and SAMA (first order)
SOLVERS |= {f"aid-fp-lite ({m}){SHARED}": {"mixed": m} for m in ("jvp", "fd", "fd-onesided")}
SOLVERS |= {f"sama{SHARED}": {}}


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, width: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.heads = nn.Linear(width, 3)

    def forward(self, x):
        return self.heads(self.body(x))


def mlp_task(device, batch=64):
    model = MLP().to(device)
    _, fn = bl.functional_module(model)

    def losses(p, b):
        x, y = b
        o = fn(p, x)
        return torch.stack([((o[:, 0] - y) ** 2).mean(), ((o[:, 1] - y.sin()) ** 2).mean(), (o[:, 2] ** 2).mean()])

    def data():
        x = torch.randn(batch, 32, device=device)
        return x, x[:, :4].sum(1)

    return model, losses, data


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.tok = nn.Linear(d, vocab)
        self.cls = nn.Linear(d, 2)

    def forward(self, ids):
        h = self.enc(self.emb(ids))
        return self.tok(h), self.cls(h.mean(1))


def transformer_task(device, batch=16, seq=16):
    model = TinyTransformer().to(device)
    _, fn = bl.functional_module(model)

    def losses(p, b):
        ids, label = b
        tok, cls = fn(p, ids)
        ce = nn.functional.cross_entropy
        shifted = ce(tok[:, :-1].reshape(-1, tok.shape[-1]), ids[:, 1:].reshape(-1))
        return torch.stack([ce(cls, label), shifted, ce(tok.reshape(-1, tok.shape[-1]), ids.reshape(-1))])

    def data():
        ids = torch.randint(0, 50, (batch, seq), device=device)
        return ids, (ids[:, 0] > 25).long()

    return model, losses, data


def make_trainer(task, method: str, device):
    torch.manual_seed(0)
    model, losses, _ = task(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if method == "single":
        return bl.BilevelTrainer(model, opt, bl.single_task_objective(lambda p, b: losses(p, b)[0]))
    if method == "mtl":
        return bl.BilevelTrainer(model, opt, bl.mtl_objective(losses))
    meta = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2)).to(device)
    _, meta_fn = bl.functional_module(meta)

    def g(p, h, b):
        L = losses(p, b)
        return L[0] + (nn.functional.softplus(meta_fn(h, L)) * L[1:]).sum()

    def f(p, h, b):
        return losses(p, b)[0]

    name = method.split(" ")[0]
    return bl.BilevelTrainer(
        model, opt, g, outer=f, meta_model=meta, meta_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-3),
        solver=bl.get_solver(name, **SOLVERS[method]),
        config=bl.TrainerConfig(hyper_every=1, share_linearization=method.endswith(SHARED)),
    )  # fmt: skip


def hyper_in_inner_steps(times: dict[str, float], method: str) -> float | None:
    """A MELTR step's hyper step in units of an inner step: ``(t_method - t_mtl) / t_mtl`` (None for the
    baselines). With ``hyper_every=1`` every step is an inner step plus a hyper step."""
    if method in ("single", "mtl"):
        return None
    return (times[method] - times["mtl"]) / times["mtl"]


def time_steps(task, device, reps: int, progress: bool) -> dict[str, float]:
    methods = ["single", "mtl", *SOLVERS]
    trainers = {m: make_trainer(task, m, device) for m in methods}
    _, _, data = task(device)
    batches = [(data(), data()) for _ in range(8)]
    for tr in trainers.values():  # warm-up (first calls trace/allocate)
        if isinstance(tr.solver, bl.StocBiO):
            tr.solver.batches = [b[0] for b in batches]
        for bi, bo in batches[:3]:
            tr.step(bi, bo)
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for r in tqdm(range(reps), desc=task.__name__, disable=not progress, leave=False):
        random.shuffle(order)
        bi, bo = batches[r % len(batches)]
        for m in order:
            times[m].append(trainers[m].step(bi, bo)["time"])
    return {m: statistics.median(v) for m, v in times.items()}


def peak_memory_mib(fn, device) -> float:
    """Peak extra memory (MiB) while ``fn()`` runs.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum, in time order, of every
    allocation and free recorded by ``torch.profiler`` with ``profile_memory=True`` (the allocator's
    view: it ignores memory that the system allocator keeps cached, which makes RSS useless here).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


def memory_vs_steps(device, steps=(1, 2, 4, 8, 16)) -> list[tuple[str, float]]:
    """ITD's peak memory grows with the unrolled steps; AID-CG's does not grow with its iterations."""
    tr = make_trainer(lambda d: mlp_task(d, batch=2048), "aid-cg (K=5)", device)
    _, _, data = mlp_task(device, batch=2048)
    bi, bo = data(), data()
    rows: list[tuple[str, float]] = []
    for label, solver in [(f"itd T={t}", bl.get_solver("itd", steps=t, lr=0.01)) for t in steps] + [
        (f"aid-cg K={k}", bl.get_solver("aid-cg", iters=k, tol=1e-30, on_negative_curvature="ignore")) for k in (5, 20)
    ]:
        run = lambda s=solver: s.hypergrad(tr.problem, tr.params, tr.hparams, bi, bo)  # noqa: E731
        run()  # warm-up
        rows.append((label, peak_memory_mib(run, device)))
    return rows


#: (label, solver name, solver options, shared linearisation) of the MELTR memory table; the options follow
#: the MELTR example's make_solver (iters 3, alpha 0.01, non-convexity counted, not raised)
_CG = {"iters": 3, "on_negative_curvature": "ignore"}
_FP = {"iters": 3, "alpha": 0.01, "on_divergence": "ignore"}
MELTR_MEMORY_ROWS: list[tuple[str, str, dict, bool]] = [
    *[
        (f"aid-fp-lite, mixed={m}", "aid-fp-lite", {"scale": 0.01, "mixed": m}, False)
        for m in ("autograd", "jvp", "fd")
    ],
    *[
        (f"aid-fp-lite shared, mixed={m}", "aid-fp-lite", {"scale": 0.01, "mixed": m}, True)
        for m in ("autograd", "jvp", "fd", "fd-onesided")
    ],
    ("sama, mixed=fd (first order)", "sama", {"scale": 0.01}, False),
    ("sama shared, mixed=fd (first order)", "sama", {"scale": 0.01}, True),
    ("sama shared, mixed=fd-onesided (first order)", "sama", {"scale": 0.01, "mixed": "fd-onesided"}, True),
    ("aid-cg(3), hvp=autograd, mixed=autograd", "aid-cg", _CG, False),
    ("aid-cg(3), hvp=autograd, mixed=jvp", "aid-cg", {**_CG, "mixed": "jvp"}, False),
    ("aid-cg(3), hvp=fd, mixed=fd (first order)", "aid-cg", {**_CG, "hvp": "fd", "mixed": "fd"}, False),
    ("aid-cg(3) shared, hvp=autograd, mixed=autograd", "aid-cg", _CG, True),
    (
        "aid-cg(3) shared, hvp=fd, mixed=fd-onesided (first order)",
        "aid-cg",
        {**_CG, "hvp": "fd", "mixed": "fd-onesided"},
        True,
    ),
    ("aid-fp(3), hvp=autograd, mixed=autograd", "aid-fp", _FP, False),
    ("aid-fp(3), hvp=fd, mixed=fd (first order)", "aid-fp", {**_FP, "hvp": "fd", "mixed": "fd"}, False),
    ("stocbio(3)", "stocbio", _FP, False),
    ("itd(1)", "itd", {"steps": 1, "lr": 0.01}, False),
]


def meltr_memory(progress: bool = True) -> list[tuple[str, float, float]]:
    """Peak extra memory (MiB, :func:`peak_memory_mib`) of one step of the MELTR example with a hyper step
    (``K=1``), per :data:`MELTR_MEMORY_ROWS`, and of one MTL step; ``(label, step MiB, hypergradient MiB)``
    with the hypergradient alone (the solver call on the same batches) beside the whole step.

    Every run starts from the same pretrained backbone and batches (seed 0); each is measured after one
    warm-up step. The first row is the MTL step (no hypergradient: NaN)."""
    from examples.meltr_video.finetune import FinetuneConfig, FinetuneRun
    from examples.meltr_video.pretrain import load_pretrained
    from examples.meltr_video.testbed import make_testbed

    base = FinetuneConfig(method="mtl", progress=False)
    data = make_testbed(base.data_seed, sizes=base.sizes)
    model, tok, _ = load_pretrained(base.pretrained)
    pre = (model.state_dict(), model.cfg, tok)
    cpu = torch.device("cpu")
    out: list[tuple[str, float, float]] = []

    def batches(run: FinetuneRun) -> tuple[object, object]:
        """The first 16 train clips and the first 16 meta clips, collated with fixed mask seeds."""
        n = run.cfg.batch_size
        return tuple(run.collate(seed=i)([run.sets[s][j] for j in range(n)]) for i, s in enumerate(("train", "meta")))

    mtl = FinetuneRun(base, data, pre)
    bi, bo = batches(mtl)
    mtl.trainer.step(bi, bo)
    out.append(("MTL step (reference)", peak_memory_mib(lambda: mtl.trainer.step(bi, bo), cpu), float("nan")))
    for label, name, opts, share in tqdm(MELTR_MEMORY_ROWS, desc="meltr memory", disable=not progress):
        cfg = FinetuneConfig(method="meltr", K=1, share_linearization=share, progress=False)
        run = FinetuneRun(cfg, data, pre, solver=bl.get_solver(name, **opts))
        bi, bo = batches(run)
        tr = run.trainer
        tr.step(bi, bo)  # warm-up (first calls allocate / trace)
        step = peak_memory_mib(lambda tr=tr, bi=bi, bo=bo: tr.step(bi, bo), cpu)
        # StocBiO's products: the training batch again (the memory of one product, not its sampling)
        extra = {"hvp_batches": iter([bi] * 64)} if tr.solver.draws_hvp_batches else {}
        hg = peak_memory_mib(
            lambda tr=tr, bi=bi, bo=bo, extra=extra: tr.solver.hypergrad(
                tr.problem, tr.params, tr.hparams, bi, bo, **extra
            ),
            cpu,
        )
        out.append((label, step, hg))
    return out


def meltr_memory_text(rows: list[tuple[str, float, float]], cmd: str, seconds: float) -> str:
    ref = rows[0][1]
    lines = [
        f"Command: `{cmd}` (torch {torch.__version__}, CPU, torch.profiler allocation timeline: the running sum of "
        f"every allocation and free the profiler records, in time order; {seconds:.0f} s). UniVL-tiny (shipped "
        "testbed checkpoint), testbed batch 16 (train) and 16 (meta), MELTR's loss network, one step with a hyper "
        "step (K=1) after one warm-up step; `hypergradient` is the solver call alone on the same batches.",
        "",
        "| step | peak MiB (whole step) | x MTL step | peak MiB (hypergradient alone) |",
        "|---|---|---|---|",
    ]
    for label, step, hg in rows:
        lines.append(f"| {label} | {step:.1f} | {step / ref:.2f} | {'-' if hg != hg else f'{hg:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table into this file's section")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--only", choices=["timing", "meltr-memory"], default="timing",
        help="timing (default): step times and ITD memory (section step_overhead); meltr-memory: the MELTR memory "
        "table (section meltr_memory, CPU only)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        ap.error("--reps and --threads must be >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cmd = "python -m benchmarks.step_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.only == "meltr-memory":
        if device.type != "cpu":
            ap.error("--only meltr-memory measures on the CPU (the profiler's allocation timeline)")
        text = meltr_memory_text(meltr_memory(not args.no_progress), cmd.strip(), time.perf_counter() - start)
        print(text)
        if args.markdown is not None:
            write_results_section(
                args.markdown, "meltr_memory",
                f"## Peak memory of a MELTR step per solver and product mode (`benchmarks/step_overhead.py`)\n\n{text}",
            )  # fmt: skip
        return text
    results = {t.__name__: time_steps(t, device, args.reps, not args.no_progress) for t in (mlp_task, transformer_task)}
    mem = memory_vs_steps(device)
    lines = [
        f"Command: `{cmd.strip()}` (torch {torch.__version__}, device {device}, {args.threads} thread(s), "
        f"{args.reps} interleaved rounds, median; {time.perf_counter() - start:.0f} s; host with {os.cpu_count()} "
        "CPU cores). Timings on a shared machine are noisy: compare ratios within one run only.",
        "",
        "Time of one `BilevelTrainer.step` relative to the single-task step of the same model (hyper step at every "
        "step; `K=3`: amortised estimate `1 + (ratio - 1) / 3` with a hyper step every 3rd step). `hyper / inner "
        "step`: the hyper step's cost in units of an inner step, `(step - mtl step) / mtl step` (MTL's step is the "
        "inner step with the same task losses; the meta-network's forward is negligible).",
        "",
        "| method | MLP ratio | MLP K=3 | Transformer ratio | Transformer K=3 | MLP hyper / inner step "
        "| Transformer hyper / inner step |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in results["mlp_task"]:
        a, b = (results[t][m] / results[t]["single"] for t in ("mlp_task", "transformer_task"))
        hyper = [hyper_in_inner_steps(results[t], m) for t in ("mlp_task", "transformer_task")]
        cells = " | ".join("-" if h is None else f"{h:.2f}" for h in hyper)
        lines.append(f"| {m} | {a:.2f} | {1 + (a - 1) / 3:.2f} | {b:.2f} | {1 + (b - 1) / 3:.2f} | {cells} |")
    ms = {t: results[t]["single"] * 1e3 for t in results}
    lines += [
        "",
        f"Single-task step: MLP {ms['mlp_task']:.2f} ms, Transformer {ms['transformer_task']:.2f} ms.",
        "",
        "Peak extra memory of one hypergradient (MLP 32-128-128-3, batch 2048"
        + (", torch.profiler allocation timeline" if device.type == "cpu" else ", CUDA allocator")
        + "):",
        "",
        "| solver | peak MiB |",
        "|---|---|",
    ]
    lines += [f"| {label} | {v:.1f} |" for label, v in mem]
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        write_section(args.markdown, text)
    return text


def write_section(path: Path, text: str) -> None:
    """Write the step_overhead section of the results file."""
    write_results_section(path, "step_overhead", f"## Training-step overhead (`benchmarks/step_overhead.py`)\n\n{text}")


if __name__ == "__main__":
    main()
