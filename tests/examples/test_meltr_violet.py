"""VIOLET-style backbone (examples/meltr_video/violet.py): losses, codebook, masking, hypergradients, pretraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilevel as bl
from examples.meltr_video.data import Collate, make_digit_clips
from examples.meltr_video.evaluate import retrieval_eval
from examples.meltr_video.meltr import MELTR, MELTRObjectives
from examples.meltr_video.violet import (
    LOSS_NAMES,
    PRIMARY,
    Violet,
    VioletCollate,
    VioletConfig,
    fit_codebook,
    nearest_code,
    patchify,
    unpatchify,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden=32, heads=2, ff=64, text_layers=1, video_layers=1, codebook_size=16)


@pytest.fixture(scope="module")
def data():
    return make_digit_clips(0, sizes={"pretrain": 24, "train": 8})


@pytest.fixture(scope="module")
def codebook(data):
    return fit_codebook(data["pretrain"].frames, k=16, iters=10, seed=0)


def make_model(data, codebook, **kw):
    tok = data.tokenizer
    torch.manual_seed(0)
    return Violet(VioletConfig.tiny(len(tok), **{**SMALL, **kw}), tok.cls_id, tok.sep_id, codebook=codebook)


@pytest.fixture(scope="module")
def setup(data, codebook):
    model = make_model(data, codebook)
    batch = VioletCollate(data.tokenizer, max_words=16, seed=0)([data["train"][i] for i in range(4)])
    return model, batch


def brute_nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin_k sum_d (x_d - c_kd)^2 by explicit differences (independent of the matmul form)."""
    return ((x[..., None, :] - c) ** 2).sum(-1).argmin(-1)


# ---------------------------------------------------------------------------------------- losses


