"""Data hyper-cleaning (Franceschi et al. 2017; the benchmark of Grazzi et al. 2020 and StocBiO) on
scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits, 64 pixel features in 0..16).

A share ``rho`` of the training labels is replaced by a uniformly random *wrong* label. Every
training example ``i`` gets a weight ``w_i = sigmoid(lam_i)``; the outer variable ``phi = lam``
(shape ``[n_train]``), the inner variable ``theta = (W [10, 64], b [10])`` of a linear classifier::

    g(theta, lam) = 1/n sum_i sigmoid(lam_i) CE(W x_i + b, y~_i) + reg/2 (||W||^2 + ||b||^2)   train, noisy labels
    f(theta)      = 1/m sum_j CE(W x_j + b, y_j)                                             clean validation split

``g`` is strongly convex in ``theta`` (``mu >= reg``) for every ``lam``, so ``theta*(lam)`` is unique
and the implicit-function hypergradient exists. An example is *flagged as corrupted* when its
weight is below 0.5 (``lam_i < 0``); F1 is computed against the true corruption mask.

The outer loop is :class:`bilevel.BilevelTrainer` with ``TrainerConfig(inner_steps=T, hyper_every=1)``:
each step runs ``T`` warm-started full-batch gradient steps on ``g`` (``torch.optim.SGD``), then one
hypergradient step on ``lam`` (Adam). The training batch is the whole (small) training set, so the
inner problem is deterministic and a warm-started iterate stays close to ``theta*(lam)``, as the
AID solvers assume; StocBiO draws its Hessian-vector products from random mini-batches of it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bilevel as bl

__all__ = [
    "CleaningData",
    "CleaningResult",
    "MiniBatches",
    "f1_corrupted",
    "fit_baseline",
    "inner_objective",
    "load_cleaning_data",
    "make_solver",
    "outer_objective",
    "run_cleaning",
    "smoothness",
]

SOLVER_NAMES: tuple[str, ...] = ("itd", "aid-cg", "aid-fp", "aid-fp-lite", "stocbio")


@dataclass
class CleaningData:
    """Splits of ``load_digits`` as float tensors. Batches are dicts ``{"x": [n, 64], "y": [n], "idx": [n]}``
    (``idx``: positions in the training split, used to pick the example weights).

    Attributes:
        train, val, test: the batches (train with the corrupted labels).
        clean_y: the true training labels ``[n_train]``; corrupted: bool mask ``[n_train]``.
    """

    train: dict[str, Tensor]
    val: dict[str, Tensor]
    test: dict[str, Tensor]
    clean_y: Tensor
    corrupted: Tensor

    @property
    def n_train(self) -> int:
        return int(self.train["y"].numel())


def _batch(x: np.ndarray, y: np.ndarray, dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        "x": torch.as_tensor(x, dtype=dtype),
        "y": torch.as_tensor(y, dtype=torch.long),
        "idx": torch.arange(len(y)),
    }


def load_cleaning_data(
    n_train: int = 800,
    n_val: int = 400,
    corruption: float = 0.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> CleaningData:
    """Shuffle ``load_digits`` with ``seed``; take ``n_train`` training, ``n_val`` validation and the
    rest as test examples; replace the labels of ``round(corruption * n_train)`` random training
    examples by a uniformly random *different* label. Features are pixel values / 16 (in [0, 1]).

    Raises:
        ValueError: splits larger than the 1797 images, or ``corruption`` outside [0, 1).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if n_train < 10 or n_val < 10 or n_train + n_val > len(y) - 10:
        raise ValueError(f"n_train={n_train}, n_val={n_val}: need >= 10 each and >= 10 test images of {len(y)}")
    if not 0.0 <= corruption < 1.0:
        raise ValueError(f"corruption must be in [0, 1), got {corruption!r}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    x, y = x[perm] / 16.0, y[perm]
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    clean = y[tr].copy()
    noisy = clean.copy()
    bad = rng.choice(n_train, size=round(corruption * n_train), replace=False)
    noisy[bad] = (clean[bad] + rng.integers(1, 10, size=bad.size)) % 10  # a uniformly random wrong label
    mask = np.zeros(n_train, dtype=bool)
    mask[bad] = True
    return CleaningData(
        train=_batch(x[tr], noisy, dtype),
        val=_batch(x[va], y[va], dtype),
        test=_batch(x[te], y[te], dtype),
        clean_y=torch.as_tensor(clean, dtype=torch.long),
        corrupted=torch.as_tensor(mask),
    )


def _logits(params: dict[str, Tensor], x: Tensor) -> Tensor:
    return x @ params["weight"].T + params["bias"]


def inner_objective(reg: float):
    """``g(params, hparams, batch)``: the weighted training cross-entropy plus ``reg/2 ||theta||^2``
    (``params``: ``weight [10, 64]``, ``bias [10]``; ``hparams``: ``lam [n_train]``)."""

    def g(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        ce = F.cross_entropy(_logits(params, batch["x"]), batch["y"], reduction="none")
        w = torch.sigmoid(hparams["lam"][batch["idx"]])
        l2 = params["weight"].pow(2).sum() + params["bias"].pow(2).sum()
        return (w * ce).mean() + 0.5 * reg * l2

    return g


def outer_objective(params: dict[str, Tensor], hparams: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """``f``: mean cross-entropy on the (clean) validation batch; independent of ``lam``."""
    return F.cross_entropy(_logits(params, batch["x"]), batch["y"])


def smoothness(data: CleaningData, reg: float) -> float:
    """An upper bound of the inner Hessian's largest eigenvalue over all ``theta`` and ``lam``:
    the softmax CE Hessian is at most ``1/2 (x x^T kron I)`` per example with weights <= 1, so
    ``L <= 1/2 lambda_max(X1^T X1 / n) + reg`` (``X1``: features with a column of ones)."""
    x = data.train["x"].double()
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return 0.5 * float(torch.linalg.eigvalsh(x1.T @ x1 / len(x1))[-1]) + reg


def f1_corrupted(weights: Tensor, corrupted: Tensor, threshold: float = 0.5) -> float:
    """F1 of flagging ``weights < threshold`` as corrupted against the true mask (0 when nothing is flagged)."""
    flagged = weights < threshold
    tp = int((flagged & corrupted).sum())
    fp = int((flagged & ~corrupted).sum())
    fn = int((~flagged & corrupted).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@torch.no_grad()
def accuracy(model: nn.Linear, batch: dict[str, Tensor]) -> float:
    return float((model(batch["x"]).argmax(-1) == batch["y"]).float().mean())


class MiniBatches:
    """An endless, seeded stream of random mini-batches (``size`` rows without replacement) of ``batch``,
    for StocBiO's Hessian-vector products."""

    def __init__(self, batch: dict[str, Tensor], size: int, seed: int = 0):
        n = int(batch["y"].numel())
        if not 0 < size <= n:
            raise ValueError(f"mini-batch size must be in [1, {n}], got {size}")
        self.batch, self.size = batch, size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            rows = torch.randperm(int(self.batch["y"].numel()), generator=self.gen)[: self.size]
            yield {k: v[rows] for k, v in self.batch.items()}


def make_solver(name: str, lr: float, *, iters: int = 20, T: int = 10, stoc_batches: Any = None) -> bl.Solver:
    """The solvers with options tied to the inner step size ``lr = 1/L``: ITD unrolls ``T`` SGD steps
    with ``lr``; AID-FP and StocBiO use ``alpha = lr`` and ``iters`` Neumann terms; AID-CG ``iters``
    CG steps; AID-FP-Lite ``scale = lr`` (``H^-1 ~ lr I``)."""
    if name == "itd":
        return bl.get_solver("itd", steps=T, lr=lr)
    if name == "aid-cg":
        return bl.get_solver("aid-cg", iters=iters, tol=1e-10, on_negative_curvature="raise")
    if name == "aid-fp":
        return bl.get_solver("aid-fp", iters=iters, alpha=lr)
    if name == "aid-fp-lite":
        return bl.get_solver("aid-fp-lite", scale=lr)
    if name == "stocbio":
        return bl.get_solver("stocbio", iters=iters, alpha=lr, batches=stoc_batches)
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVER_NAMES}")


@dataclass
class CleaningResult:
    """One run. ``history``: per evaluated outer step, ``step``, ``val_loss`` (the hyper-objective
    ``f`` at the current ``theta``), ``f1``, ``mean_w_corrupted``, ``mean_w_clean``. ``seconds``: wall
    time of the whole loop; ``step_ms`` / ``hypergrad_ms``: medians over outer steps of the time of a
    trainer step (T inner steps + hypergradient + update) and of the hypergradient alone (medians
    resist the spikes of a shared CPU)."""

    method: str
    test_acc: float
    val_acc: float
    f1: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    weights: Tensor | None = None
    step_ms: float = math.nan
    hypergrad_ms: float = math.nan


def _linear(seed: int, dtype: torch.dtype) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(64, 10).to(dtype)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def fit_baseline(
    data: CleaningData, which: str, *, reg: float = 1e-3, steps: int = 3000, seed: int = 0, progress: bool = False
) -> CleaningResult:
    """Train the linear classifier by full-batch gradient descent (``lr = 1/L``) on ``g`` with fixed
    weights: ``which="noisy"``: all training examples, weight 1; ``"clean"``: only the uncorrupted
    examples (an oracle that knows the mask); ``"clean+val"`` is not offered (f uses val).
    Same inner problem, optimiser and step size as the bilevel runs."""
    if which not in ("noisy", "clean"):
        raise ValueError(f"baseline must be 'noisy' or 'clean', got {which!r}")
    dtype = data.train["x"].dtype
    model = _linear(seed, dtype)
    lr = 1.0 / smoothness(data, reg)
    keep = torch.ones(data.n_train, dtype=torch.bool) if which == "noisy" else ~data.corrupted
    batch = {k: v[keep] for k, v in data.train.items()}
    batch["idx"] = torch.arange(int(keep.sum()))
    lam = {"lam": torch.full((int(keep.sum()),), 50.0, dtype=dtype)}  # sigmoid(50) = 1 in float
    g = inner_objective(reg)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc=f"baseline {which}", disable=not progress, leave=False):
        opt.zero_grad()
        g(dict(model.named_parameters()), lam, batch).backward()
        opt.step()
    seconds = time.perf_counter() - start
    return CleaningResult(
        method=f"train on {which}" + (" subset (oracle)" if which == "clean" else " data"),
        test_acc=accuracy(model, data.test),
        val_acc=accuracy(model, data.val),
        f1=float("nan"),
        seconds=seconds,
    )


class _Recorder(bl.Callback):
    def __init__(self, data: CleaningData, every: int):
        self.data, self.every, self.rows = data, every, []
        self.step_s: list[float] = []
        self.hg_s: list[float] = []

    def on_step_end(self, trainer: bl.BilevelTrainer, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        self.step_s.append(metrics["time"])
        if metrics.get("hypergrad_info") is not None:
            self.hg_s.append(metrics["hypergrad_info"].times["total"])
        if step % self.every and step != 1:
            return
        with torch.no_grad():
            val = float(outer_objective(trainer.params, trainer.hparams, self.data.val))
            w = torch.sigmoid(trainer.hparams["lam"])
        c = self.data.corrupted
        self.rows.append(
            {
                "step": step,
                "val_loss": val,
                "f1": f1_corrupted(w, c),
                "mean_w_corrupted": float(w[c].mean()) if c.any() else math.nan,
                "mean_w_clean": float(w[~c].mean()),
            }
        )


def run_cleaning(
    data: CleaningData,
    solver: str,
    *,
    outer_steps: int = 200,
    T: int = 10,
    iters: int = 20,
    reg: float = 1e-3,
    meta_lr: float = 0.1,
    meta_optimizer: str = "adam",
    stoc_batch: int = 200,
    seed: int = 0,
    eval_every: int = 10,
    progress: bool = True,
) -> CleaningResult:
    """Hyper-cleaning with one solver: ``outer_steps`` trainer steps, each ``T`` inner SGD steps
    (``lr = 1/L``, warm-started) then one Adam (or plain SGD) step (``meta_lr``) on ``lam`` (init 0, weights 0.5).
    Adam's per-coordinate normalisation hides much of the solvers' differences in hypergradient
    *magnitude*; plain SGD (``meta_optimizer="sgd"``, ``meta_lr ~ n_train``) follows them exactly.
    ``seconds`` is the wall time of the whole loop (inner steps and hypergradients)."""
    if outer_steps < 1:
        raise ValueError(f"outer_steps must be >= 1, got {outer_steps}")
    if meta_optimizer not in ("adam", "sgd"):
        raise ValueError(f"meta_optimizer must be 'adam' or 'sgd', got {meta_optimizer!r}")
    dtype = data.train["x"].dtype
    model = _linear(seed, dtype)
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.zeros(data.n_train, dtype=dtype))})
    lr = 1.0 / smoothness(data, reg)
    meta_opt_cls = torch.optim.Adam if meta_optimizer == "adam" else torch.optim.SGD
    stoc = MiniBatches(data.train, min(stoc_batch, data.n_train), seed=seed) if solver == "stocbio" else None
    trainer = bl.BilevelTrainer(
        model,
        torch.optim.SGD(model.parameters(), lr=lr),
        inner_objective(reg),
        outer=outer_objective,
        meta_model=meta,
        meta_optimizer=meta_opt_cls(meta.parameters(), lr=meta_lr),
        solver=make_solver(solver, lr, iters=iters, T=T, stoc_batches=stoc),
        config=bl.TrainerConfig(inner_steps=T, hyper_every=1),
        callbacks=[rec := _Recorder(data, eval_every)],
        hvp_batches=stoc,
    )
    start = time.perf_counter()
    trainer.fit([data.train] * outer_steps, [data.val], epochs=1, progress=progress)
    seconds = time.perf_counter() - start
    w = torch.sigmoid(meta["lam"].detach())
    return CleaningResult(
        method=solver,
        test_acc=accuracy(model, data.test),
        val_acc=accuracy(model, data.val),
        f1=f1_corrupted(w, data.corrupted),
        seconds=seconds,
        history=rec.rows,
        weights=w,
        step_ms=1e3 * statistics.median(rec.step_s),
        hypergrad_ms=1e3 * statistics.median(rec.hg_s) if rec.hg_s else math.nan,
    )
