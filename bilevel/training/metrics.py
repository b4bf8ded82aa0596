"""Metrics of :meth:`BilevelTrainer.fit` to JSONL, CSV and TensorBoard."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "MetricsLogger"]

CSV_COLUMNS = (
    "step",
    "epoch",
    "inner_updates",
    "hyper_steps",
    "inner_loss",
    "outer_loss",
    "hypergrad_norm",
    "lr",
    "meta_lr",
    "time",
    "skipped",
)


class MetricsLogger:
    """Metrics to ``log_dir/metrics.jsonl``, ``log_dir/metrics.csv`` and TensorBoard (``log_dir/tb``)
    when :mod:`torch.utils.tensorboard` is importable. Files are appended to (resume-friendly)."""

    def __init__(self, log_dir: str | os.PathLike[str], tensorboard: bool | None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        csv_path = self.dir / "metrics.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_fh = open(csv_path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ImportError("tensorboard=True but the tensorboard package is not installed") from None
            else:
                self._tb = SummaryWriter(str(self.dir / "tb"))

    def log(self, metrics: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._csv.writerow(metrics)
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, metrics["step"])

    def flush(self) -> None:
        self._jsonl.flush()
        self._csv_fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._jsonl.close()
        self._csv_fh.close()
        if self._tb is not None:
            self._tb.close()
