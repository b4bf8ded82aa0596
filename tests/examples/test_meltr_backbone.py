"""UniVL-style backbone, metrics, checkpoint mapping and a 2-step pretraining run."""

from __future__ import annotations

import math
import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from examples.meltr_video.data import Collate, VideoTextDataset, VideoTextRecord, make_digit_clips
from examples.meltr_video.evaluate import caption_eval, retrieval_eval, retrieval_similarity
from examples.meltr_video.meltr import MELTR, make_objectives
from examples.meltr_video.metrics import (
    bleu,
    caption_metrics,
    cider_d,
    meteor,
    retrieval_metrics,
    retrieval_ranks,
    rouge_l,
)
from examples.meltr_video.univl import (
    LOSS_NAMES,
    UniVL,
    UniVLConfig,
    convert_univl_state_dict,
    load_univl_checkpoint,
    max_margin_ranking,
    symmetric_cross_entropy,
)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = make_digit_clips(seed=0, sizes={"train": 8})
    tok = data.tokenizer
    model = UniVL(UniVLConfig.tiny(len(tok)), tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    batch = Collate(tok, max_words=16, seed=0)([data["train"][i] for i in range(4)])
    return model, tok, batch, data


def test_forward_returns_the_8_losses_in_order(setup):
    model, _, batch, _ = setup
    losses = model(batch)
    assert tuple(losses) == LOSS_NAMES
    for n, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), n
    # at initialisation the cross-entropies sit near their chance values
    assert losses["alignment"].item() == pytest.approx(math.log(4), abs=0.05)
    assert losses["decoder"].item() == pytest.approx(math.log(model.cfg.vocab_size), rel=0.2)
    sub = model(batch, ("mlm", "decoder"))
    assert tuple(sub) == ("mlm", "decoder")
    torch.testing.assert_close(sub["mlm"], losses["mlm"])
    with pytest.raises(ValueError, match="unknown loss"):
        model(batch, ("bogus",))


