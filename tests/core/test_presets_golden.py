"""The five solver presets keep their hypergradients and diagnostics across the redesign of issue 13.

``tests/data/preset_hypergrads.json`` was written by ``tests/_scripts/preset_golden.py`` with the code
before the redesign (commit a2c6056): ITD (sgd, momentum, adam), AID-CG, AID-FP, AID-FP-Lite and StocBiO
(with and without fresh HVP batches) in every HVP mode, on three reference problems, at the inner
solution and at a perturbed point. Every hypergradient must agree to 1e-13 (relative to its norm).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parents[1]
GOLDEN = json.loads((HERE / "data" / "preset_hypergrads.json").read_text())
_spec = importlib.util.spec_from_file_location("preset_golden", HERE / "_scripts" / "preset_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.fixture(scope="module")
def current() -> dict[str, dict]:
    return golden.compute()


def test_every_golden_case_is_computed(current):
    assert sorted(current) == sorted(GOLDEN) and len(GOLDEN) == 96


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_preset_hypergradient_is_unchanged(current, case):
    want, got = (
        torch.tensor(GOLDEN[case]["lam"], dtype=torch.float64),
        torch.tensor(current[case]["lam"], dtype=torch.float64),
    )
    assert float((got - want).norm()) <= 1e-13 * max(float(want.norm()), 1e-300)
    w_info, g_info = GOLDEN[case]["info"], current[case]["info"]
    for key in ("iters", "converged", "negative_curvature", "diverged", "n_hvp"):
        assert g_info[key] == w_info[key], key
    for key in ("inner_value", "outer_value"):
        assert g_info[key] == pytest.approx(w_info[key], rel=1e-13, abs=0)
    if case.endswith(("/itd", "/itd-momentum")):  # new since: ITD's adjoint norms (tests/core/test_itd_truncate.py)
        assert w_info["residuals"] == [] and len(g_info["residuals"]) == g_info["iters"]
    else:
        assert g_info["residuals"] == pytest.approx(w_info["residuals"], rel=1e-12, abs=1e-300)
