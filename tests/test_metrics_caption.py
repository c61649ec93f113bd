"""COCO caption metrics against pycocoevalcap, plus hand-worked values, loaders and unavailable metrics."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest

from vlkit.errors import DataError
from vlkit.metrics import caption
from vlkit.metrics.caption import bleu, cider_d, evaluate_captions, rouge_l, score_captions

_VOCAB = (
    "a an the man woman dog cat sitting on of with and is are two red blue bus street table people group "
    "kids plate pizza food near large small white black standing next to in front top riding horse beach"
).split()
_NOISE = [".", ",", "!", "?", "...", "'s", "n't", "(", ")", '"', "-", "--", ";", ":", "!?", "&", "/", "U.S.", "etc."]


def _perturb(rng: random.Random, words: list[str]) -> str:
    """A noisy rewrite of ``words``: drops, swaps, insertions, case changes and punctuation."""
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1:
            continue
        if r < 0.2:
            w = rng.choice(_VOCAB)
        case = rng.random()
        out.append(w.upper() if case < 0.05 else w.capitalize() if case < 0.15 else w)
        if rng.random() < 0.08:
            out.append(rng.choice(_VOCAB))
        if rng.random() < 0.1:
            out.append(rng.choice(_NOISE))
    text = " ".join(out)
    return text + rng.choice([".", " .", "!", "", "", "?"])


def make_corpus(seed: int, n_images: int) -> tuple[dict, dict]:
    """Seeded predictions/references with shared n-grams, 1-6 references, varied lengths, empty candidates."""
    rng = random.Random(seed)
    preds, refs = {}, {}
    for _ in range(n_images):
        image_id = rng.randint(0, 10**7)
        base = [rng.choice(_VOCAB) for _ in range(rng.randint(1, 16))]
        refs[image_id] = [_perturb(rng, base) for _ in range(rng.randint(1, 6))]
        r = rng.random()
        if r < 0.05:
            preds[image_id] = ""
        elif r < 0.15:
            preds[image_id] = " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 20)))
        else:
            preds[image_id] = _perturb(rng, base)
    return preds, refs


NON_JAVA_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")


# ----------------------------------------------------------------------------------------------------
# Hand-worked values
# ----------------------------------------------------------------------------------------------------


def test_bleu_exact_match_and_brevity_penalty() -> None:
    corpus, per_image = bleu(["a b c d"], [["a b c d"]])
    assert corpus == pytest.approx([1.0] * 4, abs=1e-8)
    # Candidate of 2 words against a 4-word reference: precisions 1, brevity penalty exp(1 - 4/2).
    corpus, per_image = bleu(["a b"], [["a b c d"]], n=2)
    assert corpus[0] == pytest.approx(math.exp(-1), abs=1e-8)
    assert corpus[1] == pytest.approx(math.exp(-1), abs=1e-8)
    assert per_image[0][0] == pytest.approx(corpus[0])


def test_bleu_closest_reference_length_prefers_the_shorter_on_ties() -> None:
    # Candidate length 3, references of length 2 and 4: both 1 away, the shorter (2) is used -> no penalty.
    corpus, _ = bleu(["a b c"], [["a b c d", "a b"]], n=1)
    assert corpus[0] == pytest.approx(1.0, abs=1e-8)
    # With references of length 4 and 6 the closest is 4 > 3 -> penalty exp(1 - 4/3).
    corpus, _ = bleu(["a b c"], [["a b c d", "a b c d e f"]], n=1)
    assert corpus[0] == pytest.approx(math.exp(1 - 4 / 3), abs=1e-8)


def test_bleu_is_a_corpus_score_not_a_mean() -> None:
    # Image 1: 1/2 unigrams match; image 2: 2/2. Corpus BLEU-1 = 3/4, the per-image mean would be 0.75 too,
    # but BLEU-2 differs: corpus 1 match of 2 bigrams.
    corpus, per_image = bleu(["a x", "c d"], [["a b"], ["c d"]], n=2)
    assert corpus[0] == pytest.approx(0.75, abs=1e-8)
    assert corpus[1] == pytest.approx(math.sqrt(0.75 * 0.5), abs=1e-8)
    assert per_image[1][1] == pytest.approx(1.0, abs=1e-8)


def test_bleu_clips_repeated_words() -> None:
    corpus, _ = bleu(["the the the the"], [["the cat"]], n=1)
    # 1 clipped match out of 4; reference length 2 < 4 so no brevity penalty.
    assert corpus[0] == pytest.approx(0.25, abs=1e-8)


def test_empty_candidate_scores_zero() -> None:
    corpus, _ = bleu([""], [["a dog"]])
    assert corpus == pytest.approx([0.0] * 4, abs=1e-12)
    assert rouge_l([""], [["a dog"]])[0] == 0.0
    assert cider_d(["", "a cat"], [["a dog"], ["a cat"]])[1][0] == 0.0


def test_rouge_l_hand_worked() -> None:
    # LCS("a b c", "a c d e") = 2: precision 2/3, recall 2/4.
    p, r = 2 / 3, 2 / 4
    expected = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    score, per_image = rouge_l(["a b c"], [["a c d e", "x y"]])
    assert score == pytest.approx(expected, abs=1e-12)
    # Precision and recall maxima may come from different references.
    score, _ = rouge_l(["a b c d"], [["a b", "a b c d e f g h"]])
    p, r = 4 / 4, 2 / 2
    assert score == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), abs=1e-12)


def test_lcs_bit_parallel_equals_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 30))]
        assert caption._lcs_length(a, b) == caption._lcs_length_reference(a, b)


def test_cider_needs_more_than_one_image_and_rewards_consensus() -> None:
    # With one image every n-gram has idf log(1) - log(1) = 0.
    assert cider_d(["a dog"], [["a dog"]])[0] == 0.0
    refs = [["a dog runs on grass", "a dog running on grass"], ["a cat sleeps", "a cat sleeping on a bed"]]
    good, _ = cider_d(["a dog runs on grass", "a cat sleeps"], refs)
    bad, _ = cider_d(["a cat sleeps", "a dog runs on grass"], refs)
    assert good > 1.0 > bad >= 0.0


def test_cider_length_penalty_counts_bigrams() -> None:
    refs = [["a b c d"], ["x y z w"]]
    _, scores = cider_d(["a b c d", "x y z w"], refs)
    _, longer = cider_d(["a b c d", "x y z w q r"], refs)
    # Same clipped overlap, 2 more bigrams: only the unigram..4-gram cosines and the penalty change.
    assert longer[1] < scores[1]
    assert scores[0] == pytest.approx(longer[0])


# ----------------------------------------------------------------------------------------------------
# evaluate_captions / score_captions
# ----------------------------------------------------------------------------------------------------


def test_score_captions_names_order_and_per_image() -> None:
    preds = {1: "A dog runs on the grass.", 2: "Two cats sleep."}
    refs = {1: ["A dog running on grass.", "The dog runs."], 2: ["Two cats are sleeping.", "Cats sleep."], 3: ["x"]}
    scores = score_captions(preds, refs, metrics=NON_JAVA_METRICS)
    assert list(scores) == list(NON_JAVA_METRICS)
    assert all(isinstance(v, float) for v in scores.values())
    ev = evaluate_captions(preds, refs, metrics=NON_JAVA_METRICS)
    assert set(ev.per_image) == {1, 2}
    assert ev.tokenized_predictions[1] == "a dog runs on the grass"
    assert ev.tokenized_references[2] == ["two cats are sleeping", "cats sleep"]
    assert ev.scores["ROUGE_L"] == pytest.approx(sum(p["ROUGE_L"] for p in ev.per_image.values()) / 2)
    assert ev.unavailable == {}


def test_bad_input_raises_data_error() -> None:
    with pytest.raises(DataError, match="no reference captions"):
        score_captions({1: "a", 5: "b"}, {1: ["a"]})
    with pytest.raises(DataError, match="unknown caption metrics"):
        score_captions({1: "a"}, {1: ["a"]}, metrics=("BLEU",))
    with pytest.raises(DataError, match="non-empty list"):
        score_captions({1: "a"}, {1: []}, metrics=("CIDEr",))
    with pytest.raises(DataError, match="must be a string"):
        score_captions({1: None}, {1: ["a"]}, metrics=("CIDEr",))
    with pytest.raises(DataError, match="no predictions"):
        score_captions({}, {1: ["a"]})


def test_meteor_without_java_is_unavailable_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    ev = evaluate_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("Bleu_1", "METEOR", "CIDEr"))
    assert ev.scores["METEOR"] is None
    assert "Java" in ev.unavailable["METEOR"]
    assert ev.scores["Bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert "METEOR" not in ev.per_image[1]


def test_meteor_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(caption.shutil, "which", lambda name: "/usr/bin/java")
    import pycocoevalcap.meteor.meteor as meteor_module

    class Broken:
        def __init__(self) -> None:
            raise OSError("java: exec format error")

    monkeypatch.setattr(meteor_module, "Meteor", Broken)
    ev = evaluate_captions({1: "a dog"}, {1: ["a dog"]}, metrics=("METEOR",))
    assert ev.scores == {"METEOR": None}
    assert "exec format error" in ev.unavailable["METEOR"]


def test_spice_is_unavailable_with_a_reason(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(caption.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(caption, "_pycocoevalcap_dir", lambda: tmp_path)  # no CoreNLP jars there
    ev = evaluate_captions({1: "a dog", 2: "a cat"}, {1: ["a dog"], 2: ["a cat"]}, metrics=("CIDEr", "SPICE"))
    assert ev.scores["SPICE"] is None
    assert "CoreNLP" in ev.unavailable["SPICE"]
    assert ev.scores["CIDEr"] is not None


# ----------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------


def test_load_coco_references_and_results(tmp_path) -> None:
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps(
            {
                "images": [{"id": 1}, {"id": 2}],
                "annotations": [
                    {"image_id": 1, "id": 10, "caption": "A dog."},
                    {"image_id": 2, "id": 11, "caption": "A cat."},
                    {"image_id": 1, "id": 12, "caption": "A puppy."},
                ],
            }
        )
    )
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 2, "caption": "a cat"}, {"image_id": 1, "caption": "a dog"}]))
    assert caption.load_coco_references(gt) == {1: ["A dog.", "A puppy."], 2: ["A cat."]}
    assert caption.load_coco_results(res) == {2: "a cat", 1: "a dog"}


@pytest.mark.parametrize(
    ("content", "loader", "message"),
    [
        ("{not json", "load_coco_references", "not valid JSON"),
        ('{"images": []}', "load_coco_references", "'annotations' list"),
        ('{"annotations": [{"image_id": 1}]}', "load_coco_references", "annotations\\[0\\]"),
        ('{"image_id": 1}', "load_coco_results", "JSON list"),
        ('[{"image_id": 1, "caption": 5}]', "load_coco_results", "entry 0"),
        ('[{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]', "load_coco_results", "two different"),
    ],
)
def test_loaders_reject_malformed_files(tmp_path, content: str, loader: str, message: str) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        getattr(caption, loader)(path)
    with pytest.raises(DataError, match="no such file"):
        getattr(caption, loader)(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------
# Parity with pycocoevalcap
# ----------------------------------------------------------------------------------------------------


def _official(preds: dict, refs: dict) -> tuple[dict, dict, dict, dict]:
    """pycocoevalcap's tokenizer and Bleu/Rouge/Cider scorers, as COCOEvalCap.evaluate runs them."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed; pycocoevalcap's tokenizer needs it")
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(preds)
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in refs[k]] for k in ids})
    res = PTBTokenizer().tokenize({k: [{"caption": preds[k]}] for k in ids})
    corpus, per_image = {}, {}
    b, bs = Bleu(4).compute_score(gts, res, verbose=0)
    for j in range(4):
        corpus[f"Bleu_{j + 1}"], per_image[f"Bleu_{j + 1}"] = b[j], list(bs[j])
    corpus["ROUGE_L"], per_image["ROUGE_L"] = Rouge().compute_score(gts, res)
    corpus["CIDEr"], per_image["CIDEr"] = Cider().compute_score(gts, res)
    return corpus, per_image, gts, res