def test_every_parameter_gets_a_gradient(setup):
    model, _, batch, _ = setup
    model.zero_grad()
    sum(model(batch).values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    model.zero_grad()


def test_losses_depend_on_their_inputs(setup):
    model, tok, batch, _ = setup
    base = model(batch)
    other = dict(batch)
    other["caption_out"] = torch.where(batch["caption_out"] >= 0, tok.ids["the"], -100)
    changed = model(other)
    assert changed["decoder"] != base["decoder"] and changed["alignment"] == base["alignment"]
    other = dict(batch)
    other["video"] = batch["video"].flip(0)
    changed = model(other)
    assert changed["alignment"] != base["alignment"] and changed["mlm"] == base["mlm"]


def test_batch_of_one_is_refused(setup):
    model, _, batch, _ = setup
    with pytest.raises(ValueError, match="at least 2"):
        model({k: v[:1] for k, v in batch.items()})


def test_similarity_and_generate(setup):
    model, _, batch, _ = setup
    model.eval()
    s = model.similarity(batch["text"][:3], batch["text_mask"][:3], batch["video"], batch["video_mask"])
    assert s.shape == (3, 4)
    j = model.similarity(batch["text"], batch["text_mask"], batch["video"], batch["video_mask"], mode="joint")
    assert j.shape == (4, 4) and (j.abs() <= 1 + 1e-5).all()
    ids = model.generate(batch["video"], batch["video_mask"], max_len=6)
    assert ids.shape[0] == 4 and ids.shape[1] <= 6 and ids.dtype == torch.long
    model.train()


def test_max_margin_ranking_hand_computed():
    s = torch.tensor([[0.9, 0.5], [0.2, 0.4]])
    # pairs (i, j): text-side relu(m - S_ii + S_ij), video-side relu(m - S_ii + S_ji), m = 0.1
    # (0,1): relu(0.1-0.9+0.5)=0, relu(0.1-0.9+0.2)=0 ; (1,0): relu(0.1-0.4+0.2)=0, relu(0.1-0.4+0.5)=0.2
    assert float(max_margin_ranking(s, 0.1)) == pytest.approx(0.2 / 2 / 2)
    with pytest.raises(ValueError, match="B >= 2"):
        max_margin_ranking(torch.ones(1, 1), 0.1)


def test_symmetric_cross_entropy_hand_computed():
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    row = (-(2 - math.log(math.exp(2) + 1)) + math.log(2)) / 2
    col = (-(2 - math.log(math.exp(2) + math.exp(1))) - (1 - math.log(1 + math.exp(1)))) / 2
    assert float(symmetric_cross_entropy(s)) == pytest.approx((row + col) / 2)
    assert float(symmetric_cross_entropy(s)) == pytest.approx(
        float(F.cross_entropy(s, torch.arange(2)) + F.cross_entropy(s.T, torch.arange(2))) / 2
    )


def test_base_config_has_univl_shapes():
    cfg = UniVLConfig.base()
    with torch.device("meta"):
        model = UniVL(cfg)
    layer = sum(p.numel() for p in model.text.encoder.layers[0].parameters())
    assert layer == 7_087_872  # one BERT-base layer
    assert len(model.text.encoder.layers) == 12 and len(model.video.encoder.layers) == 6
    assert len(model.cross.encoder.layers) == 2 and len(model.decoder.decoder.layers) == 3
    assert model.video.input_proj.in_features == 1024 and model.text.word_embeddings.weight.shape == (30522, 768)
    total = sum(p.numel() for p in model.parameters())
    assert 150e6 < total < 300e6


def test_config_checks():
    with pytest.raises(ValueError, match="divisible"):
        UniVLConfig.tiny(10, hidden=30)
    with pytest.raises(ValueError, match="unknown config"):
        UniVLConfig.named("huge", 10)


# ------------------------------------------------------------------------------------- metrics


def test_retrieval_metrics_hand_computed():
    s = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # rank 0
            [0.8, 0.3, 0.1],  # true 0.3, one higher -> rank 1
            [0.5, 0.7, 0.1],  # two higher -> rank 2
        ]
    )
    assert retrieval_ranks(s).tolist() == [0, 1, 2]
    m = retrieval_metrics(s)
    assert m["R@1"] == pytest.approx(100 / 3) and m["R@5"] == 100.0
    assert m["MedR"] == 2.0 and m["MeanR"] == 2.0
    # ties count against: a constant matrix is worst-case, not lucky
    assert retrieval_metrics(torch.zeros(4, 4))["R@1"] == 0.0
    assert retrieval_ranks(torch.zeros(4, 4)).tolist() == [3, 3, 3, 3]
    # non-square with targets
    assert retrieval_ranks(np.array([[0.1, 0.9], [0.2, 0.1], [0.3, 0.4]]), [1, 0, 0]).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="non-finite"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="targets are required"):
        retrieval_metrics(torch.zeros(2, 3))


def test_bleu_rouge_hand_computed():
    cand, ref = ["a b c d"], [["a b c e"]]
    b = bleu(cand, ref)
    assert b[0] == pytest.approx(0.75) and b[1] == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert b[2] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert b[3] < 1e-3
    assert rouge_l(cand, ref) == pytest.approx(0.75)
    # brevity penalty: "a b" vs "a b c d": p1 = p2 = 1, BP = exp(1 - 4/2)
    assert bleu(["a b"], [["a b c d"]], n=2)[1] == pytest.approx(math.exp(-1))
    # ROUGE-L with different P and R: LCS("a b", "a x b y") = 2, P = 1, R = 0.5, beta = 1.2
    assert rouge_l(["a b"], [["a x b y"]]) == pytest.approx((1 + 1.44) * 0.5 / (0.5 + 1.44))
    assert bleu(["the cat sat"], [["the cat sat"]])[2] == pytest.approx(1.0)


