"""Video-text data for the MELTR example: an offline default set and loaders for the real formats.

Offline default (:func:`make_digit_clips`): short clips of real handwritten digits
(``sklearn.datasets.load_digits``, 8x8, upscaled to nothing: pasted as is) moving on a 32x32 canvas.
One frame is 32*32 = 1024 values, the width of UniVL's S3D features. A clip has ``frames`` (8)
frames and a caption from a small grammar::

    "the digit seven moves left then up"
    "the digit three moves down and the digit five moves right"

Retrieval is made hard on purpose: the same digit appears with many motions, two-digit clips share
digits with one-digit clips, a static unmentioned distractor digit is often present, pixels get
Gaussian noise, and each split draws its digit images from its own disjoint pool of handwriting.

Real formats, as UniVL distributes them:
    MSRVTT:   a pickle ``{video_id: float array [frames, 1024]}``, CSV split files with a
              ``video_id`` column (and a ``sentence`` column for the test split), and
              ``MSRVTT_data.json`` with ``{"sentences": [{"video_id", "caption"}, ...]}``.
    YouCook2: a features pickle ``{video_id: [seconds, 1024]}``, a caption pickle
              ``{video_id: {"start": [n], "end": [n], "text": [n]}}`` (whole seconds) and a CSV with
              ``video_id``.
Pickles are read with :class:`RestrictedUnpickler` (numpy arrays and plain containers only). Every
malformed input is a ``ValueError`` naming the file (and the video id where there is one): files that
are not UTF-8, malformed JSON or CSV rows, complex / non-numeric / ragged / non-finite features (never
cast), segment bounds that are fractional or outside the features (``load_youcook2(clip_segments=True)``
cuts segments that end past the last feature, as UniVL does). A failed load returns nothing and changes
no file.

Batches (:class:`Collate`) are dicts of tensors; masks for the masked pretext losses are drawn
there, from a seeded generator, so the backbone's forward is a deterministic function of the batch.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import numbers
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGIT_WORDS",
    "DIRECTIONS",
    "SPECIAL_TOKENS",
    "Collate",
    "DigitSplits",
    "RestrictedUnpickler",
    "Tokenizer",
    "UnsafePickleError",
    "VideoTextDataset",
    "VideoTextRecord",
    "load_msrvtt",
    "load_youcook2",
    "make_digit_clips",
    "msrvtt_splits",
    "safe_load_pickle",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]", "[UNK]")
CANVAS = 32
DIGIT = 8
DEFAULT_SIZES: dict[str, int] = {"pretrain": 2000, "train": 160, "meta": 96, "val": 200, "test": 300}


# --------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class VideoTextRecord:
    """One (video, caption) pair. ``features``: float32 ``[frames, dim]``; ``info``: the generating
    parameters of a synthetic clip (None for real data)."""

    video_id: str
    caption: str
    features: np.ndarray
    info: Mapping[str, Any] | None = field(default=None, compare=False)


class VideoTextDataset(torch.utils.data.Dataset):
    """A list of :class:`VideoTextRecord`; items are dicts ``{"index", "video_id", "caption", "features"}``.

    Attributes:
        records: the pairs. ``frames`` (optional): raw frames ``[N, F, 32, 32]`` of the digit clips.
    """

    def __init__(self, records: Sequence[VideoTextRecord], frames: np.ndarray | None = None):
        self.records = list(records)
        self.frames = frames

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        return {"index": i, "video_id": r.video_id, "caption": r.caption, "features": r.features}

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]


# ------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A word-level tokenizer: lower-case, words of letters/digits/apostrophes, unknown -> ``[UNK]``.

    Ids 0..6 are the special tokens ``[PAD] [CLS] [SEP] [MASK] [BOS] [EOS] [UNK]``.
    """

    _word = re.compile(r"[a-z0-9']+")

    def __init__(self, words: Iterable[str]):
        vocab = list(SPECIAL_TOKENS)
        for w in words:
            if w not in vocab:
                vocab.append(w)
        self.vocab: list[str] = vocab
        self.ids: dict[str, int] = {w: i for i, w in enumerate(vocab)}
        (self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.bos_id, self.eos_id, self.unk_id) = (
            self.ids[t] for t in SPECIAL_TOKENS
        )

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def for_digits(cls) -> Tokenizer:
        """The closed vocabulary of the digit-clip grammar, then the words of the QA questions (``qa.py``).

        The caption words keep their ids (7..25); the question words are appended after them.
        """
        caption = ["the", "digit", "moves", "then", "and", *DIGIT_WORDS, *DIRECTIONS]
        question = ["what", "does", "do", "after", "before", "moving", "which", "where", "move", "first", "last"]
        return cls([*caption, *question, "how", "many", "digits"])

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Vocabulary of the words seen at least ``min_count`` times (sorted by count, then word)."""
        counts: dict[str, int] = {}
        for c in captions:
            for w in cls.split(c):
                counts[w] = counts.get(w, 0) + 1
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words)

    @classmethod
    def split(cls, text: str) -> list[str]:
        return cls._word.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (no special tokens added)."""
        return [self.ids.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids``, stopping at ``[EOS]`` and skipping the other special tokens."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i < len(SPECIAL_TOKENS) and i != self.unk_id:
                continue
            out.append(self.vocab[i])
        return " ".join(out)


# -------------------------------------------------------------------------------- digit clips


@dataclass
class DigitSplits:
    """The digit-clip splits, each a :class:`VideoTextDataset` (with ``.frames``)."""

    splits: dict[str, VideoTextDataset]
    tokenizer: Tokenizer = field(default_factory=Tokenizer.for_digits)

    def __getitem__(self, name: str) -> VideoTextDataset:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; splits are {list(self.splits)}")
        return self.splits[name]


def _trajectory(rng: np.random.Generator, frames: int, speed: int) -> tuple[list[str], np.ndarray]:
    """Motion words and per-frame offsets ``[frames, 2]`` (row, col) relative to the start."""
    names = list(DIRECTIONS)
    first = names[rng.integers(4)]
    if rng.random() < 0.5:
        words = [first]
        steps = [first] * (frames - 1)
    else:
        second = rng.choice([n for n in names if n != first])
        words = [first, str(second)]
        half = frames // 2
        steps = [first] * half + [str(second)] * (frames - 1 - half)
    off = np.zeros((frames, 2), dtype=np.int64)
    for t, s in enumerate(steps, start=1):
        off[t] = off[t - 1] + speed * np.array(DIRECTIONS[s])
    return words, off


def _paste(canvas: np.ndarray, img: np.ndarray, r: int, c: int, scale: float = 1.0) -> None:
    np.maximum(canvas[r : r + DIGIT, c : c + DIGIT], scale * img, out=canvas[r : r + DIGIT, c : c + DIGIT])


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits`` images scaled to [0, 1] (float32 [1797, 8, 8]) and labels (read once)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.flags.writeable = False
    return images, d.target


@functools.cache
def _projection() -> np.ndarray:
    """The fixed random orthogonal 1024x1024 matrix (seed 1234) of the projected features."""
    q, _ = np.linalg.qr(np.random.default_rng(1234).standard_normal((CANVAS * CANVAS, CANVAS * CANVAS)))
    q = q.astype(np.float32)
    q.flags.writeable = False
    return q


def make_digit_clips(
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
    frames: int = 8,
    speed: int = 2,
    noise: float = 0.05,
    p_two: float = 0.4,
    p_distractor: float = 0.5,
    projection: bool = False,
) -> DigitSplits:
    """Build the offline video-text splits (deterministic from ``seed``).

    Args:
        sizes: clips per split (default :data:`DEFAULT_SIZES`: pretrain 2000, train 160, meta 96,
            val 200, test 300). Each split draws digit images from its own pool of ``load_digits``.
        frames: frames per clip; motions take ``frames - 1`` steps of ``speed`` pixels.
        noise: std of the Gaussian pixel noise (pixels are in [0, 1]).
        p_two: probability of a clip with two moving digits.
        p_distractor: probability of a static, unmentioned distractor digit at half intensity.
        projection: if True, features are the flattened frames times a fixed random orthogonal
            1024x1024 matrix (seed 1234, the same for every data seed); else the flattened pixels.
    Returns:
        :class:`DigitSplits`; every record's ``features`` is float32 ``[frames, 1024]`` and each
        split's ``frames`` is ``[N, frames, 32, 32]``.
    """
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"size of split {k!r} must be a non-negative int, got {v!r}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    if speed * (frames - 1) > CANVAS - DIGIT:
        raise ValueError(f"speed*(frames-1) = {speed * (frames - 1)} does not fit the {CANVAS}px canvas")
    images, labels = _digits()
    rng = np.random.default_rng(seed)
    # disjoint handwriting pools: pretrain 40%, train+meta 20%, val 20%, test 20%
    perm = rng.permutation(len(images))
    cut = np.cumsum([0.4, 0.2, 0.2]) * len(images)
    pools_idx = np.split(perm, cut.astype(int))
    pool_of = {"pretrain": 0, "train": 1, "meta": 1, "val": 2, "test": 3}
    proj = _projection() if projection else None
    out: dict[str, VideoTextDataset] = {}
    for name, n in sizes.items():
        pool = pools_idx[pool_of.get(name, 0)]
        by_label = {d: pool[labels[pool] == d] for d in range(10)}
        srng = np.random.default_rng([seed, sum(map(ord, name))])
        clips = np.zeros((n, frames, CANVAS, CANVAS), dtype=np.float32)
        records = []
        for i in range(n):
            canvas = clips[i]
            if srng.random() < p_distractor:
                d = int(srng.integers(10))
                img = images[srng.choice(by_label[d])]
                r, c = srng.integers(0, CANVAS - DIGIT + 1, size=2)
                for t in range(frames):
                    _paste(canvas[t], img, int(r), int(c), 0.5)
            parts = []
            for _ in range(2 if srng.random() < p_two else 1):
                d = int(srng.integers(10))
                img = images[srng.choice(by_label[d])]
                words, off = _trajectory(srng, frames, speed)
                lo = np.maximum(0, -off.min(axis=0))
                hi = CANVAS - DIGIT - off.max(axis=0)
                start = np.array([srng.integers(lo[k], hi[k] + 1) for k in range(2)])
                for t in range(frames):
                    _paste(canvas[t], img, int(start[0] + off[t, 0]), int(start[1] + off[t, 1]))
                parts.append(f"the digit {DIGIT_WORDS[d]} moves {' then '.join(words)}")
            if noise:
                canvas += noise * srng.standard_normal(canvas.shape).astype(np.float32)
            feats = canvas.reshape(frames, CANVAS * CANVAS)
            if proj is not None:
                feats = feats @ proj
            records.append(VideoTextRecord(f"{name}{i:05d}", " and ".join(parts), feats))
        out[name] = VideoTextDataset(records, frames=clips)
    return DigitSplits(out)


# ------------------------------------------------------------------------------------- collate


class Collate:
    """Items -> a batch dict of tensors, with the masks of the masked pretext losses.

    Keys (B items, Lt = max_words + 2, Lc = max_words + 1, F = max_frames or the longest clip):
        ``index`` [B] long; ``text`` [B, Lt] ``[CLS] w.. [SEP] [PAD]..``; ``text_mask`` [B, Lt] bool
        (True = real token); ``masked_text`` [B, Lt] (each word -> ``[MASK]`` w.p. ``mask_prob``,
        at least one per caption unless ``mask_prob`` is 0); ``mlm_labels`` [B, Lt] (the word where masked, else -100);
        ``video`` [B, F, D] float; ``video_mask`` [B, F] bool; ``masked_video`` [B, F, D] (masked
        frames zeroed); ``mfm_mask`` [B, F] bool (at least one real frame per clip);
        ``caption_in`` [B, Lc] ``[BOS] w..``; ``caption_out`` [B, Lc] ``w.. [EOS]`` with -100 on padding.

    Clips longer than ``max_frames`` are subsampled uniformly; captions longer than ``max_words`` are
    truncated. Masks come from a ``torch.Generator`` seeded with ``seed``: the same items in the same
    order give the same batches.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_words: int = 20,
        max_frames: int | None = None,
        mask_prob: float = 0.15,
        seed: int = 0,
    ):
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob}")
        self.tok = tokenizer
        self.max_words = max_words
        self.max_frames = max_frames
        self.mask_prob = mask_prob
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        tok, B = self.tok, len(items)
        words = [tok.encode(it["caption"])[: self.max_words] for it in items]
        for it, w in zip(items, words, strict=True):
            if not w:
                raise ValueError(f"empty caption for video {it.get('video_id')!r}")
        Lt, Lc = self.max_words + 2, self.max_words + 1
        text = torch.full((B, Lt), tok.pad_id, dtype=torch.long)
        cin = torch.full((B, Lc), tok.pad_id, dtype=torch.long)
        cout = torch.full((B, Lc), -100, dtype=torch.long)
        for b, w in enumerate(words):
            n = len(w)
            text[b, : n + 2] = torch.tensor([tok.cls_id, *w, tok.sep_id])
            cin[b, : n + 1] = torch.tensor([tok.bos_id, *w])
            cout[b, : n + 1] = torch.tensor([*w, tok.eos_id])
        text_mask = text != tok.pad_id
        word_pos = text_mask & (text != tok.cls_id) & (text != tok.sep_id)
        mlm = (torch.rand(B, Lt, generator=self.gen) < self.mask_prob) & word_pos
        for b, w in enumerate(words):  # at least one masked word per caption (unless mask_prob = 0)
            if self.mask_prob > 0 and not mlm[b].any():
                mlm[b, 1 + int(torch.randint(len(w), (1,), generator=self.gen))] = True
        masked_text = torch.where(mlm, torch.full_like(text, tok.mask_id), text)
        mlm_labels = torch.where(mlm, text, torch.full_like(text, -100))

        feats = [self._frames(it) for it in items]
        F = self.max_frames or max(f.shape[0] for f in feats)
        D = feats[0].shape[1]
        video = torch.zeros(B, F, D)
        video_mask = torch.zeros(B, F, dtype=torch.bool)
        for b, (it, f) in enumerate(zip(items, feats, strict=True)):
            if f.shape[1] != D:
                raise ValueError(f"video {it.get('video_id')!r} has feature dim {f.shape[1]}, the batch has {D}")
            video[b, : f.shape[0]] = torch.as_tensor(f, dtype=torch.float32)
            video_mask[b, : f.shape[0]] = True
        mfm = (torch.rand(B, F, generator=self.gen) < self.mask_prob) & video_mask
        for b, f in enumerate(feats):
            if self.mask_prob > 0 and not mfm[b].any():
                mfm[b, int(torch.randint(f.shape[0], (1,), generator=self.gen))] = True
        masked_video = video.masked_fill(mfm.unsqueeze(-1), 0.0)
        return {
            "index": torch.tensor([int(it.get("index", b)) for b, it in enumerate(items)]),
            "text": text,
            "text_mask": text_mask,
            "masked_text": masked_text,
            "mlm_labels": mlm_labels,
            "video": video,
            "video_mask": video_mask,
            "masked_video": masked_video,
            "mfm_mask": mfm,
            "caption_in": cin,
            "caption_out": cout,
        }

    def _frames(self, item: Mapping[str, Any]) -> np.ndarray:
        f = np.asarray(item["features"])
        if f.ndim != 2 or f.shape[0] == 0:
            raise ValueError(f"video {item.get('video_id')!r}: features must be [frames>0, dim], got {f.shape}")
        if self.max_frames and f.shape[0] > self.max_frames:
            f = f[np.linspace(0, f.shape[0] - 1, self.max_frames).round().astype(int)]
        return f


# ------------------------------------------------------------------------------ safe unpickling


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global outside the allow-list (it may try to run code)."""


_NUMPY_GLOBALS = {
    (mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles
}
_BUILTINS = {
    ("builtins", n)
    for n in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "complex",
        "bool",
    )
}
_CONTAINERS = {("collections", "OrderedDict")}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays/dtypes/scalars and plain builtin containers and numbers.

    Any other global (``os.system``, ``builtins.eval``, arbitrary classes, ...) raises
    :class:`UnsafePickleError` (a ``pickle.UnpicklingError`` and a ``ValueError``) naming the file.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset(_NUMPY_GLOBALS | _BUILTINS | _CONTAINERS)

    def __init__(self, file: Any, name: str = "<pickle>"):
        super().__init__(file)
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.name}: refusing to unpickle global '{module}.{name}'; only numpy arrays and builtin "
            "containers/numbers are allowed (the file may try to run code)"
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Load a pickle with :class:`RestrictedUnpickler`. Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), name=str(path)).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated / corrupt files
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _load_features(path: str | Path, feature_dim: int) -> dict[str, np.ndarray]:
    """``{video_id: float32 [frames, feature_dim]}``; every array real (integer or floating dtype: complex,
    bool, string and object arrays are refused, not cast), finite and non-empty. Errors name the file and video."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict video_id -> array [frames, {feature_dim}], got {type(obj).__name__}")
    out = {}
    for vid, arr in obj.items():
        try:
            a = np.asarray(arr)
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise ValueError(f"{path}: video {vid!r} has features that are not an array ({e})") from e
        if a.ndim != 2 or a.shape[1] != feature_dim:
            raise ValueError(f"{path}: video {vid!r} has features of shape {a.shape}, expected [frames, {feature_dim}]")
        if a.shape[0] == 0:
            raise ValueError(f"{path}: video {vid!r} has no frames")
        if a.dtype.kind not in "iuf":
            what = "complex" if a.dtype.kind == "c" else "non-numeric"
            raise ValueError(f"{path}: video {vid!r} has {what} features (dtype {a.dtype}); expected real numbers")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: video {vid!r} has non-finite features (or values beyond float32)")
        if str(vid) in out:
            raise ValueError(f"{path}: two keys name video {str(vid)!r}")
        out[str(vid)] = a
    return out


def _read_csv(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV (a byte-order mark is allowed) with a header naming ``required`` columns.

    Raises ValueError naming the file (and the line) for bytes that are not UTF-8, a CSV the parser
    refuses, a missing column, or a row with more or fewer fields than the header (an unquoted comma
    would otherwise cut a caption silently).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        try:
            cols = reader.fieldnames or []
            missing = [c for c in required if c not in cols]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; columns are {cols}")
            rows = []
            for row in reader:
                extra = row.get(None) or []  # type: ignore[call-overload]  # DictReader's restkey
                short = sum(1 for k, v in row.items() if k is not None and v is None)  # its restval
                if extra or short:
                    raise ValueError(
                        f"{path}: line {reader.line_num} has {len(cols) + len(extra) - short} field(s), the header "
                        f"has {len(cols)} (quote fields that contain commas)"
                    )
                rows.append(row)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e
        except csv.Error as e:
            raise ValueError(f"{path}: not a readable CSV (line {reader.line_num}: {e})") from e
    return rows


def _read_json(path: str | Path) -> Any:
    """A UTF-8 JSON file; ValueError naming the file (and line/column) when it is not."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e


