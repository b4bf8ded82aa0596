"""Where a fine-tuning run's data come from: the pretrained backbone's file, the splits (the testbed or
the digit clips; train + meta merged for ``train_on_meta``), the QA questions on them, the collate
functions and the loaders with their own random generators."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import FinetuneConfig
from .data import Collate, DigitSplits, Tokenizer, VideoTextDataset, make_digit_clips
from .meltr import RecentTrainBatches
from .qa import QACollate, make_qa
from .testbed import make_testbed
from .violet import VioletCollate

__all__ = [
    "GENERATORS",
    "collate_for",
    "data_generators",
    "example_sets",
    "fine_tuning_data",
    "make_loaders",
    "read_pretrained",
]

#: every source of randomness in the data has its own generator (see :func:`data_generators`)
GENERATORS = ("train_order", "train_masks", "meta_order", "meta_masks", "hvp_order", "hvp_masks")


def read_pretrained(cfg: FinetuneConfig) -> tuple[Mapping[str, Tensor], Any, Tokenizer]:
    """``(backbone state dict, backbone config, tokenizer)`` of ``cfg.pretrained``, with the command that
    makes the file when it is missing."""
    from .pretrain import load_pretrained

    if not Path(cfg.pretrained).exists():  # type: ignore[arg-type]
        raise FileNotFoundError(
            f"pretrained backbone {cfg.pretrained} not found: run "
            f"`python -m examples.meltr_video.pretrain --backbone {cfg.backbone} --data {cfg.data} "
            f"--out {cfg.pretrained}` first"
        )
    model, tok, _ = load_pretrained(cfg.pretrained)  # type: ignore[arg-type]
    return model.state_dict(), model.cfg, tok


def fine_tuning_data(cfg: FinetuneConfig, tok: Tokenizer, data: DigitSplits | None = None) -> DigitSplits:
    """The run's splits: ``data`` or the ones ``cfg`` names, checked against the backbone's vocabulary;
    with ``cfg.train_on_meta`` the ``train`` split is train + meta (a baseline sees every labelled pair)."""
    if data is None:
        make = make_testbed if cfg.data == "testbed" else make_digit_clips
        data = make(cfg.data_seed, sizes=cfg.sizes)
    if data.tokenizer.vocab != tok.vocab:
        raise ValueError(
            f"the pretrained backbone {cfg.pretrained} has another vocabulary than the {cfg.data!r} data; pretrain "
            f"it on that data (python -m examples.meltr_video.pretrain --data {cfg.data})"
        )
    needed = ("train", "val", "test") + (("meta",) if cfg.method == "meltr" or cfg.train_on_meta else ())
    for split in needed:
        if split not in data.splits:
            raise KeyError(f"the data has no {split!r} split (has {list(data.splits)})")
    if not cfg.train_on_meta:
        return data
    tr, me = data["train"], data["meta"]
    frames = np.concatenate([tr.frames, me.frames]) if tr.frames is not None and me.frames is not None else None
    merged = VideoTextDataset(tr.records + me.records, frames=frames)
    return DigitSplits({**data.splits, "train": merged}, data.tokenizer)


def example_sets(cfg: FinetuneConfig, data: DigitSplits) -> dict[str, Any]:
    """What the loaders and the evaluation read per split: the clips, or questions on them (QA tasks)."""
    kind = cfg.qa_kind
    return {name: make_qa(ds, kind, seed=cfg.data_seed) if kind else ds for name, ds in data.splits.items()}


def collate_for(cfg: FinetuneConfig, tok: Tokenizer, seed: int = 0) -> Any:
    """The training collate of ``cfg``'s backbone and task (masks seeded with ``seed``; ``.gen`` swappable)."""
    if cfg.backbone == "violet":
        base: Any = VioletCollate(tok, max_words=cfg.max_words, seed=seed)
    else:
        base = Collate(tok, max_words=cfg.max_words, seed=seed)
    if cfg.qa_kind:
        return QACollate(tok, cfg.qa_kind, max_words=cfg.max_words, seed=seed, base=base)
    return base


def data_generators(seed: int) -> dict[str, torch.Generator]:
    """One generator per source of randomness in the data (:data:`GENERATORS`), seeded from ``seed``, so
    that all methods see the same training batches in the same order (hyper steps draw from their own
    generators) and a resumed run continues the generators saved at the end of its last epoch."""
    return {k: torch.Generator().manual_seed(seed * 1000 + i) for i, k in enumerate(GENERATORS)}


def make_loaders(
    cfg: FinetuneConfig, sets: Mapping[str, Any], collate: Callable[[], Any], gens: Mapping[str, torch.Generator]
) -> tuple[Any, Any, Any]:
    """``(train, meta, hvp)`` loaders: the shuffled training batches; MELTR's meta batches (the meta split,
    or with ``meta_batch="last10"`` a random one of the last 10 training batches); StocBiO's fresh HVP
    batches (a second, independently shuffled pass over train). The last two are None where unused."""

    def loader(split: str, order: str, masks: str) -> torch.utils.data.DataLoader:
        c = collate()
        c.gen = gens[masks]
        return torch.utils.data.DataLoader(
            sets[split], batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=c, generator=gens[order]
        )

    train: Any = loader("train", "train_order", "train_masks")
    meta: Any = None
    hvp: Any = None
    if cfg.method == "meltr":
        if cfg.meta_batch == "heldout":
            meta = loader("meta", "meta_order", "meta_masks")
        else:
            recent = RecentTrainBatches(gens["meta_order"], 10)
            train, meta = recent.watch(train), recent
        if cfg.solver == "stocbio":
            hvp = loader("train", "hvp_order", "hvp_masks")
    return train, meta, hvp
