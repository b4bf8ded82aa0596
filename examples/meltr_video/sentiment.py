"""Multi-modal sentiment analysis (CMU-MOSI) for the MELTR example: loader, metrics, a UniVL-style head, a CLI.

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
refused before it runs). Every error names the file, the split and the key. Non-finite feature values
(the -inf of COVAREP, and any NaN / +inf) are replaced by 0 *explicitly*: the count per split and
modality is returned in :attr:`MOSISplits.nonfinite` and logged as a warning (``replace_nonfinite=False``
raises instead). Non-finite or out-of-range labels are errors.

Padding and masks: the aligned data has a fixed length L (50) per split, and shorter segments are
zero-padded. :func:`collate_mosi` marks a timestep as real iff its feature vector is not all zero
(``mask[b, t] = any(x[b, t] != 0)``, per modality) and pads batches of unequal L at the end with zeros.
A timestep whose features are all zero, or became all zero by the -inf replacement, is therefore
treated as padding.

Metrics (:func:`sentiment_metrics`, numpy only; y = labels, p = predictions, N samples)
---------------------------------------------------------------------------------------
::

    mae           mean_i |p_i - y_i|
    corr          Pearson r = sum (p - mean p)(y - mean y) / sqrt(sum (p - mean p)^2 sum (y - mean y)^2)
    acc2_nonneg   accuracy of [p >= 0] against [y >= 0], all samples       ("Has0_acc_2" in MMSA)
    f1_nonneg     weighted F1 of the same two classes                      ("Has0_F1_score")
    acc2_nonzero  accuracy of [p > 0] against [y > 0] on the samples with y != 0
                                       ("Non0_acc_2" in MMSA; MulT's eval_mosi(..., exclude_zero=True))
    f1_nonzero    weighted F1 of the same                                   ("Non0_F1_score")
    acc7          mean [round(clip(p, -3, 3)) == round(clip(y, -3, 3))]    (MulT's mult_acc_7)
    acc5          the same with clip to [-2, 2]                            (MulT's mult_acc_5)

Weighted F1 (``sklearn.metrics.f1_score(y_true, y_pred, average='weighted')``):
``sum_c (n_c / N) * 2 tp_c / (2 tp_c + fp_c + fn_c)`` over the classes c in {negative, positive}, n_c the
number of *true* members of c; a class with ``2 tp + fp + fn = 0`` scores 0 (sklearn's zero_division).
``round`` is numpy's round-half-to-even (``np.round``, as in MulT), so 0.5 -> 0 and 2.5 -> 2.

Sources: MulT ``src/eval_metrics.py`` (``eval_mosei_senti``: MAE, ``np.corrcoef``, ``multiclass_acc`` with
``np.round``, clip to [-3, 3] / [-2, 2], weighted F1 and accuracy of ``> 0`` on the non-zero labels when
``exclude_zero=True``; MulT's ``train.py`` always calls it with ``exclude_zero=True``) and MMSA
``src/MMSA/utils/metricsTop.py`` (``__eval_mosei_regression``: ``Non0`` = ``> 0`` on ``y != 0``, ``Has0`` =
``>= 0`` on all samples, weighted F1). Note: MulT with ``exclude_zero=False`` uses a third convention,
``[p > 0]`` vs ``[y > 0]`` on all samples (zero counted as negative); it is not reported here.
The public UniVL / MELTR repositories hold no MOSI code (``microsoft/UniVL``, ``mlvlab/MELTR`` were checked).

Edge cases, decided: ``corr`` is ``nan`` with a :class:`SentimentMetricWarning` when either input is
constant or N < 2 (as ``np.corrcoef`` gives nan); ``acc2_nonzero`` / ``f1_nonzero`` are ``nan`` with the
same warning when every label is 0. Non-finite inputs and size mismatches raise ``ValueError``.

Model (:class:`SentimentRegressor`)
-----------------------------------
UniVL fine-tunes its cross encoder with a regression head for MOSI; here a small stand-alone encoder::

    x_m  = LN_m(features_m) W_m + type_m + pos_t            m in {text, vision, audio}, per timestep t
    h    = Transformer([cls + type_cls ; x_text ; x_vision ; x_audio], key padding = ~masks)
    yhat = w^T tanh(W h_[CLS]) + b                             (scalar per sample)
    loss = mean (yhat - y)^2   ("mse", default)  or  mean |yhat - y|  ("l1", MulT's L1Loss)

The default MSE follows the UniVL paper's regression fine-tuning as this project reads it; no public UniVL
MOSI code exists to confirm it. MulT's ``main.py`` trains MOSI with ``L1Loss`` (verified), hence ``"l1"``.

Attention runs on PyTorch's MATH SDPA kernel and dropout is 0 by default, so the forward pass is a
deterministic, twice-differentiable function of (parameters, batch), as the bilevel solvers need.

CLI::

    python -m examples.meltr_video.sentiment --data mosi_data.pkl [--epochs 20 --seed 0]
    python -m examples.meltr_video.sentiment --demo        # synthetic MOSI-format pickle, offline, seconds
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import pickle
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from examples.meltr_video.data import safe_load_pickle

__all__ = [
    "LOSS_NAMES",
    "MODALITIES",
    "PRIMARY",
    "SPLITS",
    "MOSIDataset",
    "MOSISplits",
    "SentimentMetricWarning",
    "SentimentRegressor",
    "collate_mosi",
    "evaluate",
    "load_mosi",
    "main",
    "make_synthetic_mosi",
    "predict_dataset",
    "sentiment_metrics",
    "train_regressor",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "vision", "audio")
LABEL_KEYS = ("labels", "regression_labels")  # MulT / MMSA
LABEL_RANGE = 3.0
LOSS_NAMES = ("sentiment",)
PRIMARY = {"sentiment": "sentiment"}


# ------------------------------------------------------------------------------------------- data


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
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise ValueError(f"{where}: expected a numeric array, got dtype {a.dtype}")
    return a


def _ids(raw: Any, n: int, where: str, split: str) -> list[str]:
    if raw is None:
        return [f"{split}_{i}" for i in range(n)]
    a = np.asarray(raw)
    if a.ndim == 0 or a.shape[0] != n:
        raise ValueError(f"{where}: {a.shape[0] if a.ndim else 'a scalar'} ids for {n} samples")

    def one(x: Any) -> str:
        return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)

    if a.ndim == 1:
        return [one(x) for x in a]
    return ["|".join(one(x) for x in row.reshape(-1)) for row in a]


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


# ---------------------------------------------------------------------------------------- metrics


class SentimentMetricWarning(UserWarning):
    """A metric is undefined on this input (constant values, no non-zero labels) and was set to nan."""


def _as_vector(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise TypeError(f"{name}: expected numbers, got dtype {a.dtype}")
    a = a.astype(np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite value(s)")
    return a


def _binary_acc_f1(pred_pos: np.ndarray, true_pos: np.ndarray) -> tuple[float, float]:
    """Accuracy and support-weighted F1 of two boolean vectors (classes: False, True)."""
    n = true_pos.size
    acc = float(np.mean(pred_pos == true_pos))
    f1 = 0.0
    for c in (False, True):
        t, p = true_pos == c, pred_pos == c
        tp = float(np.sum(t & p))
        denom = 2 * tp + float(np.sum(~t & p)) + float(np.sum(t & ~p))
        f1 += (float(np.sum(t)) / n) * (2 * tp / denom if denom > 0 else 0.0)
    return acc, f1


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        warnings.warn(
            f"Pearson correlation undefined (N = {p.size}, constant preds: {bool(np.ptp(p) == 0)}, "
            f"constant labels: {bool(np.ptp(y) == 0)}); corr = nan",
            SentimentMetricWarning,
            stacklevel=3,
        )
        return float("nan")
    pc, yc = p - p.mean(), y - y.mean()
    r = float(np.dot(pc, yc) / math.sqrt(float(np.dot(pc, pc)) * float(np.dot(yc, yc))))
    return max(-1.0, min(1.0, r))


def sentiment_metrics(preds: Any, labels: Any) -> dict[str, float]:
    """MOSI regression metrics of ``preds`` against ``labels`` (same number of elements; any shape, flattened).

    Returns ``mae``, ``corr``, ``acc2_nonneg``, ``f1_nonneg``, ``acc2_nonzero``, ``f1_nonzero``, ``acc7``,
    ``acc5`` and ``n_nonzero`` (the number of samples in the non-zero variant); definitions, sources and edge
    cases in the module docstring. Accuracies and F1 are fractions in [0, 1].
    """
    p = _as_vector(preds, "preds")
    y = _as_vector(labels, "labels")
    if p.size != y.size:
        raise ValueError(f"preds has {p.size} values but labels has {y.size}")
    acc_nn, f1_nn = _binary_acc_f1(p >= 0, y >= 0)
    nz = y != 0
    if nz.any():
        acc_nz, f1_nz = _binary_acc_f1(p[nz] > 0, y[nz] > 0)
    else:
        warnings.warn(
            "every label is 0: the non-zero binary accuracy / F1 are undefined (nan)",
            SentimentMetricWarning,
            stacklevel=2,
        )
        acc_nz = f1_nz = float("nan")
    return {
        "mae": float(np.mean(np.abs(p - y))),
        "corr": _pearson(p, y),
        "acc2_nonneg": acc_nn,
        "f1_nonneg": f1_nn,
        "acc2_nonzero": acc_nz,
        "f1_nonzero": f1_nz,
        "acc7": float(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3)))),
        "acc5": float(np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2)))),
        "n_nonzero": int(nz.sum()),
    }


# ------------------------------------------------------------------------------------------ model


class SentimentRegressor(nn.Module):
    """A small UniVL-style fusion encoder with a scalar regression head (see the module docstring).

    ``forward(batch, losses=("sentiment",))`` -> ``{"sentiment": 0-dim loss}`` (MSE by default, ``loss="l1"``
    for MulT's L1); ``predict(batch)`` -> [B] (differentiable; wrap in ``torch.no_grad()`` to evaluate).
    ``batch`` holds ``text`` / ``vision`` / ``audio`` [B, L_m, dim_m], optional ``{m}_mask`` [B, L_m] bool
    (default: all True) and, for the loss, ``label`` [B].
    """

    LOSS_NAMES = LOSS_NAMES

    def __init__(
        self,
        text_dim: int,
        vision_dim: int,
        audio_dim: int,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 4,
        ff: int = 128,
        max_len: int = 64,
        dropout: float = 0.0,
        loss: str = "mse",
        input_norm: bool = True,
    ):
        super().__init__()
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        for name, v in (("text_dim", text_dim), ("vision_dim", vision_dim), ("audio_dim", audio_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.dims = {"text": text_dim, "vision": vision_dim, "audio": audio_dim}
        self.hidden, self.max_len, self.loss = hidden, max_len, loss
        self.input_norm = nn.ModuleDict(
            {m: (nn.LayerNorm(d) if input_norm else nn.Identity()) for m, d in self.dims.items()}
        )
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in self.dims.items()})
        self.cls = nn.Parameter(torch.zeros(hidden))
        self.type_embeddings = nn.Embedding(1 + len(MODALITIES), hidden)  # 0 = [CLS], then text, vision, audio
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, ff, dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-12
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)

    @classmethod
    def for_data(cls, splits: MOSISplits, **kw: Any) -> SentimentRegressor:
        d = splits.dims
        return cls(d["text"], d["vision"], d["audio"], **kw)

    def _embed(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        parts, masks = [], []
        B = None
        for i, m in enumerate(MODALITIES, start=1):
            if m not in batch:
                raise KeyError(f"batch is missing {m!r} (needs {list(MODALITIES)})")
            x = batch[m]
            if x.ndim != 3 or x.shape[-1] != self.dims[m]:
                raise ValueError(f"batch[{m!r}] has shape {tuple(x.shape)}, the model expects [B, L, {self.dims[m]}]")
            if B is None:
                B = x.shape[0]
            elif x.shape[0] != B:
                raise ValueError(f"batch[{m!r}] has {x.shape[0]} samples, batch['text'] has {B}")
            L = x.shape[1]
            if L > self.max_len:
                raise ValueError(f"batch[{m!r}] has {L} timesteps > max_len {self.max_len}")
            mask = batch.get(f"{m}_mask")
            if mask is None:
                mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
            elif mask.shape != (B, L):
                raise ValueError(f"batch['{m}_mask'] has shape {tuple(mask.shape)}, expected {(B, L)}")
            pos = self.position_embeddings(torch.arange(L, device=x.device))
            parts.append(self.proj[m](self.input_norm[m](x)) + self.type_embeddings.weight[i] + pos)
            masks.append(mask.bool())
        assert B is not None
        cls = (self.cls + self.type_embeddings.weight[0]).expand(B, 1, self.hidden)
        keep = torch.ones(B, 1, dtype=torch.bool, device=cls.device)
        return torch.cat([cls, *parts], dim=1), torch.cat([keep, *masks], dim=1)

    def predict(self, batch: Mapping[str, Any]) -> Tensor:
        """Sentiment scores [B] (unbounded; the metrics clip where the paper's definitions do)."""
        x, keep = self._embed(batch)
        with sdpa_kernel(SDPBackend.MATH):
            h = self.encoder(self.norm(x), src_key_padding_mask=~keep)
        return self.head(torch.tanh(self.pooler(h[:, 0]))).squeeze(-1)

    def forward(self, batch: Mapping[str, Any], losses: tuple[str, ...] = LOSS_NAMES) -> dict[str, Tensor]:
        """``{"sentiment": mean (yhat - y)^2}`` (or ``mean |yhat - y|`` with ``loss="l1"``), 0-dim."""
        unknown = [n for n in losses if n not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; known: {list(LOSS_NAMES)}")
        if "label" not in batch:
            raise KeyError("batch is missing 'label' [B] (needed for the loss)")
        out: dict[str, Tensor] = {}
        if "sentiment" in losses:
            yhat = self.predict(batch)
            y = batch["label"].to(yhat.dtype).reshape(-1)
            if y.shape != yhat.shape:
                raise ValueError(f"batch['label'] has {y.numel()} values for {yhat.numel()} samples")
            out["sentiment"] = F.mse_loss(yhat, y) if self.loss == "mse" else F.l1_loss(yhat, y)
        return out


# ------------------------------------------------------------------------------------- train / eval


def predict_dataset(model: SentimentRegressor, ds: MOSIDataset, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(predictions [N], labels [N]) of ``model`` on ``ds``, in eval mode without gradients."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_mosi)
    was_training = model.training
    model.eval()
    preds = []
    with torch.no_grad():
        for batch in loader:
            preds.append(model.predict(batch))
    model.train(was_training)
    return torch.cat(preds).numpy().astype(np.float64), ds.labels.numpy().astype(np.float64)


def evaluate(model: SentimentRegressor, ds: MOSIDataset, batch_size: int = 256) -> dict[str, float]:
    """:func:`sentiment_metrics` of ``model`` on ``ds``."""
    p, y = predict_dataset(model, ds, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SentimentMetricWarning)  # an untrained model may predict a constant
        return sentiment_metrics(p, y)


def train_regressor(
    splits: MOSISplits,
    epochs: int = 20,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    progress: bool = True,
    **model_kw: Any,
) -> dict[str, Any]:
    """Adam on ``train``; the epoch with the lowest valid MAE is kept; its valid and test metrics are returned.

    Returns ``{"model", "best_epoch", "valid", "test", "history" (per epoch: train loss, valid mae), "seconds"}``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch.manual_seed(seed)
    longest = max(getattr(splits[s], m).shape[1] for s in SPLITS for m in MODALITIES)
    model_kw.setdefault("max_len", max(64, longest))
    model = SentimentRegressor.for_data(splits, **model_kw)
    loader = torch.utils.data.DataLoader(
        splits.train,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_mosi,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = (math.inf, -1, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=epochs * len(loader), desc="sentiment", disable=not progress)
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            loss = model(batch)["sentiment"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * len(batch["label"])
            count += len(batch["label"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val_mae = evaluate(model, splits.valid)["mae"]
        history.append({"epoch": epoch, "train_loss": total / count, "valid_mae": val_mae})
        if val_mae < best[0]:
            best = (val_mae, epoch, copy.deepcopy(model.state_dict()))
    bar.close()
    model.load_state_dict(best[2])
    return {
        "model": model,
        "best_epoch": best[1],
        "valid": evaluate(model, splits.valid),
        "test": evaluate(model, splits.test),
        "history": history,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------- synthetic data


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


# -------------------------------------------------------------------------------------------- CLI


def _fmt(m: Mapping[str, float]) -> str:
    keys = ("mae", "corr", "acc2_nonneg", "f1_nonneg", "acc2_nonzero", "f1_nonzero", "acc7")
    return "  ".join(f"{k}={m[k]:.3f}" for k in keys)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Train the sentiment regressor on a CMU-MOSI-format pickle.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="aligned MOSI pickle (MulT mosi_data.pkl / MMSA aligned_50.pkl)")
    src.add_argument("--demo", action="store_true", help="write and use a small synthetic MOSI-format pickle")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (20; 12 with --demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-3, as MulT; 3e-3 with --demo)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (64; 32 with --demo)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--loss", choices=["mse", "l1"], default="mse")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    epochs = a.epochs if a.epochs is not None else (12 if a.demo else 20)
    hidden = a.hidden if a.hidden is not None else (32 if a.demo else 64)
    lr = a.lr if a.lr is not None else (3e-3 if a.demo else 1e-3)
    if epochs < 1:
        p.error("--epochs must be >= 1")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_synthetic_mosi(Path(tmp) / "mosi_demo.pkl", seed=a.seed) if a.demo else a.data
        splits = load_mosi(path)
    print(
        f"{path if a.data else 'synthetic demo'}: train/valid/test = {len(splits.train)}/{len(splits.valid)}/"
        f"{len(splits.test)}, dims {splits.dims}, non-finite values replaced by 0: {splits.total_nonfinite}"
    )
    res = train_regressor(
        splits,
        epochs,
        a.seed,
        a.batch_size,
        lr,
        progress=not a.no_progress,
        hidden=hidden,
        layers=a.layers,
        ff=2 * hidden,
        loss=a.loss,
    )
    print(f"best epoch {res['best_epoch']}/{epochs} by valid MAE ({res['seconds']:.1f} s)")
    print(f"valid: {_fmt(res['valid'])}")
    print(f"test:  {_fmt(res['test'])}")
    return res


if __name__ == "__main__":
    main()
