"""MOSI sentiment (examples/meltr_sentiment): the pickle loader, the metrics (vs scikit-learn / scipy), the head."""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error

from examples.meltr_sentiment.data import MODALITIES, SPLITS, collate_mosi, load_mosi, make_synthetic_mosi
from examples.meltr_sentiment.metrics import SentimentMetricWarning, sentiment_metrics
from examples.meltr_sentiment.model import SentimentRegressor, evaluate
from examples.meltr_sentiment.run import main
from examples.meltr_video.data import UnsafePickleError, safe_load_pickle

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
SIZES = {"train": 7, "valid": 5, "test": 4}


def mosi_dict(
    seed: int = 0, L: int = 6, dims: tuple[int, int, int] = (300, 20, 5), label_shape: str = "N11", ids: bool = True
) -> dict:
    """A small dict in the MulT MOSI layout (left zero-padded segments, labels multiples of 1/3)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        part = {}
        lengths = rng.integers(1, L + 1, size=n)
        for m, d in zip(MODALITIES, dims, strict=True):
            x = rng.normal(size=(n, L, d)).astype(np.float32)
            for i, ln in enumerate(lengths):
                x[i, : L - ln] = 0.0
            part[m] = x
        y = np.round(rng.uniform(-3, 3, size=n) * 3) / 3
        y[0] = 0.0
        shape = {"N": (n,), "N1": (n, 1), "N11": (n, 1, 1)}[label_shape]
        part["labels"] = y.astype(np.float32).reshape(shape)
        if ids:
            part["id"] = np.array([[f"vid{i}".encode(), b"1", b"2"] for i in range(n)])
        out[split] = part
    return out


def dump(obj, path: Path) -> Path:
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=4)
    return path


# ------------------------------------------------------------------------------------------ loader


@pytest.mark.parametrize("label_shape", ["N", "N1", "N11"])
@pytest.mark.parametrize("dims", [(300, 20, 5), (300, 35, 74)])
def test_load_real_layout(tmp_path, label_shape, dims):
    raw = mosi_dict(dims=dims, label_shape=label_shape)
    splits = load_mosi(dump(raw, tmp_path / "mosi_data.pkl"))
    assert splits.dims == dict(zip(MODALITIES, dims, strict=True))
    assert splits.total_nonfinite == 0
    for split in SPLITS:
        ds = splits[split]
        assert len(ds) == SIZES[split]
        for m in MODALITIES:
            np.testing.assert_array_equal(getattr(ds, m).numpy(), raw[split][m])
        np.testing.assert_array_equal(ds.labels.numpy(), raw[split]["labels"].reshape(-1))
        item = ds[1]
        assert set(item) == {"text", "vision", "audio", "label", "id"}
        assert item["id"] == "vid1|1|2" and item["label"].shape == ()
        assert item["audio"].shape == (6, dims[2])


def test_load_mmsa_layout_and_missing_ids(tmp_path):
    """MMSA's aligned_50.pkl: 'regression_labels' [N], string ids, extra keys (an object array of raw text)."""
    raw = mosi_dict(ids=False)
    for part in raw.values():
        n = len(part["labels"])
        part["regression_labels"] = part.pop("labels").reshape(n)
        part["raw_text"] = np.array([f"text {i}" for i in range(n)], dtype=object)
        part["audio_lengths"] = [6] * n
    raw["valid"]["id"] = np.array([f"clip$_${i}" for i in range(SIZES["valid"])])
    splits = load_mosi(dump(raw, tmp_path / "aligned_50.pkl"))
    np.testing.assert_array_equal(splits.test.labels.numpy(), raw["test"]["regression_labels"])
    assert splits.train.ids[:2] == ["train_0", "train_1"]
    assert splits.valid.ids[3] == "clip$_$3"


def _set(split, key, value):
    def f(d):
        d[split][key] = value(d[split]) if callable(value) else value

    return f


def _del(*path):
    def f(d):
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]

    return f


