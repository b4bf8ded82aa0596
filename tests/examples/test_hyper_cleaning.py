"""Data hyper-cleaning example: data, objectives, exact hypergradient, and that a few outer steps
lower the hyper-objective and the weights of the corrupted examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from examples.hyper_cleaning.cleaning import (
    SOLVER_NAMES,
    f1_corrupted,
    fit_baseline,
    inner_objective,
    load_cleaning_data,
    make_solver,
    outer_objective,
    run_cleaning,
    smoothness,
)
from examples.hyper_cleaning.run import main, write_section

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def data():
    return load_cleaning_data(n_train=200, n_val=200, corruption=0.5, seed=0)


def test_corruption(data):
    c = data.corrupted
    assert int(c.sum()) == 100
    assert bool((data.train["y"][c] != data.clean_y[c]).all())  # a corrupted label is always wrong
    assert bool((data.train["y"][~c] == data.clean_y[~c]).all())
    assert data.test["y"].numel() == 1797 - 400
    again = load_cleaning_data(n_train=200, n_val=200, seed=0)
    assert torch.equal(again.corrupted, c) and torch.equal(again.train["x"], data.train["x"])
    assert not torch.equal(load_cleaning_data(n_train=200, n_val=200, seed=1).corrupted, c)


@pytest.mark.parametrize("kw", [{"n_train": 1700, "n_val": 90}, {"corruption": 1.0}, {"n_train": 5}])
def test_bad_data_args(kw):
    with pytest.raises(ValueError):
        load_cleaning_data(**kw)


def test_f1_known_values():
    mask = torch.tensor([True, True, False, False])
    assert f1_corrupted(torch.tensor([0.1, 0.2, 0.9, 0.8]), mask) == 1.0
    assert f1_corrupted(torch.tensor([0.9, 0.9, 0.9, 0.9]), mask) == 0.0
    # flag 1 of 2 corrupted plus 1 clean: tp=1, fp=1, fn=1 -> 2/4
    assert f1_corrupted(torch.tensor([0.1, 0.9, 0.2, 0.9]), mask) == pytest.approx(0.5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=40))
def test_f1_in_unit_interval_and_perfect_when_mask_matches(rows):
    w = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows])
    assert 0.0 <= f1_corrupted(w, mask) <= 1.0
    if mask.any():
        assert f1_corrupted(torch.where(mask, 0.0, 1.0), mask) == 1.0


def test_smoothness_bounds_the_inner_hessian():
    """L from :func:`smoothness` is >= the largest Hessian eigenvalue at a random point, and the
    smallest eigenvalue is >= reg (strong convexity)."""
    d = load_cleaning_data(n_train=30, n_val=30, seed=1, dtype=torch.float64)
    reg = 1e-2
    g = inner_objective(reg)
    lam = {"lam": torch.randn(d.n_train, dtype=torch.float64)}

    def flat(theta):
        return g({"weight": theta[:640].view(10, 64), "bias": theta[640:]}, lam, d.train)

    hess = torch.autograd.functional.hessian(flat, 0.1 * torch.randn(650, dtype=torch.float64), vectorize=True)
    eig = torch.linalg.eigvalsh(hess)
    assert eig[0] >= reg - 1e-9
    assert eig[-1] <= smoothness(d, reg) + 1e-9
    assert eig[-1] > 0.05 * smoothness(d, reg)  # and not a vacuous bound


def test_aid_cg_hypergradient_matches_finite_differences():
    """At the inner minimiser, AID-CG's hypergradient equals d F / d lam by central differences."""
    d = load_cleaning_data(n_train=40, n_val=40, seed=3, dtype=torch.float64)
    reg = 0.1
    g = inner_objective(reg)
    lr = 1.0 / smoothness(d, reg)

    def solve(lam):
        th = {"weight": torch.zeros(10, 64, dtype=torch.float64, requires_grad=True),
              "bias": torch.zeros(10, dtype=torch.float64, requires_grad=True)}  # fmt: skip
        opt = torch.optim.LBFGS(list(th.values()), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=0)

        def closure():
            opt.zero_grad()
            loss = g(th, {"lam": lam}, d.train)
            loss.backward()
            return loss

        opt.step(closure)
        return {k: v.detach() for k, v in th.items()}

    lam = 0.5 * torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theta = solve(lam)
    problem = bl.BilevelProblem(inner=g, outer=outer_objective)
    hg = make_solver("aid-cg", lr, iters=200).hypergrad(problem, theta, {"lam": lam}, d.train, d.val)["lam"]
    direction = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = 1e-4
    fp = outer_objective(solve(lam + eps * direction), {}, d.val)
    fm = outer_objective(solve(lam - eps * direction), {}, d.val)
    fd = float(fp - fm) / (2 * eps)
    assert float(hg @ direction) == pytest.approx(fd, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("solver", ["aid-cg", "itd", "stocbio"])
def test_outer_steps_lower_hyperobjective_and_corrupted_weights(data, solver):
    res = run_cleaning(data, solver, outer_steps=25, T=5, iters=10, stoc_batch=100, eval_every=10, progress=False)
    first, last = res.history[0], res.history[-1]
    assert last["val_loss"] < first["val_loss"] - 0.05
    assert last["mean_w_corrupted"] < 0.45 < 0.55 < last["mean_w_clean"]
    assert res.f1 > 0.6


def test_every_solver_builds():
    for name in SOLVER_NAMES:
        assert make_solver(name, 0.1).name == name
    with pytest.raises(ValueError):
        make_solver("newton", 0.1)
    with pytest.raises(ValueError):
        run_cleaning(load_cleaning_data(n_train=50, n_val=50), "aid-cg", meta_optimizer="rmsprop")


def test_baselines(data):
    noisy = fit_baseline(data, "noisy", steps=150)
    clean = fit_baseline(data, "clean", steps=150)
    assert 0.5 < noisy.test_acc < clean.test_acc  # half the labels wrong hurts
    with pytest.raises(ValueError):
        fit_baseline(data, "val")


def test_write_section_keeps_other_sections(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# R\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    write_section(path, "hyper_cleaning", "first")
    write_section(path, "hyper_cleaning", "second")
    text = path.read_text()
    assert "keep me" in text and "second" in text and "first" not in text
    assert text.count("<!-- BEGIN hyper_cleaning -->") == 1


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "r.md"
    rc = main(["--seeds", "0", "--solvers", "aid-fp-lite", "--meta-opt", "sgd", "--outer-steps", "3", "--T", "2",
               "--baseline-steps", "5", "--n-train", "100", "--n-val", "100", "--no-progress",
               "--plot", str(tmp_path / "p.png"), "--write-results", str(out)])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| aid-fp-lite |" in out.read_text() and "aid-fp-lite" in capsys.readouterr().out
    assert "{a." not in out.read_text()  # every placeholder was formatted
