"""Warm starts (issue 16, item 2): ``x0`` in ``cg`` / ``neumann``, ``v0=`` per AID call and
``TrainerConfig(warm_start=True)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bilevel as bl
from bilevel import linalg, testing
from bilevel.products import Linearization
from bilevel.training import BilevelTrainer, TrainerConfig

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _spd(d: int = 100, seed: int = 0) -> torch.Tensor:
    """Eigenvalues 0.01 .. 1 (CG needs well under d iterations for 1e-10, so a start can save some)."""
    Q = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed))).Q
    return Q @ torch.diag(torch.logspace(-2, 0, d, dtype=F64)) @ Q.T


def _hvp(H: torch.Tensor):
    return lambda p: {"w": H @ p["w"]}


# ------------------------------------------------------------------------------------------- linear solves


def test_cg_from_a_nearby_start_reaches_tol_in_fewer_iterations():
    H = _spd()
    b = {"w": torch.randn(100, dtype=F64, generator=torch.Generator().manual_seed(1))}
    exact = torch.linalg.solve(H, b["w"])
    cold, rc = linalg.cg(200, 1e-10)(_hvp(H), b)
    near = {"w": exact + 1e-4 * torch.randn(100, dtype=F64, generator=torch.Generator().manual_seed(2))}
    warm, rw = linalg.cg(200, 1e-10)(_hvp(H), b, x0=near)
    assert rc.converged and rw.converged and rw.warm_hvp == 1 and rc.warm_hvp == 0
    assert rw.iters < rc.iters  # same tolerance ||b - H v|| <= tol ||b||, reached from closer
    assert _rel(warm["w"], exact) < 1e-8 and _rel(cold["w"], exact) < 1e-8
    zero, r0 = linalg.cg(200, 1e-10)(_hvp(H), b, x0={"w": torch.zeros(100, dtype=F64)})
    assert r0.iters == rc.iters and _rel(zero["w"], cold["w"]) < 1e-12  # x0 = 0 is the cold start
    done, rd = linalg.cg(200, 1e-10)(_hvp(H), b, x0={"w": exact})
    assert rd.iters == 0 and rd.converged and torch.equal(done["w"], exact)


def test_neumann_warm_start_is_the_series_for_the_residual():
    H = _spd(12)
    alpha = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    b = {"w": torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(1))}
    x0 = {"w": torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(3))}
    v, res = linalg.neumann(15, alpha)(_hvp(H), b, x0=x0)
    M = torch.eye(12, dtype=F64) - alpha * H
    N = alpha * sum(torch.linalg.matrix_power(M, j) for j in range(16))
    want = x0["w"] + N @ (b["w"] - H @ x0["w"])  # x = x0 + N (b - H x0)
    assert _rel(v["w"], want) < 1e-12 and res.iters == 15 and res.warm_hvp == 1
    fixed = x0["w"]  # = 16 steps of v <- v + alpha (b - H v) from x0
    for _ in range(16):
        fixed = fixed + alpha * (b["w"] - H @ fixed)
    assert _rel(v["w"], fixed) < 1e-12
    exact = torch.linalg.solve(H, b["w"])
    at, _ = linalg.neumann(3, alpha)(_hvp(H), b, x0={"w": exact})
    assert _rel(at["w"], exact) < 1e-12  # a fixed point stays put


def test_x0_must_look_like_b():
    H, b = _spd(4), {"w": torch.ones(4, dtype=F64)}
    for x0, err in [
        ([torch.ones(4)], TypeError),
        ({"v": torch.ones(4, dtype=F64)}, ValueError),
        ({"w": torch.ones(5, dtype=F64)}, ValueError),
        ({"w": torch.ones(4)}, ValueError),  # float32
        ({"w": [1.0, 2.0]}, TypeError),
    ]:
        for solve in (linalg.cg(5), linalg.neumann(5, 0.1)):
            with pytest.raises(err, match="x0"):
                solve(_hvp(H), b, x0=x0)
    assert linalg.accepts_warm_start(linalg.cg()) and linalg.accepts_warm_start(linalg.neumann())
    assert not linalg.accepts_warm_start(linalg.identity()) and not linalg.accepts_warm_start(linalg.nystrom(2, 1.0))


# ------------------------------------------------------------------------------------------------ solvers


@pytest.fixture(scope="module")
def ridge():
    ref = testing.ridge_synthetic(d=30)
    return ref, ref.problem()


def _args(ref, problem, value):
    hp = ref.hparams(value)
    return (problem, ref.solution(hp), hp, ref.inner_batch, ref.outer_batch), ref.exact_hypergrad(hp)["lam"]


@pytest.mark.parametrize("name", ["aid-cg", "aid-fp", "stocbio"])
def test_same_answer_as_cold_from_the_previous_point(ridge, name):
    ref, problem = ridge
    _, L = ref.curvature(ref.hparams(-2.0))
    opts = {"aid-cg": {"iters": 100, "tol": 1e-12}}.get(name, {"iters": 300, "alpha": 1.0 / L})
    solver = bl.get_solver(name, **opts)
    prev, _ = _args(ref, problem, -2.0)
    _, info_prev = solver.hypergrad(*prev, return_info=True)
    args, exact = _args(ref, problem, -1.9)  # the next point of a hyper-step sequence
    cold, ic = solver.hypergrad(*args, return_info=True)
    warm, iw = solver.hypergrad(*args, return_info=True, v0=info_prev.v)
    assert iw.warm_start and not ic.warm_start and iw.n_hvp == iw.iters + 1
    assert _rel(warm["lam"], exact) < 1e-6 and _rel(cold["lam"], exact) < 1e-6
    assert _rel(warm["lam"], cold["lam"]) < 1e-6
    if name == "aid-cg":
        assert iw.iters <= ic.iters


def test_hypergrad_at_takes_v0(ridge):
    ref, problem = ridge
    args, exact = _args(ref, problem, -2.0)
    lin = Linearization(problem, args[1], args[2], ref.inner_batch)
    solver = bl.AIDCG(iters=100, tol=1e-12)
    _, info = solver.hypergrad_at(lin, ref.outer_batch, return_info=True)
    hg, again = solver.hypergrad_at(lin, ref.outer_batch, return_info=True, v0=info.v)
    assert again.iters == 0 and again.n_hvp == 1 and _rel(hg["lam"], exact) < 1e-10


@pytest.mark.parametrize("solver", [bl.ITD(), bl.AIDFPLite(), bl.Nystrom(rank=3)], ids=lambda s: s.name)
def test_refused_without_an_iterative_solve(ridge, solver):
    ref, problem = ridge
    args, _ = _args(ref, problem, -2.0)
    v0 = {"w": torch.zeros(30, dtype=F64)}
    assert not solver.supports_warm_start
    with pytest.raises(ValueError, match=r"v0= .*warm start.* needs an iterative linear solve"):
        solver.hypergrad(*args, v0=v0)
    with pytest.raises(ValueError, match=rf"TrainerConfig.warm_start needs .*{solver.name}"):
        _trainer(solver, TrainerConfig(warm_start=True))


def test_trainer_config_checks():
    with pytest.raises(ValueError, match="warm_start must be a bool"):
        TrainerConfig(warm_start=1)
    model = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="warm_start needs a solver"):
        BilevelTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda p, h, b: p["weight"].sum(),
                       config=TrainerConfig(warm_start=True))  # fmt: skip


# ------------------------------------------------------------------------------------------------ trainer


D = 64  # features: CG to 1e-8 takes about D iterations here, so a start can save some


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, D, dtype=F64)
    return x, x @ torch.linspace(-1, 1, D, dtype=F64) + 0.3 * torch.randn(n, generator=g, dtype=F64)


def _trainer(solver, config, lr=0.3):
    """Ridge with per-feature L2 weights exp(lam) (strongly convex inner problem)."""
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).double()
    meta = nn.ParameterDict({"lam": nn.Parameter(torch.full((D,), -3.0, dtype=F64))})

    def g(p, h, b):
        x, y = b
        return 0.5 * ((x @ p["weight"][0] - y) ** 2).mean() + 0.5 * (h["lam"].exp() * p["weight"][0] ** 2).sum()

    def f(p, h, b):
        x, y = b
        return 0.5 * ((x @ p["weight"][0] - y) ** 2).mean()

    return BilevelTrainer(
        model, torch.optim.SGD(model.parameters(), lr=lr), g, outer=f, meta_model=meta,
        meta_optimizer=torch.optim.Adam(meta.parameters(), lr=0.05), solver=solver, config=config,
    )  # fmt: skip


class _Iters(bl.Callback):
    def __init__(self):
        self.iters, self.hvps = [], []

    def on_step_end(self, trainer, metrics):
        info = metrics.get("hypergrad_info")
        if info is not None:
            assert info.converged, info
            self.iters.append(info.iters)
            self.hvps.append(info.n_hvp)


@pytest.mark.parametrize("share", [False, True], ids=["plain", "shared-linearization"])
def test_training_loop_needs_fewer_cg_iterations_with_warm_start(share):
    """Full-batch loop (consecutive hyper steps are close): the same tolerance in fewer CG iterations,
    and the same trajectory to the solve's tolerance."""
    train, val = _data(128, 1), _data(64, 2)
    runs = {}
    for warm in (False, True):
        cfg = TrainerConfig(inner_steps=1 if share else 5, warm_start=warm, share_linearization=share)
        tr = _trainer(bl.AIDCG(iters=200, tol=1e-8), cfg, lr=0.1)
        rec = _Iters()
        tr.callbacks.append(rec)
        tr.fit([train] * 20, [val], progress=False)
        runs[warm] = (rec, tr)
    (cold, tc), (warm, tw) = runs[False], runs[True]
    assert len(cold.iters) == len(warm.iters) == 20
    assert sum(warm.iters) <= sum(cold.iters)  # measured: see docs/results.md (warm_start section)
    assert sum(warm.iters[5:]) < sum(cold.iters[5:])  # not a tie: the start helps once steps are small
    assert warm.hvps[0] == warm.iters[0] and all(h == i + 1 for h, i in zip(warm.hvps[1:], warm.iters[1:], strict=True))
    torch.testing.assert_close(tw.meta_model["lam"], tc.meta_model["lam"], rtol=0, atol=1e-5)
    assert tw._warm_v is not None and tc._warm_v is None


