"""Paired comparison of fine-tuning methods: single task, MTL, manual weightings, MELTR with each solver.

    python -m examples.meltr_video.results [--backbone univl|violet] [--task retrieval|captioning|qa-mc|qa-oe]
        [--seeds 5 | --seeds 0,3 | --seeds 2-4] [--epochs 40] [--lr-grid 5e-4,1e-3,2e-3] [--rows LABEL,...]
        [--json FILE] [--write]

Protocol (fixed before any MELTR run on the testbed; ``docs/testbed.md``):

1. **Rows.** ``single`` (primary loss only), ``mtl`` (sum of all losses), ``mtl+meta`` (MTL also trained
   on the meta split, so it sees every labelled pair MELTR sees), the paper's Table 7 manual weightings
   adapted to the backbone's losses (UniVL: primary + caption loss; all ones but the auxiliary loss MELTR
   weighs least; a scale-normalised sum ``w_t = L_primary / L_t`` at the pretrained backbone), and MELTR with
   each solver (AID-FP-Lite, AID-CG, AID-FP, ITD, StocBiO). ``--rows`` picks a subset.
2. **Learning rate, same budget for every row.** Each row is trained once per value of ``--lr-grid``
   (search seed 1000, never one of the reported seeds) and keeps the value with the best val score
   (R@1, then R@5, then -MedR); the epoch is chosen on val inside every run (``--epochs`` is the
   maximum). The "all but the least" row needs MELTR's weights: they are read from the AID-FP-Lite
   search run at its selected learning rate (``d L_aux / d L_t`` after the last epoch), never from test.
3. **Paired seeds.** Every row runs each reported seed with the same backbone initialisation (the
   pretrained checkpoint; heads and MELTR from the seed) and the same training-data order. Test is read
   once per run, for its val-selected epoch.
4. **Report.** Per row: mean ± std over seeds of the test metrics, and the paired difference of the key
   metric against MTL and against single (mean ± std over seeds, wins out of seeds). Plus the
   zero-shot (un-fine-tuned) backbone.

Runs are cached in ``--out-root`` (``LABEL-lrLR-sSEED/results.json``): a finished run with the same
settings is read back, not rerun, so a comparison can be extended seed by seed across sessions. A fresh clone
has no cache: ``--reuse FILE`` (repeatable) takes search runs and seeds from an earlier ``--json`` record
(e.g. the committed ``docs/data/paired_univl_retrieval.json``) where that record's settings equal this
invocation's (base settings, lr grid, search seed, the row's resolved overrides); reused rows say so
(``"reused_from"``), and only what no record and no cache holds is run. ``--archive DIR`` adds a read-only
directory of finished runs' ``results.json`` (``DIR/BACKBONE-TASK/RUN/results.json``): how the runs of a row that
one session could not finish are carried to the next (``docs/data/run_archive``).
``--json FILE`` writes every per-seed, per-row metric; ``--write`` also writes the section of
docs/results.md and the plots (R@1 per row; paired differences; MELTR's task weights).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .finetune import (
    BACKBONES,
    METHODS,
    SOLVERS,
    TASKS,
    FinetuneConfig,
    FinetuneRun,
    default_pretrained,
)

__all__ = [
    "SEARCH_SEED",
    "default_rows",
    "main",
    "paired",
    "parse_seeds",
    "parse_variant",
    "run_comparison",
]

ROOT = Path(__file__).resolve().parents[2]
SEARCH_SEED = 1000
_TYPES = {f.name: f.type for f in fields(FinetuneConfig)}
#: plain defaults of FinetuneConfig's fields: a field added after a run was recorded compares equal when the new
#: run leaves it at its default (so adding an option does not invalidate the cache or the committed records)
_DEFAULTS = {f.name: f.default for f in fields(FinetuneConfig) if isinstance(f.default, int | float | str | None)}
_SOLVER_LABEL = {
    "aid-fp-lite": "AID-FP-Lite", "aid-cg": "AID-CG", "aid-fp": "AID-FP", "itd": "ITD", "stocbio": "StocBiO",
    "sama": "SAMA",
}  # fmt: skip
#: the caption loss of each backbone (Table 7's "primary + captioning loss"); None: the backbone has none
CAPTION_LOSS = {"univl": "decoder", "violet": None}


def parse_seeds(spec: str) -> list[int]:
    """``"5"`` -> seeds 0..4; ``"0,3"`` -> [0, 3]; ``"2-4"`` -> [2, 3, 4]."""
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if n < 1:
            raise ValueError("--seeds N needs N >= 1")
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        a, sep, b = part.strip().partition("-")
        if not a.isdigit() or (sep and not b.isdigit()):
            raise ValueError(f"--seeds {spec!r}: expected N, a list 0,3 or a range 2-4")
        out.extend(range(int(a), int(b) + 1) if sep else [int(a)])
    if len(set(out)) != len(out):
        raise ValueError(f"--seeds {spec!r} repeats a seed")
    return out


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``"meltr:aid-cg:K=1,gamma=0"`` -> ``(spec, {"method": "meltr", "solver": "aid-cg", "K": 1, "gamma": 0.0})``."""
    parts = spec.split(":")
    if parts[0] not in METHODS:
        raise ValueError(f"variant {spec!r}: must start with a method {METHODS}")
    over: dict[str, Any] = {"method": parts[0]}
    rest = parts[1:]
    if rest and rest[0] in SOLVERS:
        over["solver"] = rest.pop(0)
    for item in ",".join(rest).split(","):
        if not item:
            continue
        k, _, v = item.partition("=")
        if k not in _TYPES or k in ("sizes", "out", "pretrained", "weights"):
            raise ValueError(f"variant {spec!r}: unknown or unsupported setting {k!r}")
        t = _TYPES[k]
        over[k] = int(v) if t in (int, "int") else float(v) if t in (float, "float") else v
    return spec, over


