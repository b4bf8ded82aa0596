"""Paired comparison on the latent-factor CMU-MOSI-format data: single task, MTL, MELTR (AID-FP-Lite, AID-CG).

    python -m examples.meltr_sentiment.results --seeds 3 --write
        [--epochs 30] [--lr-grid 1e-3,3e-3,1e-2] [--rows single,mtl,...] [--data-seed 0] [--json FILE]

Protocol (as ``examples/meltr_video/results.py``; data and protocol fixed before any run):

1. **Data.** :func:`~examples.meltr_sentiment.synthetic.make_latent_mosi` ``(data_seed)`` written and read
   back with the MOSI loader; its ``train`` split cut into train (192) and meta (48, MELTR's outer
   batches), ``valid`` (120) for model selection, ``test`` (400) read once per run
   (:func:`~examples.meltr_sentiment.finetune.latent_splits`).
2. **Rows.** ``single`` (the sentiment loss), ``mtl`` (the sum of the 8 losses), ``mtl+meta`` (MTL also
   trained on the meta split: the labelled budget MELTR sees), ``MELTR AID-FP-Lite`` and ``MELTR AID-CG``
   (:mod:`~examples.meltr_sentiment.finetune`).
3. **Learning rate, same grid and budget for every row.** Each row is trained once per value of
   ``--lr-grid`` with the search seed 1000 (never a reported seed) and keeps the value with the lowest val
   MAE; the epoch is chosen on val inside every run (lowest val MAE of ``--epochs``).
4. **Paired seeds.** Every row runs each reported seed with the same model initialisation, data order and
   feature masks; test is read once per run, for its val-selected epoch.
5. **Report.** Per row: test MAE, Corr, Acc-2 and F1 (MulT's / MMSA's "non-zero" binary convention:
   zero labels excluded, ``> 0`` against ``< 0``; weighted F1) as mean ± std over seeds, and the paired
   difference of each against MTL and against single (mean ± std over seeds; wins = seeds where the row
   is better: lower MAE, higher others).

``--json FILE`` writes every run's record; ``--write`` writes the ``meltr_sentiment`` section of
docs/results.md (:func:`examples.results_md.write_section`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from examples.meltr_video.results import parse_seeds

from .finetune import SentimentConfig, latent_splits, train_method
from .multitask import PRIMARY

__all__ = ["METRICS", "ROWS", "SEARCH_SEED", "main", "markdown", "paired_difference", "run_comparison"]

ROOT = Path(__file__).resolve().parents[2]
SEARCH_SEED = 1000
#: row label -> SentimentConfig overrides
ROWS: dict[str, dict[str, Any]] = {
    "single": {"method": "single"},
    "mtl": {"method": "mtl"},
    "mtl+meta": {"method": "mtl", "train_on_meta": True},
    "MELTR AID-FP-Lite": {"method": "meltr", "solver": "aid-fp-lite"},
    "MELTR AID-CG": {"method": "meltr", "solver": "aid-cg"},
}
#: (key of sentiment_metrics, label, lower is better, factor shown)
METRICS: tuple[tuple[str, str, bool, float], ...] = (
    ("mae", "MAE", True, 1.0),
    ("corr", "Corr", False, 1.0),
    ("acc2_nonzero", "Acc-2 (%)", False, 100.0),
    ("f1_nonzero", "F1 (%)", False, 100.0),
)
DEFAULT_GRID = "1e-3,3e-3,1e-2"


def paired_difference(a: Sequence[float], b: Sequence[float], lower_is_better: bool) -> dict[str, float]:
    """``a - b`` over paired seeds: mean, std (n - 1; 0 for one seed), wins (seeds where ``a`` is better), n."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum((x < 0) if lower_is_better else (x > 0) for x in d)
    return {"mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0, "wins": wins, "n": len(d)}


def run_comparison(
    rows: Sequence[str],
    seeds: Sequence[int],
    lr_grid: Sequence[float],
    epochs: int,
    data_seed: int = 0,
    progress: bool = True,
    data: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Search each row's learning rate on val (search seed), run every seed, compare; the JSON-ready record.

    ``data``: the splits (default :func:`~examples.meltr_sentiment.finetune.latent_splits` ``(data_seed)``);
    ``overrides``: further :class:`~examples.meltr_sentiment.finetune.SentimentConfig` fields for every run
    (tests use both to shrink the comparison).
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; rows are {list(ROWS)}")
    if not seeds or not lr_grid:
        raise ValueError(f"seeds and lr_grid must not be empty, got {list(seeds)} and {list(lr_grid)}")
    if data is None:
        data = latent_splits(data_seed)
    t0, c0 = time.perf_counter(), time.process_time()
    record: dict[str, Any] = {
        "data_seed": data_seed,
        "sizes": {k: len(v) for k, v in data.items()},
        "seeds": list(seeds),
        "lr_grid": list(lr_grid),
        "search_seed": SEARCH_SEED,
        "epochs": epochs,
        "overrides": overrides,
        "base": asdict(SentimentConfig(**{**overrides, "method": "meltr"})),
        "dims": dict(data["train"].dims),
        "seq_len": int(data["train"].text.shape[1]),
        "rows": {},
    }
    n_runs = len(rows) * ((len(lr_grid) if len(lr_grid) > 1 else 0) + len(seeds))
    bar = tqdm(total=n_runs, desc="sentiment runs", disable=not progress)
    for label in rows:

        def cfg(seed: int, lr: float, label: str = label) -> SentimentConfig:
            return SentimentConfig(**{**ROWS[label], **overrides, "seed": seed, "lr": lr, "epochs": epochs})

        row: dict[str, Any] = {"overrides": ROWS[label], "search": {}, "runs": []}
        if len(lr_grid) > 1:
            for lr in lr_grid:
                res = train_method(cfg(SEARCH_SEED, lr), data, eval_test=False)
                row["search"][f"{lr:g}"] = {"best_val": res["best_val"], "best_epoch": res["best_epoch"]}
                bar.update(1)
                bar.set_postfix(row=label, lr=f"{lr:g}", val_mae=f"{res['best_val']['mae']:.3f}")
            row["lr"] = min(lr_grid, key=lambda lr: row["search"][f"{lr:g}"]["best_val"]["mae"])
        else:
            row["lr"] = lr_grid[0]
        for seed in seeds:
            res = train_method(cfg(seed, row["lr"]), data)
            keep = ("best_epoch", "best_val", "test", "seconds", "cpu_seconds", "steps", "hyper_steps")
            row["runs"].append({k: res[k] for k in keep})
            row["runs"][-1]["seed"] = seed
            weights = [h["meltr_weights"] for h in res["history"] if "meltr_weights" in h]
            if weights:
                row["runs"][-1]["meltr_weights_final"] = weights[-1]
                row["runs"][-1]["meltr_weights_best"] = weights[res["best_epoch"] - 1]
            bar.update(1)
            bar.set_postfix(row=label, seed=seed, test_mae=f"{res['test']['mae']:.3f}")
        record["rows"][label] = row
    bar.close()
    for ref in ("mtl", "single"):
        if ref not in record["rows"]:
            continue
        for row in record["rows"].values():
            row[f"vs_{ref}"] = {
                key: paired_difference(
                    [r["test"][key] for r in row["runs"]], [r["test"][key] for r in record["rows"][ref]["runs"]], low
                )
                for key, _, low, _ in METRICS
            }
    record["seconds"] = time.perf_counter() - t0
    record["cpu_seconds"] = time.process_time() - c0
    return record


def _ms(xs: Sequence[float], f: float, digits: int) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{f * statistics.fmean(xs):.{digits}f} ± {f * sd:.{digits}f}"


def _pd(p: Mapping[str, float] | None, f: float, digits: int) -> str:
    if p is None:
        return "-"
    return f"{f * p['mean']:+.{digits}f} ± {f * p['std']:.{digits}f} ({p['wins']}/{p['n']})"


def _digits(factor: float) -> int:
    return 1 if factor != 1.0 else 3


def reading(rec: Mapping[str, Any]) -> str:
    """A sentence per row, generated from the numbers: its paired MAE difference against MTL and single, and
    whether it exceeds the paired std (what the seeds can resolve)."""
    out = []
    for label, row in rec["rows"].items():
        parts = []
        for ref in ("mtl", "single"):
            p = row.get(f"vs_{ref}", {}).get("mae")
            if p is None or label == ref:
                continue
            if abs(p["mean"]) <= p["std"]:
                verdict = "within one paired std, not resolved by these seeds"
            else:
                verdict = "lower" if p["mean"] < 0 else "higher"
                verdict = f"{verdict} by more than one paired std"
            parts.append(f"vs {ref} {p['mean']:+.3f} ± {p['std']:.3f}, lower in {p['wins']}/{p['n']} seeds ({verdict})")
        if parts:
            out.append(f"{label}: test MAE " + "; ".join(parts) + ".")
    return " ".join(out)


def markdown(rec: Mapping[str, Any], cmd: str, machine: str) -> str:
    """The section: command, machine, tables of test metrics and paired differences, protocol, reading."""
    head = "| Row | lr | " + " | ".join(f"test {name}" for _, name, _, _ in METRICS)
    head += " | val MAE | epoch | train s / run (CPU s) |"
    lines = [f"Command: `{cmd}`  ", f"{machine}", "", head, "|---" * (len(METRICS) + 5) + "|"]
    for label, row in rec["rows"].items():
        runs = row["runs"]
        cols = " | ".join(_ms([r["test"][k] for r in runs], f, _digits(f)) for k, _, _, f in METRICS)
        val = _ms([r["best_val"]["mae"] for r in runs], 1.0, 3)
        ep = "/".join(str(r["best_epoch"]) for r in runs)
        sec = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu_seconds"] for r in runs)
        lines.append(f"| {label} | {row['lr']:g} | {cols} | {val} | {ep} | {sec:.1f} ({cpu:.1f}) |")
    for ref, name in (("mtl", "MTL"), ("single", "single")):
        if not any(f"vs_{ref}" in row for row in rec["rows"].values()):
            continue
        lines += [
            "",
            f"Paired difference to {name} (row minus {name}, test; mean ± std over seeds; in brackets the seeds where "
            "the row is better):",
            "",
            "| Row | " + " | ".join(f"Δ{name_}" for _, name_, _, _ in METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        for label, row in rec["rows"].items():
            if label == ref:
                continue
            p = row[f"vs_{ref}"]
            lines.append(f"| {label} | " + " | ".join(_pd(p[k], f, _digits(f)) for k, _, _, f in METRICS) + " |")
    sizes, b, d = rec["sizes"], rec["base"], rec["dims"]
    lines += [
        "",
        f"Data: the latent-factor CMU-MOSI-format file (`examples/meltr_sentiment/synthetic.py`, data seed "
        f"{rec['data_seed']}): train {sizes['train']}, meta {sizes['meta']} (MELTR's outer batches; `mtl+meta` trains "
        f"on it), val {sizes['val']}, test {sizes['test']} segments of up to {rec['seq_len']} aligned timesteps, "
        f"widths {d['text']} / {d['vision']} / {d['audio']}. Model: `MultiTaskSentiment` (hidden {b['hidden']}, one "
        f"unimodal layer per modality and one cross layer) with 8 losses: primary `sentiment` ({b['loss']}) and the "
        "auxiliaries `uni_text`, `uni_vision`, `uni_audio`, `align`, `recon_text`, `recon_vision`, `recon_audio`. "
        f"Seeds {rec['seeds']} (paired: same initialisation, data order and masks per seed); learning rate per row "
        f"chosen on val MAE from {rec['lr_grid']} with search seed {rec['search_seed']}; {rec['epochs']} epochs, "
        f"batch {b['batch_size']}, the epoch with the lowest val MAE tested once. MELTR: K = {b['K']}, gamma = "
        f"{b['gamma']}, meta lr {b['meta_lr']:g}, started from a module pre-fitted to the sum of the losses. Acc-2 and "
        f"F1 exclude zero labels (MulT's `exclude_zero=True`). {rec['seconds'] / 60:.1f} min wall-clock in all, "
        f"{rec['cpu_seconds'] / 60:.1f} min of process CPU time (one thread; the wall-clock time includes the wait "
        "for a core on a shared machine, the CPU time does not).",
    ]
    for label, row in rec["rows"].items():
        ws = [r["meltr_weights_best"] for r in row["runs"] if r.get("meltr_weights_best")]
        if not ws:
            continue
        rel = {k: statistics.fmean(w[k] / w[PRIMARY] for w in ws) for k in ws[0]}
        raw = statistics.fmean(w[PRIMARY] for w in ws)
        lines += [
            "",
            f"{label}: MELTR's weights `d L_aux / d L_t` at a fixed training batch, at the val-selected epoch, "
            f"relative to the `{PRIMARY}` loss's (mean over seeds; the `{PRIMARY}` weight itself {raw:.2f}): "
            + ", ".join(f"`{k}` {v:.2f}" for k, v in rel.items() if k != PRIMARY)
            + ".",
        ]
    if rec.get("overrides"):
        lines += ["", f"Config overrides: {rec['overrides']}."]
    text = reading(rec)
    if text:
        lines += ["", "Reading (generated from the numbers above): " + text]
    return "\n".join(lines)


def _floats(spec: str) -> list[float]:
    out = []
    for item in spec.split(","):
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"--lr-grid {spec!r}: {item.strip()!r} is not a number") from None
        if not (0 < v < math.inf):
            raise ValueError(f"--lr-grid {spec!r}: learning rates must be finite and > 0, got {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"--lr-grid {spec!r} repeats a value")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m examples.meltr_sentiment.results",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--seeds", default="3", help="N (seeds 0..N-1), a list 0,3 or a range 2-4")
    p.add_argument("--epochs", type=int, default=30, help="epochs per run (the one with the lowest val MAE is tested)")
    p.add_argument("--lr-grid", default=DEFAULT_GRID, help="learning rates searched on val per row")
    p.add_argument("--rows", default=None, help=f"comma-separated rows (default: all of {list(ROWS)})")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic file and of the meta split")
    p.add_argument("--json", type=Path, default=None, help="write every run's record here")
    p.add_argument("--write", action="store_true", help="write the meltr_sentiment section of docs/results.md")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        seeds = parse_seeds(a.seeds)
        grid = _floats(a.lr_grid)
    except ValueError as e:
        p.error(str(e))
    if a.epochs < 1:
        p.error(f"--epochs must be >= 1, got {a.epochs}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.data_seed < 0:
        p.error(f"--data-seed must be >= 0, got {a.data_seed}")
    if SEARCH_SEED in seeds and len(grid) > 1:
        p.error(f"--seeds must not include the search seed {SEARCH_SEED}")
    rows = list(ROWS)
    if a.rows is not None:
        rows = [r.strip() for r in a.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown or not rows or len(set(rows)) != len(rows):
            p.error(f"--rows {a.rows!r}: give distinct rows out of {list(ROWS)}")
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rec = run_comparison(rows, seeds, grid, a.epochs, a.data_seed, progress=not a.no_progress)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    args = argv if argv is not None else sys.argv[1:]
    cmd = shlex.join(["python", "-m", "examples.meltr_sentiment.results", *args])
    machine = (
        f"Run {started}; {platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"{os.cpu_count()} CPU cores, 1-minute load average {load:.1f} at the start and {load_end:.1f} at the end "
        "(times are wall-clock and include any contention)."
    )
    rec["machine"] = machine
    text = markdown(rec, cmd.strip(), machine)
    print(text)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rec, indent=1))
        print(f"wrote {a.json}")
    if a.write:
        from examples.results_md import write_section

        title = "## MELTR fine-tuning: multi-modal sentiment, synthetic CMU-MOSI format"
        title += " (`examples/meltr_sentiment/results.py`)"
        write_section(ROOT / "docs" / "results.md", "meltr_sentiment", f"{title}\n\n{text}")
        print("wrote docs/results.md section meltr_sentiment")
    return rec


if __name__ == "__main__":
    main()
