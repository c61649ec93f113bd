"""Official VQAv2 accuracy on hand-worked cases, one per rule, plus GQA exact match and the file loaders."""

from __future__ import annotations

import json

import pytest

from vlkit.errors import DataError
from vlkit.metrics.vqa import (
    VQAAnnotation,
    gqa_accuracy,
    load_vqa_annotations,
    load_vqa_results,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_score,
)


def answers(*pairs: tuple[str, int]) -> list[str]:
    """("yes", 7), ("no", 3) -> 10 answers."""
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return out


# ----------------------------------------------------------------------------------------------------
# Leave-one-out scoring
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # held out: 0 (once), else 1/3 (9 times) -> 3/10
        (2, 0.6),  # 2 x 1/3 + 8 x 2/3 = 6 -> /10
        (3, 0.9),  # 3 x 2/3 + 7 x 1 = 9 -> /10
        (4, 1.0),  # every subset of 9 still has >= 3 matches
        (10, 1.0),
    ],
)
def test_leave_one_out_min_matches_over_three(n_matching: int, expected: float) -> None:
    gts = ["red"] * n_matching + ["blue", "green"] * 5
    gts = gts[:10]
    assert vqa_score("red", gts) == pytest.approx(expected, abs=1e-12)


def test_fewer_than_ten_answers_use_the_same_rule() -> None:
    # 3 answers, 2 match: held out a match -> 1/3, held out the other -> 2/3; mean 4/9.
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)


def test_unanimous_answers_are_not_normalised() -> None:
    unanimous = ["yes"] * 10
    assert vqa_score("yes", unanimous) == 1.0
    assert vqa_score("Yes", unanimous) == 0.0  # the official quirk: no lower-casing here
    assert vqa_score("yes.", unanimous) == 0.0
    assert vqa_score("  yes\n", unanimous) == 1.0  # but whitespace is always cleaned
    # Unanimity is judged after stripping: "yes " and "yes" are the same answer.
    assert vqa_score("Yes", ["yes "] * 5 + ["yes"] * 5) == 0.0


def test_disagreeing_answers_normalise_both_sides() -> None:
    gts = answers(("yes", 9), ("no", 1))
    assert vqa_score("Yes.", gts) == 1.0
    assert vqa_score("YES!", gts) == 1.0
    gts = answers(("two", 4), ("2", 3), ("3", 3))
    assert vqa_score("Two", gts) == 1.0  # "two" -> "2": 7 matches
    assert vqa_score("the 3", gts) == pytest.approx(0.9)  # article dropped: 3 matches


def test_newlines_and_tabs_become_spaces() -> None:
    gts = answers(("fire hydrant", 5), ("hydrant", 5))
    assert vqa_score("fire\thydrant", gts) == 1.0
    assert vqa_score("fire\nhydrant ", gts) == 1.0


# ----------------------------------------------------------------------------------------------------
# Normalisation rules
# ----------------------------------------------------------------------------------------------------


def test_punctuation_next_to_a_space_is_deleted_otherwise_replaced_by_space() -> None:
    assert process_punctuation("yes , it is") == "yes  it is"  # "," touches a space -> deleted
    assert process_punctuation("black/white") == "black white"  # "/" inside a word -> space
    assert process_punctuation("black/white cat!") == "black white cat "
    # The decision is per character, on the original text: "(" touches a space and is deleted, ")" and
    # "-" do not and become spaces.
    assert process_punctuation("hot-dog (food)") == "hot dog food "
    assert process_punctuation("(a) b") == " a b"  # here ")" touches a space and "(" becomes a space


def test_digit_comma_digit_deletes_every_punctuation_mark() -> None:
    assert process_punctuation("1,000") == "1000"
    assert process_punctuation("1,000-2,000 (approx)") == "10002000 approx"
    assert process_punctuation("a,b") == "a b"  # no digit,digit: the comma becomes a space


def test_periods_are_removed_unless_before_a_digit() -> None:
    assert process_punctuation("u.s.a.") == "usa"
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation("ver.2 end.") == "ver.2 end"
    # At most 32 periods go (the official call passes re.UNICODE where the count belongs).
    assert process_punctuation("." * 40) == "." * 8


def test_kept_characters() -> None:
    assert process_punctuation("it's 10:30 #1 50% a&b *|") == "it's 10:30 #1 50% a&b *|"


def test_digits_articles_contractions() -> None:
    assert process_digit_article("The Two Dogs") == "2 dogs"
    assert process_digit_article("none of the ten") == "0 of 10"
    assert process_digit_article("a an the") == ""
    assert process_digit_article("dont  know") == "don't know"
    assert process_digit_article("cant wont") == "can't won't"
    # Keys written with a capital in the official map never match after lower-casing.
    assert process_digit_article("Im Ive") == "im ive"
    assert process_digit_article("somebody'd") == "somebodyd"  # as written in the official map
    assert process_digit_article("eleven") == "eleven"  # only none/zero..ten are mapped