MALFORMED = {
    "top level a list": (lambda d: [d], "expected a dict"),
    "no splits": (lambda d: {"x": d["train"]}, "missing split"),
    "missing split": (_del("valid"), "'valid'"),
    "split not a dict": (lambda d: d.update(test=[1, 2]), "'test'"),
    "missing modality": (_del("train", "vision"), "'vision'"),
    "missing labels": (_del("test", "labels"), "'labels'"),
    "ragged N": (_set("train", "audio", lambda p: p["audio"][:-1]), "'audio'"),
    "labels N mismatch": (_set("valid", "labels", lambda p: p["labels"][:-1]), "'labels'"),
    "label out of range": (_set("test", "labels", lambda p: p["labels"] * 0 + 3.5), "'labels'"),
    "label nan": (
        _set(
            "train", "labels", lambda p: np.where(np.arange(len(p["labels"]))[:, None, None] == 2, np.nan, p["labels"])
        ),
        "'labels'",
    ),
    "label shape N2": (_set("train", "labels", lambda p: np.zeros((len(p["labels"]), 2))), "'labels'"),
    "features 2-D": (_set("valid", "text", lambda p: p["text"][:, 0]), "'text'"),
    "features 4-D": (_set("valid", "vision", lambda p: p["vision"][..., None]), "'vision'"),
    "features not numeric": (_set("train", "audio", lambda p: p["audio"].astype(str)), "'audio'"),
    "features object": (_set("train", "text", np.array([None] * 7, dtype=object)), "'text'"),
    "empty L": (_set("test", "audio", lambda p: p["audio"][:, :0]), "'audio'"),
    "width differs across splits": (_set("test", "vision", lambda p: p["vision"][..., :7]), "'vision'"),
    "id count": (_set("train", "id", lambda p: p["id"][:-2]), "'id'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_name_file_and_key(tmp_path, case):
    mutate, needle = MALFORMED[case]
    raw = mosi_dict()
    new = mutate(raw)
    raw = raw if new is None else new
    path = dump(raw, tmp_path / f"bad_{case.replace(' ', '_')}.pkl")
    with pytest.raises(ValueError) as e:
        load_mosi(path)
    assert path.name in str(e.value) and needle in str(e.value), str(e.value)


def test_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pkl"):
        load_mosi(tmp_path / "nope.pkl")
    bad = tmp_path / "truncated.pkl"
    bad.write_bytes(pickle.dumps(mosi_dict())[:100])
    with pytest.raises(ValueError, match=r"truncated\.pkl"):
        load_mosi(bad)


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_System, _Exec])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload):
    marker = tmp_path / "pwned"
    raw = mosi_dict()
    raw["train"]["audio"] = payload(marker)
    path = dump(raw, tmp_path / "evil.pkl")
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl"):
        load_mosi(path)
    assert not marker.exists()


def test_nonfinite_features_replaced_and_counted(tmp_path, caplog):
    raw = mosi_dict()
    raw["train"]["audio"][1, 3, 2] = -np.inf  # COVAREP's -inf
    raw["train"]["audio"][4, 5, 0] = -np.inf
    raw["test"]["audio"][0, 5, 4] = -np.inf
    raw["valid"]["vision"][2, 5, 1] = np.nan
    raw["valid"]["text"][3, 5, 7] = np.inf
    path = dump(raw, tmp_path / "inf.pkl")
    with caplog.at_level(logging.WARNING, logger="examples.meltr_sentiment.data"):
        splits = load_mosi(path)
    assert splits.nonfinite == {
        "train": {"text": 0, "vision": 0, "audio": 2},
        "valid": {"text": 1, "vision": 1, "audio": 0},
        "test": {"text": 0, "vision": 0, "audio": 1},
    }
    assert splits.total_nonfinite == 5
    assert splits.train.audio[1, 3, 2].item() == 0.0 and splits.valid.vision[2, 5, 1].item() == 0.0
    for split in SPLITS:
        for m in MODALITIES:
            assert torch.isfinite(getattr(splits[split], m)).all()
    # the other values are untouched
    expect = raw["train"]["audio"].copy()
    expect[~np.isfinite(expect)] = 0
    np.testing.assert_array_equal(splits.train.audio.numpy(), expect)
    assert sum("inf.pkl" in r.getMessage() for r in caplog.records) == 3
    with pytest.raises(ValueError, match=r"inf\.pkl.*'train'.*'audio'.*2 non-finite"):
        load_mosi(path, replace_nonfinite=False)


