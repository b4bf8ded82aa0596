"""Retrieval and captioning metrics.

Retrieval (MATH.md section 6), for a similarity matrix ``S`` [texts, videos] and the true video
``t(i)`` of each text ``i``::

    rank_i = #{j : S_ij > S_i,t(i)} + #{j != t(i) : S_ij = S_i,t(i)}     (0-based; ties count against)
    R@k    = 100 * share of texts with rank_i < k
    MedR   = median_i(rank_i) + 1,   MeanR = mean_i(rank_i) + 1

Ties are broken pessimistically, so a constant score matrix gives R@1 = 0, not a lucky number.

Captioning. The reported numbers (:func:`caption_metrics`) come from ``pycocoevalcap`` 1.2, the
coco-caption scorers (UniVL scores with nlg-eval, which runs a copy of them), whenever it is installed
(it is in the ``dev`` extra): ``Bleu(4)``, ``Rouge``, ``Cider`` (CIDEr-D) and, with Java, ``Meteor``
(METEOR 1.5, a java subprocess). Our own implementations below are the fallback where ``pycocoevalcap``
is missing; they are kept because ``tests/examples/test_caption_scorer.py`` shows them equal to
``pycocoevalcap`` (BLEU-1..4, ROUGE-L, CIDEr-D within 1e-9, in fact bit for bit, on 400 captions with
1-5 references each). METEOR has no fallback.

    BLEU-N   corpus level: clipped n-gram precisions p_n summed over the corpus (with coco's
             1e-15 / 1e-9 smoothing), brevity penalty with the closest reference length,
             BLEU-N = BP * (prod_{n<=N} p_n)^(1/N)
    ROUGE-L  per caption: LCS with each reference, P = max LCS/|c|, R = max LCS/|r|,
             F = (1 + b^2) P R / (R + b^2 P), b = 1.2; averaged over captions
    CIDEr-D  tf-idf n-gram vectors (n = 1..4, document frequency over the references of the
             evaluated set), clipped cosine with each reference times exp(-(l_c - l_r)^2 / (2 * 6^2)),
             mean over n and references, times 10; averaged over captions
    METEOR   :func:`meteor`: ``pycocoevalcap``'s METEOR 1.5 jar; needs a ``java`` on PATH. Without
             Java or the package it raises :class:`MeteorUnavailableError` saying what is missing.

Text is tokenised by lower-casing and keeping runs of letters, digits and apostrophes, then joined by
single spaces for every scorer. coco-caption's own pipeline runs the Stanford PTB tokenizer first (it
also drops punctuation, and needs Java); nlg-eval, as UniVL uses it, does not tokenise. On captions of
plain words all three give the same tokens.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import shutil
import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MeteorUnavailableError",
    "MeteorUnavailableWarning",
    "bleu",
    "caption_metrics",
    "cider_d",
    "coco_available",
    "coco_scores",
    "java_available",
    "meteor",
    "retrieval_metrics",
    "retrieval_ranks",
    "rouge_l",
]


def retrieval_ranks(sim: Tensor | np.ndarray, targets: Sequence[int] | None = None) -> np.ndarray:
    """0-based rank of the true video for every text (ties count against). ``sim``: [Nt, Nv]."""
    s = torch.as_tensor(sim, dtype=torch.float64)
    if s.dim() != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty [texts, videos] matrix, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("similarity matrix has non-finite entries")
    Nt, Nv = s.shape
    if targets is None:
        if Nt != Nv:
            raise ValueError(f"targets are required when the matrix is not square ({Nt} texts, {Nv} videos)")
        tgt = torch.arange(Nt)
    else:
        tgt = torch.as_tensor(list(targets), dtype=torch.long)
        if tgt.shape != (Nt,):
            raise ValueError(f"need one target per text ({Nt}), got {tuple(tgt.shape)}")
        if bool(((tgt < 0) | (tgt >= Nv)).any()):
            raise ValueError(f"targets must be in [0, {Nv}), got {tgt.tolist()}")
    true = s[torch.arange(Nt), tgt].unsqueeze(1)
    rank = (s > true).sum(1) + (s == true).sum(1) - 1
    return rank.numpy()


def retrieval_metrics(sim: Tensor | np.ndarray, targets: Sequence[int] | None = None) -> dict[str, float]:
    """``{"R@1", "R@5", "R@10" (percent), "MedR", "MeanR"}`` for text-to-video retrieval on ``sim`` [Nt, Nv]."""
    r = retrieval_ranks(sim, targets)
    out = {f"R@{k}": 100.0 * float(np.mean(r < k)) for k in (1, 5, 10)}
    out["MedR"] = float(np.median(r)) + 1.0
    out["MeanR"] = float(np.mean(r)) + 1.0
    return out


# ------------------------------------------------------------------------------------- captioning

_WORD = re.compile(r"[a-z0-9']+")


def _tok(s: str) -> list[str]:
    return _WORD.findall(s.lower())


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _check(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[list[list[str]]]]:
    if isinstance(cands, str) or len(cands) != len(refs):
        raise ValueError(f"need one list of references per candidate: {len(cands)} candidates, {len(refs)} lists")
    if not cands:
        raise ValueError("no captions to score")
    c = [_tok(x) for x in cands]
    r = []
    for i, rs in enumerate(refs):
        if isinstance(rs, str) or not rs:
            raise ValueError(f"candidate {i}: references must be a non-empty list of strings")
        toks = [_tok(x) for x in rs]
        if any(not t for t in toks):
            raise ValueError(f"candidate {i}: empty reference caption")
        r.append(toks)
    return c, r


def bleu(cands: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (coco-caption's ``closest`` reference length and smoothing)."""
    c, r = _check(cands, refs)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    testlen = reflen = 0
    for cw, rws in zip(c, r, strict=True):
        testlen += len(cw)
        reflen += min((abs(len(rw) - len(cw)), len(rw)) for rw in rws)[1]
        for k in range(1, n + 1):
            cc = _ngrams(cw, k)
            maxref: Counter[tuple[str, ...]] = Counter()
            for rw in rws:
                maxref |= _ngrams(rw, k)
            correct[k - 1] += sum(min(v, maxref[g]) for g, v in cc.items())
            guess[k - 1] += max(0, len(cw) - k + 1)
    ratio = (testlen + tiny) / (reflen + small)
    out, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (guess[k] + small)
        b = prod ** (1.0 / (k + 1))
        if ratio < 1:
            b *= math.exp(1 - 1 / ratio)
        out.append(b)
    return out


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(cands: Sequence[str], refs: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score (coco-caption: max precision and max recall over references)."""
    c, r = _check(cands, refs)
    scores = []
    for cw, rws in zip(c, r, strict=True):
        if not cw:
            scores.append(0.0)
            continue
        lcs = [_lcs(cw, rw) for rw in rws]
        p = max(x / len(cw) for x in lcs)
        rec = max(x / len(rw) for x, rw in zip(lcs, rws, strict=True))
        scores.append(((1 + beta**2) * p * rec) / (rec + beta**2 * p) if p and rec else 0.0)
    return float(np.mean(scores))


def cider_d(cands: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as in coco-caption (document frequencies from the references of this set)."""
    c, r = _check(cands, refs)

    def counts(words: list[str]) -> Counter[tuple[str, ...]]:
        out: Counter[tuple[str, ...]] = Counter()
        for k in range(1, n + 1):
            out.update(_ngrams(words, k))
        return out

    crefs = [[counts(rw) for rw in rws] for rws in r]
    df: Counter[tuple[str, ...]] = Counter()
    for rs in crefs:
        df.update({g for rc in rs for g in rc})
    log_n = math.log(float(len(crefs)))

    def vec(cnt: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnt.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_n - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # coco-caption counts the length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for cw, rs in zip(c, crefs, strict=True):
        vh, nh, lh = vec(counts(cw))
        total = np.zeros(n)
        for rc in rs:
            vr, nr, lr = vec(rc)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(float(np.mean(total)) / len(rs) * 10.0)
    return float(np.mean(scores))


class MeteorUnavailableError(RuntimeError):
    """METEOR cannot be computed here: ``pycocoevalcap`` is not installed, ``java`` is not on PATH, or the
    METEOR java process failed. The message says which."""


class MeteorUnavailableWarning(UserWarning):
    """``caption_metrics(with_meteor=None)`` left METEOR out because it cannot be computed here."""


def coco_available() -> bool:
    """Whether ``pycocoevalcap`` (the coco-caption scorers) is importable."""
    return importlib.util.find_spec("pycocoevalcap") is not None


def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (METEOR runs the METEOR 1.5 jar with it)."""
    return shutil.which("java") is not None


def _coco_inputs(c: list[list[str]], r: list[list[list[str]]]) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """``(gts, res)`` in coco-caption's layout: ``{i: [reference, ...]}``, ``{i: [candidate]}``, space-joined tokens."""
    gts = {i: [" ".join(w) for w in rws] for i, rws in enumerate(r)}
    res = {i: [" ".join(cw)] for i, cw in enumerate(c)}
    return gts, res


def coco_scores(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr"}`` from ``pycocoevalcap``'s ``Bleu(4)``, ``Rouge``, ``Cider``.

    Same input checks and tokenisation as :func:`bleu`; raises ``RuntimeError`` when ``pycocoevalcap`` is
    not installed. Pure Python (no Java).
    """
    c, r = _check(cands, refs)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise RuntimeError("pycocoevalcap is not installed (pip install pycocoevalcap; it is in the dev extra)") from e
    gts, res = _coco_inputs(c, r)
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{k + 1}": float(b[k]) for k in range(4)}
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def meteor(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 through ``pycocoevalcap`` (starts ``java -jar meteor-1.5.jar``; a few seconds).

    Raises:
        MeteorUnavailableError: ``pycocoevalcap`` missing, no ``java`` on PATH, or the java process
            failed (its stderr is quoted). The METEOR process is always shut down.
    """
    c, r = _check(cands, refs)
    if not coco_available():
        raise MeteorUnavailableError(
            "METEOR needs pycocoevalcap, which is not installed (pip install pycocoevalcap; it is in the dev extra)"
        )
    if not java_available():
        raise MeteorUnavailableError(
            "METEOR needs Java, but there is no `java` on PATH: install a Java runtime (Debian/Ubuntu, as root: "
            "apt-get install default-jre-headless; scripts/venv.sh does this) or score without METEOR "
            "(with_meteor=False)"
        )
    from pycocoevalcap.meteor.meteor import Meteor

    gts, res = _coco_inputs(c, r)
    try:
        scorer = Meteor()
    except OSError as e:
        raise MeteorUnavailableError(f"METEOR could not start java: {e}") from e
    proc = scorer.meteor_p
    try:
        score, _ = scorer.compute_score(gts, res)
    except (OSError, ValueError) as e:  # java died: broken pipe, or an empty line where a number was due
        proc.kill()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise MeteorUnavailableError(
            f"METEOR's java process failed ({type(e).__name__}: {e}); java said: {err[-800:] or '(nothing)'}"
        ) from e
    finally:
        if scorer.lock.locked():  # compute_score holds it when it fails; Meteor.__del__ would wait forever
            scorer.lock.release()
        for fh in (proc.stdin, proc.stdout, proc.stderr):
            if fh is not None:
                with contextlib.suppress(OSError):  # closing stdin flushes into a dead java: BrokenPipeError
                    fh.close()
        proc.kill()
        proc.wait()
    return float(score)


def caption_metrics(
    cands: Sequence[str],
    refs: Sequence[Sequence[str]],
    with_meteor: bool | None = False,
    backend: str = "auto",
) -> dict[str, float]:
    """``{"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}`` (+ ``"METEOR"``), all in [0, 1] except CIDEr (in [0, 10]).

    Args:
        cands: one generated caption per item; refs: its reference captions (a non-empty list each).
        with_meteor: True: add METEOR (:func:`meteor`; raises :class:`MeteorUnavailableError` saying what is
            missing); None: add it when it can be computed, else warn (:class:`MeteorUnavailableWarning`)
            and leave it out; False: no METEOR.
        backend: ``"auto"`` (``pycocoevalcap`` when installed, else ours), ``"pycocoevalcap"`` (required)
            or ``"ours"`` (:func:`bleu`, :func:`rouge_l`, :func:`cider_d`; equal to ``pycocoevalcap``).
    """
    if backend not in ("auto", "pycocoevalcap", "ours"):
        raise ValueError(f"backend must be 'auto', 'pycocoevalcap' or 'ours', got {backend!r}")
    if with_meteor not in (True, False, None):
        raise ValueError(f"with_meteor must be True, False or None, got {with_meteor!r}")
    if backend == "pycocoevalcap" or (backend == "auto" and coco_available()):
        s = coco_scores(cands, refs)
        out = {k: s[k] for k in ("BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")}
    else:
        b = bleu(cands, refs, 4)
        out = {"BLEU-3": b[2], "BLEU-4": b[3], "ROUGE-L": rouge_l(cands, refs), "CIDEr": cider_d(cands, refs)}
    if with_meteor is None:
        try:
            out["METEOR"] = meteor(cands, refs)
        except MeteorUnavailableError as e:
            warnings.warn(f"METEOR left out: {e}", MeteorUnavailableWarning, stacklevel=2)
    elif with_meteor:
        out["METEOR"] = meteor(cands, refs)
    return out
