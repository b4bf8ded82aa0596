"""MELTR's optimisation-efficiency table (paper Table 8: MSRVTT-7k text-to-video retrieval) on the testbed.

    python -m benchmarks.efficiency [--full] [--seeds 2] [--epochs 4] [--lr 1e-3] [--K 3] [--iters 3]
                                    [--peers auto] [--pretrained PATH]
                                    [--data msrvtt --features PKL --train-csv CSV --json JSON --test-csv CSV]

Fine-tunes the SAME pretrained backbone on text-to-video retrieval with MTL (the baseline row) and
MELTR with each hypergradient solver (ITD one-step look-ahead, StocBiO, AID-CG, AID-FP (Neumann),
AID-FP-Lite): same MELTR initialisation, data order, epochs, learning rate and K (one hyper step every
K inner steps), and the peers' implicit-differentiation solvers in the same loop (``--peers``: by
default torchopt's CG (``custom_root``) and betty's Neumann, where they import; rows without a paper
figure, through :class:`benchmarks.peers.PeerSolver`). All runs are built by
:class:`examples.meltr_video.finetune.FinetuneRun` (one place) and trained by :class:`bilevel.BilevelTrainer`.

Data and backbone: the testbed's target domain (:func:`examples.meltr_video.testbed.make_testbed`,
seed 0: train 256 / meta 64 / val 250 / test 1000 clips, frozen CNN features) and the shipped UniVL-tiny
checkpoint pretrained on its source domain (:data:`examples.meltr_video.finetune.SHIPPED_CHECKPOINT`;
nothing is pretrained; ``--pretrained PATH`` for another one). See docs/testbed.md.

Timing: all rows live in one process and their epochs are INTERLEAVED (round robin, one epoch per
row, the starting row rotating each epoch), so machine drift hits all rows alike. Time per epoch =
median over all epochs and seeds of the training wall time (evaluation excluded); overhead = that
median over MTL's, minus 1. R@1 etc. are test metrics of the val-selected epoch, mean and std over
seeds; "dR@1 vs MTL" is the paired difference (per seed, the row's R@1 minus MTL's: every row of a
seed has the same backbone initialisation and training-data order), mean ± std, and the seeds it wins.

Default: 2 seeds x 4 epochs at backbone learning rate 1e-3 (~13 min on 2 cores, see :data:`DEFAULT`);
``--full``: 5 seeds x 40 epochs (the testbed's budget; hours). Writes the ``table8`` section of
docs/results.md and docs/img/table8_r1_vs_overhead.png only with ``--write`` (the README's main command,
``scripts/main.sh``, passes it; ``--tiny`` never writes); hand-written text after a ``<!-- notes -->``
line in that section survives a re-run.
``--profile`` prints torch.profiler tables of one step per row instead.

Real data (``--data msrvtt``): the MSRVTT files as UniVL distributes them (read by
:func:`examples.meltr_video.data.msrvtt_splits`): ``--features`` (pickle video_id -> [frames, 1024]),
``--train-csv`` (MSRVTT_train.7k.csv or .9k.csv) with ``--json`` (MSRVTT_data.json) for training,
``--test-csv`` (MSRVTT_JSFUSION_test.csv) for test; ``--meta-size`` / ``--val-size`` videos of the
training file become the meta and val splits (by video, seeded), ``--train-size`` caps the training
videos. The backbone is still the testbed-pretrained one and keeps its vocabulary (words outside it
become ``[UNK]``; clips longer than its 16 frames are subsampled), so this checks the pipeline and the
timings on real feature shapes, not MSRVTT accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from examples.meltr_video.data import DigitSplits, msrvtt_splits
from examples.meltr_video.finetune import DATA_SIZES, SHIPPED_CHECKPOINT, FinetuneConfig, FinetuneRun
from examples.meltr_video.testbed import make_testbed
from examples.results_md import write_section as write_results_section

BEGIN, END = "<!-- BEGIN table8 -->", "<!-- END table8 -->"
NOTES = "<!-- notes -->"
ROOT = Path(__file__).resolve().parent.parent

# (row label, method, solver, share_linearization, mixed). The AID rows share the inner step's linearisation
# (bilevel.TrainerConfig.share_linearization: the hyper step comes before that step's inner update and
# reuses its grad_theta g graph); AID-FP-Lite also runs without it (the hyper step after the update, as in
# the paper's code), so the table shows what sharing saves. --no-share turns it off. ``mixed``: the mixed
# product's mode (FinetuneConfig.mixed); the first-order rows (AID-FP-Lite with "fd", SAMA) need no
# second-order graph.
Row = tuple[str, str, str, bool, str]
ROWS: list[Row] = [
    ("MTL", "mtl", "aid-fp-lite", False, "autograd"),
    ("MELTR + ITD (1-step look-ahead)", "meltr", "itd", False, "autograd"),
    ("MELTR + StocBiO (shared)", "meltr", "stocbio", True, "autograd"),
    ("MELTR + AID-CG (shared)", "meltr", "aid-cg", True, "autograd"),
    ("MELTR + AID-FP (Neumann, shared)", "meltr", "aid-fp", True, "autograd"),
    ("MELTR + AID-FP-Lite (shared)", "meltr", "aid-fp-lite", True, "autograd"),
    ("MELTR + AID-FP-Lite (not shared: hyper step after the update)", "meltr", "aid-fp-lite", False, "autograd"),
    ("MELTR + AID-FP-Lite (fd, shared)", "meltr", "aid-fp-lite", True, "fd"),
    ("MELTR + AID-FP-Lite (fd-onesided, shared)", "meltr", "aid-fp-lite", True, "fd-onesided"),
    ("MELTR + SAMA (shared)", "meltr", "sama", True, "autograd"),
]
# Peers in the same loop (benchmarks.peers.PeerSolver): rows without a paper figure. betty's CG is left
# out of "auto": betty 0.2.1 builds each CG direction from the old residual (see benchmarks/peers.py).
PEER_ROWS: list[Row] = [
    ("torchopt: implicit diff., CG", "meltr", "torchopt:cg", False, "autograd"),
    ("betty: implicit diff., Neumann", "meltr", "betty:neumann", False, "autograd"),
    ("torchopt: implicit diff., Neumann", "meltr", "torchopt:neumann", False, "autograd"),
    ("betty: implicit diff., CG (betty 0.2.1's CG)", "meltr", "betty:cg", False, "autograd"),
]
PEERS_AUTO = ("torchopt:cg", "betty:neumann")
# Paper Table 8 (UniVL on MSRVTT-7k text-to-video retrieval): R@1, seconds per epoch, overhead %.
PAPER = {
    "mtl": (26.1, 547, 0.0),
    "itd": (27.3, 1296, 136.9),
    "stocbio": (26.8, 686, 25.4),
    "aid-cg": (28.0, 624, 14.1),
    "aid-fp": (27.9, 638, 16.6),
    "aid-fp-lite": (28.5, 574, 4.9),
}
SPLITS = ("train", "meta", "val", "test")
#: the testbed's target splits (train 256 / meta 64 / val 250 / test 1000 clips); --tiny: 16 / 8 / 8 / 8
SIZES: dict[str, int] = {k: DATA_SIZES["testbed"][k] for k in SPLITS}
TINY_SIZES: dict[str, int] = {"train": 16, "meta": 8, "val": 8, "test": 8}
#: backbone Adam learning rate of every row (FinetuneConfig's 1e-4 barely moves the testbed in a few epochs;
#: 1e-3 is the best of {1e-3, 3e-3} in docs/testbed.md's calibration runs)
LR = 1e-3
# Cost of the default run, estimated (not yet timed on the testbed): one epoch is 256 / 16 = 16 steps and
# an MTL step takes ~0.15-0.25 s on one thread, so MTL ~3.2 s per epoch. Per epoch, relative to MTL (the
# last digit-clip run of this table, same UniVL-tiny, same code, one hyper step every K = 3 steps): ITD
# 2.1x, StocBiO 4.6x, AID-CG 3.2x, AID-FP 3.5x, AID-FP-Lite 1.9x shared / 2.2x not, torchopt CG 5.3x, betty
# Neumann 4.2x: the 9 rows ~28 MTL epochs, ~90 s of training per round of epochs (65-115 s over that
# step-time range), plus ~0.3 s of val evaluation per row and epoch (250 x 250) and ~1.5 s of test per
# row and seed (1000 x 1000). 2 seeds x 4 epochs: 8 x ~93 s + 2 x ~15 s + ~20 s of imports, data and
# checkpoint (the CNN feature encoder trains ~5 s on a fresh clone) ~ 13 min (10-16 min); 5 epochs would
# be ~16 min. Without the peers (--peers none) a round is ~60 s. --full: 200 rounds, ~5 h.
DEFAULT = {"seeds": 2, "epochs": 4}
FULL = {"seeds": 5, "epochs": 40}
TINY = {"seeds": 1, "epochs": 1}
FEATURE_CACHE = ROOT / "runs" / "features"  # make_testbed's CNN feature encoder, trained once (~5 s)


def no_share(rows: list[Row]) -> list[Row]:
    """``rows`` with ``share_linearization`` off everywhere (``--no-share``), duplicates dropped."""
    out: list[Row] = []
    for label, method, solver, share, mixed in rows:
        if any(_key(m, s, sh, mx) == _key(method, solver, False, mixed) for _, m, s, sh, mx in out):
            continue
        if share:
            label = label.replace(" (shared)", "").replace(", shared)", ")")
        out.append((label, method, solver, False, mixed))
    return out


def _peer(cfg: FinetuneConfig) -> Any:
    """The peer library's solver a ``PEER:METHOD`` row runs (None for our own solvers)."""
    if cfg.method != "meltr" or ":" not in cfg.solver:
        return None
    from benchmarks.peers import parse_peer_solver

    return parse_peer_solver(cfg.solver, cfg.iters, cfg.alpha)


