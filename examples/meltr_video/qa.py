"""Video question answering on the offline digit clips (MELTR's TGIF / MSVD-QA tasks, GitHub issue 8).

Questions are generated from each clip's parameters, which :func:`parse_caption` recovers from the
caption grammar ``"the digit D moves M1 [then M2]"`` (one or two parts joined by ``" and "``). A
*motion* is a tuple of one direction or two distinct directions; there are 4 + 12 = 16 of them
(:data:`MOTIONS`), written as phrases ``"left"`` / ``"left then up"``. A phrase ``p`` *holds* for a
digit with motion ``m`` when ``p == m`` or ``p`` is one direction that ``m`` contains (a digit that
moves "left then up" does move left); questions and options are chosen so that exactly one answer holds.

Templates (``kind="oe"``: open-ended, answer = an index into :data:`ANSWERS`, like MSVD-QA / TGIF-Frame)::

    count   "how many digits move"                      -> "one" | "two"
    which   "which digit moves left then up"            -> "seven"   (only if no other moving digit
                                                                        makes the phrase hold)
    first   "where does the digit seven move first"     -> "left"    (only if the digit moves once
    last    "where does the digit seven move last"      -> "up"       in the clip: no repeated digit)

Templates (``kind="mc"``: 5 options, one correct, like TGIF-Action / TGIF-Transition)::

    action  "what does the digit seven do"              options: 5 motion phrases of the answer's length
                                                        (a one-direction answer: the 4 directions + a pair)
    after   "what does the digit seven do after moving left"    options: the 4 directions + a pair
    before  "what does the digit seven do before moving up"     options: the 4 directions + a pair
    which   "which digit moves left then up"            options: 5 digit words

Distractors never hold for the asked digit (for ``action``, sub-motions such as "left" for "left then
up" are excluded); in a two-digit clip the other digit's motion is used as a distractor whenever it is
false for the asked digit (so the model must bind motion to digit). Option lengths are balanced so
the question text alone cannot tell the answer's form (a text-only guess gets ~1/4 on ``action``
and 1/3 on ``after`` / ``before``, where the mentioned direction and the pair are never right).
The static half-intensity distractor digit does not move, so it never answers a question.

For each clip :func:`make_qa` draws ``per_clip`` distinct questions: a template uniformly among the
templates with a question left for the clip, then one of that template's questions uniformly
(``numpy.random.default_rng([seed, kind])``, deterministic). The correct option's position is random
with block randomisation (each run of 5 questions uses every position once), so each position is
correct for 20 % of the questions (up to one question) and the majority baseline is ~20 %.

:class:`QACollate` adds the question tensors to a clip batch of :class:`~examples.meltr_video.data.Collate`
(the caption fields stay, so the backbone's pretext losses, MELTR's auxiliary tasks, still run), and
:class:`QAModel` puts a head on ``backbone.fuse`` (the pooled cross-encoder state of (text, video)):

    oe:  logits = MLP(fuse(question, video))                         [B, |ANSWERS|]
    mc:  score_k = MLP(fuse([CLS] question [SEP] option_k [SEP], video)) -> scores [B, 5]
    qa   = CE(logits or scores, answer)        (the primary loss; then the backbone's pretext losses)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DIGIT_WORDS, DIRECTIONS, Collate, Tokenizer, VideoTextDataset

__all__ = [
    "ANSWERS",
    "MOTIONS",
    "NUM_OPTIONS",
    "PRIMARY",
    "TEMPLATES",
    "QACollate",
    "QADataset",
    "QAItem",
    "QAModel",
    "answer_baselines",
    "format_caption",
    "holds",
    "make_qa",
    "make_questions",
    "motion_phrase",
    "parse_caption",
    "qa_accuracy",
]

Kind = Literal["mc", "oe"]
Motion = tuple[str, ...]
Part = tuple[str, Motion]

ANSWERS: tuple[str, ...] = tuple(dict.fromkeys((*DIGIT_WORDS, *DIRECTIONS)))
"""The open-ended answer vocabulary: the 10 digit words (``"one"``/``"two"`` also answer ``count``), 4 directions."""
NUM_OPTIONS = 5
MOTIONS: tuple[Motion, ...] = tuple((d,) for d in DIRECTIONS) + tuple(
    (a, b) for a in DIRECTIONS for b in DIRECTIONS if a != b
)
"""The 16 motions of the caption grammar: one direction, or two distinct directions in order."""
TEMPLATES: dict[str, tuple[str, ...]] = {
    "oe": ("count", "which", "first", "last"),
    "mc": ("action", "after", "before", "which"),
}
PRIMARY = {"qa": "qa"}
_KIND_CODE = {"mc": 0, "oe": 1}

_PART = re.compile(
    r"the digit ({d}) moves ({m})(?: then ({m}))?".format(d="|".join(DIGIT_WORDS), m="|".join(DIRECTIONS))
)


def _check_kind(kind: Any) -> Kind:
    if kind not in _KIND_CODE:
        raise ValueError(f"kind must be 'mc' (multiple choice) or 'oe' (open-ended), got {kind!r}")
    return kind


# ------------------------------------------------------------------------------------ captions


def parse_caption(caption: str) -> list[Part]:
    """Clip parameters from a digit-clip caption: ``[(digit_word, motion), ...]`` (1 or 2 parts).

    ``"the digit seven moves left then up and the digit two moves down"``
    -> ``[("seven", ("left", "up")), ("two", ("down",))]``.

    Raises:
        TypeError: ``caption`` is not a string.
        ValueError: the caption is outside the grammar (wrong words, more than 2 parts, a motion that
            repeats a direction such as "left then left"); the message quotes the caption.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    pieces = caption.split(" and ")
    if len(pieces) > 2:
        raise ValueError(f"caption has {len(pieces)} parts, the digit-clip grammar has 1 or 2: {caption!r}")
    parts: list[Part] = []
    for piece in pieces:
        m = _PART.fullmatch(piece)
        if m is None:
            raise ValueError(
                f"caption outside the digit-clip grammar ('the digit D moves M1 [then M2]' parts joined by "
                f"' and '): {caption!r} (bad part {piece!r})"
            )
        motion = (m[2],) if m[3] is None else (m[2], m[3])
        if len(motion) == 2 and motion[0] == motion[1]:
            raise ValueError(f"caption outside the grammar (a motion repeats {motion[0]!r}): {caption!r}")
        parts.append((m[1], motion))
    return parts


