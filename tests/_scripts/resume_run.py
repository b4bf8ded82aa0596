"""Train a small bilevel model with checkpoints every step; used by tests/core/test_checkpoint.py.

    python tests/_scripts/resume_run.py CKPT OUT MAX_STEPS [SLEEP]

Resumes from CKPT when it exists. Prints "step N" after every step; writes the final parameters to OUT.
Everything that can make a resumed run differ is exercised: shuffling DataLoaders (inner and meta),
dropout (torch RNG), numpy and Python RNG use, Adam and LR schedulers on both levels, StocBiO's batch stream.
"""

from __future__ import annotations

import random
import sys
import time

import numpy as np
import torch
from torch import nn

import bilevel as bl
from bilevel.checkpoint import save_checkpoint
from bilevel.training import BilevelTrainer, Callback, TrainerConfig


class Noisy(torch.utils.data.Dataset):
    """Adds numpy- and Python-RNG noise in __getitem__ (data augmentation)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g, dtype=torch.float64)
        self.y = self.x.sum(1).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 1e-3 * float(np.random.randn()) + 1e-3 * random.random(), self.y[i]


class Progress(Callback):
    def __init__(self, sleep: float):
        self.sleep = sleep

    def on_step_end(self, trainer, metrics):
        print(f"step {metrics['step']}", flush=True)
        time.sleep(self.sleep)


def build(sleep: float = 0.0) -> tuple[BilevelTrainer, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2)).double()
    meta = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    _, fn = bl.functional_module(model)
    _, meta_fn = bl.functional_module(meta)

    def losses(p, batch):
        x, y = batch
        out = fn(p, x)
        return torch.stack([((out[:, 0] - y) ** 2).mean(), (out[:, 1] ** 2).mean()])

    def g(p, h, b):
        L = losses(p, b)
        return L[0] + nn.functional.softplus(meta_fn(h, L[None])).sum() * L[1]

    def f(p, h, b):
        return losses(p, b)[0]

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mopt = torch.optim.Adam(meta.parameters(), lr=1e-2)
    trainer = BilevelTrainer(
        model,
        opt,
        g,
        outer=f,
        meta_model=meta,
        meta_optimizer=mopt,
        solver=bl.get_solver("stocbio", iters=3, alpha=0.1),
        scheduler=torch.optim.lr_scheduler.StepLR(opt, 5, 0.9),
        meta_scheduler=torch.optim.lr_scheduler.StepLR(mopt, 3, 0.5),
        config=TrainerConfig(hyper_every=2),
        callbacks=[Progress(sleep)],
    )
    inner = torch.utils.data.DataLoader(Noisy(56, 1), batch_size=8, shuffle=True)  # 7 batches per epoch
    outer = torch.utils.data.DataLoader(Noisy(24, 2), batch_size=8, shuffle=True)
    return trainer, inner, outer


def main() -> None:
    ckpt, out, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    trainer, inner, outer = build(sleep)
    trainer.fit(
        inner, outer, epochs=100, max_steps=max_steps, checkpoint_path=ckpt, checkpoint_every=1, resume=True,
        progress=False,
    )  # fmt: skip
    save_checkpoint({"model": trainer.model.state_dict(), "meta": trainer.meta_model.state_dict()}, out)


if __name__ == "__main__":
    main()
