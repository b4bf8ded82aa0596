"""Evaluate a :class:`~examples.meltr_video.univl.UniVL` on a :class:`~examples.meltr_video.data.VideoTextDataset`.

Retrieval: every caption is a query against the set of distinct videos (by ``video_id``); the
similarity matrix is [captions, videos] and the target of caption ``i`` is its own video.
Captioning: one greedy caption per distinct video, scored against all of that video's captions by
:func:`~examples.meltr_video.metrics.caption_metrics` (pycocoevalcap's scorers when installed, METEOR
through its java jar).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from .data import Collate, Tokenizer, VideoTextDataset
from .metrics import caption_metrics, retrieval_metrics
from .univl import UniVL

__all__ = ["caption_eval", "retrieval_eval", "retrieval_similarity"]


def _videos(dataset: VideoTextDataset) -> tuple[list[int], list[int]]:
    """(record index of the first occurrence of each distinct video, video position of every record)."""
    first: dict[str, int] = {}
    for i, r in enumerate(dataset.records):
        first.setdefault(r.video_id, i)
    pos = {vid: k for k, vid in enumerate(first)}
    return list(first.values()), [pos[r.video_id] for r in dataset.records]


def _batch(dataset: VideoTextDataset, idx: list[int], tokenizer: Tokenizer, max_words: int) -> dict[str, Tensor]:
    return Collate(tokenizer, max_words=max_words, max_frames=None, mask_prob=0.0)([dataset[i] for i in idx])


def retrieval_similarity(
    model: UniVL,
    dataset: VideoTextDataset,
    tokenizer: Tokenizer,
    mode: str = "cross",
    max_words: int = 20,
) -> tuple[Tensor, list[int]]:
    """``(S [captions, videos], targets)`` for text-to-video retrieval on ``dataset``."""
    vids, targets = _videos(dataset)
    was = model.training
    model.eval()
    try:
        tb = _batch(dataset, list(range(len(dataset))), tokenizer, max_words)
        vb = _batch(dataset, vids, tokenizer, max_words)
        sim = model.similarity(tb["text"], tb["text_mask"], vb["video"], vb["video_mask"], mode=mode)
    finally:
        model.train(was)
    return sim, targets


def retrieval_eval(
    model: UniVL, dataset: VideoTextDataset, tokenizer: Tokenizer, mode: str = "cross", max_words: int = 20
) -> dict[str, float]:
    """R@1/5/10 (percent), MedR, MeanR of text-to-video retrieval (chance R@1 = 100 / #videos)."""
    sim, targets = retrieval_similarity(model, dataset, tokenizer, mode, max_words)
    return retrieval_metrics(sim, targets)


def caption_eval(
    model: UniVL,
    dataset: VideoTextDataset,
    tokenizer: Tokenizer,
    max_len: int = 20,
    with_meteor: bool | None = False,
    batch_size: int = 64,
) -> tuple[Mapping[str, float], list[str]]:
    """Captioning metrics of greedy captions, one per distinct video; returns ``(metrics, captions)``.

    ``with_meteor`` as in :func:`~examples.meltr_video.metrics.caption_metrics`: True adds METEOR or raises
    :class:`~examples.meltr_video.metrics.MeteorUnavailableError` (no Java / no pycocoevalcap), None adds
    it when possible and otherwise warns (:class:`~examples.meltr_video.metrics.MeteorUnavailableWarning`).
    """
    vids, _ = _videos(dataset)
    refs: dict[str, list[str]] = {}
    for r in dataset.records:
        refs.setdefault(r.video_id, []).append(r.caption)
    was = model.training
    model.eval()
    cands: list[str] = []
    try:
        for s in range(0, len(vids), batch_size):
            vb = _batch(dataset, vids[s : s + batch_size], tokenizer, max_len)
            ids = model.generate(vb["video"], vb["video_mask"], max_len=max_len)
            cands.extend(tokenizer.decode(row.tolist()) for row in ids)
    finally:
        model.train(was)
    ref_lists = [refs[dataset.records[i].video_id] for i in vids]
    return caption_metrics(cands, ref_lists, with_meteor=with_meteor), cands