def motion_phrase(motion: Motion) -> str:
    """``("left", "up")`` -> ``"left then up"``."""
    return " then ".join(motion)


def format_caption(parts: Sequence[Part]) -> str:
    """The inverse of :func:`parse_caption`."""
    return " and ".join(f"the digit {d} moves {motion_phrase(m)}" for d, m in parts)


def holds(phrase: Motion, motion: Motion) -> bool:
    """Whether "moves ``phrase``" is true of a digit with ``motion``: equal, or one direction it contains."""
    return tuple(phrase) == tuple(motion) or (len(phrase) == 1 and phrase[0] in motion)


# ----------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QAItem:
    """One question about clip ``clip`` of a split.

    ``answer``: option index 0..4 (mc) or index into :data:`ANSWERS` (oe); ``options``: 5 phrases (mc)
    or ``()`` (oe); ``answer_text``: the correct phrase.
    """

    clip: int
    template: str
    question: str
    answer: int
    answer_text: str
    options: tuple[str, ...] = ()


def _unique_parts(parts: Sequence[Part]) -> list[Part]:
    """Parts whose digit appears once in the clip (questions that name a digit must pick one motion)."""
    digits = [d for d, _ in parts]
    return [(d, m) for d, m in parts if digits.count(d) == 1]


def _which_parts(parts: Sequence[Part]) -> list[Part]:
    """Parts ``(d, m)`` for which "which digit moves m" has the single answer ``d``."""
    return [(d, m) for d, m in parts if {d2 for d2, m2 in parts if holds(m, m2)} == {d}]


def _draw(rng: np.random.Generator, pool: Sequence[Any], k: int) -> list[Any]:
    idx = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in idx]


def _oe_candidates(parts: Sequence[Part]) -> dict[str, list[tuple[str, str]]]:
    """template -> [(question, answer word)]."""
    uniq = _unique_parts(parts)
    return {
        "count": [("how many digits move", DIGIT_WORDS[len(parts)])],
        "which": [(f"which digit moves {motion_phrase(m)}", d) for d, m in _which_parts(parts)],
        "first": [(f"where does the digit {d} move first", m[0]) for d, m in uniq],
        "last": [(f"where does the digit {d} move last", m[-1]) for d, m in uniq],
    }


