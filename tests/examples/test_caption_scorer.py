"""The captioning scorer (examples/meltr_video/metrics.py) against pycocoevalcap, the field's scorer.

* Our BLEU-1..4, ROUGE-L and CIDEr-D equal pycocoevalcap 1.2's ``Bleu(4)``, ``Rouge``, ``Cider`` on a
  real-size set: 400 generated captions with 1-5 references each, built from the digit-clip captions
  (paraphrased references; candidates copied, cut, extended, corrupted, reversed, a few empty), corpus-level
  and per caption (sentence BLEU, ROUGE-L).
* ``caption_metrics`` reports pycocoevalcap's numbers when it is installed, ours only as the fallback.
* METEOR: without Java the scorer says so (an error, or a warning and no column when asked for "if
  possible"); a java that dies is reported with what it printed, without hanging; with Java (slow: the
  METEOR jar takes ~10 s to start on the loaded 2-core machine) the number is pycocoevalcap's.
"""

from __future__ import annotations

import shutil
import stat
import warnings

import numpy as np
import pytest

from examples.meltr_video import metrics as M
from examples.meltr_video.data import DIGIT_WORDS, DIRECTIONS, make_digit_clips

pycocoevalcap = pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is in the dev extra (scripts/venv.sh)")
from pycocoevalcap.bleu.bleu import Bleu  # noqa: E402
from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.rouge.rouge import Rouge  # noqa: E402

WORDS = [*DIGIT_WORDS, *DIRECTIONS, "the", "digit", "moves", "then", "and", "a", "goes"]


