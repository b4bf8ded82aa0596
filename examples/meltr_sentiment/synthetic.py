"""A synthetic CMU-MOSI-format data set generated from latent factors, for the MELTR sentiment comparison.

The file :func:`make_latent_mosi` writes has the MulT layout (read back with
:func:`~examples.meltr_sentiment.data.load_mosi`, as a real ``mosi_data.pkl`` would be). Unlike
:func:`~examples.meltr_sentiment.data.make_synthetic_mosi` (a label computed from fixed feature
coordinates, for the loader demo), every modality here is a noisy view of the *same* latent factors,
so that the auxiliary tasks of :mod:`~examples.meltr_sentiment.multitask` (unimodal regression,
masked-feature reconstruction, cross-modal alignment) are related to the primary regression.
The design was fixed before any method was run on it; it is not tuned to favour one method.

Generative model (per segment ``i``; ``k = 6`` latent coordinates per timestep)::

    s_i       ~ N(0, 1)                 sentiment (segment level)
    u_i       ~ N(0, I_2)               style, e.g. speaker (segment level, unrelated to the label)
    e_it      ~ Bernoulli(1/2)          whether timestep t expresses the sentiment
    c_it      ~ N(0, I_3)               content (per timestep, unrelated to the label)
    z_it      = [e_it s_i, u_i, c_it]   in R^6
    x^m_it    = A_m diag(v_m, 1, ..., 1) z_it + sigma_m eps,   eps ~ N(0, I_{d_m})     m in text, vision, audio
    y_i       = round(3 clip(1.4 s_i + 0.35 n_i, -3, 3)) / 3,   n_i ~ N(0, 1)           (multiples of 1/3)

``A_m`` is a ``[d_m, 6]`` matrix of unit-norm random columns, drawn once per file from ``seed``.
The sentiment column is scaled by the visibility ``v = (1.0, 0.6, 0.4)`` and the features carry
noise ``sigma = (0.8, 0.6, 0.5)`` (text, vision, audio), i.e. a per-timestep signal-to-noise ratio
of the optimal linear read-out of ``s`` of about 1.6, 1.0 and 0.6: text is the strongest modality,
audio the weakest, and none is enough alone (as on MOSI, where text dominates). Widths default to
MOSI's ``(300, 20, 5)``. The audio map has 5 rows for 6 latents, so audio mixes the factors.

How the auxiliary tasks relate to the label: a unimodal head can predict ``y`` from each modality
alone, less well than from all three; a masked timestep of one modality is predictable from the
other modalities at the same timestep (they share ``z_it``, including ``e_it s_i``) and from its
neighbours (``s_i``, ``u_i``); alignment of a segment's text with its vision and audio rests on the
shared segment-level factors ``s_i`` and ``u_i``, of which one of three coordinates is the label's.
The label noise (``0.35 / 1.4``, about 0.25 of the signal's std) and small training split are where an
auxiliary task might help; nothing guarantees that it does.

Layout as :func:`~examples.meltr_sentiment.data.make_synthetic_mosi`: each segment has a random
length in ``[seq_len // 2, seq_len]``, left zero-padded; labels ``[N, 1, 1]``; ids ``[N, 3]`` byte
strings; ``n_neg_inf`` audio values per split set to ``-inf`` (as COVAREP has) for the loader to replace.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["LATENT_SIZES", "NOISE", "VISIBILITY", "latent_mosi_arrays", "make_latent_mosi"]

#: default segments per split of the file (the comparison carves its meta split from ``train``)
LATENT_SIZES = {"train": 240, "valid": 120, "test": 400}
#: visibility of the sentiment latent and feature noise per modality (text, vision, audio)
VISIBILITY = (1.0, 0.6, 0.4)
NOISE = (0.8, 0.6, 0.5)
_K = 6  # latent coordinates per timestep: e*s, u (2), c (3)


def _check_int(name: str, v: object, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def latent_mosi_arrays(
    seed: int = 0,
    sizes: Mapping[str, int] | None = None,
    seq_len: int = 16,
    dims: tuple[int, int, int] = (300, 20, 5),
    n_neg_inf: int = 10,
) -> dict[str, dict[str, np.ndarray]]:
    """The file's content (see the module docstring): ``{split: {"text", "vision", "audio", "labels", "id",
    "sentiment"}}``; ``sentiment`` [N] holds the latent ``s_i`` (not part of the MOSI format; the file
    written by :func:`make_latent_mosi` leaves it out). A deterministic function of its arguments."""
    sizes = dict(LATENT_SIZES if sizes is None else sizes)
    missing = [s for s in ("train", "valid", "test") if s not in sizes]
    if missing:
        raise ValueError(f"sizes must give 'train', 'valid' and 'test', missing {missing}")
    for split, n in sizes.items():
        _check_int(f"sizes[{split!r}]", n, 1)
    seq_len = _check_int("seq_len", seq_len, 2)
    n_neg_inf = _check_int("n_neg_inf", n_neg_inf, 0)
    if len(dims) != 3:
        raise ValueError(f"dims must be (text, vision, audio) widths, got {dims!r}")
    for name, d in zip(("text", "vision", "audio"), dims, strict=True):
        _check_int(f"dims ({name})", d, 1)
    rng = np.random.default_rng(seed)
    maps = []
    for d, vis in zip(dims, VISIBILITY, strict=True):
        a = rng.normal(size=(d, _K))
        a /= np.linalg.norm(a, axis=0, keepdims=True)
        a[:, 0] *= vis
        maps.append(a)
    out: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "valid", "test"):
        n = sizes[split]
        s = rng.normal(size=n)
        u = rng.normal(size=(n, 2))
        expr = rng.random(size=(n, seq_len)) < 0.5
        content = rng.normal(size=(n, seq_len, 3))
        z = np.concatenate(
            [(expr * s[:, None])[..., None], np.broadcast_to(u[:, None, :], (n, seq_len, 2)), content], axis=-1
        )  # [n, L, 6]
        lengths = rng.integers(seq_len // 2, seq_len + 1, size=n)
        pad = np.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]  # left padding
        part: dict[str, np.ndarray] = {}
        for m, a, sigma in zip(("text", "vision", "audio"), maps, NOISE, strict=True):
            x = z @ a.T + sigma * rng.normal(size=(n, seq_len, a.shape[0]))
            x[pad] = 0.0
            part[m] = x.astype(np.float32)
        audio = part["audio"]
        real = np.flatnonzero(np.repeat(~pad, audio.shape[-1], axis=-1).reshape(-1))
        bad = rng.choice(real, size=min(n_neg_inf, real.size), replace=False)
        audio.reshape(-1)[bad] = -np.inf
        y = np.round(3 * np.clip(1.4 * s + 0.35 * rng.normal(size=n), -3, 3)) / 3
        part["labels"] = y.astype(np.float32).reshape(n, 1, 1)
        part["id"] = np.array([[f"latent{i:04d}".encode(), b"0", split.encode()] for i in range(n)])
        part["sentiment"] = s
        out[split] = part
    return out


def make_latent_mosi(path: str | Path, seed: int = 0, **kw: object) -> Path:
    """Write :func:`latent_mosi_arrays` ``(seed, **kw)`` (without the latent ``sentiment``) as a MulT-layout
    pickle to ``path``; returns the path."""
    arrays = latent_mosi_arrays(seed, **kw)  # type: ignore[arg-type]
    raw = {split: {k: v for k, v in part.items() if k != "sentiment"} for split, part in arrays.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump(raw, fh, protocol=4)
    return path