def _mc_candidates(parts: Sequence[Part]) -> dict[str, list[tuple[str, Any, Any]]]:
    """template -> [(question, answer, context)]; options are drawn later (they need the rng)."""
    uniq = _unique_parts(parts)
    out: dict[str, list[tuple[str, Any, Any]]] = {"action": [], "after": [], "before": [], "which": []}
    for d, m in uniq:
        others = [m2 for d2, m2 in parts if d2 != d]
        out["action"].append((f"what does the digit {d} do", m, others))
        if len(m) == 2:
            out["after"].append((f"what does the digit {d} do after moving {m[0]}", (m[1],), others))
            out["before"].append((f"what does the digit {d} do before moving {m[1]}", (m[0],), others))
    for d, m in _which_parts(parts):
        out["which"].append((f"which digit moves {motion_phrase(m)}", d, (m, parts)))
    return out


def _mc_distractors(rng: np.random.Generator, template: str, answer: Any, context: Any) -> list[str]:
    """4 distinct false options (phrases) for an mc question."""
    if template == "which":  # digit words that do not move `phrase` in this clip; the other mover first
        phrase, parts = context
        movers = {d for d, m in parts if holds(phrase, m)}
        hard = [d for d, _ in parts if d not in movers][:1]
        return hard + _draw(
            rng, [w for w in DIGIT_WORDS if w not in movers and w not in hard], NUM_OPTIONS - 1 - len(hard)
        )
    others: list[Motion] = context
    if template == "action":  # same-length motions that do not hold for the asked digit
        false = [m for m in MOTIONS if not holds(m, answer)]
        pool = [m for m in false if len(m) == len(answer)]
        picked = [m for m in others if m in pool][:1]  # the other digit's motion, a hard negative
        rest = [m for m in pool if m not in picked]
        picked += _draw(rng, rest, min(len(rest), NUM_OPTIONS - 1 - len(picked)))
        if len(picked) < NUM_OPTIONS - 1:  # one-direction answers: 3 other directions + one pair
            longer = [m for m in false if len(m) != len(answer)]
            hard = [m for m in others if m in longer][:1]
            picked += hard or _draw(rng, longer, 1)
    else:  # after / before: the other 3 directions (one of them is the mentioned one) and a pair
        picked = [(d,) for d in DIRECTIONS if (d,) != answer]
        pairs = [m for m in others if len(m) == 2]
        picked += pairs[:1] or _draw(rng, [m for m in MOTIONS if len(m) == 2], 1)
    return [motion_phrase(m) for m in picked]


