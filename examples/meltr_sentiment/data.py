"""CMU-MOSI sentiment data for the MELTR example: the pickle loader, the dataset, the collate and a
synthetic file in the same layout.

Multi-modal sentiment analysis (CMU-MOSI) for the MELTR example: loader, metrics, a UniVL-style head, a CLI.

Data format (what the commonly distributed aligned CMU-MOSI pickles hold, checked in the reference code)
------------------------------------------------------------------------------------------------------
A pickle of nested dicts, one entry per split::

    {"train" | "valid" | "test": {
        "text":   float [N, L, dt]   GloVe word vectors (dt = 300) in MulT's ``mosi_data.pkl``
        "vision": float [N, L, dv]   Facet (dv = 20 for MOSI, 35 for MOSEI)
        "audio":  float [N, L, da]   COVAREP (da = 5 for MOSI, 74 for MOSEI); contains -inf
        "labels": float [N, 1, 1]    sentiment in [-3, 3]  (MulT; [N, 1] and [N] are accepted too)
        "id":     optional [N] or [N, k] segment ids (MulT's MOSI: k = 3 byte strings per segment)
    }}

Sources (read through the ``search`` tool, not copied):

* MulT, ``yaohungt/Multimodal-Transformer`` ``src/dataset.py``: opens ``{data}_data.pkl`` (aligned) or
  ``{data}_data_noalign.pkl``, reads ``dataset[split]['vision' | 'text' | 'audio' | 'labels']``, splits
  ``'train' | 'valid' | 'test'``, optional ``'id'`` (for ``mosi`` it decodes three UTF-8 byte strings per row),
  sets ``audio[audio == -np.inf] = 0``, and reads the label shape as ``[N, 1, 1]`` (``get_lbl_info``
  returns ``labels.shape[1], labels.shape[2]``).
* MMSA, ``thuiar/MMSA`` ``src/MMSA/data_loader.py`` (the ``aligned_50.pkl`` / ``unaligned_50.pkl`` files):
  the same split and feature keys plus ``'raw_text'``, ``'text_bert'``, ``'id'``, ``'audio_lengths'``,
  ``'vision_lengths'``; its label key is ``'regression_labels'`` (shape [N]); it also sets
  ``audio[audio == -np.inf] = 0``. This loader accepts ``'regression_labels'`` when ``'labels'`` is absent
  and ignores the other extra keys; ``text`` may then have another width (e.g. BERT features).

Loader behaviour (:func:`load_mosi`): the file is read only with
:func:`examples.meltr_video.data.safe_load_pickle` (numpy arrays and builtin containers; anything else is
refused before it runs). Every error names the file, the split and the key: ragged, complex (not cast to
real), string or object arrays are refused, and so are byte-string ids that are not UTF-8 (MulT decodes
them as UTF-8; nothing is replaced silently). Non-finite feature values
(the -inf of COVAREP, and any NaN / +inf) are replaced by 0 *explicitly*: the count per split and
modality is returned in :attr:`MOSISplits.nonfinite` and logged as a warning (``replace_nonfinite=False``
raises instead). Non-finite or out-of-range labels are errors.

Padding and masks: the aligned data has a fixed length L (50) per split, and shorter segments are
zero-padded. :func:`collate_mosi` marks a timestep as real iff its feature vector is not all zero
(``mask[b, t] = any(x[b, t] != 0)``, per modality) and pads batches of unequal L at the end with zeros.
A timestep whose features are all zero, or became all zero by the -inf replacement, is therefore
treated as padding.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from examples.meltr_video.data import safe_load_pickle

__all__ = [
    "LABEL_KEYS",
    "LABEL_RANGE",
    "MODALITIES",
    "SPLITS",
    "MOSIDataset",
    "MOSISplits",
    "collate_mosi",
    "load_mosi",
    "make_synthetic_mosi",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "vision", "audio")
LABEL_KEYS = ("labels", "regression_labels")  # MulT / MMSA
LABEL_RANGE = 3.0


class MOSIDataset(torch.utils.data.Dataset):
    """One split. Items are dicts ``{"text" [L, dt], "vision" [L, dv], "audio" [L, da], "label" 0-dim, "id"}``.

    The arrays are float32 tensors; ``labels`` is float32 [N] in [-3, 3].
    """

    def __init__(self, text: Tensor, vision: Tensor, audio: Tensor, labels: Tensor, ids: Sequence[str], name: str = ""):
        n = labels.shape[0]
        for key, x in (("text", text), ("vision", vision), ("audio", audio)):
            if x.ndim != 3 or x.shape[0] != n:
                raise ValueError(f"{name}: {key} has shape {tuple(x.shape)}, expected [{n}, L, dim]")
        if labels.ndim != 1:
            raise ValueError(f"{name}: labels must be [N], got {tuple(labels.shape)}")
        if len(ids) != n:
            raise ValueError(f"{name}: {len(ids)} ids for {n} samples")
        self.text, self.vision, self.audio, self.labels = text, vision, audio, labels
        self.ids = list(ids)
        self.name = name

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "text": self.text[i],
            "vision": self.vision[i],
            "audio": self.audio[i],
            "label": self.labels[i],
            "id": self.ids[i],
        }

    @property
    def dims(self) -> dict[str, int]:
        """Feature widths ``{"text": dt, "vision": dv, "audio": da}``."""
        return {m: int(getattr(self, m).shape[-1]) for m in MODALITIES}


@dataclass
class MOSISplits:
    """The three splits of a MOSI-format pickle.

    ``nonfinite[split][modality]`` = how many feature values were non-finite and replaced by 0.
    """

    train: MOSIDataset
    valid: MOSIDataset
    test: MOSIDataset
    path: Path
    nonfinite: dict[str, dict[str, int]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> MOSIDataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; splits are {list(SPLITS)}")
        return getattr(self, split)

    @property
    def dims(self) -> dict[str, int]:
        return self.train.dims

    @property
    def total_nonfinite(self) -> int:
        return sum(sum(d.values()) for d in self.nonfinite.values())


def _numeric(arr: Any, where: str) -> np.ndarray:
    """``arr`` as a real array (bool, integer or floating dtype); ragged, complex, string, object or
    date/time arrays raise ValueError naming ``where`` (complex values are refused, not cast to real)."""
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{where}: not an array ({e})") from e
    if a.dtype.kind not in "biuf":
        want = "real (complex values are not cast)" if a.dtype.kind == "c" else "numeric"
        raise ValueError(f"{where}: expected a {want} array, got dtype {a.dtype}")
    return a


def _ids(raw: Any, n: int, where: str, split: str) -> list[str]:
    if raw is None:
        return [f"{split}_{i}" for i in range(n)]
    try:
        a = np.asarray(raw)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{where}: not an array of ids ({e})") from e
    if a.ndim == 0 or a.shape[0] != n:
        raise ValueError(f"{where}: {a.shape[0] if a.ndim else 'a scalar'} ids for {n} samples")

    def one(x: Any, i: int) -> str:
        if isinstance(x, bytes):  # MulT decodes its byte-string ids as UTF-8
            try:
                return x.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: id of sample {i} is not UTF-8 ({e.reason} at byte {e.start}): {x!r}") from e
        return str(x)

    if a.ndim == 1:
        return [one(x, i) for i, x in enumerate(a)]
    return ["|".join(one(x, i) for x in row.reshape(-1)) for i, row in enumerate(a)]


def load_mosi(path: str | Path, replace_nonfinite: bool = True) -> MOSISplits:
    """Load an aligned CMU-MOSI (MulT / MMSA format) pickle; see the module docstring for the format.

    Checks, each failing with ``ValueError`` that names the file, split and key: the top level is a dict with
    the splits ``train``, ``valid``, ``test``; each split is a dict with ``text``, ``vision``, ``audio`` and
    ``labels`` (or ``regression_labels``); features are numeric ``[N, L, dim]`` with N, L, dim >= 1; the
    three modalities and the labels (and ``id`` when present) agree on N; labels are ``[N]``, ``[N, 1]`` or
    ``[N, 1, 1]``, finite and in [-3, 3]; feature widths agree across splits.
    Non-finite feature values are set to 0 and counted (or raise when ``replace_nonfinite=False``).
    A pickle that references anything but numpy arrays and builtin containers raises
    :class:`~examples.meltr_video.data.UnsafePickleError` without running it.
    """
    path = Path(path)
    obj = safe_load_pickle(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict with splits {list(SPLITS)}, got {type(obj).__name__}")
    missing = [s for s in SPLITS if s not in obj]
    if missing:
        raise ValueError(f"{path}: missing split(s) {missing}; the file has keys {sorted(map(str, obj))}")
    datasets: dict[str, MOSIDataset] = {}
    nonfinite: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        part = obj[split]
        if not isinstance(part, Mapping):
            raise ValueError(f"{path}: split {split!r} is a {type(part).__name__}, expected a dict of arrays")
        need = [*MODALITIES, "labels"]
        label_key = next((k for k in LABEL_KEYS if k in part), None)
        absent = [k for k in MODALITIES if k not in part] + ([] if label_key else ["labels"])
        if absent:
            raise ValueError(
                f"{path}: split {split!r} is missing key(s) {absent} (needs {need}, 'regression_labels' also "
                f"accepted for 'labels'); it has {sorted(map(str, part))}"
            )
        assert label_key is not None
        feats: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for m in MODALITIES:
            where = f"{path}: split {split!r} key {m!r}"
            a = _numeric(part[m], where)
            if a.ndim != 3:
                raise ValueError(f"{where}: expected [N, L, dim] (3 dims), got shape {a.shape}")
            if min(a.shape) < 1:
                raise ValueError(f"{where}: empty array of shape {a.shape}")
            a = a.astype(np.float32)  # a copy: the loaded object is not modified
            bad = ~np.isfinite(a)
            n_bad = int(bad.sum())
            if n_bad:
                if not replace_nonfinite:
                    raise ValueError(f"{where}: {n_bad} non-finite value(s) (replace_nonfinite=False)")
                a[bad] = 0.0
            counts[m] = n_bad
            feats[m] = a
        where = f"{path}: split {split!r} key {label_key!r}"
        y = _numeric(part[label_key], where).astype(np.float64)
        n = feats["text"].shape[0]
        if y.ndim == 0 or y.shape[0] != n or y.shape[1:] not in ((), (1,), (1, 1)):
            raise ValueError(f"{where}: expected shape [{n}], [{n}, 1] or [{n}, 1, 1], got {y.shape}")
        y = y.reshape(n)
        if not np.isfinite(y).all():
            raise ValueError(f"{where}: {int((~np.isfinite(y)).sum())} non-finite label(s)")
        if np.abs(y).max() > LABEL_RANGE + 1e-6:
            raise ValueError(f"{where}: labels must lie in [-3, 3], got range [{y.min():.4g}, {y.max():.4g}]")
        for m in ("vision", "audio"):
            if feats[m].shape[0] != n:
                raise ValueError(
                    f"{path}: split {split!r}: ragged sizes, key {m!r} has {feats[m].shape[0]} samples "
                    f"but 'text' has {n}"
                )
        ids = _ids(part.get("id"), n, f"{path}: split {split!r} key 'id'", split)
        if split != "train":
            for m in MODALITIES:
                if feats[m].shape[2] != datasets["train"].dims[m]:
                    raise ValueError(
                        f"{path}: split {split!r} key {m!r} has width {feats[m].shape[2]}, "
                        f"but split 'train' has {datasets['train'].dims[m]}"
                    )
        datasets[split] = MOSIDataset(
            *(torch.from_numpy(feats[m]) for m in MODALITIES),
            torch.from_numpy(y.astype(np.float32)),
            ids,
            name=f"{path.name}:{split}",
        )
        nonfinite[split] = counts
        if any(counts.values()):
            logger.warning("%s: split %r: replaced non-finite feature values by 0: %s", path, split, counts)
    return MOSISplits(datasets["train"], datasets["valid"], datasets["test"], path, nonfinite)


def collate_mosi(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    Returns ``text`` [B, Lt, dt], ``vision`` [B, Lv, dv], ``audio`` [B, La, da] (float32; a batch of unequal
    lengths is zero-padded at the end), ``{m}_mask`` [B, L_m] bool (True = a timestep whose features are not
    all zero), ``label`` [B] float32 and ``id`` (list of str).
    """
    if not items:
        raise ValueError("collate_mosi: empty batch")
    out: dict[str, Any] = {}
    for m in MODALITIES:
        xs = [torch.as_tensor(it[m], dtype=torch.float32) for it in items]
        if any(x.ndim != 2 for x in xs):
            raise ValueError(f"collate_mosi: {m!r} items must be [L, dim], got {[tuple(x.shape) for x in xs]}")
        dims = {x.shape[1] for x in xs}
        if len(dims) != 1:
            raise ValueError(f"collate_mosi: {m!r} items have different widths {sorted(dims)}")
        L = max(x.shape[0] for x in xs)
        batch = torch.zeros(len(xs), L, dims.pop())
        for i, x in enumerate(xs):
            batch[i, : x.shape[0]] = x
        out[m] = batch
        out[f"{m}_mask"] = (batch != 0).any(-1)
    out["label"] = torch.stack([torch.as_tensor(it["label"], dtype=torch.float32).reshape(()) for it in items])
    out["id"] = [str(it.get("id", "")) for it in items]
    return out