def test_forward_returns_the_3_losses_near_chance(setup):
    model, batch = setup
    assert Violet.LOSS_NAMES == LOSS_NAMES == ("vtm", "mlm", "mvm") and PRIMARY == {"retrieval": "vtm"}
    losses = model(batch)
    assert tuple(losses) == LOSS_NAMES
    for n, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), n
    # small init: near-uniform predictions -> cross-entropies near log(#classes)
    assert losses["vtm"].item() == pytest.approx(math.log(4), abs=0.05)
    assert losses["mlm"].item() == pytest.approx(math.log(model.cfg.vocab_size), rel=0.1)
    assert losses["mvm"].item() == pytest.approx(math.log(model.cfg.codebook_size), rel=0.1)
    sub = model(batch, ("mvm", "mlm"))
    assert tuple(sub) == ("mlm", "mvm")
    torch.testing.assert_close(sub["mlm"], losses["mlm"], rtol=0, atol=0)
    torch.testing.assert_close(model(batch, ("vtm",))["vtm"], losses["vtm"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown loss"):
        model(batch, ("alignment",))


def test_every_parameter_gets_a_gradient(setup):
    model, batch = setup
    model.zero_grad()
    sum(model(batch).values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert "codebook" in dict(model.named_buffers()) and "codebook" in model.state_dict()
    model.zero_grad()


@pytest.mark.parametrize("form", ["softmax", "binary"])
def test_vtm_matches_the_cross_score_matrix(data, codebook, setup, form):
    """vtm recomputed from the B x B matrix of cross-encoder scores of (text i, video j)."""
    _, batch = setup
    model = make_model(data, codebook, vtm=form)
    model.eval()  # no dropout either way; eval only to use the no-grad similarity path
    c = model.similarity(batch["text"], batch["text_mask"], batch["video"], batch["video_mask"])
    B = c.shape[0]
    if form == "softmax":
        t = torch.arange(B)
        want = (F.cross_entropy(c, t) + F.cross_entropy(c.T, t)) / 2
    else:
        pos, neg = c.diagonal(), c[torch.arange(B), (torch.arange(B) + 1) % B]
        want = (torch.log1p(torch.exp(-pos)).mean() + torch.log1p(torch.exp(neg)).mean()) / 2
    torch.testing.assert_close(model(batch, ("vtm",))["vtm"], want, rtol=1e-5, atol=1e-6)


def test_bad_batches_are_refused(data, codebook, setup):
    model, batch = setup
    plain = Collate(data.tokenizer, max_words=16)([data["train"][i] for i in range(4)])
    with pytest.raises(ValueError, match=r"mvm_mask.*VioletCollate"):
        model(plain)
    assert set(model(plain, ("vtm", "mlm"))) == {"vtm", "mlm"}  # without mvm it needs no patch mask
    with pytest.raises(ValueError, match="at least 2"):
        model({k: v[:1] for k, v in batch.items()}, ("vtm",))
    with pytest.raises(ValueError, match="raw frames"):
        model({**batch, "video": batch["video"][..., :512]}, ("vtm",))
    with pytest.raises(ValueError, match="mvm_mask"):
        model({**batch, "mvm_mask": batch["mvm_mask"][:, :, :4]}, ("mvm",))
    none_masked = {**batch, "mvm_mask": torch.zeros_like(batch["mvm_mask"])}
    with pytest.raises(ValueError, match="at least one masked"):
        model(none_masked, ("mvm",))
    unfitted = Violet(model.cfg)
    with pytest.raises(ValueError, match="fitted codebook"):
        unfitted(batch, ("mvm",))
    with pytest.raises(ValueError, match="shape"):
        unfitted.set_codebook(torch.zeros(3, 64))


def test_config_checks():
    cfg = VioletConfig.tiny(20)
    assert (cfg.patches_per_frame, cfg.patch_dim, cfg.frame_dim) == (16, 64, 1024)
    assert VioletConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible by patch"):
        VioletConfig.tiny(20, patch=7)
    with pytest.raises(ValueError, match="vtm"):
        VioletConfig.tiny(20, vtm="hinge")
    with pytest.raises(ValueError, match="codebook_size"):
        VioletConfig.tiny(20, codebook_size=1)
    with pytest.raises(ValueError, match="only 'tiny'"):
        VioletConfig.named("base", 20)
    with pytest.raises(TypeError, match="VioletConfig"):
        Violet({"vocab_size": 20})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ patches, codebook


def test_patchify_cuts_8x8_blocks_row_major():
    frames = torch.randn(2, 3, 32, 32)
    p = patchify(frames.reshape(2, 3, 1024))
    assert p.shape == (2, 3, 16, 64)
    for idx in (0, 5, 15):
        r, c = divmod(idx, 4)
        torch.testing.assert_close(p[1, 2, idx], frames[1, 2, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8].reshape(64))
    torch.testing.assert_close(unpatchify(p), frames.reshape(2, 3, 1024))
    with pytest.raises(ValueError, match="frame_size"):
        patchify(torch.zeros(2, 1000))


def test_kmeans_reduces_inertia_and_is_deterministic(data):
    frames = data["pretrain"].frames
    x = patchify(torch.as_tensor(frames).reshape(*frames.shape[:2], 1024)).reshape(-1, 64)

    def inertia(c):
        return float(((x - c[brute_nearest(x, c)]) ** 2).sum())

    cb = fit_codebook(frames, k=16, iters=10, seed=0)
    assert cb.shape == (16, 64)
    rand = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:16]]
    init = fit_codebook(frames, k=16, iters=0, seed=0)  # k-means++ seeding only
    assert inertia(cb) < 0.8 * inertia(rand)
    assert inertia(cb) <= inertia(init)
    torch.testing.assert_close(fit_codebook(frames, k=16, iters=10, seed=0), cb, rtol=0, atol=0)
    assert not torch.equal(fit_codebook(frames, k=16, iters=10, seed=1), cb)
    # the records' features [N, F, 1024] give the same codebook as the frames [N, F, 32, 32]
    feats = [r.features for r in data["pretrain"].records]
    torch.testing.assert_close(fit_codebook(feats, k=16, iters=10, seed=0), cb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fewer than k"):
        fit_codebook(frames[:1, :1], k=17)
    with pytest.raises(ValueError, match="square"):
        fit_codebook(torch.zeros(4, 2, 1000), k=2)


def test_kmeans_finds_separated_clusters():
    """Three far-apart blobs of 64-pixel patches: the 3 centroids are the 3 blob means."""
    g = torch.Generator().manual_seed(0)
    means = torch.stack([torch.zeros(64), torch.ones(64), torch.linspace(-2, 2, 64)])
    pts = torch.cat([m + 0.01 * torch.randn(192, 64, generator=g) for m in means])
    frames = unpatchify(pts.reshape(-1, 16, 64))  # [-1, 1024]: 16 patches per frame, 3 x 192 patches
    cb = fit_codebook(frames, k=3, iters=20, seed=3)
    found = cb[brute_nearest(means, cb)]
    torch.testing.assert_close(found, means, atol=3e-3, rtol=0)
    assert len(set(brute_nearest(means, cb).tolist())) == 3


def test_nearest_code_matches_brute_force(setup):
    model, batch = setup
    targets = model.mvm_targets(batch["video"])
    p = patchify(batch["video"])
    assert targets.shape == batch["mvm_mask"].shape
    assert torch.equal(targets, brute_nearest(p, model.codebook))
    assert torch.equal(nearest_code(p, model.codebook, chunk=7), targets)  # chunking is invisible
    assert len(targets.unique()) > 2  # the digits are not all one visual word


# -------------------------------------------------------------------------------- masked patches


def test_violet_collate_masks(data):
    tok = data.tokenizer
    items = [data["train"][i] for i in range(4)]
    # clips of different lengths: padded frames must never be masked
    items[1] = {**items[1], "features": items[1]["features"][:3]}
    b = VioletCollate(tok, patch_mask_prob=0.3, seed=0)(items)
    m = b["mvm_mask"]
    assert m.shape == (4, 8, 16) and m.dtype == torch.bool
    assert not m[1, 3:].any() and m.flatten(1).any(1).all()
    p, pm = patchify(b["video"]), patchify(b["mvm_video"])
    assert (pm[m] == 0).all() and torch.equal(pm[~m], p[~m]) and p[m].abs().sum() > 0
    assert 0.2 < m[b["video_mask"]].float().mean() < 0.4
    # at least one masked real patch per clip even when the probability is tiny; none when it is 0
    rare = VioletCollate(tok, patch_mask_prob=1e-9)(items)["mvm_mask"]
    assert rare.flatten(1).sum(1).tolist() == [1, 1, 1, 1] and not rare[1, 3:].any()
    assert not VioletCollate(tok, patch_mask_prob=0.0)(items)["mvm_mask"].any()
    with pytest.raises(ValueError, match="patch_mask_prob"):
        VioletCollate(tok, patch_mask_prob=1.5)


def test_violet_collate_is_deterministic_from_its_generator(data):
    tok = data.tokenizer
    items = [data["train"][i] for i in range(4)]
    a = [VioletCollate(tok, seed=7)(items) for _ in range(2)]
    for k in a[0]:
        assert torch.equal(a[0][k], a[1][k]), k
    assert not torch.equal(VioletCollate(tok, seed=8)(items)["mvm_mask"], a[0]["mvm_mask"])
    swapped = VioletCollate(tok, seed=0)
    swapped.gen = torch.Generator().manual_seed(7)  # callers swap the generator like Collate's
    assert swapped.base.gen is swapped.gen
    c = swapped(items)
    assert torch.equal(c["mvm_mask"], a[0]["mvm_mask"]) and torch.equal(c["masked_text"], a[0]["masked_text"])
    # Collate's own masks are drawn first, so the text masks equal plain Collate's with that seed
    assert torch.equal(Collate(tok, seed=7)(items)["masked_text"], a[0]["masked_text"])
    with pytest.raises(TypeError, match="Generator"):
        swapped.gen = 7  # type: ignore[assignment]


def test_masked_pixels_are_hidden_and_only_masked_patches_count(setup):
    model, batch = setup
    mask = batch["mvm_mask"] & batch["video_mask"][..., None]
    base = model(batch, ("mlm", "mvm"))
    # reference: CE of the logits at the masked real patches against brute-force targets
    with torch.no_grad():
        h, ps, _ = model.masked_states(batch)
        Lt = batch["masked_text"].shape[1]
        logits = model.mvm_logits(h[:, Lt:], ps)  # every patch
    tgt = brute_nearest(patchify(batch["video"]), model.codebook)
    torch.testing.assert_close(base["mvm"], F.cross_entropy(logits[mask], tgt[mask]), rtol=1e-5, atol=1e-6)

    b, f, p = (int(i) for i in mask.nonzero()[0])
    code = int(tgt[b, f, p])
    other = int(((model.codebook - model.codebook[code]) ** 2).sum(1).argmax())

    def with_patch(pixels):
        v = patchify(batch["video"].clone())
        v[b, f, p] = pixels
        return {**batch, "video": unpatchify(v)}

    # new pixels with the same visual word: the model never sees them, so nothing changes
    same = model(with_patch(model.codebook[code]), ("mlm", "mvm"))
    assert torch.equal(same["mvm"], base["mvm"]) and torch.equal(same["mlm"], base["mlm"])
    # pixels of another visual word: only the target moves (mlm unchanged, mvm changed)
    moved = model(with_patch(model.codebook[other]), ("mlm", "mvm"))
    assert torch.equal(moved["mlm"], base["mlm"]) and moved["mvm"] != base["mvm"]
    # an unmasked patch is input, not target: changing it changes the prediction context
    ub, uf, up = (int(i) for i in (~batch["mvm_mask"] & batch["video_mask"][..., None]).nonzero()[0])
    v = patchify(batch["video"].clone())
    v[ub, uf, up] += 1.0
    assert model({**batch, "video": unpatchify(v)}, ("mlm",))["mlm"] != base["mlm"]


# ------------------------------------------------------------------------------ inference, fuse


def test_similarity_fuse_and_gradients(setup):
    model, batch = setup
    t, tm, v, vm = batch["text"], batch["text_mask"], batch["video"], batch["video_mask"]
    s = model.similarity(t[:3], tm[:3], v, vm, chunk=5)
    assert s.shape == (3, 4) and not s.requires_grad
    j = model.similarity(t, tm, v, vm, mode="joint")
    assert j.shape == (4, 4) and (j.abs() <= 1 + 1e-5).all()
    with pytest.raises(ValueError, match="mode"):
        model.similarity(t, tm, v, vm, mode="dual")
    model.zero_grad()
    z = model.fuse(t, tm, v, vm)
    assert z.shape == (4, model.cfg.hidden) and z.requires_grad
    # the diagonal of the cross scores is the vtm score head on fuse's output
    diag = model.similarity(t, tm, v, vm).diagonal()
    torch.testing.assert_close(model.cross.score(z).squeeze(-1).detach(), diag, rtol=1e-5, atol=1e-6)
    (z**2).sum().backward()
    for name in ("video.patch_embed.weight", "text.word_embeddings.weight", "cross.pooler.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()
    with pytest.raises(ValueError, match="aligned"):
        model.fuse(t, tm, v[:3], vm[:3])


def test_meltr_hypergradient_through_violet(setup):
    """aid-cg (CG on Hessian-vector products) needs double backward through every layer of the backbone."""
    model, batch = setup
    torch.manual_seed(0)
    obj = MELTRObjectives(model, MELTR(Violet.LOSS_NAMES, hidden=16, d_model=32, ff=32), "vtm", gamma=0.1)
    small = {k: v[:2] for k, v in batch.items()}
    solver = bl.get_solver("aid-cg", iters=2, on_negative_curvature="ignore")  # not at an inner minimum
    hg, info = solver.hypergrad(obj.problem(), obj.params, obj.hparams, small, small, return_info=True)
    assert set(hg) == set(obj.hparams)
    assert all(torch.isfinite(v).all() for v in hg.values())
    assert sum(float(v.abs().sum()) for v in hg.values()) > 0
    assert math.isfinite(float(info.outer_value))
    assert "codebook" not in obj.params  # a buffer: carried as a constant, not trained


def test_hessian_vector_product_matches_finite_differences(setup, data):
    """Double backward through patches, attention (math kernel) and all 3 losses: H v vs central differences."""
    model, batch = setup
    m64 = make_model(data, model.codebook).double()
    b64 = {k: (v.double() if v.is_floating_point() else v)[:2] for k, v in batch.items()}
    params, fn = bl.functional_module(m64)
    g = torch.Generator().manual_seed(1)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}

    def grad_at(ps):
        ps = {k: p.detach().requires_grad_() for k, p in ps.items()}
        loss = sum(fn(ps, b64).values())
        return ps, torch.autograd.grad(loss, list(ps.values()), create_graph=True)

    ps, gr = grad_at(params)
    hv = torch.autograd.grad(sum((a * v[k]).sum() for a, k in zip(gr, ps, strict=True)), list(ps.values()))
    eps = 1e-5
    plus = grad_at({k: p + eps * v[k] for k, p in params.items()})[1]
    minus = grad_at({k: p - eps * v[k] for k, p in params.items()})[1]
    fd = torch.cat([((a - b) / (2 * eps)).detach().reshape(-1) for a, b in zip(plus, minus, strict=True)])
    hv = torch.cat([h.reshape(-1) for h in hv])
    assert float(hv.norm()) > 0
    assert float((hv - fd).norm() / fd.norm()) < 1e-5


def test_retrieval_eval_runs(setup, data):
    model, _ = setup
    m = retrieval_eval(model, data["train"], data.tokenizer)
    assert set(m) == {"R@1", "R@5", "R@10", "MedR", "MeanR"} and 1 <= m["MedR"] <= len(data["train"])


# ---------------------------------------------------------------------------------- pretraining


def test_pretrain_violet_smoke_and_reuse(tmp_path, capsys):
    from examples.meltr_video.pretrain import ensure_pretrained, load_pretrained, main, pretrain

    out = tmp_path / "violet.pt"
    kw = dict(max_steps=2, pretrain_size=32, val_size=8, batch_size=8, progress=False)
    args = ["--backbone", "violet", "--out", str(out), "--max-steps", "2", "--pretrain-size", "32"]
    threads = torch.get_num_threads()
    try:  # the CLI, with the same settings as kw
        meta = main([*args, "--val-size", "8", "--batch-size", "8"])
    finally:
        torch.set_num_threads(threads)
    assert meta["steps"] == 2 and set(meta["final_losses"]) == set(LOSS_NAMES) and meta["codebook_seconds"] > 0
    ck = torch.load(out, weights_only=True)
    assert ck["backbone"] == "violet" and meta["settings"]["backbone"] == "violet"
    model, tok, meta2 = load_pretrained(out)
    assert isinstance(model, Violet) and meta2["steps"] == 2 and tok.vocab == ck["vocab"]
    torch.testing.assert_close(model.codebook, ck["model"]["codebook"], rtol=0, atol=0)
    assert model.codebook.abs().sum() > 0
    capsys.readouterr()
    pretrain(out=out, backbone="violet", **kw)
    assert "reusing" in capsys.readouterr().out
    # another backbone with otherwise equal settings is not a reuse
    pretrain(out=out, backbone="univl", **kw)
    assert "reusing" not in capsys.readouterr().out
    assert type(load_pretrained(out)[0]).__name__ == "UniVL" and "backbone" not in torch.load(out, weights_only=True)
    # a checkpoint made with another digit vocabulary is stale: retrained, not reused
    ck = torch.load(out, weights_only=True)
    ck["vocab"] = [*ck["vocab"][:-1], "what"]
    torch.save(ck, out)
    pretrain(out=out, backbone="univl", **kw)
    text = capsys.readouterr().out
    assert "another vocabulary" in text and "reusing" not in text
    assert torch.load(out, weights_only=True)["vocab"][-1] != "what"
    with pytest.raises(ValueError, match="unknown backbone"):
        pretrain(out=None, backbone="clip", **kw)
    with pytest.raises(ValueError, match="unknown backbone"):
        ensure_pretrained(out, backbone="clip")
    with pytest.raises(ValueError, match="unknown preset"):
        ensure_pretrained(out, preset="huge", backbone="violet")
    with pytest.raises(ValueError, match="only 'tiny'"):
        pretrain(out=None, backbone="violet", config="base", **kw)
    np.testing.assert_equal(len(list(tmp_path.glob("*.tmp"))), 0)
