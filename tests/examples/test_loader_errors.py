"""Malformed real-format files are refused with a ValueError naming the file (and the video id where there is one).

Bad inputs tried (26), each written by the test into ``tmp_path``; every case checks the error type and a
word of the message (the file name), and no case may emit a ``ComplexWarning`` or leave a dataset behind.

MSRVTT (``load_msrvtt``):
     1. ``MSRVTT_data.json`` cut in the middle (malformed JSON; was a bare JSONDecodeError)
     2. ``MSRVTT_data.json`` in Latin-1, not UTF-8 (was a UnicodeDecodeError)
     3. a ``sentences`` entry that is a string, not an object (was an AttributeError)
     4. a ``sentences`` entry without ``video_id`` (was silently filed under video "None")
     5. a split CSV in Latin-1 (was a UnicodeDecodeError)
     6. a split CSV in UTF-16 (was a UnicodeDecodeError)
     7. a test CSV row with an unquoted comma in the sentence (was a caption silently cut at the comma)
     8. a split CSV row with fewer fields than the header (was an AttributeError on None)
     9. complex features (was cast to real, dropping the imaginary part, with only a ComplexWarning)
    10. ragged features: a list of rows of unequal length (was a ValueError without the file)
    11. boolean features (refused as non-numeric)
    12. two keys, 1 and "1", naming the same video (was one silently overwriting the other)
YouCook2 (``load_youcook2``):
    13. a segment ending past the last feature (was clipped silently; now refused unless clip_segments=True)
    14. a fractional start (was truncated by int())
    15. a fractional end (was truncated by int())
    16. a bound given as a string (was int("5") accepted, int("5.5") a ValueError without the file)
    17. a NaN bound (was a ValueError from int() without the file)
    18. start > end
    19. a ragged ``start`` list (was a numpy ValueError without the file)
    20. a split CSV in Latin-1
    21. clip_segments given as a string (TypeError)
CMU-MOSI (``load_mosi``):
    22. complex ``text`` features (was cast to real with only a ComplexWarning)
    23. complex ``labels`` (was cast to real with only a ComplexWarning)
    24. ragged ``vision`` features (was a numpy ValueError without the file)
    25. a byte-string id that is not UTF-8 (was replaced by U+FFFD silently)
    26. a ragged ``id`` list
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from examples.meltr_sentiment.data import load_mosi
from examples.meltr_video.data import load_msrvtt, load_youcook2

Case = Callable[[Path], Callable[[], object]]  # writes files into tmp_path, returns the failing load


def _pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def _csv(path: Path, header, rows, encoding="utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _feats(tmp: Path, feats=None) -> Path:
    rng = np.random.default_rng(0)
    feats = feats or {"video1": rng.random((5, 8)), "video2": rng.random((3, 8))}
    return _pickle(tmp / "msrvtt_features.pickle", feats)


SENTENCES = [{"video_id": "video1", "caption": "a man is cooking"}, {"video_id": "video2", "caption": "a cat plays"}]


def _json(tmp: Path, text: str | bytes | None = None) -> Path:
    p = tmp / "MSRVTT_data.json"
    text = json.dumps({"sentences": SENTENCES}) if text is None else text
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _train_csv(tmp: Path) -> Path:
    return _csv(tmp / "MSRVTT_train.9k.csv", ["video_id"], [["video1"], ["video2"]])


def msrvtt_train(tmp: Path, feats=None, json_text=None, csv_path=None) -> Callable[[], object]:
    fp, jp = _feats(tmp, feats), _json(tmp, json_text)
    cp = csv_path or _train_csv(tmp)
    return lambda: load_msrvtt(fp, cp, jp, feature_dim=8)


def msrvtt_test_csv(tmp: Path, lines: bytes) -> Callable[[], object]:
    cp = tmp / "MSRVTT_JSFUSION_test.csv"
    cp.write_bytes(lines)
    fp = _feats(tmp)
    return lambda: load_msrvtt(fp, cp, feature_dim=8)


def youcook(tmp: Path, start=(2, 10), end=(5, 20), csv_encoding="utf-8", **kw) -> Callable[[], object]:
    fp = _pickle(tmp / "youcookii_features.pickle", {"vidA": np.random.default_rng(0).random((30, 8))})
    seg = {"start": start, "end": end, "text": ["add oil to a pan", "fry the onions"]}
    dp = _pickle(tmp / "youcookii_data.pickle", {"vidA": seg})
    cp = _csv(tmp / "youcookii_train.csv", ["video_id", "note"], [["vidA", "café"]], encoding=csv_encoding)
    return lambda: load_youcook2(fp, dp, cp, feature_dim=8, **kw)


def _mosi_split(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "text": rng.random((n, 5, 6)).astype(np.float32),
        "vision": rng.random((n, 5, 3)).astype(np.float32),
        "audio": rng.random((n, 5, 2)).astype(np.float32),
        "labels": rng.uniform(-3, 3, (n, 1, 1)).astype(np.float32),
        "id": np.array([[f"v{i}".encode(), b"0", b"x"] for i in range(n)]),
    }


def mosi(tmp: Path, split="valid", **change) -> Callable[[], object]:
    data = {s: _mosi_split(seed=i) for i, s in enumerate(("train", "valid", "test"))}
    data[split].update(change)
    p = _pickle(tmp / "mosi_data.pkl", data)
    return lambda: load_mosi(p)


LATIN1 = "video_id,sentence\nvideo1,un caf\u00e9 cr\u00e8me\n".encode("latin-1")
CASES: dict[str, tuple[Case, type[Exception], str]] = {
    # MSRVTT
    "json-truncated": (lambda t: msrvtt_train(t, json_text='{"sentences": [{"video_id": "vid'), ValueError,
                       r"MSRVTT_data\.json: not valid JSON"),
    "json-latin1": (lambda t: msrvtt_train(t, json_text='{"sentences": [{"video_id": "caf\u00e9"}]}'.encode("latin-1")),
                    ValueError, r"MSRVTT_data\.json: not UTF-8"),
    "json-entry-not-object": (lambda t: msrvtt_train(t, json_text=json.dumps({"sentences": [SENTENCES[0], "video2"]})),
                              ValueError, r"MSRVTT_data\.json: sentences\[1\] is a str"),
    "json-entry-no-video-id": (lambda t: msrvtt_train(t, json_text=json.dumps({"sentences": [{"caption": "hi"}]})),
                               ValueError, r"MSRVTT_data\.json: sentences\[0\] has no video_id"),
    "csv-latin1": (lambda t: msrvtt_test_csv(t, LATIN1), ValueError, r"MSRVTT_JSFUSION_test\.csv: not UTF-8"),
    "csv-utf16": (lambda t: msrvtt_test_csv(t, "video_id,sentence\nvideo1,a cat\n".encode("utf-16")), ValueError,
                  r"MSRVTT_JSFUSION_test\.csv: not UTF-8"),
    "csv-unquoted-comma": (lambda t: msrvtt_test_csv(t, b"video_id,sentence\nvideo1,a man, a dog and a cat\n"),
                           ValueError, r"MSRVTT_JSFUSION_test\.csv: line 2 has 3 field\(s\), the header has 2"),
    "csv-short-row": (lambda t: msrvtt_train(t, csv_path=_csv(t / "split.csv", ["key", "video_id"], [["k1"]])),
                      ValueError, r"split\.csv: line 2 has 1 field\(s\), the header has 2"),
    "features-complex": (lambda t: msrvtt_train(t, feats={"video1": np.ones((4, 8)) * 1j, "video2": np.ones((3, 8))}),
                         ValueError, r"msrvtt_features\.pickle: video 'video1' has complex features"),
    "features-ragged": (lambda t: msrvtt_train(t, feats={"video1": [[0.0] * 8, [0.0] * 7], "video2": np.ones((3, 8))}),
                        ValueError, r"msrvtt_features\.pickle: video 'video1' has features that are not an array"),
    "features-bool": (lambda t: msrvtt_train(t, feats={"video1": np.ones((4, 8), bool), "video2": np.ones((3, 8))}),
                      ValueError, r"msrvtt_features\.pickle: video 'video1' has non-numeric features"),
    "features-duplicate-key": (lambda t: msrvtt_train(t, feats={1: np.ones((4, 8)), "1": np.ones((3, 8))}), ValueError,
                               r"msrvtt_features\.pickle: two keys name video '1'"),
    # YouCook2
    "segment-past-end": (lambda t: youcook(t, end=(5, 30)), ValueError,
                         r"youcookii_data\.pickle: video 'vidA' segment 1 \[10, 30\] ends past the last of its 30"),
    "segment-fractional-start": (lambda t: youcook(t, start=(2.5, 10)), ValueError,
                                 r"youcookii_data\.pickle: video 'vidA' segment 0: start 2\.5 is not a whole number"),
    "segment-fractional-end": (lambda t: youcook(t, end=(5, 19.9)), ValueError,
                               r"youcookii_data\.pickle: video 'vidA' segment 1: end 19\.9 is not a whole number"),
    "segment-string-bound": (lambda t: youcook(t, start=["2", "10"]), ValueError,
                             r"youcookii_data\.pickle: video 'vidA' segment 0: start '2' is not a finite number"),
    "segment-nan-bound": (lambda t: youcook(t, end=(5, float("nan"))), ValueError,
                          r"youcookii_data\.pickle: video 'vidA' segment 1: end nan is not a finite number"),
    "segment-start-after-end": (lambda t: youcook(t, start=(6, 10)), ValueError,
                                r"youcookii_data\.pickle: video 'vidA' segment 0 \[6, 5\] is not 0 <= start <= end"),
    "segment-ragged-start": (lambda t: youcook(t, start=[2, [10, 11]]), ValueError,
                             r"youcookii_data\.pickle: video 'vidA' has start/end/text that are not flat lists"),
    "youcook-csv-latin1": (lambda t: youcook(t, csv_encoding="latin-1"), ValueError,
                           r"youcookii_train\.csv: not UTF-8"),
    "youcook-clip-not-bool": (lambda t: youcook(t, clip_segments="yes"), TypeError, r"clip_segments must be a bool"),
    # CMU-MOSI
    "mosi-complex-text": (lambda t: mosi(t, text=np.ones((4, 5, 6), np.complex64)), ValueError,
                          r"mosi_data\.pkl: split 'valid' key 'text': expected a real \(complex values are not cast\)"),
    "mosi-complex-labels": (lambda t: mosi(t, labels=np.zeros((4, 1, 1)) + 1j), ValueError,
                            r"mosi_data\.pkl: split 'valid' key 'labels': expected a real"),
    "mosi-ragged-vision": (lambda t: mosi(t, vision=[np.zeros((5, 3))] * 3 + [np.zeros((4, 3))]), ValueError,
                           r"mosi_data\.pkl: split 'valid' key 'vision': not an array"),
    "mosi-id-not-utf8": (lambda t: mosi(t, id=np.array([[b"caf\xe9", b"0", b"x"]] + [[b"v", b"0", b"x"]] * 3)),
                         ValueError, r"mosi_data\.pkl: split 'valid' key 'id': id of sample 0 is not UTF-8"),
    "mosi-id-ragged": (lambda t: mosi(t, id=[[b"a", b"0"], [b"b"], [b"c"], [b"d"]]), ValueError,
                       r"mosi_data\.pkl: split 'valid' key 'id': not an array of ids"),
}  # fmt: skip


def test_the_docstring_lists_every_case():
    numbers = [int(m.group(1)) for line in __doc__.splitlines() if (m := re.match(r"\s+(\d+)\. ", line))]
    assert numbers == list(range(1, 27)) and len(CASES) == 26


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_naming_the_file(tmp_path, name):
    make, exc, pattern = CASES[name]
    load = make(tmp_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning / cast warning on the way to the error
        with pytest.raises(exc, match=pattern):
            load()
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before  # a failed load writes nothing and changes no file


def test_the_good_versions_load(tmp_path):
    """The same builders without the defect load (so each case above fails for its defect only)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "d").mkdir()
    ds = msrvtt_train(tmp_path / "a")()
    assert [r.caption for r in ds.records] == ["a man is cooking", "a cat plays"]
    ds = msrvtt_test_csv(tmp_path / "b", b'video_id,sentence\nvideo1,"a man, a dog and a cat"\n')()
    assert ds.records[0].caption == "a man, a dog and a cat"
    ds = youcook(tmp_path / "c", start=(2.0, np.int64(10)), end=[np.float32(5), 20])()
    assert [r.features.shape[0] for r in ds.records] == [4, 11]
    splits = mosi(tmp_path / "d")()
    assert splits["valid"].ids[0] == "v0|0|x"


def test_youcook_clip_segments_is_explicit_and_counted(tmp_path):
    load = youcook(tmp_path, end=(5, 34))
    with pytest.raises(ValueError, match="clip_segments=True cuts it there"):
        load()
    with pytest.warns(UserWarning, match=r"youcookii_data\.pickle: clip_segments=True cut 1 segment.*\[10, 34\] -> "):
        ds = load_youcook2(
            tmp_path / "youcookii_features.pickle",
            tmp_path / "youcookii_data.pickle",
            tmp_path / "youcookii_train.csv",
            feature_dim=8,
            clip_segments=True,
        )
    assert [r.features.shape[0] for r in ds.records] == [4, 20]  # seconds 10..29
    # a segment starting past the last feature is refused even with clipping (UniVL would use zeros)
    with pytest.raises(ValueError, match=r"segment 1 \[30, 34\] is outside its 30 feature frames"):
        youcook(tmp_path, start=(2, 30), end=(5, 34), clip_segments=True)()
