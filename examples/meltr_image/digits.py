"""MELTR's image-only setting (paper Appendix H: CIFAR-100 + ResNet32) on data that ships offline:
scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits), a small CNN, and three losses

    cls  primary: cross-entropy of the class head on the clean image                  CE(h_c(x), y)
    rot  auxiliary: 4-way rotation prediction, x rotated by k * 90 deg, k ~ U{0..3}    CE(h_r(rot_k x), k)
    mix  auxiliary: mixup, x_m = l x + (1-l) x_pi, l ~ Beta(a, a) per example
                                                               l CE(h_c(x_m), y) + (1-l) CE(h_c(x_m), y_pi)

Every random choice (rotation ``k``, mixup partner ``pi`` and ``l``) is drawn when the batch is made
and stored in it, so a batch's losses are a deterministic function of the parameters, as the
second-order products of the solvers assume.

Splits (per seed, stratified by class): ``n_train`` labelled training images (the inner data),
``n_meta`` labelled meta images (MELTR's outer objective only), ``n_val`` validation images (to
choose hyperparameters, never the test set), and the rest as test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TASKS", "DigitBatches", "DigitSplits", "SmallCNN", "load_digit_splits", "make_batch"]

TASKS: tuple[str, ...] = ("cls", "rot", "mix")


@dataclass
class DigitSplits:
    """Images ``[n, 1, 8, 8]`` in [0, 1] and labels ``[n]`` of each split."""

    x_train: Tensor
    y_train: Tensor
    x_meta: Tensor
    y_meta: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _stratified_take(y: np.ndarray, pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices from ``pool`` with (as near as possible) equal counts per class."""
    classes = np.unique(y)
    per = np.full(len(classes), n // len(classes))
    per[rng.permutation(len(classes))[: n - per.sum()]] += 1
    out = []
    for c, k in zip(classes, per, strict=True):
        cand = pool[y[pool] == c]
        if len(cand) < k:
            raise ValueError(f"class {c} has only {len(cand)} images left for a split needing {k}")
        out.append(rng.choice(cand, size=k, replace=False))
    return rng.permutation(np.concatenate(out))


def load_digit_splits(n_train: int = 150, n_meta: int = 50, n_val: int = 300, seed: int = 0) -> DigitSplits:
    """Stratified random splits of ``load_digits`` (see the module docstring); pixels / 16.

    Raises:
        ValueError: a split smaller than 10 or the splits together leaving fewer than 100 test images.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for name, n in (("n_train", n_train), ("n_meta", n_meta), ("n_val", n_val)):
        if not isinstance(n, int) or n < 10:
            raise ValueError(f"{name} must be an int >= 10, got {n!r}")
    if n_train + n_meta + n_val > len(y) - 100:
        raise ValueError(f"n_train + n_meta + n_val = {n_train + n_meta + n_val} leaves < 100 of {len(y)} for test")
    rng = np.random.default_rng(seed)
    pool = np.arange(len(y))
    parts = []
    for n in (n_train, n_meta, n_val):
        idx = _stratified_take(y, pool, n, rng)
        parts.append(idx)
        pool = np.setdiff1d(pool, idx)
    parts.append(pool)
    xt = torch.as_tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    yt = torch.as_tensor(y, dtype=torch.long)
    tensors = [t for idx in parts for t in (xt[idx], yt[idx])]
    return DigitSplits(*tensors)


def make_batch(x: Tensor, y: Tensor, gen: torch.Generator, mixup_alpha: float = 0.4) -> dict[str, Tensor]:
    """A batch dict with the random choices of the auxiliary tasks fixed:
    ``x [B,1,8,8]``, ``y [B]``, ``x_rot [B,1,8,8]``, ``k_rot [B]`` (0..3), ``x_mix [B,1,8,8]``,
    ``y_mix [B]`` (the partner's label), ``l_mix [B]`` (the weight of ``y``)."""
    if x.dim() != 4 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"make_batch needs x [B,C,H,W] and y [B] with B > 0, got {tuple(x.shape)}, {tuple(y.shape)}")
    if not mixup_alpha > 0:
        raise ValueError(f"mixup_alpha must be > 0, got {mixup_alpha!r}")
    b = x.shape[0]
    k = torch.randint(0, 4, (b,), generator=gen)
    x_rot = torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(x, k, strict=True)])
    perm = torch.randperm(b, generator=gen)
    beta = torch.distributions.Beta(torch.tensor(mixup_alpha), torch.tensor(mixup_alpha))
    # sample through the generator: Beta(a, a) = G1 / (G1 + G2) with Gamma(a) variates from uniforms is
    # awkward, so draw with the global RNG forked from the generator's next seed (reproducible).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        lam = beta.sample((b,))
    lv = lam.view(b, 1, 1, 1)
    return {
        "x": x,
        "y": y,
        "x_rot": x_rot,
        "k_rot": k,
        "x_mix": lv * x + (1 - lv) * x[perm],
        "y_mix": y[perm],
        "l_mix": lam,
    }


class DigitBatches:
    """Re-iterable mini-batches of ``(x, y)`` with fresh augmentations each pass, from a seeded generator.

    Args:
        batch_size: images per batch (the last, smaller batch is dropped when ``drop_last``).
        shuffle: reshuffle every pass.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mixup_alpha: float = 0.4,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last, self.mixup_alpha = shuffle, drop_last, mixup_alpha
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield make_batch(self.x[idx], self.y[idx], self.gen, self.mixup_alpha)


class SmallCNN(nn.Module):
    """conv3x3(1->c) ReLU conv3x3(c->2c) ReLU maxpool2 -> [2c, 4, 4] -> Linear(32c, h) ReLU, with two heads:
    ``cls`` (10 classes) and ``rot`` (4 rotations). No batch norm: the losses are functions of the
    parameters alone (no running statistics), which the solvers' functional calls need.

    ``forward(batch)`` returns ``{"cls", "rot", "mix"}``, 0-dim losses (see the module docstring);
    ``logits(x)`` the class logits ``[B, 10]``.
    """

    def __init__(self, channels: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, hidden),
            nn.ReLU(),
        )
        self.cls_head = nn.Linear(hidden, 10)
        self.rot_head = nn.Linear(hidden, 4)

    def logits(self, x: Tensor) -> Tensor:
        return self.cls_head(self.features(x))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        b = batch["x"].shape[0]
        # one pass over the three image sets: [x; x_rot; x_mix]
        feats = self.features(torch.cat([batch["x"], batch["x_rot"], batch["x_mix"]]))
        f_x, f_rot, f_mix = feats[:b], feats[b : 2 * b], feats[2 * b :]
        cls = F.cross_entropy(self.cls_head(f_x), batch["y"])
        rot = F.cross_entropy(self.rot_head(f_rot), batch["k_rot"])
        lm = self.cls_head(f_mix)
        lam = batch["l_mix"]
        mix = (
            lam * F.cross_entropy(lm, batch["y"], reduction="none")
            + (1 - lam) * F.cross_entropy(lm, batch["y_mix"], reduction="none")
        ).mean()
        return {"cls": cls, "rot": rot, "mix": mix}
