"""Single task, MTL and MELTR fine-tuning of :class:`~examples.meltr_sentiment.multitask.MultiTaskSentiment`
through :class:`bilevel.BilevelTrainer` (as ``examples/meltr_video/finetune.py`` does for video).

Methods (same model, optimizer, initialisation and data order for a given seed)::

    single:  theta <- Adam(theta, grad_theta L_sentiment)                         (no hyper step)
    mtl:     theta <- Adam(theta, grad_theta sum_t L_t)      (8 losses, unweighted; no hyper step)
    meltr:   theta <- Adam(theta, grad_theta g),  g = MELTR_phi(L_1..L_8)        on training batches
             phi   <- Adam(phi, hypergradient of f = L_sentiment + gamma |sum_t L_t - g|)
                                                             on meta batches, every K-th inner step

MELTR is the module of :mod:`examples.meltr_video.meltr`, sized down for 8 scalar losses (h1 = d = 32,
ff = 64, 4 heads, as in ``examples/meltr_image``). Every MELTR run starts from the same module pre-fitted
to ``L_aux = sum_t L_t`` (:func:`prefit_meltr_state`), so that it starts from the MTL objective, with
``d L_aux / d L_t ~ 1``, instead of PyTorch's random combination (slopes ~1e-2 of random sign).
(:func:`examples.meltr_image.train.fit_meltr_to_sum`'s 300 steps on ``[0, 3]^T`` leave slopes of 0.4 to
0.8 near the loss values seen here for ``T = 8``, hence the longer fit on points scaled towards 0.)
Solvers (:func:`~examples.meltr_image.train.solver_from_name`, the ``examples/meltr_image`` defaults):
AID-FP-Lite with ``H^-1 ~ I``; AID-CG with 3 CG steps (the video example's count). ``gamma = 0.1``,
``K = 3``, MELTR's Adam lr 1e-3 and weight decay 3e-5, hypergradient clipping 50: the paper's / the
official code's values.

Splits (:func:`sentiment_splits`): the file's ``train`` split is cut into ``train`` (fine-tuning) and
``meta`` (MELTR's outer batches only; ``meta_size`` segments, a fixed permutation of ``split_seed``,
disjoint from ``train``); ``valid`` chooses the epoch (lowest val MAE, the model of that epoch kept);
``test`` is read once per run, for that epoch. ``train_on_meta`` lets a baseline train on the meta
segments too (the labelled budget MELTR sees).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import bilevel as bl
from examples.meltr_image.train import solver_from_name
from examples.meltr_video.meltr import MELTR, MELTRObjectives, loss_gradient

from .data import MOSIDataset, MOSISplits, collate_mosi, load_mosi
from .metrics import SentimentMetricWarning, sentiment_metrics
from .multitask import LOSS_NAMES, PRIMARY, MaskingCollate, MultiTaskSentiment
from .synthetic import make_latent_mosi

__all__ = [
    "METHODS",
    "SOLVERS",
    "SentimentConfig",
    "evaluate",
    "latent_splits",
    "prefit_meltr_state",
    "sentiment_splits",
    "train_method",
]

METHODS = ("single", "mtl", "meltr")
SOLVERS = ("aid-fp-lite", "aid-cg")


@dataclass
class SentimentConfig:
    """One run's settings.

    Attributes:
        method: ``"single"``, ``"mtl"`` or ``"meltr"``.
        solver: MELTR's hypergradient solver, ``"aid-fp-lite"`` or ``"aid-cg"`` (ignored by the baselines).
        seed: model initialisation, data order and feature masks.
        lr: Adam learning rate of the model.
        epochs: epochs run; the one with the lowest val MAE is tested.
        batch_size: segments per training and meta batch.
        train_on_meta: a baseline also trains on the meta split.
        hidden, heads, ff, loss, mask_rate: the model (:class:`MultiTaskSentiment`) and its masking.
        K, gamma, meta_lr, meta_weight_decay, meta_clip: MELTR's hyper step (see the module docstring).
        meltr_hidden, meltr_d, meltr_ff, meltr_heads: MELTR's sizes.
        meltr_prefit_steps: Adam steps of :func:`prefit_meltr_state` (fewer in tests).
    """

    method: str = "meltr"
    solver: str = "aid-fp-lite"
    seed: int = 0
    lr: float = 3e-3
    epochs: int = 30
    batch_size: int = 32
    train_on_meta: bool = False
    hidden: int = 32
    heads: int = 4
    ff: int = 64
    loss: str = "l1"
    mask_rate: float = 0.25
    K: int = 3
    gamma: float = 0.1
    meta_lr: float = 1e-3
    meta_weight_decay: float = 3e-5
    meta_clip: float = 50.0
    meltr_hidden: int = 32
    meltr_d: int = 32
    meltr_ff: int = 64
    meltr_heads: int = 4
    meltr_prefit_steps: int = 800

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.train_on_meta and self.method == "meltr":
            raise ValueError("train_on_meta is for the baselines; MELTR uses the meta split for its outer objective")
        ints = ("seed", "epochs", "batch_size", "hidden", "heads", "ff", "K", "meltr_hidden", "meltr_d", "meltr_ff")
        for name in (*ints, "meltr_heads", "meltr_prefit_steps"):
            v = getattr(self, name)
            low = 0 if name in ("seed", "meltr_prefit_steps") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("lr", "meta_lr", "meta_clip"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("gamma", "meta_weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.mask_rate, int | float) and 0 < self.mask_rate <= 1):
            raise ValueError(f"mask_rate must be in (0, 1], got {self.mask_rate!r}")
        if self.loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {self.loss!r}")

    @property
    def name(self) -> str:
        """``single``, ``mtl``, ``mtl+meta``, ``meltr-aid-fp-lite`` ..."""
        if self.method == "meltr":
            return f"meltr-{self.solver}"
        return self.method + ("+meta" if self.train_on_meta else "")


_PREFIT: dict[tuple[int, ...], dict[str, Tensor]] = {}


def prefit_meltr_state(
    hidden: int = 32, d_model: int = 32, ff: int = 64, nhead: int = 4, steps: int = 800
) -> dict[str, Tensor]:
    """The state of a :class:`MELTR` over :data:`LOSS_NAMES` fitted to ``L_aux = sum_t L_t`` (cached per process).

    Initialised from ``torch.manual_seed(0)`` (the global generator is restored afterwards), then ``steps``
    Adam steps (lr 3e-3, cosine decay) on the mean squared error over 256 loss vectors per step,
    ``L = 5 * U^T * U'`` (``U ~ Uniform(0, 1)^T``, ``U'`` one uniform scale per vector, so that small losses
    near 0 are covered as well as the loss values of an untrained model); a fixed generator draws them.
    """
    key = (hidden, d_model, ff, nhead, steps)
    if key not in _PREFIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            meltr = MELTR(LOSS_NAMES, hidden=hidden, d_model=d_model, ff=ff, nhead=nhead)
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(meltr.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            lv = 5.0 * torch.rand(256, len(LOSS_NAMES), generator=gen) * torch.rand(256, 1, generator=gen)
            loss = (meltr(lv) - lv.sum(-1)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        _PREFIT[key] = {k: v.detach().clone() for k, v in meltr.state_dict().items()}
    return {k: v.clone() for k, v in _PREFIT[key].items()}


def _subset(ds: MOSIDataset, idx: np.ndarray, name: str) -> MOSIDataset:
    t = torch.as_tensor(idx, dtype=torch.long)
    return MOSIDataset(ds.text[t], ds.vision[t], ds.audio[t], ds.labels[t], [ds.ids[i] for i in idx], name=name)


def sentiment_splits(splits: MOSISplits, meta_size: int = 48, split_seed: int = 0) -> dict[str, MOSIDataset]:
    """``{"train", "meta", "val", "test"}``: the file's ``train`` split permuted with ``split_seed`` and cut
    into ``meta`` (the first ``meta_size``) and ``train`` (the rest); ``val`` = ``valid``; ``test`` = ``test``."""
    n = len(splits.train)
    if isinstance(meta_size, bool) or not isinstance(meta_size, int) or not 1 <= meta_size <= n - 1:
        raise ValueError(f"meta_size must be an int in [1, {n - 1}] (the train split has {n}), got {meta_size!r}")
    perm = np.random.default_rng(split_seed).permutation(n)
    return {
        "train": _subset(splits.train, np.sort(perm[meta_size:]), "train"),
        "meta": _subset(splits.train, np.sort(perm[:meta_size]), "meta"),
        "val": splits.valid,
        "test": splits.test,
    }


def latent_splits(data_seed: int = 0, meta_size: int = 48, **kw: Any) -> dict[str, MOSIDataset]:
    """:func:`sentiment_splits` of the latent-factor file :func:`~examples.meltr_sentiment.synthetic.make_latent_mosi`
    ``(data_seed, **kw)``, written to a temporary directory and read back with :func:`load_mosi` (whose
    warning about the replaced ``-inf`` audio values is silenced; the count is in the file's design)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = make_latent_mosi(Path(tmp) / "latent_mosi.pkl", data_seed, **kw)
        log = logging.getLogger("examples.meltr_sentiment.data")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            splits = load_mosi(path)
        finally:
            log.setLevel(level)
    return sentiment_splits(splits, meta_size, split_seed=data_seed)


@torch.no_grad()
def evaluate(model: MultiTaskSentiment, ds: MOSIDataset, batch_size: int = 256) -> dict[str, float]:
    """:func:`~examples.meltr_sentiment.metrics.sentiment_metrics` of ``model.predict`` on ``ds`` (eval mode)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_mosi)
    was = model.training
    model.eval()
    preds = torch.cat([model.predict(b) for b in loader]).double().numpy()
    model.train(was)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SentimentMetricWarning)  # an untrained model may predict a constant
        return sentiment_metrics(preds, ds.labels.double().numpy())


def _loader(ds: MOSIDataset | torch.utils.data.Dataset, cfg: SentimentConfig, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled batches with their own generators (order: ``seed``; feature masks: ``seed + 1``)."""
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        collate_fn=MaskingCollate(torch.Generator().manual_seed(seed + 1), cfg.mask_rate),
        generator=torch.Generator().manual_seed(seed),
    )


