"""The VQAv2 answer vocabulary of ViLT/VLMo classifiers and their soft-score targets.

A VQA classifier head predicts one of a fixed list of answers (3129 for VQAv2). The list is built exactly as
unilm's ``vlmo/utils/write_vqa.py`` (ViLT's script) does:

1. take every question's ``multiple_choice_answer`` from the train annotations, then the val annotations,
   in file order;
2. normalise each with :func:`normalize_answer`;
3. keep answers seen at least 9 times; label ids follow the order of first occurrence.

A question's training target gives each of its annotators' answers (the ten raw ``answers[*].answer``
strings, *not* normalised, a quirk of the reference) that is in the vocabulary a soft score from its vote
count: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0 (the official VQA accuracy of that answer).
Questions without any in-vocabulary answer are left out of training and validation.

Label files: :meth:`VQAVocab.save` writes the JSON-lines ``answer2label.txt`` of the VLMo inference guide
(``{"answer": ..., "label": ...}`` per line); :meth:`VQAVocab.load` also reads a JSON list of answers, a
``{"0": answer, ...}`` id2label map (optionally under ``"id2label"``, as in HF configs), a
``{"answer2label": ...}``/``{"label2ans": [...]}`` object, or a plain text file with one answer per line.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlkit.errors import DataError

# ------------------------------------------------------------------------------- answer normalisation
# The VQA evaluation's word tables, as the reference's glossary.py spells them (including keys that can
# never match after lower-casing, such as "Im").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The reference's pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a (vacuous) negative *lookahead*,
# not a lookbehind, so in effect every period not followed by a digit is removed ("5." -> "5", "x.5" kept).
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The reference passes re.UNICODE (= 32) where ``Pattern.sub`` expects ``count``: at most 32 periods go.
_PERIOD_COUNT = 32


def normalize_answer(answer: str) -> str:
    """Normalise an answer string as the reference vocabulary builder does (VQA-eval style).

    Punctuation next to a space, or anywhere in a string containing digit-comma-digit, is deleted; other
    punctuation becomes a space. Periods not followed by a digit are removed (at most 32). The result is
    lower-cased, split on whitespace, number words become digits, articles are dropped, contractions are
    restored ("dont" -> "don't"), words are joined by single spaces and remaining commas are removed.

    Args:
        answer: raw answer text.

    Returns:
        The normalised answer.
    """
    out = answer
    delete = _DIGIT_COMMA_DIGIT.search(answer) is not None
    for p in PUNCTUATION:
        # Tested on the original string, as in the reference, while replacing in the running result.
        if delete or p + " " in answer or " " + p in answer:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words).replace(",", "")


def answer_score(votes: int) -> float:
    """Soft target of an answer given by ``votes`` of the annotators: 0, 0.3, 0.6, 0.9, then 1.0 from 4 up."""
    if votes <= 0:
        return 0.0
    return (0.3, 0.6, 0.9)[votes - 1] if votes <= 3 else 1.0


# --------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VQAVocab:
    """An ordered list of answers; label ``i`` is ``answers[i]``."""

    answers: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        dupes = [a for a in self.answers if a in seen or seen.add(a)]  # type: ignore[func-returns-value]
        if dupes:
            raise DataError(f"duplicate answers in the VQA vocabulary: {dupes[:5]}")
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(self.answers)})

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self._index  # type: ignore[attr-defined]

    @property
    def answer2label(self) -> dict[str, int]:
        return dict(self._index)  # type: ignore[attr-defined]

    def label(self, answer: str) -> int | None:
        """Label id of ``answer`` (exact string), or None."""
        return self._index.get(answer)  # type: ignore[attr-defined]

    def answer(self, label: int) -> str:
        """Answer of ``label``; "unknown" outside the vocabulary (as the reference's test dump)."""
        return self.answers[label] if 0 <= label < len(self.answers) else "unknown"

    def decode(self, logits: Tensor) -> list[str]:
        """Arg-max answers of (B, num_labels) classifier logits."""
        if logits.ndim != 2 or logits.shape[1] != len(self):
            raise DataError(f"expected logits of shape (batch, {len(self)}), got {tuple(logits.shape)}")
        return [self.answer(int(i)) for i in logits.argmax(dim=-1).tolist()]

    def targets(self, raw_answers: Iterable[str]) -> tuple[list[int], list[float]]:
        """Soft-score target of one question (the reference's ``labels``/``scores``).

        Args:
            raw_answers: the annotators' answer strings as written (not normalised).

        Returns:
            (labels, scores) for the in-vocabulary answers, in order of first appearance.
        """
        votes = Counter(raw_answers)  # insertion-ordered, like the reference's dict count
        labels, scores = [], []
        for answer, n in votes.items():
            label = self.label(answer)
            if label is not None:
                labels.append(label)
                scores.append(answer_score(n))
        return labels, scores

    def target_vector(self, labels: Sequence[int], scores: Sequence[float]) -> Tensor:
        """Dense (num_labels,) float target with ``scores`` at ``labels`` (zeros elsewhere)."""
        out = torch.zeros(len(self))
        if labels:
            out[torch.as_tensor(list(labels), dtype=torch.long)] = torch.as_tensor(list(scores), dtype=torch.float)
        return out

    # ------------------------------------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON lines ``{"answer": ..., "label": ...}`` (the inference guide's ``answer2label.txt``)."""
        lines = (json.dumps({"answer": a, "label": i}, ensure_ascii=False) for i, a in enumerate(self.answers))
        Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> VQAVocab:
        """Read a label file in any of the formats listed in the module docstring.

        Raises:
            DataError: if the file is missing or its labels are not exactly 0..n-1 without duplicates.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise DataError(f"{path}: cannot read VQA label file ({err})") from err
        try:
            return cls(tuple(_parse_label_file(text, path)))
        except DataError as err:
            raise DataError(f"{path}: {err}") from err


def _parse_label_file(text: str, path: Path) -> list[str]:
    stripped = text.strip()
    if not stripped:
        raise DataError("empty VQA label file")
    if stripped[0] in "[{":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            return _from_json(data)
        if stripped[0] == "{":  # JSON lines
            pairs = {}
            for n, line in enumerate(stripped.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    answer, label = item["answer"], int(item["label"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                    raise DataError(f"line {n}: expected {{'answer': ..., 'label': ...}} ({err})") from err
                pairs[answer] = label
            return _ordered(pairs)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _from_json(data: Any) -> list[str]:
    if isinstance(data, list):
        return [str(a) for a in data]
    if isinstance(data, Mapping):
        if "label2ans" in data:
            return _from_json(list(data["label2ans"]))
        if "answer2label" in data:
            return _ordered({str(k): int(v) for k, v in data["answer2label"].items()})
        if "id2label" in data:
            data = data["id2label"]
        try:
            return _ordered({str(v): int(k) for k, v in data.items()})
        except (TypeError, ValueError) as err:
            raise DataError(f"expected a map of label ids to answers ({err})") from err
    raise DataError(f"unsupported label file content of type {type(data).__name__}")


def _ordered(answer2label: Mapping[str, int]) -> list[str]:
    labels = sorted(answer2label.values())
    if labels != list(range(len(labels))):
        raise DataError(f"labels must be exactly 0..{len(labels) - 1} without gaps or duplicates")
    out = [""] * len(labels)
    for answer, label in answer2label.items():
        out[label] = answer
    return out


# ---------------------------------------------------------------------------------------------- building


def _annotations(
    source: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: cannot read VQAv2 annotations ({err})") from err
        source = data
    if isinstance(source, Mapping):
        if "annotations" not in source:
            raise DataError("VQAv2 annotation data has no 'annotations' list")
        source = source["annotations"]
    return list(source)


def build_vqa_vocab(
    annotation_sources: Sequence[str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]]],
    *,
    min_count: int = 9,
) -> VQAVocab:
    """Build the answer vocabulary from VQAv2 annotation files, as the reference does.

    Args:
        annotation_sources: ``v2_mscoco_train2014_annotations.json`` then ``v2_mscoco_val2014_annotations.json``
            (paths, their parsed JSON, or lists of annotation dicts), in that order.
        min_count: keep normalised ``multiple_choice_answer`` values seen at least this often.

    Returns:
        The vocabulary, labels in order of first occurrence.

    Raises:
        DataError: on unreadable files or annotations without ``multiple_choice_answer``.
    """
    counts: Counter[str] = Counter()
    for source in annotation_sources:
        for n, annotation in enumerate(_annotations(source)):
            try:
                counts[normalize_answer(annotation["multiple_choice_answer"])] += 1
            except (KeyError, TypeError) as err:
                raise DataError(f"annotation {n} has no multiple_choice_answer") from err
    return VQAVocab(tuple(a for a, c in counts.items() if c >= min_count))


def question_targets(
    annotation_sources: Sequence[str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]]], vocab: VQAVocab
) -> dict[int, tuple[list[int], list[float]]]:
    """Soft targets per ``question_id`` (questions without an in-vocabulary answer are left out).

    Raises:
        DataError: on annotations without ``question_id`` or ``answers``.
    """
    out: dict[int, tuple[list[int], list[float]]] = {}
    for source in annotation_sources:
        for n, annotation in enumerate(_annotations(source)):
            try:
                raw = [a["answer"] for a in annotation["answers"]]
                qid = int(annotation["question_id"])
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"annotation {n} lacks question_id/answers ({err})") from err
            labels, scores = vocab.targets(raw)
            if labels:
                out[qid] = (labels, scores)
    return out