class _PositionBag:
    """Correct-option positions by block randomisation: each block of 5 questions is a random permutation
    of 0..4, so every position is the answer equally often (up to 1) and the majority baseline is ~20 %."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.bag: list[int] = []

    def __call__(self) -> int:
        if not self.bag:
            self.bag = [int(i) for i in self.rng.permutation(NUM_OPTIONS)]
        return self.bag.pop()


def make_questions(
    parts: Sequence[Part],
    kind: Kind,
    rng: np.random.Generator,
    k: int = 1,
    position: Callable[[], int] | None = None,
) -> list[QAItem]:
    """Up to ``k`` distinct questions about one clip (fewer if the clip has fewer); ``clip`` is -1.

    Each draw: a template uniformly among those with a question left, then one of its questions.
    mc: the correct option goes to ``position()`` (default: uniform from ``rng``).
    """
    kind = _check_kind(kind)
    cands: dict[str, list[Any]] = {}
    for t, v in (_oe_candidates(parts) if kind == "oe" else _mc_candidates(parts)).items():
        first = {c[0]: c for c in reversed(v)}  # one per question text (a clip may repeat a part)
        cands[t] = [first[q] for q in dict.fromkeys(c[0] for c in v)]
    out: list[QAItem] = []
    for _ in range(k):
        live = [t for t in TEMPLATES[kind] if cands[t]]
        if not live:
            break
        t = live[int(rng.integers(len(live)))]
        c = cands[t].pop(int(rng.integers(len(cands[t]))))
        if kind == "oe":
            q, a = c
            out.append(QAItem(-1, t, q, ANSWERS.index(a), a))
        else:
            q, a, ctx = c
            a_text = a if isinstance(a, str) else motion_phrase(a)
            wrong = _mc_distractors(rng, t, a, ctx)
            order = [wrong[int(i)] for i in rng.permutation(len(wrong))]
            pos = int(rng.integers(NUM_OPTIONS)) if position is None else int(position())
            options = (*order[:pos], a_text, *order[pos:])
            if len(set(options)) != NUM_OPTIONS:  # cannot happen: distractors are distinct and false
                raise AssertionError(f"options are not {NUM_OPTIONS} distinct phrases: {options}")
            out.append(QAItem(-1, t, q, pos, a_text, options))
    return out


class QADataset(torch.utils.data.Dataset):
    """Questions on the clips of a :class:`VideoTextDataset`.

    Item ``i``: the clip's item dict (``index``, ``video_id``, ``caption``, ``features``) plus
    ``question`` (str), ``answer`` (int: option index for mc, index into :data:`ANSWERS` for oe),
    ``template`` (str) and, for mc, ``options`` (list of 5 str).
    """

    def __init__(self, split: VideoTextDataset, kind: Kind, items: Sequence[QAItem]):
        self.split = split
        self.kind = _check_kind(kind)
        self.items = list(items)
        for it in self.items:
            if not 0 <= it.clip < len(split):
                raise ValueError(f"question {it.question!r} refers to clip {it.clip}, the split has {len(split)}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        q = self.items[i]
        out = dict(self.split[q.clip])
        out.update(question=q.question, answer=q.answer, template=q.template)
        if self.kind == "mc":
            out["options"] = list(q.options)
        return out

    @property
    def answers(self) -> list[int]:
        return [q.answer for q in self.items]


def make_qa(split: VideoTextDataset, kind: Kind, seed: int, per_clip: int = 1) -> QADataset:
    """``per_clip`` questions of ``kind`` (``"mc"`` / ``"oe"``) per clip of ``split``, deterministic from ``seed``.

    A clip with fewer possible questions gets fewer (a clip whose caption is outside the grammar raises
    ``ValueError`` naming the video).
    """
    kind = _check_kind(kind)
    if not isinstance(per_clip, int) or per_clip < 1:
        raise ValueError(f"per_clip must be a positive int, got {per_clip!r}")
    rng = np.random.default_rng([int(seed), _KIND_CODE[kind]])
    items: list[QAItem] = []
    bag = _PositionBag(rng)
    for i, rec in enumerate(split.records):
        try:
            parts = parse_caption(rec.caption)
        except ValueError as e:
            raise ValueError(f"video {rec.video_id!r}: {e}") from None
        for q in make_questions(parts, kind, rng, per_clip, bag):
            items.append(QAItem(i, q.template, q.question, q.answer, q.answer_text, q.options))
    return QADataset(split, kind, items)


def answer_baselines(ds: QADataset) -> dict[str, float]:
    """Accuracies (percent) of answer-prior baselines on ``ds``.

    ``majority``: always the most frequent answer (mc: option position); ``template_majority``: the most
    frequent answer of each template (what a model that reads only the question type can reach);
    ``counts``: answers -> count (oe: answer words; mc: positions).
    """
    if len(ds) == 0:
        raise ValueError("answer_baselines needs a non-empty QADataset")
    ans = [q.answer for q in ds.items]
    best = max(ans.count(a) for a in set(ans))
    by_t: dict[str, list[int]] = {}
    for q in ds.items:
        by_t.setdefault(q.template, []).append(q.answer)
    per_t = sum(max(v.count(a) for a in set(v)) for v in by_t.values())
    return {"majority": 100.0 * best / len(ans), "template_majority": 100.0 * per_t / len(ans)}


# ------------------------------------------------------------------------------------- collate


class QACollate:
    """Items of a :class:`QADataset` -> the clip batch of ``base`` plus the question tensors.

    ``base`` (default ``Collate(tokenizer, max_words, mask_prob=mask_prob, seed=seed)``) builds the clip
    fields (text, masks, video, ... of the caption: the backbone's pretext losses run on them). Added,
    with ``Lq = max_words + 2``:

        oe: ``question`` [B, Lq] ``[CLS] q.. [SEP] [PAD]..``, ``question_mask`` [B, Lq] bool
        mc: ``qa_text`` [B, 5, Lq] ``[CLS] q.. [SEP] option_k.. [SEP] [PAD]..``, ``qa_text_mask`` [B, 5, Lq]
        ``answer`` [B] long

    Questions and options are never truncated: too long, or a word outside the tokenizer's vocabulary
    (e.g. a tokenizer from a checkpoint made before the question words existed), raises ``ValueError``.
    ``gen`` is the inner collate's mask generator (get / set).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        kind: Kind,
        max_words: int = 20,
        mask_prob: float = 0.15,
        seed: int = 0,
        base: Callable[[Sequence[Mapping[str, Any]]], dict[str, Tensor]] | None = None,
    ):
        self.kind = _check_kind(kind)
        if not isinstance(max_words, int) or max_words < 2:
            raise ValueError(f"max_words must be an int >= 2, got {max_words!r}")
        self.tok = tokenizer
        self.max_words = max_words
        self.base = (
            base if base is not None else Collate(tokenizer, max_words=max_words, mask_prob=mask_prob, seed=seed)
        )

    @property
    def gen(self) -> torch.Generator:
        return self.base.gen  # type: ignore[attr-defined]

    @gen.setter
    def gen(self, g: torch.Generator) -> None:
        self.base.gen = g  # type: ignore[attr-defined]

    def _words(self, text: str, what: str) -> list[int]:
        ids = self.tok.encode(text)
        if self.tok.unk_id in ids:
            bad = [w for w in self.tok.split(text) if w not in self.tok.ids]
            raise ValueError(
                f"{what} {text!r} has word(s) {bad} outside the tokenizer's vocabulary (use Tokenizer.for_digits(), "
                "whose vocabulary has the question words; a checkpoint pretrained before they were added lacks them)"
            )
        return ids

    def _row(self, ids: list[int], what: str) -> Tensor:
        Lq = self.max_words + 2
        if len(ids) > Lq:
            raise ValueError(f"{what} needs {len(ids)} tokens, more than max_words + 2 = {Lq}")
        row = torch.full((Lq,), self.tok.pad_id, dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        return row

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = self.base(items)
        tok = self.tok
        rows, answers = [], []
        for it in items:
            for k in ("question", "answer") + (("options",) if self.kind == "mc" else ()):
                if k not in it:
                    raise KeyError(f"QA item of video {it.get('video_id')!r} has no {k!r} (kind {self.kind!r})")
            q = self._words(it["question"], "question")
            a = int(it["answer"])
            if self.kind == "oe":
                if not 0 <= a < len(ANSWERS):
                    raise ValueError(f"open-ended answer {a} is outside ANSWERS (0..{len(ANSWERS) - 1})")
                rows.append(self._row([tok.cls_id, *q, tok.sep_id], f"question {it['question']!r}"))
            else:
                opts = list(it["options"])
                if len(opts) != NUM_OPTIONS or not 0 <= a < NUM_OPTIONS:
                    raise ValueError(f"an mc item needs {NUM_OPTIONS} options and answer in 0..4, got {opts}, {a}")
                rows.append(
                    torch.stack(
                        [
                            self._row([tok.cls_id, *q, tok.sep_id, *self._words(o, "option"), tok.sep_id], f"{o!r}")
                            for o in opts
                        ]
                    )
                )
            answers.append(a)
        ids = torch.stack(rows)
        key = "question" if self.kind == "oe" else "qa_text"
        batch[key] = ids
        batch[key + "_mask"] = ids != tok.pad_id
        batch["answer"] = torch.tensor(answers, dtype=torch.long)
        return batch


# --------------------------------------------------------------------------------------- model


def _backbone_loss_names(backbone: nn.Module) -> tuple[str, ...]:
    """``backbone.LOSS_NAMES``, else the ``LOSS_NAMES`` constant of the backbone's module."""
    names = getattr(backbone, "LOSS_NAMES", None)
    if names is None:
        names = getattr(sys.modules.get(type(backbone).__module__), "LOSS_NAMES", None)
    if names is None:
        raise TypeError(f"{type(backbone).__name__} has no LOSS_NAMES (class attribute or module constant)")
    return tuple(names)


class QAModel(nn.Module):
    """A QA head on a backbone (``backbone.fuse``, ``backbone.cfg.hidden``, ``backbone(batch, losses=...)``).

    ``loss_names`` (also ``LOSS_NAMES``) = ``("qa",) + backbone's LOSS_NAMES``; ``primary`` = ``"qa"``.
    ``forward(batch, losses=None)`` -> ``{name: 0-dim loss}`` in ``loss_names`` order (``losses`` selects):

        qa = CE(logits, answer)      oe: logits = head(fuse(question, video))      [B, len(ANSWERS)]
                                     mc: logits[b, k] = head(fuse(qa_text[b, k], video[b]))  [B, 5]

    ``head`` = Linear(H, H) -> GELU -> LayerNorm -> Linear(H, out) (out = len(ANSWERS) or 1). The
    backbone is the submodule ``backbone`` (``bl.functional_module(qa_model)`` covers its parameters).
    """

    def __init__(self, backbone: nn.Module, kind: Kind):
        super().__init__()
        self.kind = _check_kind(kind)
        if not callable(getattr(backbone, "fuse", None)):
            raise TypeError(f"backbone {type(backbone).__name__} has no fuse(text, text_mask, video, video_mask)")
        self.backbone = backbone
        pre = _backbone_loss_names(backbone)
        if "qa" in pre:
            raise ValueError(f"the backbone already has a loss named 'qa': {pre}")
        self.loss_names: tuple[str, ...] = ("qa", *pre)
        self.LOSS_NAMES = self.loss_names
        self.primary = "qa"
        H = int(backbone.cfg.hidden)  # type: ignore[union-attr]
        out = len(ANSWERS) if self.kind == "oe" else 1
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.LayerNorm(H, eps=1e-12), nn.Linear(H, out))

    def logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """oe: [B, len(ANSWERS)] answer logits; mc: [B, 5] option scores."""
        video, vmask = batch["video"], batch["video_mask"]
        if self.kind == "oe":
            if "question" not in batch:
                raise KeyError("an open-ended QA batch needs 'question' / 'question_mask' (QACollate kind='oe')")
            return self.head(self.backbone.fuse(batch["question"], batch["question_mask"], video, vmask))
        if "qa_text" not in batch:
            raise KeyError("a multiple-choice QA batch needs 'qa_text' / 'qa_text_mask' (QACollate kind='mc')")
        qa, qm = batch["qa_text"], batch["qa_text_mask"]
        B, K, L = qa.shape
        h = self.backbone.fuse(
            qa.reshape(B * K, L), qm.reshape(B * K, L), video.repeat_interleave(K, 0), vmask.repeat_interleave(K, 0)
        )
        return self.head(h).view(B, K)

    def forward(self, batch: Mapping[str, Tensor], losses: Sequence[str] | None = None) -> dict[str, Tensor]:
        want = self.loss_names if losses is None else tuple(losses)
        unknown = [n for n in want if n not in self.loss_names]
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; known: {list(self.loss_names)}")
        out: dict[str, Tensor] = {}
        if "qa" in want:
            out["qa"] = F.cross_entropy(self.logits(batch), batch["answer"])
        pre = tuple(n for n in self.loss_names[1:] if n in want)
        if pre:
            out.update(self.backbone(batch, losses=pre))
        return {n: out[n] for n in self.loss_names if n in out}

    @torch.no_grad()
    def predict(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Predicted answers [B] long (oe: index into ANSWERS; mc: option index)."""
        return self.logits(batch).argmax(-1)


def qa_accuracy(
    model: QAModel, dataset: QADataset, tokenizer: Tokenizer, kind: Kind, batch_size: int = 64
) -> dict[str, float]:
    """``{"acc": 100 * mean(model.predict == answer)}`` over ``dataset`` (batches in order, no masks)."""
    kind = _check_kind(kind)
    if getattr(dataset, "kind", kind) != kind:
        raise ValueError(f"dataset holds {dataset.kind!r} questions, kind is {kind!r}")
    if len(dataset) == 0:
        raise ValueError("qa_accuracy needs a non-empty dataset")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    collate = QACollate(tokenizer, kind, mask_prob=0.0)
    correct = 0
    for s in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        pred = model.predict(batch)
        if pred.shape != batch["answer"].shape:
            raise ValueError(f"predict returned shape {tuple(pred.shape)}, expected {tuple(batch['answer'].shape)}")
        correct += int((pred == batch["answer"]).sum())
    return {"acc": 100.0 * correct / len(dataset)}