def peer_rows(spec: str) -> tuple[list[Row], list[str]]:
    """The peer rows selected by ``--peers`` and notes on the ones skipped.

    ``spec``: ``"auto"`` (:data:`PEERS_AUTO`, those whose library imports), ``"none"``, ``"all"``
    (every row of :data:`PEER_ROWS` whose library imports) or a comma list of solver names
    (``torchopt:cg,betty:neumann``), which must all import.
    """
    from benchmarks.peers import available

    known = {row[2]: row for row in PEER_ROWS}
    if spec == "none":
        return [], []
    if spec in ("auto", "all"):
        names, strict = (list(PEERS_AUTO) if spec == "auto" else list(known)), False
    else:
        names, strict = [n.strip() for n in spec.split(",") if n.strip()], True
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown peer solver(s) {unknown}; choose from {list(known)}, 'auto', 'all' or 'none'")
    versions = available()
    rows, skipped = [], []
    for n in names:
        peer = n.split(":")[0]
        if versions.get(peer) is None:
            if strict:
                raise ImportError(f"--peers {n}: {peer} does not import (scripts/install_peers.sh installs it)")
            skipped.append(f"{n} (does not import)")
            continue
        label, m, solver, share, mixed = known[n]
        rows.append((f"{label} [{peer} {versions[peer]}]", m, solver, share, mixed))
    return rows, skipped


