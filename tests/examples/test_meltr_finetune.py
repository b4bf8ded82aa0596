"""Fine-tuning CLI / library (examples/meltr_video/finetune.py), analysis plots and the results script."""

from __future__ import annotations

import json

import pytest
import torch

from examples.meltr_video import finetune as ft
from examples.meltr_video.analysis import plot_response, plot_weights
from examples.meltr_video.data import Collate, make_digit_clips
from examples.meltr_video.pretrain import pretrain
from examples.meltr_video.results import parse_variant
from examples.meltr_video.univl import LOSS_NAMES, UniVL, UniVLConfig

SIZES = {"train": 16, "meta": 8, "val": 8, "test": 8}


pytestmark = pytest.mark.usefixtures("one_thread")  # small runs: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def data():
    return make_digit_clips(0, sizes=SIZES)


@pytest.fixture(scope="module")
def pretrained(data):
    """A tiny backbone 'pretrained' for 3 steps on the sum of the 8 losses (no cached file)."""
    tok = data.tokenizer
    torch.manual_seed(0)
    cfg = UniVLConfig.tiny(len(tok), hidden=16, heads=2, ff=32, text_layers=1, video_layers=1)
    model = UniVL(cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = Collate(tok)([data["train"][i] for i in range(8)])
    for _ in range(3):
        opt.zero_grad()
        sum(model(batch).values()).backward()
        opt.step()
    return model.state_dict(), cfg, tok


def cfg(**kw):
    base = dict(epochs=1, batch_size=4, sizes=SIZES, progress=False)
    base.update(kw)
    return ft.FinetuneConfig(**base)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize(
    "method,solver", [("single", "aid-fp-lite"), ("mtl", "aid-fp-lite"), ("meltr", "aid-fp-lite"), ("meltr", "aid-cg")]
)
def test_each_method_trains_and_writes_results(tmp_path, data, pretrained, method, solver):
    c = cfg(method=method, solver=solver, out=str(tmp_path / "run"))
    run = ft.FinetuneRun(c, data, pretrained)
    before_backbone = flat(run.backbone)
    before_meltr = flat(run.meltr) if run.meltr is not None else None
    run.run_epoch()
    res = run.finish()
    assert not torch.equal(flat(run.backbone), before_backbone)
    hyper = res["epochs"][0]["hyper_steps"]
    if method == "meltr":
        assert hyper == 1  # 4 inner steps, K = 3
        assert not torch.equal(flat(run.meltr), before_meltr)
        assert set(res["epochs"][0]["meltr"]["weights"]) == set(LOSS_NAMES)
        assert set(res["response"]["curves"]) == set(LOSS_NAMES)
    else:
        assert hyper == 0 and run.meltr is None
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["config"]["method"] == method and on_disk["name"] == c.name
    for key in ("R@1", "R@5", "R@10", "MedR"):
        assert 0 <= on_disk["test"][key] <= 100 or key == "MedR"
    assert on_disk["best_epoch"] == 1 and len(on_disk["epoch_seconds"]) == 1
    assert (tmp_path / "run" / "ckpt.pt").exists() and (tmp_path / "run" / "best.pt").exists()


def test_resume_matches_uninterrupted_run(tmp_path, data, pretrained):
    kw = dict(method="meltr", solver="aid-fp-lite", epochs=2)
    full = ft.FinetuneRun(cfg(out=str(tmp_path / "a"), **kw), data, pretrained)
    while not full.done:
        full.run_epoch()
    first = ft.FinetuneRun(cfg(out=str(tmp_path / "b"), **kw), data, pretrained)
    first.run_epoch()
    del first  # "killed" after epoch 1
    resumed = ft.FinetuneRun(cfg(out=str(tmp_path / "b"), resume=True, **kw), data, pretrained)
    assert resumed.epoch == 1 and len(resumed.history) == 1
    resumed.run_epoch()
    assert torch.equal(flat(full.backbone), flat(resumed.backbone))
    assert torch.equal(flat(full.meltr), flat(resumed.meltr))
    assert full.history[1]["inner_loss_mean"] == resumed.history[1]["inner_loss_mean"]
    assert full.finish()["test"] == resumed.finish()["test"]


def test_same_training_batches_for_all_methods(data, pretrained):
    """Hyper steps (incl. StocBiO's extra HVP batches) draw from their own generators."""
    states = []
    for method, solver in (("mtl", "aid-fp-lite"), ("meltr", "stocbio"), ("meltr", "itd")):
        run = ft.FinetuneRun(cfg(method=method, solver=solver), data, pretrained)
        run.run_epoch()
        states.append(run.gens["train_order"].get_state())
        states.append(run.gens["train_masks"].get_state())
    assert all(torch.equal(states[0 + i % 2], s) for i, s in enumerate(states))


def test_meta_batch_last10_and_captioning(data, pretrained):
    res = ft.finetune(cfg(method="meltr", solver="itd", meta_batch="last10"), data, pretrained)
    assert res["epochs"][0]["hyper_steps"] == 1
    res = ft.finetune(cfg(method="single", task="captioning"), data, pretrained)
    assert {"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"} <= set(res["test"])
    # METEOR (a Java process per call) on test only, and there whenever Java and pycocoevalcap are installed
    assert all("METEOR" not in e["val"] for e in res["epochs"])
    import importlib.util
    import shutil

    meteor = shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None
    assert ("METEOR" in res["test"]) == meteor


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        ft.FinetuneConfig(method="meta")
    with pytest.raises(ValueError, match="unknown solver"):
        ft.FinetuneConfig(solver="cg")
    with pytest.raises(ValueError, match="fewer than one batch"):
        ft.FinetuneConfig(sizes={"train": 8, "meta": 96, "val": 10, "test": 10})
    with pytest.raises(ValueError, match="K must"):
        ft.FinetuneConfig(K=0)
    with pytest.raises(ValueError, match="share_linearization needs an AID solver"):
        ft.FinetuneConfig(solver="itd", share_linearization=True)
    assert ft.FinetuneConfig(share_linearization=True).name == "meltr-aid-fp-lite-shared"
    ft.FinetuneConfig(method="mtl", solver="itd", share_linearization=True)  # ignored by the baselines
    with pytest.raises(ValueError, match="eval_threads"):
        ft.FinetuneConfig(eval_threads=0)


def test_eval_threads_apply_to_the_block_only():
    import torch

    from examples.meltr_video._util import num_threads

    before = torch.get_num_threads()
    with num_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with num_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(FileNotFoundError, match="pretrain"):
        ft.FinetuneRun(ft.FinetuneConfig(pretrained="/nonexistent.pt"))


def test_cli_end_to_end_with_resume(tmp_path, capsys):
    ck = tmp_path / "pre.pt"
    pretrain("tiny", ck, epochs=1, max_steps=1, pretrain_size=16, val_size=8, progress=False)
    args = ["--pretrained", str(ck), "--out", str(tmp_path / "cli"), "--batch-size", "4", "--train-size", "8"]
    args += ["--meta-size", "4", "--val-size", "4", "--test-size", "4", "--no-progress", "--solver", "aid-fp"]
    one = ft.main([*args, "--epochs", "1"])
    two = ft.main([*args, "--epochs", "2", "--resume"])
    assert len(one["epochs"]) == 1 and len(two["epochs"]) == 2
    assert two["epochs"][0]["val"] == one["epochs"][0]["val"]
    assert json.loads((tmp_path / "cli" / "results.json").read_text())["config"]["epochs"] == 2


def test_analysis_plots_and_variants(tmp_path, data, pretrained):
    res = ft.finetune(cfg(method="meltr", epochs=2), data, pretrained)
    for fn, name in ((plot_response, "r.png"), (plot_weights, "w.png")):
        path = fn(res, tmp_path / name)
        assert path.stat().st_size > 1000
    base = ft.finetune(cfg(method="mtl"), data, pretrained)
    with pytest.raises(ValueError, match="only MELTR"):
        plot_response(base, tmp_path / "x.png")
    assert parse_variant("meltr:aid-cg:K=1,gamma=0")[1] == {"method": "meltr", "solver": "aid-cg", "K": 1, "gamma": 0.0}
    with pytest.raises(ValueError):
        parse_variant("meltr:bogus=1")


# --------------------------------------------------------------- issue 8: Violet backbone and video QA


@pytest.fixture(scope="module")
def violet_pretrained(data):
    """A tiny random Violet with a k-means codebook fitted on the train clips (no cached file)."""
    from examples.meltr_video.violet import Violet, VioletConfig, fit_codebook

    tok = data.tokenizer
    torch.manual_seed(0)
    vcfg = VioletConfig.tiny(len(tok))
    model = Violet(vcfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    model.set_codebook(fit_codebook(data["train"].frames, vcfg.codebook_size, iters=3, seed=0))
    return model.state_dict(), vcfg, tok


@pytest.mark.parametrize(
    "backbone,task,names",
    [
        ("violet", "retrieval", ("vtm", "mlm", "mvm")),
        ("violet", "qa-oe", ("qa", "vtm", "mlm", "mvm")),
        ("univl", "qa-mc", ("qa", *LOSS_NAMES)),
    ],
)
def test_backbones_and_tasks_train_with_meltr(data, pretrained, violet_pretrained, backbone, task, names):
    """Each (backbone, task) pair runs MELTR end to end: MELTR sees the right losses, the head trains, metrics."""
    pre = violet_pretrained if backbone == "violet" else pretrained
    run = ft.FinetuneRun(cfg(backbone=backbone, task=task, method="meltr", solver="aid-cg"), data, pre)
    assert run.meltr is not None and run.meltr.task_names == names
    if backbone == "violet":  # MATH.md section 4: the official Violet config of MELTR
        assert run.meltr.scalar_embedding[2].out_features == 512
    before = flat(run.model)
    rec = run.run_epoch()
    assert rec["hyper_steps"] >= 1 and not torch.equal(before, flat(run.model))
    assert set(rec["meltr"]["weights"]) == set(names)
    res = run.finish()
    key = "R@1" if task == "retrieval" else "acc"
    assert 0.0 <= res["test"][key] <= 100.0 and set(res["response"]["curves"]) == set(names)


def test_single_task_qa_trains_the_answer_head(data, pretrained):
    run = ft.FinetuneRun(cfg(task="qa-oe", method="single"), data, pretrained)
    assert run.cfg.primary == "qa" and run.meltr is None
    batch = next(iter(run.loader))
    assert set(run.obj.backbone_fn(run.obj.params, batch)) == {"qa", *LOSS_NAMES}
    head = torch.cat([p.detach().reshape(-1) for p in run.model.head.parameters()])
    run.run_epoch()
    assert not torch.equal(head, torch.cat([p.detach().reshape(-1) for p in run.model.head.parameters()]))
    assert set(run.evaluate("val")) == {"acc"}


def test_backbone_task_mismatch_errors(data, pretrained, violet_pretrained):
    with pytest.raises(ValueError, match="holds a univl backbone"):
        ft.FinetuneRun(cfg(backbone="violet"), data, pretrained)
    with pytest.raises(ValueError, match="unknown task 'captioning' for backbone 'violet'"):
        cfg(backbone="violet", task="captioning")
    with pytest.raises(ValueError, match="unknown backbone"):
        cfg(backbone="clip")


def test_the_command_line_is_derived_from_the_config_fields():
    import argparse
    from dataclasses import fields

    from examples.meltr_video.config import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    flags = {a.dest for a in p._actions}
    declared = {f.name for f in fields(ft.FinetuneConfig) if "help" in f.metadata}
    assert declared <= flags and {"train_size", "meta_size", "val_size", "test_size", "no_progress"} <= flags
    a = p.parse_args(["--method", "weighted", "--weights", "alignment=1,decoder=0.5", "--batch-size", "8",
                      "--train-size", "32", "--share-linearization", "--no-progress", "--K", "5"])  # fmt: skip
    cfg = config_from_args(a)
    assert (cfg.method, cfg.batch_size, cfg.K, cfg.share_linearization, cfg.progress) == ("weighted", 8, 5, True, False)
    assert cfg.weights == {"alignment": 1.0, "decoder": 0.5} and cfg.sizes["train"] == 32
    assert cfg.sizes["test"] == ft.DATA_SIZES["testbed"]["test"] and cfg.lr == ft.FinetuneConfig().lr
    with pytest.raises(SystemExit):
        p.parse_args(["--solver", "newton"])


def test_resume_with_other_settings_is_refused_before_loading(tmp_path, data, pretrained):
    kw = dict(method="meltr", solver="aid-fp-lite", epochs=2, out=str(tmp_path / "r"))
    first = ft.FinetuneRun(cfg(**kw), data, pretrained)
    first.run_epoch()
    with pytest.raises(ValueError, match=r"other settings \(K: 3 -> 5, iters: 3 -> 7, lr: 0\.0001 -> 0\.5\)"):
        ft.FinetuneRun(cfg(**kw, resume=True, K=5, iters=7, lr=0.5), data, pretrained)
    more = ft.FinetuneRun(cfg(**{**kw, "epochs": 3}, resume=True), data, pretrained)  # more epochs: allowed
    assert more.epoch == 1


def test_cli_refuses_a_missing_pretrained_file_and_bad_threads(tmp_path, capsys):
    for argv, word in (
        (["--pretrained", str(tmp_path / "none.pt"), "--out", str(tmp_path / "o")], "no such file"),
        (["--threads", "0", "--out", str(tmp_path / "o")], "--threads must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exc:
            ft.main(argv)
        assert exc.value.code == 2 and word in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


def test_make_solver_product_modes():
    lite = ft.make_solver("aid-fp-lite", mixed="fd")
    assert (lite.mixed, lite.hvp) == ("fd", "fd")  # first order: no second-order graph anywhere
    jvp = ft.make_solver("aid-cg", mixed="jvp")
    assert (jvp.mixed, jvp.hvp) == ("jvp", "autograd")
    sama = ft.make_solver("sama", alpha=0.5)
    assert (sama.name, sama.mixed, sama.hvp, sama.scale) == ("sama", "fd", "fd", 0.5)
    assert ft.make_solver("sama", mixed="fd-onesided").mixed == "fd-onesided"
    with pytest.raises(ValueError, match="AID solvers"):
        ft.make_solver("itd", mixed="fd")
    with pytest.raises(ValueError, match="unknown mixed"):
        ft.make_solver("aid-cg", mixed="central")
    with pytest.raises(ValueError, match="AID solvers"):
        ft.FinetuneConfig(solver="itd", mixed="fd")
    cfg = ft.FinetuneConfig(solver="aid-fp-lite", mixed="fd", share_linearization=True)
    assert cfg.name == "meltr-aid-fp-lite-fd-shared" and ft.FinetuneConfig().name == "meltr-aid-fp-lite"
