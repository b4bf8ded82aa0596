"""``benchmarks.hypergrad_accuracy.frontier_report``: our error-vs-time envelope against every peer point, on
synthetic rows (no timing is run)."""

from __future__ import annotations

import math

import pytest

from benchmarks import hypergrad_accuracy as ha

NAN = float("nan")


def row(
    method: str, budget: int | None, ms: float, err: float, problem: str = "p", peer: bool = False
) -> ha.AccuracyRow:
    return ha.AccuracyRow(problem, method, budget, err, NAN, ms, NAN, peer=peer)


def one(rows: list[ha.AccuracyRow], **kw: float) -> ha.FrontierCheck:
    (check,) = ha.frontier_report(rows, **kw)
    return check


def test_dominated_peer_point_is_matched() -> None:
    c = one([row("aid-cg", 5, 1.0, 1e-8), row("torchopt/cg", 5, 2.0, 1e-6, peer=True)])
    assert (c.n_peer, c.gaps, c.n_peer_nan, c.ok) == (1, [], 0, True)


def test_point_not_dominated_reports_our_best_error_and_fastest_time() -> None:
    ours = [row("aid-fp", 1, 5.0, 1e-3), row("aid-cg", 20, 20.0, 1e-8), row("itd", 50, 50.0, 1e-9)]
    c = one([*ours, row("betty/cg", 10, 10.0, 1e-5, peer=True), row("higher/itd", 1, 60.0, 1e-12, peer=True)])
    assert not c.ok and c.n_peer == 2 and len(c.gaps) == 2
    g, h = c.gaps
    assert g.row.method == "betty/cg"
    assert (g.best_err.method, g.fastest.method) == ("aid-fp", "aid-cg")  # envelope over all our methods
    assert h.best_err.method == "itd" and h.fastest is None  # no point of ours reaches 1e-12: "never"
    text = ha.render_frontier([c])
    assert "| p | 2 | 0 | 0 | no |" in text
    assert "betty/cg@10" in text and "1.00e-03 (aid-fp@1)" in text and "20 (aid-cg@20)" in text and "never" in text


def test_peer_faster_than_all_of_ours_has_no_best_error() -> None:
    c = one([row("aid-cg", 1, 3.0, 1e-8), row("torchopt/identity", None, 1.0, 0.5, peer=True)])
    assert c.gaps[0].best_err is None and c.gaps[0].fastest.method == "aid-cg"
    assert "none that fast" in ha.render_frontier([c]) and "torchopt/identity |" in ha.render_frontier([c])


@pytest.mark.parametrize(
    ("ms", "err", "peer_err", "matched"),
    [
        (1.04, 1.005e-6, 1e-6, True),  # 4% slower, 0.5% less accurate: within the slack
        (1.06, 1e-6, 1e-6, False),  # 6% slower
        (1.0, 1.02e-6, 1e-6, False),  # 2% less accurate
        (1.0, 5e-15, 0.0, True),  # round-off level against an exact peer: absolute floor
        (1.0, 1e-13, 0.0, False),
    ],
)
def test_ties_within_slack(ms: float, err: float, peer_err: float, matched: bool) -> None:
    c = one([row("aid-cg", 1, ms, err), row("torchopt/cg", 1, 1.0, peer_err, peer=True)])
    assert c.ok is matched


def test_slack_arguments_are_used() -> None:
    rows = [row("aid-cg", 1, 1.2, 1e-6), row("torchopt/cg", 1, 1.0, 1e-6, peer=True)]
    assert not one(rows).ok and one(rows, time_slack=0.25).ok


def test_nan_points_are_left_out() -> None:
    rows = [
        row("aid-cg", 1, 0.1, NAN),  # ours, non-finite: must not match anything
        row("itd", 1, NAN, NAN),  # ours, failed
        row("aid-fp", 1, 10.0, 1e-2),
        row("betty/neumann", 1, 1.0, NAN, peer=True),  # peer, non-finite: left out
        row("betty/cg", 1, NAN, NAN, peer=True),  # peer, failed
        row("torchopt/cg", 1, 1.0, 1e-3, peer=True),
    ]
    c = one(rows)
    assert (c.n_peer, c.n_peer_nan, len(c.gaps)) == (1, 2, 1)
    assert c.gaps[0].best_err is None and c.gaps[0].fastest is None
    assert all(math.isfinite(g.row.rel_error) for g in c.gaps)


def test_problems_are_checked_separately() -> None:
    rows = [row("aid-cg", 1, 1.0, 1e-9, "a"), row("torchopt/cg", 1, 2.0, 1e-6, "a", peer=True),
            row("aid-cg", 1, 9.0, 1e-9, "b"), row("torchopt/cg", 1, 2.0, 1e-6, "b", peer=True)]  # fmt: skip
    a, b = ha.frontier_report(rows)
    assert (a.problem, a.ok, b.problem, b.ok) == ("a", True, "b", False)


def test_report_is_in_the_section_only_with_peers() -> None:
    cfg = ha.make_config("quick", memory=False)
    rows = [row("aid-cg", 1, 9.0, 1e-9), row("torchopt/cg", 1, 2.0, 1e-6, peer=True)]
    text = ha.render_markdown(ha.Results(cfg, "cmd", [], rows=rows), {})
    assert "Error-vs-time frontier" in text and "| p | 1 | 0 | 0 | no |" in text
    assert "Error-vs-time frontier" not in ha.render_markdown(ha.Results(cfg, "cmd", [], rows=rows[:1]), {})
