"""The trainer's state: counters, what a checkpoint holds, and the copy a failing step rolls back to."""

from __future__ import annotations

import copy
from dataclasses import asdict, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .. import distributed as bdist
from ..checkpoint import FORMAT, rng_state, set_rng_state

if TYPE_CHECKING:
    from .loop import BilevelTrainer

__all__ = ["COUNTERS", "clone_tree", "counters", "set_counters", "load_state", "restore", "snapshot", "state"]

COUNTERS = ("step_count", "epoch", "inner_updates", "hyper_steps", "skipped_inner", "skipped_outer", "_micro")
"""The trainer's counters (attributes), saved in checkpoints under the names of :func:`counters`."""


def clone_tree(obj: Any) -> Any:
    """A deep copy of nested dicts/lists/tuples whose tensors are cloned (faster than copy.deepcopy)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj)
    return copy.copy(obj)


def counters(tr: BilevelTrainer) -> dict[str, int]:
    """``{"step", "epoch", "inner_updates", "hyper_steps", "skipped_inner", "skipped_outer", "micro"}``."""
    return {name.removesuffix("_count").lstrip("_"): int(getattr(tr, name)) for name in COUNTERS}


def set_counters(tr: BilevelTrainer, c: dict[str, Any]) -> None:
    for name in COUNTERS:
        setattr(tr, name, int(c[name.removesuffix("_count").lstrip("_")]))


def snapshot(tr: BilevelTrainer) -> dict[str, Any]:
    """What a step that updates more than once restores when a later part of it fails: the inner model,
    its optimizer and scheduler, the counters and the accumulated gradient."""
    return {
        "model": clone_tree(tr.model.state_dict()),
        "optimizer": clone_tree(tr.optimizer.state_dict()),
        "scheduler": clone_tree(tr.scheduler.state_dict()) if tr.scheduler is not None else None,
        "counters": counters(tr),
        "acc": None if tr._acc is None else [a.clone() for a in tr._acc],
        "warm_v": tr._warm_v,  # never modified in place: a reference suffices
    }


def restore(tr: BilevelTrainer, snap: dict[str, Any]) -> None:
    tr.model.load_state_dict(snap["model"])
    tr.optimizer.load_state_dict(snap["optimizer"])
    if tr.scheduler is not None:
        tr.scheduler.load_state_dict(snap["scheduler"])
    set_counters(tr, snap["counters"])
    tr._acc = snap["acc"]
    tr._warm_v = snap["warm_v"]


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if obj is not None else None


def solver_options(solver: Any) -> dict[str, Any] | None:
    """``{"name": ..., option: value}`` of a dataclass solver (non-primitive values as their repr; the
    StocBiO batch source left out), to be saved with a checkpoint and compared on resume."""
    if solver is None:
        return None
    out: dict[str, Any] = {"name": solver.name}
    for f in fields(solver) if is_dataclass(solver) else ():
        if f.name == "batches":
            continue
        value = getattr(solver, f.name)
        out[f.name] = value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)
    return out


def _changes(saved: dict[str, Any], now: dict[str, Any], what: str) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [
        f"{what}.{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
        for k in keys
        if saved.get(k) != now.get(k)
    ]


def state(tr: BilevelTrainer) -> dict[str, Any]:
    """Everything needed to resume (see :meth:`BilevelTrainer.state_dict`)."""
    own = {"rng": rng_state(), "cursors": {k: c.state_dict() for k, c in tr._cursors.items()}}
    ranks = bdist.all_gather_object(own) if tr.distributed else [own]
    return {
        "format": FORMAT,
        "config": asdict(tr.config),
        "solver": solver_options(tr.solver),
        "counters": counters(tr),
        "model": tr.model.state_dict(),
        "optimizer": tr.optimizer.state_dict(),
        "scheduler": _state_of(tr.scheduler),
        "meta_model": _state_of(tr.meta_model),
        "meta_optimizer": _state_of(tr.meta_optimizer),
        "meta_scheduler": _state_of(tr.meta_scheduler),
        "accumulated": tr._acc,
        "warm_v": tr._warm_v,
        "world_size": len(ranks),
        "ranks": ranks,
    }


KEYS = (
    "counters", "model", "optimizer", "scheduler", "meta_model", "meta_optimizer", "meta_scheduler",
    "accumulated", "ranks",
)  # fmt: skip


def load_state(tr: BilevelTrainer, st: dict[str, Any], allow_changes: bool = False) -> list[str]:
    """Restore :func:`state`; data positions are kept in ``tr._pending`` for the next ``fit``.

    All or nothing: a state with missing keys is refused before anything is touched; so is one written
    with another :class:`TrainerConfig` (``distributed`` aside) or another solver or solver option (each
    changes the trajectory), naming every differing field, unless ``allow_changes``. When a part fails to
    load (e.g. an SGD optimizer state into an Adam optimizer) everything loaded so far is put back as it
    was, then ``ValueError`` names the part. Returns the accepted changes (empty without ``allow_changes``)."""
    missing = [k for k in KEYS if k not in st]
    if missing:
        raise ValueError(f"the checkpoint state lacks {missing}: it was not written by BilevelTrainer.state_dict")
    now = {k: v for k, v in asdict(tr.config).items() if k != "distributed"}
    saved = _config_defaults() | dict(st.get("config") or {})  # fields added since the checkpoint: their defaults
    changes = _changes({k: v for k, v in saved.items() if k != "distributed"}, now, "config")
    if "solver" in st:  # checkpoints of earlier versions did not save the solver
        changes += _changes(st["solver"] or {}, solver_options(tr.solver) or {}, "solver")
    if changes and not allow_changes:
        raise ValueError(
            "the checkpoint was written by another configuration: "
            + "; ".join(changes)
            + " (pass allow_changes=True to resume anyway; the changes are then returned and recorded)"
        )
    # a copy (load_state_dict writes into the live tensors); the all-gather of state() is collective: skipped
    before = clone_tree(state(tr)) if not tr.distributed else None
    pending = tr._pending
    try:
        _load(tr, st)
    except Exception as exc:
        if before is not None:
            _load(tr, before)
            tr._pending = pending
        raise ValueError(
            f"the checkpoint does not fit this trainer ({type(exc).__name__}: {exc}); nothing was changed"
        ) from exc
    return changes


def _config_defaults() -> dict[str, Any]:
    from .config import TrainerConfig

    return {f.name: f.default for f in fields(TrainerConfig)}


def _load(tr: BilevelTrainer, st: dict[str, Any]) -> None:
    world = bdist.world_size() if tr.distributed else 1
    if st.get("world_size", 1) != world:
        raise ValueError(f"checkpoint was written by {st.get('world_size')} rank(s); this run has {world}")
    for key, obj in (("scheduler", tr.scheduler), ("meta_model", tr.meta_model)):
        if (st[key] is None) != (obj is None):
            raise ValueError(f"checkpoint has {key}={'None' if st[key] is None else 'set'} but this trainer differs")
    tr.model.load_state_dict(st["model"])
    tr.optimizer.load_state_dict(st["optimizer"])
    for key in ("scheduler", "meta_model", "meta_optimizer", "meta_scheduler"):
        obj = getattr(tr, key)
        if obj is not None and st[key] is not None:
            obj.load_state_dict(st[key])
    set_counters(tr, st["counters"])
    acc = st["accumulated"]
    tr._acc = None if acc is None else [a.to(p.device) for a, p in zip(acc, tr._params, strict=True)]
    warm, devices = st.get("warm_v"), dict(zip(tr._names, (p.device for p in tr._params), strict=True))
    if warm is not None and sorted(warm) != sorted(devices):
        raise ValueError(f"the checkpoint's warm-start v has keys {sorted(warm)[:3]}..., not the model's parameters")
    tr._warm_v = None if warm is None else {k: v.to(devices[k]) for k, v in warm.items()}
    mine = st["ranks"][bdist.rank() if tr.distributed else 0]
    set_rng_state(mine["rng"])
    tr._pending = mine
