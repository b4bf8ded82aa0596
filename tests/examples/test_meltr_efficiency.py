"""Smoke tests of the optimisation-efficiency benchmark (paper Table 8) in its tiny mode, and its MSRVTT route."""

from __future__ import annotations

import math

import pytest

import bilevel as bl
from benchmarks import efficiency

pytestmark = pytest.mark.usefixtures("one_thread")  # small runs: one thread is faster on a shared CPU


def test_tiny_table_has_all_rows(tmp_path):
    md = tmp_path / "results.md"
    md.write_text("# Results\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    res = efficiency.main(["--tiny", "--no-progress", "--results", str(md), "--peers", "none"])
    rows = res["rows"]
    shared = ["stocbio+shared", "aid-cg+shared", "aid-fp+shared", "aid-fp-lite+shared"]
    first_order = ["aid-fp-lite/fd+shared", "aid-fp-lite/fd-onesided+shared", "sama+shared"]
    assert [r["key"] for r in rows] == ["mtl", "itd", *shared, "aid-fp-lite", *first_order]
    assert rows[0]["overhead_pct"] == 0.0
    for r in rows:
        assert r["seconds_per_epoch"] > 0 and math.isfinite(r["overhead_pct"])
        assert 0.0 <= r["R@1"][0] <= 100.0
    for r in rows[1:]:
        assert r["hyper_steps"] == 1 and r["ms_per_hyper_step"]["total"] > 0
        assert ("linearize" in r["ms_per_hyper_step"]) == (r["key"] in ("aid-fp-lite",))  # ITD: no such stage
    assert rows[0]["hyper_steps"] == 0 and rows[0]["dR@1_vs_mtl"] is None
    for r in rows[1:]:  # paired with MTL's run of the same seed
        d = r["dR@1_vs_mtl"]
        assert d["n"] == 1 and d["diffs"] == [r["R@1"][0] - rows[0]["R@1"][0]] and d["wins"] == int(d["mean"] > 0)
    by_key = {r["key"]: r for r in rows}
    lite = ("aid-fp-lite", "aid-fp-lite+shared", "aid-fp-lite/fd+shared", "aid-fp-lite/fd-onesided+shared")
    for key in lite:  # the paper's AID-FP-Lite figure
        assert by_key[key]["paper"] == efficiency.PAPER["aid-fp-lite"]
    assert by_key["sama+shared"]["paper"] is None  # not in the paper
    assert res["meta"]["sizes"] == efficiency.TINY_SIZES and res["meta"]["lr"] == efficiency.LR
    assert "testbed target domain (train 16 / meta 8 / val 8 / test 8 clips)" in res["meta"]["setting"]
    # HVP counts: AID-FP-Lite and ITD need none, AID-FP / StocBiO use all 3
    text = efficiency.markdown(rows, "cmd", res["meta"])
    for label, *_ in efficiency.ROWS:
        assert f"| {label} |" in text
    assert "| dR@1 vs MTL (paired; wins) |" in text and ("(0/1) |" in text or "(1/1) |" in text)
    efficiency.write_section(md, text)
    out = md.read_text()
    assert "keep me" in out and out.count(efficiency.BEGIN) == 1 and "| MELTR + AID-FP-Lite (shared) |" in out
    efficiency.write_section(md, "again")
    assert md.read_text().count(efficiency.BEGIN) == 1 and "again" in md.read_text()


def test_tiny_never_writes_docs(monkeypatch, tmp_path):
    """--tiny without --no-write still writes neither docs/results.md nor the PNG (nor --results)."""

    def boom(*a, **k):
        raise AssertionError("--tiny wrote docs")

    monkeypatch.setattr(efficiency, "write_section", boom)
    monkeypatch.setattr(efficiency, "plot", boom)
    md = tmp_path / "results.md"
    res = efficiency.main(["--tiny", "--no-progress", "--peers", "none", "--results", str(md), "--seeds", "2"])
    assert not md.exists()
    raw = res["raw"]
    for r in res["rows"][1:]:  # the paired difference pairs each seed with MTL's run of that seed
        want = [raw[r["key"]][i]["test"]["R@1"] - raw["mtl"][i]["test"]["R@1"] for i in range(2)]
        assert r["dR@1_vs_mtl"]["diffs"] == want and r["dR@1_vs_mtl"]["n"] == 2


def test_paired_difference_and_defaults():
    def runs(*r1):
        return [{"test": {"R@1": x}} for x in r1]

    d = efficiency.paired_diff(runs(3.0, 5.0, 4.0), runs(2.0, 6.0, 4.0))
    assert d["diffs"] == [1.0, -1.0, 0.0] and d["mean"] == 0.0 and d["std"] == 1.0 and (d["wins"], d["n"]) == (1, 3)
    with pytest.raises(ValueError, match="same seeds"):
        efficiency.paired_diff(runs(1.0), runs(1.0, 2.0))
    # the defaults: the testbed's target splits, the shipped backbone, 2 seeds, lr 1e-3; --full 5 x 40
    from examples.meltr_video.finetune import SHIPPED_CHECKPOINT

    assert efficiency.SIZES == {"train": 256, "meta": 64, "val": 250, "test": 1000}
    assert efficiency.DEFAULT["seeds"] == 2 and efficiency.FULL == {"seeds": 5, "epochs": 40}
    assert efficiency.LR == 1e-3 and SHIPPED_CHECKPOINT.is_file()
    assert "YouCook2" not in efficiency.__doc__ and "MSRVTT-7k" in efficiency.__doc__


def test_no_share_runs_every_row_once_unshared():
    rows = efficiency.no_share(efficiency.ROWS)
    solvers = ["aid-fp-lite", "itd", "stocbio", "aid-cg", "aid-fp", *["aid-fp-lite"] * 3, "sama"]
    assert [r[2] for r in rows] == solvers
    assert [r[4] for r in rows][-3:] == ["fd", "fd-onesided", "autograd"]  # the fd modes stay rows of their own
    assert not any(r[3] for r in rows) and [r[0] for r in rows[3:5]] == ["MELTR + AID-CG", "MELTR + AID-FP (Neumann)"]
    labels = ["MELTR + AID-FP-Lite (fd)", "MELTR + AID-FP-Lite (fd-onesided)", "MELTR + SAMA"]
    assert [r[0] for r in rows[-3:]] == labels


def test_write_section_keeps_notes(tmp_path):
    md = tmp_path / "r.md"
    efficiency.write_section(md, "table v1")
    text = md.read_text().replace(efficiency.END, f"{efficiency.NOTES}\nmy analysis\n{efficiency.END}")
    md.write_text(text)
    efficiency.write_section(md, "table v2")
    out = md.read_text()
    assert "table v2" in out and "table v1" not in out and "my analysis" in out
    assert out.index("table v2") < out.index("my analysis") < out.index(efficiency.END)


def _msrvtt_files(tmp_path, n_train=12, n_test=4, captions=3, frames=(5, 20)):
    """Small MSRVTT files in UniVL's layouts: features pickle, MSRVTT_train.7k.csv, MSRVTT_data.json and
    MSRVTT_JSFUSION_test.csv. Training videos video0.., test videos after them; ``captions`` per training video."""
    import csv
    import json
    import pickle

    import numpy as np

    vids = [f"video{i}" for i in range(n_train + n_test)]
    rng = np.random.default_rng(0)
    feats = {v: rng.standard_normal((frames[i % 2], 1024)).astype(np.float32) for i, v in enumerate(vids)}
    (tmp_path / "msrvtt_videos_features.pickle").write_bytes(pickle.dumps(feats))
    with open(tmp_path / "MSRVTT_train.7k.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id"])
        w.writerows([v] for v in vids[:n_train])
    sentences = [
        {"caption": f"a person talks about {v} take {j}", "video_id": v, "sen_id": k * captions + j}
        for k, v in enumerate(vids)
        for j in range(captions)
    ]
    videos = [{"video_id": v, "category": 0, "id": k} for k, v in enumerate(vids)]
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    with open(tmp_path / "MSRVTT_JSFUSION_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, v in enumerate(vids[n_train:]):
            w.writerow([f"ret{k}", f"msr{v[5:]}", v, f"a cat plays the piano in {v}"])
    names = ("msrvtt_videos_features.pickle", "MSRVTT_train.7k.csv", "MSRVTT_data.json", "MSRVTT_JSFUSION_test.csv")
    return [str(tmp_path / n) for n in names]


def test_msrvtt_splits_by_video(tmp_path):
    """``--data msrvtt``: meta and val are carved from the training CSV's videos (all captions of a video in one
    split, disjoint), the test split is the JSFusion file's pairs, the vocabulary is the backbone's."""
    from examples.meltr_video.data import msrvtt_splits
    from examples.meltr_video.testbed import testbed_tokenizer

    files = _msrvtt_files(tmp_path)
    tok = testbed_tokenizer()
    d = msrvtt_splits(*files, meta_videos=2, val_videos=3, seed=0, tokenizer=tok, max_frames=16)
    vids = {name: {r.video_id for r in d[name].records} for name in efficiency.SPLITS}
    assert {k: len(v) for k, v in vids.items()} == {"train": 7, "meta": 2, "val": 3, "test": 4}
    train_side = [vids[k] for k in ("train", "meta", "val")]
    assert set().union(*train_side) == {f"video{i}" for i in range(12)}
    assert sum(map(len, train_side)) == 12  # disjoint by video
    for name in ("train", "meta", "val"):  # every caption of each of its videos, from the JSON
        assert len(d[name]) == 3 * len(vids[name])
        assert all(r.caption.startswith(f"a person talks about {r.video_id} ") for r in d[name].records)
    assert [(r.video_id, r.caption) for r in d["test"].records] == [
        (f"video{i}", f"a cat plays the piano in video{i}") for i in range(12, 16)
    ]
    assert d.tokenizer is tok
    assert max(r.features.shape[0] for name in efficiency.SPLITS for r in d[name].records) == 16  # 20 -> 16
    assert {r.features.shape[0] for r in d["test"].records} == {5, 16}
    again = msrvtt_splits(*files, meta_videos=2, val_videos=3, seed=0, tokenizer=tok)
    assert {r.video_id for r in again["val"].records} == vids["val"]  # seeded
    other = msrvtt_splits(*files, meta_videos=2, val_videos=3, seed=1, tokenizer=tok)
    assert [{r.video_id for r in other[k].records} for k in ("meta", "val")] != [vids["meta"], vids["val"]]
    capped = msrvtt_splits(*files, meta_videos=2, val_videos=3, train_videos=4, tokenizer=tok)
    assert len({r.video_id for r in capped["train"].records}) == 4
    for k in ("meta", "val"):  # the cap does not move meta / val
        assert [(r.video_id, r.caption) for r in capped[k].records] == [(r.video_id, r.caption) for r in d[k].records]
    own = msrvtt_splits(*files, meta_videos=2, val_videos=3).tokenizer  # no tokenizer: train's words
    assert "talks" in own.ids and "piano" not in own.ids
    assert tok.encode("a person talks")[1:] == [tok.unk_id, tok.unk_id]  # the testbed's vocabulary: [UNK]


def test_msrvtt_splits_errors(tmp_path):
    import csv

    from examples.meltr_video.data import msrvtt_splits

    feats, train, js, test = _msrvtt_files(tmp_path)
    with pytest.raises(ValueError, match=r"MSRVTT_train\.7k\.csv: only 12 training videos, too few"):
        msrvtt_splits(feats, train, js, test, meta_videos=6, val_videos=6)
    with pytest.raises(ValueError, match=r"MSRVTT_train\.7k\.csv: only 12 training videos.*\+ 5 training"):
        msrvtt_splits(feats, train, js, test, meta_videos=4, val_videos=4, train_videos=5)
    with pytest.raises(ValueError, match="meta_videos must be an int >= 0"):
        msrvtt_splits(feats, train, js, test, meta_videos=-1, val_videos=2)
    with pytest.raises(ValueError, match="captions JSON"):
        msrvtt_splits(feats, train, None, test, meta_videos=2, val_videos=2)
    with open(tmp_path / "leaky_test.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "vid_key", "video_id", "sentence"])
        w.writerow(["ret0", "msr3", "video3", "a training video in the test file"])
    with pytest.raises(ValueError, match=r"leaky_test\.csv: 1 test video\(s\) are also in the training file"):
        msrvtt_splits(feats, train, js, str(tmp_path / "leaky_test.csv"), meta_videos=2, val_videos=2)


def test_msrvtt_route_runs_tiny(tmp_path):
    """``main --data msrvtt`` on the small files: every row runs, the meta / val sizes are videos."""
    feats, train, js, test = _msrvtt_files(tmp_path, n_train=16, captions=2)
    argv = ["--tiny", "--no-progress", "--peers", "none", "--data", "msrvtt", "--features", feats]
    argv += ["--train-csv", train, "--json", js, "--test-csv", test, "--meta-size", "2", "--val-size", "4"]
    res = efficiency.main(argv)
    assert res["meta"]["sizes"] == {"train": 20, "meta": 4, "val": 8, "test": 4}
    assert res["rows"][0]["key"] == "mtl" and "MSRVTT features" in res["meta"]["setting"]
    with pytest.raises(SystemExit):
        efficiency.main(["--tiny", "--data", "msrvtt", "--features", feats])  # no --train-csv / --test-csv


def test_peer_rows_in_the_same_loop(tmp_path):
    """--peers adds rows run by torchopt / betty through PeerSolver, with no paper figure."""
    from benchmarks.peers import available

    have = available()
    if have["torchopt"] is None or have["betty"] is None:
        pytest.skip("torchopt and betty-ml are not installed (scripts/install_peers.sh)")
    md = tmp_path / "results.md"
    res = efficiency.main(["--tiny", "--no-progress", "--peers", "torchopt:cg,betty:neumann"])
    rows = res["rows"]
    assert [r["key"] for r in rows][-2:] == ["torchopt:cg", "betty:neumann"]
    for r in rows[-2:]:
        assert r["paper"] is None and r["hyper_steps"] == 1 and math.isfinite(r["overhead_pct"])
    text = efficiency.markdown(rows, "cmd", res["meta"])
    assert "| - | - | - |" in text and "torchopt" in text
    efficiency.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    efficiency.plot(rows, tmp_path / "q.png", data="msrvtt")
    assert (tmp_path / "q.png").stat().st_size > 0
    assert not md.exists()


def test_peer_spec_errors():
    with pytest.raises(ValueError, match="unknown peer solver"):
        efficiency.peer_rows("torchopt:magic")
    assert efficiency.peer_rows("none") == ([], [])


def test_peer_solver_matches_ours_on_meltr(tiny_meltr_args):
    """torchopt's and betty's Neumann equal AID-FP on a MELTR problem (float64); betty's CG does not equal CG."""
    from benchmarks.peers import available, parse_peer_solver
    from examples.meltr_video.finetune import make_solver

    have = available()
    args = tiny_meltr_args
    # the peers' plain series (no divergence test; ours stops at the first growing term, off the minimiser)
    ref = bl.AID(solve=bl.linalg.neumann(3, 0.01, "ignore", growth_tol=None)).hypergrad(*args)
    norm = sum(float((v**2).sum()) for v in ref.values()) ** 0.5
    tested = 0
    for name in ("torchopt:neumann", "betty:neumann"):
        if have[name.split(":")[0]] is None:
            continue
        hg = parse_peer_solver(name, 3, 0.01).hypergrad(*args)
        err = sum(float(((hg[k] - ref[k]) ** 2).sum()) for k in ref) ** 0.5
        assert err <= 1e-10 * norm, name
        tested += 1
    if not tested:
        pytest.skip("no peer installed")
    with pytest.raises(ValueError, match="unknown solver 'torchopt'"):
        make_solver("torchopt", 3, 0.01)
    with pytest.raises(ValueError, match=r"is a peer library's: build it with benchmarks\.peers"):
        make_solver("torchopt:cg", 3, 0.01)  # the examples do not import the benchmarks
    with pytest.raises(ValueError, match="no method"):
        parse_peer_solver("higher:cg", 3, 0.01)


def test_bad_arguments_fail_before_any_work(capsys):
    """Every argument is checked before the backbone is loaded: an argparse one-line error, exit code 2."""
    for argv, msg in (
        (["--K", "0"], "--K must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--seeds", "-2"], "--seeds must be >= 1"),
        (["--iters", "-1"], "--iters must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--tiny", "--write"], "--tiny never writes docs/"),
    ):
        with pytest.raises(SystemExit) as exc:
            efficiency.main([*argv, "--peers", "none"])
        assert exc.value.code == 2 and msg in capsys.readouterr().err
