"""The MELTR testbed: pretraining on one domain of digit clips, fine-tuning on a shifted one.

The paper pretrains UniVL on HowTo100M and fine-tunes on MSRVTT: other videos, other words, little
labelled data. :func:`make_testbed` builds the same situation from real handwriting
(``sklearn.datasets.load_digits``) moving on a 32x32 canvas, 8 frames per clip, 2 pixels per frame.

Source domain (splits ``pretrain``, ``pretrain_val``): one digit, no distractor, one caption style::

    "the digit seven starts at the top left and moves right then down"

Target domain (splits ``train``, ``meta``, ``val``, ``test``): two different moving digits, a static
unmentioned distractor digit at half intensity (probability ``p_distractor``), handwriting held out
from pretraining, and a caption style whose motion words never occur in pretraining::

    "a seven glides from the upper left rightward and then downward while a three drifts from the
     lower center upward"

Words: digit names and the column words (left, center, right) are shared by both styles; the target's
verbs (slides, drifts, glides, travels), directions (leftward, rightward, upward, downward), row
words (upper, central, lower) and glue (a, from, while) are new (:data:`TARGET_ONLY_WORDS`). A start
position is the 3x3 cell (rows and columns of the top-left corner's range 0..24 cut at 9 and 17) in
which the digit starts.

Splits draw their handwriting from disjoint pools of ``load_digits`` (by image index: pretraining
35 %, pretraining val 10 %, target train + meta 15 %, target val 15 %, target test 25 %). Captions
are unique within and across the target splits and within ``pretrain_val`` (a clip whose caption
was already drawn is redrawn), so every retrieval query has exactly one right answer. The default
sizes keep the target's labelled data small (train 256 + meta 64 = 320 pairs) and the test gallery
at 1,000 clips (one R@1 point = 10 hits).

Features (``features=``): ``"cnn"`` (default) is the frozen :mod:`~examples.meltr_video.features`
encoder trained on the pretraining pool's handwriting, 1024-d per frame; ``"pixels"`` the flattened
32x32 frames. Each record carries its clip's parameters in ``info`` (digits, motions, start cells,
distractor), so tests and question generators need not parse captions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .data import (
    CANVAS,
    DIGIT,
    DIGIT_WORDS,
    DIRECTIONS,
    DigitSplits,
    Tokenizer,
    VideoTextDataset,
    VideoTextRecord,
    _digits,
    _paste,
    _trajectory,
)

__all__ = [
    "SOURCE_SPLITS",
    "TARGET_ONLY_WORDS",
    "TARGET_SPLITS",
    "TESTBED_SIZES",
    "caption",
    "make_testbed",
    "testbed_tokenizer",
]

SOURCE_SPLITS = ("pretrain", "pretrain_val")
TARGET_SPLITS = ("train", "meta", "val", "test")
TESTBED_SIZES: dict[str, int] = {
    "pretrain": 4000,
    "pretrain_val": 200,
    "train": 256,
    "meta": 64,
    "val": 250,
    "test": 1000,
}
#: handwriting pool of each split (fractions of ``load_digits`` after a seeded permutation)
_POOLS = {"pretrain": 0, "pretrain_val": 1, "train": 2, "meta": 2, "val": 3, "test": 4}
_POOL_CUTS = (0.35, 0.10, 0.15, 0.15)  # the last pool (test) takes the remaining 25 %
_ROWS = {"source": ("top", "middle", "bottom"), "target": ("upper", "central", "lower")}
_COLS = ("left", "center", "right")
_DIRS = {
    "source": {d: d for d in DIRECTIONS},
    "target": {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"},
}
_VERBS = {"source": ("moves",), "target": ("slides", "drifts", "glides", "travels")}
_SOURCE_WORDS = ("the", "digit", "starts", "at", "and", "then", *_ROWS["source"], *_COLS, *DIRECTIONS)
_TARGET_WORDS = ("a", "from", "while", "and", "then", *_ROWS["target"], *_COLS, *_VERBS["target"])
_TARGET_WORDS = (*_TARGET_WORDS, *_DIRS["target"].values())
#: words of target captions that no pretraining caption contains
TARGET_ONLY_WORDS = tuple(sorted(set(_TARGET_WORDS) - set(_SOURCE_WORDS) - set(DIGIT_WORDS)))


def testbed_tokenizer() -> Tokenizer:
    """The fixed vocabulary of both caption styles (as a pretrained model's vocabulary holds words its
    pretraining never used): digit names, then the source words, then the target-only words."""
    words = [*DIGIT_WORDS, *_SOURCE_WORDS, *_VERBS["source"], *TARGET_ONLY_WORDS]
    return Tokenizer(dict.fromkeys(words))


def _cell(coord: int) -> int:
    """Third of the 0..24 range of a top-left coordinate: 0..8 -> 0, 9..16 -> 1, 17..24 -> 2."""
    return 0 if coord <= 8 else 1 if coord <= 16 else 2


def caption(style: str, digit: int, motion: tuple[str, ...], start: tuple[int, int], verb: int = 0) -> str:
    """One digit's phrase in ``style`` (``"source"`` or ``"target"``); ``start`` = (row cell, column cell)."""
    rows, dirs = _ROWS[style], _DIRS[style]
    where = f"{rows[start[0]]} {_COLS[start[1]]}"
    if style == "source":
        path = " then ".join(dirs[m] for m in motion)
        return f"the digit {DIGIT_WORDS[digit]} starts at the {where} and moves {path}"
    path = " and then ".join(dirs[m] for m in motion)
    return f"a {DIGIT_WORDS[digit]} {_VERBS['target'][verb]} from the {where} {path}"


