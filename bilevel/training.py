"""A generic bilevel training loop (MELTR's Algorithm 1 for any solver), resumable and data-parallel.

    theta: the inner model's trainable parameters (``model``), phi: the meta model's (``meta_model``).

    for each training batch b (and, on hyper steps, a meta batch m):
        theta <- optimizer_step(theta, grad_theta g(theta, phi; b))                    an inner update
        every K = hyper_every inner updates (after warmup_steps of them):
            phi <- meta_optimizer_step(phi, solver.hypergrad(g on b, f on m))       a hyper step

Quick use::

    params, model_fn = bl.functional_module(model)        # same keys as model.named_parameters()
    hparams, meta_fn = bl.functional_module(meta)
    def g(p, h, batch): return meta_fn(h, task_losses(model_fn(p, batch), batch))
    def f(p, h, batch): return primary_loss(model_fn(p, batch), batch)
    trainer = bl.BilevelTrainer(model, torch.optim.AdamW(model.parameters()), inner=g, outer=f,
                                meta_model=meta, meta_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                                solver=bl.get_solver("aid-fp-lite"), config=bl.TrainerConfig(hyper_every=3))
    metrics = trainer.step(inner_batch, outer_batch)       # one step from your own loop, or:
    trainer.fit(train_loader, meta_loader, epochs=3, checkpoint_path="run/ckpt.pt", log_dir="run")

With an AID solver, ``TrainerConfig(share_linearization=True)`` linearises ``g`` once on hyper steps: the
hyper step (at theta_k) reuses the inner step's ``grad_theta g`` graph, then the inner update follows,
which saves one forward and backward pass of ``g`` per hyper step.

Baselines in the same loop (no meta model, no solver, so timings compare like with like):
:func:`single_task_objective` (a primary loss only) and :func:`mtl_objective` (a fixed linear sum).

The objectives are called as ``g(params, hparams, batch)`` with ``params`` the model's trainable
parameters by name (live ``nn.Parameter`` s in the inner update, detached tensors in the solver) and
``hparams`` the meta model's (always detached in the inner update; ``{}`` without a meta model).
The solver only returns the hypergradient; the trainer writes it into the meta parameters' ``.grad``
and calls ``meta_optimizer.step()``.

Non-finite values (``TrainerConfig.on_nonfinite``):
    ``"raise"`` (default): :class:`NonFiniteError` naming the step, the level (inner/outer) and the
    loss. The models, optimizers, schedulers and counters are left exactly as before the step (on
    steps that update more than once, e.g. a hyper step after an inner update, a copy of the inner
    model and optimizer state is taken first; ``rollback=False`` saves that copy and leaves the inner
    update of the failing step applied).
    ``"skip"``: the update of the failing level is dropped (the whole gradient-accumulation window
    for the inner level, which also cancels the hyper step of that step); ``skipped_inner`` /
    ``skipped_outer`` count them.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import distributed as bdist
from ._tree import Tree
from .checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .problem import BilevelProblem, Objective
from .products import Linearization, Reduce
from .solvers import Solver

__all__ = [
    "BilevelTrainer",
    "Callback",
    "NonFiniteError",
    "TrainerConfig",
    "mtl_objective",
    "single_task_objective",
]

Policy = Literal["raise", "skip"]
_CSV_COLUMNS = (
    "step",
    "epoch",
    "inner_updates",
    "hyper_steps",
    "inner_loss",
    "outer_loss",
    "hypergrad_norm",
    "lr",
    "meta_lr",
    "time",
    "skipped",
)


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or hypergradient met by :meth:`BilevelTrainer.step` with
    ``on_nonfinite="raise"``. Attributes: ``step`` (1-based index of the failing step), ``level``
    (``"inner"`` or ``"outer"``), ``loss`` (the loss value, or None where unknown)."""

    def __init__(self, message: str, step: int, level: str, loss: float | None):
        super().__init__(message)
        self.step, self.level, self.loss = step, level, loss