def caption_set(n: int = 400, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """``n`` candidates, each with 1-5 references: a digit-clip caption, paraphrases of it (article,
    verb, a dropped word, upper case with a full stop) or other captions; the candidate is a reference
    copied, with a word dropped or replaced, cut, extended, replaced by random words, reversed or empty."""
    clips = make_digit_clips(seed=seed, sizes={"val": 200, "test": 300})
    pool = clips["val"].captions + clips["test"].captions
    rng = np.random.default_rng(seed)

    def paraphrase(c: str) -> str:
        w = c.split()
        k = rng.integers(4)
        if k == 0:
            return " ".join("a" if x == "the" else x for x in w)
        if k == 1:
            return " ".join("goes" if x == "moves" else x for x in w)
        if k == 2:
            return " ".join(x for x in w if x != "digit")
        return "The " + c[4:].upper() + "."

    def perturb(c: str) -> str:
        w = c.split()
        k = rng.integers(7)
        if k == 0:
            return c
        if k == 1 and len(w) > 1:
            del w[rng.integers(len(w))]
        elif k == 2:
            w[rng.integers(len(w))] = str(rng.choice(WORDS))
        elif k == 3:
            w = w[: rng.integers(1, len(w) + 1)]
        elif k == 4:
            w = w + [str(rng.choice(WORDS)) for _ in range(rng.integers(1, 4))]
        elif k == 5:
            w = [str(x) for x in rng.choice(WORDS, size=rng.integers(1, 12))]
        else:
            return "" if rng.random() < 0.3 else " ".join(w[::-1])
        return " ".join(w)

    cands, refs = [], []
    for _ in range(n):
        base = pool[rng.integers(len(pool))]
        more = [
            paraphrase(base) if rng.random() < 0.6 else pool[rng.integers(len(pool))] for _ in range(rng.integers(5))
        ]
        refs.append([base, *more])
        cands.append(perturb(str(rng.choice(refs[-1]))))
    return cands, refs


@pytest.fixture(scope="module")
def data():
    cands, refs = caption_set()
    assert len(cands) == 400 and {len(r) for r in refs} == {1, 2, 3, 4, 5}
    assert 5 < sum(c == "" for c in cands) < 60 and sum(c in r for c, r in zip(cands, refs, strict=True)) > 50
    return cands, refs


def _coco(cands, refs):
    """pycocoevalcap's scorers called directly, on the same tokenisation (lower case, words, single spaces)."""
    gts = {i: [" ".join(M._tok(x)) for x in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(M._tok(c))] for i, c in enumerate(cands)}
    b, b_each = Bleu(4).compute_score(gts, res, verbose=0)
    r, r_each = Rouge().compute_score(gts, res)
    c, _ = Cider().compute_score(gts, res)
    return {"BLEU": b, "ROUGE-L": r, "CIDEr": c, "BLEU each": b_each, "ROUGE-L each": r_each}


def test_ours_equal_pycocoevalcap_on_400_captions(data):
    cands, refs = data
    want = _coco(cands, refs)
    np.testing.assert_allclose(M.bleu(cands, refs, 4), want["BLEU"], rtol=0, atol=1e-9)
    assert M.rouge_l(cands, refs) == pytest.approx(want["ROUGE-L"], abs=1e-9)
    assert M.cider_d(cands, refs) == pytest.approx(want["CIDEr"], abs=1e-9)
    assert 0.3 < want["BLEU"][3] < 0.95 and 1.0 < want["CIDEr"] < 9.0  # a set that is neither trivial nor hopeless


def test_ours_equal_pycocoevalcap_per_caption(data):
    cands, refs = data
    want = _coco(cands, refs)
    for i in range(0, 400, 4):  # sentence BLEU-4 and ROUGE-L of every 4th caption
        assert M.bleu([cands[i]], [refs[i]], 4)[3] == pytest.approx(want["BLEU each"][3][i], abs=1e-9), i
        assert M.rouge_l([cands[i]], [refs[i]]) == pytest.approx(want["ROUGE-L each"][i], abs=1e-9), i


def test_caption_metrics_report_pycocoevalcap_numbers(data, monkeypatch):
    cands, refs = data
    auto = M.caption_metrics(cands, refs)
    coco = M.coco_scores(cands, refs)
    assert auto == {k: coco[k] for k in ("BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")}
    # the reported CIDEr is the one pycocoevalcap's Cider returns (a marked value shows through), ours is not used
    monkeypatch.setattr(Cider, "compute_score", lambda self, gts, res: (1234.5, None))
    assert M.caption_metrics(cands, refs)["CIDEr"] == 1234.5
    assert M.caption_metrics(cands, refs, backend="ours")["CIDEr"] == pytest.approx(coco["CIDEr"], abs=1e-9)
    # without pycocoevalcap: our numbers (equal, per the tests above)
    monkeypatch.setattr(M, "coco_available", lambda: False)
    assert M.caption_metrics(cands, refs)["CIDEr"] == pytest.approx(coco["CIDEr"], abs=1e-9)
    with pytest.raises(ValueError, match="backend"):
        M.caption_metrics(cands, refs, backend="nlgeval")
    with pytest.raises(ValueError, match="with_meteor"):
        M.caption_metrics(cands, refs, with_meteor="yes")


SMALL = (
    ["the digit seven moves left", "the digit three moves down"],
    [["the digit seven moves left then up"], ["the digit three moves down"]],
)


def test_meteor_without_java_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java
    assert not M.java_available()
    with pytest.raises(M.MeteorUnavailableError, match=r"METEOR needs Java.*no `java` on PATH.*default-jre-headless"):
        M.caption_metrics(*SMALL, with_meteor=True)
    with pytest.warns(M.MeteorUnavailableWarning, match="METEOR left out: METEOR needs Java"):
        m = M.caption_metrics(*SMALL, with_meteor=None)
    assert "METEOR" not in m and "CIDEr" in m
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "METEOR" not in M.caption_metrics(*SMALL, with_meteor=False)
    assert isinstance(M.MeteorUnavailableError("x"), RuntimeError)


def test_meteor_with_a_failing_java_reports_it(tmp_path, monkeypatch):
    java = tmp_path / "java"
    java.write_text("#!/bin/sh\necho 'Error: Could not create the Java Virtual Machine.' >&2\nexit 1\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(M.MeteorUnavailableError, match=r"METEOR's java process failed.*Could not create the Java"):
        M.meteor(*SMALL)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java (scripts/venv.sh installs it)")
def test_meteor_is_pycocoevalcaps():
    from pycocoevalcap.meteor.meteor import Meteor

    cands = [*SMALL[0], "a cat sits", "The digit five moves UP."]
    refs = [*SMALL[1], ["the digit one moves right"], ["the digit five moves up", "a five goes up"]]
    m = M.caption_metrics(cands, refs, with_meteor=True)
    gts = {i: [" ".join(M._tok(x)) for x in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(M._tok(c))] for i, c in enumerate(cands)}
    scorer = Meteor()
    want, each = scorer.compute_score(gts, res)
    assert m["METEOR"] == pytest.approx(want, abs=1e-12)
    assert each[3] == pytest.approx(1.0) and each[2] < 0.2 and 0.3 < each[0] < 1.0  # exact, unrelated, partial
