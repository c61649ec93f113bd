"""VQA answer vocabulary and soft-score targets, on hand-worked examples of the reference rules."""

from __future__ import annotations

import json

import pytest
import torch

from vlkit.data.vqa_vocab import (
    VQAVocab,
    answer_score,
    build_vqa_vocab,
    normalize_answer,
    question_targets,
)
from vlkit.errors import DataError


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number words become digits
        ("none", "0"),
        ("The Dog.", "dog"),  # trailing period stripped, article dropped, lower-cased
        ("a man's hat", "man's hat"),
        ("dont", "don't"),  # contraction restored
        ("Im", "im"),  # the table's capitalised keys never match after lower-casing (as in the reference)
        ("1.5", "1.5"),  # a period before a digit stays
        ("x.5", "x.5"),  # ... even when not after a digit: the reference's look-behind is a look-ahead
        ("5.", "5"),
        ("1,000", "1000"),  # digit,digit: punctuation deleted rather than spaced
        ("hot-dog", "hot dog"),  # punctuation inside a word becomes a space
        ("t - shirt", "t shirt"),  # punctuation next to a space is deleted
        ("red, white", "red white"),
        ("yes!", "yes"),
        ("  left   side ", "left side"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_strips_at_most_32_periods():
    # The reference passes re.UNICODE (32) as the count of its period substitution.
    assert normalize_answer("." * 40 + "x") == "." * 8 + "x"


def test_answer_scores():
    assert [answer_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]


def _ann(qid, mc, answers=()):
    return {"question_id": qid, "multiple_choice_answer": mc, "answers": [{"answer": a} for a in answers]}


TRAIN = {"annotations": [_ann(1, "yes"), _ann(2, "Two"), _ann(3, "no"), _ann(4, "2"), _ann(5, "yes"), _ann(6, "cat")]}
VAL = {"annotations": [_ann(7, "no"), _ann(8, "dog"), _ann(9, "two"), _ann(10, "Cat.")]}


def test_vocabulary_counts_normalised_answers_in_first_occurrence_order(tmp_path):
    # Normalised counts: yes 2, "2" 3 (Two, 2, two), no 2, cat 2 (cat, Cat.), dog 1.
    vocab = build_vqa_vocab([TRAIN, VAL], min_count=2)
    assert vocab.answers == ("yes", "2", "no", "cat")
    assert build_vqa_vocab([TRAIN, VAL], min_count=3).answers == ("2",)
    # Files in the VQAv2 layout, train then val; the val file alone changes the order.
    (tmp_path / "train.json").write_text(json.dumps(TRAIN))
    (tmp_path / "val.json").write_text(json.dumps(VAL))
    assert build_vqa_vocab([tmp_path / "train.json", tmp_path / "val.json"], min_count=2) == vocab
    assert build_vqa_vocab([tmp_path / "val.json"], min_count=1).answers == ("no", "dog", "2", "cat")
    with pytest.raises(DataError):
        build_vqa_vocab([tmp_path / "missing.json"])
    with pytest.raises(DataError):
        build_vqa_vocab([{"annotations": [{"question_id": 1}]}])


def test_soft_targets_use_raw_answer_strings():
    vocab = VQAVocab(("yes", "2", "no", "cat"))
    raw = ["yes", "yes", "Yes", "no", "yes", "yes", "2", "2", "2", "two"]
    # yes x4 -> 1.0, "Yes" and "two" are not normalised and so not in the vocabulary, no x1 -> 0.3, 2 x3 -> 0.9;
    # order of first appearance among the raw answers.
    labels, scores = vocab.targets(raw)
    assert labels == [0, 2, 1] and scores == [1.0, 0.3, 0.9]
    target = vocab.target_vector(labels, scores)
    assert torch.equal(target, torch.tensor([1.0, 0.9, 0.3, 0.0]))
    assert torch.equal(vocab.target_vector([], []), torch.zeros(4))
    anns = [{"annotations": [_ann(11, "yes", raw), _ann(12, "dog", ["dog"] * 10), _ann(13, "cat", ["cat", "cats"])]}]
    per_q = question_targets(anns, vocab)
    assert per_q == {11: ([0, 2, 1], [1.0, 0.3, 0.9]), 13: ([3], [0.3])}  # 12 has no answer in the vocabulary


def test_label_files_round_trip_and_other_formats(tmp_path):
    vocab = VQAVocab(("yes", "2", "no", "hot dog"))
    path = tmp_path / "answer2label.txt"
    vocab.save(path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"answer": "yes", "label": 0}  # the inference guide's format
    assert VQAVocab.load(path) == vocab
    (tmp_path / "list.json").write_text(json.dumps(list(vocab.answers)))
    (tmp_path / "id2label.json").write_text(json.dumps({"id2label": {"1": "2", "0": "yes", "3": "hot dog", "2": "no"}}))
    (tmp_path / "plain.txt").write_text("yes\n2\nno\nhot dog\n")
    for name in ("list.json", "id2label.json", "plain.txt"):
        assert VQAVocab.load(tmp_path / name) == vocab
    (tmp_path / "gap.json").write_text(json.dumps({"0": "yes", "2": "no"}))
    with pytest.raises(DataError, match="gap.json"):
        VQAVocab.load(tmp_path / "gap.json")
    with pytest.raises(DataError, match="duplicate"):
        VQAVocab(("yes", "yes"))
    with pytest.raises(DataError):
        VQAVocab.load(tmp_path / "nope.txt")


def test_decode_logits():
    vocab = VQAVocab(("yes", "no", "2"))
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert vocab.decode(logits) == ["no", "yes"]
    assert vocab.answer(7) == "unknown" and vocab.label("2") == 2 and vocab.label("two") is None
    with pytest.raises(DataError):
        vocab.decode(torch.zeros(2, 4))
