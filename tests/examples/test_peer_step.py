"""benchmarks/peer_step.py: one MELTR hyper step against betty's Neumann and torchopt's CG, like for like."""

from __future__ import annotations

import pytest
import torch

import bilevel as bl
from benchmarks import peer_step
from benchmarks.peers import available

pytestmark = pytest.mark.usefixtures("one_thread")  # small runs: one thread is faster on a shared CPU


def _need_peers() -> None:
    have = available()
    if have["torchopt"] is None or have["betty"] is None:
        pytest.skip("torchopt and betty-ml are not installed (scripts/install_peers.sh)")


def test_tiny_pairs_are_equal_and_timed(tmp_path):
    _need_peers()
    md = tmp_path / "results.md"
    md.write_text("# Results\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    results = peer_step.main(["--tiny", "--markdown", str(md)])
    pairs = [r for r in results if r["equal"] is not None]
    cg = f"CG (mu={peer_step.DEFAULT_MU:g}): ours vs torchopt"
    step = "training step (inner gradient + hyper step): ours shared vs"
    assert [r["label"] for r in pairs] == [
        "Neumann: ours (plain series) vs betty", f"Neumann, {step} betty", cg,
        f"CG (mu={peer_step.DEFAULT_MU:g}), {step} torchopt",
    ]  # fmt: skip
    for r in pairs:
        assert r["equal"] is True and r["rel"] < peer_step.THRESHOLD, r
    for r in results:
        assert r["ours_ms"] > 0 and r["peer_ms"] > 0
    context = [r for r in results if r["equal"] is None]
    assert len(context) == 2 and all(r["rel"] > peer_step.THRESHOLD for r in context)  # they compute other things
    text = md.read_text()
    assert "keep me" in text and "<!-- BEGIN meltr_peer_step -->" in text
    assert "python -m benchmarks.peer_step --tiny" in text and "| yes |" in text


def test_too_small_mu_raises():
    """On the MELTR state the inner Hessian is indefinite along grad_theta f: our CG meets negative curvature
    at its first iteration without the proximal term, and the run stops with an error naming --mu."""
    _need_peers()
    state = peer_step.meltr_state(1)
    bare = peer_step.State(peer_step.proximal(state.problem, state.params, 0.0), *state.args[1:])
    _, info = bl.AIDCG(iters=3, tol=1e-30, on_negative_curvature="ignore").hypergrad(*bare.args, return_info=True)
    assert info.negative_curvature
    with pytest.raises(ValueError, match="raise --mu"):
        peer_step.main(["--tiny", "--mu", "0"])


def test_missing_peers_are_skipped_with_a_note(monkeypatch, capsys):
    monkeypatch.setattr(peer_step, "available", lambda: {"higher": None, "torchopt": None, "betty": None})
    assert peer_step.main(["--tiny"]) == []
    out = capsys.readouterr().out
    assert "betty does not import: Neumann pair skipped" in out and "torchopt does not import: CG pair" in out


def test_proximal_term_and_not_equal_rows():
    g = lambda p, h, b: (h["w"] * p["x"] ** 3).sum()  # noqa: E731
    prob = peer_step.proximal(bl.BilevelProblem(inner=g, outer=g), {"x": torch.tensor([1.0, 2.0])}, 3.0)
    x = torch.tensor([0.5, -1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(prob.inner({"x": x}, {"w": torch.tensor([1.0, 1.0])}, None), [x])
    assert torch.allclose(grad, 3 * x.detach() ** 2 + 3.0 * (x.detach() - torch.tensor([1.0, 2.0])))
    a, b = {"x": torch.tensor([1.0, 4.0])}, {"x": torch.tensor([1.0, 2.0])}
    assert peer_step.rel_diff(a, b) == pytest.approx(1.0)
    row = {"label": "p", "ours_ms": 1.0, "peer_ms": 2.0, "rel": 1.0, "equal": False, "note": "", "iters": ""}
    text = peer_step.table_text([row], 3)
    assert "NOT EQUAL" in text and "2.00x" not in text
    assert "2.00x" in peer_step.table_text([{**row, "equal": True}], 3)
