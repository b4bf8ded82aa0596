"""MELTR analysis plots like the paper's Figures 3-4, from a fine-tuning ``results.json``.

    python -m examples.meltr_video.analysis runs/finetune/retrieval-meltr-aid-fp-lite-s0/results.json \
        [--out-dir docs/img]

* ``meltr_response.png`` (Fig. 3): MELTR's output ``L_aux`` as each input loss ``L_t`` sweeps a range
  around its value on a fixed val batch, the other losses held there (``results["response"]``,
  written by :meth:`~examples.meltr_video.finetune.FinetuneRun.finish`).
* ``meltr_weights.png`` (Fig. 4): each task's weight ``d L_aux / d L_t`` at that batch's losses after
  every epoch (``results["epochs"][i]["meltr"]["weights"]``).

``python -m examples.meltr_video.analysis --init-weights [--seeds 3]`` prints, instead, MELTR's output
and task weights ``d L_aux / d L_t`` *at initialisation* (before any hyper step), for each seed's MELTR
at the shipped testbed backbone's losses on the first 16 training pairs: the direction the first
inner steps of a MELTR run take.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["initial_weights", "main", "plot_response", "plot_weights"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_response(results: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per input loss: ``L_aux`` vs ``L_t`` (the dot marks the base point)."""
    if "response" not in results:
        raise ValueError("results have no 'response' entry: only MELTR runs (method 'meltr') have one")
    resp = results["response"]
    names = list(resp["curves"])
    plt = _plt()
    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        c = resp["curves"][name]
        ax.plot(c["x"], c["y"])
        x0 = resp["base"][name]
        mid = len(c["x"]) // 2
        ax.plot([x0], [c["y"][mid]], "o", ms=4)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("input loss", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("MELTR output", fontsize=8)
    fig.suptitle(f"MELTR output as one input loss varies ({results.get('name', '')}, final epoch)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_weights(results: Mapping[str, Any], path: str | Path) -> Path:
    """``d L_aux / d L_t`` per task against the epoch."""
    eps = [e for e in results["epochs"] if e.get("meltr")]
    if not eps:
        raise ValueError("results have no per-epoch MELTR weights: only MELTR runs record them")
    names = list(eps[0]["meltr"]["weights"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [e["epoch"] for e in eps]
    for name in names:
        ax.plot(x, [e["meltr"]["weights"][name] for e in eps], "o-", label=name)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set(xlabel="epoch", ylabel="d MELTR output / d input loss", title=f"task weights ({results.get('name', '')})")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def initial_weights(seeds: Sequence[int], batch_size: int = 16) -> list[dict[str, Any]]:
    """Per seed: MELTR's output and ``d L_aux / d L_t`` before training, at the pretrained testbed
    backbone's losses on the first ``batch_size`` training pairs (masks seeded with 1)."""
    import torch

    from .finetune import FinetuneConfig, FinetuneRun
    from .meltr import loss_gradient
    from .testbed import make_testbed

    cfg0 = FinetuneConfig(method="meltr", progress=False)
    data = make_testbed(cfg0.data_seed, sizes=cfg0.sizes)
    out = []
    for seed in seeds:
        run = FinetuneRun(FinetuneConfig(method="meltr", seed=seed, progress=False), data)
        batch = run.collate(seed=1)([run.sets["train"][i] for i in range(batch_size)])
        with torch.no_grad():
            lv = run.obj.losses(run.obj.params, batch)
        assert run.meltr is not None
        with torch.enable_grad():
            w = loss_gradient(run.meltr, lv)
        names = run.meltr.task_names
        out.append(
            {
                "seed": seed,
                "L_aux": float(run.meltr(lv).detach()),
                "losses": dict(zip(names, lv.tolist(), strict=True)),
                "weights": dict(zip(names, w.tolist(), strict=True)),
            }
        )
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="?", help="results.json of a MELTR fine-tuning run")
    p.add_argument("--out-dir", type=Path, default=Path("docs/img"))
    p.add_argument("--init-weights", action="store_true", help="print MELTR's task weights at initialisation")
    p.add_argument("--seeds", type=int, default=3, help="with --init-weights: seeds 0..N-1")
    a = p.parse_args(argv)
    if a.init_weights:
        rows = initial_weights(range(a.seeds))
        names = list(rows[0]["weights"])
        print("| seed | L_aux | " + " | ".join(names) + " |")
        print("| --- " * (len(names) + 2) + "|")
        print("| losses | | " + " | ".join(f"{rows[0]['losses'][n]:.3f}" for n in names) + " |")
        for r in rows:
            print(f"| {r['seed']} | {r['L_aux']:.3f} | " + " | ".join(f"{r['weights'][n]:+.4f}" for n in names) + " |")
        return []
    if a.results is None:
        p.error("give a results.json (or --init-weights)")
    res = json.loads(a.results.read_text())
    out = [plot_response(res, a.out_dir / "meltr_response.png"), plot_weights(res, a.out_dir / "meltr_weights.png")]
    for o in out:
        print(f"wrote {o}")
    return out


if __name__ == "__main__":
    main()