def test_collate_masks_and_padding():
    items = []
    for L, label in ((4, 1.0), (6, -2.0)):
        x = {m: torch.randn(L, d) for m, d in zip(MODALITIES, (5, 3, 2), strict=True)}
        x["text"][0] = 0  # a padded timestep
        items.append({**x, "label": torch.tensor(label), "id": f"s{L}"})
    b = collate_mosi(items)
    assert b["text"].shape == (2, 6, 5) and b["audio"].shape == (2, 6, 2)
    assert b["text_mask"].tolist() == [[False, True, True, True, False, False], [False] + [True] * 5]
    assert b["vision_mask"].tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    torch.testing.assert_close(b["label"], torch.tensor([1.0, -2.0]))
    assert b["id"] == ["s4", "s6"]
    with pytest.raises(ValueError, match=r"'vision'.*widths"):
        collate_mosi([items[0], {**items[1], "vision": torch.randn(6, 4)}])


# ----------------------------------------------------------------------------------------- metrics

GRID = st.integers(-9, 9).map(lambda k: k / 3)  # MOSI-like labels: many exact zeros
FLOATS = st.floats(-4, 4, allow_nan=False).map(lambda x: round(x, 3))


@settings(max_examples=120, deadline=None)
@given(data=st.data(), n=st.sampled_from([1, 2, 3, 5, 8, 13, 40, 97]))
def test_metrics_match_sklearn_and_scipy(data, n):
    y = np.array(data.draw(st.lists(GRID, min_size=n, max_size=n)))
    p = np.array(data.draw(st.lists(st.one_of(GRID, FLOATS, st.just(0.0)), min_size=n, max_size=n)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sentiment_metrics(p, y)
    ours = [w for w in caught if issubclass(w.category, SentimentMetricWarning)]

    assert m["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-12)
    assert m["acc2_nonneg"] == pytest.approx(accuracy_score(y >= 0, p >= 0))
    assert m["f1_nonneg"] == pytest.approx(f1_score(y >= 0, p >= 0, average="weighted", zero_division=0.0))
    nz = y != 0
    assert m["n_nonzero"] == int(nz.sum())
    if nz.any():
        assert m["acc2_nonzero"] == pytest.approx(accuracy_score(y[nz] > 0, p[nz] > 0))
        assert m["f1_nonzero"] == pytest.approx(f1_score(y[nz] > 0, p[nz] > 0, average="weighted", zero_division=0.0))
    else:
        assert np.isnan(m["acc2_nonzero"]) and np.isnan(m["f1_nonzero"])
        assert any("every label is 0" in str(w.message) for w in ours)
    if n >= 2 and np.ptp(p) > 0 and np.ptp(y) > 0:
        assert m["corr"] == pytest.approx(scipy.stats.pearsonr(p, y).statistic, abs=1e-9)
    else:
        assert np.isnan(m["corr"]) and any("Pearson" in str(w.message) for w in ours)
    # Acc-7 / Acc-5: classes from sklearn's accuracy on MulT's rounded, clipped values
    for key, c in (("acc7", 3), ("acc5", 2)):
        ref = accuracy_score(np.round(np.clip(y, -c, c)).astype(int), np.round(np.clip(p, -c, c)).astype(int))
        assert m[key] == pytest.approx(ref)


def test_metric_conventions_by_hand():
    """Zero labels: >= 0 counts them positive (all samples); > 0 drops them (non-zero variant)."""
    y = np.array([-1.0, 0.0, 0.0, 2.0])
    p = np.array([0.5, -0.2, 0.0, 1.0])
    m = sentiment_metrics(p, y)
    # non-negative: truth [F, T, T, T], pred [T, F, T, T] -> 2 of 4 right
    assert m["acc2_nonneg"] == 0.5
    # class F: tp 0 -> F1 0 (weight 1/4); class T: tp 2, fp 1, fn 1 -> F1 4/6 (weight 3/4)
    assert m["f1_nonneg"] == pytest.approx(0.75 * 4 / 6)
    # non-zero: samples 0 and 3, truth [F, T], pred [T, T]
    assert m["acc2_nonzero"] == 0.5 and m["n_nonzero"] == 2
    assert m["f1_nonzero"] == pytest.approx(0.5 * 2 / 3)
    assert m["mae"] == pytest.approx((1.5 + 0.2 + 0 + 1) / 4)
    # Acc-7 uses numpy's round-half-to-even, as MulT: 0.5 -> 0 and 2.5 -> 2, 3.7 is clipped to 3
    m7 = sentiment_metrics([0.5, 2.5, 3.7, -1.5], [0.0, 2.0, 3.0, -2.0])
    assert m7["acc7"] == 1.0


def test_metric_edge_cases():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = sentiment_metrics([0.3, -0.2, 1.0], [0.0, 0.0, 0.0])
    msgs = [str(w.message) for w in caught if issubclass(w.category, SentimentMetricWarning)]
    assert any("every label is 0" in x for x in msgs) and any("constant labels: True" in x for x in msgs)
    assert np.isnan(m["acc2_nonzero"]) and np.isnan(m["f1_nonzero"]) and m["n_nonzero"] == 0
    assert np.isnan(m["corr"]) and m["acc2_nonneg"] == pytest.approx(2 / 3)
    with pytest.warns(SentimentMetricWarning, match="Pearson"):
        m = sentiment_metrics([1.0, 1.0, 1.0], [-1.0, 0.0, 2.0])
    assert np.isnan(m["corr"]) and m["acc2_nonneg"] == pytest.approx(2 / 3)
    # shapes [N, 1, 1] and tensors are accepted and flattened
    m = sentiment_metrics(torch.tensor([[[1.0]], [[-2.0]]]), np.array([[2.0], [-1.0]]))
    assert m["corr"] == pytest.approx(1.0) and m["mae"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="preds has 2 values but labels has 3"):
        sentiment_metrics([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"preds.*non-finite"):
        sentiment_metrics([np.nan, 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="labels: empty"):
        sentiment_metrics([1.0], [])
    with pytest.raises(TypeError, match="labels"):
        sentiment_metrics([1.0], ["a"])


# ------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("mosi") / "synth.pkl"
    make_synthetic_mosi(path, seed=3, sizes={"train": 96, "valid": 32, "test": 32}, seq_len=8, dims=(24, 6, 4))
    return load_mosi(path)


def test_synthetic_file_is_real_format(synth):
    raw = safe_load_pickle(synth.path)
    assert raw["train"]["labels"].shape == (96, 1, 1) and raw["train"]["id"].shape == (96, 3)
    y = np.concatenate([synth[s].labels.numpy() for s in SPLITS])
    assert np.abs(y).max() <= 3 and (y == 0).any() and (y > 0).any() and (y < 0).any()
    assert synth.nonfinite["train"]["audio"] == 25 and synth.total_nonfinite == 75


def _batch(ds, idx):
    return collate_mosi([ds[i] for i in idx])


def test_regressor_shapes_losses_and_errors(synth):
    torch.manual_seed(0)
    model = SentimentRegressor.for_data(synth, hidden=16, ff=32, heads=2, max_len=16)
    b = _batch(synth.train, range(5))
    assert model.predict(b).shape == (5,)
    out = model(b)
    assert list(out) == ["sentiment"] and out["sentiment"].ndim == 0
    mse = torch.mean((model.predict(b) - b["label"]) ** 2)
    torch.testing.assert_close(out["sentiment"], mse)
    assert model(b, losses=()) == {}
    with pytest.raises(ValueError, match="unknown loss"):
        model(b, losses=("mae",))
    with pytest.raises(ValueError, match=r"batch\['vision'\].*\[B, L, 6\]"):
        model.predict({**b, "vision": torch.randn(5, 8, 7)})
    with pytest.raises(ValueError, match="max_len"):
        model.predict({**b, "text": torch.randn(5, 20, 24), "text_mask": None})
    with pytest.raises(ValueError, match="loss must be"):
        SentimentRegressor(3, 3, 3, loss="huber")
    l1 = SentimentRegressor.for_data(synth, hidden=16, ff=32, heads=2, loss="l1")
    torch.testing.assert_close(l1(b)["sentiment"], torch.mean(torch.abs(l1.predict(b) - b["label"])))


def test_regressor_deterministic_padding_invariant_and_twice_differentiable(synth):
    torch.manual_seed(1)
    model = SentimentRegressor.for_data(synth, hidden=16, ff=32, heads=2, max_len=16)
    b = _batch(synth.valid, range(4))
    torch.testing.assert_close(model.predict(b), model.predict(b), rtol=0, atol=0)  # dropout 0, train mode
    padded = dict(b)
    for m in MODALITIES:  # trailing all-zero timesteps are masked out
        padded[m] = torch.cat([b[m], torch.zeros(4, 3, b[m].shape[-1])], dim=1)
        padded[f"{m}_mask"] = torch.cat([b[f"{m}_mask"], torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model.predict(padded), model.predict(b), rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(model(b)["sentiment"], params, create_graph=True)
    gg = torch.autograd.grad(sum((x**2).sum() for x in g), params, allow_unused=True)
    assert any(x is not None and x.abs().sum() > 0 for x in gg)


def test_adam_steps_reduce_the_loss(synth):
    torch.manual_seed(2)
    model = SentimentRegressor.for_data(synth, hidden=16, ff=32, heads=2, max_len=16)
    b = _batch(synth.train, range(32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = model(b)["sentiment"].item()
    for _ in range(25):
        loss = model(b)["sentiment"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model(b)["sentiment"].item()
    assert after < 0.5 * before, (before, after)
    m = evaluate(model, synth.train)
    assert set(m) >= {"mae", "corr", "acc2_nonneg", "f1_nonzero", "acc7"}


# --------------------------------------------------------------------------------------------- CLI


def test_demo_cli_in_process(capsys):
    t0 = time.perf_counter()
    res = main(["--demo", "--epochs", "2", "--no-progress", "--seed", "1"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "non-finite values replaced by 0: 75" in out and "test:  mae=" in out
    assert res["best_epoch"] in (1, 2) and len(res["history"]) == 2
    assert 0 <= res["test"]["acc2_nonneg"] <= 1 and np.isfinite(res["test"]["mae"])
    assert elapsed < 30, elapsed


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--demo", "--epochs", "0"])
    assert e.value.code == 2 and "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--epochs", "1"])  # neither --data nor --demo


@pytest.mark.slow
def test_demo_cli_module_entry_point_learns():
    """``python -m ... --demo`` with its defaults: it runs, and beats predicting the train median on test."""
    proc = subprocess.run(
        [sys.executable, "-m", "examples.meltr_sentiment.run", "--demo", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "replaced non-finite feature values by 0" in proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("test:"))
    vals = dict(kv.split("=") for kv in line.split()[1:])
    assert float(vals["mae"]) < 1.3 and float(vals["corr"]) > 0.5, line


# ------------------------------------------------------------------- MELTR fine-tuning (latent data)

from examples.meltr_sentiment.finetune import (  # noqa: E402
    SentimentConfig,
    latent_splits,
    prefit_meltr_state,
    sentiment_splits,
    train_method,
)
from examples.meltr_sentiment.multitask import LOSS_NAMES, MaskingCollate, MultiTaskSentiment  # noqa: E402
from examples.meltr_sentiment.results import ROWS, paired_difference, run_comparison  # noqa: E402
from examples.meltr_sentiment.results import main as results_main  # noqa: E402
from examples.meltr_sentiment.synthetic import latent_mosi_arrays, make_latent_mosi  # noqa: E402

TINY_SIZES = {"train": 40, "valid": 16, "test": 16}
TINY_KW = {"sizes": TINY_SIZES, "seq_len": 6, "dims": (12, 6, 4), "n_neg_inf": 3}
TINY_MODEL = {"hidden": 8, "heads": 2, "ff": 16, "batch_size": 8, "meltr_hidden": 8, "meltr_d": 8, "meltr_ff": 16}
TINY_MODEL |= {"meltr_heads": 2, "meltr_prefit_steps": 20}


@pytest.fixture(scope="module")
def tiny():
    return latent_splits(3, meta_size=8, **TINY_KW)


def test_latent_data_is_a_function_of_its_seed(tmp_path):
    a, b, c = (latent_mosi_arrays(s, **TINY_KW) for s in (5, 5, 6))
    for split in SPLITS:
        for k in (*MODALITIES, "labels", "sentiment"):
            np.testing.assert_array_equal(a[split][k], b[split][k])
        assert not np.array_equal(a[split]["text"], c[split]["text"])
        assert np.isneginf(a[split]["audio"]).sum() == 3
        y = a[split]["labels"].reshape(-1)
        np.testing.assert_allclose(y * 3, np.round(y * 3), atol=1e-5)
        assert np.abs(y).max() <= 3
    # the label follows the latent sentiment, which every modality sees: a least-squares read-out of s from
    # each modality's mean features (fitted on train) correlates with s on test
    big = latent_mosi_arrays(0, sizes={"train": 400, "valid": 8, "test": 200})
    s_tr, s_te = big["train"]["sentiment"], big["test"]["sentiment"]
    assert np.corrcoef(s_tr, big["train"]["labels"].reshape(-1))[0, 1] > 0.9
    for m in MODALITIES:
        x_tr, x_te = (np.nan_to_num(big[s][m], neginf=0.0).mean(1) for s in ("train", "test"))
        w, *_ = np.linalg.lstsq(np.c_[x_tr, np.ones(len(x_tr))], s_tr, rcond=None)
        r = np.corrcoef(np.c_[x_te, np.ones(len(x_te))] @ w, s_te)[0, 1]
        assert r > 0.3, (m, r)
    # the written file is the MOSI format the loader reads, minus the latent
    splits = load_mosi(make_latent_mosi(tmp_path / "latent.pkl", 5, **TINY_KW))
    np.testing.assert_array_equal(splits.valid.labels.numpy(), a["valid"]["labels"].reshape(-1))
    assert "sentiment" not in safe_load_pickle(tmp_path / "latent.pkl")["train"]
    with pytest.raises(ValueError, match="seq_len"):
        latent_mosi_arrays(0, seq_len=1)
    with pytest.raises(ValueError, match="missing"):
        latent_mosi_arrays(0, sizes={"train": 4})


def test_splits_are_disjoint_and_cover_the_file(tmp_path):
    splits = load_mosi(make_latent_mosi(tmp_path / "latent.pkl", 1, **TINY_KW))
    data = sentiment_splits(splits, meta_size=8, split_seed=2)
    train, meta = set(data["train"].ids), set(data["meta"].ids)
    assert len(meta) == 8 and len(train) == 32 and not train & meta
    assert train | meta == set(splits.train.ids)
    assert data["val"] is splits.valid and data["test"] is splits.test
    by_id = dict(zip(splits.train.ids, splits.train.labels.tolist(), strict=True))
    assert data["meta"].labels.tolist() == [by_id[i] for i in data["meta"].ids]
    assert sentiment_splits(splits, 8, split_seed=3)["meta"].ids != data["meta"].ids
    for bad in (0, 40, 2.5):
        with pytest.raises(ValueError, match="meta_size"):
            sentiment_splits(splits, bad)


def test_masking_collate_and_multitask_losses(tiny):
    items = [tiny["train"][i] for i in range(6)]
    b1 = MaskingCollate(torch.Generator().manual_seed(0), rate=0.25)(items)
    b2 = MaskingCollate(torch.Generator().manual_seed(0), rate=0.25)(items)
    for m in MODALITIES:
        torch.testing.assert_close(b1[f"{m}_recon"], b2[f"{m}_recon"], rtol=0, atol=0)
        real, recon = b1[f"{m}_mask"], b1[f"{m}_recon"]
        assert not (recon & ~real).any()
        want = [max(1, round(0.25 * int(n))) for n in real.sum(1)]
        assert recon.sum(1).tolist() == want
    torch.manual_seed(0)
    model = MultiTaskSentiment.for_dims(tiny["train"].dims, hidden=8, heads=2, ff=16)
    out = model(b1)
    assert tuple(out) == LOSS_NAMES and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["sentiment"], (model.predict(b1) - b1["label"]).abs().mean())
    assert tuple(model(b1, losses=("recon_audio", "sentiment"))) == ("recon_audio", "sentiment")
    with pytest.raises(ValueError, match="unknown loss"):
        model(b1, losses=("mlm",))
    with pytest.raises(KeyError, match="text_recon"):
        model({k: v for k, v in b1.items() if k != "text_recon"}, losses=("recon_text",))
    # the masked pass never sees a masked timestep's features: changing them changes nothing but the target
    changed = dict(b1)
    changed["vision"] = torch.where(b1["vision_recon"].unsqueeze(-1), torch.randn_like(b1["vision"]), b1["vision"])
    torch.testing.assert_close(model._encode(changed, masked=True)["H"], model._encode(b1, masked=True)["H"])
    assert not torch.allclose(model._encode(changed, masked=False)["H"], model._encode(b1, masked=False)["H"])
    # trailing padding changes no prediction
    padded = dict(b1)
    for m in MODALITIES:
        padded[m] = torch.cat([b1[m], torch.zeros(6, 2, b1[m].shape[-1])], dim=1)
        padded[f"{m}_mask"] = torch.cat([b1[f"{m}_mask"], torch.zeros(6, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model.predict(padded), model.predict(b1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "over",
    [ROWS["single"], ROWS["mtl"], ROWS["mtl+meta"], ROWS["MELTR AID-FP-Lite"], ROWS["MELTR AID-CG"]],
    ids=list(ROWS),
)
def test_each_method_trains_through_the_trainer(tiny, over):
    cfg = SentimentConfig(**over, **TINY_MODEL, epochs=2, K=1, seed=4)
    res = train_method(cfg, tiny, max_steps=3)
    assert res["steps"] == 3 and len(res["history"]) == 1  # 4 batches per epoch: stopped inside epoch 1
    assert res["hyper_steps"] == (3 if over["method"] == "meltr" else 0)
    assert res["best_epoch"] == 1 and np.isfinite(res["test"]["mae"]) and np.isfinite(res["best_val"]["mae"])
    if over["method"] == "meltr":
        w = res["history"][0]["meltr_weights"]
        assert list(w) == list(LOSS_NAMES) and all(np.isfinite(v) for v in w.values())
    else:
        assert "meltr_weights" not in res["history"][0]
    again = train_method(cfg, tiny, max_steps=3)  # deterministic: same init, order, masks
    assert again["best_val"] == res["best_val"] and again["test"] == res["test"]


def _sum_fit(meltr, lv):
    from examples.meltr_video.meltr import loss_gradient

    with torch.no_grad():
        out = float(meltr(lv))
    return loss_gradient(meltr, lv), out


def test_prefit_meltr_state_is_cached_and_fits_towards_the_sum():
    from examples.meltr_video.meltr import MELTR

    lv = 5.0 * torch.rand(64, 8, generator=torch.Generator().manual_seed(9)) * torch.rand(64, 1)
    meltr = MELTR(LOSS_NAMES, hidden=8, d_model=8, ff=16, nhead=2)
    meltr.load_state_dict(prefit_meltr_state(8, 8, 16, 2, steps=0))
    before = (meltr(lv) - lv.sum(-1)).pow(2).mean()
    state = prefit_meltr_state(8, 8, 16, 2, steps=100)
    meltr.load_state_dict(state)
    after = (meltr(lv) - lv.sum(-1)).pow(2).mean()
    assert after < 0.7 * before, (before, after)
    state["head.weight"].zero_()  # a copy: the cache is untouched
    again = prefit_meltr_state(8, 8, 16, 2, steps=100)
    assert again["head.weight"].abs().sum() > 0


@pytest.mark.slow
def test_prefit_meltr_default_starts_as_the_sum():
    """The module every MELTR run starts from: d L_aux / d L_t within 0.35 of 1 near the losses of a run."""
    from examples.meltr_video.meltr import MELTR

    meltr = MELTR(LOSS_NAMES, hidden=32, d_model=32, ff=64, nhead=4)
    meltr.load_state_dict(prefit_meltr_state())
    for point in ([0.3, 0.3, 0.4, 0.5, 1.0, 0.5, 0.5, 0.5], [1.1, 1.1, 1.1, 1.1, 4.2, 1.0, 1.0, 1.0]):
        w, out = _sum_fit(meltr, torch.tensor(point))
        assert ((w - 1).abs() < 0.35).all() and abs(out - sum(point)) < 0.1 * sum(point), (point, w, out)


def test_config_refuses_bad_values():
    for kw, match in [
        ({"method": "sum"}, "method"),
        ({"solver": "itd"}, "solver"),
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"gamma": float("nan")}, "gamma"),
        ({"mask_rate": 0.0}, "mask_rate"),
        ({"method": "meltr", "train_on_meta": True}, "train_on_meta"),
    ]:
        with pytest.raises(ValueError, match=match):
            SentimentConfig(**kw)


def test_paired_difference_and_a_tiny_comparison(tiny):
    p = paired_difference([0.5, 0.7, 0.9], [0.6, 0.6, 1.0], lower_is_better=True)
    assert p["mean"] == pytest.approx(-1 / 30) and p["wins"] == 2 and p["n"] == 3
    assert paired_difference([1.0, 2.0], [0.0, 3.0], lower_is_better=False)["wins"] == 1
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1.0], [1.0, 2.0], True)
    rows = ["single", "mtl", "MELTR AID-FP-Lite"]
    rec = run_comparison(rows, [0, 1], [3e-3, 1e-2], 1, data=tiny, progress=False, **TINY_MODEL)
    assert list(rec["rows"]) == rows
    for row in rec["rows"].values():
        assert row["lr"] in (3e-3, 1e-2) and len(row["runs"]) == 2 and set(row["search"]) == {"0.003", "0.01"}
        best = min(row["search"].values(), key=lambda s: s["best_val"]["mae"])
        assert row["search"][f"{row['lr']:g}"] is best
        assert [r["seed"] for r in row["runs"]] == [0, 1]
    mtl = rec["rows"]["mtl"]
    assert mtl["vs_mtl"]["mae"] == {"mean": 0.0, "std": 0.0, "wins": 0, "n": 2}
    lite = rec["rows"]["MELTR AID-FP-Lite"]
    d = [a["test"]["corr"] - b["test"]["corr"] for a, b in zip(lite["runs"], mtl["runs"], strict=True)]
    assert lite["vs_mtl"]["corr"]["mean"] == pytest.approx(np.mean(d))
    from examples.meltr_sentiment.results import markdown

    text = markdown(rec, "python -m examples.meltr_sentiment.results", "test machine")
    assert "| MELTR AID-FP-Lite |" in text and "Paired difference to MTL" in text and "widths 12 / 6 / 4" in text
    assert "MELTR AID-FP-Lite: MELTR's weights" in text and "single: test MAE vs mtl" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0"], "N >= 1"),
        (["--seeds", "a,b"], "expected N"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--lr-grid", "x"], "not a number"),
        (["--lr-grid", "0,1e-3"], "finite and > 0"),
        (["--lr-grid", "1e-3,1e-3"], "repeats"),
        (["--rows", "single,nope"], "distinct rows"),
        (["--rows", "mtl,mtl"], "distinct rows"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--data-seed", "-1"], "--data-seed must be >= 0"),
        (["--seeds", "999-1000"], "search seed"),
        (["--epochs", "two"], "invalid int"),
    ],
)
def test_results_cli_refuses_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        results_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
