"""Pretrain a video-text backbone on the digit clips with the sum of its pretext losses.

    python -m examples.meltr_video.pretrain --config tiny --out runs/pretrain_tiny.pt [--epochs N --seed S]
    python -m examples.meltr_video.pretrain --backbone violet --out runs/pretrain_violet.pt

Backbones: ``univl`` (:class:`~examples.meltr_video.univl.UniVL`, 8 losses on the frame features) and
``violet`` (:class:`~examples.meltr_video.violet.Violet`, vtm + mlm + mvm on the raw frames; its mvm
codebook is first fitted by k-means on the pretraining split's patches).
The recipe (UniVL's): minimise ``sum_t L_t`` (all losses weighted 1) on the pretraining split with
Adam. Prints text-to-video retrieval on the val split (cross-encoder scores) before and after, and
writes the checkpoint atomically (``torch.load(path, weights_only=True)`` reads it back; see
:func:`load_pretrained`). An existing checkpoint made with the same settings (backbone included) and
the current digit vocabulary is reused (``--force`` retrains).
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bilevel.checkpoint import save_checkpoint  # atomic torch.save (re-exported: the pretrain CLI writes with it)

from .data import SPECIAL_TOKENS, Collate, Tokenizer, make_digit_clips
from .evaluate import retrieval_eval
from .testbed import make_testbed, testbed_tokenizer
from .univl import UniVL, UniVLConfig
from .violet import Violet, VioletCollate, VioletConfig, fit_codebook

__all__ = [
    "BACKBONES",
    "CODEBOOK_ITERS",
    "DIGITS_PRESETS",
    "PRESETS",
    "VIOLET_PRESETS",
    "ensure_pretrained",
    "load_pretrained",
    "main",
    "pretrain",
    "save_checkpoint",
]

BACKBONES = ("univl", "violet")
CODEBOOK_ITERS = 20  # Lloyd iterations of Violet's k-means codebook

# Named pretraining budgets (tiny config) on the testbed's source domain. "full" (= "quick"): the
# checkpoint the testbed is measured with (docs/testbed.md).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 12, "data": "testbed"},
    "full": {"epochs": 12, "data": "testbed"},
}
# The same for UniVL on the older digit clips (the QA tasks): "quick" ~2-3 minutes on one CPU thread;
# "full" ~9 minutes, val R@1 4.5 % of 200 clips.
DIGITS_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 6, "pretrain_size": 800, "val_size": 100, "lr": 2e-3, "data": "digits"},
    "full": {"epochs": 12, "data": "digits"},
}
# The same for backbone="violet" (tiny config). "quick": 375 steps on 2000 clips (more distinct clips
# than UniVL's quick, same order of steps): ~80 s on one CPU thread with the codebook, val R@1 2 % /
# MedR 26 of 100 clips; "full": 1500 steps, ~4.5 minutes, val R@1 3 % / MedR 33 of 200 clips.
VIOLET_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 3, "pretrain_size": 2000, "val_size": 100, "lr": 2e-3, "data": "digits"},
    "full": {"epochs": 12, "data": "digits"},
}
_PRESETS_OF = {("univl", "testbed"): PRESETS, ("univl", "digits"): DIGITS_PRESETS, ("violet", "digits"): VIOLET_PRESETS}
_PRIMARY_OF = {"univl": "alignment", "violet": "vtm"}


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:  # corrupt or unsafe file: name it
        raise ValueError(f"{path}: cannot read the pretrain checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a pretrain checkpoint (a {type(ck).__name__}, not a dict)")
    for k in ("model", "config", "vocab", "meta"):
        if k not in ck:
            raise ValueError(f"{path}: not a pretrain checkpoint (no {k!r} entry)")
    backbone = ck.get("backbone", "univl")  # checkpoints from before Violet have no "backbone" entry
    if backbone not in BACKBONES:
        raise ValueError(f"{path}: unknown backbone {backbone!r}; known: {list(BACKBONES)}")
    return ck


def load_pretrained(path: str | Path) -> tuple[UniVL | Violet, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, meta)`` from a checkpoint written by :func:`pretrain`.

    The model is a :class:`Violet` when the checkpoint's ``"backbone"`` entry says ``"violet"``, else a
    :class:`UniVL` (checkpoints without the entry are UniVL's).
    """
    ck = _read_checkpoint(path)
    tok = Tokenizer(ck["vocab"][len(SPECIAL_TOKENS) :])
    if tok.vocab != list(ck["vocab"]):
        raise ValueError(f"{path}: vocabulary does not start with the special tokens")
    model: UniVL | Violet
    if ck.get("backbone", "univl") == "violet":
        model = Violet(VioletConfig(**ck["config"]), tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    else:
        model = UniVL(UniVLConfig(**ck["config"]), tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    model.load_state_dict(ck["model"])
    return model, tok, ck["meta"]


def _reusable(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The stored meta if ``path`` was pretrained with ``settings`` and the current digit vocabulary, else None."""
    ck = _read_checkpoint(path)
    stored = dict(ck["meta"].get("settings") or {})
    stored.setdefault("backbone", ck.get("backbone", "univl"))
    if stored != settings:
        return None
    if list(ck["vocab"]) != _tokenizer(settings.get("data", "digits")).vocab:
        print(f"{path}: pretrained with another vocabulary than the {settings.get('data')} data's; retraining")
        return None
    return ck["meta"]


DATA = ("testbed", "digits")


def _tokenizer(data: str) -> Tokenizer:
    return testbed_tokenizer() if data == "testbed" else Tokenizer.for_digits()


def pretrain(
    config: str = "tiny",
    out: str | Path | None = None,
    epochs: int = 12,
    seed: int = 0,
    data_seed: int = 0,
    batch_size: int = 16,
    lr: float = 1e-3,
    max_steps: int | None = None,
    pretrain_size: int | None = None,
    val_size: int | None = None,
    force: bool = False,
    progress: bool = True,
    backbone: str = "univl",
    data: str | None = None,
) -> dict[str, Any]:
    """Train and (if ``out``) save; returns the checkpoint's ``meta`` (settings, losses, retrieval before/after).

    ``data``: ``"testbed"`` (the default for UniVL: the source domain of
    :func:`~examples.meltr_video.testbed.make_testbed`, splits ``pretrain`` / ``pretrain_val``, frozen
    CNN features) or ``"digits"`` (the older single-domain clips of
    :func:`~examples.meltr_video.data.make_digit_clips`, raw pixels; the default for Violet).

    ``backbone``: ``"univl"`` (8 losses on the frames as features) or ``"violet"`` (vtm + mlm + mvm on
    raw frames; its codebook is fitted by k-means on the pretraining split first, seeded by ``seed``).
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    data = data or ("digits" if backbone == "violet" else "testbed")
    if data not in DATA:
        raise ValueError(f"unknown data {data!r}; choose one of {list(DATA)}")
    if backbone == "violet" and data != "digits":
        raise ValueError("the Violet-style backbone reads raw frames: pretrain it with data='digits' (--data digits)")
    settings = dict(config=config, epochs=epochs, seed=seed, data_seed=data_seed, batch_size=batch_size, lr=lr)
    settings.update(max_steps=max_steps, pretrain_size=pretrain_size, val_size=val_size, backbone=backbone)
    if data != "digits":  # absent = the digit clips (checkpoints from before the testbed)
        settings["data"] = data
    if out is not None and Path(out).exists() and not force:
        meta = _reusable(Path(out), settings)
        if meta is not None:
            print(f"reusing {out} (same settings; --force to retrain)")
            return meta
    torch.manual_seed(seed)
    val_split = "pretrain_val" if data == "testbed" else "val"
    sizes: dict[str, int] = {"pretrain": 4000 if data == "testbed" else 2000, val_split: 200}
    if pretrain_size is not None:
        sizes["pretrain"] = pretrain_size
    if val_size is not None:
        sizes[val_split] = val_size
    max_words = 24 if data == "testbed" else 20
    t0 = time.perf_counter()
    splits = make_testbed(data_seed, sizes=sizes) if data == "testbed" else make_digit_clips(data_seed, sizes=sizes)
    tok = splits.tokenizer
    cfg: UniVLConfig | VioletConfig
    model: UniVL | Violet
    collate: Collate | VioletCollate
    codebook_s = None
    if backbone == "violet":
        cfg = VioletConfig.named(config, len(tok))
        ds = splits["pretrain"]
        t_cb = time.perf_counter()
        frames = ds.frames if ds.frames is not None else [r.features for r in ds.records]
        codebook = fit_codebook(frames, cfg.codebook_size, CODEBOOK_ITERS, seed, patch=cfg.patch)
        codebook_s = time.perf_counter() - t_cb
        print(f"fitted the {cfg.codebook_size}-word mvm codebook on {len(ds)} clips in {codebook_s:.1f} s")
        model = Violet(cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id, codebook=codebook)
        collate = VioletCollate(
            tok, max_words=min(20, cfg.max_text_len - 2), seed=seed, patch=cfg.patch, frame_size=cfg.frame_size
        )
    else:
        cfg = UniVLConfig.named(config, len(tok))
        model = UniVL(cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
        collate = Collate(tok, max_words=min(max_words, cfg.max_text_len - 2), seed=seed)
    primary = _PRIMARY_OF[backbone]
    loader = torch.utils.data.DataLoader(
        splits["pretrain"],
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(f"pretrain split ({len(splits['pretrain'])} clips) is smaller than one batch ({batch_size})")
    val = splits[val_split]
    before = retrieval_eval(model, val, tok, max_words=max_words)
    print(f"val retrieval before: {_fmt(before)} (chance R@1 = {100 / len(val):.2f})")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    history: list[dict[str, float]] = []
    step = 0
    t_train = time.perf_counter()
    bar = tqdm(total=total, desc=f"pretrain {backbone} {config}", disable=not progress)
    model.train()
    while step < total:
        for batch in loader:
            losses = model(batch)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite pretraining loss at step {step}: {losses}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            history.append({k: v.item() for k, v in losses.items()})
            step += 1
            bar.update(1)
            bar.set_postfix({"loss": f"{loss.item():.3f}", primary: f"{losses[primary].item():.3f}"})
            if step >= total:
                break
    bar.close()
    train_s = time.perf_counter() - t_train
    after = retrieval_eval(model, val, tok, max_words=max_words)
    print(f"val retrieval after:  {_fmt(after)}  ({step} steps, {train_s:.1f} s training)")
    meta = {
        "settings": settings,
        "steps": step,
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t0,
        "val_before": before,
        "val_after": after,
        "final_losses": history[-1],
    }
    if codebook_s is not None:
        meta["codebook_seconds"] = codebook_s
    if out is not None:
        ck = {"model": model.state_dict(), "config": cfg.to_dict(), "vocab": list(tok.vocab), "meta": meta}
        if backbone != "univl":  # absent = UniVL (keeps UniVL checkpoints as they were)
            ck["backbone"] = backbone
        save_checkpoint(ck, out)
        print(f"saved {out}")
    return meta


def ensure_pretrained(
    path: str | Path, preset: str = "quick", progress: bool = True, backbone: str = "univl", data: str | None = None
) -> Path:
    """Pretrain ``backbone`` on ``data`` with its preset (:data:`PRESETS` for UniVL on the testbed,
    :data:`DIGITS_PRESETS` on the digit clips, :data:`VIOLET_PRESETS` for Violet) into ``path`` unless a
    checkpoint with those settings and the data's vocabulary is there. ``data`` None: the testbed for
    UniVL, the digit clips for Violet."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {list(BACKBONES)}")
    data = data or ("digits" if backbone == "violet" else "testbed")
    if (backbone, data) not in _PRESETS_OF:
        raise ValueError(f"no pretraining preset for backbone {backbone!r} on data {data!r}")
    presets = _PRESETS_OF[(backbone, data)]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets)}")
    pretrain(out=path, progress=progress, backbone=backbone, **presets[preset])
    return Path(path)


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" if k.startswith("R@") else f"{k}={v:.1f}" for k, v in m.items())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backbone", choices=list(BACKBONES), default="univl", help="univl (features) or violet (pixels)")
    p.add_argument("--config", choices=["tiny", "base"], default="tiny", help="violet: tiny only")
    p.add_argument("--data", choices=list(DATA), default=None, help="testbed (UniVL default) or digits (Violet)")
    p.add_argument("--out", type=Path, default=Path("runs/pretrain_tiny.pt"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--pretrain-size", type=int, default=None, help="clips in the pretraining split (2000)")
    p.add_argument("--val-size", type=int, default=None, help="clips in the val split (200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--force", action="store_true", help="retrain even if --out exists with the same settings")
    a = p.parse_args(argv)
    if a.epochs < 1:
        p.error("--epochs must be >= 1")
    torch.set_num_threads(a.threads)
    return pretrain(
        a.config,
        a.out,
        a.epochs,
        a.seed,
        a.data_seed,
        a.batch_size,
        a.lr,
        a.max_steps,
        a.pretrain_size,
        a.val_size,
        a.force,
        backbone=a.backbone,
        data=a.data or ("digits" if a.backbone == "violet" else "testbed"),
    )


if __name__ == "__main__":
    main()
