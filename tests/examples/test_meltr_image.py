"""MELTR image example: splits, batches with fixed augmentations, the CNN's three losses, and that a
few MELTR steps (with the core trainer and solvers) lower the hyper-objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from examples.meltr_image.digits import TASKS, DigitBatches, SmallCNN, load_digit_splits, make_batch
from examples.meltr_image.run import main, write_section
from examples.meltr_image.train import ImageConfig, fit_meltr_to_sum, solver_from_name, train_method
from examples.meltr_video.meltr import MELTR, make_objectives

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits(n_train=100, n_meta=30, n_val=100, seed=0)


def test_splits_stratified_and_disjoint(splits):
    assert splits.x_train.shape == (100, 1, 8, 8) and splits.x_test.shape[0] == 1797 - 230
    assert torch.bincount(splits.y_train, minlength=10).tolist() == [10] * 10
    assert torch.bincount(splits.y_meta, minlength=10).tolist() == [3] * 10
    rows = [tuple(r) for x in (splits.x_train, splits.x_meta, splits.x_val, splits.x_test) for r in
            x.flatten(1).numpy().round(4)]  # fmt: skip
    # load_digits has a few exact duplicate images, so compare counts with the source's own duplicates
    from sklearn.datasets import load_digits

    src = [tuple(r) for r in (load_digits().data / 16).round(4)]
    assert sorted(rows) == sorted(src)  # a partition of the whole data set
    assert float(splits.x_train.min()) >= 0 and float(splits.x_train.max()) <= 1


@pytest.mark.parametrize("kw", [{"n_train": 5}, {"n_train": 1000, "n_meta": 400, "n_val": 300}])
def test_bad_split_args(kw):
    with pytest.raises(ValueError):
        load_digit_splits(**kw)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 16), st.integers(0, 2**16))
def test_make_batch_fixes_its_randomness(b, seed):
    x = torch.rand(b, 1, 8, 8)
    y = torch.randint(0, 10, (b,))
    batch = make_batch(x, y, torch.Generator().manual_seed(seed))
    again = make_batch(x, y, torch.Generator().manual_seed(seed))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    for i in range(b):
        assert torch.equal(batch["x_rot"][i], torch.rot90(x[i], int(batch["k_rot"][i]), dims=(-2, -1)))
    lam = batch["l_mix"]
    assert bool(((lam >= 0) & (lam <= 1)).all())
    # x_mix is the convex combination of x and the partner whose label is y_mix
    partner = (batch["x_mix"] - lam.view(-1, 1, 1, 1) * x) / (1 - lam).clamp_min(1e-6).view(-1, 1, 1, 1)
    for i in range(b):
        if lam[i] < 0.99:
            j = int(((x - partner[i]).flatten(1).abs().amax(1)).argmin())
            assert torch.allclose(x[j], partner[i], atol=1e-3) and int(y[j]) == int(batch["y_mix"][i])


def test_make_batch_errors():
    with pytest.raises(ValueError):
        make_batch(torch.rand(3, 8, 8), torch.zeros(3, dtype=torch.long), torch.Generator())
    with pytest.raises(ValueError):
        make_batch(torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.long), torch.Generator(), mixup_alpha=0.0)


def test_cnn_losses(splits):
    torch.manual_seed(0)
    model = SmallCNN()
    batch = next(iter(DigitBatches(splits.x_train, splits.y_train, 16)))
    losses = model(batch)
    assert set(losses) == set(TASKS)
    # at init: ~uniform predictions, so CE ~ log(#classes)
    assert losses["cls"].item() == pytest.approx(np.log(10), abs=0.3)
    assert losses["rot"].item() == pytest.approx(np.log(4), abs=0.3)
    assert len(list(DigitBatches(splits.x_train, splits.y_train, 32))) == 4  # 100 = 3 * 32 + 4


def test_meltr_prefit_to_sum():
    torch.manual_seed(0)
    meltr = MELTR(TASKS, hidden=32, d_model=32, ff=64, nhead=4)
    lv = torch.tensor([[0.5, 1.0, 2.0], [2.5, 0.1, 0.3]])
    assert (meltr(lv) - lv.sum(-1)).abs().max() > 0.5  # not already the sum
    mse = fit_meltr_to_sum(meltr, steps=200)
    assert mse < 0.05
    assert torch.allclose(meltr(lv), lv.sum(-1), atol=0.3)


def test_solver_defaults():
    assert solver_from_name("aid-cg").iters == 5
    assert solver_from_name("itd", steps=2).steps == 2
    with pytest.raises(ValueError):
        solver_from_name("newton")


class _Start(bl.Callback):
    """Records f on a fixed meta batch and MELTR's parameters when the fit starts."""

    def __init__(self, meta_batch):
        self.meta_batch = meta_batch

    def on_fit_start(self, trainer):
        self.obj = make_objectives(trainer.model, trainer.meta_model, "cls", gamma=1.0)[3]
        self.f0 = float(self.obj.outer(trainer.params, trainer.hparams, self.meta_batch))
        self.phi0 = {k: v.clone() for k, v in trainer.hparams.items()}


