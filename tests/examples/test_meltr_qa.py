"""Video QA on the digit clips (examples/meltr_video/qa.py): questions, collate, QA model, metric, MELTR."""

from __future__ import annotations

import collections
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bilevel as bl
from examples.meltr_video.data import DIGIT_WORDS, DIRECTIONS, Collate, Tokenizer, make_digit_clips
from examples.meltr_video.meltr import MELTR, MELTRObjectives
from examples.meltr_video.qa import (
    ANSWERS,
    MOTIONS,
    QACollate,
    QAModel,
    answer_baselines,
    format_caption,
    make_qa,
    parse_caption,
    qa_accuracy,
)
from examples.meltr_video.univl import LOSS_NAMES, UniVL, UniVLConfig

SIZES = {"train": 32, "val": 16}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return make_digit_clips(0, sizes=SIZES)


@pytest.fixture(scope="module")
def many():
    """More clips (captions only matter) for the question checks: two-digit and repeated-digit clips occur."""
    return make_digit_clips(3, sizes={"train": 300})["train"]


def backbone(tok: Tokenizer, seed: int = 0, **kw) -> UniVL:
    torch.manual_seed(seed)
    kw = dict(hidden=16, heads=2, ff=32, text_layers=1, video_layers=1) | kw
    return UniVL(UniVLConfig.tiny(len(tok), **kw), tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id)


# ---------------------------------------------------------------- independent reference semantics


def ref_parse(caption: str) -> list[tuple[str, tuple[str, ...]]]:
    """Word-by-word parse, independent of qa.parse_caption's regex."""
    out, words = [], caption.split(" ")
    while words:
        assert words[:2] == ["the", "digit"] and words[3] == "moves"
        digit, motion, words = words[2], [words[4]], words[5:]
        if words[:1] == ["then"]:
            motion, words = [*motion, words[1]], words[2:]
        out.append((digit, tuple(motion)))
        if words:
            assert words[0] == "and"
            words = words[1:]
    return out


def true_of(phrase: str, motion: tuple[str, ...]) -> bool:
    """'moves <phrase>' is true of a digit with `motion`: the whole motion, or one of its directions."""
    steps = tuple(phrase.split(" then "))
    return steps == motion or (len(steps) == 1 and steps[0] in motion)


def motion_of(parts, digit):
    ms = [m for d, m in parts if d == digit]
    assert len(ms) == 1, f"a question names digit {digit} that moves {len(ms)} times"
    return ms[0]


# ------------------------------------------------------------------------------------ captions


def test_parse_caption_round_trip(data, many):
    caps = data["train"].captions + data["val"].captions + many.captions
    assert any(" and " in c for c in caps) and any(" then " in c for c in caps)
    for c in caps:
        parts = parse_caption(c)
        assert parts == ref_parse(c)
        assert format_caption(parts) == c


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DIGIT_WORDS), st.sampled_from(MOTIONS)),
        min_size=1,
        max_size=2,
    )
)
def test_parse_caption_inverts_format(parts):
    assert parse_caption(format_caption(parts)) == parts


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "the digit seven moves",
        "the digit ten moves left",
        "the digit seven moves left then left",
        "the digit seven moves left then up then down",
        "The digit seven moves left",
        "the digit seven moves left and",
        "the digit one moves up and the digit two moves up and the digit three moves up",
    ],
)
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(ValueError, match=r"grammar|parts"):
        parse_caption(bad)


