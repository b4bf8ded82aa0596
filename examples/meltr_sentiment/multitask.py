"""The sentiment model with auxiliary losses for MELTR, and the collate that draws its feature masks.

Why these auxiliary losses
--------------------------
The paper fine-tunes UniVL on CMU-MOSI with UniVL's eight losses (supplement A.1): masked language and
masked frame modelling, text-video joint and alignment losses, caption decoding, and their variants on
masked inputs. A.1 also says that one of the UniVL task losses "is also used as the primary loss function
for multi-modal sentiment analysis"; its symbol is lost in the paper text this project has, and neither
UniVL nor MELTR publishes MOSI code, so which one is not known here. This model takes the sentiment
regression as the primary loss, since MOSI is scored by MAE. MOSI has no captions and its features are
continuous (GloVe, Facet, COVAREP), so the model keeps the counterparts of UniVL's losses that make sense
for three aligned feature sequences. It adds the unimodal heads common in the MOSI literature (Self-MM,
MMSA's multi-task models)::

    sentiment      primary: |yhat - y| (L1, "l1", MulT's training loss; MOSI reports MAE) or (yhat - y)^2
    uni_m          unimodal regression, m in text / vision / audio: the same loss on w_m^T pool(U_m) + b_m,
                   a head on modality m's own encoder only (no cross-modal attention): each stream must
                   carry the sentiment by itself (UniVL has separate text and video encoders, too)
    align          cross-modal alignment (UniVL's joint / alignment): symmetric InfoNCE between the pooled
                   text and the pooled vision+audio encodings of the batch's segments, temperature tau
    recon_m        masked-feature reconstruction (UniVL's MLM / MFM for continuous features): a rate of
                   each segment's real timesteps of modality m is replaced by a learned [MASK] token; the
                   cross encoder's output there regresses the LayerNorm-ed (no affine, detached) feature
                   vector, mean squared error over the masked timesteps and the feature dimensions

so ``T = 8`` losses in :data:`LOSS_NAMES`. On the latent-factor data of
:mod:`~examples.meltr_sentiment.synthetic`, each is tied to the label: every modality sees the sentiment
latent, masked timesteps are predictable from the other modalities at the same time step, and alignment
rests on the segment-level factors. Whether a loss helps is what the comparison measures.

Model (:class:`MultiTaskSentiment`, hidden width ``h``)::

    u_m[t] = LN_m(x_m[t]) W_m + type_m + pos_t      ([MASK] + type_m + pos_t at masked timesteps)
    U_m    = TransformerLayer_m(u_m, key padding = ~mask_m)        one unimodal layer per modality
    H      = TransformerLayer_x([cls + type_cls ; U_text ; U_vision ; U_audio], key padding)   cross encoder
    yhat   = w^T tanh(W H[cls]) + b
    pool(U_m) = mean of U_m over the real timesteps (0 when a segment has none)

The primary and the unimodal / alignment losses read the unmasked input; the reconstruction losses a
second pass on the masked input (only when asked for). Dropout is 0 and attention runs on the MATH SDPA
kernel, so every loss is a deterministic, twice-differentiable function of (parameters, batch): the batch
carries the masks (``{m}_recon``, drawn by :class:`MaskingCollate` from its own generator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import MODALITIES, collate_mosi

__all__ = ["AUX_LOSSES", "LOSS_NAMES", "PRIMARY", "MaskingCollate", "MultiTaskSentiment"]

PRIMARY = "sentiment"
AUX_LOSSES = (
    "uni_text",
    "uni_vision",
    "uni_audio",
    "align",
    "recon_text",
    "recon_vision",
    "recon_audio",
)
LOSS_NAMES = (PRIMARY, *AUX_LOSSES)


class MaskingCollate:
    """:func:`~examples.meltr_sentiment.data.collate_mosi` plus ``{m}_recon`` [B, L_m] bool per modality:
    ``max(1, round(rate * n))`` of a segment's ``n`` real timesteps, uniformly without replacement, drawn
    from ``generator`` (none when ``n = 0``). The batch is a deterministic function of the generator's state."""

    def __init__(self, generator: torch.Generator, rate: float = 0.25):
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not (isinstance(rate, int | float) and 0 < rate <= 1):
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        self.generator, self.rate = generator, float(rate)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = collate_mosi(items)
        for m in MODALITIES:
            real = batch[f"{m}_mask"]
            recon = torch.zeros_like(real)
            for b in range(real.shape[0]):
                idx = torch.nonzero(real[b]).reshape(-1)
                if idx.numel() == 0:
                    continue
                k = max(1, round(self.rate * idx.numel()))
                pick = torch.randperm(idx.numel(), generator=self.generator)[:k]
                recon[b, idx[pick]] = True
            batch[f"{m}_recon"] = recon
        return batch


