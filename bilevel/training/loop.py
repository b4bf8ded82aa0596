"""The loop: :class:`BilevelTrainer` (an inner update, then a hyper step when one is due) and its ``fit``."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as bdist
from .._checks import check_int
from .._tree import Tree, all_finite
from ..checkpoint import FORMAT, load_checkpoint, save_checkpoint, set_rng_state
from ..problem import BilevelProblem, Objective, check_differentiable
from ..products import Linearization, Reduce, first_order_gradients
from ..solvers import SOLVERS, AIDSolver, HypergradInfo, Solver
from ..solvers.sama import check_sama_optimizer, sama_preconditioner
from . import state as _state
from .config import NonFiniteError, TrainerConfig
from .metrics import MetricsLogger
from .streams import Cursor, Stream

__all__ = ["BilevelTrainer", "Callback", "HyperResult", "InnerResult"]


class Callback:
    """Hooks called by :meth:`BilevelTrainer.fit` (and ``on_step_end`` by :meth:`~BilevelTrainer.step`).
    Subclass and override what you need; set ``trainer.should_stop = True`` to end a fit early."""

    def on_fit_start(self, trainer: BilevelTrainer) -> None: ...

    def on_step_end(self, trainer: BilevelTrainer, metrics: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: BilevelTrainer, epoch: int) -> None: ...

    def on_fit_end(self, trainer: BilevelTrainer) -> None: ...


@dataclass
class InnerResult:
    """One micro-batch of the inner level: its (local) loss; ``grads``, the summed and all-reduced
    gradient when it completes an update; ``skipped`` when that update was dropped (non-finite)."""

    loss: float
    grads: list[Tensor] | None = None
    skipped: bool = False


@dataclass
class HyperResult:
    """One hyper step: ``f``, the hypergradient's norm and the solver's diagnostics; ``skipped`` when the
    hypergradient was non-finite under ``on_nonfinite="skip"``."""

    outer_loss: float | None = None
    hypergrad_norm: float | None = None
    info: HypergradInfo | None = None
    skipped: bool = False


def _grad_norm(tree: Tree) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in tree.values()))


class BilevelTrainer:
    """Algorithm 1 with any solver, ``torch.optim`` optimizers and schedulers on both levels.

    Args:
        model: the inner ``nn.Module`` (theta = its parameters with ``requires_grad``).
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters.
        inner: ``g(params, hparams, batch) -> 0-dim tensor`` (see :mod:`bilevel.training`).
        outer: ``f(params, hparams, batch)``; required with a solver.
        meta_model: the outer ``nn.Module`` (phi; e.g. an ``nn.ParameterDict`` of hyperparameters).
        meta_optimizer: a ``torch.optim`` optimizer over ``meta_model``'s parameters.
        solver: a :class:`~bilevel.Solver` (e.g. ``bl.get_solver("aid-cg", iters=10)``) or None for the
            baselines (no hyper steps; ``meta_model`` may then be None).
        scheduler: LR scheduler stepped after every inner update (or None).
        meta_scheduler: LR scheduler stepped after every hyper step (or None).
        config: a :class:`TrainerConfig`.
        callbacks: :class:`Callback` instances.
        hvp_batches: for solvers that draw fresh HVP batches (:class:`~bilevel.StocBiO`), the iterable
            of inner batches; ``fit`` streams it (resumably) to every hyper step, else the solver's own
            ``batches``, else a second pass over the training loader.

    Counters (attributes, all saved in checkpoints): ``step_count`` (calls of :meth:`step`), ``epoch``,
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
        config = config or TrainerConfig()
        _check_args(model, optimizer, inner, outer, meta_model, meta_optimizer, solver, config)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.meta_model, self.meta_optimizer, self.meta_scheduler = meta_model, meta_optimizer, meta_scheduler
        self.solver, self.config = solver, config
        self.callbacks = list(callbacks)
        self.hvp_batches = hvp_batches
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._sharded = bdist.is_sharded(dict(zip(self._names, self._params, strict=True)))
        if self._sharded and solver is not None:
            solver.check_sharded(bdist.all_reduce_mean if bdist.is_distributed() else None)
        if self._sharded and config.autocast == "fp16":
            raise ValueError("autocast='fp16' (a gradient scaler) is not supported on FSDP-sharded models; use 'bf16'")
        self._meta_named = (
            [(n, p) for n, p in meta_model.named_parameters() if p.requires_grad] if meta_model is not None else []
        )
        opt_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in opt_ids for p in self._params):
            raise ValueError("optimizer does not hold any of model's trainable parameters")
        self.problem = BilevelProblem(inner=inner, outer=outer) if outer is not None else None
        self._g = BilevelProblem(inner=inner, outer=inner).objective("inner", "inner update")
        use_dist = bdist.is_distributed() if config.distributed is None else config.distributed
        if use_dist and not bdist.is_distributed():
            raise RuntimeError("TrainerConfig.distributed=True but no process group with > 1 rank is initialised")
        self.distributed = use_dist
        self.reduce: Reduce | None = bdist.all_reduce_mean if use_dist else None
        if use_dist:
            bdist.broadcast_module(model)
            if meta_model is not None:
                bdist.broadcast_module(meta_model)
        self.step_count = self.epoch = self.inner_updates = self.hyper_steps = 0
        self.skipped_inner = self.skipped_outer = self._micro = 0
        self.should_stop = False
        self._acc: list[Tensor] | None = None  # the open accumulation window's summed gradient
        self._cursors: dict[str, Cursor] = {}  # data positions during fit: "inner", "outer", "hvp"
        self._pending: dict[str, Any] | None = None  # positions and RNG restored by load_state_dict
        self._hvp_stream: Stream | None = None  # fresh HVP batches during fit (solvers that draw them)
        self.resumed_with_changes: list[str] = []  # configuration changes accepted by the last load
        self._warm_v: Tree | None = None  # the last hyper step's v, the next one's v0 (config.warm_start)
        self._applied_grads: Tree | None = None  # the last inner update's gradient (SAMA's preconditioner)
        self._scaler = _grad_scaler(config, self._params[0].device)  # fp16 autocast only

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` with :attr:`TrainerConfig.autocast`'s dtype on the params' device, or nothing."""
        if self.config.autocast is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.autocast == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    # ------------------------------------------------------------------ state
    @property
    def params(self) -> Tree:
        """theta: the model's trainable parameters by name (detached, sharing storage; for a model sharded by
        FSDP2, the live parameters themselves, see :func:`bilevel.distributed.is_sharded`)."""
        if self._sharded:
            return dict(zip(self._names, self._params, strict=True))
        return {n: p.detach() for n, p in zip(self._names, self._params, strict=True)}

    @property
    def hparams(self) -> Tree:
        """phi: the meta model's trainable parameters by name (detached); ``{}`` without a meta model."""
        return {n: p.detach() for n, p in self._meta_named}

    @property
    def device_type(self) -> str:
        return self._params[0].device.type

    def _counters(self) -> dict[str, int]:
        return _state.counters(self)

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
        return _state.state(self)

    def load_state_dict(self, state: dict[str, Any], allow_changes: bool = False) -> list[str]:
        """Restore :meth:`state_dict`; data positions are applied when :meth:`fit` next runs. A state
        written with another :class:`TrainerConfig` or solver is refused, naming every differing field,
        unless ``allow_changes`` (the changes are then returned and kept in ``resumed_with_changes``).
        A state that fails to load leaves the trainer as it was."""
        self.resumed_with_changes = _state.load_state(self, state, allow_changes)
        return self.resumed_with_changes

    def restart_streams(self, *names: str) -> None:
        """Let the next :meth:`fit` start the named data streams afresh instead of at the positions
        restored by :meth:`load_state_dict`.

        ``names``: any of ``"inner"`` (training batches), ``"outer"`` (meta batches) and ``"hvp"``
        (fresh HVP batches). Use it when each :meth:`fit` call is given new iterators, e.g. one
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
        if self._sharded:
            raise NotImplementedError(
                "checkpoints of an FSDP-sharded model: rank 0 does not hold the whole model; save it with "
                "torch.distributed.checkpoint (BilevelTrainer's own checkpoints cover unsharded models)"
            )
        state = self.state_dict()
        if not self.distributed or bdist.rank() == 0:
            save_checkpoint(state, path)
        if self.distributed:
            torch.distributed.barrier()
        return Path(path)

    def load_checkpoint(self, path: str | os.PathLike[str], allow_changes: bool = False) -> list[str]:
        """Load a file written by :meth:`save_checkpoint` (``weights_only=True``; every rank reads it);
        see :meth:`load_state_dict` for ``allow_changes``."""
        return self.load_state_dict(load_checkpoint(path, map_location="cpu", expect_format=FORMAT), allow_changes)

    # ------------------------------------------------------------------ one step
    def step(self, inner_batch: Any, outer_batch: Any = None) -> dict[str, Any]:
        """One training step: an inner micro-batch (an inner update when it completes the
        accumulation window, ``inner_steps`` of them with ``inner_steps > 1``), then a hyper step
        when one is due (:meth:`hyper_due`; ``outer_batch`` is then required). With
        ``share_linearization`` the hyper step comes first, at the same linearisation.

        Returns the step's metrics: ``step``, ``epoch``, ``inner_updates``, ``hyper_steps``,
        ``inner_loss`` (this rank's), ``hyper`` (bool), ``outer_loss`` and ``hypergrad_norm`` (hyper
        steps), ``hypergrad_info`` (a :class:`~bilevel.HypergradInfo`), ``lr``, ``meta_lr``, ``time``
        (seconds), ``skipped`` (None, ``"inner"`` or ``"outer"``).

        Raises:
            NonFiniteError: with ``on_nonfinite="raise"`` (state restored, see :mod:`bilevel.training`).
            ValueError: a hyper step is due and ``outer_batch`` is None.
        """
        start, cfg = time.perf_counter(), self.config
        hyper = self.hyper_due()
        if hyper and outer_batch is None:
            raise ValueError(f"step {self.step_count + 1} is a hyper step and needs an outer_batch")
        completes = self._micro + 1 >= cfg.grad_accumulation
        several = hyper or (completes and cfg.inner_steps > 1)  # a failure may come after an update
        snap = _state.snapshot(self) if several and cfg.on_nonfinite == "raise" and cfg.rollback else None
        if hyper and cfg.share_linearization:
            inner, out = self._shared_step(inner_batch, outer_batch, snap)
        else:
            inner = self._inner_updates(inner_batch, completes, snap)
            out = self._hyper(inner_batch, outer_batch, snap) if hyper and not inner.skipped else None
        self.step_count += 1
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        metrics = self._metrics(inner, out, time.perf_counter() - start)
        for cb in self.callbacks:
            cb.on_step_end(self, metrics)
        return metrics

    def _inner_updates(self, batch: Any, completes: bool, snap: dict[str, Any] | None) -> InnerResult:
        """The micro-batch's gradient, then ``inner_steps`` updates when it completes the window."""
        for _ in range(self.config.inner_steps if completes else 1):
            res = self._gradient(batch, completes, snap)
            if res.skipped:
                return res
            if res.grads is not None:
                self._update(res.grads)
        return res

    def _shared_step(
        self, inner_batch: Any, outer_batch: Any, snap: dict[str, Any] | None
    ) -> tuple[InnerResult, HyperResult | None]:
        """One linearisation at ``theta_k``: its gradient makes the inner update, after the hyper step."""
        lin = self._linearize(inner_batch, snap)
        inner = InnerResult(math.nan, skipped=True) if lin is None else self._gradient(inner_batch, True, snap, lin)
        if inner.skipped:
            return inner, None
        out = self._hyper(inner_batch, outer_batch, snap, lin)
        del lin  # free its first-order graph before the update
        assert inner.grads is not None
        self._update(inner.grads)
        return inner, out

    def _fail(
        self, snap: dict[str, Any] | None, msg: str, level: str, loss: float | None, inner_applied: bool = True
    ) -> NonFiniteError:
        """The error to raise; restores ``snap`` first. ``inner_applied``: an outer failure came after
        this step's inner update (False with ``share_linearization``, whose hyper step comes first)."""
        if snap is not None:
            _state.restore(self, snap)
        changed = snap is None and level == "outer" and inner_applied
        state = "unchanged except the inner update of this step" if changed else "unchanged"
        return NonFiniteError(f"{msg}; models and optimizer states are {state}", self.step_count + 1, level, loss)

    def _gradient(
        self, batch: Any, completes: bool, snap: dict[str, Any] | None, lin: Linearization | None = None
    ) -> InnerResult:
        """One micro-batch's gradient (taken from ``lin`` when given), accumulated; when it completes the
        window, the summed (all-reduced) gradient, unless it is non-finite (raised or skipped)."""
        cfg, step = self.config, self.step_count + 1
        if lin is not None:
            value, grads = float(lin.value), [lin.grad_theta[n] for n in self._names]
        elif self._sharded:  # FSDP: its own gradient path (backward into .grad, restored; see products)
            try:
                with self._autocast():
                    loss_t, g_theta, _ = first_order_gradients(self._g, self.params, self.hparams, batch)
            except FloatingPointError as exc:
                if cfg.on_nonfinite == "raise":
                    raise self._fail(snap, f"step {step}: {exc} (inner level)", "inner", None) from exc
                self._skip_inner()
                return InnerResult(float("nan"), skipped=True)
            value = float(loss_t)
            grads = [g_theta[n] / cfg.grad_accumulation for n in self._names]
        else:
            with self._autocast():
                loss = self._g(dict(zip(self._names, self._params, strict=True)), self.hparams, batch)
            check_differentiable(loss, "inner", "inner update")
            value = float(loss.detach())
            if not math.isfinite(value) and cfg.on_nonfinite == "raise":
                raise self._fail(
                    snap, f"step {step}: inner loss is non-finite ({value}) at the inner level", "inner", value
                )
            scaled = loss if self._scaler is None else self._scaler.scale(loss)
            raw = torch.autograd.grad(scaled / cfg.grad_accumulation, self._params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, self._params, strict=True)]
        acc = grads if self._acc is None else [a + g for a, g in zip(self._acc, grads, strict=True)]
        if not completes:
            self._acc, self._micro = acc, self._micro + 1
            return InnerResult(value)
        total = bdist.all_reduce_mean_tensors(acc) if self.distributed else acc
        if self._scaler is not None or all_finite(total):  # fp16: the scaler skips an overflowing update
            return InnerResult(value, total)
        if cfg.on_nonfinite == "raise":
            raise self._fail(
                snap, f"step {step}: inner gradient is non-finite at the inner level (loss {value})", "inner", value
            )
        self._skip_inner()
        return InnerResult(value, skipped=True)

    def _skip_inner(self) -> None:
        self._acc, self._micro = None, 0
        self.skipped_inner += 1

    def _update(self, total: list[Tensor]) -> None:
        """The inner update with the (summed, all-reduced) gradient ``total``."""
        for p, gr in zip(self._params, total, strict=True):
            p.grad = gr.detach().to(p.dtype)
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self._params, self.config.clip_grad_norm)
        if self.solver is not None and self.solver.takes_preconditioner:  # the gradient Adam applied (SAMA)
            self._applied_grads = {n: p.grad for n, p in zip(self._names, self._params, strict=True)}
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
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
            with self._autocast():
                return self.solver.linearize(self.problem, self.params, self.hparams, batch, self.reduce)  # type: ignore[attr-defined]
        except FloatingPointError as exc:
            if self.config.on_nonfinite == "raise":
                raise self._fail(snap, f"step {self.step_count + 1}: {exc} (inner level)", "inner", None) from exc
            self._skip_inner()
            return None

    def _hypergrad(self, inner_batch: Any, outer_batch: Any, lin: Linearization | None) -> tuple[Tree, HypergradInfo]:
        assert self.solver is not None and self.problem is not None
        warm = {"v0": self._warm_v} if self.config.warm_start and self._warm_v is not None else {}
        if self.solver.takes_preconditioner:
            warm["preconditioner"] = self._preconditioner(lin)
        with self._autocast():
            if lin is not None:
                hvp = self._hvp_stream
                return self.solver.hypergrad_at(lin, outer_batch, return_info=True, hvp_batches=hvp, **warm)  # type: ignore[attr-defined]
            return self.solver.hypergrad(
                self.problem, self.params, self.hparams, inner_batch, outer_batch,
                return_info=True, reduce=self.reduce, hvp_batches=self._hvp_stream, **warm,
            )  # fmt: skip

    def _preconditioner(self, lin: Linearization | None) -> Tree | None:
        """SAMA's diagonal ``P`` (:func:`~bilevel.solvers.sama.sama_preconditioner`) for the inner step next to
        this hyper step: with a shared linearisation the step still to come (its gradient from ``lin``),
        otherwise the step just taken (the gradient it applied, after clipping)."""
        named = dict(zip(self._names, self._params, strict=True))
        if lin is not None:
            grads = {n: lin.grad_theta[n].detach() for n in self._names}
            return sama_preconditioner(self.optimizer, named, grads, applied=False)
        if self._applied_grads is None:
            raise ValueError(
                f"step {self.step_count + 1}: SAMA's preconditioner needs an inner update before the first hyper step"
            )
        return sama_preconditioner(self.optimizer, named, self._applied_grads, applied=True)

    def _hyper(
        self, inner_batch: Any, outer_batch: Any, snap: dict[str, Any] | None, lin: Linearization | None = None
    ) -> HyperResult:
        """The hyper step: the solver's hypergradient written into the meta parameters' ``.grad``, then
        ``meta_optimizer.step()``."""
        assert self.meta_optimizer is not None
        try:
            hg, info = self._hypergrad(inner_batch, outer_batch, lin)
        except FloatingPointError as exc:
            if self.config.on_nonfinite == "raise":
                msg = f"step {self.step_count + 1}: outer level (hyper step): {exc}"
                raise self._fail(snap, msg, "outer", None, inner_applied=lin is None) from exc
            self.skipped_outer += 1
            return HyperResult(skipped=True)
        # keep v for the next hyper step's warm start; otherwise drop it (a tree the size of params)
        self._warm_v, info.v = (info.v, info.v) if self.config.warm_start else (None, None)
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
        return HyperResult(info.outer_value, _grad_norm(hg), info)

    def _metrics(self, inner: InnerResult, out: HyperResult | None, seconds: float) -> dict[str, Any]:
        skipped = "inner" if inner.skipped else "outer" if out is not None and out.skipped else None
        metrics: dict[str, Any] = {"outer_loss": None, "hypergrad_norm": None, "inner_loss": inner.loss}
        if out is not None and not out.skipped:
            metrics.update(outer_loss=out.outer_loss, hypergrad_norm=out.hypergrad_norm, hypergrad_info=out.info)
        metrics.update(
            step=self.step_count,
            epoch=self.epoch,
            inner_updates=self.inner_updates,
            hyper_steps=self.hyper_steps,
            hyper=out is not None and skipped is None,
            lr=self.optimizer.param_groups[0]["lr"],
            meta_lr=self.meta_optimizer.param_groups[0]["lr"] if self.meta_optimizer is not None else None,
            time=seconds,
            skipped=skipped,
        )
        return metrics

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
        _check_fit_args(
            self.solver, outer_loader, epochs, max_steps, checkpoint_path, checkpoint_every, resume, log_every
        )
        if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
            self.load_checkpoint(checkpoint_path)
        main = not self.distributed or bdist.rank() == 0
        logger = MetricsLogger(log_dir, tensorboard) if log_dir is not None and main else None
        self._open_streams(inner_loader, outer_loader)
        self.should_stop = False
        for cb in self.callbacks:
            cb.on_fit_start(self)
        done = lambda: self.should_stop or (max_steps is not None and self.step_count >= max_steps)  # noqa: E731

        def after_step(last: dict[str, Any]) -> None:
            if logger is not None and self.step_count % log_every == 0:
                logger.log({k: v for k, v in last.items() if k != "hypergrad_info"})
            if checkpoint_path is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                if self._micro == 0:
                    self.save_checkpoint(checkpoint_path)

        last: dict[str, Any] = {}
        try:
            while self.epoch < epochs and not done():
                last = self._epoch(inner_loader, epochs, done, after_step, progress and main) or last
            if checkpoint_path is not None:
                self.save_checkpoint(checkpoint_path)
        finally:
            if logger is not None:
                logger.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return last

    def _open_streams(self, inner_loader: Iterable[Any], outer_loader: Iterable[Any] | None) -> None:
        """The resumable data streams of a fit, at the positions a loaded checkpoint restored."""
        self._cursors = {"inner": Cursor(inner_loader, "inner (training)", cycle=False)}
        if outer_loader is not None:
            self._cursors["outer"] = Cursor(outer_loader, "outer (meta)", cycle=True)
        self._hvp_stream = None
        if self.solver is not None and self.solver.draws_hvp_batches:
            own = getattr(self.solver, "batches", None)
            source = next(s for s in (self.hvp_batches, own, inner_loader) if s is not None)
            self._cursors["hvp"] = Cursor(source, f"{self.solver.name} HVP", cycle=True)
            self._hvp_stream = Stream(self._cursors["hvp"])
        if self._pending is not None:
            for key, cur in self._cursors.items():
                if key in self._pending["cursors"]:
                    cur.load_state_dict(self._pending["cursors"][key])
            set_rng_state(self._pending["rng"])
            self._pending = None

    def _epoch(
        self,
        loader: Iterable[Any],
        epochs: int,
        done: Callable[[], bool],
        after_step: Callable[[dict[str, Any]], None],
        progress: bool,
    ) -> dict[str, Any]:
        """Steps until the pass over ``loader`` ends or ``done()``; the epoch ends only with the pass."""
        from tqdm.auto import tqdm

        cursor, last = self._cursors["inner"], {}
        cursor.epoch = self.epoch
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, initial=cursor.index, desc=f"epoch {self.epoch + 1}/{epochs}",
                   disable=not progress, dynamic_ncols=True, leave=False)  # fmt: skip
        with bar:
            while not done():
                try:
                    batch = cursor.next()
                except StopIteration:
                    break
                last = self.step(batch, self._cursors["outer"].next() if self.hyper_due() else None)
                bar.update(1)
                post = {"loss": f"{last['inner_loss']:.4g}", "s/step": f"{last['time']:.3g}"}
                if last["outer_loss"] is not None:
                    post["outer"] = f"{last['outer_loss']:.4g}"
                bar.set_postfix(post, refresh=False)
                after_step(last)
        if not cursor.in_pass:  # the pass ended (not a stop request in mid-epoch)
            for cb in self.callbacks:
                cb.on_epoch_end(self, self.epoch)
            self.epoch += 1
        return last


def _check_fit_args(
    solver, outer_loader, epochs, max_steps, checkpoint_path, checkpoint_every, resume, log_every
) -> None:
    """``fit``'s arguments, checked before any step."""
    if solver is not None and outer_loader is None:
        raise ValueError("fit with a solver needs an outer_loader (meta batches)")
    check_int("fit: epochs", epochs, 0)
    check_int("fit: log_every", log_every, 1)
    for name, value in (("max_steps", max_steps), ("checkpoint_every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"fit: {name} must be None or an int >= 1, got {value!r}")
    if resume and checkpoint_path is None:
        raise ValueError("fit: resume=True needs a checkpoint_path to resume from")
    if checkpoint_path is not None and Path(checkpoint_path).is_dir():
        raise ValueError(f"fit: checkpoint_path {str(checkpoint_path)!r} is a directory; give a file path")


def _grad_scaler(config: TrainerConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """The inner update's ``GradScaler`` for ``autocast="fp16"`` (None otherwise); fp16 needs CUDA."""
    if config.autocast != "fp16":
        return None
    if device.type != "cuda":
        raise ValueError(
            f"TrainerConfig.autocast='fp16' needs the model on a CUDA device (with a GradScaler), got {device.type}; "
            "use autocast='bf16' on CPU"
        )
    return torch.amp.GradScaler("cuda")


def _aid_solver_names() -> list[str]:
    """The registered solvers that take a linearisation (the AID ones), for error messages."""
    return sorted(n for n, cls in SOLVERS.items() if issubclass(cls, AIDSolver))


def _check_args(model, optimizer, inner, outer, meta_model, meta_optimizer, solver, config) -> None:
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
        if config.share_linearization and not callable(getattr(solver, "hypergrad_at", None)):
            raise ValueError(
                f"TrainerConfig.share_linearization needs an AID solver ({', '.join(_aid_solver_names())}), "
                f"got {type(solver).__name__}"
            )
        if solver.takes_preconditioner:
            check_sama_optimizer(optimizer)  # SAMA reads the inner optimizer's state: SGD or Adam / AdamW
        if config.warm_start and not solver.supports_warm_start:
            raise ValueError(
                f"TrainerConfig.warm_start needs a solver with an iterative linear solve to start (aid-cg, aid-fp, "
                f"stocbio, or AID with bilevel.linalg.cg / neumann); {solver.name!r} ({type(solver).__name__}) has none"
            )
    elif config.warm_start:
        raise ValueError("TrainerConfig.warm_start needs a solver (there are no hyper steps without one)")
    if meta_model is not None and not isinstance(meta_model, nn.Module):
        raise TypeError(f"meta_model must be an nn.Module, got {type(meta_model).__name__}")