@pytest.mark.parametrize("solver", ["aid-fp-lite", "aid-cg"])
def test_meltr_steps_lower_the_hyperobjective(splits, solver):
    """f = L_cls + gamma R on a fixed meta batch goes down after a few epochs of MELTR training, and
    MELTR's parameters moved (the hyper steps ran)."""
    cfg = ImageConfig(epochs=8, lr=3e-3, solver=solver, gamma=1.0)
    start = _Start(make_batch(splits.x_meta, splits.y_meta, torch.Generator().manual_seed(0)))
    res, trainer = train_method("meltr", splits, cfg, seed=0, callbacks=(start,), progress=False)
    assert trainer.hyper_steps == trainer.inner_updates // cfg.hyper_every > 0
    f1 = float(start.obj.outer(trainer.params, trainer.hparams, start.meta_batch))
    assert f1 < 0.7 * start.f0
    moved = sum(float((start.phi0[k] - v).abs().sum()) for k, v in trainer.hparams.items())
    assert moved > 1e-3
    assert res.history[-1]["val_acc"] > 0.5


def test_baselines_run_in_the_trainer(splits):
    cfg = ImageConfig(epochs=1)
    _, trainer = train_method("mtl", splits, cfg, seed=0, baseline_meta=True, progress=False)
    assert trainer.solver is None and trainer.hyper_steps == 0
    assert trainer.inner_updates == len(DigitBatches(torch.zeros(130), torch.zeros(130), cfg.batch_size))
    with pytest.raises(ValueError):
        train_method("aux-only", splits, cfg)
    assert isinstance(trainer, bl.BilevelTrainer)


def test_write_section(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("<!-- BEGIN a -->\nA\n<!-- END a -->\n")
    write_section(path, "meltr_image", "x")
    write_section(path, "meltr_image", "y")
    text = path.read_text()
    assert "A" in text and "\ny\n" in text and "\nx\n" not in text


def test_cli_smoke(tmp_path, capsys):
    rc = main(["--seeds", "0", "--epochs", "1", "--n-train", "50", "--n-meta", "20", "--n-val", "50",
               "--no-meta-baselines", "--no-progress", "--plot", str(tmp_path / "p.png"),
               "--write-results", str(tmp_path / "r.md"), "--set", "hyper_every=1",
               "--solver", "aid-fp-lite", "itd"])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| MELTR (aid-fp-lite; train, meta for f) |" in out and "hyper_every=1" in out
    assert "| MELTR (itd; train, meta for f) |" in out
    assert "{cfg" not in out and "{a." not in out  # every placeholder was formatted
    assert "± +" not in out  # a std is unsigned
    with pytest.raises(SystemExit):
        main(["--set", "nonsense=1"])