class _Losses(bl.Callback):
    """Mean inner objective per epoch."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, trainer: bl.BilevelTrainer, metrics: dict[str, Any]) -> None:
        self.values.append(float(metrics["inner_loss"]))


def train_method(
    cfg: SentimentConfig,
    data: Mapping[str, MOSIDataset],
    *,
    eval_test: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on ``data`` (from :func:`sentiment_splits`), choose the epoch on val, test it once.

    Returns ``{"config", "name", "history" (per epoch: the mean inner objective ``inner_loss``, the val
    metrics, MELTR's d L_aux / d L_t at a fixed training batch), "best_epoch", "best_val", "test" (None without
    ``eval_test``), "seconds" and "cpu_seconds" (wall-clock and process CPU time of the training, without
    evaluation), "steps", "hyper_steps"}``. ``max_steps`` stops training early (tests).
    """
    missing = [s for s in ("train", "meta", "val", "test") if s not in data]
    if missing:
        raise ValueError(f"data is missing split(s) {missing}; use sentiment_splits")
    torch.manual_seed(cfg.seed)
    longest = max(getattr(data[s], m).shape[1] for s in data for m in ("text", "vision", "audio"))
    model = MultiTaskSentiment.for_dims(
        data["train"].dims, hidden=cfg.hidden, heads=cfg.heads, ff=cfg.ff, max_len=max(64, longest), loss=cfg.loss
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_ds: torch.utils.data.Dataset = data["train"]
    if cfg.train_on_meta:
        train_ds = torch.utils.data.ConcatDataset([data["train"], data["meta"]])
    loader = _loader(train_ds, cfg, cfg.seed)
    obj: MELTRObjectives | None = None
    meltr: MELTR | None = None
    meta_loader = None
    if cfg.method == "single":
        trainer = bl.BilevelTrainer(model, opt, bl.single_task_objective(_single(model)))
    elif cfg.method == "mtl":
        _, fn = bl.functional_module(model)
        trainer = bl.BilevelTrainer(model, opt, bl.mtl_objective(lambda p, b: torch.stack(list(fn(p, b).values()))))
    else:
        meltr = MELTR(LOSS_NAMES, hidden=cfg.meltr_hidden, d_model=cfg.meltr_d, ff=cfg.meltr_ff, nhead=cfg.meltr_heads)
        sizes = (cfg.meltr_hidden, cfg.meltr_d, cfg.meltr_ff, cfg.meltr_heads)
        meltr.load_state_dict(prefit_meltr_state(*sizes, steps=cfg.meltr_prefit_steps))
        obj = MELTRObjectives(model, meltr, PRIMARY, cfg.gamma)
        meta_loader = _loader(data["meta"], cfg, cfg.seed + 10_000)
        meta_opt = torch.optim.Adam(meltr.parameters(), lr=cfg.meta_lr, weight_decay=cfg.meta_weight_decay)
        trainer = bl.BilevelTrainer(
            model,
            opt,
            obj.inner,
            outer=obj.outer,
            meta_model=meltr,
            meta_optimizer=meta_opt,
            solver=solver_from_name(cfg.solver, **({"iters": 3} if cfg.solver == "aid-cg" else {})),
            config=bl.TrainerConfig(hyper_every=cfg.K, meta_clip_grad_norm=cfg.meta_clip),
        )
    losses = _Losses()
    trainer.callbacks.append(losses)
    probe = MaskingCollate(torch.Generator().manual_seed(4321), cfg.mask_rate)(
        [data["train"][i] for i in range(min(32, len(data["train"])))]
    )
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    seconds = cpu = 0.0
    for epoch in range(1, cfg.epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.values.clear()
        trainer.fit(loader, meta_loader, epochs=epoch, max_steps=max_steps, progress=False)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        val = evaluate(model, data["val"])
        rec: dict[str, Any] = {
            "epoch": epoch,
            "inner_loss": float(np.mean(losses.values)) if losses.values else None,
            "val": val,
        }
        if meltr is not None and obj is not None:
            with torch.no_grad():
                lv = obj.losses(obj.params, probe)
            rec["meltr_weights"] = dict(zip(LOSS_NAMES, loss_gradient(meltr, lv).tolist(), strict=True))
        history.append(rec)
        if best is None or val["mae"] < best[0]:
            best = (val["mae"], epoch, copy.deepcopy(model.state_dict()))
        if max_steps is not None and trainer.step_count >= max_steps:
            break
    assert best is not None
    test = None
    if eval_test:
        model.load_state_dict(best[2])
        test = evaluate(model, data["test"])
    return {
        "config": asdict(cfg),
        "name": cfg.name,
        "history": history,
        "best_epoch": best[1],
        "best_val": history[best[1] - 1]["val"],
        "test": test,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "steps": trainer.step_count,
        "hyper_steps": trainer.hyper_steps,
    }


def _single(model: MultiTaskSentiment) -> Any:
    _, fn = bl.functional_module(model)
    return lambda p, b: fn(p, b, losses=(PRIMARY,))[PRIMARY]
