"""The settings of a MELTR fine-tuning run: :class:`FinetuneConfig`, declared once (its fields carry
the command line's flags and help, see :func:`add_arguments`), the names it accepts, and the solvers."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import bilevel as bl
from bilevel.solvers import AIDSolver

from .univl import LOSS_NAMES, PRIMARY
from .violet import LOSS_NAMES as VIOLET_LOSS_NAMES
from .violet import PRIMARY as VIOLET_PRIMARY

__all__ = [
    "DATA_SIZES",
    "DEFAULT_PRETRAINED",
    "METHODS",
    "SHIPPED_CHECKPOINT",
    "SOLVERS",
    "FinetuneConfig",
    "add_arguments",
    "config_from_args",
    "default_pretrained",
    "make_solver",
    "parse_weights",
]


def _flag(default: Any, help: str, *, choices: Any = None, parse: str | None = None) -> Any:
    """A field that is also a command-line flag ``--name`` (``help``, ``choices``; ``parse`` names a parser)."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


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


SOLVERS = ("aid-fp-lite", "aid-cg", "aid-fp", "itd", "stocbio", "sama")
#: how the AID solvers take the mixed product J v (bilevel.products): exact ("autograd", "jvp") or first order
MIXED = ("autograd", "jvp", "fd", "fd-onesided")
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
        mixed: how the AID solvers take the mixed product ``J v`` (``bilevel.products``): ``"autograd"``
            (default), ``"jvp"`` (exact, forward mode), ``"fd"`` / ``"fd-onesided"`` (first order); ``"sama"``
            is first order by definition (``"fd"`` unless ``"fd-onesided"``). The HVP mode follows: ``"fd"``
            with a first-order ``mixed``, so that no second-order graph is built.
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

    task: str = _flag("retrieval", "the fine-tuning task", choices=sorted({t for ts in TASKS.values() for t in ts}))
    backbone: str = _flag("univl", "the backbone (must match --pretrained)", choices=BACKBONES)
    method: str = _flag("meltr", "single, mtl, weighted (with --weights) or meltr", choices=METHODS)
    solver: str = _flag("aid-fp-lite", "MELTR's hypergradient solver", choices=SOLVERS)
    seed: int = _flag(0, "initialisation and data order")
    epochs: int = _flag(3, "maximum epochs (the val-selected one is tested)")
    K: int = _flag(3, "one hyper step every K inner steps")
    gamma: float = _flag(0.1, "weight of MELTR's regulariser |sum_t L_t - L_aux|")
    meta_batch: str = _flag("heldout", "meta batches: the meta split, or the official last10", choices=META_BATCH)
    pretrained: str | None = _flag(None, f"pretrained checkpoint (default by backbone: {DEFAULT_PRETRAINED})")
    out: str | None = _flag(None, "run directory (default runs/finetune/BACKBONE-TASK-NAME-sSEED)")
    resume: bool = _flag(False, "resume from the run directory's checkpoint")
    batch_size: int = _flag(16, "batch size of every split")
    lr: float = _flag(1e-4, "backbone Adam learning rate")
    meta_lr: float = _flag(1e-3, "MELTR's Adam learning rate")
    meta_weight_decay: float = 3e-5
    meta_clip: float = 50.0
    iters: int = _flag(3, "HVPs of aid-cg / aid-fp / stocbio")
    alpha: float = _flag(0.01, "aid-fp-lite scale, Neumann step, ITD look-ahead lr")
    share_linearization: bool = _flag(
        False, "AID solvers: one linearisation of g serves the inner update and the hyper step (taken first)"
    )
    mixed: str = _flag("autograd", "AID solvers: the mixed product's mode (sama: fd unless fd-onesided)", choices=MIXED)
    data_seed: int = _flag(0, "seed of the data set")
    data: str | None = _flag(None, "testbed (default) or digits (Violet and QA)", choices=DATA)
    sizes: dict[str, int] | None = None  # the CLI's --train-size, --meta-size, --val-size, --test-size
    max_words: int | None = None
    train_on_meta: bool = _flag(False, "baselines: train on the meta split too")
    weights: dict[str, float] | None = _flag(None, "method weighted: name=w,... e.g. alignment=1", parse="w")  # noqa: RUF009
    eval_test: bool = True
    progress: bool = True  # the CLI's --no-progress
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
                f"unknown solver {self.solver!r}; choose one of {SOLVERS} (or a PEER:METHOD label with "
                "FinetuneRun(cfg, solver=...))"
            )
        if self.share_linearization and self.method == "meltr" and self.solver not in AID_SOLVERS:
            raise ValueError(
                f"share_linearization needs an AID solver {AID_SOLVERS}, got {self.solver!r} (ITD and the peers' "
                "solvers linearise g themselves)"
            )
        if self.mixed not in MIXED:
            raise ValueError(f"unknown mixed-product mode {self.mixed!r}; choose one of {MIXED}")
        if self.mixed != "autograd" and self.method == "meltr" and self.solver not in AID_SOLVERS:
            raise ValueError(f"mixed={self.mixed!r} is for the AID solvers {AID_SOLVERS}, not {self.solver!r}")
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
        """A short label: ``mtl``, ``single``, ``meltr-aid-fp-lite`` (method, solver, a non-default mixed mode)."""
        if self.method == "weighted":
            w = ",".join(f"{k}={v:g}" for k, v in (self.weights or {}).items() if v)
            return f"weighted[{w}]" + ("+meta" if self.train_on_meta else "")
        if self.method != "meltr":
            return self.method + ("+meta" if self.train_on_meta else "")
        mode = f"-{self.mixed}" if self.mixed != "autograd" else ""
        return f"meltr-{self.solver}{mode}" + ("-shared" if self.share_linearization else "")


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