def test_parse_caption_type_error():
    with pytest.raises(TypeError, match="caption"):
        parse_caption(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- questions


def test_mc_questions_have_one_correct_option(many):
    tok = Tokenizer.for_digits()
    ds = make_qa(many, "mc", seed=0, per_clip=3)
    seen = collections.Counter()
    for i in range(len(ds)):
        it = ds[i]
        parts = ref_parse(it["caption"])
        q, opts, a = it["question"], it["options"], it["answer"]
        assert len(opts) == 5 and len(set(opts)) == 5 and 0 <= a < 5
        if m := re.fullmatch(r"what does the digit (\w+) do", q):
            motion = motion_of(parts, m[1])
            truth = [true_of(o, motion) for o in opts]
            # a distractor is never a sub-motion of the answer, and all options have the answer's length
            # unless the answer is one direction (then the 3 others and one pair)
            lens = sorted(len(o.split(" then ")) for o in opts)
            assert lens == ([1, 1, 1, 1, 2] if len(motion) == 1 else [2] * 5)
            kind = "action"
        elif m := re.fullmatch(r"what does the digit (\w+) do (after|before) moving (\w+)", q):
            motion = motion_of(parts, m[1])
            assert len(motion) == 2 and motion[0 if m[2] == "after" else 1] == m[3]
            truth = [o == motion[1 if m[2] == "after" else 0] for o in opts]
            kind = m[2]
        elif m := re.fullmatch(r"which digit moves ((?:\w+)(?: then \w+)?)", q):
            truth = [any(d == o and true_of(m[1], mm) for d, mm in parts) for o in opts]
            assert all(o in DIGIT_WORDS for o in opts)
            kind = "which"
        else:
            raise AssertionError(f"unexpected question {q!r}")
        assert sum(truth) == 1 and truth[a], (it["caption"], q, opts, a)
        assert it["template"] == kind
        seen[kind] += 1
        # two-digit clips: the other digit's motion is offered (when it is false for the asked digit)
        if kind == "action" and len(parts) == 2 and parts[0][0] != parts[1][0]:
            other = next(mm for d, mm in parts if d != m[1])
            if not true_of(" then ".join(other), motion) and len(other) == len(motion):
                assert " then ".join(other) in opts
        for text in (q, *opts):
            assert tok.unk_id not in tok.encode(text), text
    assert set(seen) == {"action", "after", "before", "which"} and min(seen.values()) > 50


def test_oe_answers_are_correct_and_unambiguous(many):
    tok = Tokenizer.for_digits()
    ds = make_qa(many, "oe", seed=0, per_clip=10)  # more than any clip has: every question is drawn
    seen = collections.Counter()
    for i in range(len(ds)):
        it = ds[i]
        parts = ref_parse(it["caption"])
        q, a = it["question"], ANSWERS[it["answer"]]
        if q == "how many digits move":
            assert a == ("one" if len(parts) == 1 else "two")
            kind = "count"
        elif m := re.fullmatch(r"which digit moves ((?:\w+)(?: then \w+)?)", q):
            movers = {d for d, mm in parts if true_of(m[1], mm)}
            assert movers == {a}, (it["caption"], q, a)
            kind = "which"
        elif m := re.fullmatch(r"where does the digit (\w+) move (first|last)", q):
            motion = motion_of(parts, m[1])
            assert a == motion[0 if m[2] == "first" else -1]
            kind = m[2]
        else:
            raise AssertionError(f"unexpected question {q!r}")
        assert it["template"] == kind and "options" not in it
        assert tok.unk_id not in tok.encode(q)
        seen[kind] += 1
    assert set(seen) == {"count", "which", "first", "last"}
    # all questions drawn: every clip has its count question, questions are distinct within a clip
    per_clip = collections.defaultdict(list)
    for q in ds.items:
        per_clip[q.clip].append(q.question)
    assert len(per_clip) == len(many)
    assert all(len(v) == len(set(v)) and "how many digits move" in v for v in per_clip.values())


def test_ambiguous_which_questions_are_skipped():
    """Two digits that both move left: no 'which digit moves left'; 'left then up' has one answer."""
    import numpy as np

    from examples.meltr_video.data import VideoTextDataset, VideoTextRecord

    cap = "the digit three moves left and the digit five moves left then up"
    ds = VideoTextDataset([VideoTextRecord("v", cap, np.zeros((8, 1024), np.float32))])
    for seed in range(20):
        for q in make_qa(ds, "oe", seed, per_clip=10).items + make_qa(ds, "mc", seed, per_clip=10).items:
            assert q.question != "which digit moves left"
            if q.question == "which digit moves left then up":
                assert q.answer_text == "five"
    qs = {q.question for q in make_qa(ds, "oe", 0, per_clip=10).items}
    assert "which digit moves left then up" in qs and "where does the digit three move first" in qs
    # the same digit twice: no question names it, the count and 'which' questions stay
    cap2 = "the digit three moves left and the digit three moves up then down"
    ds2 = VideoTextDataset([VideoTextRecord("v", cap2, np.zeros((8, 1024), np.float32))])
    qs2 = {q.question for q in make_qa(ds2, "oe", 0, per_clip=10).items}
    assert qs2 == {"how many digits move", "which digit moves left", "which digit moves up then down"}


def test_make_qa_is_deterministic_and_seeded(data):
    a = make_qa(data["train"], "mc", seed=0, per_clip=2)
    b = make_qa(data["train"], "mc", seed=0, per_clip=2)
    assert a.items == b.items
    assert make_qa(data["train"], "mc", seed=1, per_clip=2).items != a.items
    assert make_qa(data["train"], "oe", seed=0).items == make_qa(data["train"], "oe", seed=0).items
    # correct positions are balanced (block randomisation): counts differ by at most one
    counts = collections.Counter(a.answers)
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1
    with pytest.raises(ValueError, match="kind"):
        make_qa(data["train"], "yes-no", seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per_clip"):
        make_qa(data["train"], "oe", seed=0, per_clip=0)


def test_make_qa_names_a_video_with_a_bad_caption():
    import numpy as np

    from examples.meltr_video.data import VideoTextDataset, VideoTextRecord

    ds = VideoTextDataset([VideoTextRecord("vid7", "a cat jumps", np.zeros((8, 1024), np.float32))])
    with pytest.raises(ValueError, match="vid7"):
        make_qa(ds, "oe", 0)


def test_answer_baselines_match_counts(data):
    ds = make_qa(data["val"], "oe", seed=0)
    b = answer_baselines(ds)
    top = collections.Counter(ds.answers).most_common(1)[0][1]
    assert b["majority"] == pytest.approx(100 * top / len(ds))
    assert b["majority"] <= b["template_majority"] <= 100


# ------------------------------------------------------------------------------------- collate


def test_collate_shapes_and_content(data):
    tok = data.tokenizer
    for kind in ("oe", "mc"):
        ds = make_qa(data["train"], kind, seed=0)
        items = [ds[i] for i in range(6)]
        b = QACollate(tok, kind, max_words=16, seed=0)(items)
        ref = Collate(tok, max_words=16, seed=0)(items)
        for k, v in ref.items():  # the clip fields are Collate's, masks included
            assert torch.equal(b[k], v), k
        assert b["answer"].dtype == torch.long and b["answer"].tolist() == [it["answer"] for it in items]
        if kind == "oe":
            assert b["question"].shape == (6, 18) and b["question_mask"].dtype == torch.bool
            for r, it in zip(b["question"], items, strict=True):
                n = len(it["question"].split())
                assert r[0] == tok.cls_id and r[n + 1] == tok.sep_id and (r[n + 2 :] == tok.pad_id).all()
                assert tok.decode(r) == it["question"]
            assert torch.equal(b["question_mask"], b["question"] != tok.pad_id)
        else:
            assert b["qa_text"].shape == (6, 5, 18) and b["qa_text_mask"].shape == (6, 5, 18)
            r, it = b["qa_text"][2, 3], items[2]
            words = [tok.vocab[i] for i in r[b["qa_text_mask"][2, 3]]]
            assert words == ["[CLS]", *it["question"].split(), "[SEP]", *it["options"][3].split(), "[SEP]"]


def test_collate_generator_and_base(data):
    tok = data.tokenizer
    ds = make_qa(data["train"], "oe", seed=0)
    items = [ds[i] for i in range(4)]
    c = QACollate(tok, "oe", seed=0)
    assert c.gen is c.base.gen
    g = torch.Generator().manual_seed(7)
    c.gen = g
    assert c.base.gen is g
    other = Collate(tok)
    other.gen = torch.Generator().manual_seed(7)
    assert torch.equal(c(items)["masked_text"], other(items)["masked_text"])

    class Base:  # another backbone's collate with Collate's call signature
        gen = torch.Generator()

        def __call__(self, items):
            return {"video": torch.zeros(len(items), 8, 1024), "custom": torch.ones(len(items))}

    b = QACollate(tok, "oe", base=Base())(items)
    assert set(b) == {"video", "custom", "question", "question_mask", "answer"}


def test_collate_refuses_unknown_words_and_long_questions(data):
    old = Tokenizer(["the", "digit", "moves", "then", "and", *DIGIT_WORDS, *DIRECTIONS])  # a pre-QA vocabulary
    ds = make_qa(data["train"], "oe", seed=0)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        QACollate(old, "oe")([ds[0], ds[1]])
    mc = make_qa(data["train"], "mc", seed=0)
    with pytest.raises(ValueError, match="max_words"):
        QACollate(data.tokenizer, "mc", max_words=6)([mc[i] for i in range(4)])
    with pytest.raises(KeyError, match="options"):
        QACollate(data.tokenizer, "mc")([ds[0], ds[1]])


def test_vocabulary_keeps_the_caption_ids():
    tok = Tokenizer.for_digits()
    caption_words = ["the", "digit", "moves", "then", "and", *DIGIT_WORDS, *DIRECTIONS]
    assert tok.vocab[7:26] == caption_words
    assert len(tok) == 40


# ----------------------------------------------------------------------------------- the model


def test_fuse_is_the_pooled_cross_state(data):
    tok = data.tokenizer
    model = backbone(tok)
    b = Collate(tok, max_words=16)([data["train"][i] for i in range(3)])
    h = model.fuse(b["text"], b["text_mask"], b["video"], b["video_mask"])
    assert h.shape == (3, 16) and (h.abs() < 1).all()
    # the matching score is w^T fuse + b: the diagonal of the cross-encoder similarity
    sim = model.similarity(b["text"], b["text_mask"], b["video"], b["video_mask"])
    torch.testing.assert_close(model.cross.score(h).squeeze(-1), sim.diagonal(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        model.fuse(b["text"][:2], b["text_mask"][:2], b["video"], b["video_mask"])
    # second derivatives exist (math attention kernel)
    w = model.text.word_embeddings.weight
    (g,) = torch.autograd.grad(h.square().sum(), w, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), w)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


@pytest.fixture(scope="module", params=["oe", "mc"])
def qa_setup(request, data):
    kind = request.param
    tok = data.tokenizer
    model = QAModel(backbone(tok), kind)
    ds = make_qa(data["train"], kind, seed=0)
    batch = QACollate(tok, kind, max_words=16, seed=0)([ds[i] for i in range(8)])
    return kind, model, batch


def test_qa_model_losses(qa_setup):
    kind, model, batch = qa_setup
    assert model.loss_names == ("qa", *LOSS_NAMES) == model.LOSS_NAMES and model.primary == "qa"
    out = model(batch)
    assert tuple(out) == model.loss_names
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    # at initialisation the answer cross-entropy is near chance
    assert out["qa"].item() == pytest.approx(math.log(5 if kind == "mc" else len(ANSWERS)), rel=0.3)
    # the backbone's losses are the backbone's own
    pre = model.backbone(batch)
    for n in LOSS_NAMES:
        torch.testing.assert_close(out[n], pre[n])
    sub = model(batch, losses=("mlm", "qa"))
    assert tuple(sub) == ("qa", "mlm")
    torch.testing.assert_close(sub["qa"], out["qa"])
    with pytest.raises(ValueError, match="unknown loss"):
        model(batch, losses=("nope",))
    names = {n for n, _ in model.named_parameters()}
    assert any(n.startswith("backbone.") for n in names) and any(n.startswith("head.") for n in names)
    pred = model.predict(batch)
    assert pred.shape == (8,) and pred.dtype == torch.long
    assert pred.max() < (5 if kind == "mc" else len(ANSWERS))


def test_mc_depends_on_the_option_order_only_through_the_answer(data):
    """mc: permuting the options and the answer index with them leaves the loss unchanged."""
    tok = data.tokenizer
    model = QAModel(backbone(tok), "mc")
    ds = make_qa(data["train"], "mc", seed=0)
    batch = QACollate(tok, "mc", max_words=16, seed=0)([ds[i] for i in range(4)])
    perm = torch.tensor([3, 0, 4, 1, 2])
    other = dict(batch)
    other["qa_text"], other["qa_text_mask"] = batch["qa_text"][:, perm], batch["qa_text_mask"][:, perm]
    other["answer"] = torch.argsort(perm)[batch["answer"]]
    with torch.no_grad():
        torch.testing.assert_close(model(other, ("qa",))["qa"], model(batch, ("qa",))["qa"])
        assert not torch.equal(model.logits(other), model.logits(batch))


def test_qa_loss_overfits_a_fixed_batch(data):
    tok = data.tokenizer
    for kind in ("oe", "mc"):
        model = QAModel(backbone(tok, seed=1), kind)
        ds = make_qa(data["train"], kind, seed=0)
        batch = QACollate(tok, kind, max_words=16, seed=0)([ds[i] for i in range(8)])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        first = None
        for _ in range(25):
            loss = model(batch, ("qa",))["qa"]
            first = loss.item() if first is None else first
            opt.zero_grad()
            loss.backward()
            opt.step()
        last = model(batch, ("qa",))["qa"].item()
        assert last < 0.5 * first, (kind, first, last)


def test_meltr_hypergradient_through_the_qa_model(data):
    tok = data.tokenizer
    model = QAModel(backbone(tok), "oe")
    ds = make_qa(data["train"], "oe", seed=0)
    batch = QACollate(tok, "oe", max_words=12, seed=0)([ds[i] for i in range(2)])
    torch.manual_seed(0)
    meltr = MELTR(model.loss_names, hidden=16, d_model=32, ff=32)
    obj = MELTRObjectives(model, meltr, "qa")
    assert set(obj.params) == {n for n, p in model.named_parameters()}
    # a random backbone is no inner minimum: negative curvature is expected (finetune.make_solver ignores it)
    cg = bl.get_solver("aid-cg", iters=2, on_negative_curvature="ignore")
    hg = cg.hypergrad(obj.problem(), obj.params, obj.hparams, batch, batch)
    assert set(hg) == set(obj.hparams)
    assert all(torch.isfinite(v).all() for v in hg.values())
    assert sum(float(v.abs().sum()) for v in hg.values()) > 0
    # gamma = 0: f = L_qa has no direct phi term, so a non-zero hypergradient is the mixed second-order
    # term -J grad_theta f, i.e. differentiating grad_theta L_aux (through the QA model) by phi works
    obj0 = MELTRObjectives(model, meltr, "qa", gamma=0.0)
    hg0 = bl.get_solver("aid-fp-lite").hypergrad(obj0.problem(), obj0.params, obj0.hparams, batch, batch)
    assert all(torch.isfinite(v).all() for v in hg0.values())
    assert sum(float(v.abs().sum()) for v in hg0.values()) > 0


# ---------------------------------------------------------------------------------- the metric


def test_qa_accuracy_perfect_and_constant(data, monkeypatch):
    tok = data.tokenizer
    for kind in ("oe", "mc"):
        model = QAModel(backbone(tok), kind)
        ds = make_qa(data["val"], kind, seed=0, per_clip=2)
        monkeypatch.setattr(model, "predict", lambda batch: batch["answer"].clone())
        assert qa_accuracy(model, ds, tok, kind, batch_size=5)["acc"] == 100.0
        counts = collections.Counter(ds[i]["answer"] for i in range(len(ds)))
        top, n_top = counts.most_common(1)[0]
        monkeypatch.setattr(model, "predict", lambda batch, top=top: torch.full_like(batch["answer"], top))
        assert qa_accuracy(model, ds, tok, kind, batch_size=7)["acc"] == pytest.approx(100 * n_top / len(ds))
        assert qa_accuracy(model, ds, tok, kind)["acc"] == pytest.approx(answer_baselines(ds)["majority"])
        monkeypatch.undo()
        acc = qa_accuracy(model, ds, tok, kind)["acc"]  # the real predictor runs
        assert 0 <= acc <= 100
    with pytest.raises(ValueError, match="kind"):
        qa_accuracy(model, make_qa(data["val"], "oe", 0), tok, "mc")
