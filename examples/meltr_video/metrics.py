"""Retrieval and captioning metrics.

Retrieval (MATH.md section 6), for a similarity matrix ``S`` [texts, videos] and the true video
``t(i)`` of each text ``i``::

    rank_i = #{j : S_ij > S_i,t(i)} + #{j != t(i) : S_ij = S_i,t(i)}     (0-based; ties count against)
    R@k    = 100 * share of texts with rank_i < k
    MedR   = median_i(rank_i) + 1,   MeanR = mean_i(rank_i) + 1

Ties are broken pessimistically, so a constant score matrix gives R@1 = 0, not a lucky number.

Captioning (coco-caption definitions, re-implemented here; numbers match ``pycocoevalcap`` 1.2 on
pre-tokenised text):

    BLEU-N   corpus level: clipped n-gram precisions p_n summed over the corpus (with coco's
             1e-15 / 1e-9 smoothing), brevity penalty with the closest reference length,
             BLEU-N = BP * (prod_{n<=N} p_n)^(1/N)
    ROUGE-L  per caption: LCS with each reference, P = max LCS/|c|, R = max LCS/|r|,
             F = (1 + b^2) P R / (R + b^2 P), b = 1.2; averaged over captions
    CIDEr-D  tf-idf n-gram vectors (n = 1..4, document frequency over the references of the
             evaluated set), clipped cosine with each reference times exp(-(l_c - l_r)^2 / (2 * 6^2)),
             mean over n and references, times 10; averaged over captions
    METEOR   needs Java and the METEOR 1.5 jar: :func:`meteor` uses ``pycocoevalcap`` when it is
             installed (``pip install --no-deps pycocoevalcap``), else raises ``RuntimeError``.

Text is tokenised by lower-casing and keeping runs of letters, digits and apostrophes (coco uses
the Stanford PTB tokenizer, which also drops punctuation).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["bleu", "caption_metrics", "cider_d", "meteor", "retrieval_metrics", "retrieval_ranks", "rouge_l"]


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


def meteor(cands: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """METEOR 1.5 through ``pycocoevalcap`` (needs the package and a ``java`` on PATH)."""
    _check(cands, refs)
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError as e:
        raise RuntimeError(
            "METEOR needs pycocoevalcap (pip install --no-deps pycocoevalcap) and Java; it is not installed"
        ) from e
    gts = {i: [" ".join(_tok(x)) for x in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(_tok(x))] for i, x in enumerate(cands)}
    try:
        score, _ = Meteor().compute_score(gts, res)
    except (OSError, FileNotFoundError) as e:
        raise RuntimeError(f"METEOR could not start Java: {e}") from e
    return float(score)


def caption_metrics(
    cands: Sequence[str], refs: Sequence[Sequence[str]], with_meteor: bool = False
) -> Mapping[str, float]:
    """``{"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}`` (+ ``"METEOR"`` when asked), all in [0, 1] except CIDEr."""
    b = bleu(cands, refs, 4)
    out = {"BLEU-3": b[2], "BLEU-4": b[3], "ROUGE-L": rouge_l(cands, refs), "CIDEr": cider_d(cands, refs)}
    if with_meteor:
        out["METEOR"] = meteor(cands, refs)
    return out