def profile(
    pre: tuple[Any, Any, Any],
    data: DigitSplits,
    sizes: dict[str, int],
    iters: int,
    top: int = 12,
    lr: float = LR,
    batch_size: int = 16,
) -> str:
    """torch.profiler tables (CPU self time) of one MTL inner step and one hyper step per MELTR solver.

    Returns a markdown-ready text block: for each, the wall time and the ``top`` ops by self CPU time.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    blocks = []
    for _, method, solver, share, mixed in ROWS:
        if share:  # the profile times a solver's hypergradient alone, where sharing has nothing to share
            continue
        cfg = FinetuneConfig(
            method=method, solver=solver, iters=iters, mixed=mixed, data="testbed", sizes=sizes, epochs=1, lr=lr,
            batch_size=batch_size, progress=False,
        )  # fmt: skip
        run = FinetuneRun(cfg, data, pre, solver=_peer(cfg))
        tr = run.trainer
        batch = next(iter(run.loader))
        meta = next(iter(run.meta_loader)) if run.meta_loader is not None else None
        if method == "mtl":
            tr.step(batch)  # warm-up

            def work(tr: Any = tr, batch: Any = batch) -> None:
                tr.step(batch)
        else:
            solver_obj = tr.solver
            if solver == "stocbio":
                solver_obj.batches = iter(run.hvp_loader)  # type: ignore[union-attr]
            solver_obj.hypergrad(tr.problem, tr.params, tr.hparams, batch, meta)  # warm-up

            def work(tr: Any = tr, s: Any = solver_obj, batch: Any = batch, meta: Any = meta) -> None:
                s.hypergrad(tr.problem, tr.params, tr.hparams, batch, meta)

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            work()
            wall = time.perf_counter() - t
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
        what = "one MTL inner step" if method == "mtl" else f"one {solver} hyper step"
        blocks.append(f"#### {what}: {1000 * wall:.0f} ms under the profiler\n\n```\n{table.strip()}\n```")
    return "\n\n".join(blocks)


def _key(method: str, solver: str, share: bool, mixed: str = "autograd") -> str:
    """The row's name in results and plots: ``mtl``, the solver, ``/MODE`` for a non-default mixed-product mode,
    ``+shared`` for a shared linearisation."""
    if method == "mtl":
        return "mtl"
    return solver + (f"/{mixed}" if mixed != "autograd" else "") + ("+shared" if share else "")


def run_table(
    seeds: int,
    epochs: int,
    K: int,
    iters: int,
    sizes: dict[str, int],
    pretrained: tuple[Any, Any, Any],
    data: DigitSplits | None = None,
    progress: bool = True,
    rows: list[Row] | None = None,
    batch_size: int = 16,
    eval_threads: int | None = None,
    lr: float = LR,
    pretrained_path: str | None = None,
) -> dict[str, Any]:
    """Run every row for ``seeds`` seeds, epochs interleaved; returns per-row aggregates and raw results.

    ``data``: None builds ``make_testbed(0, sizes=sizes)``. ``eval_threads``: torch threads for the (untimed)
    evaluations; None = the training threads. ``lr``: the backbone learning rate of every row.
    ``pretrained_path``: recorded in the runs' configs (``pretrained`` holds the weights)."""
    rows = ROWS if rows is None else rows
    data = data if data is not None else make_testbed(0, sizes=sizes, cache_dir=FEATURE_CACHE)
    raw: dict[str, list[dict[str, Any]]] = {_key(m, s, sh, mx): [] for _, m, s, sh, mx in rows}
    bar = tqdm(total=seeds * epochs * len(rows), desc="table 8 (row-epochs)", disable=not progress)
    for seed in range(seeds):
        runs = {}
        for _, method, solver, share, mixed in rows:
            cfg = FinetuneConfig(
                task="retrieval", method=method, solver=solver, mixed=mixed, seed=seed, epochs=epochs, K=K, iters=iters,
                data="testbed", sizes=sizes, batch_size=batch_size, lr=lr, share_linearization=share,
                pretrained=pretrained_path, progress=False, eval_threads=eval_threads,
            )  # fmt: skip
            runs[_key(method, solver, share, mixed)] = FinetuneRun(cfg, data, pretrained, solver=_peer(cfg))
        keys = list(runs)
        for ep in range(epochs):
            shift = (seed * epochs + ep) % len(keys)
            for k in keys[shift:] + keys[:shift]:
                rec = runs[k].run_epoch()
                bar.update(1)
                bar.set_postfix(row=k, s=f"{rec['train_seconds']:.1f}", R1=f"{rec['val']['R@1']:.1f}")
        for k, run in runs.items():
            raw[k].append(run.finish())
    bar.close()
    return {"rows": summarise(raw, rows), "raw": raw}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_diff(rs: list[dict[str, Any]], base: list[dict[str, Any]], metric: str = "R@1") -> dict[str, Any]:
    """Per seed, the test ``metric`` of ``rs`` minus that of ``base`` (the same seeds in the same order):
    ``{"mean", "std", "wins" (seeds with a strictly larger value), "n", "diffs"}``."""
    if len(rs) != len(base):
        raise ValueError(f"paired difference needs the same seeds: {len(rs)} runs against {len(base)}")
    d = [r["test"][metric] - b["test"][metric] for r, b in zip(rs, base, strict=True)]
    mean, std = _mean_std(d)
    return {"mean": mean, "std": std, "wins": sum(x > 0 for x in d), "n": len(d), "diffs": d}


