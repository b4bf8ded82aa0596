"""Fine-tune a pretrained backbone (UniVL- or Violet-style) with a single task, MTL or MELTR (any solver).

    python -m examples.meltr_video.finetune --task retrieval --method meltr --solver aid-fp-lite \
        [--backbone univl|violet --task retrieval|captioning|qa-mc|qa-oe \
         --seed 0 --epochs 3 --K 3 --gamma 0.1 --meta-batch heldout|last10 \
         --pretrained runs/pretrain_tiny.pt --out runs/finetune/NAME --resume]

Methods (all trained by :class:`bilevel.BilevelTrainer`, same optimizer, data order and epochs):

    single:  theta <- Adam(theta, grad_theta L_primary)                            (no hyper step)
    mtl:     theta <- Adam(theta, grad_theta sum_t L_t)                            (no hyper step)
    weighted: theta <- Adam(theta, grad_theta sum_t w_t L_t), fixed w (``--weights``; paper Table 7)
    meltr:   theta <- Adam(theta, grad_theta g),  g = MELTR_phi(L_1..L_T)          every step
             phi   <- Adam(phi, hypergradient of f = L_primary + gamma |sum_t L_t - g|)
                                                                                   every K-th step

Data (``--data``): ``testbed`` (default for UniVL retrieval and captioning: the target domain of
:func:`~examples.meltr_video.testbed.make_testbed`, frozen CNN features) or ``digits`` (the older
single-domain clips of :func:`~examples.meltr_video.data.make_digit_clips`; the Violet backbone and
the QA tasks still use them). Splits: ``train`` (fine-tuning), ``meta`` (MELTR's outer batches: a
held-out split of clips drawn from the same handwriting pool as ``train`` but disjoint from it;
never val or test; ``--train-on-meta`` gives it to a baseline as training data instead), ``val``
(model selection: the epoch with the best val score is the one tested), ``test`` (reported once, at
the end, for the val-selected epoch). ``--meta-batch last10`` reproduces the official code's choice
instead (a random one of the last 10 training batches; MATH.md section 7).

Hypergradient solvers (``--solver``; ``alpha`` is the common step/scale, ``iters`` the HVP count):
``aid-fp-lite`` (scale=alpha), ``aid-cg`` (iters), ``aid-fp`` (Neumann, iters, alpha), ``itd``
(Meta-Weight-Net style one-step look-ahead: steps=1, lr=alpha), ``stocbio`` (iters, alpha, each HVP
on a fresh training batch). ``FinetuneRun(cfg, solver=...)`` takes any other :class:`bilevel.Solver`
instead; the efficiency benchmark passes the peer libraries' solvers that way (``cfg.solver`` is then
their ``PEER:METHOD`` label, e.g. ``torchopt:cg``; the adapters live in ``benchmarks/peers.py``).

Output (``--out DIR``): ``DIR/results.json`` (config, per-epoch metrics and seconds, final test
metrics, solver statistics, MELTR analysis), ``DIR/ckpt.pt`` (trainer checkpoint: resume with
``--resume``), ``DIR/best.pt`` (the val-selected model: the backbone, with the answer head for QA).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.checkpoint import atomic_write, save_checkpoint
from bilevel.solvers import AIDSolver

from ._util import num_threads
from .data import Collate, DigitSplits, Tokenizer, VideoTextDataset, make_digit_clips
from .evaluate import caption_eval, retrieval_eval
from .meltr import MELTR, MELTRObjectives, RecentTrainBatches, loss_gradient, response_curve
from .qa import QACollate, QAModel, make_qa, qa_accuracy
from .testbed import make_testbed
from .univl import LOSS_NAMES, PRIMARY, UniVL, UniVLConfig
from .violet import LOSS_NAMES as VIOLET_LOSS_NAMES
from .violet import PRIMARY as VIOLET_PRIMARY
from .violet import Violet, VioletCollate, VioletConfig

__all__ = [
    "METHODS",
    "SOLVERS",
    "FinetuneConfig",
    "FinetuneRun",
    "default_pretrained",
    "finetune",
    "main",
    "make_solver",
    "parse_weights",
]

METHODS = ("single", "mtl", "weighted", "meltr")
BACKBONES = ("univl", "violet")
#: task -> primary loss, per backbone (the QA tasks add the answer loss "qa" to the backbone's losses)
TASKS: dict[str, dict[str, str]] = {
    "univl": {**PRIMARY, "qa-mc": "qa", "qa-oe": "qa"},
    "violet": {**VIOLET_PRIMARY, "qa-mc": "qa", "qa-oe": "qa"},
}
#: the backbones' pretext losses (MELTR's inputs, in order)
BACKBONE_LOSSES: dict[str, tuple[str, ...]] = {"univl": LOSS_NAMES, "violet": VIOLET_LOSS_NAMES}
#: MELTR's sizes per backbone (MATH.md section 4: official code's UniVL and Violet configs)
MELTR_SIZES: dict[str, dict[str, int]] = {
    "univl": {"hidden": 128, "d_model": 256, "ff": 512},
    "violet": {"hidden": 256, "d_model": 512, "ff": 512},
}
#: default pretrained checkpoint per backbone. UniVL: on the testbed's source domain, shipped in the repository
#: (``python -m examples.meltr_video.pretrain --epochs 12 --threads 2 --out PATH`` regenerates it, see
#: docs/testbed.md); "univl-digits": UniVL on the digit clips (QA); Violet: on the digit clips.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "univl_tiny_testbed.pt"
DEFAULT_PRETRAINED = {
    "univl": str(SHIPPED_CHECKPOINT),
    "violet": "runs/pretrain_violet.pt",
    "univl-digits": "runs/pretrain_tiny_digits.pt",
}


def default_pretrained(backbone: str, data: str) -> str:
    """The default checkpoint path of ``backbone`` pretrained for ``data``."""
    return DEFAULT_PRETRAINED["univl-digits" if (backbone, data) == ("univl", "digits") else backbone]


SOLVERS = ("aid-fp-lite", "aid-cg", "aid-fp", "itd", "stocbio")
# those that take a shared linearisation (bilevel's AID solvers)
AID_SOLVERS = tuple(n for n in SOLVERS if issubclass(bl.SOLVERS[n], AIDSolver))
META_BATCH = ("heldout", "last10")
DATA = ("testbed", "digits")
#: default split sizes and caption length per data set
DATA_SIZES: dict[str, dict[str, int]] = {
    "testbed": {"train": 256, "meta": 64, "val": 250, "test": 1000},
    "digits": {"train": 160, "meta": 96, "val": 200, "test": 300},
}
MAX_WORDS = {"testbed": 24, "digits": 20}
_GENS = ("train_order", "train_masks", "meta_order", "meta_masks", "hvp_order", "hvp_masks")


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (all saved in the results JSON).

    Attributes:
        task: ``"retrieval"`` (primary loss: UniVL ``alignment``, Violet ``vtm``), ``"captioning"``
            (UniVL only, ``decoder``), ``"qa-mc"`` / ``"qa-oe"`` (video question answering, multiple
            choice / open-ended, :mod:`~examples.meltr_video.qa`; primary loss ``qa``, the answer
            cross-entropy, with the backbone's pretext losses on the clip's caption as auxiliaries).
        backbone: ``"univl"`` or ``"violet"``; must match the checkpoint ``pretrained``.
        method: ``"single"``, ``"mtl"``, ``"weighted"`` (``sum_t w_t L_t`` with fixed ``weights``) or ``"meltr"``.
        weights: the ``weighted`` method's ``{loss name: w_t >= 0}`` (losses left out weigh 0 and are
            not computed).
        solver: hypergradient solver of MELTR (ignored by the baselines).
        K: one hyper step every K inner steps (``TrainerConfig.hyper_every``).
        gamma: weight of MELTR's regulariser ``|sum_t L_t - L_aux|`` in ``f``.
        meta_batch: ``"heldout"`` (the ``meta`` split) or ``"last10"`` (official code).
        iters, alpha: solver options (see the module docstring).
        share_linearization: MELTR with an AID solver: one linearisation of ``g`` per hyper step serves
            both the inner update and the hypergradient, the hyper step coming before that step's
            inner update (``bilevel.TrainerConfig.share_linearization``); saves one forward and
            backward pass of the backbone per hyper step.
        lr: backbone Adam learning rate; meta_lr / meta_weight_decay / meta_clip: MELTR's Adam and
            hypergradient clipping (official code: 1e-3, 3e-5, 50).
        data: ``"testbed"`` or ``"digits"`` (None: ``"digits"`` for the Violet backbone and the QA tasks,
            whose question generator reads the digit clips' captions, else ``"testbed"``).
        sizes: clips in the train / meta / val / test splits (``data_seed``; None: :data:`DATA_SIZES`).
        max_words: caption length limit (None: :data:`MAX_WORDS` of the data).
        train_on_meta: a baseline (single, MTL) also trains on the ``meta`` split, so that it sees
            every labelled pair MELTR sees (MELTR uses them in its outer objective only).
        eval_threads: torch threads for evaluation only (None: as for training). Training times are
            measured apart from evaluation, so benchmarks can train on one thread and evaluate on all.
    """

    task: str = "retrieval"
    backbone: str = "univl"
    method: str = "meltr"
    solver: str = "aid-fp-lite"
    seed: int = 0
    epochs: int = 3
    K: int = 3
    gamma: float = 0.1
    meta_batch: str = "heldout"
    pretrained: str | None = None
    out: str | None = None
    resume: bool = False
    batch_size: int = 16
    lr: float = 1e-4
    meta_lr: float = 1e-3
    meta_weight_decay: float = 3e-5
    meta_clip: float = 50.0
    iters: int = 3
    alpha: float = 0.01
    share_linearization: bool = False
    data_seed: int = 0
    data: str | None = None
    sizes: dict[str, int] | None = None
    max_words: int | None = None
    train_on_meta: bool = False
    weights: dict[str, float] | None = None
    eval_test: bool = True
    progress: bool = True
    eval_threads: int | None = None

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        digits_only = self.backbone == "violet" or self.task.startswith("qa-")
        if self.data is None:
            self.data = "digits" if digits_only else "testbed"
        if self.data not in DATA:
            raise ValueError(f"unknown data {self.data!r}; choose one of {DATA}")
        if self.data == "testbed" and digits_only:
            raise ValueError(
                f"backbone {self.backbone!r} / task {self.task!r} runs on data='digits' only (the Violet backbone "
                "reads raw frames; the QA questions are generated from the digit clips' captions)"
            )
        if self.sizes is None:
            self.sizes = dict(DATA_SIZES[self.data])
        if self.pretrained is None:
            self.pretrained = default_pretrained(self.backbone, self.data)
        if self.max_words is None:
            self.max_words = MAX_WORDS[self.data]
        if self.method == "weighted":
            known = (*BACKBONE_LOSSES[self.backbone], *(("qa",) if self.qa_kind else ()))
            w = self.weights or {}
            bad = [k for k in w if k not in known]
            if bad:
                raise ValueError(f"weights name unknown loss(es) {bad}; the losses are {list(known)}")
            if any(not (isinstance(v, int | float) and 0 <= v < math.inf) for v in w.values()) or not any(w.values()):
                raise ValueError(f"weights must be finite numbers >= 0, at least one > 0; got {w!r}")
        elif self.weights is not None:
            raise ValueError(f"weights are for method='weighted', not {self.method!r}")
        if self.train_on_meta and self.method == "meltr":
            raise ValueError("train_on_meta is for the baselines; MELTR uses the meta split for its outer objective")
        if self.task not in TASKS[self.backbone]:
            raise ValueError(
                f"unknown task {self.task!r} for backbone {self.backbone!r}; choose one of {list(TASKS[self.backbone])}"
            )
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.solver not in SOLVERS and not _is_peer(self.solver):
            raise ValueError(
                f"unknown solver {self.solver!r}; choose one of {SOLVERS} or PEER:METHOD (e.g. 'torchopt:cg')"
            )
        if self.share_linearization and self.method == "meltr" and self.solver not in AID_SOLVERS:
            raise ValueError(
                f"share_linearization needs an AID solver {AID_SOLVERS}, got {self.solver!r} (ITD and the peers' "
                "solvers linearise g themselves)"
            )
        if self.meta_batch not in META_BATCH:
            raise ValueError(f"unknown meta batch source {self.meta_batch!r}; choose one of {META_BATCH}")
        for name in ("epochs", "K", "batch_size", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "iters" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.eval_threads is not None and (
            isinstance(self.eval_threads, bool) or not isinstance(self.eval_threads, int) or self.eval_threads < 1
        ):
            raise ValueError(f"eval_threads must be None or an int >= 1, got {self.eval_threads!r}")
        for name in ("lr", "meta_lr", "alpha", "meta_clip"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma!r}")
        for split in ("train", "val", "test") + (("meta",) if self.method == "meltr" else ()):
            n = self.sizes.get(split, 0)
            if split in ("train", "meta") and n < self.batch_size:
                raise ValueError(f"split {split!r} has {n} clips, fewer than one batch ({self.batch_size})")
            if n < 2:
                raise ValueError(f"split {split!r} needs at least 2 clips, got {n}")

    @property
    def primary(self) -> str:
        return TASKS[self.backbone][self.task]

    @property
    def qa_kind(self) -> str | None:
        """``"mc"`` / ``"oe"`` for the QA tasks, else None."""
        return self.task[3:] if self.task.startswith("qa-") else None

    @property
    def name(self) -> str:
        """A short label: ``mtl``, ``single``, ``meltr-aid-fp-lite`` (the method and solver only)."""
        if self.method == "weighted":
            w = ",".join(f"{k}={v:g}" for k, v in (self.weights or {}).items() if v)
            return f"weighted[{w}]" + ("+meta" if self.train_on_meta else "")
        if self.method != "meltr":
            return self.method + ("+meta" if self.train_on_meta else "")
        return f"meltr-{self.solver}" + ("-shared" if self.share_linearization else "")


def parse_weights(spec: str) -> dict[str, float]:
    """``"alignment=1,decoder=0.5"`` -> ``{"alignment": 1.0, "decoder": 0.5}`` (names checked by FinetuneConfig)."""
    out: dict[str, float] = {}
    for item in spec.split(","):
        k, sep, v = item.strip().partition("=")
        if not sep or not k:
            raise ValueError(f"weights {spec!r}: expected name=value pairs separated by commas")
        try:
            out[k] = float(v)
        except ValueError:
            raise ValueError(f"weights {spec!r}: {v!r} is not a number") from None
    return out


def _is_peer(name: str) -> bool:
    """``PEER:METHOD`` names a peer library's solver (checked fully by :func:`make_solver`)."""
    peer, sep, method = name.partition(":")
    return bool(sep and peer and method)


def make_solver(name: str, iters: int = 3, alpha: float = 0.01) -> bl.Solver:
    """The MELTR solver ``name`` with the common options (see the module docstring).

    Non-convexity of the fine-tuning problem is expected (the backbone is not at an inner minimum):
    negative curvature in CG and Neumann divergence are counted in the run's statistics, not raised.
    """
    if name == "aid-fp-lite":
        return bl.get_solver(name, scale=alpha)
    if name == "aid-cg":
        return bl.get_solver(name, iters=iters, on_negative_curvature="ignore")
    if name == "aid-fp":
        return bl.get_solver(name, iters=iters, alpha=alpha, on_divergence="ignore")
    if name == "itd":
        return bl.get_solver(name, steps=1, lr=alpha)
    if name == "stocbio":
        return bl.get_solver(name, iters=iters, alpha=alpha, on_divergence="ignore")
    if _is_peer(name):
        raise ValueError(
            f"solver {name!r} is a peer library's: build it with benchmarks.peers.parse_peer_solver and pass it as "
            "FinetuneRun(cfg, solver=...) (the examples do not import the benchmarks)"
        )
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVERS}")


