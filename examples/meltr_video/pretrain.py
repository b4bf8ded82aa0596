"""Pretrain the UniVL-style backbone on the digit clips with the sum of the 8 pretext losses.

    python -m examples.meltr_video.pretrain --config tiny --out runs/pretrain_tiny.pt [--epochs N --seed S]

UniVL's recipe: minimise ``sum_t L_t`` (all losses weighted 1) on the pretraining split with Adam.
Prints text-to-video retrieval on the val split (cross-encoder scores) before and after, and writes
the checkpoint atomically (``torch.load(path, weights_only=True)`` reads it back; see
:func:`load_pretrained`). An existing checkpoint made with the same settings is reused (``--force``
retrains).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import SPECIAL_TOKENS, Collate, Tokenizer, make_digit_clips
from .evaluate import retrieval_eval
from .univl import UniVL, UniVLConfig

__all__ = ["PRESETS", "ensure_pretrained", "load_pretrained", "main", "pretrain", "save_checkpoint"]

# Named pretraining budgets (tiny config). "quick": ~2-3 minutes on one CPU thread, the default of
# the efficiency benchmark; "full": the longer run (~9 minutes; val R@1 4.5 % of 200 clips).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"epochs": 6, "pretrain_size": 800, "val_size": 100, "lr": 2e-3},
    "full": {"epochs": 12},
}


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pretrained(path: str | Path) -> tuple[UniVL, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, meta)`` from a checkpoint written by :func:`pretrain`."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("model", "config", "vocab", "meta"):
        if k not in ck:
            raise ValueError(f"{path}: not a pretrain checkpoint (no {k!r} entry)")
    tok = Tokenizer(ck["vocab"][len(SPECIAL_TOKENS) :])
    if tok.vocab != list(ck["vocab"]):
        raise ValueError(f"{path}: vocabulary does not start with the special tokens")
    model = UniVL(UniVLConfig(**ck["config"]), tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    model.load_state_dict(ck["model"])
    return model, tok, ck["meta"]


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
) -> dict[str, Any]:
    """Train and (if ``out``) save; returns the checkpoint's ``meta`` (settings, losses, retrieval before/after)."""
    settings = dict(config=config, epochs=epochs, seed=seed, data_seed=data_seed, batch_size=batch_size, lr=lr)
    settings.update(max_steps=max_steps, pretrain_size=pretrain_size, val_size=val_size)
    if out is not None and Path(out).exists() and not force:
        _, _, meta = load_pretrained(out)
        if meta.get("settings") == settings:
            print(f"reusing {out} (same settings; --force to retrain)")
            return meta
    torch.manual_seed(seed)
    sizes: dict[str, int] = {"pretrain": 2000, "val": 200}
    if pretrain_size is not None:
        sizes["pretrain"] = pretrain_size
    if val_size is not None:
        sizes["val"] = val_size
    t0 = time.perf_counter()
    data = make_digit_clips(data_seed, sizes=sizes)
    tok = data.tokenizer
    cfg = UniVLConfig.named(config, len(tok))
    model = UniVL(cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    collate = Collate(tok, max_words=min(20, cfg.max_text_len - 2), seed=seed)
    loader = torch.utils.data.DataLoader(
        data["pretrain"],
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    if len(loader) == 0:
        raise ValueError(f"pretrain split ({len(data['pretrain'])} clips) is smaller than one batch ({batch_size})")
    before = retrieval_eval(model, data["val"], tok)
    print(f"val retrieval before: {_fmt(before)} (chance R@1 = {100 / len(data['val']):.2f})")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    history: list[dict[str, float]] = []
    step = 0
    t_train = time.perf_counter()
    bar = tqdm(total=total, desc=f"pretrain {config}", disable=not progress)
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
            bar.set_postfix(loss=f"{loss.item():.3f}", align=f"{losses['alignment'].item():.3f}")
            if step >= total:
                break
    bar.close()
    train_s = time.perf_counter() - t_train
    after = retrieval_eval(model, data["val"], tok)
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
    if out is not None:
        ck = {"model": model.state_dict(), "config": cfg.to_dict(), "vocab": list(tok.vocab), "meta": meta}
        save_checkpoint(ck, out)
        print(f"saved {out}")
    return meta


def ensure_pretrained(path: str | Path, preset: str = "quick", progress: bool = True) -> Path:
    """Pretrain with :data:`PRESETS` ``[preset]`` into ``path`` unless a checkpoint with those settings is there."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    pretrain(out=path, progress=progress, **PRESETS[preset])
    return Path(path)


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" if k.startswith("R@") else f"{k}={v:.1f}" for k, v in m.items())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["tiny", "base"], default="tiny")
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
    )


if __name__ == "__main__":
    main()
