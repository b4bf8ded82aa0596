"""CLI: data hyper-cleaning on ``load_digits`` with every solver, against training on the noisy data
and on the clean subset only.

    python -m examples.hyper_cleaning.run                          # 3 seeds, all solvers, Adam and SGD outer steps
    python -m examples.hyper_cleaning.run --seeds 0 --outer-steps 50 --solvers aid-cg itd
    python -m examples.hyper_cleaning.run --plot docs/img/hyper_cleaning.png --write-results docs/results.md

Prints a markdown table: test accuracy, F1 of flagging corrupted examples (weight < 0.5), wall time
(mean +- std over seeds), and the final hyper-objective (validation loss).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from examples.results_md import write_section

from .cleaning import SOLVER_NAMES, CleaningResult, fit_baseline, load_cleaning_data, run_cleaning

DEFAULT_META_LR = {"adam": 0.1, "sgd": 3000.0}


def _ms(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _table(rows: dict[str, list[CleaningResult]]) -> str:
    out = [
        "| method | test acc (%) | F1 corrupted (%) | final val loss | ms / outer step | ms / hypergradient "
        "| total wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in rows.items():
        f1 = [100 * r.f1 for r in res if r.f1 == r.f1]
        vl = [r.history[-1]["val_loss"] for r in res if r.history]
        out.append(
            f"| {name} | {_ms([100 * r.test_acc for r in res])} | {_ms(f1) or '-'} | "
            f"{_ms(vl, '{:.3f}') or '-'} | {_ms([r.step_ms for r in res if r.step_ms == r.step_ms]) or '-'} | "
            f"{_ms([r.hypergrad_ms for r in res if r.hypergrad_ms == r.hypergrad_ms], '{:.2f}') or '-'} | "
            f"{_ms([r.seconds for r in res])} |"
        )
    return "\n".join(out)


def _plot(histories: dict[str, dict[str, list[list[dict[str, float]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(histories)
    fig, axes = plt.subplots(len(opts), 2, figsize=(10, 3.6 * len(opts)), squeeze=False)
    for row, opt in enumerate(opts):
        for solver, runs in histories[opt].items():
            steps = [h["step"] for h in runs[0]]
            for col, key in enumerate(("val_loss", "f1")):
                vals = torch.tensor([[h[key] for h in run] for run in runs])
                mean = vals.mean(0)
                (line,) = axes[row, col].plot(steps, mean, label=solver)
                if len(runs) > 1:
                    sd = vals.std(0)
                    axes[row, col].fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        axes[row, 0].set_ylabel(f"hyper-objective (val CE)\nouter opt: {opt}")
        axes[row, 1].set_ylabel("F1 of corrupted (w < 0.5)")
        for col in range(2):
            axes[row, col].set_xlabel("outer step")
            axes[row, col].grid(alpha=0.3)
        axes[row, 1].legend(fontsize=8)
    fig.suptitle("Data hyper-cleaning, load_digits, 50% corrupted labels (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.hyper_cleaning.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--solvers", nargs="+", default=list(SOLVER_NAMES), choices=SOLVER_NAMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--meta-opt", nargs="+", default=["adam", "sgd"], choices=["adam", "sgd"])
    p.add_argument("--meta-lr", type=float, default=None, help="outer LR (default: adam 0.1, sgd 3000)")
    p.add_argument("--outer-steps", type=int, default=200)
    p.add_argument("--T", type=int, default=10, help="warm-started inner steps per outer step (and ITD's unroll)")
    p.add_argument("--iters", type=int, default=20, help="CG steps / Neumann terms (aid-cg, aid-fp, stocbio)")
    p.add_argument("--stoc-batch", type=int, default=200, help="StocBiO's HVP mini-batch size")
    p.add_argument("--reg", type=float, default=1e-3, help="L2 weight of the inner problem (its mu)")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=400)
    p.add_argument("--corruption", type=float, default=0.5)
    p.add_argument("--baseline-steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", type=Path, default=None, help="PNG: hyper-objective and F1 over outer steps")
    p.add_argument("--write-results", type=Path, default=None, help="markdown file with the hyper_cleaning section")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    progress = not a.no_progress
    started, t0 = dt.datetime.now(dt.UTC), time.perf_counter()

    baselines: dict[str, list[CleaningResult]] = {}
    results: dict[str, dict[str, list[CleaningResult]]] = {o: {s: [] for s in a.solvers} for o in a.meta_opt}
    jobs = [(seed, opt, s) for seed in a.seeds for opt in a.meta_opt for s in a.solvers]
    bar = tqdm(total=len(jobs) + 2 * len(a.seeds), desc="hyper-cleaning", disable=not progress)
    for seed in a.seeds:
        data = load_cleaning_data(a.n_train, a.n_val, a.corruption, seed=seed)
        for which in ("noisy", "clean"):
            r = fit_baseline(data, which, reg=a.reg, steps=a.baseline_steps, seed=seed)
            baselines.setdefault(r.method, []).append(r)
            bar.update(1)
        for opt in a.meta_opt:
            lr = a.meta_lr if a.meta_lr is not None else DEFAULT_META_LR[opt]
            for s in a.solvers:
                bar.set_postfix(seed=seed, opt=opt, solver=s)
                r = run_cleaning(data, s, outer_steps=a.outer_steps, T=a.T, iters=a.iters, reg=a.reg, meta_lr=lr,
                                 meta_optimizer=opt, stoc_batch=a.stoc_batch, seed=seed, eval_every=a.eval_every,
                                 progress=False)  # fmt: skip
                results[opt][s].append(r)
                bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0

    cmd = "python -m examples.hyper_cleaning.run " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Data hyper-cleaning (load_digits, 50% corrupted labels)",
        "",
        f"Command: `{cmd.strip()}`, run {started:%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s.  ",
        f"Machine: {platform.machine()}, torch {torch.__version__} ({a.threads} thread(s)), shared CPU: "
        "wall times are indicative.",
        "",
        f"Setup: `load_digits` pixels / 16, {a.n_train} training images of which {a.corruption:.0%} get a uniformly "
        f"random wrong label, {a.n_val} clean validation images (the outer objective), the rest "
        f"({1797 - a.n_train - a.n_val}) for test; seeds {a.seeds} (split, corruption and init). "
        f"Linear classifier, inner `g = mean_i sigmoid(lam_i) CE_i + {a.reg:g}/2 ||theta||^2` (strongly convex), "
        "outer `f` = validation CE. Loop: `bl.BilevelTrainer` with `TrainerConfig(inner_steps=T, hyper_every=1)`, "
        f"i.e. {a.outer_steps} outer steps of T={a.T} warm-started full-batch SGD steps (lr = 1/L, L a bound of the "
        "inner Hessian) then one hypergradient step on `lam` (init 0): the warm start keeps theta near "
        "theta*(lam), which the AID solvers assume, and the loop is the same code as every other user of the core. "
        "Solvers: itd (unrolls T steps with the same "
        f"lr), aid-cg ({a.iters} CG steps), aid-fp ({a.iters} Neumann terms, alpha = 1/L), aid-fp-lite (H^-1 ~ I/L), "
        f"stocbio ({a.iters} Neumann terms, each HVP on a random {a.stoc_batch}-image mini-batch). Baselines: the "
        f"same inner problem with all weights 1, {a.baseline_steps} GD steps, on all (noisy) training data or on the "
        "uncorrupted subset only (an oracle). F1: examples with weight < 0.5 flagged as corrupted. "
        "Final val loss = the hyper-objective at the last step. ms / outer step and ms / hypergradient: medians over "
        "the outer steps of a run (a step = T inner steps + hypergradient + update), then mean ± std over seeds; "
        "total wall time covers the whole loop incl. evaluation every "
        f"{a.eval_every} steps and is sensitive to other work on the machine.",
        "",
        "Baselines:",
        "",
        _table(baselines),
    ]
    for opt in a.meta_opt:
        lr = a.meta_lr if a.meta_lr is not None else DEFAULT_META_LR[opt]
        lines += ["", f"Outer optimiser {opt} (lr {lr:g}):", "", _table(results[opt])]
    if a.plot is not None:
        _plot({o: {s: [r.history for r in rs] for s, rs in results[o].items()} for o in a.meta_opt}, a.plot)
        lines += ["", f"![hyper-cleaning curves]({Path('img') / a.plot.name})"]
    text = "\n".join(lines)
    print(text)
    if a.write_results is not None:
        write_section(a.write_results, "hyper_cleaning", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
