"""Frozen per-frame visual features for the digit clips: a small CNN trained once on ``load_digits``.

UniVL does not read pixels: it reads frozen S3D features, one 1024-d vector per second of video. The
testbed does the same with a visual encoder small enough to train in seconds on 2 CPU cores::

    conv3x3(1 -> 32) ReLU  maxpool2   conv3x3(32 -> 64) ReLU   conv3x3(64 -> 64) ReLU       (padding 1)
    train:   global max pool -> Linear(64, 10), cross-entropy on single 8x8 digits pasted at a random
             place of a 16x16 canvas with pixel noise (so the filters fire wherever the digit is)
    frames:  the same convolutions on the 32x32 canvas -> [64, 16, 16] -> max pool 4x4 cells
             -> [64, 4, 4] -> flatten (channel-major) -> 1024 = UniVL's frame width

Both properties the backbone needs survive: *identity* (which channels fire) and *position* (in
which of the 4x4 = 16 cells of 8x8 pixels they fire). A linear frame embedding of raw pixels has
neither: a digit moved by one pixel is a different vector.

The encoder is trained on the handwriting of the pretraining pool only (the target splits'
handwriting stays unseen by every trained component), deterministically from its seed on one
thread. :func:`frame_encoder` caches it under ``runs/features/`` as an ``.npz`` of arrays (read
with ``allow_pickle=False``) whose SHA-256 is checked against a sidecar ``.json``; a cache that fails
the check is reported by name and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.checkpoint import atomic_write

from ._util import num_threads

__all__ = ["EncoderSettings", "FrameEncoder", "encode_frames", "frame_encoder", "train_frame_encoder"]

FEATURE_DIM = 1024
DEFAULT_CACHE = Path("runs/features")


@dataclass(frozen=True)
class EncoderSettings:
    """How the frame encoder is trained (all of it goes into the cache key)."""

    seed: int = 0
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    canvas: int = 16
    noise: float = 0.05


class FrameEncoder(nn.Module):
    """The CNN. ``features(frames [N, H, W]) -> [N, 64 * 4 * 4]``; ``forward`` gives class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def feature_map(self, x: Tensor) -> Tensor:
        """``x`` [N, H, W] in [0, 1] -> [N, 64, H/4, W/4]."""
        h = F.max_pool2d(F.relu(self.conv1(x.unsqueeze(1))), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.conv3(h))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.feature_map(x).amax(dim=(2, 3)))

    def features(self, x: Tensor, grid: int = 4) -> Tensor:
        """Max over each of ``grid x grid`` cells of the feature map, flattened channel-major."""
        return F.adaptive_max_pool2d(self.feature_map(x), grid).flatten(1)


def train_frame_encoder(images: np.ndarray, labels: np.ndarray, settings: EncoderSettings) -> FrameEncoder:
    """Train :class:`FrameEncoder` on 8x8 ``images`` [N, 8, 8] (values in [0, 1]) with their ``labels``.

    Every epoch pastes each image at a fresh random place of a ``settings.canvas`` square canvas and
    adds Gaussian noise; Adam, cross-entropy. Deterministic: one thread, generators seeded from
    ``settings.seed``.
    """
    if images.ndim != 3 or images.shape[1:] != (8, 8) or len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need images [N, 8, 8] and N labels, got {images.shape} and {len(labels)} labels")
    s = settings
    with num_threads(1):
        torch.manual_seed(s.seed)
        model = FrameEncoder()
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)
        rng = np.random.default_rng([s.seed, 77])
        y_all = torch.as_tensor(labels, dtype=torch.long)
        n, room = len(images), s.canvas - 8
        for _ in range(s.epochs):
            canvas = np.zeros((n, s.canvas, s.canvas), dtype=np.float32)
            pos = rng.integers(0, room + 1, size=(n, 2))
            for i, (r, c) in enumerate(pos):
                canvas[i, r : r + 8, c : c + 8] = images[i]
            canvas += s.noise * rng.standard_normal(canvas.shape).astype(np.float32)
            x = torch.from_numpy(canvas)
            order = torch.from_numpy(rng.permutation(n))
            for k in range(0, n, s.batch_size):
                idx = order[k : k + s.batch_size]
                loss = F.cross_entropy(model(x[idx]), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def encode_frames(model: FrameEncoder, frames: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Features of ``frames`` [..., 32, 32] -> float32 [..., 1024] (one thread: deterministic)."""
    lead = frames.shape[:-2]
    flat = torch.as_tensor(np.ascontiguousarray(frames), dtype=torch.float32).reshape(-1, *frames.shape[-2:])
    with num_threads(1):
        out = torch.cat([model.features(flat[k : k + batch]) for k in range(0, len(flat), batch)])
    return out.numpy().reshape(*lead, -1)


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _key(settings: EncoderSettings, images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _load_cached(path: Path, sidecar: Path) -> FrameEncoder | None:
    """The cached encoder, or None (with a warning naming the file) when it is missing or fails its check."""
    if not path.exists() or not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if _digest(arrays) != meta["sha256"]:
            raise ValueError("SHA-256 of the arrays does not match the sidecar")
        model = FrameEncoder()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    except Exception as e:  # corrupt, truncated or foreign file: never use it
        warnings.warn(f"{path}: unusable frame-encoder cache ({type(e).__name__}: {e}); retraining", stacklevel=3)
        return None
    return model.eval()


def frame_encoder(
    images: np.ndarray,
    labels: np.ndarray,
    settings: EncoderSettings | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE,
) -> FrameEncoder:
    """The encoder trained on (``images``, ``labels``) with ``settings``, from ``cache_dir`` when it is there.

    The cache key hashes the settings and the training images, so another pool or seed is another
    file. ``cache_dir=None`` trains without caching.
    """
    settings = settings or EncoderSettings()
    if cache_dir is None:
        return train_frame_encoder(images, labels, settings)
    key = _key(settings, images, labels)
    path = Path(cache_dir) / f"digitcnn-{key}.npz"
    sidecar = path.with_suffix(".json")
    cached = _load_cached(path, sidecar)
    if cached is not None:
        return cached
    model = train_frame_encoder(images, labels, settings)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    atomic_write(path, lambda fh: np.savez(fh, **arrays))
    meta = json.dumps({"sha256": _digest(arrays), **asdict(settings)})
    atomic_write(sidecar, lambda fh: fh.write(meta.encode()))
    return model