def _draw_digit(rng: np.random.Generator, frames: int, speed: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """A motion, the per-frame offsets and a start (top-left row, col) that keeps the digit on the canvas."""
    words, off = _trajectory(rng, frames, speed)
    lo = np.maximum(0, -off.min(axis=0))
    hi = CANVAS - DIGIT - off.max(axis=0)
    start = np.array([rng.integers(lo[k], hi[k] + 1) for k in range(2)])
    return tuple(words), off, start


def make_testbed(
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
    features: str = "cnn",
    frames: int = 8,
    speed: int = 2,
    noise: float = 0.05,
    p_distractor: float = 0.7,
    keep_frames: bool = False,
    cache_dir: Any = "runs/features",
) -> DigitSplits:
    """Build the testbed's splits (deterministic from ``seed``).

    Args:
        sizes: clips per split; keys among :data:`SOURCE_SPLITS` and :data:`TARGET_SPLITS` (default
            :data:`TESTBED_SIZES`). A split left out is not built.
        features: ``"cnn"`` (frozen digit CNN, :func:`~examples.meltr_video.features.frame_encoder`,
            cached in ``cache_dir``) or ``"pixels"`` (flattened frames). Both 1024-d per frame.
        keep_frames: also keep the raw frames ``[N, frames, 32, 32]`` as each split's ``.frames``.
    Returns:
        :class:`~examples.meltr_video.data.DigitSplits` with :func:`testbed_tokenizer`; every record's
        ``features`` is float32 ``[frames, 1024]`` and ``info`` holds ``style``, ``digits``,
        ``motions``, ``starts`` (cells), ``distractor`` (digit or None) and ``images`` (the ``load_digits``
        indices pasted, distractor first).
    Raises:
        ValueError for an unknown split or feature kind, a negative size, or sizes whose unique
        captions cannot be drawn.
    """
    sizes = dict(TESTBED_SIZES if sizes is None else sizes)
    for k, v in sizes.items():
        if k not in _POOLS:
            raise ValueError(f"unknown split {k!r}; testbed splits are {list(_POOLS)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"size of split {k!r} must be a non-negative int, got {v!r}")
    if features not in ("cnn", "pixels"):
        raise ValueError(f"features must be 'cnn' or 'pixels', got {features!r}")
    if speed * (frames - 1) > CANVAS - DIGIT or frames < 2:
        raise ValueError(f"{frames} frames at speed {speed} do not fit the {CANVAS}px canvas")
    images, labels = _digits()
    perm = np.random.default_rng(seed).permutation(len(images))
    pools = np.split(perm, (np.cumsum(_POOL_CUTS) * len(images)).astype(int))
    encoder = None
    if features == "cnn":
        from .features import frame_encoder

        encoder = frame_encoder(images[pools[0]], labels[pools[0]], cache_dir=cache_dir)
    seen: set[str] = set()  # captions of the target splits (unique across them)
    out: dict[str, VideoTextDataset] = {}
    for name in [n for n in (*SOURCE_SPLITS, *TARGET_SPLITS) if n in sizes]:
        n = sizes[name]
        style = "source" if name in SOURCE_SPLITS else "target"
        unique = name != "pretrain"
        taken = seen if style == "target" else set()
        pool = pools[_POOLS[name]]
        by_label = {d: pool[labels[pool] == d] for d in range(10)}
        rng = np.random.default_rng([seed, sum(map(ord, name)), 11])
        clips = np.zeros((n, frames, CANVAS, CANVAS), dtype=np.float32)
        infos: list[dict[str, Any]] = []
        caps: list[str] = []
        for i in range(n):
            for _attempt in range(1000):
                canvas = np.zeros((frames, CANVAS, CANVAS), dtype=np.float32)
                info: dict[str, Any] = {
                    "style": style, "digits": [], "motions": [], "starts": [], "distractor": None, "images": [],
                }  # fmt: skip
                if style == "target" and rng.random() < p_distractor:
                    d = int(rng.integers(10))
                    k = int(rng.choice(by_label[d]))
                    img = images[k]
                    info["images"].append(k)
                    r, c = rng.integers(0, CANVAS - DIGIT + 1, size=2)
                    for t in range(frames):
                        _paste(canvas[t], img, int(r), int(c), 0.5)
                    info["distractor"] = d
                digits = [int(rng.integers(10))]
                if style == "target":
                    digits.append(int(rng.choice([d for d in range(10) if d != digits[0]])))
                parts = []
                for d in digits:
                    k = int(rng.choice(by_label[d]))
                    img = images[k]
                    info["images"].append(k)
                    motion, off, start = _draw_digit(rng, frames, speed)
                    for t in range(frames):
                        _paste(canvas[t], img, int(start[0] + off[t, 0]), int(start[1] + off[t, 1]))
                    cell = (_cell(int(start[0])), _cell(int(start[1])))
                    verb = int(rng.integers(len(_VERBS[style])))
                    parts.append(caption(style, d, motion, cell, verb))
                    info["digits"].append(d)
                    info["motions"].append(motion)
                    info["starts"].append(cell)
                cap = " while ".join(parts)
                if not unique or cap not in taken:
                    break
            else:
                raise ValueError(f"split {name!r}: cannot draw {n} clips with unique captions")
            if unique:
                taken.add(cap)
            if noise:
                canvas += noise * rng.standard_normal(canvas.shape).astype(np.float32)
            clips[i] = canvas
            infos.append(info)
            caps.append(cap)
        if encoder is not None:
            from .features import encode_frames

            feats = encode_frames(encoder, clips)
        else:
            feats = clips.reshape(n, frames, CANVAS * CANVAS)
        records = [
            VideoTextRecord(f"{name}{i:05d}", caps[i], np.ascontiguousarray(feats[i]), infos[i]) for i in range(n)
        ]
        out[name] = VideoTextDataset(records, frames=clips if keep_frames else None)
    return DigitSplits(out, tokenizer=testbed_tokenizer())
