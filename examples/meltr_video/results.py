"""Single task vs MTL vs MELTR (AID-FP-Lite) on text-to-video retrieval, several seeds.

    python -m examples.meltr_video.results [--seeds 3] [--epochs 3] [--train-size 160]
        [--variant "meltr:gamma=0" --variant "meltr:K=1" ...] [--no-write]

Each row is fine-tuned from the same pretrained backbone (``--pretrained``, default the cached
``runs/pretrain_tiny.pt``; made with ``python -m examples.meltr_video.pretrain`` when missing) by
:func:`examples.meltr_video.finetune.finetune`; test metrics are those of the val-selected epoch.
Writes mean ± std of R@1 / R@5 / R@10 / MedR into the ``meltr_retrieval`` section of
docs/results.md, and the analysis plots (docs/img/meltr_response.png, meltr_weights.png) of the
seed-0 MELTR run. ``--variant METHOD[:SOLVER]:key=value,...`` adds rows with other settings
(e.g. ``meltr:gamma=0``, ``meltr:aid-cg:K=1``, ``mtl:lr=3e-4``) to probe why a method wins or loses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.markdown import write_section as write_results_section

from .analysis import plot_response, plot_weights
from .data import make_digit_clips
from .finetune import METHODS, SOLVERS, FinetuneConfig, finetune

__all__ = ["main", "parse_variant", "run_rows"]

ROOT = Path(__file__).resolve().parents[2]
_TYPES = {f.name: f.type for f in fields(FinetuneConfig)}


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
        if k not in _TYPES or k in ("sizes", "out", "pretrained"):
            raise ValueError(f"variant {spec!r}: unknown or unsupported setting {k!r}")
        t = _TYPES[k]
        over[k] = int(v) if t in (int, "int") else float(v) if t in (float, "float") else v
    return spec, over


def run_rows(
    rows: list[tuple[str, dict[str, Any]]],
    seeds: int,
    base: dict[str, Any],
    out_root: Path,
    progress: bool = True,
    reuse: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Fine-tune every row for seeds 0..seeds-1; returns ``{label: [results per seed]}``.

    ``reuse``: resume each run from its directory (finished runs are only re-tested, from their
    val-selected checkpoint ``best.pt``)."""
    data = make_digit_clips(base.get("data_seed", 0), sizes=base["sizes"])
    from .pretrain import load_pretrained

    model, tok, _ = load_pretrained(base["pretrained"])
    pre = (model.state_dict(), model.cfg, tok)
    out: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in rows}
    bar = tqdm(total=len(rows) * seeds, desc="fine-tuning runs", disable=not progress)
    for seed in range(seeds):
        for label, over in rows:
            kw = {**base, **over, "seed": seed, "progress": False, "resume": reuse}
            safe = label.replace(":", "_").replace(",", "_").replace("=", "")
            kw["out"] = str(out_root / f"{safe}-s{seed}")
            out[label].append(finetune(FinetuneConfig(**kw), data, pre))
            bar.update(1)
            bar.set_postfix(run=label, R1=f"{out[label][-1]['test']['R@1']:.1f}")
    bar.close()
    return out


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {sd:.1f}"


def markdown(res: dict[str, list[dict[str, Any]]], cmd: str, setting: str) -> str:
    lines = [
        f"Command: `{cmd}`",
        "",
        f"Setting: {setting}",
        "",
        "| Run | test R@1 | test R@5 | test R@10 | test MedR | val R@1 (selected) | best epoch | s / epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, rs in res.items():
        t = lambda m, rs=rs: _ms([r["test"][m] for r in rs])  # noqa: E731
        v = _ms([r["best_val"]["R@1"] for r in rs])
        ep = ", ".join(str(r["best_epoch"]) for r in rs)
        sec = statistics.median([s for r in rs for s in r["epoch_seconds"]])
        lines.append(f"| {label} | {t('R@1')} | {t('R@5')} | {t('R@10')} | {t('MedR')} | {v} | {ep} | {sec:.1f} |")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Write the meltr_retrieval section (hand-written notes after ``<!-- notes -->`` are kept)."""
    title = "## MELTR fine-tuning: text-to-video retrieval (`examples/meltr_video/results.py`)"
    write_results_section(path, "meltr_retrieval", f"{title}\n\n{text}")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=160)
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--pretrained", default="runs/pretrain_tiny.pt")
    p.add_argument("--variant", action="append", default=[], help="extra row METHOD[:SOLVER]:key=value,...")
    p.add_argument("--out-root", type=Path, default=Path("runs/results"))
    p.add_argument("--notes", default=None, help="a markdown file whose text is appended to the section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--reuse", action="store_true", help="resume / reuse the runs already in --out-root")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not Path(a.pretrained).exists():
        from .pretrain import ensure_pretrained

        ensure_pretrained(a.pretrained, "full")
    rows: list[tuple[str, dict[str, Any]]] = [
        ("single", {"method": "single"}),
        ("mtl", {"method": "mtl"}),
        ("meltr aid-fp-lite", {"method": "meltr", "solver": "aid-fp-lite"}),
    ]
    try:
        rows += [parse_variant(v) for v in a.variant]
    except ValueError as e:
        p.error(str(e))
    sizes = {"train": a.train_size, "meta": 96, "val": a.val_size, "test": a.test_size}
    base = {"task": "retrieval", "epochs": a.epochs, "pretrained": a.pretrained, "sizes": sizes}
    t0 = time.perf_counter()
    res = run_rows(rows, a.seeds, base, a.out_root, reuse=a.reuse)
    from .evaluate import retrieval_eval
    from .pretrain import load_pretrained

    model, tok, _ = load_pretrained(a.pretrained)
    zero = retrieval_eval(model, make_digit_clips(0, sizes=sizes)["test"], tok)
    setting = (
        f"digit clips (train {sizes['train']} / meta {sizes['meta']} / val {sizes['val']} / test {sizes['test']}), "
        f"backbone `{a.pretrained}`, {a.epochs} epochs, {a.seeds} seeds, batch 16, Adam lr 1e-4 (backbone), "
        f"MELTR Adam 1e-3, K=3, gamma=0.1, held-out meta split; test metrics of the val-selected epoch; "
        f"{time.perf_counter() - t0:.0f} s in this invocation."
    )
    cmd = "python -m examples.meltr_video.results " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res, cmd.strip(), setting)
    text += (
        f"\n| pretrained backbone, no fine-tuning | {zero['R@1']:.1f} | {zero['R@5']:.1f} | {zero['R@10']:.1f} "
        f"| {zero['MedR']:.1f} | - | - | - |"
    )
    print(text)
    if not a.no_write:
        meltr0 = res["meltr aid-fp-lite"][0]
        imgs = ROOT / "docs" / "img"
        plot_response(meltr0, imgs / "meltr_response.png")
        plot_weights(meltr0, imgs / "meltr_weights.png")
        text += "\n\n![MELTR response](img/meltr_response.png)\n![MELTR task weights](img/meltr_weights.png)"
        if a.notes:
            text += "\n\n" + Path(a.notes).read_text(encoding="utf-8").strip()
        write_section(ROOT / "docs" / "results.md", text)
    return res


if __name__ == "__main__":
    main()
