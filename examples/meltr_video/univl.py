"""A UniVL-style video-text backbone with its 8 pretext losses (MATH.md section 6).

Architecture (Luo et al. 2020, "UniVL"), all post-LN transformer layers with GELU::

    text encoder    word + position embeddings -> LayerNorm -> text_layers      ([CLS] w.. [SEP])
    video encoder   Linear(frame_dim, H) + position -> LayerNorm -> video_layers (per-frame features)
    cross encoder   [text; video] + type + position embeddings -> cross_layers; score = w^T tanh(W h_[CLS])
    decoder         [BOS] w.. with shared word embeddings, causal self-attention, attention to a cross-encoder
                    memory -> Linear(H, vocab)

Losses, each a 0-dim tensor, in the official order :data:`LOSS_NAMES`:

    joint      max-margin ranking on the cosine S_ij of pooled text i ([CLS]) and video j (mean of frames):
               mean_{i != j} [relu(m - S_ii + S_ij) + relu(m - S_ii + S_ji)] / 2,  m = margin
    alignment  cross-entropy over the B x B cross-encoder scores C_ij, both directions averaged:
               (CE(C, diag) + CE(C^T, diag)) / 2                                      (primary: retrieval)
    mlm        cross-entropy of the masked words, from the cross encoder on (masked text, masked video)
    mfm        NCE over masked frames: the prediction at a masked frame is scored (dot product) against the
               true features of every real frame in the batch; cross-entropy with the true frame as target
    m_joint    joint on the masked inputs
    m_align    alignment on the masked inputs
    decoder    caption cross-entropy, teacher forcing, memory = cross encoder on (empty text, video)
                                                                                      (primary: captioning)
    m_decoder  the same with the masked video

The decoder's memory holds no caption words (our clips have no transcript, unlike YouCook2 in
UniVL), so captioning is a real video -> text task and greedy decoding needs only the video.
Attention runs on PyTorch's ``math`` SDPA kernel so that second derivatives exist (hypergradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "LOSS_NAMES",
    "PRIMARY",
    "UniVL",
    "UniVLConfig",
    "convert_univl_state_dict",
    "load_univl_checkpoint",
    "max_margin_ranking",
    "symmetric_cross_entropy",
]

LOSS_NAMES = ("joint", "alignment", "mlm", "mfm", "m_joint", "m_align", "decoder", "m_decoder")
PRIMARY = {"retrieval": "alignment", "captioning": "decoder"}


@dataclass(frozen=True)
class UniVLConfig:
    """Shapes of :class:`UniVL`. ``base`` = UniVL's published shapes; ``tiny`` trains on 2 CPU cores."""

    vocab_size: int
    hidden: int = 768
    heads: int = 12
    ff: int = 3072
    text_layers: int = 12
    video_layers: int = 6
    cross_layers: int = 2
    decoder_layers: int = 3
    frame_dim: int = 1024
    max_text_len: int = 48
    max_frames: int = 48
    dropout: float = 0.1
    margin: float = 0.1

    def __post_init__(self) -> None:
        for k in ("vocab_size", "hidden", "heads", "ff", "frame_dim", "max_text_len", "max_frames"):
            if int(getattr(self, k)) <= 0:
                raise ValueError(f"UniVLConfig.{k} must be positive, got {getattr(self, k)}")
        for k in ("text_layers", "video_layers", "cross_layers", "decoder_layers"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"UniVLConfig.{k} must be >= 1, got {getattr(self, k)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")

    @classmethod
    def tiny(cls, vocab_size: int, **kw: Any) -> UniVLConfig:
        """hidden 64, 4 heads, 2 text / 2 video / 1 cross / 1 decoder layers, no dropout."""
        base = dict(hidden=64, heads=4, ff=128, text_layers=2, video_layers=2, cross_layers=1, decoder_layers=1)
        base.update(max_text_len=32, max_frames=16, dropout=0.0)
        base.update(kw)
        return cls(vocab_size=vocab_size, **base)  # type: ignore[arg-type]

    @classmethod
    def base(cls, vocab_size: int = 30522, **kw: Any) -> UniVLConfig:
        """BERT-base text encoder (12 x 768, 12 heads), 6-layer video, 2-layer cross, 3-layer decoder."""
        return cls(vocab_size=vocab_size, **kw)

    @classmethod
    def named(cls, name: str, vocab_size: int, **kw: Any) -> UniVLConfig:
        if name not in ("tiny", "base"):
            raise ValueError(f"unknown config {name!r}; choose 'tiny' or 'base'")
        return getattr(cls, name)(vocab_size, **kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EncoderConfig(Protocol):
    """The fields the shared encoder blocks read (:class:`UniVLConfig` and ``VioletConfig`` have them)."""

    vocab_size: int
    hidden: int
    heads: int
    ff: int
    dropout: float
    max_text_len: int
    max_frames: int
    text_layers: int
    cross_layers: int


# The blocks below (text encoder, cross encoder, prediction head) are shared with the Violet-style backbone.


def _encoder(cfg: EncoderConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.hidden, cfg.heads, cfg.ff, cfg.dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-12
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TextEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.encoder = _encoder(cfg, cfg.text_layers)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """``ids`` [B, L] long, ``mask`` [B, L] bool (True = token) -> [B, L, H]."""
        if ids.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"text length {ids.shape[1]} > max_text_len {self.position_embeddings.num_embeddings}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word_embeddings(ids) + self.position_embeddings(pos))
        return self.encoder(x, src_key_padding_mask=~mask)


class VideoEncoder(nn.Module):
    def __init__(self, cfg: UniVLConfig):
        super().__init__()
        self.input_proj = nn.Linear(cfg.frame_dim, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_frames, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.encoder = _encoder(cfg, cfg.video_layers)

    def forward(self, video: Tensor, mask: Tensor) -> Tensor:
        """``video`` [B, F, frame_dim], ``mask`` [B, F] bool -> [B, F, H]."""
        if video.shape[1] > self.position_embeddings.num_embeddings:
            raise ValueError(f"{video.shape[1]} frames > max_frames {self.position_embeddings.num_embeddings}")
        if video.shape[-1] != self.input_proj.in_features:
            raise ValueError(
                f"frame features have dim {video.shape[-1]}, the model expects {self.input_proj.in_features}"
            )
        pos = torch.arange(video.shape[1], device=video.device)
        x = self.norm(self.input_proj(video) + self.position_embeddings(pos))
        return self.encoder(x, src_key_padding_mask=~mask)


class CrossEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.type_embeddings = nn.Embedding(2, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_text_len + cfg.max_frames, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.encoder = _encoder(cfg, cfg.cross_layers)
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden)
        self.score = nn.Linear(cfg.hidden, 1)

    def forward(self, t: Tensor, tm: Tensor, v: Tensor, vm: Tensor) -> Tensor:
        """Text states [N, Lt, H] (mask [N, Lt]) and video states [N, F, H] (mask [N, F]) -> [N, Lt+F, H]."""
        x = torch.cat([t + self.type_embeddings.weight[0], v + self.type_embeddings.weight[1]], dim=1)
        pos = torch.arange(x.shape[1], device=x.device)
        x = self.norm(x + self.position_embeddings(pos))
        return self.encoder(x, src_key_padding_mask=~torch.cat([tm, vm], dim=1))

    def pooled(self, h: Tensor) -> Tensor:
        """[N, L, H] -> [N, H]: ``tanh(W h_[CLS] + b)``, the pooled state of the first position."""
        return torch.tanh(self.pooler(h[:, 0]))

    def pooled_score(self, h: Tensor) -> Tensor:
        """[N, L, H] -> [N]: the matching score ``w^T pooled + b`` from the first ([CLS]) position."""
        return self.score(self.pooled(h)).squeeze(-1)

    def pair_scores(self, t: Tensor, tm: Tensor, v: Tensor, vm: Tensor) -> Tensor:
        """Matching scores [Nt, Nv] of every (text i, video j) pair, each pair through the encoder
        (differentiable; cost Nt * Nv passes). ``t`` [Nt, Lt, H] encoded text, ``tm`` its mask,
        ``v`` [Nv, F, H] encoded video (frame tokens), ``vm`` its mask."""
        Nt, Nv = t.shape[0], v.shape[0]
        tt = t.unsqueeze(1).expand(Nt, Nv, *t.shape[1:]).reshape(Nt * Nv, *t.shape[1:])
        ttm = tm.unsqueeze(1).expand(Nt, Nv, tm.shape[1]).reshape(Nt * Nv, -1)
        vv = v.unsqueeze(0).expand(Nt, Nv, *v.shape[1:]).reshape(Nt * Nv, *v.shape[1:])
        vvm = vm.unsqueeze(0).expand(Nt, Nv, vm.shape[1]).reshape(Nt * Nv, -1)
        return self.pooled_score(self(tt, ttm, vv, vvm)).view(Nt, Nv)

    def can_score_all_pairs(self) -> bool:
        """Whether :meth:`all_pair_scores` applies: one post-LN layer, evaluation mode."""
        layers = self.encoder.layers
        return not self.training and len(layers) == 1 and not layers[0].norm_first

    @torch.no_grad()
    def all_pair_scores(self, t: Tensor, tm: Tensor, v: Tensor, vm: Tensor, rows: int = 64) -> Tensor:
        """``pooled_score(self(t_i, tm_i, v_j, vm_j))`` for every pair: scores [Nt, Nv], without running the
        encoder on the Nt * Nv concatenated sequences.

        Exact rewrite for one post-LN layer in evaluation mode (:meth:`can_score_all_pairs`). The score
        reads only position 0 ([CLS], a text token), and before the layer every token is normalised on
        its own, so keys, values and the [CLS] query are per text or per video. Per head, with text
        scores ``s_l = q.k_l`` (``l`` < Lt) and video scores ``u_f = q.k_f``::

            attn_0 = (sum_l e^{s_l - m} v_l + sum_f e^{u_f - m} v_f) / (sum_l e^{s_l - m} + sum_f e^{u_f - m})

        The text sums are computed once per text (with the text maximum, rescaled by ``e^{m_text - m}``
        to the pair's maximum ``m``); only the video sums, the output projection, the feed-forward block
        and the pooler run per pair. Equal to the per-pair encoder up to float rounding (tested).
        """
        if not self.can_score_all_pairs():
            raise ValueError("all_pair_scores needs one post-LN layer in eval mode; use forward on each pair")
        layer = self.encoder.layers[0]
        attn = layer.self_attn
        H, nh = attn.embed_dim, attn.num_heads
        d = H // nh
        Nt, Lt, Nv, Fv = t.shape[0], t.shape[1], v.shape[0], v.shape[1]
        pos = self.position_embeddings.weight
        xt = self.norm(t + self.type_embeddings.weight[0] + pos[:Lt])
        xv = self.norm(v + self.type_embeddings.weight[1] + pos[Lt : Lt + Fv])
        W, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(xt[:, 0], W[:H], b[:H]).view(Nt, nh, d) * d**-0.5
        kt = F.linear(xt, W[H : 2 * H], b[H : 2 * H]).view(Nt, Lt, nh, d)
        vt = F.linear(xt, W[2 * H :], b[2 * H :]).view(Nt, Lt, nh, d)
        kv = F.linear(xv, W[H : 2 * H], b[H : 2 * H]).view(Nv, Fv, nh, d)
        vv = F.linear(xv, W[2 * H :], b[2 * H :]).view(Nv, Fv, nh, d)
        st = torch.einsum("ihd,ilhd->ihl", q, kt).masked_fill(~tm[:, None, :], float("-inf"))
        mt = st.amax(-1)  # [Nt, nh]; finite: [CLS] is never padding
        et = torch.exp(st - mt[..., None])
        at, zt = torch.einsum("ihl,ilhd->ihd", et, vt), et.sum(-1)  # [Nt, nh, d], [Nt, nh]
        vmask = ~vm[None, :, None, :]
        out = []
        for i in range(0, Nt, rows):
            sl = slice(i, i + rows)
            u = torch.einsum("ihd,jfhd->ijhf", q[sl], kv).masked_fill(vmask, float("-inf"))  # [n, Nv, nh, F]
            m = torch.maximum(mt[sl, None, :], u.amax(-1))  # [n, Nv, nh]
            ev = torch.exp(u - m[..., None])
            rescale = torch.exp(mt[sl, None, :] - m)
            num = at[sl, None] * rescale[..., None] + torch.einsum("ijhf,jfhd->ijhd", ev, vv)
            den = zt[sl, None] * rescale + ev.sum(-1)
            h = attn.out_proj((num / den[..., None]).reshape(num.shape[0], Nv, H))
            h = layer.norm1(xt[sl, 0][:, None, :] + h)
            h = layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))
            out.append(self.score(torch.tanh(self.pooler(h))).squeeze(-1))
        return torch.cat(out)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: UniVLConfig):
        super().__init__()
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        layer = nn.TransformerDecoderLayer(
            cfg.hidden, cfg.heads, cfg.ff, cfg.dropout, activation="gelu", batch_first=True, layer_norm_eps=1e-12
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.decoder_layers)
        self.output = nn.Linear(cfg.hidden, cfg.vocab_size)

    def forward(self, word_emb: nn.Embedding, ids: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Teacher-forced logits [B, L, vocab] for input ids [B, L] given memory [B, M, H] (mask [B, M])."""
        L = ids.shape[1]
        if L > self.position_embeddings.num_embeddings:
            raise ValueError(f"caption length {L} > max_text_len {self.position_embeddings.num_embeddings}")
        pos = torch.arange(L, device=ids.device)
        x = self.norm(word_emb(ids) + self.position_embeddings(pos))
        causal = torch.triu(torch.full((L, L), float("-inf"), device=ids.device), diagonal=1)
        h = self.decoder(x, memory, tgt_mask=causal, memory_key_padding_mask=~memory_mask)
        return self.output(h)


def _head(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12), nn.Linear(hidden, out))


def max_margin_ranking(sim: Tensor, margin: float) -> Tensor:
    """``mean_{i != j} [relu(m - S_ii + S_ij) + relu(m - S_ii + S_ji)] / 2`` for ``sim`` [B, B], B >= 2."""
    B = sim.shape[0]
    if sim.dim() != 2 or sim.shape[1] != B or B < 2:
        raise ValueError(f"max-margin ranking needs a square similarity matrix with B >= 2, got {tuple(sim.shape)}")
    d = sim.diagonal().unsqueeze(1)
    off = ~torch.eye(B, dtype=torch.bool, device=sim.device)
    cost = F.relu(margin - d + sim) + F.relu(margin - d.T + sim)  # row i: text i vs videos; col: video vs texts
    return cost[off].mean() / 2


def symmetric_cross_entropy(scores: Tensor) -> Tensor:
    """``(CE(C, diag) + CE(C^T, diag)) / 2`` for scores [B, B] (row i: text i against every video)."""
    target = torch.arange(scores.shape[0], device=scores.device)
    return (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target)) / 2


class UniVL(nn.Module):
    """The backbone. ``forward(batch)`` -> ``{name: 0-dim loss}`` for the 8 names of :data:`LOSS_NAMES`.

    ``batch`` is a dict from :class:`examples.meltr_video.data.Collate` (keys ``text``, ``text_mask``,
    ``masked_text``, ``mlm_labels``, ``video``, ``video_mask``, ``masked_video``, ``mfm_mask``,
    ``caption_in``, ``caption_out``). ``losses`` restricts which losses are computed (others omitted).
    """

    LOSS_NAMES: tuple[str, ...] = LOSS_NAMES

    def __init__(self, cfg: UniVLConfig, cls_id: int = 1, sep_id: int = 2, bos_id: int = 4, eos_id: int = 5):
        super().__init__()
        self.cfg = cfg
        self.cls_id, self.sep_id, self.bos_id, self.eos_id = cls_id, sep_id, bos_id, eos_id
        self.text = TextEncoder(cfg)
        self.video = VideoEncoder(cfg)
        self.cross = CrossEncoder(cfg)
        self.decoder = CaptionDecoder(cfg)
        self.mlm_head = _head(cfg.hidden, cfg.vocab_size)
        self.mfm_head = _head(cfg.hidden, cfg.frame_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------- building blocks
    @staticmethod
    def pool_text(t: Tensor) -> Tensor:
        return t[:, 0]

    @staticmethod
    def pool_video(v: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(v.dtype)
        return (v * m).sum(1) / m.sum(1).clamp_min(1.0)

    def joint_similarity(self, t: Tensor, v: Tensor, vmask: Tensor) -> Tensor:
        """Cosine similarity [Nt, Nv] of pooled text states [Nt, Lt, H] and video states [Nv, F, H]."""
        a = F.normalize(self.pool_text(t), dim=-1)
        b = F.normalize(self.pool_video(v, vmask), dim=-1)
        return a @ b.T

    def cross_scores(self, t: Tensor, tmask: Tensor, v: Tensor, vmask: Tensor) -> Tensor:
        """Cross-encoder matching scores [Nt, Nv] for every (text i, video j) pair
        (:meth:`CrossEncoder.pair_scores`)."""
        return self.cross.pair_scores(t, tmask, v, vmask)

    def fuse(self, text: Tensor, text_mask: Tensor, video: Tensor, video_mask: Tensor) -> Tensor:
        """Pooled cross-modal states [N, H] of the aligned pairs (text i, video i), for task heads (QA).

        ``h = cross(text_enc(text), video_enc(video))`` ([N, Lt+F, H]); returns ``tanh(W_pool h[:, 0] + b)``,
        the first ([CLS]) position through the cross encoder's pooler (the input of ``cross.score``).
        ``text`` [N, Lt] long, ``text_mask`` [N, Lt] bool, ``video`` [N, F, frame_dim], ``video_mask`` [N, F].
        Differentiable (math SDPA kernel, so second derivatives exist).
        """
        if text.shape[0] != video.shape[0]:
            raise ValueError(f"fuse pairs text i with video i: got {text.shape[0]} texts and {video.shape[0]} videos")
        with sdpa_kernel(SDPBackend.MATH):
            h = self.cross(self.text(text, text_mask), text_mask, self.video(video, video_mask), video_mask)
        return self.cross.pooled(h)

    def _empty_text(self, B: int, device: torch.device) -> tuple[Tensor, Tensor]:
        ids = torch.tensor([[self.cls_id, self.sep_id]], device=device).expand(B, 2)
        mask = torch.ones(B, 2, dtype=torch.bool, device=device)
        return self.text(ids, mask), mask

    def caption_memory(self, v: Tensor, vmask: Tensor) -> tuple[Tensor, Tensor]:
        """Decoder memory: the cross encoder on (empty text, video states). -> ([B, 2+F, H], mask)."""
        t, tm = self._empty_text(v.shape[0], v.device)
        mask = torch.cat([tm, vmask], dim=1)
        return self.cross(t, tm, v, vmask), mask

    def _caption_loss(self, memory: Tensor, mmask: Tensor, cin: Tensor, cout: Tensor) -> Tensor:
        logits = self.decoder(self.text.word_embeddings, cin, memory, mmask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cout.reshape(-1), ignore_index=-100)

    # ------------------------------------------------------------------------------------- losses
    def forward(self, batch: Mapping[str, Tensor], losses: tuple[str, ...] = LOSS_NAMES) -> dict[str, Tensor]:
        """The pretext losses (0-dim each) named in ``losses`` on ``batch``; keys in :data:`LOSS_NAMES` order."""
        unknown = [n for n in losses if n not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; known: {list(LOSS_NAMES)}")
        want = set(losses)
        B = batch["text"].shape[0]
        if B < 2:
            raise ValueError(f"UniVL's contrastive losses need a batch of at least 2 pairs, got {B}")
        out: dict[str, Tensor] = {}
        with sdpa_kernel(SDPBackend.MATH):
            tmask, vmask = batch["text_mask"], batch["video_mask"]
            if want & {"joint", "alignment"}:
                t = self.text(batch["text"], tmask)
                v = self.video(batch["video"], vmask)
                if "joint" in want:
                    out["joint"] = max_margin_ranking(self.joint_similarity(t, v, vmask), self.cfg.margin)
                if "alignment" in want:
                    out["alignment"] = symmetric_cross_entropy(self.cross_scores(t, tmask, v, vmask))
            masked = want & {"mlm", "mfm", "m_joint", "m_align", "m_decoder"}
            if masked:
                mt = self.text(batch["masked_text"], tmask)
                mv = self.video(batch["masked_video"], vmask)
            if want & {"mlm", "mfm"}:
                h = self.cross(mt, tmask, mv, vmask)
                Lt = mt.shape[1]
                if "mlm" in want:
                    logits = self.mlm_head(h[:, :Lt])
                    out["mlm"] = F.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), batch["mlm_labels"].reshape(-1), ignore_index=-100
                    )
                if "mfm" in want:
                    out["mfm"] = self._mfm_loss(h[:, Lt:], batch["video"], vmask, batch["mfm_mask"])
            if "m_joint" in want:
                out["m_joint"] = max_margin_ranking(self.joint_similarity(mt, mv, vmask), self.cfg.margin)
            if "m_align" in want:
                out["m_align"] = symmetric_cross_entropy(self.cross_scores(mt, tmask, mv, vmask))
            if "decoder" in want:
                vv = v if "alignment" in out or "joint" in out else self.video(batch["video"], vmask)
                mem, mm = self.caption_memory(vv, vmask)
                out["decoder"] = self._caption_loss(mem, mm, batch["caption_in"], batch["caption_out"])
            if "m_decoder" in want:
                mem, mm = self.caption_memory(mv, vmask)
                out["m_decoder"] = self._caption_loss(mem, mm, batch["caption_in"], batch["caption_out"])
        return {n: out[n] for n in LOSS_NAMES if n in out}

    def _mfm_loss(self, hv: Tensor, video: Tensor, vmask: Tensor, mfm_mask: Tensor) -> Tensor:
        """NCE: prediction at each masked frame vs the true features of all real frames in the batch."""
        pred = self.mfm_head(hv[mfm_mask])  # [M, D]
        cand = video[vmask]  # [N, D] real frames
        idx = torch.cumsum(vmask.reshape(-1).long(), 0).view_as(vmask) - 1  # position of each frame in cand
        target = idx[mfm_mask]
        if pred.shape[0] == 0:
            raise ValueError("mfm needs at least one masked frame (mfm_mask is all False)")
        return F.cross_entropy(pred @ cand.T, target)

    # ---------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def similarity(
        self,
        text: Tensor,
        text_mask: Tensor,
        video: Tensor,
        video_mask: Tensor,
        mode: str = "cross",
        chunk: int = 4096,
    ) -> Tensor:
        """Text-video similarity [Nt, Nv] (row i: text i against every video).

        ``mode="cross"``: cross-encoder matching scores (UniVL's retrieval score; with a one-layer cross
        encoder in eval mode by :meth:`CrossEncoder.all_pair_scores`, else pairs in chunks of ``chunk``);
        ``"joint"``: cosine of the pooled encoder outputs.
        """
        if mode not in ("cross", "joint"):
            raise ValueError(f"mode must be 'cross' or 'joint', got {mode!r}")
        with sdpa_kernel(SDPBackend.MATH):
            t = self.text(text, text_mask)
            v = self.video(video, video_mask)
            if mode == "joint":
                return self.joint_similarity(t, v, video_mask)
            if self.cross.can_score_all_pairs():
                return self.cross.all_pair_scores(t, text_mask, v, video_mask)
            rows = max(1, chunk // max(1, v.shape[0]))
            return torch.cat(
                [
                    self.cross_scores(t[i : i + rows], text_mask[i : i + rows], v, video_mask)
                    for i in range(0, t.shape[0], rows)
                ]
            )

    @torch.no_grad()
    def generate(self, video: Tensor, video_mask: Tensor, max_len: int = 20) -> Tensor:
        """Greedy captions [B, <= max_len] of word ids (after [BOS]; [EOS] then padding with [EOS])."""
        with sdpa_kernel(SDPBackend.MATH):
            v = self.video(video, video_mask)
            mem, mm = self.caption_memory(v, video_mask)
            B = video.shape[0]
            ids = torch.full((B, 1), self.bos_id, dtype=torch.long, device=video.device)
            done = torch.zeros(B, dtype=torch.bool, device=video.device)
            for _ in range(min(max_len, self.cfg.max_text_len - 1)):
                logits = self.decoder(self.text.word_embeddings, ids, mem, mm)[:, -1]
                nxt = logits.argmax(-1).masked_fill(done, self.eos_id)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == self.eos_id
                if bool(done.all()):
                    break
        return ids[:, 1:]


# ---------------------------------------------------------------------- UniVL checkpoint loading

_BERT_LAYER = {
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_PREFIX = {"bert": "text", "visual": "video", "cross": "cross"}
_EMB = {
    "bert": {"word_embeddings": "word_embeddings", "position_embeddings": "position_embeddings", "LayerNorm": "norm"},
    "visual": {"word_embeddings": "input_proj", "position_embeddings": "position_embeddings", "LayerNorm": "norm"},
    "cross": {"token_type_embeddings": "type_embeddings", "position_embeddings": "position_embeddings"},
}
_EMB["cross"]["LayerNorm"] = "norm"


def _leaf(name: str) -> str:
    return {"gamma": "weight", "beta": "bias"}.get(name, name)


def convert_univl_state_dict(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Map UniVL checkpoint names onto :class:`UniVL`'s. Returns ``(state_dict, unmapped_names)``.

    Known names (BERT style, ``gamma``/``beta`` accepted for LayerNorm weight/bias)::

        {bert,visual,cross}.embeddings.{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}.*
        {bert,visual,cross}.encoder.layer.{i}.attention.self.{query,key,value}.{weight,bias}
                                                       -> ...encoder.layers.{i}.self_attn.in_proj_{weight,bias}
        ....attention.output.dense / attention.output.LayerNorm / intermediate.dense / output.dense / output.LayerNorm
                                                       -> self_attn.out_proj / norm1 / linear1 / linear2 / norm2
        cross.pooler.dense.*                           -> cross.pooler.*

    ``visual.embeddings.word_embeddings`` is UniVL's Linear(1024, H) on the frame features. The
    ``decoder.*`` and ``cls.*`` heads of UniVL use their own layout that is not mapped here: they are
    returned in ``unmapped_names`` (with anything else unknown), so a caller sees what stays random.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unmapped: list[str] = []
    for name, value in sd.items():
        parts = name.split(".")
        top = parts[0]
        if top not in _PREFIX:
            unmapped.append(name)
            continue
        ours = _PREFIX[top]
        leaf = _leaf(parts[-1])
        if parts[1] == "embeddings" and len(parts) == 4 and parts[2] in _EMB[top]:
            out[f"{ours}.{_EMB[top][parts[2]]}.{leaf}"] = value
        elif parts[1] == "encoder" and len(parts) >= 6 and parts[2] == "layer":
            i, mid = parts[3], ".".join(parts[4:-1])
            base = f"{ours}.encoder.layers.{i}"
            if mid in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault((base, leaf), {})[mid.rsplit(".", 1)[1]] = value
            elif mid in _BERT_LAYER:
                out[f"{base}.{_BERT_LAYER[mid]}.{leaf}"] = value
            else:
                unmapped.append(name)
        elif top == "cross" and parts[1:3] == ["pooler", "dense"]:
            out[f"cross.pooler.{leaf}"] = value
        else:
            unmapped.append(name)
    for (base, leaf), d in qkv.items():
        if set(d) != {"query", "key", "value"}:
            raise ValueError(f"incomplete attention weights for {base} ({leaf}): have {sorted(d)}")
        out[f"{base}.self_attn.in_proj_{leaf}"] = torch.cat([d["query"], d["key"], d["value"]], dim=0)
    return out, sorted(unmapped)


def load_univl_checkpoint(model: UniVL, path: str | Path) -> dict[str, list[str]]:
    """Load a UniVL checkpoint (``torch.load(weights_only=True)``) into ``model`` where names map.

    Returns ``{"loaded": [...], "unmapped": [...], "missing": [...]}`` (ours that stay as they were).
    Raises ``ValueError`` naming the file and parameter on a shape mismatch.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    mapped, unmapped = convert_univl_state_dict(sd)
    own = model.state_dict()
    for k, v in mapped.items():
        if k not in own:
            unmapped.append(k)
        elif own[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} here")
    loadable = {k: v for k, v in mapped.items() if k in own}
    model.load_state_dict(loadable, strict=False)
    return {"loaded": sorted(loadable), "unmapped": sorted(unmapped), "missing": sorted(set(own) - set(loadable))}