def test_resume_is_bitwise_exact_with_warm_start(tmp_path):
    """Mini-batches from a shuffling DataLoader; CG to a loose tolerance, so the kept v matters: resuming
    without it (the checkpoint's warm_v removed) gives another trajectory."""
    x, y = _data(48, 3)
    inner_ds, outer = torch.utils.data.TensorDataset(x, y), [_data(16, 4)]

    def build():
        tr = _trainer(bl.AIDCG(iters=50, tol=1e-3), TrainerConfig(warm_start=True), lr=0.1)
        loader = torch.utils.data.DataLoader(inner_ds, batch_size=8, shuffle=True)  # the global RNG shuffles
        return tr, loader

    ref, loader = build()
    ref.fit(loader, outer, epochs=10, max_steps=14, progress=False)
    a, loader = build()
    a.fit(loader, outer, epochs=10, max_steps=8, progress=False, checkpoint_path=tmp_path / "c.pt")
    assert a._warm_v is not None
    torch.rand(3)  # disturb the RNG between the runs
    b, loader = build()
    b.fit(loader, outer, epochs=10, max_steps=14, progress=False, checkpoint_path=tmp_path / "c.pt", resume=True)
    assert b.step_count == 14
    for got, want in ((b.model, ref.model), (b.meta_model, ref.meta_model)):
        for (k, p), q in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            assert torch.equal(p, q), k
    assert torch.equal(b._warm_v["weight"], ref._warm_v["weight"])

    a2, loader = build()
    a2.fit(loader, outer, epochs=10, max_steps=8, progress=False, checkpoint_path=tmp_path / "d.pt")
    st = bl.checkpoint.load_checkpoint(tmp_path / "d.pt")
    st["warm_v"] = None
    c, loader = build()
    c.load_state_dict(st)
    c.fit(loader, outer, epochs=10, max_steps=14, progress=False)
    assert not torch.equal(c.meta_model["lam"], ref.meta_model["lam"])  # the test can fail


def test_checkpoint_without_warm_start_fields_still_loads(tmp_path):
    """A state written before warm starts existed (no config.warm_start, no warm_v) loads unchanged."""
    tr = _trainer(bl.AIDCG(iters=10), TrainerConfig())
    tr.step(_data(8, 0), _data(8, 1))
    st = tr.state_dict()
    del st["warm_v"]
    st["config"] = {k: v for k, v in st["config"].items() if k != "warm_start"}
    other = _trainer(bl.AIDCG(iters=10), TrainerConfig())
    assert other.load_state_dict(st) == [] and other._warm_v is None
    warm = _trainer(bl.AIDCG(iters=10), TrainerConfig(warm_start=True))
    with pytest.raises(ValueError, match=r"config\.warm_start: False in the checkpoint, True now"):
        warm.load_state_dict(st)