def test_caption_metrics_match_coco_caption():
    """Reference numbers from pycocoevalcap 1.2 (Bleu, Rouge, Cider) on the same, pre-tokenised input."""
    refs = [
        ["the digit seven moves left then up", "a seven goes left and up"],
        ["the digit three moves down"],
        ["the digit five moves right and the digit one moves up"],
    ]
    cands = ["the digit seven moves left", "the digit three moves down", "the digit five moves up"]
    b = bleu(cands, refs)
    np.testing.assert_allclose(b, [0.6270890851894444, 0.6270890851842187, 0.6029459757603458, 0.5817626019159088])
    assert rouge_l(cands, refs) == pytest.approx(0.7981437451951715, rel=1e-12)
    assert cider_d(cands, refs) == pytest.approx(5.746809805532767, rel=1e-12)
    m = caption_metrics(cands, refs)
    assert set(m) == {"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    with pytest.raises(ValueError, match="one list of references per candidate"):
        bleu(cands, refs[:2])
    with pytest.raises(ValueError, match="empty reference"):
        rouge_l(["a"], [[""]])


# ------------------------------------------------------------------------- checkpoint mapping


def _to_univl_names(model: UniVL) -> dict[str, torch.Tensor]:
    """Write our weights under UniVL's (BERT-style) names, q/k/v split."""
    sd = {}
    inv = {"text": "bert", "video": "visual", "cross": "cross"}
    emb = {
        "text": {
            "word_embeddings": "word_embeddings",
            "position_embeddings": "position_embeddings",
            "norm": "LayerNorm",
        },
        "video": {"input_proj": "word_embeddings", "position_embeddings": "position_embeddings", "norm": "LayerNorm"},
        "cross": {
            "type_embeddings": "token_type_embeddings",
            "position_embeddings": "position_embeddings",
            "norm": "LayerNorm",
        },
    }
    layer = {
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "linear1": "intermediate.dense",
        "linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    for ours, theirs in inv.items():
        mod = getattr(model, ours)
        for a, b in emb[ours].items():
            for leaf, v in getattr(mod, a).state_dict().items():
                sd[f"{theirs}.embeddings.{b}.{leaf}"] = v.clone()
        for i, lay in enumerate(mod.encoder.layers):
            p = f"{theirs}.encoder.layer.{i}"
            for leaf in ("weight", "bias"):
                q, k, v = getattr(lay.self_attn, f"in_proj_{leaf}").chunk(3)
                for nm, t in zip(("query", "key", "value"), (q, k, v), strict=True):
                    sd[f"{p}.attention.self.{nm}.{leaf}"] = t.clone()
                for a, b in layer.items():
                    sd[f"{p}.{b}.{leaf}"] = lay.get_submodule(a).state_dict()[leaf].clone()
    for leaf, v in model.cross.pooler.state_dict().items():
        sd[f"cross.pooler.dense.{leaf}"] = v.clone()
    sd["decoder.decoder.layer.0.slf_attn.att.query.weight"] = torch.zeros(2, 2)
    return sd


def test_univl_checkpoint_mapping(tmp_path, setup):
    model, tok, batch, _ = setup
    sd = _to_univl_names(model)
    sd["bert.embeddings.LayerNorm.gamma"] = sd.pop("bert.embeddings.LayerNorm.weight")  # old TF-style name
    path = tmp_path / "univl.bin"
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    torch.manual_seed(123)
    fresh = UniVL(model.cfg, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)
    report = load_univl_checkpoint(fresh, path)
    assert report["unmapped"] == ["decoder.decoder.layer.0.slf_attn.att.query.weight"]
    mine = model.state_dict()
    for k in report["loaded"]:
        torch.testing.assert_close(fresh.state_dict()[k], mine[k])
    assert "text.encoder.layers.1.self_attn.in_proj_weight" in report["loaded"]
    assert all(k.startswith(("decoder.", "mlm_head.", "mfm_head.", "cross.score.")) for k in report["missing"])
    # the mapped encoders give the same joint similarity
    model.eval()
    fresh.eval()
    a = model.similarity(batch["text"], batch["text_mask"], batch["video"], batch["video_mask"], mode="joint")
    b = fresh.similarity(batch["text"], batch["text_mask"], batch["video"], batch["video_mask"], mode="joint")
    torch.testing.assert_close(a, b)
    model.train()
    # shape mismatch names the parameter
    sd["visual.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"video\.input_proj\.weight has shape \(3, 3\)"):
        load_univl_checkpoint(fresh, path)
    # incomplete q/k/v
    bad = {k: v for k, v in sd.items() if not k.endswith("attention.self.key.weight")}
    with pytest.raises(ValueError, match="incomplete attention"):
        convert_univl_state_dict(bad)


def test_checkpoint_with_code_is_refused(tmp_path, setup):
    model, *_ = setup
    marker = tmp_path / "ran.txt"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.bin"
    with path.open("wb") as fh:
        pickle.dump({"bert.x": Evil()}, fh, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_univl_checkpoint(model, path)
    assert not marker.exists()


# --------------------------------------------------------------------- MELTR on the backbone


def test_meltr_hypergradient_on_tiny_univl(setup):
    model, _, batch, _ = setup
    torch.manual_seed(0)
    meltr = MELTR(LOSS_NAMES, hidden=16, d_model=32, ff=32)
    problem, params, hparams, _ = make_objectives(model, meltr, "alignment", gamma=0.1)
    small = {k: v[:2] for k, v in batch.items()}
    hg, info = bl.get_solver("aid-fp-lite").hypergrad(problem, params, hparams, small, small, return_info=True)
    assert set(hg) == set(hparams)
    assert all(torch.isfinite(v).all() for v in hg.values())
    assert sum(float(v.abs().sum()) for v in hg.values()) > 0
    assert math.isfinite(float(info.outer_value))


# ---------------------------------------------------------------------------------- pretraining


def test_pretrain_two_steps(tmp_path, capsys):
    from examples.meltr_video.pretrain import load_pretrained, main

    out = tmp_path / "pt.pt"
    args = ["--out", str(out), "--max-steps", "2", "--pretrain-size", "16", "--val-size", "8", "--batch-size", "8"]
    threads = torch.get_num_threads()
    try:
        meta = main(args)
    finally:
        torch.set_num_threads(threads)  # main() sets --threads (1) for the process
    assert meta["steps"] == 2 and out.exists()
    ck = torch.load(out, weights_only=True)
    assert set(ck) == {"model", "config", "vocab", "meta"}
    model, tok, meta2 = load_pretrained(out)
    assert meta2["steps"] == 2 and tok.vocab == ck["vocab"]
    assert set(meta["final_losses"]) == set(LOSS_NAMES)
    torch.testing.assert_close(
        model.state_dict()["text.word_embeddings.weight"], ck["model"]["text.word_embeddings.weight"]
    )
    capsys.readouterr()
    try:
        main(args)  # same settings: reused, not retrained
    finally:
        torch.set_num_threads(threads)
    assert "reusing" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_meteor_through_pycocoevalcap_if_available():
    pytest.importorskip("pycocoevalcap")
    if shutil.which("java") is None:
        pytest.skip("METEOR needs java")
    refs = [
        ["the digit seven moves left then up", "a seven goes left and up"],
        ["the digit three moves down"],
        ["the digit five moves right and the digit one moves up"],
    ]
    cands = ["the digit seven moves left", "the digit three moves down", "the digit five moves up"]
    assert meteor(cands, refs) == pytest.approx(0.413238961785675, rel=1e-6)


def test_evaluation_helpers(setup):
    model, tok, _, data = setup
    ds = data["train"]
    m = retrieval_eval(model, ds, tok)
    assert set(m) == {"R@1", "R@5", "R@10", "MedR", "MeanR"} and 1 <= m["MedR"] <= len(ds)
    # several captions of one video: one row per caption, one column per distinct video
    two = VideoTextDataset(
        [ds.records[0], VideoTextRecord(ds.records[0].video_id, "the digit", ds.records[0].features)]
    )
    two.records.append(ds.records[1])
    sim, targets = retrieval_similarity(model, two, tok)
    assert sim.shape == (3, 2) and targets == [0, 0, 1]
    mets, caps = caption_eval(model, two, tok, max_len=5)
    assert len(caps) == 2 and set(mets) == {"BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
