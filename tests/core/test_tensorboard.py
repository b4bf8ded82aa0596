"""TensorBoard logging of :meth:`BilevelTrainer.fit` (:class:`bilevel.training.metrics.MetricsLogger`), read back.

A tiny ridge fit (AID-CG, a hyper step every 2nd step) runs with ``tensorboard=True``; the event files
under ``log_dir/tb`` are read with TensorBoard's own reader (``EventAccumulator``) and every scalar is
checked against the JSONL and CSV rows the same logger wrote: the same tags, the same steps, the same
values (TensorBoard stores float32, hence rel 1e-6). A second ``fit`` in the same ``log_dir`` (resuming)
appends a new event file, and the reader sees one continuous run.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel.testing import ridge_diabetes
from bilevel.training import BilevelTrainer, TrainerConfig

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

RIDGE = ridge_diabetes()


def _trainer() -> BilevelTrainer:
    model = nn.ParameterDict({"w": nn.Parameter(torch.zeros(10, dtype=torch.float64))})
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.zeros(10, dtype=torch.float64))})
    return BilevelTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.3),
        RIDGE.inner,
        outer=RIDGE.outer,
        meta_model=meta,
        meta_optimizer=torch.optim.SGD(meta.parameters(), lr=1.0),
        solver=bl.get_solver("aid-cg", iters=3),
        config=TrainerConfig(inner_steps=1, hyper_every=2),
    )


def _loaders():
    g = torch.Generator().manual_seed(0)
    inner_ds = torch.utils.data.TensorDataset(*RIDGE.inner_batch)
    inner = torch.utils.data.DataLoader(inner_ds, batch_size=100, shuffle=True, generator=g)  # 3 batches
    outer = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*RIDGE.outer_batch), batch_size=64)
    return inner, outer


def _scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()  # 0: keep every event
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric (non-bool, non-None) entry of the JSONL rows but ``step``, as tag -> [(step, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        for (_, a), (_, b) in zip(got[tag], want[tag], strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), tag


def test_tensorboard_events_match_jsonl_and_csv(tmp_path):
    tr = _trainer()
    inner, outer = _loaders()
    tr.fit(inner, outer, epochs=1, log_dir=tmp_path, tensorboard=True, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    got = _scalars(tmp_path / "tb")
    _assert_same(got, _expected(rows))
    # the tags a reader relies on, at the right steps: losses every step, outer loss only at hyper steps
    assert [s for s, _ in got["inner_loss"]] == [1, 2, 3]
    assert [s for s, _ in got["outer_loss"]] == [2] and [s for s, _ in got["hypergrad_norm"]] == [2]
    assert [v for _, v in got["hyper_steps"]] == [0.0, 1.0, 1.0]
    assert all(math.isfinite(v) and v > 0 for _, v in got["inner_loss"])
    # the CSV written by the same logger holds the same numbers
    with open(tmp_path / "metrics.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in csv_rows] == [1, 2, 3]
    for (step, value), r in zip(got["inner_loss"], csv_rows, strict=True):
        assert int(r["step"]) == step and float(r["inner_loss"]) == pytest.approx(value, rel=1e-6)
    assert float(csv_rows[1]["outer_loss"]) == pytest.approx(got["outer_loss"][0][1], rel=1e-6)


def test_tensorboard_resumed_fit_appends(tmp_path):
    tr = _trainer()
    inner, outer = _loaders()
    tr.fit(inner, outer, epochs=1, log_dir=tmp_path, tensorboard=True, progress=False)
    tr.fit(inner, outer, epochs=2, log_dir=tmp_path, tensorboard=True, progress=False)  # continues: steps 4..6
    assert len(list((tmp_path / "tb").glob("events.*"))) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    got = _scalars(tmp_path / "tb")
    _assert_same(got, _expected(rows))
    assert [s for s, _ in got["outer_loss"]] == [2, 4, 6]
    assert [v for _, v in got["epoch"]] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_tensorboard_false_writes_no_events(tmp_path):
    tr = _trainer()
    inner, outer = _loaders()
    tr.fit(inner, outer, epochs=1, max_steps=1, log_dir=tmp_path, tensorboard=False, progress=False)
    assert not (tmp_path / "tb").exists() and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