def _check_caption(text: Any, source: Path | str, vid: str) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{source}: caption for video {vid!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        raise ValueError(f"{source}: empty caption for video {vid!r}")
    return text.strip()


def load_msrvtt(
    features_path: str | Path,
    csv_path: str | Path,
    json_path: str | Path | None = None,
    feature_dim: int = 1024,
) -> VideoTextDataset:
    """MSRVTT as distributed with UniVL.

    Args:
        features_path: pickle ``{video_id: float array [frames, feature_dim]}``.
        csv_path: split file with a ``video_id`` column; if it also has ``sentence`` (the
            JSFusion test file: ``key,vid_key,video_id,sentence``), one pair per row.
        json_path: ``MSRVTT_data.json``; without a ``sentence`` column, every caption in its
            ``sentences`` list of a video in the CSV becomes a pair (UniVL's training setup).
    Raises:
        ValueError naming the file (and the video id where there is one) for a missing id, features that
        are not a real finite ``[frames, feature_dim]`` array (complex ones are refused, not cast), an
        empty caption, a CSV that is not UTF-8 or has a row of the wrong width, a JSON file that is not
        valid UTF-8 JSON or has a ``sentences`` entry that is not an object with a ``video_id`` string;
        :class:`UnsafePickleError` for a pickle that asks for anything but arrays.
    """
    feats = _load_features(features_path, feature_dim)
    rows = _read_csv(csv_path, ["video_id"])
    has_sentence = bool(rows) and "sentence" in rows[0]
    captions: dict[str, list[str]] = {}
    if not has_sentence:
        if json_path is None:
            raise ValueError(f"{csv_path}: no 'sentence' column, so the captions JSON (json_path) is required")
        meta = _read_json(json_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("sentences"), list):
            raise ValueError(f"{json_path}: expected an object with a 'sentences' list")
        for k, s in enumerate(meta["sentences"]):
            if not isinstance(s, dict):
                raise ValueError(
                    f"{json_path}: sentences[{k}] is a {type(s).__name__}, expected an object with "
                    "'video_id' and 'caption'"
                )
            vid = s.get("video_id")
            if not isinstance(vid, str) or not vid.strip():
                raise ValueError(f"{json_path}: sentences[{k}] has no video_id string (got {vid!r})")
            vid = vid.strip()
            captions.setdefault(vid, []).append(_check_caption(s.get("caption"), json_path, vid))
    records = []
    for row in rows:
        vid = row["video_id"].strip()
        if vid not in feats:
            raise ValueError(f"{features_path}: no features for video {vid!r} (listed in {csv_path})")
        if has_sentence:
            records.append(VideoTextRecord(vid, _check_caption(row["sentence"], csv_path, vid), feats[vid]))
        else:
            if vid not in captions:
                raise ValueError(f"{json_path}: no caption for video {vid!r} (listed in {csv_path})")
            records.extend(VideoTextRecord(vid, c, feats[vid]) for c in captions[vid])
    if not records:
        raise ValueError(f"{csv_path}: no videos listed")
    return VideoTextDataset(records)


def msrvtt_splits(
    features_path: str | Path,
    train_csv: str | Path,
    json_path: str | Path | None,
    test_csv: str | Path,
    meta_videos: int,
    val_videos: int,
    train_videos: int | None = None,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    max_frames: int | None = None,
    feature_dim: int = 1024,
) -> DigitSplits:
    """MSRVTT text-to-video retrieval splits from the files UniVL distributes, with ``meta`` and ``val``
    carved from the training videos.

    Args:
        features_path: the features pickle ``{video_id: float array [frames, feature_dim]}`` (read with
            :func:`safe_load_pickle`, twice: once per CSV).
        train_csv: ``MSRVTT_train.7k.csv`` or ``MSRVTT_train.9k.csv`` (a ``video_id`` column); with
            ``json_path`` (``MSRVTT_data.json``) every caption of each listed video becomes a pair
            (:func:`load_msrvtt`; ``json_path`` may be None only if the CSV has a ``sentence`` column).
        test_csv: ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,video_id,sentence``): the ``test`` split
            is its pairs, one per row, in its order.
        meta_videos, val_videos: videos of the training CSV moved to the ``meta`` and ``val`` splits:
            the distinct training videos (sorted) are shuffled with ``numpy.random.default_rng(seed)``;
            the first ``meta_videos`` go to ``meta``, the next ``val_videos`` to ``val``, the rest (or
            the next ``train_videos`` of them) to ``train``. All captions of a video stay in its split.
        tokenizer: the vocabulary of the returned splits. A pretrained backbone needs its own (pass
            it): words outside it become ``[UNK]``. None: :meth:`Tokenizer.from_captions` of ``train``.
        max_frames: clips with more frames are subsampled uniformly to ``max_frames`` (as
            :class:`Collate` does), e.g. the backbone's position table; None keeps every frame.
    Returns:
        :class:`DigitSplits` with ``train``, ``meta``, ``val``, ``test``.
    Raises:
        ValueError naming ``train_csv`` when it has too few videos for the requested splits, naming
        both CSVs when a test video is also a training video, and the errors of :func:`load_msrvtt`.
    """
    checks = (
        ("meta_videos", meta_videos, 0, False),
        ("val_videos", val_videos, 0, False),
        ("train_videos", train_videos, 1, True),
        ("max_frames", max_frames, 1, True),
    )
    for name, v, lo, optional in checks:
        if v is None and optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= {lo}, got {v!r}")
    train_all = load_msrvtt(features_path, train_csv, json_path, feature_dim)
    test = load_msrvtt(features_path, test_csv, None, feature_dim)
    vids = sorted({r.video_id for r in train_all.records})
    n_train = len(vids) - meta_videos - val_videos
    if n_train < (train_videos or 1):
        want = "at least one" if train_videos is None else str(train_videos)
        raise ValueError(
            f"{train_csv}: only {len(vids)} training videos, too few for meta {meta_videos} + val {val_videos} "
            f"+ {want} training video(s)"
        )
    overlap = sorted({r.video_id for r in test.records} & set(vids))
    if overlap:
        raise ValueError(
            f"{test_csv}: {len(overlap)} test video(s) are also in the training file {train_csv} (e.g. {overlap[0]!r})"
        )
    perm = np.random.default_rng(seed).permutation(len(vids))
    order = [vids[i] for i in perm]
    split_of = {v: "meta" for v in order[:meta_videos]}
    split_of.update({v: "val" for v in order[meta_videos : meta_videos + val_videos]})
    rest = order[meta_videos + val_videos :]
    split_of.update({v: "train" for v in (rest if train_videos is None else rest[:train_videos])})
    cut: dict[int, np.ndarray] = {}  # subsampled features, one array per distinct array (shared by captions)

    def frames(f: np.ndarray) -> np.ndarray:
        if max_frames is None or f.shape[0] <= max_frames:
            return f
        if id(f) not in cut:
            cut[id(f)] = f[np.linspace(0, f.shape[0] - 1, max_frames).round().astype(int)]
        return cut[id(f)]

    recs: dict[str, list[VideoTextRecord]] = {"train": [], "meta": [], "val": [], "test": []}
    for r in train_all.records:
        if r.video_id in split_of:
            recs[split_of[r.video_id]].append(VideoTextRecord(r.video_id, r.caption, frames(r.features)))
    recs["test"] = [VideoTextRecord(r.video_id, r.caption, frames(r.features)) for r in test.records]
    if tokenizer is None:
        tokenizer = Tokenizer.from_captions(r.caption for r in recs["train"])
    return DigitSplits({k: VideoTextDataset(v) for k, v in recs.items()}, tokenizer)


def _whole_seconds(x: Any, source: Path | str, vid: str, j: int, name: str) -> int:
    """A segment bound as an int: a real, finite, whole number of seconds, else ValueError naming the file."""
    shown = x.item() if isinstance(x, np.generic) else x
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{source}: video {vid!r} segment {j}: {name} {shown!r} is not a finite number of seconds")
    if not float(x).is_integer():
        raise ValueError(
            f"{source}: video {vid!r} segment {j}: {name} {shown!r} is not a whole number of seconds (features are one "
            "per second; UniVL truncates with int(), this loader refuses rather than guess)"
        )
    return int(x)


def load_youcook2(
    features_path: str | Path,
    data_path: str | Path,
    csv_path: str | Path,
    feature_dim: int = 1024,
    clip_segments: bool = False,
) -> VideoTextDataset:
    """YouCook2 as distributed with UniVL: one pair per captioned segment.

    Args:
        features_path: pickle ``{video_id: float array [seconds, feature_dim]}`` (1 feature per second).
        data_path: pickle ``{video_id: {"start": [n], "end": [n], "text": [n]}}`` (segment bounds in
            whole seconds, inclusive, and their captions). Segment ``[s, e]`` is features ``s .. e``.
        csv_path: split file with a ``video_id`` column.
        clip_segments: a segment that starts inside the video but ends past its last feature is refused
            by default. True cuts it at the last feature (what UniVL's loader does: it slices
            ``features[int(s) : int(e) + 1]``, and Python slicing stops at the end), with a warning that
            counts the cut segments. A segment starting past the last feature is refused either way
            (UniVL prints it and uses an all-zero clip).
    Raises:
        ValueError naming the file and the video id for a missing id, features that are not a real
        finite ``[frames, feature_dim]`` array, an empty caption, start/end/text of different lengths,
        a bound that is not a whole number of seconds (UniVL truncates fractional bounds; we refuse),
        ``start > end``, a segment outside the features (see ``clip_segments``), a CSV that is not UTF-8;
        :class:`UnsafePickleError` for an unsafe pickle.
    """
    if not isinstance(clip_segments, bool):
        raise TypeError(f"clip_segments must be a bool, got {clip_segments!r}")
    feats = _load_features(features_path, feature_dim)
    data = safe_load_pickle(data_path)
    if not isinstance(data, dict):
        raise ValueError(f"{data_path}: expected a dict video_id -> {{'start', 'end', 'text'}}")
    records = []
    clipped: list[str] = []
    for row in _read_csv(csv_path, ["video_id"]):
        vid = row["video_id"].strip()
        if vid not in feats:
            raise ValueError(f"{features_path}: no features for video {vid!r} (listed in {csv_path})")
        seg = data.get(vid)
        if not isinstance(seg, dict) or not all(k in seg for k in ("start", "end", "text")):
            raise ValueError(f"{data_path}: no segments (start/end/text) for video {vid!r} (listed in {csv_path})")
        try:
            starts, ends, texts = (list(np.asarray(seg[k]).reshape(-1)) for k in ("start", "end", "text"))
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise ValueError(f"{data_path}: video {vid!r} has start/end/text that are not flat lists ({e})") from e
        if not (len(starts) == len(ends) == len(texts)):
            raise ValueError(f"{data_path}: video {vid!r} has start/end/text of different lengths")
        f = feats[vid]
        n = f.shape[0]
        for j, (s0, e0, t) in enumerate(zip(starts, ends, texts, strict=True)):
            s = _whole_seconds(s0, data_path, vid, j, "start")
            e = _whole_seconds(e0, data_path, vid, j, "end")
            if not 0 <= s <= e:
                raise ValueError(f"{data_path}: video {vid!r} segment {j} [{s}, {e}] is not 0 <= start <= end")
            if s >= n:
                raise ValueError(
                    f"{data_path}: video {vid!r} segment {j} [{s}, {e}] is outside its {n} feature frames "
                    f"(seconds 0..{n - 1})"
                )
            if e >= n:
                if not clip_segments:
                    raise ValueError(
                        f"{data_path}: video {vid!r} segment {j} [{s}, {e}] ends past the last of its {n} feature "
                        f"frames (seconds 0..{n - 1}); clip_segments=True cuts it there, as UniVL's loader does"
                    )
                clipped.append(f"{vid} segment {j} [{s}, {e}] -> [{s}, {n - 1}]")
                e = n - 1
            text = _check_caption(t, data_path, vid)
            records.append(VideoTextRecord(f"{vid}_{j}", text, f[s : e + 1]))
    if not records:
        raise ValueError(f"{csv_path}: no videos listed")
    if clipped:
        warnings.warn(
            f"{data_path}: clip_segments=True cut {len(clipped)} segment(s) at the last feature frame, e.g. "
            f"{clipped[0]}",
            UserWarning,
            stacklevel=2,
        )
    return VideoTextDataset(records)
