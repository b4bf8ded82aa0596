"""Smoke test of the optimisation-efficiency benchmark (paper Table 8) in its tiny mode."""

from __future__ import annotations

import math

import pytest

from benchmarks import efficiency

pytestmark = pytest.mark.usefixtures("one_thread")  # small runs: one thread is faster on a shared CPU


def test_tiny_table_has_all_six_rows(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# Results\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    res = efficiency.main(["--tiny", "--no-progress", "--results", str(md), "--no-write"])
    rows = res["rows"]
    assert [r["key"] for r in rows] == ["mtl", "itd", "stocbio", "aid-cg", "aid-fp", "aid-fp-lite"]
    assert rows[0]["overhead_pct"] == 0.0
    for r in rows:
        assert r["seconds_per_epoch"] > 0 and math.isfinite(r["overhead_pct"])
        assert 0.0 <= r["R@1"][0] <= 100.0
    for r in rows[1:]:
        assert r["hyper_steps"] == 1 and r["ms_per_hyper_step"]["total"] > 0
    assert rows[0]["hyper_steps"] == 0
    # HVP counts: AID-FP-Lite and ITD need none, AID-FP / StocBiO use all 3
    text = efficiency.markdown(rows, "cmd", res["meta"])
    for label, *_ in efficiency.ROWS:
        assert f"| {label} |" in text
    efficiency.write_section(md, text)
    out = md.read_text()
    assert "keep me" in out and out.count(efficiency.BEGIN) == 1 and "| MELTR + AID-FP-Lite |" in out
    efficiency.write_section(md, "again")
    assert md.read_text().count(efficiency.BEGIN) == 1 and "again" in md.read_text()


def test_write_section_keeps_notes(tmp_path):
    md = tmp_path / "r.md"
    efficiency.write_section(md, "table v1")
    text = md.read_text().replace(efficiency.END, f"{efficiency.NOTES}\nmy analysis\n{efficiency.END}")
    md.write_text(text)
    efficiency.write_section(md, "table v2")
    out = md.read_text()
    assert "table v2" in out and "table v1" not in out and "my analysis" in out
    assert out.index("table v2") < out.index("my analysis") < out.index(efficiency.END)


def test_real_format_splits_by_video(tmp_path):
    """``--data msrvtt``: an MSRVTT-format pickle + CSV is split by video into the 4 splits."""
    import csv
    import pickle

    import numpy as np

    from examples.meltr_video.data import Tokenizer

    feats = {f"video{i}": np.random.default_rng(i).standard_normal((5, 1024)).astype(np.float32) for i in range(12)}
    (tmp_path / "f.pkl").write_bytes(pickle.dumps(feats))
    with open(tmp_path / "s.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for i in range(12):
            w.writerow([i, i, f"video{i}", f"the digit {i % 10} moves up"])
    sizes = {"train": 4, "meta": 2, "val": 3, "test": 3}
    splits = efficiency._real_splits(
        str(tmp_path / "f.pkl"), str(tmp_path / "s.csv"), None, Tokenizer.for_digits(), sizes, 0
    )
    vids = {name: {r.video_id for r in splits[name].records} for name in sizes}
    assert {k: len(v) for k, v in vids.items()} == sizes
    assert len(set().union(*vids.values())) == 12  # disjoint
    sizes["test"] = 10
    with pytest.raises(ValueError, match="too few"):
        efficiency._real_splits(
            str(tmp_path / "f.pkl"), str(tmp_path / "s.csv"), None, Tokenizer.for_digits(), sizes, 0
        )
