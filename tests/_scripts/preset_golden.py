"""Write tests/data/preset_hypergrads.json: every preset's hypergradient on the reference problems.

Run with the code whose results are to be kept (it was run before the solver redesign of issue 13);
tests/core/test_presets_golden.py compares the current presets with the file to 1e-13.
    python tests/_scripts/preset_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import bilevel as bl
from bilevel.testing import logistic_breast_cancer, ridge_diabetes, ridge_synthetic

OUT = Path(__file__).resolve().parents[1] / "data" / "preset_hypergrads.json"


def problems():
    """(name, reference problem, hparams value, params at which the hypergradient is taken)."""
    for name, ref, lam in (
        ("ridge_synthetic_d20", ridge_synthetic(d=20, n=60), -1.0),
        ("ridge_diabetes", ridge_diabetes(), -2.0),
        ("logistic_breast_cancer", logistic_breast_cancer(), -1.0),
    ):
        hp = ref.hparams(lam)
        sol = ref.solution(hp)
        yield f"{name}@solution", ref, hp, sol
        shift = 0.01 * torch.linspace(-1, 1, sol["w"].numel(), dtype=sol["w"].dtype)
        yield f"{name}@perturbed", ref, hp, {"w": sol["w"] + shift}


def presets(L: float):
    """(label, solver): every preset with options that exercise its iterations."""
    yield "itd", bl.ITD(steps=7, lr=0.5 / L)
    yield "itd-momentum", bl.ITD(steps=5, lr=0.3 / L, optimizer="momentum")
    yield "itd-adam", bl.ITD(steps=4, lr=0.01, optimizer="adam")
    for mode in ("autograd", "rev-rev", "fwd-rev"):
        yield f"aid-cg-{mode}", bl.AIDCG(iters=6, tol=1e-14, hvp=mode)
        yield f"aid-fp-{mode}", bl.AIDFP(iters=8, alpha=1.0 / L, hvp=mode)
        yield f"aid-fp-lite-{mode}", bl.AIDFPLite(scale=0.7, hvp=mode)
        yield f"stocbio-{mode}", bl.StocBiO(iters=5, alpha=1.0 / L, hvp=mode)


def stocbio_batches(ref):
    X, y = ref.inner_batch
    return [(X[i::3], y[i::3]) for i in range(3)]


def record(hg, info) -> dict:
    keep = ("iters", "residuals", "converged", "negative_curvature", "diverged", "n_hvp", "inner_value", "outer_value")
    return {"lam": hg["lam"].tolist(), "info": {k: getattr(info, k) for k in keep}}


def compute() -> dict[str, dict]:
    """Every case's hypergradient and diagnostics, with one torch thread (reductions in a fixed order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute()
    finally:
        torch.set_num_threads(threads)


def _compute() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for pname, ref, hp, params in problems():
        _, L = ref.curvature(hp)
        args = (ref.problem(), params, hp, ref.inner_batch, ref.outer_batch)
        for label, solver in presets(L):
            out[f"{pname}/{label}"] = record(*solver.hypergrad(*args, return_info=True))
        fresh = bl.StocBiO(iters=5, alpha=1.0 / L, batches=stocbio_batches(ref))
        out[f"{pname}/stocbio-batches"] = record(*fresh.hypergrad(*args, return_info=True))
    return out


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(compute(), indent=0))
    print(f"wrote {OUT}")
