"""Train the sentiment regressor on a CMU-MOSI-format pickle.

CLI::

    python -m examples.meltr_sentiment.run --data mosi_data.pkl [--epochs 20 --seed 0]
    python -m examples.meltr_sentiment.run --demo        # synthetic MOSI-format pickle, offline, seconds
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .data import load_mosi, make_synthetic_mosi
from .model import train_regressor

__all__ = [
    "main",
]


def _fmt(m: Mapping[str, float]) -> str:
    keys = ("mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_nonzero", "f1_nonzero", "acc7")
    return "  ".join(f"{k}={m[k]:.3f}" for k in keys)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Train the sentiment regressor on a CMU-MOSI-format pickle.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="aligned MOSI pickle (MulT mosi_data.pkl / MMSA aligned_50.pkl)")
    src.add_argument("--demo", action="store_true", help="write and use a small synthetic MOSI-format pickle")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (20; 12 with --demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-3, as MulT; 3e-3 with --demo)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (64; 32 with --demo)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--loss", choices=["mse", "l1"], default="mse")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    epochs = a.epochs if a.epochs is not None else (12 if a.demo else 20)
    hidden = a.hidden if a.hidden is not None else (32 if a.demo else 64)
    lr = a.lr if a.lr is not None else (3e-3 if a.demo else 1e-3)
    if epochs < 1:
        p.error("--epochs must be >= 1")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_synthetic_mosi(Path(tmp) / "mosi_demo.pkl", seed=a.seed) if a.demo else a.data
        splits = load_mosi(path)
    print(
        f"{path if a.data else 'synthetic demo'}: train/valid/test = {len(splits.train)}/{len(splits.valid)}/"
        f"{len(splits.test)}, dims {splits.dims}, non-finite values replaced by 0: {splits.total_nonfinite}"
    )
    res = train_regressor(
        splits,
        epochs,
        a.seed,
        a.batch_size,
        lr,
        progress=not a.no_progress,
        hidden=hidden,
        layers=a.layers,
        ff=2 * hidden,
        loss=a.loss,
    )
    print(f"best epoch {res['best_epoch']}/{epochs} by valid MAE ({res['seconds']:.1f} s)")
    print(f"valid: {_fmt(res['valid'])}")
    print(f"test:  {_fmt(res['test'])}")
    return res


if __name__ == "__main__":
    main()
