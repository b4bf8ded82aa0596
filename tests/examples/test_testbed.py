"""The MELTR testbed: frame encoder, domain-shifted splits, exact all-pair scores, every method, paired comparison."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.meltr_video.data import _digits
from examples.meltr_video.features import (
    EncoderSettings,
    FrameEncoder,
    encode_frames,
    frame_encoder,
    train_frame_encoder,
)
from examples.meltr_video.finetune import FinetuneConfig, FinetuneRun, parse_weights
from examples.meltr_video.testbed import (
    SOURCE_SPLITS,
    TARGET_ONLY_WORDS,
    TARGET_SPLITS,
    make_testbed,
)
from examples.meltr_video.testbed import testbed_tokenizer as vocabulary
from examples.meltr_video.univl import UniVL, UniVLConfig

SMALL = {"pretrain": 40, "pretrain_val": 20, "train": 24, "meta": 16, "val": 20, "test": 60}
FAST = EncoderSettings(epochs=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def bed(cache: str):
    return make_testbed(0, sizes=SMALL, cache_dir=cache)


@pytest.fixture(scope="module")
def tiny_pre():
    """A random tiny UniVL with the testbed vocabulary: (state, config, tokenizer)."""
    tok = vocabulary()
    torch.manual_seed(0)
    cfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
    return UniVL(cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id).state_dict(), cfg, tok


# ------------------------------------------------------------------------------------ features


def test_frame_encoder_deterministic_and_shaped():
    images, labels = _digits()
    a = train_frame_encoder(images[:200], labels[:200], FAST)
    b = train_frame_encoder(images[:200], labels[:200], FAST)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    frames = np.random.default_rng(0).random((3, 5, 32, 32), dtype=np.float32)
    f = encode_frames(a, frames)
    assert f.shape == (3, 5, 1024) and f.dtype == np.float32
    assert np.array_equal(f, encode_frames(b, frames))


def test_features_keep_identity_and_position():
    """A digit moved to another cell changes the features; the same digit in the same cell barely does."""
    images, labels = _digits()
    enc = train_frame_encoder(images[:300], labels[:300], EncoderSettings(epochs=8))
    img = images[300]

    def frame(r: int, c: int) -> np.ndarray:
        x = np.zeros((32, 32), np.float32)
        x[r : r + 8, c : c + 8] = img
        return x

    f = encode_frames(enc, np.stack([frame(0, 0), frame(1, 1), frame(20, 20)]))
    near, far = np.linalg.norm(f[0] - f[1]), np.linalg.norm(f[0] - f[2])
    assert far > 3 * near
    cells = f.reshape(3, 64, 4, 4)
    assert cells[2, :, 0, 0].max() == 0 or cells[2, :, 0, 0].max() < cells[0, :, 0, 0].max() / 2


def test_frame_encoder_cache_roundtrip_and_corruption(tmp_path):
    images, labels = _digits()
    a = frame_encoder(images[:100], labels[:100], FAST, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    b = frame_encoder(images[:100], labels[:100], FAST, cache_dir=tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    npz = next(tmp_path.glob("*.npz"))
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=str(npz.name)):
        c = frame_encoder(images[:100], labels[:100], FAST, cache_dir=tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next call reads the cache without a warning
        frame_encoder(images[:100], labels[:100], FAST, cache_dir=tmp_path)


def test_frame_encoder_rejects_bad_images():
    with pytest.raises(ValueError, match=r"\[N, 8, 8\]"):
        train_frame_encoder(np.zeros((4, 16, 16), np.float32), np.zeros(4, int), FAST)
    assert isinstance(FrameEncoder()(torch.zeros(2, 16, 16)), torch.Tensor)


# -------------------------------------------------------------------------------------- splits


def test_splits_shapes_and_determinism(bed, cache):
    assert set(bed.splits) == set(SMALL)
    for name, n in SMALL.items():
        ds = bed[name]
        assert len(ds) == n
        assert all(r.features.shape == (8, 1024) and r.features.dtype == np.float32 for r in ds.records)
    again = make_testbed(0, sizes=SMALL, cache_dir=cache)
    for name in SMALL:
        assert bed[name].captions == again[name].captions
        assert all(
            np.array_equal(a.features, b.features) for a, b in zip(bed[name].records, again[name].records, strict=True)
        )


def test_domains_differ_in_content(bed):
    for name in SOURCE_SPLITS:
        for r in bed[name].records:
            assert r.info["style"] == "source" and len(r.info["digits"]) == 1 and r.info["distractor"] is None
    for name in TARGET_SPLITS:
        infos = [r.info for r in bed[name].records]
        assert all(i["style"] == "target" and len(i["digits"]) == 2 for i in infos)
        assert all(i["digits"][0] != i["digits"][1] for i in infos)
    assert any(r.info["distractor"] is not None for r in bed["test"].records)


def test_handwriting_pools_disjoint(bed):
    used = {name: {k for r in bed[name].records for k in r.info["images"]} for name in SMALL}
    pools = [{"pretrain"}, {"pretrain_val"}, {"train", "meta"}, {"val"}, {"test"}]
    for i, a in enumerate(pools):
        for b in pools[i + 1 :]:
            ia = set().union(*(used[n] for n in a))
            ib = set().union(*(used[n] for n in b))
            assert not ia & ib, (a, b)


def test_vocabulary_shift(bed):
    tok = bed.tokenizer
    source_words = {w for n in SOURCE_SPLITS for c in bed[n].captions for w in tok.split(c)}
    target_words = {w for n in TARGET_SPLITS for c in bed[n].captions for w in tok.split(c)}
    assert not source_words & set(TARGET_ONLY_WORDS)
    assert set(TARGET_ONLY_WORDS) <= target_words | {"travels", "slides", "drifts", "glides"}
    for n in TARGET_SPLITS:
        for c in bed[n].captions:
            assert {"leftward", "rightward", "upward", "downward"} & set(tok.split(c)), c
    assert all(tok.unk_id not in tok.encode(c) for n in SMALL for c in bed[n].captions)


def test_captions_unique_and_faithful(bed):
    from examples.meltr_video.data import DIGIT_WORDS

    target = [c for n in TARGET_SPLITS for c in bed[n].captions]
    assert len(set(target)) == len(target)
    assert len(set(bed["pretrain_val"].captions)) == len(bed["pretrain_val"])
    for r in bed["test"].records:
        words = r.caption.split()
        for d in r.info["digits"]:
            assert DIGIT_WORDS[d] in words


def test_default_test_gallery_size():
    from examples.meltr_video.testbed import TESTBED_SIZES

    assert TESTBED_SIZES["test"] >= 1000 and TESTBED_SIZES["train"] + TESTBED_SIZES["meta"] <= 320


def test_make_testbed_rejects_bad_input(cache):
    with pytest.raises(ValueError, match="unknown split"):
        make_testbed(0, sizes={"holdout": 3}, cache_dir=cache)
    with pytest.raises(ValueError, match="non-negative int"):
        make_testbed(0, sizes={"test": -1}, cache_dir=cache)
    with pytest.raises(ValueError, match="features"):
        make_testbed(0, sizes={"test": 2}, features="s3d", cache_dir=cache)


def test_pixels_option_keeps_frames(cache):
    d = make_testbed(0, sizes={"test": 4}, features="pixels", keep_frames=True, cache_dir=cache)
    ds = d["test"]
    assert ds.frames.shape == (4, 8, 32, 32)
    assert np.array_equal(ds.records[0].features, ds.frames[0].reshape(8, 1024))


# -------------------------------------------------------------------------- all-pair scores


def test_all_pair_scores_equal_the_per_pair_encoder():
    torch.manual_seed(0)
    m = UniVL(UniVLConfig.tiny(40, hidden=32, heads=4, ff=48)).double().eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    text = torch.randint(7, 40, (9, 12))
    tm = torch.ones(9, 12, dtype=torch.bool)
    for i in range(9):
        tm[i, 3 + i :] = False
    video = torch.randn(11, 6, 1024, dtype=torch.float64)
    vm = torch.ones(11, 6, dtype=torch.bool)
    vm[::2, 4:] = False
    with torch.no_grad():
        t, v = m.text(text, tm), m.video(video, vm)
        ref = m.cross_scores(t, tm, v, vm)
        fast = m.cross.all_pair_scores(t, tm, v, vm, rows=4)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    m.train()
    assert not m.cross.can_score_all_pairs()
    with pytest.raises(ValueError, match="eval mode"):
        m.cross.all_pair_scores(t, tm, v, vm)


# --------------------------------------------------------------------------------- methods


METHOD_CASES = [
    {"method": "single"},
    {"method": "mtl"},
    {"method": "mtl", "train_on_meta": True},
    {"method": "weighted", "weights": {"alignment": 1.0, "decoder": 0.5}},
    *({"method": "meltr", "solver": s} for s in ("aid-fp-lite", "aid-cg", "aid-fp", "itd", "stocbio")),
]


@pytest.mark.parametrize("over", METHOD_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_method_runs_a_few_steps(bed, tiny_pre, over):
    sizes = {k: SMALL[k] for k in TARGET_SPLITS}
    cfg = FinetuneConfig(epochs=1, batch_size=8, sizes=sizes, progress=False, pretrained="-", **over)
    run = FinetuneRun(cfg, bed, tiny_pre)
    before = {k: v.clone() for k, v in run.backbone.state_dict().items()}
    rec = run.run_epoch()
    res = run.finish()
    steps = (SMALL["train"] + (SMALL["meta"] if over.get("train_on_meta") else 0)) // 8
    assert rec["inner_updates"] == steps
    assert any(not torch.equal(before[k], v) for k, v in run.backbone.state_dict().items())
    assert 0 <= res["test"]["R@1"] <= 100
    if over["method"] == "meltr":
        assert rec["hyper_steps"] >= 1 and res["response"]["curves"]


def test_weighted_and_train_on_meta_validation(bed, tiny_pre):
    with pytest.raises(ValueError, match="unknown loss"):
        FinetuneConfig(method="weighted", weights={"vtm": 1.0})
    with pytest.raises(ValueError, match="at least one > 0"):
        FinetuneConfig(method="weighted", weights={"alignment": 0.0})
    with pytest.raises(ValueError, match="method='weighted'"):
        FinetuneConfig(method="mtl", weights={"alignment": 1.0})
    with pytest.raises(ValueError, match="train_on_meta"):
        FinetuneConfig(method="meltr", train_on_meta=True)
    assert parse_weights("alignment=1, decoder=0.5") == {"alignment": 1.0, "decoder": 0.5}
    with pytest.raises(ValueError, match="name=value"):
        parse_weights("alignment")
    assert FinetuneConfig(method="weighted", weights={"alignment": 1, "decoder": 0.5}).name == (
        "weighted[alignment=1,decoder=0.5]"
    )


def test_testbed_is_the_default_for_univl_retrieval_and_refuses_violet():
    cfg = FinetuneConfig()
    assert cfg.data == "testbed" and cfg.sizes["test"] >= 1000 and cfg.max_words == 24
    assert FinetuneConfig(backbone="violet", task="retrieval").data == "digits"
    with pytest.raises(ValueError, match="data='digits' only"):
        FinetuneConfig(backbone="violet", task="retrieval", data="testbed")


def test_vocabulary_mismatch_is_refused(bed):
    from examples.meltr_video.data import Tokenizer

    tok = Tokenizer.for_digits()
    cfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
    pre = (UniVL(cfg).state_dict(), cfg, tok)
    with pytest.raises(ValueError, match="another vocabulary"):
        FinetuneRun(FinetuneConfig(sizes={k: SMALL[k] for k in TARGET_SPLITS}, batch_size=8, progress=False), bed, pre)


# ----------------------------------------------------------------------- paired comparison


def test_paired_and_seeds():
    from examples.meltr_video.results import paired, parse_seeds

    p = paired([3.0, 5.0, 4.0], [1.0, 5.0, 5.0])
    assert p == {"mean": pytest.approx(1 / 3), "std": pytest.approx(np.std([2, 0, -1], ddof=1)), "wins": 1,
                 "ties": 1, "n": 3}  # fmt: skip
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("0,4") == [0, 4] and parse_seeds("2-4") == [2, 3, 4]
    for bad in ("0", "a", "1,1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    with pytest.raises(ValueError):
        paired([1.0], [])


def test_run_comparison_small(tmp_path, bed, tiny_pre, monkeypatch):
    """Two lr values, two seeds: per-row search, the 'least' weighting from MELTR's search run (never the
    primary), paired differences, JSON-ready output, and cached runs read back."""
    from examples.meltr_video import results as R
    from examples.meltr_video.pretrain import save_checkpoint

    state, cfg, tok = tiny_pre
    ck = tmp_path / "pre.pt"
    save_checkpoint({"model": state, "config": cfg.to_dict(), "vocab": tok.vocab, "meta": {"val_after": {}}}, ck)
    monkeypatch.setattr("examples.meltr_video.testbed.make_testbed", lambda *a, **k: bed)
    rows = [r for r in R.default_rows("univl", "retrieval") if r[0] in ("single", "mtl", "MELTR AID-FP-Lite")]
    rows.append(("all but MELTR's least", {"method": "weighted", "weights": "least"}))
    base = {"task": "retrieval", "backbone": "univl", "epochs": 1, "pretrained": str(ck), "data": "testbed",
            "batch_size": 8, "sizes": {k: SMALL[k] for k in TARGET_SPLITS}}  # fmt: skip
    rec = R.run_comparison(rows, [0, 1], base, [1e-3, 2e-3], tmp_path / "runs", progress=False)
    assert list(rec["rows"]) == [label for label, _ in rows]
    for row in rec["rows"].values():
        assert set(row["search"]) == {"0.001", "0.002"} and row["lr"] in (1e-3, 2e-3)
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert row["vs_mtl"]["n"] == 2
    assert rec["rows"]["mtl"]["vs_mtl"]["mean"] == 0.0
    w = rec["rows"]["all but MELTR's least"]["overrides"]["weights"]
    assert w["alignment"] == 1.0 and sorted(w.values()).count(0.0) == 1
    json.dumps(rec)
    text = R.markdown(rec, "cmd")
    assert "pretrained, not fine-tuned" in text and "ΔR@1 vs MTL" in text
    again = R.run_comparison(rows[:1], [0, 1], base, [1e-3, 2e-3], tmp_path / "runs", progress=False)
    assert again["rows"]["single"]["runs"] == rec["rows"]["single"]["runs"]  # read back from the cache
    assert R.plot(rec, tmp_path / "p.png").exists()

    # --reuse: a fresh cache directory, every run taken from the record written above, nothing trained
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    records = R.load_records([tmp_path / "rec.json"])

    def no_training(*a, **k):
        raise AssertionError("a reused run was trained again")

    monkeypatch.setattr(R, "_run", no_training)
    reused = R.run_comparison(rows, [0, 1], base, [1e-3, 2e-3], tmp_path / "fresh", progress=False, reuse=records)
    for label, row in rec["rows"].items():
        assert reused["rows"][label]["runs"] == row["runs"] and reused["rows"][label]["lr"] == row["lr"]
        assert reused["rows"][label]["reused_from"] == str(tmp_path / "rec.json")
        assert reused["rows"][label]["vs_mtl"] == row["vs_mtl"]
    # other settings (epochs, grid, a seed the record lacks) are not taken from it: they would be trained
    for kw in ({"base": {**base, "epochs": 2}}, {"lr_grid": [1e-3, 5e-3]}, {"seeds": [0, 2]}):
        args = {"rows": rows[:1], "seeds": [0, 1], "base": base, "lr_grid": [1e-3, 2e-3]} | kw
        with pytest.raises(AssertionError, match="trained again"):
            R.run_comparison(**args, out_root=tmp_path / "fresh", progress=False, reuse=records)
    old_rec = json.loads(json.dumps(rec))
    del old_rec["base"]["eval_threads"]  # a record written before the field existed: reused all the same
    (tmp_path / "old.json").write_text(json.dumps(old_rec))
    again = R.run_comparison(
        rows[:1], [0, 1], base, [1e-3, 2e-3], tmp_path / "fresh", progress=False,
        reuse=R.load_records([tmp_path / "old.json"]),
    )  # fmt: skip
    assert again["rows"]["single"]["runs"] == rec["rows"]["single"]["runs"]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        R.load_records([tmp_path / "bad.json"])


def test_pretrain_on_the_testbed_is_deterministic(tmp_path, monkeypatch, cache):
    from examples.meltr_video import pretrain as P

    real = P.make_testbed
    monkeypatch.setattr(P, "make_testbed", lambda seed, sizes: real(seed, sizes=sizes, cache_dir=cache))
    kw = dict(epochs=1, max_steps=3, pretrain_size=32, val_size=8, progress=False, batch_size=8)
    P.pretrain(out=tmp_path / "a.pt", **kw)
    P.pretrain(out=tmp_path / "b.pt", **kw)
    a, _, meta = P.load_pretrained(tmp_path / "a.pt")
    b, _, _ = P.load_pretrained(tmp_path / "b.pt")
    assert meta["settings"]["data"] == "testbed"
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_shipped_checkpoint_loads_with_the_testbed_vocabulary():
    from examples.meltr_video.finetune import SHIPPED_CHECKPOINT
    from examples.meltr_video.pretrain import load_pretrained

    _, tok, meta = load_pretrained(SHIPPED_CHECKPOINT)
    assert tok.vocab == vocabulary().vocab
    assert meta["settings"]["data"] == "testbed" and meta["val_after"]["R@1"] >= 30
    assert SHIPPED_CHECKPOINT.stat().st_size < 10 * 2**20


def test_initial_meltr_weights(bed, monkeypatch):
    """The analysis of MELTR before any hyper step: one row per seed, 8 finite weights, outputs differ by seed."""
    from examples.meltr_video import analysis

    monkeypatch.setattr("examples.meltr_video.testbed.make_testbed", lambda *a, **k: bed)
    rows = analysis.initial_weights([0, 1], batch_size=8)
    assert [r["seed"] for r in rows] == [0, 1]
    for r in rows:
        assert len(r["weights"]) == 8 and all(np.isfinite(list(r["weights"].values())))
    assert rows[0]["L_aux"] != rows[1]["L_aux"] and rows[0]["losses"] == rows[1]["losses"]


def test_cached_run_is_read_back_only_when_finished(tmp_path, monkeypatch):
    """results.json is rewritten after every epoch: a run stopped part-way (fewer epochs, or no test read) is
    trained again, not read back as finished."""
    from dataclasses import asdict

    from examples.meltr_video import results as R
    from examples.meltr_video.finetune import FinetuneConfig

    cfg = FinetuneConfig(epochs=3, out=str(tmp_path / "run"), progress=False, eval_test=False)
    (tmp_path / "run").mkdir()
    rec = {"config": asdict(cfg), "epochs": [{"epoch": 1}, {"epoch": 2}], "best_val": {"R@1": 1.0}, "test": None}
    (tmp_path / "run" / "results.json").write_text(json.dumps(rec))

    class Trained(Exception):
        pass

    def train(*a, **k):
        raise Trained

    monkeypatch.setattr(R, "FinetuneRun", train)
    with pytest.raises(Trained):
        R._run(cfg, None, None)  # 2 of 3 epochs: not finished
    rec["epochs"].append({"epoch": 3})
    (tmp_path / "run" / "results.json").write_text(json.dumps(rec))
    assert R._run(cfg, None, None)["best_val"] == {"R@1": 1.0}  # finished: read back
    del rec["config"]["eval_threads"]  # a run recorded before a field existed, the new run at its default
    (tmp_path / "run" / "results.json").write_text(json.dumps(rec))
    assert R._run(cfg, None, None)["best_val"] == {"R@1": 1.0}
    with pytest.raises(Trained):  # ... but not when the new run sets it
        R._run(FinetuneConfig(**{**asdict(cfg), "eval_threads": 2}), None, None)
    tested = FinetuneConfig(epochs=3, out=str(tmp_path / "run"), progress=False, eval_test=True)
    rec["config"] = asdict(tested)
    (tmp_path / "run" / "results.json").write_text(json.dumps(rec))
    with pytest.raises(Trained):
        R._run(tested, None, None)  # every epoch, but the test was never read


def test_archived_run_is_read_back_from_another_checkout(tmp_path, monkeypatch):
    """--archive: a finished run's results.json kept in the repository is read back when the cache lacks it,
    also when it was written in another checkout (the shipped checkpoint's path compared from examples/ on)."""
    from dataclasses import asdict

    from examples.meltr_video import results as R
    from examples.meltr_video.finetune import FinetuneConfig

    cfg = FinetuneConfig(epochs=2, out=str(tmp_path / "cache" / "run-s0"), progress=False, eval_test=True)
    rec = {"config": asdict(cfg), "epochs": [{}, {}], "best_val": {"R@1": 2.0}, "test": {"R@1": 1.0}}
    rec["config"]["pretrained"] = "/elsewhere/clone/" + str(cfg.pretrained)[str(cfg.pretrained).index("examples") :]
    (tmp_path / "archive" / "run-s0").mkdir(parents=True)
    (tmp_path / "archive" / "run-s0" / "results.json").write_text(json.dumps(rec))

    def train(*a, **k):
        raise AssertionError("trained instead of read back")

    monkeypatch.setattr(R, "FinetuneRun", train)
    assert R._run(cfg, None, None, tmp_path / "archive")["test"] == {"R@1": 1.0}
    with pytest.raises(AssertionError, match="trained instead"):
        R._run(cfg, None, None)  # without the archive: not in the cache
    rec["epochs"] = [{}]  # an unfinished run in the archive is not taken either
    (tmp_path / "archive" / "run-s0" / "results.json").write_text(json.dumps(rec))
    with pytest.raises(AssertionError, match="trained instead"):
        R._run(cfg, None, None, tmp_path / "archive")


def test_captioning_table_has_the_zero_shot_row():
    """The committed captioning record renders with the pretrained backbone's CIDEr (two decimals: it is small)."""
    from examples.meltr_video import results as R

    rec = json.loads((Path(__file__).resolve().parents[2] / "docs/data/paired_univl_captioning.json").read_text())
    text = R.markdown(rec, "cmd")
    z = rec["zero_shot"]["test"]["CIDEr"]
    assert f"| pretrained, not fine-tuned | - | {z:.2f} | | | | |" in text
    assert "ΔCIDEr vs MTL" in text