def test_normalize_answer_chains_both_steps() -> None:
    assert normalize_answer("The dog's toy, isn't it?") == "dog's toy isn't it"
    assert normalize_answer("Two!") == "2"


# ----------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------


def test_vqa_accuracy_overall_and_breakdowns() -> None:
    anns = {
        1: {
            "answers": [{"answer": "yes", "answer_id": i} for i in range(10)],
            "question_type": "is the",
            "answer_type": "yes/no",
        },
        2: {"answers": answers(("2", 2), ("3", 8)), "question_type": "how many", "answer_type": "number"},
        3: VQAAnnotation(answers(("red", 3), ("blue", 7)), "what color", "other"),
        4: ["cat"] * 10,
    }
    preds = {1: "yes", 2: "two", 3: "Red", 4: "dog"}
    ev = vqa_accuracy(preds, anns)
    assert ev.per_question == pytest.approx({1: 100.0, 2: 60.0, 3: 90.0, 4: 0.0})
    assert ev.overall == pytest.approx(62.5)
    assert ev.per_question_type == pytest.approx({"is the": 100.0, "how many": 60.0, "what color": 90.0})
    assert ev.per_answer_type == pytest.approx({"yes/no": 100.0, "number": 60.0, "other": 90.0})
    assert ev.to_dict(2) == {
        "overall": 62.5,
        "perQuestionType": {"is the": 100.0, "how many": 60.0, "what color": 90.0},
        "perAnswerType": {"yes/no": 100.0, "number": 60.0, "other": 90.0},
    }


def test_vqa_accuracy_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="no annotation"):
        vqa_accuracy({1: "a", 2: "b"}, {1: ["a"]})
    with pytest.raises(DataError, match="no VQA predictions"):
        vqa_accuracy({}, {1: ["a"]})
    with pytest.raises(DataError, match="must be a string"):
        vqa_accuracy({1: 3}, {1: ["a"]})
    with pytest.raises(DataError, match="non-empty list"):
        vqa_accuracy({1: "a"}, {1: {"answers": []}})
    with pytest.raises(DataError, match="at least one human answer"):
        vqa_score("a", [])


def test_gqa_exact_match() -> None:
    preds = {1: "The Dog.", 2: "left", 3: "two"}
    targets = {1: "dog", 2: "right", 3: "2"}
    assert gqa_accuracy(preds, targets) == pytest.approx(200 / 3)
    assert gqa_accuracy(preds, targets, normalize_predictions=False) == 0.0
    with pytest.raises(DataError, match="no target"):
        gqa_accuracy({9: "x"}, targets)


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------


def test_loaders(tmp_path) -> None:
    official = {
        "annotations": [
            {
                "question_id": 5,
                "image_id": 1,
                "question_type": "what is",
                "answer_type": "other",
                "multiple_choice_answer": "cat",
                "answers": [{"answer": "cat", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)],
            }
        ]
    }
    (tmp_path / "ann.json").write_text(json.dumps(official))
    anns = load_vqa_annotations(tmp_path / "ann.json")
    assert anns == {5: VQAAnnotation(["cat"] * 10, "what is", "other")}
    (tmp_path / "lavis.json").write_text(json.dumps([{"question_id": 6, "answer": ["a", "b"]}]))
    assert load_vqa_annotations(tmp_path / "lavis.json") == {6: VQAAnnotation(["a", "b"])}
    (tmp_path / "res.json").write_text(json.dumps([{"question_id": 5, "answer": "cat"}]))
    assert load_vqa_results(tmp_path / "res.json") == {5: "cat"}
    assert vqa_accuracy(load_vqa_results(tmp_path / "res.json"), anns).overall == 100.0


@pytest.mark.parametrize(
    ("content", "loader", "message"),
    [
        ("{", load_vqa_annotations, "not valid JSON"),
        ('{"annotations": 3}', load_vqa_annotations, "expected"),
        ('[{"answers": ["a"]}]', load_vqa_annotations, "question_id"),
        ('[{"question_id": 1, "answers": [1]}]', load_vqa_annotations, "must be a string"),
        ('[{"question_id": 1, "answers": ["a"]}, {"question_id": 1, "answers": ["b"]}]', load_vqa_annotations, "twice"),
        ('{"question_id": 1}', load_vqa_results, "JSON list"),
        ('[{"question_id": 1}]', load_vqa_results, "entry 0"),
        ('[{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "a"}]', load_vqa_results, "twice"),
    ],
)
def test_loaders_reject_malformed_files(tmp_path, content: str, loader, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        loader(path)
