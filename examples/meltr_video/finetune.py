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
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import bilevel as bl
from bilevel.checkpoint import atomic_write, save_checkpoint

from ._util import num_threads
from .config import (  # noqa: F401 (re-exported: the run's settings live in config.py)
    AID_SOLVERS,
    BACKBONE_LOSSES,
    BACKBONES,
    DATA,
    DATA_SIZES,
    DEFAULT_PRETRAINED,
    MAX_WORDS,
    MELTR_SIZES,
    META_BATCH,
    METHODS,
    SHIPPED_CHECKPOINT,
    SOLVERS,
    TASKS,
    FinetuneConfig,
    add_arguments,
    config_from_args,
    default_pretrained,
    make_solver,
    parse_weights,
)
from .data import DigitSplits, Tokenizer
from .evaluate import caption_eval, retrieval_eval
from .meltr import MELTR, MELTRObjectives, loss_gradient, response_curve
from .qa import QAModel, qa_accuracy
from .sources import collate_for, data_generators, example_sets, fine_tuning_data, make_loaders, read_pretrained
from .univl import UniVL, UniVLConfig
from .violet import Violet, VioletConfig

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
        state, ucfg, tok = pretrained if pretrained is not None else read_pretrained(cfg)
        self.tok = tok
        self.data = fine_tuning_data(cfg, tok, data)
        # the data the loaders and the evaluation see: the clips, or questions on them (QA tasks)
        self.sets: dict[str, Any] = example_sets(cfg, self.data)
        kind = cfg.qa_kind
        torch.manual_seed(cfg.seed)
        self.backbone = _build_backbone(cfg, ucfg, tok)
        self.backbone.load_state_dict(state)
        # the module trained: the backbone, or the backbone with an answer head (QA)
        self.model: nn.Module = QAModel(self.backbone, kind) if kind else self.backbone
        names = tuple(self.model.loss_names) if kind else BACKBONE_LOSSES[cfg.backbone]
        sizes = MELTR_SIZES[cfg.backbone]
        self.meltr = MELTR(names, **sizes) if cfg.method == "meltr" else None
        self.obj = MELTRObjectives(self.model, self.meltr or MELTR(names, **sizes), cfg.primary, cfg.gamma)
        self.gens = data_generators(cfg.seed)
        loader, self.meta_loader, self.hvp_loader = make_loaders(cfg, self.sets, self.collate, self.gens)
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
        return collate_for(self.cfg, self.tok, seed)

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
        solver = self._solver if self._solver is not None else make_solver(cfg.solver, cfg.iters, cfg.alpha, cfg.mixed)
        return bl.BilevelTrainer(
            self.model,
            opt,
            obj.inner,
            outer=obj.outer,
            meta_model=self.meltr,
            meta_optimizer=meta_opt,
            solver=solver,
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
        """Metrics of the backbone on ``split`` (retrieval: R@k, MedR; captioning: BLEU, ROUGE-L, CIDEr, and METEOR
        on test where Java is installed)."""
        with num_threads(self.cfg.eval_threads):
            return self._evaluate(split)

    def _evaluate(self, split: str) -> dict[str, float]:
        ds = self.data[split]
        if self.cfg.qa_kind:
            return qa_accuracy(self.model, self.sets[split], self.tok, self.cfg.qa_kind)
        if self.cfg.task == "retrieval":
            return retrieval_eval(self.backbone, ds, self.tok, max_words=self.cfg.max_words)
        # METEOR (pycocoevalcap's jar, a Java process per call) on test only: the epoch is selected on CIDEr,
        # BLEU-4; without Java the test metrics go without METEOR and a MeteorUnavailableWarning says so
        meteor = None if split == "test" else False
        m, _ = caption_eval(self.backbone, ds, self.tok, max_len=self.cfg.max_words, with_meteor=meteor)
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
        prev = json.loads(res_path.read_text()) if res_path.exists() else None
        if prev is not None:  # before anything is loaded: every setting that changes the trajectory must match
            free = ("progress", "resume", "out", "epochs", "eval_test", "eval_threads")
            now = {k: v for k, v in asdict(self.cfg).items() if k not in free}
            was = {k: v for k, v in prev.get("config", {}).items() if k not in free}
            changed = sorted(k for k in set(now) | set(was) if now.get(k) != was.get(k))
            if changed:
                diff = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed)
                raise ValueError(f"{res_path} is from a run with other settings ({diff}); use another --out")
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
        if prev is not None:
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
    add_arguments(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    try:
        cfg = config_from_args(a)
    except ValueError as e:
        p.error(str(e))
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        p.error(
            f"--pretrained {cfg.pretrained}: no such file; run `python -m examples.meltr_video.pretrain --backbone "
            f"{cfg.backbone} --data {cfg.data} --out {cfg.pretrained}` first"
        )
    torch.set_num_threads(a.threads)
    cfg.out = a.out or f"runs/finetune/{a.backbone}-{a.task}-{cfg.name}-s{a.seed}"
    return finetune(cfg)


if __name__ == "__main__":
    main()