@pytest.mark.parity
@pytest.mark.parametrize(("seed", "n_images"), [(0, 300), (1, 40), (2, 3)])
def test_matches_pycocoevalcap(seed: int, n_images: int) -> None:
    preds, refs = make_corpus(seed, n_images)
    corpus, per_image, gts, res = _official(preds, refs)
    ev = evaluate_captions(preds, refs, metrics=NON_JAVA_METRICS)
    ids = list(gts)
    assert [ev.tokenized_predictions[k] for k in ids] == [res[k][0] for k in ids]
    assert [ev.tokenized_references[k] for k in ids] == [gts[k] for k in ids]
    for name in NON_JAVA_METRICS:
        assert ev.scores[name] == pytest.approx(corpus[name], abs=1e-6, rel=0), name
        ours = [ev.per_image[k][name] for k in ids]
        assert max(abs(a - b) for a, b in zip(ours, per_image[name])) <= 1e-6, name
    if n_images >= 300:
        assert corpus["Bleu_4"] > 0.05 and corpus["CIDEr"] > 0.5  # the corpus exercises every n-gram order


# METEOR over make_corpus(5, 25), recorded from pycocoevalcap's COCOEvalCap pipeline (PTBTokenizer + Meteor).
_METEOR_CORPUS_5_25 = 0.3486081474313459


@pytest.mark.parity
def test_meteor_through_java_matches_pycocoevalcap() -> None:
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    pytest.importorskip("pycocoevalcap")
    preds, refs = make_corpus(5, 25)
    ev = evaluate_captions(preds, refs, metrics=("METEOR",))
    assert ev.unavailable == {}
    assert ev.scores["METEOR"] == pytest.approx(_METEOR_CORPUS_5_25, abs=1e-6)
    assert len(ev.per_image) == 25 and all(0.0 <= s["METEOR"] <= 1.0 for s in ev.per_image.values())