def summarise(raw: dict[str, list[dict[str, Any]]], rows: list[Row]) -> list[dict[str, Any]]:
    """Per row: test R@1/R@5/MedR mean and std, the paired R@1 difference to MTL (:func:`paired_diff`; None for
    MTL itself), median epoch seconds, overhead vs MTL, hyper-step breakdown."""
    med = {k: statistics.median([t for r in rs for t in r["epoch_seconds"]]) for k, rs in raw.items()}
    base = med.get("mtl")
    out = []
    for label, method, solver, share, mixed in rows:
        k = _key(method, solver, share, mixed)
        rs = raw[k]
        row: dict[str, Any] = {"label": label, "key": k, "seconds_per_epoch": med[k]}
        for metric in ("R@1", "R@5", "MedR"):
            row[metric] = _mean_std([r["test"][metric] for r in rs])
        row["val_R@1"] = _mean_std([r["best_val"]["R@1"] for r in rs])
        row["dR@1_vs_mtl"] = paired_diff(rs, raw["mtl"]) if "mtl" in raw and k != "mtl" else None
        row["overhead_pct"] = 100.0 * (med[k] / base - 1.0) if base else math.nan
        eps = [e for r in rs for e in r["epochs"]]
        hyper = sum(e.get("hyper_steps", 0) for e in eps)
        steps = sum(r["epochs"][-1]["inner_updates"] for r in rs)
        row["hyper_steps"] = hyper
        row["inner_updates"] = steps
        peer = ":" in solver and method == "meltr"  # the peers detect neither: None, printed as "-"
        row["negative_curvature"] = None if peer else sum(e.get("negative_curvature", 0) for e in eps)
        row["diverged"] = None if peer else sum(e.get("diverged", 0) for e in eps)
        stages: dict[str, float] = {}
        for e in eps:
            for s, v in (e.get("hyper_seconds") or {}).items():
                stages[s] = stages.get(s, 0.0) + v
        row["ms_per_hyper_step"] = {s: 1000 * v / hyper for s, v in stages.items()} if hyper else {}
        row["paper"] = PAPER.get(_key(method, solver, False))  # None for the peers' rows
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]], cmd: str, meta: dict[str, Any]) -> str:
    """The table in the paper's layout with the paper's numbers beside ours, and the hyper-step breakdown."""
    lines = [
        f"Command: `{cmd}`",
        "",
        f"Setting: {meta['setting']}",
        "",
        "| Method | R@1 (ours) | dR@1 vs MTL (paired; wins) | R@5 | MedR | s / epoch (ours) | overhead (ours) "
        "| R@1 (paper) | s / epoch (paper) | overhead (paper) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        p = r["paper"]
        paper = f"{p[0]:.1f} | {p[1]} | {p[2]:+.1f} %" if p else "- | - | -"
        d = r.get("dR@1_vs_mtl")
        diff = f"{d['mean']:+.1f} ± {d['std']:.1f} ({d['wins']}/{d['n']})" if d else "-"
        lines.append(
            f"| {r['label']} | {r['R@1'][0]:.1f} ± {r['R@1'][1]:.1f} | {diff} | {r['R@5'][0]:.1f} ± {r['R@5'][1]:.1f} "
            f"| {r['MedR'][0]:.1f} ± {r['MedR'][1]:.1f} | {r['seconds_per_epoch']:.2f} | {r['overhead_pct']:+.1f} % "
            f"| {paper} |"
        )
    lines += [
        "",
        "R@1 etc.: test, at the val-selected epoch, mean ± std over seeds. dR@1 vs MTL: per seed, the row's R@1 "
        "minus MTL's (same backbone initialisation and data order), mean ± std, and the seeds where the row is "
        "higher.",
        "",
        "Hyper-step cost (ms per hyper step, summed over stages of `HypergradInfo.times`; inner step = "
        f"{meta['ms_inner']:.0f} ms, i.e. MTL's epoch time / steps):",
        "",
        "| Method | hyper steps | grad_outer | linearize | solve | mixed | ITD unroll+backward | total "
        "| total / inner step | neg. curvature | diverged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows[1:]:
        t = r["ms_per_hyper_step"]
        cols = [
            f"{t[s]:.0f}" if s in t else "-"
            for s in ("grad_outer", "linearize", "solve", "mixed", "unroll_and_backward")
        ]
        tot = t.get("total", math.nan)
        lines.append(
            f"| {r['label']} | {r['hyper_steps']} | {' | '.join(cols)} | {tot:.0f} | {tot / meta['ms_inner']:.2f} "
            f"| {_or_dash(r['negative_curvature'])} | {_or_dash(r['diverged'])} |"
        )
    return "\n".join(lines)


def _or_dash(x: Any) -> str:
    return "-" if x is None else str(x)


def plot(rows: list[dict[str, Any]], path: Path, data: str = "testbed") -> None:
    """R@1 (mean ± std) against overhead %, ours (on ``data``) and the paper's (MSRVTT-7k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn: set[str] = set()
    for i, r in enumerate(rows):
        color = f"C{i}"
        axes[0].errorbar(r["overhead_pct"], r["R@1"][0], yerr=r["R@1"][1], fmt="o", capsize=3, color=color)
        xy = (r["overhead_pct"], r["R@1"][0])
        axes[0].annotate(r["key"], xy, textcoords="offset points", xytext=(5, 12 - 9 * (i % 3)), color=color)
        method = r["key"].removesuffix("+shared")  # the paper has one point per method
        if r["paper"] is not None and method not in drawn:
            drawn.add(method)
            axes[1].plot(r["paper"][2], r["paper"][0], "o", color=color)
            axes[1].annotate(method, (r["paper"][2], r["paper"][0]), textcoords="offset points", xytext=(4, 4))
    ours = {"testbed": "testbed", "msrvtt": "MSRVTT features"}.get(data, data)
    axes[0].set(title=f"ours ({ours}, tiny UniVL, CPU)", xlabel="time overhead vs MTL (%)", ylabel="test R@1 (%)")
    axes[1].set(title="paper Table 8 (MSRVTT-7k, UniVL)", xlabel="time overhead vs MTL (%)", ylabel="R@1 (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(path: Path, text: str) -> None:
    """Write the table8 section (hand-written notes after ``<!-- notes -->`` are kept)."""
    title = "## Optimisation efficiency (paper Table 8; `benchmarks/efficiency.py`)"
    write_results_section(path, "table8", f"{title}\n\n{text}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="5 seeds x 40 epochs (the testbed's budget; hours)")
    p.add_argument(
        "--tiny", action="store_true",
        help="a seconds-long smoke run (random tiny backbone, tiny testbed splits); never writes docs/",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, default=None, help=f"default {DEFAULT['seeds']} (--full {FULL['seeds']})")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT['epochs']} (--full {FULL['epochs']})")
    p.add_argument("--lr", type=float, default=LR, help=f"backbone Adam learning rate of every row (default {LR:g})")
    p.add_argument("--K", type=int, default=3, help="one hyper step every K inner steps (paper: 3)")
    p.add_argument("--iters", type=int, default=3, help="HVPs per hyper step of AID-CG / AID-FP / StocBiO")
    p.add_argument(
        "--train-size", type=int, default=None,
        help=f"training clips (testbed, default {SIZES['train']}) or videos (msrvtt, default: all the rest)",
    )  # fmt: skip
    p.add_argument("--meta-size", type=int, default=None, help=f"meta clips / videos (default {SIZES['meta']})")
    p.add_argument("--val-size", type=int, default=None, help=f"val clips / videos (default {SIZES['val']})")
    p.add_argument(
        "--pretrained", default=None,
        help="backbone checkpoint (default: the shipped examples/meltr_video/checkpoints/univl_tiny_testbed.pt)",
    )  # fmt: skip
    p.add_argument("--data", choices=["testbed", "msrvtt"], default="testbed")
    p.add_argument("--features", help="--data msrvtt: features pickle, video_id -> float array [frames, 1024]")
    p.add_argument("--train-csv", help="--data msrvtt: MSRVTT_train.7k.csv or MSRVTT_train.9k.csv (video_id column)")
    p.add_argument("--json", help="--data msrvtt: MSRVTT_data.json, the captions of the training videos")
    p.add_argument("--test-csv", help="--data msrvtt: MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument(
        "--eval-threads", type=int, default=os.cpu_count() or 1,
        help="torch threads for the evaluations, which are not timed (default: all cores)",
    )  # fmt: skip
    p.add_argument("--results", default=None, help="markdown file to update (default docs/results.md)")
    p.add_argument("--out-json", default=None, help="also write all raw results here")
    p.add_argument(
        "--write",
        action="store_true",
        help="update the table8 section of docs/results.md and its PNG (not with --tiny)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--peers",
        default="auto",
        help="peer rows: auto (torchopt:cg, betty:neumann where they import), all, none, or a comma list",
    )
    p.add_argument(
        "--no-share", action="store_true",
        help="AID rows without share_linearization (every hyper step after its inner update, as in the paper)",
    )  # fmt: skip
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of one step per row, then exit")
    a = p.parse_args(argv)
    if a.data == "msrvtt":
        missing = [f"--{n.replace('_', '-')}" for n in ("features", "train_csv", "test_csv") if not getattr(a, n)]
        if missing:
            p.error(f"--data msrvtt needs {', '.join(missing)} (and --json unless the training CSV has sentences)")
    elif any((a.features, a.train_csv, a.json, a.test_csv)):
        p.error("--features / --train-csv / --json / --test-csv are for --data msrvtt")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        p.error(f"--lr must be a finite number > 0, got {a.lr}")
    for flag, value, minimum in (
        ("--seeds", a.seeds, 1), ("--epochs", a.epochs, 1), ("--K", a.K, 1), ("--iters", a.iters, 0),
        ("--threads", a.threads, 1), ("--train-size", a.train_size, 1), ("--meta-size", a.meta_size, 1),
        ("--val-size", a.val_size, 1),
    ):  # fmt: skip
        if value is not None and value < minimum:
            p.error(f"{flag} must be >= {minimum}, got {value}")
    if a.write and a.tiny:
        p.error("--tiny never writes docs/ (a smoke run's numbers are not results); drop --write")
    if a.eval_threads < 1:
        p.error("--eval-threads must be >= 1")
    try:
        extra, skipped = peer_rows(a.peers)
    except (ValueError, ImportError) as e:
        p.error(str(e))
    torch.set_num_threads(a.threads)
    mode = TINY if a.tiny else FULL if a.full else DEFAULT
    seeds = a.seeds if a.seeds is not None else mode["seeds"]
    epochs = a.epochs if a.epochs is not None else mode["epochs"]
    sizes = dict(TINY_SIZES if a.tiny else SIZES)
    for name, v in (("train", a.train_size), ("meta", a.meta_size), ("val", a.val_size)):
        if v is not None:
            sizes[name] = v
    batch = 4 if a.tiny else 16
    progress = not a.no_progress
    t0 = time.perf_counter()

    from examples.meltr_video.pretrain import load_pretrained
    from examples.meltr_video.testbed import testbed_tokenizer
    from examples.meltr_video.univl import UniVL, UniVLConfig

    pre_path: str | None = None
    if a.tiny and a.pretrained is None:
        tok = testbed_tokenizer()
        torch.manual_seed(0)
        ucfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
        pre = (UniVL(ucfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id).state_dict(), ucfg, tok)
        pre_note = "random tiny backbone (smoke mode)"
    else:
        pre_path = a.pretrained or str(SHIPPED_CHECKPOINT)
        if not Path(pre_path).is_file():
            hint = "" if a.pretrained else " (the checkpoint shipped with the repository; see docs/testbed.md)"
            p.error(f"pretrained backbone {pre_path} not found{hint}")
        model, tok, pmeta = load_pretrained(pre_path)
        pre = (model.state_dict(), model.cfg, tok)
        shown = Path(pre_path).resolve()
        shown_s = str(shown.relative_to(ROOT)) if shown.is_relative_to(ROOT) else pre_path
        pre_note = (
            f"`{shown_s}` ({'shipped; ' if a.pretrained is None else ''}its pretraining: val R@1 "
            f"{pmeta['val_after']['R@1']:.1f} % on its own data after {pmeta['train_seconds']:.0f} s; not rerun here)"
        )
    if a.data == "msrvtt":
        data = msrvtt_splits(
            a.features, a.train_csv, a.json, a.test_csv, meta_videos=sizes["meta"], val_videos=sizes["val"],
            train_videos=a.train_size, seed=0, tokenizer=pre[2], max_frames=pre[1].max_frames,
        )  # fmt: skip
        videos = {k: len({r.video_id for r in data[k].records}) for k in SPLITS}
        where = ", ".join(f"{k} {len(data[k])} pairs / {videos[k]} videos" for k in SPLITS)
        data_note = f"MSRVTT features `{a.features}` ({where}; the backbone's vocabulary, other words [UNK])"
    else:
        data = make_testbed(0, sizes=sizes, cache_dir=FEATURE_CACHE)
        data_note = "testbed target domain (" + " / ".join(f"{k} {len(data[k])}" for k in SPLITS) + " clips)"
    sizes = {k: len(data[k]) for k in SPLITS}  # pairs per split (FinetuneConfig checks them against the batch)
    t_pre = time.perf_counter() - t0
    if a.profile:
        text = profile(pre, data, sizes, a.iters, lr=a.lr, batch_size=batch)
        print(text)
        return {"profile": text}
    rows_spec = no_share(ROWS + extra) if a.no_share else ROWS + extra
    res = run_table(
        seeds, epochs, a.K, a.iters, sizes, pre, data, progress, rows=rows_spec, batch_size=batch,
        eval_threads=a.eval_threads, lr=a.lr, pretrained_path=pre_path,
    )  # fmt: skip
    rows = res["rows"]
    mtl = rows[0]
    steps_per_epoch = mtl["inner_updates"] / (seeds * epochs)
    meta = {
        "setting": (
            f"{data_note}, batch {batch}, backbone {pre_note}, {seeds} seed(s) x {epochs} epoch(s), "
            f"backbone lr {a.lr:g}, K={a.K}, {a.iters} HVPs for AID-CG/AID-FP/StocBiO, torch {torch.__version__} on "
            f"CPU with {torch.get_num_threads()} thread(s) ({a.eval_threads} for the untimed evaluations); "
            f"data/backbone loading {t_pre:.0f} s, total {time.perf_counter() - t0:.0f} s."
            + (f" Peers skipped: {', '.join(skipped)}." if skipped else "")
        ),
        "ms_inner": 1000 * mtl["seconds_per_epoch"] / steps_per_epoch,
        "data": a.data,
        "lr": a.lr,
        "sizes": sizes,
    }
    cmd = "python -m benchmarks.efficiency " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rows, cmd.strip(), meta)
    print(text)
    if a.write:  # only an explicit, full-size run writes docs/
        write_section(Path(a.results) if a.results else ROOT / "docs" / "results.md", text + "\n\n" + _png_ref())
        plot(rows, ROOT / "docs" / "img" / "table8_r1_vs_overhead.png", a.data)
    if a.out_json:
        Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out_json).write_text(json.dumps({"meta": meta, **res}, indent=1, default=str))
    return {"meta": meta, **res}


def _png_ref() -> str:
    return "![R@1 vs overhead](img/table8_r1_vs_overhead.png)"


if __name__ == "__main__":
    main()
