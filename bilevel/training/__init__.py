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
hyper step (at theta_k, ``solver.hypergrad_at(lin, meta_batch)``) reuses the inner step's ``grad_theta g``
graph, then the inner update follows, which saves one forward and backward pass of ``g`` per hyper step.

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

The package, one room per piece: ``config.py`` (:class:`TrainerConfig`, :class:`NonFiniteError`),
``loop.py`` (:class:`BilevelTrainer`: ``step`` = an inner update and a hyper step, each returning a small
result type, and ``fit``), ``streams.py`` (resumable positions in the data), ``state.py`` (counters,
checkpoint state, the rollback copy), ``metrics.py`` (JSONL / CSV / TensorBoard), ``objectives.py`` (the
baselines' objectives).
"""

from __future__ import annotations

from .config import NonFiniteError, NonFinitePolicy, TrainerConfig
from .loop import BilevelTrainer, Callback, HyperResult, InnerResult
from .objectives import mtl_objective, single_task_objective

__all__ = [
    "BilevelTrainer",
    "Callback",
    "HyperResult",
    "InnerResult",
    "NonFiniteError",
    "NonFinitePolicy",
    "TrainerConfig",
    "mtl_objective",
    "single_task_objective",
]
