"""VQA accuracy exactly as the official VQAv2 evaluation script computes it, and GQA-style exact match.

The official rule, question by question:

1. Newlines and tabs in the prediction and in each human answer become spaces; both are stripped.
2. Only if the human answers are *not all identical*, the answers and the prediction are normalised:
   :func:`process_punctuation` then :func:`process_digit_article`. (So for ten unanimous "yes" answers
   the prediction "Yes" or "yes." scores 0 — a quirk of the official script, kept on purpose.)
3. For each human answer in turn, count how many of the *other* answers equal the prediction; that
   subset's accuracy is ``min(1, count / 3)``. The question's accuracy is the mean over the subsets.

Overall, per-question-type and per-answer-type accuracies are means over questions, ×100, unrounded
(the official script rounds them to 2 decimals for display only).

The official script removes "the other answers" by comparing answer records (answer text plus its
``answer_id``); VQAv2 answer ids are unique within a question, so that is leave-one-out by position,
which is what is done here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.errors import DataError

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "VQAAnnotation",
    "VQAEvaluation",
    "gqa_accuracy",
    "load_vqa_annotations",
    "load_vqa_results",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "vqa_accuracy",
    "vqa_score",
]

#: Characters the official script deletes (next to a space, or anywhere if the text has a digit,digit)
#: or otherwise replaces by a space. Apostrophes, periods, ``: # $ % & * |`` are not in it.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
#: The official contraction map, as written there. It is applied after lower-casing, so the keys with a
#: capital letter ("Im", "Ive", "Id've", "I'dve") never match; "somebody'd" maps *to* "somebodyd".
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (= 32) where re.sub takes its count: at most 32 periods go.
_MAX_PERIODS_REMOVED = 32


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    Each character of :data:`PUNCTUATION` is deleted when it stands next to a space in ``text`` or when
    ``text`` contains a digit-comma-digit anywhere; otherwise every occurrence becomes a space. Then
    periods not followed by a digit are deleted (at most 32 of them, as in the official call).
    """
    out = text
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if strip_all or (p + " ") in text or (" " + p) in text:  # decided on the original text
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words to digits,
    drop articles, apply :data:`CONTRACTIONS`, re-join with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Full official normalisation of one answer: punctuation, then digits/articles/contractions."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one predicted answer against the human answers, in [0, 1].

    Args:
        prediction: the model's answer.
        answers: the human answers (10 in VQAv2).

    Raises:
        DataError: if there are no human answers.
    """
    if len(answers) == 0:
        raise DataError("a VQA question needs at least one human answer")
    gts = [_clean(a) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    total_matches = sum(1 for a in gts if a == pred)
    # Leave-one-out: removing answer i leaves total_matches - [answer i matches] matching others.
    subset_acc = [min(1.0, float(total_matches - (a == pred)) / 3) for a in gts]
    return float(sum(subset_acc)) / len(subset_acc)


@dataclass
class VQAAnnotation:
    """Ground truth of one question.

    Attributes:
        answers: the human answers (strings).
        question_type: e.g. ``"what color is the"``; ``None`` if unknown.
        answer_type: ``"yes/no"``, ``"number"`` or ``"other"``; ``None`` if unknown.
    """

    answers: list[str]
    question_type: str | None = None
    answer_type: str | None = None


@dataclass
class VQAEvaluation:
    """Result of :func:`vqa_accuracy`; all accuracies are percentages (×100), unrounded.

    Attributes:
        overall: mean accuracy over the evaluated questions.
        per_question_type: mean accuracy per question type (questions with a known type).
        per_answer_type: mean accuracy per answer type (questions with a known type).
        per_question: accuracy of every question.
    """

    overall: float
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question: dict[Hashable, float] = field(default_factory=dict)

    def to_dict(self, ndigits: int | None = None) -> dict[str, Any]:
        """The official ``accuracy`` layout (``overall``, ``perQuestionType``, ``perAnswerType``),
        rounded to ``ndigits`` when given (the official script uses 2)."""

        def r(x: float) -> float:
            return round(x, ndigits) if ndigits is not None else x

        return {
            "overall": r(self.overall),
            "perQuestionType": {k: r(v) for k, v in self.per_question_type.items()},
            "perAnswerType": {k: r(v) for k, v in self.per_answer_type.items()},
        }


def _as_annotation(qid: Hashable, ann: Any) -> VQAAnnotation:
    if isinstance(ann, VQAAnnotation):
        return ann
    if isinstance(ann, Mapping):
        answers = ann.get("answers", ann.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, Sequence) or not answers:
            raise DataError(f"question {qid!r}: 'answers' must be a non-empty list")
        texts = []
        for a in answers:
            text = a.get("answer") if isinstance(a, Mapping) else a
            if not isinstance(text, str):
                raise DataError(f"question {qid!r}: every answer must be a string or {{'answer': str}}, got {a!r}")
            texts.append(text)
        return VQAAnnotation(texts, ann.get("question_type"), ann.get("answer_type"))
    if isinstance(ann, Sequence) and not isinstance(ann, str) and all(isinstance(a, str) for a in ann) and ann:
        return VQAAnnotation(list(ann))
    raise DataError(f"question {qid!r}: expected a list of answers or an annotation mapping, got {ann!r}")


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * float(sum(values)) / len(values)


def vqa_accuracy(
    predictions: Mapping[Hashable, str], annotations: Mapping[Hashable, VQAAnnotation | Mapping | Sequence[str]]
) -> VQAEvaluation:
    """Official VQAv2 accuracy of ``predictions`` with per-question-type and per-answer-type breakdowns.

    Args:
        predictions: ``{question_id: answer}``; these questions are evaluated.
        annotations: ``{question_id: ground truth}`` where the ground truth is a :class:`VQAAnnotation`, an
            official annotation record (``{"answers": [{"answer": ...}, ...], "question_type", "answer_type"}``)
            or a plain list of answer strings.

    Returns:
        A :class:`VQAEvaluation` with percentages.

    Raises:
        DataError: no predictions, a predicted question without annotation, or malformed annotations.
    """
    if not predictions:
        raise DataError("no VQA predictions to evaluate")
    missing = [q for q in predictions if q not in annotations]
    if missing:
        shown = ", ".join(repr(q) for q in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} predicted question ids have no annotation: {shown}")
    per_question: dict[Hashable, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid, pred in predictions.items():
        if not isinstance(pred, str):
            raise DataError(f"question {qid!r}: the predicted answer must be a string, got {type(pred).__name__}")
        ann = _as_annotation(qid, annotations[qid])
        acc = vqa_score(pred, ann.answers)
        per_question[qid] = acc
        if ann.question_type is not None:
            by_qtype.setdefault(ann.question_type, []).append(acc)
        if ann.answer_type is not None:
            by_atype.setdefault(ann.answer_type, []).append(acc)
    return VQAEvaluation(
        overall=_mean_percent(list(per_question.values())),
        per_question_type={k: _mean_percent(v) for k, v in by_qtype.items()},
        per_answer_type={k: _mean_percent(v) for k, v in by_atype.items()},
        per_question={q: 100.0 * a for q, a in per_question.items()},
    )


def gqa_accuracy(
    predictions: Mapping[Hashable, str], targets: Mapping[Hashable, str], normalize_predictions: bool = True
) -> float:
    """GQA-style exact-match accuracy (percent), as LAVIS scores generated GQA answers.

    Args:
        predictions: ``{question_id: answer}``.
        targets: ``{question_id: ground-truth answer}``, compared as given.
        normalize_predictions: pass predictions through :func:`normalize_answer` first (LAVIS does for
            generated answers; ranked answers come from the answer list and need not be).

    Raises:
        DataError: no predictions or a prediction without target.
    """
    from vlkit.metrics.classification import exact_match_accuracy

    missing = [q for q in predictions if q not in targets]
    if missing:
        raise DataError(f"{len(missing)} predicted question ids have no target answer, e.g. {missing[0]!r}")
    ids = list(predictions)
    return exact_match_accuracy(
        [predictions[q] for q in ids],
        [targets[q] for q in ids],
        normalize=normalize_answer if normalize_predictions else None,
        normalize_targets=False,
    )


def _read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def load_vqa_annotations(path: str | os.PathLike) -> dict[Hashable, VQAAnnotation]:
    """Read VQA ground truth: the official ``{"annotations": [...]}`` file or a list of records.

    Each record needs ``question_id`` and ``answers`` (strings or ``{"answer": ...}``; ``answer`` is
    accepted too); ``question_type`` and ``answer_type`` are kept when present.

    Raises:
        DataError: missing file, invalid JSON, or malformed / duplicate records.
    """
    data = _read_json(path)
    records = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected {{'annotations': [...]}} or a list of question records")
    out: dict[Hashable, VQAAnnotation] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "question_id" not in rec:
            raise DataError(f"{path}: record {i} needs a 'question_id'")
        qid = rec["question_id"]
        if qid in out:
            raise DataError(f"{path}: question {qid!r} appears twice")
        try:
            out[qid] = _as_annotation(qid, rec)
        except DataError as err:
            raise DataError(f"{path}: {err}") from err
    return out


def load_vqa_results(path: str | os.PathLike) -> dict[Hashable, str]:
    """Read a VQA results file ``[{"question_id", "answer"}, ...]`` into ``{question_id: answer}``.

    Raises:
        DataError: missing file, invalid JSON, malformed entries or a question answered twice.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'question_id', 'answer'}} (VQA results format)")
    out: dict[Hashable, str] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "question_id" not in item or not isinstance(item.get("answer"), str):
            raise DataError(f"{path}: entry {i} needs 'question_id' and a string 'answer'")
        if item["question_id"] in out:
            raise DataError(f"{path}: question {item['question_id']!r} is answered twice")
        out[item["question_id"]] = item["answer"]
    return out
