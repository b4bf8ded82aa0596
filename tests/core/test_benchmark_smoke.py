"""Smoke test of ``benchmarks/hypergrad_accuracy.py --quick`` (no peers; a temporary output directory).

Checks the structure of the output and one number that can fail: AID-CG at its largest quick budget
(20 iterations) on problems with at most 30 parameters must match the exact hypergradient to 1e-6
(CG is exact in ``d`` steps). No timing is asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from benchmarks import hypergrad_accuracy as ha


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[ha.Results, Path]:
    out = tmp_path_factory.mktemp("bench")
    return ha.main(["--quick", "--no-peers", "--out-dir", str(out)]), out


def test_rows_for_every_solver_problem_and_budget(quick: tuple[ha.Results, Path]) -> None:
    res, _ = quick
    for case in res.cases:
        for spec in ha.OUR_SOLVERS:
            got = {r.budget for r in res.rows if r.problem == case.name and r.method == spec.name}
            want = set(res.cfg.budgets[case.name]) if spec.budget_key else {None}
            assert got == want, (case.name, spec.name)
    for r in res.rows:
        assert not r.note.startswith("failed"), r
        assert math.isfinite(r.rel_error) and r.ms > 0 and r.cost_grads > 0, r


def test_aid_cg_converges_at_largest_quick_budget(quick: tuple[ha.Results, Path]) -> None:
    res, _ = quick
    for case in res.cases:
        top = max(res.cfg.budgets[case.name])
        (row,) = [r for r in res.rows if r.problem == case.name and r.method == "aid-cg" and r.budget == top]
        assert row.rel_error < 1e-6, row
        assert row.cosine > 1 - 1e-9, row


def test_errors_shrink_with_budget_for_deterministic_solvers(quick: tuple[ha.Results, Path]) -> None:
    res, _ = quick
    for case in res.cases:
        for method in ("aid-cg", "aid-fp", "itd"):
            errs = [r.rel_error for r in sorted(res.rows, key=lambda r: r.budget or 0)
                    if r.problem == case.name and r.method == method]  # fmt: skip
            assert errs[-1] < errs[0], (case.name, method, errs)


def test_hvp_modes_and_memory_rows(quick: tuple[ha.Results, Path]) -> None:
    res, _ = quick
    assert {(h.problem, h.mode) for h in res.hvp_rows} == {
        (c.name, m) for c in res.cases for m in ("autograd", "rev-rev", "fwd-rev")
    }
    by = {(h.problem, h.mode): h for h in res.hvp_rows}
    for c in res.cases:  # both modes compute the same products
        assert abs(by[(c.name, "rev-rev")].rel_error - by[(c.name, "fwd-rev")].rel_error) < 1e-10
        assert abs(by[(c.name, "autograd")].rel_error - by[(c.name, "rev-rev")].rel_error) < 1e-10
    assert len(res.memory) == len(res.cfg.memory_solvers) * len(res.cfg.memory_budgets)
    for p in res.memory:
        assert p.error is None and p.rss_extra_mb is not None and p.iters_done == p.budget, p


def test_markdown_and_plots_written(quick: tuple[ha.Results, Path]) -> None:
    _, out = quick
    text = (out / "results.md").read_text()
    assert text.startswith("# Results")
    assert text.count("<!-- BEGIN hypergrad_accuracy -->") == 1 and text.count("<!-- END hypergrad_accuracy -->") == 1
    assert "| aid-cg |" in text and "fwd-rev" in text
    assert (out / "img" / "hypergrad_error_vs_time.png").stat().st_size > 1000
    assert (out / "img" / "hypergrad_memory.png").stat().st_size > 1000


def test_write_section_replaces_only_its_block(tmp_path: Path) -> None:
    md = tmp_path / "results.md"
    md.write_text("# Results\n\nintro\n\n<!-- BEGIN other -->\nkeep\n<!-- END other -->\n")
    ha.write_section(md, "first")
    ha.write_section(md, "second")
    text = md.read_text()
    assert "second" in text and "first" not in text and "keep" in text and "intro" in text
    assert text.count("<!-- BEGIN hypergrad_accuracy -->") == 1