def make_solver(name: str, iters: int = 3, alpha: float = 0.01, mixed: str = "autograd") -> bl.Solver:
    """The MELTR solver ``name`` with the common options (see the module docstring).

    ``mixed``: the AID solvers' mixed-product mode; a first-order one (``"fd"``, ``"fd-onesided"``) takes the
    HVPs by finite differences too (``hvp="fd"``: no second-order graph at all). ``"sama"`` (first order;
    ``scale=alpha``) uses ``"fd"`` unless ``mixed="fd-onesided"``.

    Non-convexity of the fine-tuning problem is expected (the backbone is not at an inner minimum):
    negative curvature in CG, Neumann divergence and a growing ITD adjoint are counted in the run's statistics,
    not raised.
    """
    if mixed not in MIXED:
        raise ValueError(f"unknown mixed-product mode {mixed!r}; choose one of {MIXED}")
    modes = {"mixed": mixed, "hvp": "fd"} if mixed.startswith("fd") else {"mixed": mixed}
    if name == "sama":
        return bl.get_solver(name, scale=alpha, mixed="fd-onesided" if mixed == "fd-onesided" else "fd")
    if mixed != "autograd" and name not in AID_SOLVERS:
        raise ValueError(f"mixed={mixed!r} is for the AID solvers {AID_SOLVERS}, not {name!r}")
    if name == "aid-fp-lite":
        return bl.get_solver(name, scale=alpha, **modes)
    if name == "aid-cg":
        return bl.get_solver(name, iters=iters, on_negative_curvature="ignore", **modes)
    if name == "aid-fp":
        return bl.get_solver(name, iters=iters, alpha=alpha, on_divergence="ignore", **modes)
    if name == "itd":
        return bl.get_solver(name, steps=1, lr=alpha, on_divergence="ignore")
    if name == "stocbio":
        return bl.get_solver(name, iters=iters, alpha=alpha, on_divergence="ignore", **modes)
    if _is_peer(name):
        raise ValueError(
            f"solver {name!r} is a peer library's: build it with benchmarks.peers.parse_peer_solver and pass it as "
            "FinetuneRun(cfg, solver=...) (the examples do not import the benchmarks)"
        )
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVERS}")


SIZE_FLAGS = {"train": "--train-size", "meta": "--meta-size", "val": "--val-size", "test": "--test-size"}
_TYPES = {"str": str, "int": int, "float": float}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`FinetuneConfig` field declared with a help text (``--batch-size`` for
    ``batch_size``; booleans are switches), plus ``--train-size`` ... ``--test-size`` (``sizes``)
    and ``--no-progress``."""
    for f in fields(FinetuneConfig):
        if "help" not in f.metadata:
            continue
        flag, md = "--" + f.name.replace("_", "-"), f.metadata
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=md["help"])
            continue
        kind = _TYPES[str(f.type).split(" | ")[0]] if md["parse"] is None else str
        p.add_argument(flag, type=kind, default=f.default, choices=md["choices"], help=md["help"])
    for split, flag in SIZE_FLAGS.items():
        default = ", ".join(f"{d} {sizes[split]}" for d, sizes in DATA_SIZES.items())
        p.add_argument(flag, type=int, default=None, help=f"clips in the {split} split (default by data: {default})")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed :func:`add_arguments` flags (``ValueError`` for bad values)."""
    kw = {f.name: getattr(a, f.name) for f in fields(FinetuneConfig) if "help" in f.metadata}
    if kw["weights"] is not None:
        kw["weights"] = parse_weights(kw["weights"])
    data = a.data or ("digits" if a.backbone == "violet" or a.task.startswith("qa-") else "testbed")
    given = {k: getattr(a, flag[2:].replace("-", "_")) for k, flag in SIZE_FLAGS.items()}
    sizes = {k: v if v is not None else DATA_SIZES.get(data, DATA_SIZES["testbed"])[k] for k, v in given.items()}
    return FinetuneConfig(**kw, sizes=sizes, progress=not a.no_progress)
