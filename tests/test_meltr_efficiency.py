"""Smoke test of the optimisation-efficiency benchmark (paper Table 8) in its tiny mode."""

from __future__ import annotations

import math

import pytest

from benchmarks import efficiency

pytestmark = pytest.mark.usefixtures("one_thread")  # small runs: one thread is faster on a shared CPU


def test_tiny_table_has_all_rows(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# Results\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    res = efficiency.main(["--tiny", "--no-progress", "--results", str(md), "--no-write", "--peers", "none"])
    rows = res["rows"]
    shared = ["stocbio+shared", "aid-cg+shared", "aid-fp+shared", "aid-fp-lite+shared"]
    assert [r["key"] for r in rows] == ["mtl", "itd", *shared, "aid-fp-lite"]
    assert rows[0]["overhead_pct"] == 0.0
    for r in rows:
        assert r["seconds_per_epoch"] > 0 and math.isfinite(r["overhead_pct"])
        assert 0.0 <= r["R@1"][0] <= 100.0
    for r in rows[1:]:
        assert r["hyper_steps"] == 1 and r["ms_per_hyper_step"]["total"] > 0
        assert ("linearize" in r["ms_per_hyper_step"]) == (r["key"] in ("aid-fp-lite",))  # ITD: no such stage
    assert rows[0]["hyper_steps"] == 0
    assert rows[-1]["paper"] == rows[-2]["paper"] == efficiency.PAPER["aid-fp-lite"]
    # HVP counts: AID-FP-Lite and ITD need none, AID-FP / StocBiO use all 3
    text = efficiency.markdown(rows, "cmd", res["meta"])
    for label, *_ in efficiency.ROWS:
        assert f"| {label} |" in text
    efficiency.write_section(md, text)
    out = md.read_text()
    assert "keep me" in out and out.count(efficiency.BEGIN) == 1 and "| MELTR + AID-FP-Lite (shared) |" in out
    efficiency.write_section(md, "again")
    assert md.read_text().count(efficiency.BEGIN) == 1 and "again" in md.read_text()


def test_no_share_runs_every_row_once_unshared():
    rows = efficiency.no_share(efficiency.ROWS)
    assert [r[2] for r in rows] == ["aid-fp-lite", "itd", "stocbio", "aid-cg", "aid-fp", "aid-fp-lite"]
    assert not any(r[3] for r in rows) and [r[0] for r in rows[3:5]] == ["MELTR + AID-CG", "MELTR + AID-FP (Neumann)"]


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


def test_peer_rows_in_the_same_loop(tmp_path):
    """--peers adds rows run by torchopt / betty through PeerSolver, with no paper figure."""
    from benchmarks.peers import available

    have = available()
    if have["torchopt"] is None or have["betty"] is None:
        pytest.skip("torchopt and betty-ml are not installed (scripts/install_peers.sh)")
    md = tmp_path / "results.md"
    res = efficiency.main(["--tiny", "--no-progress", "--no-write", "--peers", "torchopt:cg,betty:neumann"])
    rows = res["rows"]
    assert [r["key"] for r in rows][-2:] == ["torchopt:cg", "betty:neumann"]
    for r in rows[-2:]:
        assert r["paper"] is None and r["hyper_steps"] == 1 and math.isfinite(r["overhead_pct"])
    text = efficiency.markdown(rows, "cmd", res["meta"])
    assert "| - | - | - |" in text and "torchopt" in text
    efficiency.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert not md.exists()


def test_peer_spec_errors():
    with pytest.raises(ValueError, match="unknown peer solver"):
        efficiency.peer_rows("torchopt:magic")
    assert efficiency.peer_rows("none") == ([], [])


def test_peer_solver_matches_ours_on_meltr():
    """torchopt's and betty's Neumann equal AID-FP on a MELTR problem (float64); betty's CG does not equal CG."""
    from benchmarks.peers import available
    from examples.meltr_video.data import Collate, Tokenizer, make_digit_clips
    from examples.meltr_video.finetune import make_solver
    from examples.meltr_video.meltr import MELTR, MELTRObjectives
    from examples.meltr_video.univl import LOSS_NAMES, UniVL, UniVLConfig

    have = available()
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tok = Tokenizer.for_digits()
    cfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
    obj = MELTRObjectives(
        UniVL(cfg).double(), MELTR(LOSS_NAMES, hidden=8, d_model=16, ff=16, nhead=2).double(), "alignment"
    )
    d = make_digit_clips(0, sizes={"train": 4, "meta": 4})
    c = Collate(tok)

    def batch(split):
        b = c([d[split][i] for i in range(4)])
        return {k: v.double() if v.is_floating_point() else v for k, v in b.items()}

    args = (obj.problem(), obj.params, obj.hparams, batch("train"), batch("meta"))
    ref = make_solver("aid-fp", 3, 0.01).hypergrad(*args)
    norm = sum(float((v**2).sum()) for v in ref.values()) ** 0.5
    tested = 0
    for name in ("torchopt:neumann", "betty:neumann"):
        if have[name.split(":")[0]] is None:
            continue
        hg = make_solver(name, 3, 0.01).hypergrad(*args)
        err = sum(float(((hg[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
        assert err <= 1e-10 * norm, name
        tested += 1
    if not tested:
        pytest.skip("no peer installed")
    with pytest.raises(ValueError, match="PEER:METHOD"):
        make_solver("torchopt", 3, 0.01)
    with pytest.raises(ValueError, match="no method"):
        make_solver("higher:cg", 3, 0.01)


def test_console_entry_point(monkeypatch):
    """`bilevel-table8` is installed (pip install -e .) and forwards its arguments to benchmarks.efficiency."""
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "bilevel-table8"]
    assert eps and eps[0].value == "bilevel._table8:main"
    seen = {}
    monkeypatch.setattr(efficiency, "main", lambda argv: seen.setdefault("argv", argv))
    assert eps[0].load()(["--tiny", "--peers", "none"]) == 0
    assert seen["argv"] == ["--tiny", "--peers", "none"]
