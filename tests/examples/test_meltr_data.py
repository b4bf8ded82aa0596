"""MELTR example data: the digit clips, the tokenizer, collate, and the real-format loaders."""

from __future__ import annotations

import csv
import json
import pickle
import re

import numpy as np
import pytest
import torch

from examples.meltr_video.data import (
    DIGIT_WORDS,
    DIRECTIONS,
    Collate,
    Tokenizer,
    UnsafePickleError,
    load_msrvtt,
    load_youcook2,
    make_digit_clips,
    safe_load_pickle,
)

SMALL = {"pretrain": 24, "train": 12, "val": 16}
GRAMMAR = re.compile(
    r"^the digit ({d}) moves ({m})( then ({m}))?( and the digit ({d}) moves ({m})( then ({m}))?)?$".format(
        d="|".join(DIGIT_WORDS), m="|".join(DIRECTIONS)
    )
)


@pytest.fixture(scope="module")
def clips():
    return make_digit_clips(seed=5, sizes=SMALL)


def test_shapes_and_grammar(clips):
    for name, n in SMALL.items():
        ds = clips[name]
        assert len(ds) == n
        assert ds.frames.shape == (n, 8, 32, 32)
        for r in ds.records:
            assert r.features.shape == (8, 1024) and r.features.dtype == np.float32
            assert GRAMMAR.match(r.caption), r.caption
    np.testing.assert_array_equal(clips["val"].records[3].features, clips["val"].frames[3].reshape(8, 1024))
    with pytest.raises(KeyError, match="no split"):
        clips["nope"]


def test_deterministic_from_seed(clips):
    again = make_digit_clips(seed=5, sizes=SMALL)
    other = make_digit_clips(seed=6, sizes=SMALL)
    for name in SMALL:
        assert clips[name].captions == again[name].captions
        np.testing.assert_array_equal(clips[name].frames, again[name].frames)
    assert clips["val"].captions != other["val"].captions
    assert not np.array_equal(clips["val"].frames, other["val"].frames)


def test_projection_is_orthogonal_and_fixed():
    a = make_digit_clips(seed=1, sizes={"val": 3}, projection=True)
    b = make_digit_clips(seed=2, sizes={"val": 3}, projection=True)
    for ds in (a, b):
        r = ds["val"].records[0]
        flat = ds["val"].frames[0].reshape(8, 1024)
        # orthogonal: norms preserved
        np.testing.assert_allclose(np.linalg.norm(r.features, axis=1), np.linalg.norm(flat, axis=1), rtol=1e-4)
    # the same projection for both seeds: gram matrices of projected frames equal those of the pixels
    fa = a["val"].records[1].features
    np.testing.assert_allclose(
        fa @ fa.T, (a["val"].frames[1].reshape(8, -1) @ a["val"].frames[1].reshape(8, -1).T), rtol=1e-3, atol=1e-3
    )


def test_motion_matches_caption():
    """Without noise/distractors/second digit, the centre of mass moves as the caption says."""
    ds = make_digit_clips(seed=3, sizes={"val": 40}, noise=0.0, p_two=0.0, p_distractor=0.0)["val"]
    rows, cols = np.mgrid[0:32, 0:32]
    for frames, cap in zip(ds.frames, ds.captions, strict=True):
        mass = frames.sum(axis=(1, 2))
        com = np.stack([(frames * rows).sum(axis=(1, 2)) / mass, (frames * cols).sum(axis=(1, 2)) / mass], 1)
        words = cap.split(" moves ")[1].split(" then ")
        first = np.array(DIRECTIONS[words[0]])
        np.testing.assert_allclose(com[1] - com[0], 2 * first, atol=1e-4)
        last = np.array(DIRECTIONS[words[-1]])
        np.testing.assert_allclose(com[-1] - com[-2], 2 * last, atol=1e-4)
        assert frames.min() >= 0 and frames.max() <= 1


def test_retrieval_is_hard():
    ds = make_digit_clips(seed=0, sizes={"val": 200})["val"]
    caps = ds.captions
    first_digits = [c.split()[2] for c in caps]
    by_digit: dict[str, set[str]] = {}
    for d, c in zip(first_digits, caps, strict=True):
        by_digit.setdefault(d, set()).add(c)
    assert all(len(v) >= 3 for v in by_digit.values())  # the same digit with several motions
    assert sum(" and " in c for c in caps) > 40
    # a static distractor (half intensity) shows in some clips: pixels near 0.5 that never move
    static = [(np.abs(f - 0.5) < 0.1).all(axis=0).sum() for f in ds.frames]
    assert sum(s > 3 for s in static) > 20


