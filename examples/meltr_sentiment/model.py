"""The sentiment regressor (a UniVL-style cross encoder with a regression head) and its training.

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
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .data import MODALITIES, SPLITS, MOSIDataset, MOSISplits, collate_mosi
from .metrics import SentimentMetricWarning, sentiment_metrics

__all__ = [
    "LOSS_NAMES",
    "PRIMARY",
    "SentimentRegressor",
    "evaluate",
    "predict_dataset",
    "train_regressor",
]

LOSS_NAMES = ("sentiment",)
PRIMARY = {"sentiment": "sentiment"}


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
