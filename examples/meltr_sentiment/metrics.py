"""The MOSI sentiment metrics (numpy only).

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
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from torch import Tensor

__all__ = [
    "SentimentMetricWarning",
    "sentiment_metrics",
]


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