def test_tokenizer():
    tok = Tokenizer.for_digits()
    assert tok.vocab[:7] == ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]", "[UNK]"]
    ids = tok.encode("The digit seven moves LEFT then up!")
    assert tok.decode(ids) == "the digit seven moves left then up"
    assert tok.encode("a zebra")[0] == tok.unk_id
    assert tok.decode([*ids[:2], tok.eos_id, *ids[2:]]) == "the digit"
    t2 = Tokenizer.from_captions(["b a", "a c", "a"], min_count=2)
    assert t2.vocab[7:] == ["a"]


def test_collate(clips):
    tok = clips.tokenizer
    items = [clips["train"][i] for i in range(6)]
    b = Collate(tok, max_words=16, seed=0)(items)
    B = 6
    assert b["text"].shape == (B, 18) and b["caption_in"].shape == (B, 17) and b["video"].shape == (B, 8, 1024)
    assert (b["text"][:, 0] == tok.cls_id).all()
    # mlm labels only on word positions, and where the text is masked
    lab = b["mlm_labels"] != -100
    assert lab.any(1).all()
    assert (b["masked_text"][lab] == tok.mask_id).all()
    assert (b["text"][lab] != tok.sep_id).all() and (b["text"][lab] != tok.cls_id).all()
    assert torch.equal(b["masked_text"][~lab], b["text"][~lab])
    assert b["mfm_mask"].any(1).all()
    assert (b["masked_video"][b["mfm_mask"]] == 0).all()
    assert torch.equal(b["masked_video"][~b["mfm_mask"]], b["video"][~b["mfm_mask"]])
    # decoder targets are the inputs shifted by one, ending in EOS
    n = len(tok.encode(items[0]["caption"]))
    assert torch.equal(b["caption_in"][0, 1 : n + 1], b["caption_out"][0, :n])
    assert b["caption_out"][0, n] == tok.eos_id and (b["caption_out"][0, n + 1 :] == -100).all()
    assert b["index"].tolist() == list(range(6))
    again = Collate(tok, max_words=16, seed=0)(items)
    assert all(torch.equal(b[k], again[k]) for k in b)
    other = Collate(tok, max_words=16, seed=1)(items)
    assert not torch.equal(b["mlm_labels"], other["mlm_labels"])
    plain = Collate(tok, max_words=16, mask_prob=0.0)(items)
    assert (plain["mlm_labels"] == -100).all() and not plain["mfm_mask"].any()
    assert torch.equal(plain["masked_video"], plain["video"])


def test_collate_errors(clips):
    tok = clips.tokenizer
    good = clips["train"][0]
    with pytest.raises(ValueError, match="empty caption for video 'v9'"):
        Collate(tok)([good, {"video_id": "v9", "caption": "  ", "features": good["features"]}])
    with pytest.raises(ValueError, match="'v8' has feature dim 10"):
        Collate(tok)([good, {"video_id": "v8", "caption": "the digit", "features": np.zeros((4, 10))}])
    b = Collate(tok, max_frames=4)([good, {"video_id": "v7", "caption": "the", "features": np.ones((20, 1024))}])
    assert b["video"].shape == (2, 4, 1024)


# ------------------------------------------------------------------------------- real formats


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "features.pickle"
    path.write_bytes(pickle.dumps({"v1": Evil(marker)}))
    with pytest.raises(pickle.UnpicklingError, match=r"features\.pickle.*builtins\.exec"):
        safe_load_pickle(path)
    with pytest.raises(ValueError, match="refusing"):
        load_msrvtt(path, tmp_path / "x.csv")
    assert not marker.exists()
    # the payload is real: plain pickle would run it
    pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


def test_unsafe_error_is_both_kinds():
    assert issubclass(UnsafePickleError, pickle.UnpicklingError) and issubclass(UnsafePickleError, ValueError)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_pickle_reads_numpy(tmp_path, protocol):
    obj = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": [1, 2.5, "x"],
        "c": np.float64(3.0),
        "d": np.array(["s1", "s2"], dtype=object),
    }
    p = tmp_path / "ok.pickle"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_load_pickle(p)
    np.testing.assert_array_equal(out["a"], obj["a"])
    assert out["b"] == [1, 2.5, "x"] and out["c"] == 3.0 and list(out["d"]) == ["s1", "s2"]


def test_truncated_pickle(tmp_path):
    p = tmp_path / "cut.pickle"
    p.write_bytes(pickle.dumps({"a": np.zeros((3, 1024))})[:50])
    with pytest.raises(ValueError, match=r"cut\.pickle: not a readable pickle"):
        safe_load_pickle(p)


def _msrvtt(tmp_path, feats=None, captions=None, dim=1024):
    feats = feats or {"video1": np.random.rand(5, dim), "video2": np.random.rand(3, dim)}
    fp = tmp_path / "msrvtt_videos_features.pickle"
    fp.write_bytes(pickle.dumps(feats))
    jp = tmp_path / "MSRVTT_data.json"
    captions = captions or [
        {"video_id": "video1", "caption": "a man is cooking"},
        {"video_id": "video1", "caption": "someone cooks food"},
        {"video_id": "video2", "caption": "a cat plays"},
    ]
    jp.write_text(json.dumps({"videos": [], "sentences": captions}))
    return fp, jp