def default_rows(backbone: str, task: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of the comparison (label, FinetuneConfig overrides). ``weights="least"`` / ``"scaled"``
    are resolved by :func:`run_comparison` (from MELTR's search run / the pretrained backbone)."""
    primary = TASKS[backbone][task]
    rows: list[tuple[str, dict[str, Any]]] = [
        ("single", {"method": "single"}),
        ("mtl", {"method": "mtl"}),
        ("mtl+meta", {"method": "mtl", "train_on_meta": True}),
    ]
    cap = CAPTION_LOSS[backbone]
    if cap is not None and cap != primary:
        rows.append((f"{primary} + {cap}", {"method": "weighted", "weights": {primary: 1.0, cap: 1.0}}))
    rows.append(("all but MELTR's least", {"method": "weighted", "weights": "least"}))
    rows.append(("scale-normalised sum", {"method": "weighted", "weights": "scaled"}))
    # SAMA (first order, added later) is in Table 8, not yet in this comparison (its 8 runs: ~2 core-hours)
    rows += [(f"MELTR {_SOLVER_LABEL[s]}", {"method": "meltr", "solver": s}) for s in SOLVERS if s != "sama"]
    return rows


def _key(task: str, m: Mapping[str, float]) -> tuple[float, ...]:
    if task == "retrieval":
        return (m["R@1"], m["R@5"], -m["MedR"])
    if task.startswith("qa-"):
        return (m["acc"],)
    return (m["CIDEr"], m["BLEU-4"])


def _metric(task: str) -> str:
    return "R@1" if task == "retrieval" else "acc" if task.startswith("qa-") else "CIDEr"


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "+-." else "_" for c in label)


def _run(cfg: FinetuneConfig, data: Any, pre: Any, archive: Path | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg``, or read back a finished run with the same settings from ``cfg.out`` or, failing that,
    from ``archive / <run directory name>`` (finished runs kept in the repository, read only)."""
    assert cfg.out is not None
    want = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "resume", "out")}
    want["pretrained"] = _portable_path(want.get("pretrained"))
    places = [Path(cfg.out) / "results.json"]
    if archive is not None:
        places.append(archive / Path(cfg.out).name / "results.json")
    for res_path in places:
        if not res_path.exists():
            continue
        try:
            prev = json.loads(res_path.read_text())
        except json.JSONDecodeError:
            continue
        have = {k: v for k, v in prev.get("config", {}).items() if k not in ("progress", "resume", "out")}
        have = {**{k: _DEFAULTS[k] for k in want.keys() - have.keys() if k in _DEFAULTS}, **have}
        have["pretrained"] = _portable_path(have.get("pretrained"))
        # finished: every epoch run (results.json is rewritten after each epoch, so a run stopped part-way
        # has a best_val too) and, where asked for, the test read
        finished = len(prev.get("epochs", [])) >= cfg.epochs and (prev.get("test") is not None or not cfg.eval_test)
        if have == want and finished and prev.get("best_val"):
            return prev
    run = FinetuneRun(cfg, data, pre)
    while not run.done:
        run.run_epoch()
    return run.finish()


def _scaled_weights(backbone: str, task: str, data: Any, pre: Any, base: Mapping[str, Any]) -> dict[str, float]:
    """``w_t = L_primary / L_t`` at the pretrained backbone on the first 64 training pairs (w_primary = 1)."""
    cfg = FinetuneConfig(**{**base, "method": "mtl", "seed": SEARCH_SEED, "progress": False})
    run = FinetuneRun(cfg, data, pre)
    batch = run.collate(seed=4321)([run.sets["train"][i] for i in range(min(64, len(run.sets["train"])))])
    with torch.no_grad():
        lv = run.obj.losses(run.obj.params, batch)
    names = run.obj.meltr.task_names
    p = float(lv[names.index(TASKS[backbone][task])])
    return {n: round(p / max(float(v), 1e-8), 4) for n, v in zip(names, lv.tolist(), strict=True)}


def _portable(base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the pretrained path made clone-independent (a path inside this repository is kept
    relative to it, so records written in another checkout compare equal) and FinetuneConfig fields the record
    predates filled in with their defaults."""
    out = {**_DEFAULTS, **base}
    out["pretrained"] = _portable_path(out.get("pretrained"))
    return out


def _portable_path(pre: Any) -> Any:
    """A checkpoint path inside this repository (``.../examples/...``) from the repository root on; others as
    they are."""
    if isinstance(pre, str):
        parts = Path(pre).parts
        if "examples" in parts:  # a shipped checkpoint: compare from the repository root on
            return "/".join(parts[parts.index("examples") :])
    return pre


def load_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Read earlier ``--json`` records for ``--reuse``; a missing or malformed file is an error naming it."""
    records = []
    for path in paths:
        try:
            rec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--reuse {path}: cannot read a results record ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("rows"), dict) or "base" not in rec:
            raise ValueError(f"--reuse {path}: not a results record (no 'base' / 'rows')")
        rec["_path"] = str(path)
        records.append(rec)
    return records


def _prior_row(
    records: Sequence[Mapping[str, Any]], record: Mapping[str, Any], label: str, over: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any]] | None:
    """The first earlier record's row ``label`` run under the same settings as ``record`` (base, lr grid,
    search seed) with the same resolved overrides, as ``(path, row)``; None if there is none."""
    for rec in records:
        row = rec["rows"].get(label)
        if row is None or row.get("overrides") != json.loads(json.dumps(over)):
            continue
        same = _portable(rec["base"]) == _portable(record["base"])
        if same and rec.get("lr_grid") == record["lr_grid"] and rec.get("search_seed") == record["search_seed"]:
            return rec["_path"], row
    return None


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired difference ``a - b`` over seeds: mean, std (n - 1), wins (a > b), ties, n."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {
        "mean": statistics.fmean(d),
        "std": statistics.stdev(d) if len(d) > 1 else 0.0,
        "wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "n": len(d),
    }


def run_comparison(
    rows: list[tuple[str, dict[str, Any]]],
    seeds: list[int],
    base: dict[str, Any],
    lr_grid: list[float],
    out_root: Path,
    progress: bool = True,
    reuse: Sequence[Mapping[str, Any]] = (),
    archive: Path | None = None,
) -> dict[str, Any]:
    """Search every row's learning rate on val, then run every seed; returns the JSON-ready record.

    ``reuse``: earlier records (:func:`load_records`); a search run or seed that a record holds under the
    same settings is taken from it instead of being run. ``archive``: a read-only directory of finished runs'
    ``results.json`` (``archive/<run directory name>/results.json``), consulted after the cache."""
    from .finetune import DATA_SIZES
    from .pretrain import load_pretrained
    from .testbed import make_testbed

    probe = FinetuneConfig(**{**base, "method": "mtl", "progress": False})
    if probe.data == "testbed":
        data = make_testbed(probe.data_seed, sizes=probe.sizes)
    else:
        from .data import make_digit_clips

        data = make_digit_clips(probe.data_seed, sizes=probe.sizes or DATA_SIZES["digits"])
    model, tok, meta = load_pretrained(probe.pretrained)
    pre = (model.state_dict(), model.cfg, tok)
    task, key = probe.task, _metric(probe.task)
    record: dict[str, Any] = {
        "base": {k: v for k, v in asdict(probe).items() if k not in ("method", "seed", "out", "progress")},
        "seeds": seeds,
        "lr_grid": lr_grid,
        "search_seed": SEARCH_SEED,
        "pretrained_meta": {k: meta.get(k) for k in ("settings", "steps", "train_seconds", "val_after")},
        "rows": {},
    }
    t0 = time.perf_counter()
    # rows whose weights come from another row's search go last
    order = sorted(rows, key=lambda r: r[1].get("weights") == "least")
    n_runs = len(rows) * (len(lr_grid) + len(seeds)) if len(lr_grid) > 1 else len(rows) * len(seeds)
    bar = tqdm(total=n_runs, desc="fine-tuning runs", disable=not progress)
    scaled: dict[str, float] | None = None
    for label, over in order:
        over = dict(over)
        if over.get("weights") == "scaled":
            scaled = scaled or _scaled_weights(probe.backbone, task, data, pre, record["base"] | {"out": None})
            over["weights"] = scaled
        if over.get("weights") == "least":
            lite = record["rows"].get("MELTR AID-FP-Lite")
            if lite is None:
                raise ValueError("the 'all but MELTR's least' row needs the 'MELTR AID-FP-Lite' row")
            w = lite["search_weights"]
            primary = TASKS[probe.backbone][task]
            least = min((n for n in w if n != primary), key=w.get)  # the primary always stays
            over["weights"] = {n: (0.0 if n == least else 1.0) for n in w}
        row: dict[str, Any] = {"overrides": over, "search": {}, "runs": []}
        prior = _prior_row(reuse, record, label, over)
        old: Mapping[str, Any] = prior[1] if prior else {}
        if prior:
            row["reused_from"] = prior[0]

        def cfg_for(
            seed: int, lr: float, test: bool, label: str = label, over: dict[str, Any] = over
        ) -> FinetuneConfig:
            kw = {**record["base"], **over, "seed": seed, "lr": lr, "progress": False, "eval_test": test}
            kw["out"] = str(out_root / f"{_safe(label)}-lr{lr:g}-s{seed}")
            return FinetuneConfig(**kw)

        if len(lr_grid) > 1:
            for lr in lr_grid:
                if f"{lr:g}" in old.get("search", {}):
                    row["search"][f"{lr:g}"] = old["search"][f"{lr:g}"]
                    if over.get("method") == "meltr":
                        row.setdefault("search_meltr", {})[f"{lr:g}"] = (old.get("search_meltr") or {}).get(f"{lr:g}")
                    bar.update(1)
                    continue
                res = _run(cfg_for(SEARCH_SEED, lr, False), data, pre, archive)
                row["search"][f"{lr:g}"] = {"best_val": res["best_val"], "best_epoch": res["best_epoch"]}
                if over.get("method") == "meltr":
                    last = res["epochs"][-1].get("meltr") or {}
                    row.setdefault("search_meltr", {})[f"{lr:g}"] = last.get("weights")
                bar.update(1)
                bar.set_postfix(row=label, lr=f"{lr:g}", val=f"{res['best_val'][key]:.1f}")
            best = max(lr_grid, key=lambda lr: _key(task, row["search"][f"{lr:g}"]["best_val"]))
        else:
            best = lr_grid[0]
        row["lr"] = best
        if over.get("method") == "meltr" and row.get("search_meltr"):
            row["search_weights"] = row["search_meltr"][f"{best:g}"]
        old_runs = {r["seed"]: r for r in old.get("runs", [])} if old.get("lr") == best else {}
        for seed in seeds:
            if seed in old_runs:
                row["runs"].append(old_runs[seed])
                bar.update(1)
                continue
            res = _run(cfg_for(seed, best, True), data, pre, archive)
            if "search_weights" not in row and over.get("method") == "meltr":
                row["search_weights"] = (res["epochs"][-1].get("meltr") or {}).get("weights")
            row["runs"].append(
                {
                    "seed": seed,
                    "test": res["test"],
                    "best_val": res["best_val"],
                    "best_epoch": res["best_epoch"],
                    "median_epoch_seconds": res["median_epoch_seconds"],
                    "weights_per_epoch": [(e.get("meltr") or {}).get("weights") for e in res["epochs"]],
                    "dir": str(cfg_for(seed, best, True).out),
                }
            )
            bar.update(1)
            bar.set_postfix(row=label, seed=seed, test=f"{res['test'][key]:.1f}")
        record["rows"][label] = row
    bar.close()
    record["rows"] = {label: record["rows"][label] for label, _ in rows}  # the requested order
    record["zero_shot"] = _zero_shot(probe, data, pre)
    for ref in ("mtl", "single"):
        if ref not in record["rows"]:
            continue
        ref_vals = [r["test"][key] for r in record["rows"][ref]["runs"]]
        for row in record["rows"].values():
            row[f"vs_{ref}"] = paired([r["test"][key] for r in row["runs"]], ref_vals)
    record["seconds"] = time.perf_counter() - t0
    return record


def _zero_shot(probe: FinetuneConfig, data: Any, pre: Any) -> dict[str, Any]:
    """The pretrained backbone, not fine-tuned, on val and test (retrieval / captioning), or the answer
    priors (QA)."""
    if probe.qa_kind:
        from .qa import answer_baselines, make_qa

        return {"test": answer_baselines(make_qa(data["test"], probe.qa_kind, seed=0))}
    run = FinetuneRun(FinetuneConfig(**{**asdict(probe), "out": None}), data, pre)
    return {"val": run.evaluate("val"), "test": run.evaluate("test")}


def _ms(xs: Sequence[float]) -> str:
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def _pd(p: Mapping[str, float] | None) -> str:
    if p is None:
        return "-"
    return f"{p['mean']:+.1f} ± {p['std']:.1f} ({p['wins']}/{p['n']})"


def markdown(rec: Mapping[str, Any], cmd: str) -> str:
    """The paired table: test metrics (mean ± std over seeds), paired differences, selected lr."""
    task = rec["base"]["task"]
    key = _metric(task)
    metrics = ("R@1", "R@5", "R@10", "MedR") if task == "retrieval" else (key,)
    head = "| Row | lr | " + " | ".join(f"test {m}" for m in metrics)
    head += f" | Δ{key} vs MTL (wins) | Δ{key} vs single (wins) | val {key} | s / epoch |"
    lines = [f"Command: `{cmd}`", "", head, "| --- " * (len(metrics) + 6) + "|"]
    for label, row in rec["rows"].items():
        runs = row["runs"]
        cols = " | ".join(_ms([r["test"][m] for r in runs]) for m in metrics)
        sec = statistics.median(r["median_epoch_seconds"] for r in runs)
        val = _ms([r["best_val"][key] for r in runs])
        lines.append(
            f"| {label} | {row['lr']:g} | {cols} | {_pd(row.get('vs_mtl'))} | {_pd(row.get('vs_single'))} | {val} "
            f"| {sec:.1f} |"
        )
    z = rec["zero_shot"]["test"]
    if task in ("retrieval", "captioning"):
        digits = 1 if task == "retrieval" else 2  # zero-shot CIDEr is a few hundredths
        cells = " | ".join(f"{z[m]:.{digits}f}" for m in metrics)
        lines.append(f"| pretrained, not fine-tuned | - | {cells} | | | | |")
    elif task.startswith("qa-"):
        lines.append(f"| majority answer per template | - | {z['template_majority']:.1f} | | | | |")
    b = rec["base"]
    lines += [
        "",
        f"Seeds {rec['seeds']} (paired: same pretrained init and data order per seed); learning rate per row "
        f"chosen on val from {rec['lr_grid']} with search seed {rec['search_seed']}; up to {b['epochs']} epochs, "
        f"the val-selected epoch tested once; batch {b['batch_size']}, K={b['K']}, gamma={b['gamma']}, meta lr "
        f"{b['meta_lr']:g}, data {b['data']!r} {b['sizes']}; {rec['seconds'] / 60:.0f} min in this invocation "
        "(runs read back from the cache not counted as work).",
    ]
    reused: dict[str, list[str]] = {}
    for label, row in rec["rows"].items():
        if row.get("reused_from"):
            reused.setdefault(Path(row["reused_from"]).name, []).append(f"`{label}`")
    for src, labels in reused.items():
        lines += ["", f"Read back from the earlier record `{src}` (same settings, not rerun): {', '.join(labels)}."]
    weighted = {label: row["overrides"].get("weights") for label, row in rec["rows"].items()}
    notes = [f"`{label}`: {w}" for label, w in weighted.items() if isinstance(w, dict)]
    if notes:
        lines += ["", "Manual weightings: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def plot(rec: Mapping[str, Any], path: Path) -> Path:
    """Left: test key metric per row (mean, std error bar, dots = seeds). Right: paired difference to MTL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = _metric(rec["base"]["task"])
    labels = list(rec["rows"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(labels) + 1.8), sharey=True)
    for i, label in enumerate(labels):
        vals = [r["test"][key] for r in rec["rows"][label]["runs"]]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        a1.errorbar(statistics.fmean(vals), i, xerr=sd, fmt="o", color="C0", capsize=3)
        a1.plot(vals, [i] * len(vals), ".", color="0.6", ms=4)
        p = rec["rows"][label].get("vs_mtl")
        if p is not None:
            a2.errorbar(p["mean"], i, xerr=p["std"], fmt="o", color="C1", capsize=3)
    z = rec["zero_shot"]["test"].get(key)
    if z is not None:
        a1.axvline(z, color="k", ls="--", lw=0.8, label="not fine-tuned")
        a1.legend(fontsize=8)
    a2.axvline(0.0, color="k", lw=0.8)
    a1.set_yticks(range(len(labels)), labels)
    a1.invert_yaxis()
    a1.set_xlabel(f"test {key} (mean ± std over seeds; dots: seeds)")
    a2.set_xlabel(f"paired Δ{key} vs MTL (mean ± std over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights_over_training(rec: Mapping[str, Any], path: Path) -> Path | None:
    """MELTR's task weights ``d L_aux / d L_t`` per epoch, AID-FP-Lite row, mean over seeds (band: min-max)."""
    row = rec["rows"].get("MELTR AID-FP-Lite")
    if row is None:
        return None
    per_seed = [r["weights_per_epoch"] for r in row["runs"] if all(r["weights_per_epoch"])]
    if not per_seed:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_seed[0][0])
    epochs = min(len(s) for s in per_seed)
    x = list(range(1, epochs + 1))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, n in enumerate(names):
        ys = [[s[e][n] for s in per_seed] for e in range(epochs)]
        ax.plot(x, [statistics.fmean(y) for y in ys], "o-", color=f"C{i}", label=n)
        ax.fill_between(x, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.15)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set(xlabel="epoch", ylabel="d L_aux / d L_t", title=f"MELTR AID-FP-Lite task weights ({len(per_seed)} seeds)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section_name(backbone: str, task: str) -> str:
    """``meltr_retrieval`` for UniVL retrieval (the first section), else ``meltr_BACKBONE_TASK``."""
    return "meltr_retrieval" if (backbone, task) == ("univl", "retrieval") else f"meltr_{backbone}_{task}"


_TASK_TITLE = {
    "retrieval": "text-to-video retrieval",
    "qa-mc": "video QA, multiple choice (5 options)",
    "qa-oe": "video QA, open-ended",
    "captioning": "video captioning",
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="univl")
    p.add_argument("--task", choices=["retrieval", "captioning", "qa-mc", "qa-oe"], default="retrieval")
    p.add_argument("--seeds", default="5", help="N (seeds 0..N-1), a list 0,3 or a range 2-4")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs (the epoch is chosen on val)")
    p.add_argument("--lr-grid", default="5e-4,1e-3,2e-3", help="backbone learning rates searched on val per row")
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all); see --list-rows")
    p.add_argument("--list-rows", action="store_true", help="print the row labels and exit")
    p.add_argument("--variant", action="append", default=[], help="extra row METHOD[:SOLVER]:key=value,...")
    p.add_argument("--pretrained", default=None, help="default by backbone and data (finetune.default_pretrained)")
    p.add_argument("--out-root", type=Path, default=Path("runs/results"))
    p.add_argument("--json", type=Path, default=None, help="write every per-seed, per-row metric here")
    p.add_argument(
        "--archive", type=Path, default=None, help="a read-only directory of finished runs (BACKBONE-TASK/RUN/"
        "results.json, e.g. docs/data/run_archive) consulted after --out-root's cache"
    )
    p.add_argument(
        "--reuse", type=Path, action="append", default=[], help="an earlier --json record whose runs are reused "
        "where its settings equal these (repeatable; e.g. docs/data/paired_univl_retrieval.json)"
    )
    p.add_argument("--write", action="store_true", help="write the docs/results.md section and docs/img plots")
    p.add_argument("--notes", default=None, help="a markdown file whose text is appended to the section")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.task not in TASKS[a.backbone]:
        p.error(f"--task {a.task} is not available for --backbone {a.backbone}")
    rows = default_rows(a.backbone, a.task)
    if a.list_rows:
        print("\n".join(label for label, _ in rows))
        return {}
    try:
        seeds = parse_seeds(a.seeds)
        grid = [float(x) for x in a.lr_grid.split(",")]
        rows += [parse_variant(v) for v in a.variant]
        reuse = load_records(a.reuse)
    except ValueError as e:
        p.error(str(e))
    if a.rows:
        want = [r.strip() for r in a.rows.split(",")]
        unknown = [w for w in want if w not in dict(rows)]
        if unknown:
            p.error(f"unknown row(s) {unknown}; rows: {[label for label, _ in rows]}")
        keep = set(want)
        if "all but MELTR's least" in keep and len(grid) > 1:
            keep.add("MELTR AID-FP-Lite")
        rows = [r for r in rows if r[0] in keep]
    torch.set_num_threads(a.threads)
    data = "digits" if a.backbone == "violet" or a.task.startswith("qa-") else "testbed"
    pretrained = a.pretrained or default_pretrained(a.backbone, data)
    if not Path(pretrained).exists():
        from .pretrain import ensure_pretrained

        ensure_pretrained(pretrained, "full", backbone=a.backbone, data=data)
    base = {"task": a.task, "backbone": a.backbone, "epochs": a.epochs, "pretrained": pretrained, "data": data}
    out_root = a.out_root / f"{a.backbone}-{a.task}"
    archive = None if a.archive is None else a.archive / out_root.name
    rec = run_comparison(rows, seeds, base, grid, out_root, reuse=reuse, archive=archive)
    cmd = "python -m examples.meltr_video.results " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(rec, cmd.strip())
    print(text)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rec, indent=1))
        print(f"wrote {a.json}")
    if a.write:
        from examples.results_md import write_section

        imgs = ROOT / "docs" / "img"
        suffix = "" if (a.backbone, a.task) == ("univl", "retrieval") else f"_{a.backbone}_{a.task}"
        plot(rec, imgs / f"meltr_paired{suffix}.png")
        text += f"\n\n![paired comparison](img/meltr_paired{suffix}.png)"
        if plot_weights_over_training(rec, imgs / f"meltr_weights{suffix}.png") is not None:
            text += f"\n![MELTR task weights](img/meltr_weights{suffix}.png)"
        if a.notes:
            text += "\n\n" + Path(a.notes).read_text(encoding="utf-8").strip()
        name = {"univl": "UniVL", "violet": "Violet"}[a.backbone]
        title = f"## MELTR fine-tuning: {_TASK_TITLE[a.task]}, {name}-style backbone"
        title += " (`examples/meltr_video/results.py`)"
        write_section(ROOT / "docs" / "results.md", section_name(a.backbone, a.task), f"{title}\n\n{text}")
    return rec


if __name__ == "__main__":
    main()