@dataclass
class TrainerConfig:
    """Options of :class:`BilevelTrainer`.

    Attributes:
        hyper_every: K, a hyper step after every K-th inner update (Algorithm 1; MELTR: 3 or 5).
        inner_steps: inner updates per :meth:`~BilevelTrainer.step` on the same inner batch
            (requires ``grad_accumulation == 1``).
        grad_accumulation: micro-batches (``step`` calls) whose inner gradients are summed (each loss
            divided by this number) before one inner update; hyper steps use the batches of the call
            that completes the window.
        warmup_steps: inner updates before the first hyper step (the first one happens at the first
            multiple of ``hyper_every`` strictly greater than ``warmup_steps``).
        clip_grad_norm / meta_clip_grad_norm: max global 2-norm of the inner gradient / hypergradient
            (``torch.nn.utils.clip_grad_norm_``), None for no clipping.
        on_nonfinite: ``"raise"`` or ``"skip"`` (see the module docstring).
        rollback: with ``"raise"``, restore the inner model and optimizer when a later part of a step
            fails (costs a copy of the inner model and optimizer state on such steps).
        distributed: average inner gradients and reduce hypergradients over the ranks of the
            default process group; None (default) = when one with more than one rank is initialised.
        share_linearization: on hyper steps, linearise ``g`` once at ``(theta_k, phi)`` on the inner
            batch (:class:`~bilevel.products.Linearization`): its ``grad_theta g`` makes the inner
            update and its graph serves the AID solver, which saves one forward and backward pass of
            ``g`` per hyper step. The hyper step then comes *before* that step's inner update (at
            ``theta_k`` instead of ``theta_{k+1}``); other steps are unchanged. Needs an AID solver
            (not ITD), ``inner_steps == 1`` and ``grad_accumulation == 1``.
    """

    hyper_every: int = 1
    inner_steps: int = 1
    grad_accumulation: int = 1
    warmup_steps: int = 0
    clip_grad_norm: float | None = None
    meta_clip_grad_norm: float | None = None
    on_nonfinite: Policy = "raise"
    rollback: bool = True
    distributed: bool | None = None
    share_linearization: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("hyper_every", 1), ("inner_steps", 1), ("grad_accumulation", 1), ("warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainerConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.inner_steps > 1 and self.grad_accumulation > 1:
            raise ValueError("TrainerConfig: inner_steps > 1 and grad_accumulation > 1 cannot be combined")
        for name in ("clip_grad_norm", "meta_clip_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ValueError(f"TrainerConfig.{name} must be None or a finite number > 0, got {value!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"TrainerConfig.on_nonfinite must be 'raise' or 'skip', got {self.on_nonfinite!r}")
        if self.share_linearization and (self.inner_steps > 1 or self.grad_accumulation > 1):
            raise ValueError(
                "TrainerConfig.share_linearization needs inner_steps == 1 and grad_accumulation == 1: the shared "
                "linearisation is the gradient of one inner update on one batch"
            )


class Callback:
    """Hooks called by :meth:`BilevelTrainer.fit` (and ``on_step_end`` by :meth:`~BilevelTrainer.step`).
    Subclass and override what you need; set ``trainer.should_stop = True`` to end a fit early."""

    def on_fit_start(self, trainer: BilevelTrainer) -> None: ...

    def on_step_end(self, trainer: BilevelTrainer, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: BilevelTrainer, epoch: int) -> None: ...

    def on_fit_end(self, trainer: BilevelTrainer) -> None: ...


def single_task_objective(primary: Callable[[Tree, Any], Tensor]) -> Objective:
    """The single-task baseline's inner objective ``g(params, hparams, batch) = primary(params, batch)``."""

    def g(params: Tree, hparams: Tree, batch: Any) -> Tensor:
        return primary(params, batch)

    return g


def mtl_objective(losses: Callable[[Tree, Any], Tensor], weights: Tensor | list[float] | None = None) -> Objective:
    """The multi-task baseline ``g = sum_t w_t L_t(params, batch)``; ``losses`` returns the vector ``(T,)``
    of task losses; ``weights`` default to ones."""
    w = None if weights is None else torch.as_tensor(weights)

    def g(params: Tree, hparams: Tree, batch: Any) -> Tensor:
        vec = losses(params, batch)
        if vec.dim() != 1:
            raise ValueError(f"mtl_objective: losses must return a 1-D tensor of task losses, got {tuple(vec.shape)}")
        if w is None:
            return vec.sum()
        if w.shape != vec.shape:
            raise ValueError(f"mtl_objective: {w.numel()} weights for {vec.numel()} losses")
        return (w.to(vec) * vec).sum()

    return g


class _Cursor:
    """A resumable position in an iterable of batches: (epoch, batches consumed, RNG state when the
    epoch's iterator was created). Resuming re-creates the iterator under that RNG state and skips
    the consumed batches, so a shuffling ``DataLoader`` yields the same remaining batches."""

    def __init__(self, iterable: Iterable[Any], name: str, cycle: bool):
        self.iterable, self.name, self.cycle = iterable, name, cycle
        self.epoch, self.index = 0, 0
        self._it: Iterator[Any] | None = None
        self._rng: dict[str, Any] | None = None

    def _start(self) -> None:
        sampler = getattr(self.iterable, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # type: ignore[union-attr]
        self._rng = rng_state()
        self._it = iter(self.iterable)
        self.index = 0

    def next(self) -> Any:
        for _ in range(2):
            if self._it is None:
                self._start()
            try:
                batch = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                empty = self.index == 0
                self._it, self.epoch = None, self.epoch + 1
                if empty:
                    raise ValueError(f"the {self.name} data is empty") from None
                if not self.cycle:
                    raise
                continue
            self.index += 1
            return batch
        raise AssertionError("unreachable")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "rng": self._rng if self._it is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._it, self._rng = int(state["epoch"]), 0, None, None
        if state["rng"] is not None:
            set_rng_state(state["rng"])
            self._start()
            for _ in range(int(state["index"])):
                next(self._it)  # type: ignore[arg-type]
            self.index = int(state["index"])


class _Stream:
    """An endless iterator over a cursor (``StocBiO.batches``)."""

    def __init__(self, cursor: _Cursor):
        self.cursor = cursor

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        return self.cursor.next()


class _Logger:
    """Metrics to ``log_dir/metrics.jsonl``, ``log_dir/metrics.csv`` and TensorBoard (``log_dir/tb``)
    when :mod:`torch.utils.tensorboard` is importable. Files are appended to (resume-friendly)."""

    def __init__(self, log_dir: str | os.PathLike[str], tensorboard: bool | None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
        csv_path = self.dir / "metrics.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_fh = open(csv_path, "a", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_fh, fieldnames=_CSV_COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ImportError("tensorboard=True but the tensorboard package is not installed") from None
            else:
                self._tb = SummaryWriter(str(self.dir / "tb"))

    def log(self, metrics: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(metrics) + "\n")
        self._csv.writerow(metrics)
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, metrics["step"])

    def flush(self) -> None:
        self._jsonl.flush()
        self._csv_fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        self._jsonl.close()
        self._csv_fh.close()
        if self._tb is not None:
            self._tb.close()


def _clone(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are cloned (faster than copy.deepcopy)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.copy(obj)


def _finite(tensors: Iterable[Tensor]) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack(flags).all()) if flags else True


class BilevelTrainer:
    """Algorithm 1 with any solver, ``torch.optim`` optimizers and schedulers on both levels.

    Args:
        model: the inner ``nn.Module`` (theta = its parameters with ``requires_grad``).
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters.
        inner: ``g(params, hparams, batch) -> 0-dim tensor`` (see the module docstring).
        outer: ``f(params, hparams, batch)``; required with a solver.
        meta_model: the outer ``nn.Module`` (phi; e.g. an ``nn.ParameterDict`` of hyperparameters).
        meta_optimizer: a ``torch.optim`` optimizer over ``meta_model``'s parameters.
        solver: a :class:`~bilevel.Solver` (e.g. ``bl.get_solver("aid-cg", iters=10)``) or None for the
            baselines (no hyper steps; ``meta_model`` may then be None).
        scheduler: LR scheduler stepped after every inner update (or None).
        meta_scheduler: LR scheduler stepped after every hyper step (or None).
        config: a :class:`TrainerConfig`.
        callbacks: :class:`Callback` instances.
        hvp_batches: for :class:`~bilevel.StocBiO`, the iterable of fresh inner batches; ``fit`` uses a
            second pass over the training loader when neither this nor ``solver.batches`` is set.

    Counters (attributes, all saved in checkpoints): ``step`` (calls of :meth:`step`), ``epoch``,
    ``inner_updates``, ``hyper_steps``, ``skipped_inner``, ``skipped_outer``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        inner: Objective,
        *,
        outer: Objective | None = None,
        meta_model: nn.Module | None = None,
        meta_optimizer: torch.optim.Optimizer | None = None,
        solver: Solver | None = None,
        scheduler: Any = None,
        meta_scheduler: Any = None,
        config: TrainerConfig | None = None,
        callbacks: Iterable[Callback] = (),
        hvp_batches: Iterable[Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(inner):
            raise TypeError("inner must be callable: g(params, hparams, batch) -> 0-dim tensor")
        if solver is not None:
            if not isinstance(solver, Solver):
                raise TypeError(f"solver must be a bilevel Solver (bl.get_solver(...)), got {type(solver).__name__}")
            if outer is None or meta_model is None or meta_optimizer is None:
                raise ValueError("a solver needs outer=, meta_model= and meta_optimizer=")
            if (config or TrainerConfig()).share_linearization and not callable(getattr(solver, "hypergrad_at", None)):
                raise ValueError(
                    f"TrainerConfig.share_linearization needs an AID solver (aid-cg, aid-fp, aid-fp-lite, stocbio), "
                    f"got {type(solver).__name__}"
                )
        if meta_model is not None and not isinstance(meta_model, nn.Module):
            raise TypeError(f"meta_model must be an nn.Module, got {type(meta_model).__name__}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.meta_model, self.meta_optimizer, self.meta_scheduler = meta_model, meta_optimizer, meta_scheduler
        self.solver, self.config = solver, config or TrainerConfig()
        self.callbacks = list(callbacks)
        self.hvp_batches = hvp_batches
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._meta_named = (
            [(n, p) for n, p in meta_model.named_parameters() if p.requires_grad] if meta_model is not None else []
        )
        opt_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in opt_ids for p in self._params):
            raise ValueError("optimizer does not hold any of model's trainable parameters")
        self.problem = BilevelProblem(inner=inner, outer=outer) if outer is not None else None
        self._g = BilevelProblem(inner=inner, outer=inner).objective("inner", "inner update")
        use_dist = bdist.is_distributed() if self.config.distributed is None else self.config.distributed
        if use_dist and not bdist.is_distributed():
            raise RuntimeError("TrainerConfig.distributed=True but no process group with > 1 rank is initialised")
        self.distributed = use_dist
        self.reduce: Reduce | None = bdist.all_reduce_mean if use_dist else None
        if use_dist:
            bdist.broadcast_module(model)
            if meta_model is not None:
                bdist.broadcast_module(meta_model)
        self.step_count = 0
        self.epoch = 0
        self.inner_updates = 0
        self.hyper_steps = 0
        self.skipped_inner = 0
        self.skipped_outer = 0
        self.should_stop = False
        self._micro = 0
        self._acc: list[Tensor] | None = None
        self._cursors: dict[str, _Cursor] = {}
        self._pending: dict[str, Any] | None = None
        self._hvp_stream: _Stream | None = None  # fresh HVP batches during fit (solvers that draw them)

    # ------------------------------------------------------------------ state
    @property
    def params(self) -> Tree:
        """theta: the model's trainable parameters by name (detached, sharing storage)."""
        return {n: p.detach() for n, p in zip(self._names, self._params, strict=True)}

    @property
    def hparams(self) -> Tree:
        """phi: the meta model's trainable parameters by name (detached); ``{}`` without a meta model."""
        return {n: p.detach() for n, p in self._meta_named}

    def _counters(self) -> dict[str, int]:
        return {
            "step": self.step_count,
            "epoch": self.epoch,
            "inner_updates": self.inner_updates,
            "hyper_steps": self.hyper_steps,
            "skipped_inner": self.skipped_inner,
            "skipped_outer": self.skipped_outer,
            "micro": self._micro,
        }

    def _set_counters(self, c: dict[str, int]) -> None:
        self.step_count, self.epoch = int(c["step"]), int(c["epoch"])
        self.inner_updates, self.hyper_steps = int(c["inner_updates"]), int(c["hyper_steps"])
        self.skipped_inner, self.skipped_outer, self._micro = (
            int(c["skipped_inner"]),
            int(c["skipped_outer"]),
            int(c["micro"]),
        )

    def hyper_due(self) -> bool:
        """Whether the next :meth:`step` ends with a hyper step (if nothing is skipped)."""
        if self.solver is None or self._micro + 1 < self.config.grad_accumulation:
            return False
        k, before = self.config.hyper_every, self.inner_updates
        after = before + self.config.inner_steps
        return after // k > before // k and after > self.config.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: both models, optimizers and schedulers, the counters, the
        pending accumulated gradient, and per rank the RNG states and data positions."""
        own = {"rng": rng_state(), "cursors": {k: c.state_dict() for k, c in self._cursors.items()}}
        ranks = bdist.all_gather_object(own) if self.distributed else [own]
        return {
            "format": FORMAT,
            "config": asdict(self.config),
            "counters": self._counters(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "meta_model": self.meta_model.state_dict() if self.meta_model is not None else None,
            "meta_optimizer": self.meta_optimizer.state_dict() if self.meta_optimizer is not None else None,
            "meta_scheduler": self.meta_scheduler.state_dict() if self.meta_scheduler is not None else None,
            "accumulated": self._acc,
            "world_size": len(ranks),
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Data positions are applied when :meth:`fit` next runs."""
        world = bdist.world_size() if self.distributed else 1
        if state.get("world_size", 1) != world:
            raise ValueError(f"checkpoint was written by {state.get('world_size')} rank(s); this run has {world}")
        for key, obj in (("scheduler", self.scheduler), ("meta_model", self.meta_model)):
            if (state[key] is None) != (obj is None):
                raise ValueError(
                    f"checkpoint has {key}={'None' if state[key] is None else 'set'} but this trainer differs"
                )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.meta_model is not None:
            self.meta_model.load_state_dict(state["meta_model"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if self.meta_scheduler is not None and state["meta_scheduler"] is not None:
            self.meta_scheduler.load_state_dict(state["meta_scheduler"])
        self._set_counters(state["counters"])
        acc = state["accumulated"]
        self._acc = None if acc is None else [a.to(p.device) for a, p in zip(acc, self._params, strict=True)]
        mine = state["ranks"][bdist.rank() if self.distributed else 0]
        set_rng_state(mine["rng"])
        self._pending = mine

    def restart_streams(self, *names: str) -> None:
        """Let the next :meth:`fit` start the named data streams afresh instead of at the positions
        restored by :meth:`load_state_dict`.

        ``names``: any of ``"inner"`` (training batches), ``"outer"`` (meta batches) and ``"hvp"``
        (StocBiO's HVP batches). Use it when each :meth:`fit` call is given new iterators, e.g. one
        ``fit`` per epoch with loaders that are re-created (their positions would not apply). A no-op
        for streams without a restored position; ``ValueError`` for an unknown name.
        """
        unknown = [n for n in names if n not in ("inner", "outer", "hvp")]
        if unknown:
            raise ValueError(f"unknown stream(s) {unknown}; streams are 'inner', 'outer' and 'hvp'")
        if self._pending is not None:
            for n in names:
                self._pending["cursors"].pop(n, None)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Save :meth:`state_dict` atomically to ``path`` (rank 0 writes; a collective call in distributed runs)."""
        state = self.state_dict()
        if not self.distributed or bdist.rank() == 0:
            save_checkpoint(state, path)
        if self.distributed:
            torch.distributed.barrier()
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Load a file written by :meth:`save_checkpoint` (``weights_only=True``; every rank reads it)."""
        self.load_state_dict(load_checkpoint(path, map_location="cpu", expect_format=FORMAT))

    # ------------------------------------------------------------------ one step
    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": _clone(self.model.state_dict()),
            "optimizer": _clone(self.optimizer.state_dict()),
            "scheduler": _clone(self.scheduler.state_dict()) if self.scheduler is not None else None,
            "counters": self._counters(),
            "acc": None if self._acc is None else [a.clone() for a in self._acc],
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(snap["scheduler"])
        self._set_counters(snap["counters"])
        self._acc = snap["acc"]

    def _fail(
        self, snap: dict[str, Any] | None, msg: str, level: str, loss: float | None, inner_applied: bool = True
    ) -> NonFiniteError:
        """The error to raise; restores ``snap`` first. ``inner_applied``: an outer failure came after
        this step's inner update (False with ``share_linearization``, whose hyper step comes first)."""
        if snap is not None:
            self._restore(snap)
        changed = snap is None and level == "outer" and inner_applied
        state = "unchanged except the inner update of this step" if changed else "unchanged"
        return NonFiniteError(f"{msg}; models and optimizer states are {state}", self.step_count + 1, level, loss)

    def _inner(
        self, batch: Any, completes: bool, snap: dict[str, Any] | None, lin: Linearization | None = None
    ) -> tuple[float, list[Tensor] | None]:
        """One micro-batch's gradient (taken from ``lin`` when given), accumulated. Returns the local
        loss value and, when ``completes`` and the summed (all-reduced) gradient is finite, that
        gradient for :meth:`_update`; None otherwise (accumulating, or a skipped update)."""
        cfg, step = self.config, self.step_count + 1
        if lin is not None:
            value = float(lin.value)
            grads = [lin.grad_theta[n] for n in self._names]
        else:
            named = dict(zip(self._names, self._params, strict=True))
            loss = self._g(named, self.hparams, batch)
            value = float(loss.detach())
            if not math.isfinite(value) and cfg.on_nonfinite == "raise":
                raise self._fail(
                    snap, f"step {step}: inner loss is non-finite ({value}) at the inner level", "inner", value
                )
            grads = torch.autograd.grad(loss / cfg.grad_accumulation, self._params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self._params, strict=True)]
        acc = grads if self._acc is None else [a + g for a, g in zip(self._acc, grads, strict=True)]
        if not completes:
            self._acc, self._micro = acc, self._micro + 1
            return value, None
        total = bdist.all_reduce_mean_tensors(acc) if self.distributed else acc
        if not _finite(total):
            if cfg.on_nonfinite == "raise":
                raise self._fail(
                    snap, f"step {step}: inner gradient is non-finite at the inner level (loss {value})", "inner", value
                )
            self._skip_inner()
            return value, None
        return value, total

    def _skip_inner(self) -> None:
        self._acc, self._micro = None, 0
        self.skipped_inner += 1

    def _update(self, total: list[Tensor]) -> None:
        """The inner update with the (summed, all-reduced) gradient ``total``."""
        for p, gr in zip(self._params, total, strict=True):
            p.grad = gr.detach().to(p.dtype)
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._params, self.config.clip_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        for p in self._params:
            p.grad = None
        self._acc, self._micro = None, 0
        self.inner_updates += 1

    def _linearize(self, batch: Any, snap: dict[str, Any] | None) -> Linearization | None:
        """``g`` linearised at the current ``(theta, phi)`` for ``share_linearization``; None when ``g``
        is non-finite under ``on_nonfinite="skip"`` (the step's inner update is then skipped)."""
        assert self.problem is not None and self.solver is not None
        try:
            return Linearization(self.problem, self.params, self.hparams, batch, self.solver.hvp, self.reduce)  # type: ignore[attr-defined]
        except FloatingPointError as exc:
            if self.config.on_nonfinite == "raise":
                raise self._fail(snap, f"step {self.step_count + 1}: {exc} (inner level)", "inner", None) from exc
            self._skip_inner()
            return None

    def _hyper(
        self, inner_batch: Any, outer_batch: Any, snap: dict[str, Any] | None, lin: Linearization | None = None
    ) -> dict[str, Any]:
        assert self.solver is not None and self.problem is not None and self.meta_optimizer is not None
        step = self.step_count + 1
        try:
            if lin is not None:
                hg, info = self.solver.hypergrad_at(  # type: ignore[attr-defined]
                    lin, outer_batch, return_info=True, hvp_batches=self._hvp_stream
                )
            else:
                hg, info = self.solver.hypergrad(
                    self.problem, self.params, self.hparams, inner_batch, outer_batch,
                    return_info=True, reduce=self.reduce, hvp_batches=self._hvp_stream,
                )  # fmt: skip
        except FloatingPointError as exc:
            if self.config.on_nonfinite == "raise":
                msg = f"step {step}: outer level (hyper step): {exc}"
                raise self._fail(snap, msg, "outer", None, inner_applied=lin is None) from exc
            self.skipped_outer += 1
            return {"skipped": "outer"}
        norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in hg.values()))
        for n, p in self._meta_named:
            p.grad = hg[n].to(p.dtype).clone()
        if self.config.meta_clip_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for _, p in self._meta_named], self.config.meta_clip_grad_norm)
        self.meta_optimizer.step()
        if self.meta_scheduler is not None:
            self.meta_scheduler.step()
        for _, p in self._meta_named:
            p.grad = None
        self.hyper_steps += 1
        return {"outer_loss": info.outer_value, "hypergrad_norm": norm, "hypergrad_info": info}

    def step(self, inner_batch: Any, outer_batch: Any = None) -> dict[str, Any]:
        """One training step: an inner micro-batch (an inner update when it completes the
        accumulation window, ``inner_steps`` of them with ``inner_steps > 1``), then a hyper step
        when one is due (:meth:`hyper_due`; ``outer_batch`` is then required).

        Returns the step's metrics: ``step``, ``epoch``, ``inner_updates``, ``hyper_steps``,
        ``inner_loss`` (this rank's), ``hyper`` (bool), ``outer_loss`` and ``hypergrad_norm`` (hyper
        steps), ``hypergrad_info`` (a :class:`~bilevel.HypergradInfo`), ``lr``, ``meta_lr``, ``time``
        (seconds), ``skipped`` (None, ``"inner"`` or ``"outer"``).

        Raises:
            NonFiniteError: with ``on_nonfinite="raise"`` (state restored, see the module docstring).
            ValueError: a hyper step is due and ``outer_batch`` is None.
        """
        start = time.perf_counter()
        cfg = self.config
        hyper = self.hyper_due()
        if hyper and outer_batch is None:
            raise ValueError(f"step {self.step_count + 1} is a hyper step and needs an outer_batch")
        completes = self._micro + 1 >= cfg.grad_accumulation
        multi = hyper or (completes and cfg.inner_steps > 1)
        snap = self._snapshot() if multi and cfg.on_nonfinite == "raise" and cfg.rollback else None
        skipped: str | None = None
        metrics: dict[str, Any] = {"outer_loss": None, "hypergrad_norm": None}
        if hyper and cfg.share_linearization:  # one linearisation: hyper step, then the inner update
            lin = self._linearize(inner_batch, snap)
            value, total = (float("nan"), None) if lin is None else self._inner(inner_batch, completes, snap, lin)
            metrics["inner_loss"] = value
            if total is None:
                skipped, hyper = "inner", False
            else:
                out = self._hyper(inner_batch, outer_batch, snap, lin)
                del lin  # free its first-order graph before the update
                skipped = out.pop("skipped", None)
                metrics.update(out)
                self._update(total)
        else:
            for _ in range(cfg.inner_steps if completes else 1):
                value, total = self._inner(inner_batch, completes, snap)
                metrics["inner_loss"] = value
                if total is not None:
                    self._update(total)
                elif completes:
                    skipped, hyper = "inner", False
                    break
            if hyper:
                out = self._hyper(inner_batch, outer_batch, snap)
                skipped = out.pop("skipped", None)
                metrics.update(out)
        self.step_count += 1
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        metrics.update(
            step=self.step_count,
            epoch=self.epoch,
            inner_updates=self.inner_updates,
            hyper_steps=self.hyper_steps,
            hyper=hyper and skipped is None,
            lr=self.optimizer.param_groups[0]["lr"],
            meta_lr=self.meta_optimizer.param_groups[0]["lr"] if self.meta_optimizer is not None else None,
            time=time.perf_counter() - start,
            skipped=skipped,
        )
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)
        return metrics

    @property
    def device_type(self) -> str:
        return self._params[0].device.type

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        inner_loader: Iterable[Any],
        outer_loader: Iterable[Any] | None = None,
        *,
        epochs: int = 1,
        max_steps: int | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        resume: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
        log_every: int = 1,
        tensorboard: bool | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Train for ``epochs`` passes over ``inner_loader`` (or until ``max_steps`` steps in all).

        Args:
            inner_loader: iterable of inner (training) batches; a sampler with ``set_epoch`` (e.g.
                ``DistributedSampler``) gets the epoch number before each pass.
            outer_loader: iterable of outer (meta) batches, cycled; one is drawn per hyper step only.
                Required with a solver.
            epochs: passes over ``inner_loader``; training stops at ``epochs`` or ``max_steps``,
                whichever comes first (counted from the run's start, so a resumed run stops where the
                uninterrupted one would).
            max_steps: the maximum number of :meth:`step` calls in all (None: no limit).
            checkpoint_path: file for :meth:`save_checkpoint`, written every ``checkpoint_every``
                steps (at the end of an accumulation window) and at the end.
            checkpoint_every: steps between checkpoints (None: only at the end).
            resume: load ``checkpoint_path`` first when it exists.
            log_dir: write metrics (every ``log_every`` steps) to JSONL, CSV and TensorBoard (when
                installed; ``tensorboard=True`` requires it, ``False`` disables it). Rank 0 only.
            progress: show a tqdm bar per epoch (rank 0 only).

        Returns:
            the metrics of the last step (empty when no step ran).
        """
        from tqdm.auto import tqdm

        if self.solver is not None and outer_loader is None:
            raise ValueError("fit with a solver needs an outer_loader (meta batches)")
        if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
            self.load_checkpoint(checkpoint_path)
        main = not self.distributed or bdist.rank() == 0
        logger = _Logger(log_dir, tensorboard) if log_dir is not None and main else None
        self._cursors = {"inner": _Cursor(inner_loader, "inner (training)", cycle=False)}
        if outer_loader is not None:
            self._cursors["outer"] = _Cursor(outer_loader, "outer (meta)", cycle=True)
        if self.solver is not None and self.solver.draws_hvp_batches:
            own = getattr(self.solver, "batches", None)
            source = next(s for s in (self.hvp_batches, own, inner_loader) if s is not None)
            self._cursors["hvp"] = _Cursor(source, f"{self.solver.name} HVP", cycle=True)
            self._hvp_stream = _Stream(self._cursors["hvp"])
        if self._pending is not None:
            for key, cur in self._cursors.items():
                if key in self._pending["cursors"]:
                    cur.load_state_dict(self._pending["cursors"][key])
            set_rng_state(self._pending["rng"])
            self._pending = None
        self.should_stop = False
        for cb in self.callbacks:
            cb.on_fit_start(self)
        last: dict[str, Any] = {}
        done = lambda: self.should_stop or (max_steps is not None and self.step_count >= max_steps)  # noqa: E731
        cursor = self._cursors["inner"]
        try:
            while self.epoch < epochs and not done():
                cursor.epoch = self.epoch
                total = len(inner_loader) if hasattr(inner_loader, "__len__") else None  # type: ignore[arg-type]
                bar = tqdm(total=total, initial=cursor.index, desc=f"epoch {self.epoch + 1}/{epochs}",
                           disable=not (progress and main), dynamic_ncols=True, leave=False)  # fmt: skip
                with bar:
                    while not done():
                        try:
                            batch = cursor.next()
                        except StopIteration:
                            break
                        outer = self._cursors["outer"].next() if self.hyper_due() else None
                        last = self.step(batch, outer)
                        bar.update(1)
                        post = {"loss": f"{last['inner_loss']:.4g}", "s/step": f"{last['time']:.3g}"}
                        if last["outer_loss"] is not None:
                            post["outer"] = f"{last['outer_loss']:.4g}"
                        bar.set_postfix(post, refresh=False)
                        if logger is not None and self.step_count % log_every == 0:
                            logger.log({k: v for k, v in last.items() if k != "hypergrad_info"})
                        if (
                            checkpoint_path is not None
                            and checkpoint_every
                            and self.step_count % checkpoint_every == 0
                            and self._micro == 0
                        ):
                            self.save_checkpoint(checkpoint_path)
                if cursor._it is None:  # the pass ended (not a stop request in mid-epoch)
                    for cb in self.callbacks:
                        cb.on_epoch_end(self, self.epoch)
                    self.epoch += 1
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
        finally:
            if logger is not None:
                logger.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return last
