"""Single task vs MTL vs MELTR (AID-FP-Lite), several seeds, for one backbone and task.

    python -m examples.meltr_video.results [--backbone univl|violet] [--task retrieval|qa-mc|qa-oe]
        [--seeds 3] [--epochs 3] [--train-size 160]
        [--variant "meltr:gamma=0" --variant "meltr:K=1" ...] [--no-write]

Each row is fine-tuned from the same pretrained backbone (``--pretrained``, default by backbone
``runs/pretrain_tiny.pt`` / ``runs/pretrain_violet.pt``; pretrained with the "full" preset when
missing) by :func:`examples.meltr_video.finetune.finetune`; test metrics are those of the
val-selected epoch. Writes mean ± std of the test metrics (retrieval: R@1 / R@5 / R@10 / MedR; QA:
accuracy) into the section ``meltr_retrieval`` (UniVL retrieval) or ``meltr_BACKBONE_TASK`` of
docs/results.md, and the analysis plots (docs/img/meltr_response.png, meltr_weights.png; with a
``_BACKBONE_TASK`` suffix for the others) of the seed-0 MELTR run.
``--variant METHOD[:SOLVER]:key=value,...`` adds rows with other settings
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
from .finetune import BACKBONES, DEFAULT_PRETRAINED, METHODS, SOLVERS, TASKS, FinetuneConfig, finetune

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
            test = out[label][-1]["test"]
            bar.set_postfix(
                run=label, **({"R1": f"{test['R@1']:.1f}"} if "R@1" in test else {"acc": f"{test['acc']:.1f}"})
            )
    bar.close()
    return out


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {sd:.1f}"


def markdown(res: dict[str, list[dict[str, Any]]], cmd: str, setting: str, task: str = "retrieval") -> str:
    """The table: test metrics (mean ± std over seeds), the selected val score, best epochs, s / epoch."""
    metrics, key = (("R@1", "R@5", "R@10", "MedR"), "R@1") if task == "retrieval" else (("acc",), "acc")
    lines = [
        f"Command: `{cmd}`",
        "",
        f"Setting: {setting}",
        "",
        "| Run | " + " | ".join(f"test {m}" for m in metrics) + f" | val {key} (selected) | best epoch | s / epoch |",
        "| --- " * (len(metrics) + 4) + "|",
    ]
    for label, rs in res.items():
        cols = " | ".join(_ms([r["test"][m] for r in rs]) for m in metrics)
        v = _ms([r["best_val"][key] for r in rs])
        ep = ", ".join(str(r["best_epoch"]) for r in rs)
        sec = statistics.median([s for r in rs for s in r["epoch_seconds"]])
        lines.append(f"| {label} | {cols} | {v} | {ep} | {sec:.1f} |")
    return "\n".join(lines)


def section_name(backbone: str, task: str) -> str:
    """``meltr_retrieval`` for UniVL retrieval (the first section), else ``meltr_BACKBONE_TASK``."""
    return "meltr_retrieval" if (backbone, task) == ("univl", "retrieval") else f"meltr_{backbone}_{task}"


_TASK_TITLE = {
    "retrieval": "text-to-video retrieval",
    "qa-mc": "video QA, multiple choice (5 options)",
    "qa-oe": "video QA, open-ended",
    "captioning": "video captioning",
}


def write_section(path: Path, text: str, backbone: str = "univl", task: str = "retrieval") -> None:
    """Write the section of (backbone, task) (hand-written notes after ``<!-- notes -->`` are kept)."""
    name = {"univl": "UniVL", "violet": "Violet"}[backbone]
    title = f"## MELTR fine-tuning: {_TASK_TITLE[task]}, {name}-style backbone (`examples/meltr_video/results.py`)"
    write_results_section(path, section_name(backbone, task), f"{title}\n\n{text}")


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", choices=BACKBONES, default="univl")
    p.add_argument("--task", choices=["retrieval", "qa-mc", "qa-oe"], default="retrieval")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=160)
    p.add_argument("--lr", type=float, default=1e-4, help="backbone (and answer head) Adam learning rate")
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--pretrained", default=None, help=f"default by backbone: {DEFAULT_PRETRAINED}")
    p.add_argument("--variant", action="append", default=[], help="extra row METHOD[:SOLVER]:key=value,...")
    p.add_argument("--out-root", type=Path, default=Path("runs/results"))
    p.add_argument("--notes", default=None, help="a markdown file whose text is appended to the section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--reuse", action="store_true", help="resume / reuse the runs already in --out-root")
    a = p.parse_args(argv)
    if a.task not in TASKS[a.backbone]:
        p.error(f"--task {a.task} is not available for --backbone {a.backbone}")
    torch.set_num_threads(a.threads)
    a.pretrained = a.pretrained or DEFAULT_PRETRAINED[a.backbone]
    if not Path(a.pretrained).exists():
        from .pretrain import ensure_pretrained

        ensure_pretrained(a.pretrained, "full", backbone=a.backbone)
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
    base = {
        "task": a.task, "backbone": a.backbone, "epochs": a.epochs, "pretrained": a.pretrained, "sizes": sizes,
        "lr": a.lr,
    }  # fmt: skip
    t0 = time.perf_counter()
    out_root = a.out_root if (a.backbone, a.task) == ("univl", "retrieval") else a.out_root / f"{a.backbone}-{a.task}"
    res = run_rows(rows, a.seeds, base, out_root, reuse=a.reuse)
    setting = (
        f"digit clips (train {sizes['train']} / meta {sizes['meta']} / val {sizes['val']} / test {sizes['test']}), "
        f"backbone `{a.pretrained}`, {a.epochs} epochs, {a.seeds} seeds, batch 16, Adam lr {a.lr:g} (backbone), "
        f"MELTR Adam 1e-3, K=3, gamma=0.1, held-out meta split; test metrics of the val-selected epoch; "
        f"{time.perf_counter() - t0:.0f} s in this invocation."
    )
    cmd = "python -m examples.meltr_video.results " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(res, cmd.strip(), setting, a.task) + "\n" + _reference_rows(a.pretrained, a.task, sizes)
    print(text)
    if not a.no_write:
        meltr0 = res["meltr aid-fp-lite"][0]
        imgs = ROOT / "docs" / "img"
        suffix = "" if (a.backbone, a.task) == ("univl", "retrieval") else f"_{a.backbone}_{a.task}"
        plot_response(meltr0, imgs / f"meltr_response{suffix}.png")
        plot_weights(meltr0, imgs / f"meltr_weights{suffix}.png")
        text += (
            f"\n\n![MELTR response](img/meltr_response{suffix}.png)\n"
            f"![MELTR task weights](img/meltr_weights{suffix}.png)"
        )
        if a.notes:
            text += "\n\n" + Path(a.notes).read_text(encoding="utf-8").strip()
        write_section(ROOT / "docs" / "results.md", text, a.backbone, a.task)
    return res


def _reference_rows(pretrained: str, task: str, sizes: dict[str, int]) -> str:
    """Rows without fine-tuning: retrieval with the pretrained backbone as is; QA: answer-prior baselines."""
    test = make_digit_clips(0, sizes=sizes)["test"]
    if task == "retrieval":
        from .evaluate import retrieval_eval
        from .pretrain import load_pretrained

        model, tok, _ = load_pretrained(pretrained)
        z = retrieval_eval(model, test, tok)
        cols = " | ".join(f"{z[m]:.1f}" for m in ("R@1", "R@5", "R@10", "MedR"))
        return f"| pretrained backbone, no fine-tuning | {cols} | - | - | - |"
    from .qa import answer_baselines, make_qa

    b = answer_baselines(make_qa(test, task[3:], seed=0))
    return (
        f"| majority answer (test) | {b['majority']:.1f} | - | - | - |\n"
        f"| majority answer per question template (test) | {b['template_majority']:.1f} | - | - | - |"
    )


if __name__ == "__main__":
    main()