def make_synthetic_mosi(
    path: str | Path,
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
    seq_len: int = 12,
    dims: tuple[int, int, int] = (300, 20, 5),
    noise: float = 0.3,
    n_neg_inf: int = 25,
) -> Path:
    """Write a small MOSI-format pickle (MulT layout: labels [N, 1, 1], ids [N, 3] bytes) to ``path``.

    Each segment has a random length in [seq_len // 2, seq_len], left zero-padded (real timesteps are never
    all zero). Text = word vectors from a random 64-word vocabulary; each word has a polarity w_k. With the
    means over the real timesteps::

        s = mean_t polarity(word_t) + 0.5 * mean_t vision[t, 0] + 0.5 * mean_t audio[t, 1]
        y = round(3 * 3 tanh(s / std_train(s) + noise * eps)) / 3,   eps ~ N(0, 1)   (multiples of 1/3 in [-3, 3])

    so the label is a known function of the features plus noise, with some exact zeros. ``n_neg_inf`` audio
    values per split are set to -inf (as in COVAREP) to exercise the replacement.
    """
    sizes = dict(sizes or {"train": 320, "valid": 96, "test": 96})
    rng = np.random.default_rng(seed)
    dt, dv, da = dims
    if min(dims) < 2:
        raise ValueError(f"dims must be >= 2 each (vision[:, 0] and audio[:, 1] carry signal), got {dims}")
    vocab = rng.normal(0.0, 0.4, size=(64, dt))
    polarity_dir = rng.normal(size=dt)
    polarity = vocab @ polarity_dir
    polarity = (polarity - polarity.mean()) / polarity.std()
    raw: dict[str, dict[str, np.ndarray]] = {}
    signals = {}
    for split, n in sizes.items():
        text = np.zeros((n, seq_len, dt), np.float32)
        vision = np.zeros((n, seq_len, dv), np.float32)
        audio = np.zeros((n, seq_len, da), np.float32)
        s = np.zeros(n)
        for i in range(n):
            length = int(rng.integers(max(1, seq_len // 2), seq_len + 1))
            words = rng.integers(0, len(vocab), size=length)
            v = rng.normal(size=(length, dv)) + 0.01
            a = rng.normal(size=(length, da)) + 0.01
            text[i, seq_len - length :] = vocab[words]
            vision[i, seq_len - length :] = v
            audio[i, seq_len - length :] = a
            s[i] = polarity[words].mean() + 0.5 * v[:, 0].mean() + 0.5 * a[:, 1].mean()
        signals[split] = s
        raw[split] = {"text": text, "vision": vision, "audio": audio}
    scale = signals["train"].std() if "train" in signals else 1.0
    for split, n in sizes.items():
        y = np.tanh(signals[split] / scale + noise * rng.normal(size=n))
        y = np.round(np.clip(3 * y, -3, 3) * 3) / 3
        audio = raw[split]["audio"]
        idx = rng.choice(audio.size, size=min(n_neg_inf, audio.size), replace=False)
        audio.reshape(-1)[idx] = -np.inf
        raw[split]["labels"] = y.astype(np.float32).reshape(n, 1, 1)
        raw[split]["id"] = np.array([[f"demo{i:04d}".encode(), b"0", f"{split}".encode()] for i in range(n)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(raw, fh, protocol=4)
    return path