class _SolverStats(bl.Callback):
    """Per-epoch sums over hyper steps: count, seconds by stage, HVPs, CG negative curvature, divergence."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stats: dict[str, Any] = {"hyper_steps": 0, "n_hvp": 0, "negative_curvature": 0, "diverged": 0}
        self.times: dict[str, float] = {}
        self.inner_losses: list[float] = []
        self.outer_losses: list[float] = []

    def on_step_end(self, trainer: bl.BilevelTrainer, metrics: dict[str, Any]) -> None:
        self.inner_losses.append(float(metrics["inner_loss"]))
        info = metrics.get("hypergrad_info")
        if info is None:
            return
        if metrics.get("outer_loss") is not None:  # the peers' solvers do not report f
            self.outer_losses.append(float(metrics["outer_loss"]))
        s = self.stats
        s["hyper_steps"] += 1
        s["n_hvp"] += int(info.n_hvp)
        s["negative_curvature"] += int(bool(info.negative_curvature))
        s["diverged"] += int(bool(info.diverged))
        for k, v in info.times.items():
            self.times[k] = self.times.get(k, 0.0) + float(v)

    def summary(self) -> dict[str, Any]:
        out = dict(self.stats)
        out["hyper_seconds"] = self.times
        out["inner_loss_mean"] = statistics.fmean(self.inner_losses) if self.inner_losses else None
        out["outer_loss_mean"] = statistics.fmean(self.outer_losses) if self.outer_losses else None
        return out


def _score(task: str, m: Mapping[str, float]) -> tuple[float, ...]:
    """Val model-selection key (larger is better): R@1, R@5, -MedR for retrieval; accuracy for QA;
    CIDEr, BLEU-4 for captioning."""
    if task == "retrieval":
        return (m["R@1"], m["R@5"], -m["MedR"])
    if task.startswith("qa-"):
        return (m["acc"],)
    return (m["CIDEr"], m["BLEU-4"])


class FinetuneRun:
    """One fine-tuning run, epoch by epoch (:func:`finetune` runs it to the end; the efficiency
    benchmark interleaves the epochs of several runs).

    Args:
        cfg: the settings.
        data: digit splits to reuse (else built from ``cfg.data_seed`` and ``cfg.sizes``).
        pretrained: ``(backbone_state_dict, UniVLConfig, Tokenizer)`` to reuse (else read from
            ``cfg.pretrained``).
        solver: MELTR's hypergradient solver (else :func:`make_solver` of ``cfg.solver``), e.g. a peer
            library's adapter; ``cfg.solver`` then only labels the run.

    Attributes: ``trainer`` (the :class:`bilevel.BilevelTrainer`), ``backbone``, ``meltr`` (None for the
    baselines), ``history`` (a dict per finished epoch), ``best`` (val-selected epoch, 1-based).
    """

    def __init__(
        self,
        cfg: FinetuneConfig,
        data: DigitSplits | None = None,
        pretrained: tuple[Mapping[str, Tensor], Any, Tokenizer] | None = None,
        solver: bl.Solver | None = None,
    ):
        self.cfg = cfg
        self._solver = solver
        if pretrained is None:
            from .pretrain import load_pretrained

            if not Path(cfg.pretrained).exists():
                raise FileNotFoundError(
                    f"pretrained backbone {cfg.pretrained} not found: run "
                    f"`python -m examples.meltr_video.pretrain --backbone {cfg.backbone} --data {cfg.data} "
                    f"--out {cfg.pretrained}` first"
                )
            model, tok, _ = load_pretrained(cfg.pretrained)
            state, ucfg = model.state_dict(), model.cfg
        else:
            state, ucfg, tok = pretrained
        self.tok = tok
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
        if cfg.train_on_meta:  # the baseline trains on every labelled pair: train + meta
            tr, me = data["train"], data["meta"]
            frames = None
            if tr.frames is not None and me.frames is not None:
                import numpy as np

                frames = np.concatenate([tr.frames, me.frames])
            merged = VideoTextDataset(tr.records + me.records, frames=frames)
            data = DigitSplits({**data.splits, "train": merged}, data.tokenizer)
        self.data = data
        kind = cfg.qa_kind
        # the data the loaders and the evaluation see: the clips, or questions on them (QA tasks)
        self.sets: dict[str, Any] = {
            name: make_qa(ds, kind, seed=cfg.data_seed) if kind else ds for name, ds in self.data.splits.items()
        }
        torch.manual_seed(cfg.seed)
        self.backbone = _build_backbone(cfg, ucfg, tok)
        self.backbone.load_state_dict(state)
        # the module trained: the backbone, or the backbone with an answer head (QA)
        self.model: nn.Module = QAModel(self.backbone, kind) if kind else self.backbone
        names = tuple(self.model.loss_names) if kind else BACKBONE_LOSSES[cfg.backbone]
        sizes = MELTR_SIZES[cfg.backbone]
        self.meltr = MELTR(names, **sizes) if cfg.method == "meltr" else None
        self.obj = MELTRObjectives(self.model, self.meltr or MELTR(names, **sizes), cfg.primary, cfg.gamma)
        # Every source of randomness in the data has its own generator, seeded from cfg.seed, so that all
        # methods see the same training batches in the same order (hyper steps draw from their own
        # generators) and a resumed run continues the generators saved at the end of its last epoch.
        self.gens = {k: torch.Generator().manual_seed(cfg.seed * 1000 + i) for i, k in enumerate(_GENS)}

        def make_loader(split: str, order: str, masks: str) -> torch.utils.data.DataLoader:
            c = self.collate()
            c.gen = self.gens[masks]
            return torch.utils.data.DataLoader(
                self.sets[split], batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=c,
                generator=self.gens[order],
            )  # fmt: skip

        loader: Any = make_loader("train", "train_order", "train_masks")
        self.meta_loader: Any = None
        self.hvp_loader: Any = None
        if cfg.method == "meltr":
            if cfg.meta_batch == "heldout":
                self.meta_loader = make_loader("meta", "meta_order", "meta_masks")
            else:
                recent = RecentTrainBatches(self.gens["meta_order"], 10)
                loader, self.meta_loader = recent.watch(loader), recent
            if cfg.solver == "stocbio":
                self.hvp_loader = make_loader("train", "hvp_order", "hvp_masks")
        self.loader = loader
        self.trainer = self._trainer()
        self.stats = _SolverStats()
        self.trainer.callbacks.append(self.stats)
        self.history: list[dict[str, Any]] = []
        self.best: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.test: dict[str, float] | None = None
        self._fixed_batch = self.collate(seed=12345)(
            [self.sets["val"][i] for i in range(min(len(self.sets["val"]), 32))]
        )
        self.out = Path(cfg.out) if cfg.out else None
        if self.out is not None and cfg.resume:
            self._resume()

    # ------------------------------------------------------------------ building
    def collate(self, seed: int = 0) -> Any:
        """The training collate of this backbone and task (masks seeded with ``seed``; ``.gen`` swappable)."""
        cfg = self.cfg
        if cfg.backbone == "violet":
            base: Any = VioletCollate(self.tok, max_words=cfg.max_words, seed=seed)
        else:
            base = Collate(self.tok, max_words=cfg.max_words, seed=seed)
        if cfg.qa_kind:
            return QACollate(self.tok, cfg.qa_kind, max_words=cfg.max_words, seed=seed, base=base)
        return base

    def _trainer(self) -> bl.BilevelTrainer:
        """The one place that turns (method, solver) into a :class:`bilevel.BilevelTrainer`."""
        cfg, obj = self.cfg, self.obj
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        share = cfg.share_linearization and cfg.method == "meltr"
        tcfg = bl.TrainerConfig(hyper_every=cfg.K, meta_clip_grad_norm=cfg.meta_clip, share_linearization=share)
        if cfg.method == "single":
            primary = cfg.primary
            inner = bl.single_task_objective(lambda p, b: obj.backbone_fn(p, b, losses=(primary,))[primary])
            return bl.BilevelTrainer(self.model, opt, inner, config=tcfg)
        if cfg.method == "mtl":
            return bl.BilevelTrainer(self.model, opt, bl.mtl_objective(obj.losses), config=tcfg)
        if cfg.method == "weighted":
            w = {k: float(v) for k, v in (cfg.weights or {}).items() if v}
            names = tuple(n for n in self.obj.meltr.task_names if n in w)

            def weighted(p: dict[str, Tensor], b: Any) -> Tensor:
                losses = obj.backbone_fn(p, b, losses=names)
                return torch.stack([w[n] * losses[n] for n in names]).sum()

            return bl.BilevelTrainer(self.model, opt, bl.single_task_objective(weighted), config=tcfg)
        assert self.meltr is not None
        meta_opt = torch.optim.Adam(self.meltr.parameters(), lr=cfg.meta_lr, weight_decay=cfg.meta_weight_decay)
        return bl.BilevelTrainer(
            self.model,
            opt,
            obj.inner,
            outer=obj.outer,
            meta_model=self.meltr,
            meta_optimizer=meta_opt,
            solver=self._solver if self._solver is not None else make_solver(cfg.solver, cfg.iters, cfg.alpha),
            config=tcfg,
            hvp_batches=self.hvp_loader,
        )

    # ------------------------------------------------------------------ epochs
    @property
    def epoch(self) -> int:
        """Finished epochs."""
        return self.trainer.epoch

    @property
    def done(self) -> bool:
        return self.trainer.epoch >= self.cfg.epochs

    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics of the backbone on ``split`` (retrieval: R@k, MedR; captioning: BLEU, ROUGE-L, CIDEr[, METEOR])."""
        with num_threads(self.cfg.eval_threads):
            return self._evaluate(split)

    def _evaluate(self, split: str) -> dict[str, float]:
        ds = self.data[split]
        if self.cfg.qa_kind:
            return qa_accuracy(self.model, self.sets[split], self.tok, self.cfg.qa_kind)
        if self.cfg.task == "retrieval":
            return retrieval_eval(self.backbone, ds, self.tok, max_words=self.cfg.max_words)
        try:
            m, _ = caption_eval(self.backbone, ds, self.tok, max_len=self.cfg.max_words, with_meteor=True)
        except RuntimeError:  # METEOR needs pycocoevalcap and Java
            m, _ = caption_eval(self.backbone, ds, self.tok, max_len=self.cfg.max_words, with_meteor=False)
        return dict(m)

    @torch.no_grad()
    def _meltr_weights(self) -> dict[str, Any] | None:
        """``d L_aux / d L_t`` at the loss vector of a fixed val batch (paper Fig. 4)."""
        if self.meltr is None:
            return None
        lv = self.obj.losses(self.obj.params, self._fixed_batch).detach()
        with torch.enable_grad():
            w = loss_gradient(self.meltr, lv)
        return {
            "losses": dict(zip(self.meltr.task_names, lv.tolist(), strict=True)),
            "weights": dict(zip(self.meltr.task_names, w.tolist(), strict=True)),
        }

    def run_epoch(self) -> dict[str, Any]:
        """Train one epoch, evaluate on val, keep the best-val backbone; returns the epoch's record."""
        if self.done:
            raise RuntimeError(f"all {self.cfg.epochs} epochs are done")
        cfg = self.cfg
        self.stats.reset()
        ckpt = self.out / "ckpt.pt" if self.out is not None else None
        t0 = time.perf_counter()
        self.trainer.fit(
            self.loader, self.meta_loader, epochs=self.trainer.epoch + 1, checkpoint_path=ckpt, progress=cfg.progress
        )
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        val = self.evaluate("val")
        rec = {
            "epoch": self.trainer.epoch,
            "train_seconds": train_s,
            "inner_updates": self.trainer.inner_updates,
            **self.stats.summary(),
            "val": val,
            "meltr": self._meltr_weights(),
        }
        rec["eval_seconds"] = time.perf_counter() - t1
        self.history.append(rec)
        if self.best is None or _score(cfg.task, val) > _score(cfg.task, self.history[self.best - 1]["val"]):
            self.best = rec["epoch"]
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.out is not None:
                state = {"backbone": self.best_state, "epoch": self.best}
                save_checkpoint(state, self.out / "best.pt")
        if self.out is not None:
            gens = {"epoch": self.trainer.epoch, **{k: g.get_state() for k, g in self.gens.items()}}
            save_checkpoint(gens, self.out / "data_rng.pt")
        self._save()
        return rec

    def finish(self) -> dict[str, Any]:
        """Test the val-selected backbone (once), add MELTR's response curves; returns the results dict."""
        if self.cfg.eval_test and self.test is None:
            assert self.best_state is not None, "no epoch was run"
            current = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.best_state)
            self.test = self.evaluate("test")
            self.model.load_state_dict(current)
        res = self.results()
        if self.meltr is not None:
            res["response"] = self.response()
        if self.out is not None:
            atomic_write(self.out / "results.json", lambda fh: fh.write(json.dumps(res, indent=1).encode()))
            save_checkpoint(self.meltr.state_dict() if self.meltr else {}, self.out / "meltr.pt")
        return res

    @torch.no_grad()
    def response(self, n: int = 41, span: float = 1.0) -> dict[str, Any]:
        """MELTR's output as each input loss ``L_t`` sweeps ``[max(0, L_t - span*L_t), L_t + span*L_t]``
        (``n`` points) with the others at the fixed val batch's losses (paper Fig. 3)."""
        assert self.meltr is not None
        lv = self.obj.losses(self.obj.params, self._fixed_batch).detach()
        names = self.meltr.task_names
        out: dict[str, Any] = {"base": dict(zip(names, lv.tolist(), strict=True)), "curves": {}}
        for i, name in enumerate(names):
            x = torch.linspace(max(0.0, float(lv[i]) * (1 - span)), float(lv[i]) * (1 + span), n)
            y = response_curve(self.meltr, lv, name, x)
            out["curves"][name] = {"x": x.tolist(), "y": y.tolist()}
        return out

    def results(self) -> dict[str, Any]:
        times = [h["train_seconds"] for h in self.history]
        return {
            "config": asdict(self.cfg),
            "name": self.cfg.name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "epochs": self.history,
            "epoch_seconds": times,
            "median_epoch_seconds": statistics.median(times) if times else None,
            "best_epoch": self.best,
            "best_val": self.history[self.best - 1]["val"] if self.best else None,
            "test": self.test,
        }

    # ------------------------------------------------------------------ resume
    def _save(self) -> None:
        if self.out is not None:
            res = self.results()
            atomic_write(self.out / "results.json", lambda fh: fh.write(json.dumps(res, indent=1).encode()))

    def _resume(self) -> None:
        assert self.out is not None
        ckpt, res_path, best_path = self.out / "ckpt.pt", self.out / "results.json", self.out / "best.pt"
        if not ckpt.exists():
            return
        self.trainer.load_checkpoint(ckpt)
        # run_epoch calls fit once per epoch, and each fit starts fresh meta / HVP streams; a resumed
        # fit would instead continue the streams saved in the checkpoint. Restart them so that a
        # resumed run matches an uninterrupted one.
        self.trainer.restart_streams("outer", "hvp")
        rng_path = self.out / "data_rng.pt"
        if rng_path.exists():
            gens = torch.load(rng_path, map_location="cpu", weights_only=True)
            if int(gens["epoch"]) == self.trainer.epoch:
                for k, g in self.gens.items():
                    g.set_state(gens[k])
        if res_path.exists():
            prev = json.loads(res_path.read_text())
            same = ("method", "solver", "task", "backbone")
            if any(prev["config"].get(k, "univl" if k == "backbone" else None) != getattr(self.cfg, k) for k in same):
                raise ValueError(f"{res_path} is from another run ({prev['name']}); use another --out")
            self.history = [h for h in prev["epochs"] if h["epoch"] <= self.trainer.epoch]
        if best_path.exists():
            best = torch.load(best_path, map_location="cpu", weights_only=True)
            if best["epoch"] <= self.trainer.epoch:
                self.best, self.best_state = int(best["epoch"]), best["backbone"]
        if len(self.history) < self.trainer.epoch:  # stopped after the checkpoint, before the evaluation
            val = self.evaluate("val")
            self.history.append({"epoch": self.trainer.epoch, "train_seconds": float("nan"), "val": val})
            if self.best is None or _score(self.cfg.task, val) > _score(
                self.cfg.task, self.history[self.best - 1]["val"]
            ):
                self.best = self.trainer.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _build_backbone(cfg: FinetuneConfig, mcfg: Any, tok: Tokenizer) -> nn.Module:
    """The backbone of ``cfg.backbone`` from a pretrained config (``ValueError`` when they do not match)."""
    kinds = {"univl": (UniVL, UniVLConfig), "violet": (Violet, VioletConfig)}
    for name, (cls, config_cls) in kinds.items():
        if isinstance(mcfg, config_cls):
            if name != cfg.backbone:
                raise ValueError(
                    f"the pretrained checkpoint {cfg.pretrained} holds a {name} backbone, the run asks for "
                    f"--backbone {cfg.backbone}; pass the matching --pretrained (default {DEFAULT_PRETRAINED})"
                )
            return cls(mcfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    raise TypeError(f"unknown backbone config {type(mcfg).__name__}")


def finetune(
    cfg: FinetuneConfig,
    data: DigitSplits | None = None,
    pretrained: tuple[Mapping[str, Tensor], Any, Tokenizer] | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` to the end (resuming from ``cfg.out`` with ``cfg.resume``); returns the results dict
    (also written to ``cfg.out/results.json``)."""
    run = FinetuneRun(cfg, data, pretrained)
    while not run.done:
        rec = run.run_epoch()
        if cfg.progress:
            head = f"[{cfg.name} seed {cfg.seed}] epoch {rec['epoch']}"
            print(f"{head}: {rec['train_seconds']:.1f} s, val {_fmt(rec['val'])}")
    res = run.finish()
    if cfg.progress and res["test"] is not None:
        print(f"[{cfg.name} seed {cfg.seed}] test (val-selected epoch {res['best_epoch']}): {_fmt(res['test'])}")
    return res


def _fmt(m: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in m.items())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=sorted({t for ts in TASKS.values() for t in ts}), default="retrieval")
    p.add_argument("--backbone", choices=BACKBONES, default="univl")
    p.add_argument("--method", choices=METHODS, default="meltr")
    p.add_argument("--solver", default="aid-fp-lite", help=f"one of {SOLVERS}, or PEER:METHOD (torchopt:cg, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--K", type=int, default=3, help="one hyper step every K inner steps")
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--meta-batch", choices=META_BATCH, default="heldout")
    p.add_argument("--iters", type=int, default=3, help="HVPs of aid-cg / aid-fp / stocbio")
    p.add_argument("--alpha", type=float, default=0.01, help="aid-fp-lite scale, Neumann step, ITD look-ahead lr")
    p.add_argument(
        "--share-linearization", action="store_true",
        help="AID solvers: one linearisation of g serves the inner update and the hyper step (taken first)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", choices=DATA, default=None, help="testbed (default) or digits (Violet and QA)")
    p.add_argument("--train-size", type=int, default=None, help=f"default by data: {DATA_SIZES}")
    p.add_argument("--meta-size", type=int, default=None)
    p.add_argument("--val-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--train-on-meta", action="store_true", help="baselines: train on the meta split too")
    p.add_argument("--weights", default=None, help="method weighted: name=w,... e.g. alignment=1,decoder=1")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--pretrained", default=None, help=f"pretrained checkpoint (default by backbone: {DEFAULT_PRETRAINED})"
    )
    p.add_argument("--out", default=None, help="run directory (default runs/finetune/BACKBONE-TASK-NAME-sSEED)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    given = {"train": a.train_size, "meta": a.meta_size, "val": a.val_size, "test": a.test_size}
    data = a.data or ("digits" if a.backbone == "violet" or a.task.startswith("qa-") else "testbed")
    sizes = {k: v if v is not None else DATA_SIZES.get(data, DATA_SIZES["testbed"])[k] for k, v in given.items()}
    try:
        cfg = FinetuneConfig(
            task=a.task, backbone=a.backbone, method=a.method, solver=a.solver, seed=a.seed, epochs=a.epochs,
            K=a.K, gamma=a.gamma, meta_batch=a.meta_batch, pretrained=a.pretrained,
            resume=a.resume, batch_size=a.batch_size, lr=a.lr, meta_lr=a.meta_lr, iters=a.iters, alpha=a.alpha,
            share_linearization=a.share_linearization, data_seed=a.data_seed, sizes=sizes, progress=not a.no_progress,
            data=a.data, train_on_meta=a.train_on_meta, weights=parse_weights(a.weights) if a.weights else None,
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    cfg.out = a.out or f"runs/finetune/{a.backbone}-{a.task}-{cfg.name}-s{a.seed}"
    return finetune(cfg)


if __name__ == "__main__":
    main()