def _csv(path, header, rows):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_msrvtt_train_and_test_formats(tmp_path):
    fp, jp = _msrvtt(tmp_path)
    train = _csv(tmp_path / "MSRVTT_train.9k.csv", ["video_id"], [["video1"], ["video2"]])
    ds = load_msrvtt(fp, train, jp)
    assert len(ds) == 3 and ds.captions[:2] == ["a man is cooking", "someone cooks food"]
    assert ds.records[2].features.shape == (3, 1024) and ds.records[2].features.dtype == np.float32
    test = _csv(
        tmp_path / "MSRVTT_JSFUSION_test.csv",
        ["key", "vid_key", "video_id", "sentence"],
        [["ret0", "msr7", "video2", "a cat is playing"]],
    )
    ds2 = load_msrvtt(fp, test)
    assert len(ds2) == 1 and ds2.records[0].video_id == "video2" and ds2.captions == ["a cat is playing"]
    b = Collate(Tokenizer.from_captions(ds.captions))([ds[0], ds[2]])
    assert b["video"].shape == (2, 5, 1024) and b["video_mask"].sum(1).tolist() == [5, 3]


def test_msrvtt_errors(tmp_path):
    fp, jp = _msrvtt(tmp_path)
    missing = _csv(tmp_path / "split.csv", ["video_id"], [["video1"], ["video9"]])
    with pytest.raises(ValueError, match=r"msrvtt_videos_features\.pickle: no features for video 'video9'"):
        load_msrvtt(fp, missing, jp)
    with pytest.raises(ValueError, match=r"sentence.*json_path"):
        load_msrvtt(fp, _csv(tmp_path / "s2.csv", ["video_id"], [["video1"]]))
    with pytest.raises(ValueError, match="missing column"):
        load_msrvtt(fp, _csv(tmp_path / "s5.csv", ["vid"], [["video1"]]), jp)
    empty = _csv(tmp_path / "test.csv", ["video_id", "sentence"], [["video1", "  "]])
    with pytest.raises(ValueError, match=r"test\.csv: empty caption for video 'video1'"):
        load_msrvtt(fp, empty)
    fp2, jp2 = _msrvtt(tmp_path, captions=[{"video_id": "video1", "caption": ""}])
    with pytest.raises(ValueError, match=r"MSRVTT_data\.json: empty caption for video 'video1'"):
        load_msrvtt(fp2, _csv(tmp_path / "s3.csv", ["video_id"], [["video1"]]), jp2)
    fp3, jp3 = _msrvtt(tmp_path, feats={"video1": np.zeros((4, 512))})
    with pytest.raises(ValueError, match=r"video 'video1' has features of shape \(4, 512\), expected \[frames, 1024\]"):
        load_msrvtt(fp3, _csv(tmp_path / "s4.csv", ["video_id"], [["video1"]]), jp3)


def test_youcook2(tmp_path):
    fp = tmp_path / "youcookii_videos_features.pickle"
    fp.write_bytes(pickle.dumps({"GLd3aX16zBg": np.random.rand(30, 1024).astype(np.float32)}))
    dp = tmp_path / "youcookii_data.pickle"
    data = {
        "GLd3aX16zBg": {
            "start": np.array([2, 10]),
            "end": np.array([5, 20]),
            "text": np.array(["add oil to a pan", "fry the onions"], dtype=object),
        }
    }
    dp.write_bytes(pickle.dumps(data))
    cp = _csv(tmp_path / "youcookii_train.csv", ["video_id"], [["GLd3aX16zBg"]])
    ds = load_youcook2(fp, dp, cp)
    assert len(ds) == 2 and ds.captions == ["add oil to a pan", "fry the onions"]
    assert ds.records[0].features.shape == (4, 1024) and ds.records[1].features.shape == (11, 1024)
    data["GLd3aX16zBg"]["text"] = np.array(["ok", ""], dtype=object)
    dp.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"youcookii_data\.pickle: empty caption for video 'GLd3aX16zBg'"):
        load_youcook2(fp, dp, cp)
    data["GLd3aX16zBg"]["text"] = np.array(["ok", "fine"], dtype=object)
    data["GLd3aX16zBg"]["start"] = np.array([2, 40])
    data["GLd3aX16zBg"]["end"] = np.array([5, 45])
    dp.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match=r"segment 1 .* outside its 30 feature frames"):
        load_youcook2(fp, dp, cp)
    cp2 = _csv(tmp_path / "val.csv", ["video_id"], [["nope"]])
    with pytest.raises(ValueError, match="no features for video 'nope'"):
        load_youcook2(fp, dp, cp2)