def _layer(hidden: int, heads: int, ff: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(
        hidden, heads, ff, dropout=0.0, activation="gelu", batch_first=True, layer_norm_eps=1e-12
    )


def _pool(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, L, h] over the True timesteps of ``mask`` [B, L] (0 for a row without any)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _padding(mask: Tensor) -> Tensor:
    """Key padding for attention: ``~mask``, except rows without a real timestep attend to all (no NaN)."""
    return ~mask & mask.any(dim=1, keepdim=True)


class MultiTaskSentiment(nn.Module):
    """The sentiment regressor with the auxiliary losses of the module docstring.

    ``forward(batch, losses=LOSS_NAMES)`` -> ``{name: 0-dim loss}`` in the order asked;
    ``predict(batch)`` -> [B] sentiment scores. ``batch`` holds ``text`` / ``vision`` / ``audio``
    [B, L_m, dim_m], ``{m}_mask`` [B, L_m] bool (default all True), ``label`` [B] for the losses and
    ``{m}_recon`` [B, L_m] bool for ``recon_m`` (from :class:`MaskingCollate`).

    Args:
        text_dim, vision_dim, audio_dim: feature widths.
        hidden, heads, ff: width, attention heads and feed-forward width of every transformer layer.
        max_len: longest sequence (position embeddings).
        loss: ``"l1"`` or ``"mse"`` for the primary and unimodal regressions.
        temperature: tau of the alignment loss.
    """

    LOSS_NAMES = LOSS_NAMES

    def __init__(
        self,
        text_dim: int,
        vision_dim: int,
        audio_dim: int,
        hidden: int = 32,
        heads: int = 4,
        ff: int = 64,
        max_len: int = 64,
        loss: str = "l1",
        temperature: float = 0.1,
    ):
        super().__init__()
        if loss not in ("mse", "l1"):
            raise ValueError(f"loss must be 'mse' or 'l1', got {loss!r}")
        for name, v in (("text_dim", text_dim), ("vision_dim", vision_dim), ("audio_dim", audio_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if not (isinstance(temperature, int | float) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.dims = {"text": text_dim, "vision": vision_dim, "audio": audio_dim}
        self.hidden, self.max_len, self.loss, self.temperature = hidden, max_len, loss, float(temperature)
        self.input_norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in self.dims.items()})
        self.proj = nn.ModuleDict({m: nn.Linear(d, hidden) for m, d in self.dims.items()})
        self.type_embeddings = nn.Embedding(1 + len(MODALITIES), hidden)  # 0 = [CLS], then text, vision, audio
        self.position_embeddings = nn.Embedding(max_len, hidden)
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        self.cls = nn.Parameter(torch.zeros(hidden))
        self.unimodal = nn.ModuleDict({m: _layer(hidden, heads, ff) for m in MODALITIES})
        self.cross = _layer(hidden, heads, ff)
        self.pooler = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        self.uni_heads = nn.ModuleDict({m: nn.Linear(hidden, 1) for m in MODALITIES})
        self.align_proj = nn.ModuleDict({"text": nn.Linear(hidden, hidden), "av": nn.Linear(hidden, hidden)})
        self.recon_heads = nn.ModuleDict({m: nn.Linear(hidden, d) for m, d in self.dims.items()})
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)

    @classmethod
    def for_dims(cls, dims: Mapping[str, int], **kw: Any) -> MultiTaskSentiment:
        """Built for ``dims = {"text": dt, "vision": dv, "audio": da}`` (e.g. ``MOSISplits.dims``)."""
        return cls(dims["text"], dims["vision"], dims["audio"], **kw)

    # ------------------------------------------------------------------ encoding
    def _inputs(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        xs, masks, B = {}, {}, None
        for m in MODALITIES:
            if m not in batch:
                raise KeyError(f"batch is missing {m!r} (needs {list(MODALITIES)})")
            x = batch[m]
            if x.ndim != 3 or x.shape[-1] != self.dims[m]:
                raise ValueError(f"batch[{m!r}] has shape {tuple(x.shape)}, the model expects [B, L, {self.dims[m]}]")
            if B is None:
                B = x.shape[0]
            elif x.shape[0] != B:
                raise ValueError(f"batch[{m!r}] has {x.shape[0]} samples, batch['text'] has {B}")
            if x.shape[1] > self.max_len:
                raise ValueError(f"batch[{m!r}] has {x.shape[1]} timesteps > max_len {self.max_len}")
            mask = batch.get(f"{m}_mask")
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            elif tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"batch['{m}_mask'] has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
            xs[m], masks[m] = x, mask.bool()
        assert B is not None
        return xs, masks, B

    def _encode(self, batch: Mapping[str, Any], masked: bool) -> dict[str, Any]:
        """``{"U": {m: [B, L_m, h]}, "H": [B, 1 + sum L_m, h], "mask": {m: [B, L_m]}, "recon": {m: ...}}``."""
        xs, masks, B = self._inputs(batch)
        U, recon = {}, {}
        with sdpa_kernel(SDPBackend.MATH):
            for i, m in enumerate(MODALITIES, start=1):
                x = xs[m]
                pos = self.position_embeddings(torch.arange(x.shape[1], device=x.device))
                extra = self.type_embeddings.weight[i] + pos
                u = self.proj[m](self.input_norm[m](x)) + extra
                if masked:
                    r = batch.get(f"{m}_recon")
                    if r is None:
                        raise KeyError(f"batch is missing '{m}_recon' (the masked timesteps; use MaskingCollate)")
                    if tuple(r.shape) != tuple(masks[m].shape):
                        want = tuple(x.shape[:2])
                        raise ValueError(f"batch['{m}_recon'] has shape {tuple(r.shape)}, expected {want}")
                    r = r.bool() & masks[m]
                    u = torch.where(r.unsqueeze(-1), self.mask_token + extra, u)
                    recon[m] = r
                U[m] = self.unimodal[m](u, src_key_padding_mask=_padding(masks[m]))
            cls = (self.cls + self.type_embeddings.weight[0]).expand(B, 1, self.hidden)
            keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=cls.device), *masks.values()], dim=1)
            H = self.cross(torch.cat([cls, *U.values()], dim=1), src_key_padding_mask=~keep)
        return {"U": U, "H": H, "mask": masks, "recon": recon}

    def _regression(self, yhat: Tensor, y: Tensor) -> Tensor:
        return F.l1_loss(yhat, y) if self.loss == "l1" else F.mse_loss(yhat, y)

    def predict(self, batch: Mapping[str, Any]) -> Tensor:
        """Sentiment scores [B] from the unmasked input (differentiable; wrap in ``torch.no_grad()`` to evaluate)."""
        return self._head(self._encode(batch, masked=False))

    def _head(self, enc: Mapping[str, Any]) -> Tensor:
        return self.head(torch.tanh(self.pooler(enc["H"][:, 0]))).squeeze(-1)

    # ------------------------------------------------------------------ losses
    def forward(self, batch: Mapping[str, Any], losses: Sequence[str] = LOSS_NAMES) -> dict[str, Tensor]:
        """The losses named in ``losses`` (see the module docstring), each 0-dim."""
        losses = tuple(losses)
        unknown = [n for n in losses if n not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; known: {list(LOSS_NAMES)}")
        out: dict[str, Tensor] = {}
        if any(not n.startswith("recon_") for n in losses):
            if "label" not in batch:
                raise KeyError("batch is missing 'label' [B] (needed for the regression losses)")
            enc = self._encode(batch, masked=False)
            pooled = {m: _pool(enc["U"][m], enc["mask"][m]) for m in MODALITIES}
            y = batch["label"].reshape(-1)
            if y.numel() != enc["H"].shape[0]:
                raise ValueError(f"batch['label'] has {y.numel()} values for {enc['H'].shape[0]} samples")
            y = y.to(enc["H"].dtype)
            for n in losses:
                if n == PRIMARY:
                    out[n] = self._regression(self._head(enc), y)
                elif n.startswith("uni_"):
                    m = n[4:]
                    out[n] = self._regression(self.uni_heads[m](pooled[m]).squeeze(-1), y)
                elif n == "align":
                    out[n] = self._align(pooled)
        if any(n.startswith("recon_") for n in losses):
            enc = self._encode(batch, masked=True)
            start = 1
            for m in MODALITIES:
                L = enc["U"][m].shape[1]
                if f"recon_{m}" in losses:
                    out[f"recon_{m}"] = self._recon(m, enc["H"][:, start : start + L], batch[m], enc["recon"][m])
                start += L
        return {n: out[n] for n in losses}

    def _align(self, pooled: Mapping[str, Tensor]) -> Tensor:
        """Symmetric InfoNCE: segment i's text against the vision+audio of the batch's segments (and back)."""
        t = F.normalize(self.align_proj["text"](pooled["text"]), dim=-1)
        av = F.normalize(self.align_proj["av"]((pooled["vision"] + pooled["audio"]) / 2), dim=-1)
        logits = t @ av.T / self.temperature
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def _recon(self, m: str, h: Tensor, x: Tensor, recon: Tensor) -> Tensor:
        """Mean over masked timesteps and feature dimensions of ``(head_m(h) - LN(x))^2`` (0 when none is masked)."""
        target = F.layer_norm(x, (x.shape[-1],)).detach()
        err = (self.recon_heads[m](h) - target).pow(2).mean(-1)  # [B, L]
        w = recon.to(err.dtype)
        return (err * w).sum() / w.sum().clamp_min(1.0)
