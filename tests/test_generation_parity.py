"""vlkit generation vs transformers' ``generate`` on tiny random LMs fed with ``inputs_embeds``.

The models are built from configs and their weights redrawn with a large std, so that the tiny models
produce varied, non-degenerate continuations (default inits repeat one token forever). Prefixes simulate
BLIP-2: a few random "soft visual tokens" followed by an embedded prompt of varying length.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

from vlkit.generation import GenerationConfig, beam_search, generate, stream
from vlkit.models.lm import CausalLMDecoder, Seq2SeqDecoder

pytestmark = [
    pytest.mark.parity,
    # transformers reminds that with inputs_embeds the prompt is not in the penalty's history: intended here.
    pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning"),
]

VOCAB = 150
WIDTH = 32
PAD = 3
NUM_QUERY = 5
PROMPT_LENGTHS = (4, 1, 3)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine waiting for a second thread at
    every small op costs more than the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(kind: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    common = {"vocab_size": VOCAB, "num_attention_heads": 4}
    if kind == "opt":
        config = OPTConfig(
            hidden_size=WIDTH,
            word_embed_proj_dim=WIDTH,
            num_hidden_layers=2,
            ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            **common,
        )
        model = OPTForCausalLM(config)
    elif kind == "llama":
        config = LlamaConfig(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            intermediate_size=64,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        model = LlamaForCausalLM(config)
    else:
        config = T5Config(
            d_model=WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu",  # FlanT5 in BLIP-2 uses the exact GELU
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            vocab_size=VOCAB,
        )
        model = T5ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.to(dtype).eval()


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: _tiny(kind) for kind in ("opt", "llama", "t5")}


def _prefix(model: torch.nn.Module, seed: int, left_pad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[soft tokens ; embedded prompt] per row, padded to a batch (left for decoder-only, right for T5)."""
    generator = torch.Generator().manual_seed(seed)
    embed = model.get_input_embeddings()
    rows = []
    for length in PROMPT_LENGTHS:
        soft = torch.randn(NUM_QUERY, WIDTH, generator=generator)
        prompt = torch.randint(4, VOCAB, (length,), generator=generator)
        rows.append(torch.cat([soft.to(embed.weight.dtype), embed(prompt).detach()]))
    width = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), width, WIDTH, dtype=embed.weight.dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left_pad else slice(0, len(row))
        embeds[i, span], mask[i, span] = row, 1
    return embeds, mask


def _frequent_tokens(model: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Tokens the model likes to produce, best first: used as eos so that hypotheses really end."""
    out = model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    counts = torch.bincount(out.flatten(), minlength=VOCAB)
    counts[:4] = 0  # keep pad/bos/eos-like ids out
    return counts.argsort(descending=True).tolist()


def _decoder(kind: str, model: torch.nn.Module, use_cache: bool = True):
    return Seq2SeqDecoder(model, use_cache=use_cache) if kind == "t5" else CausalLMDecoder(model, use_cache=use_cache)


def _hf_continuation(kind: str, model, embeds, mask, settings: dict) -> torch.Tensor:
    """transformers' generate, reduced to the new tokens with pad after each row's first eos."""
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    if kind == "t5":
        assert torch.all(out[:, 0] == model.config.decoder_start_token_id)
        out = out[:, 1:]
    # transformers fills finished beam rows with `pad_token_id or eos[0]` (eos when pad is 0); we use pad.
    eos = settings.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if eos:
        ended = torch.isin(out, torch.tensor(eos)).long().cumsum(dim=1)
        after_eos = (ended - torch.isin(out, torch.tensor(eos)).long()) > 0
        out = out.masked_fill(after_eos, settings["pad_token_id"])
    return out


def _ours(kind, model, embeds, mask, settings: dict, use_cache: bool = True) -> torch.Tensor:
    config = GenerationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    return generate(_decoder(kind, model, use_cache), config, embeds, mask)


def test_transformers_returns_only_new_tokens_for_decoder_only_embeds(models):
    # The comparison basis of this file: with inputs_embeds alone, a decoder-only model's generate returns
    # just the continuation; an encoder-decoder one returns the decoder start token first.
    embeds, mask = _prefix(models["opt"], 0)
    out = models["opt"].generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (3, 6)
    t5_embeds, t5_mask = _prefix(models["t5"], 0, left_pad=False)
    out = models["t5"].generate(inputs_embeds=t5_embeds, attention_mask=t5_mask, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (3, 7)


GREEDY = [
    {},
    {"min_new_tokens": 4},
    {"repetition_penalty": 1.5},
    {"repetition_penalty": 0.7},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 1, "repetition_penalty": 1.3},
]

BEAM = [
    {"length_penalty": 1.0},
    {"length_penalty": 0.0},
    {"length_penalty": -1.0},
    {"length_penalty": 1.0, "min_new_tokens": 5},
    {"length_penalty": 1.0, "early_stopping": True},
    {"length_penalty": 2.0, "early_stopping": "never"},
    {"length_penalty": 0.5, "early_stopping": "never", "num_return_sequences": 3},
    {"repetition_penalty": 1.5},
    {"no_repeat_ngram_size": 2, "num_return_sequences": 2},
]


def _settings(model, embeds, mask, extra: dict, eos_rank: tuple[int, ...], num_beams: int) -> dict:
    frequent = _frequent_tokens(model, embeds, mask)
    eos = [frequent[r] for r in eos_rank]
    return {"max_new_tokens": 10, "num_beams": num_beams, "eos_token_id": eos, "pad_token_id": PAD, **extra}


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
@pytest.mark.parametrize("extra", GREEDY, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "plain")
def test_greedy_matches_transformers(models, kind, extra):
    model = models[kind]
    for seed, eos_rank in ((0, (1,)), (1, (0, 2))):
        embeds, mask = _prefix(model, seed, left_pad=kind != "t5")
        settings = _settings(model, embeds, mask, extra, eos_rank, num_beams=1)
        expected = _hf_continuation(kind, model, embeds, mask, settings)
        if kind != "t5" and extra.get("repetition_penalty", 1.0) != 1.0:
            # transformers hides the first n generated tokens from the penalty of a row with n left pads
            # (it takes the embedding prefix for token ids); compare with each prompt alone instead.
            expected = _one_by_one(kind, model, embeds, mask, settings)
        torch.testing.assert_close(_ours(kind, model, embeds, mask, settings), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
@pytest.mark.parametrize("extra", BEAM, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_beam5_matches_transformers(models, kind, extra):
    model = models[kind]
    ended_early = False
    for seed, eos_rank in ((0, (0,)), (1, (1, 3)), (2, (2,))):
        embeds, mask = _prefix(model, seed, left_pad=kind != "t5")
        settings = _settings(model, embeds, mask, extra, eos_rank, num_beams=5)
        if kind != "t5" and extra.get("repetition_penalty", 1.0) != 1.0:
            expected = _one_by_one(kind, model, embeds, mask, settings)
        else:
            expected = _hf_continuation(kind, model, embeds, mask, settings)
        ours = _ours(kind, model, embeds, mask, settings)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        ended_early |= ours.shape[1] < settings["max_new_tokens"] or bool((ours == PAD).any())
    if extra.get("length_penalty", 1.0) <= 1.0:  # (a strong length reward may keep every winner running)
        assert ended_early, "no hypothesis ended with eos: the test would not exercise eos handling"


def _one_by_one(kind, model, embeds, mask, settings) -> torch.Tensor:
    rows = []
    for i in range(embeds.shape[0]):
        keep = mask[i].bool()
        rows.append(_hf_continuation(kind, model, embeds[i : i + 1, keep], mask[i : i + 1, keep], settings))
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=PAD) for r in rows])


SAMPLING = [
    {"top_p": 0.9, "top_k": 0},
    {"top_k": 10},
    {"top_p": 0.9},  # with transformers' default top_k=50
    {"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.2},
    {"top_p": 0.9, "num_return_sequences": 3, "min_new_tokens": 2},
    {"top_p": 0.9, "num_beams": 3},  # beam sampling
    {"top_k": 5, "num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.0},
]


@pytest.mark.parametrize("kind", ["opt", "t5"])
@pytest.mark.parametrize("extra", SAMPLING, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_sampling_with_a_seed_matches_transformers(models, kind, extra):
    model = models[kind]
    embeds, mask = _prefix(model, 5, left_pad=kind != "t5")
    if kind != "t5" and extra.get("repetition_penalty", 1.0) != 1.0:
        embeds, mask = embeds[:1], mask[:1]  # the first row has no padding: transformers' penalty is exact there
    settings = _settings(model, embeds, mask, {"do_sample": True, **extra}, (1,), extra.get("num_beams", 1))
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        expected = _hf_continuation(kind, model, embeds, mask, settings)
        torch.manual_seed(seed)
        ours = _ours(kind, model, embeds, mask, settings)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["opt", "llama", "t5"])
@pytest.mark.parametrize(
    "extra",
    [{"num_beams": 1}, {"num_beams": 5}, {"num_beams": 5, "repetition_penalty": 1.5, "length_penalty": -1.0}],
    ids=["greedy", "beam5", "beam5-penalties"],
)
def test_batch_equals_each_prompt_alone(models, kind, extra):
    """A padded batch of mixed-length prompts gives exactly what each prompt gives alone."""
    model = models[kind]
    embeds, mask = _prefix(model, 3, left_pad=kind != "t5")
    settings = _settings(model, embeds, mask, extra, (0, 2), extra["num_beams"])
    config = GenerationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    batch = generate(_decoder(kind, model), config, embeds, mask)
    for i in range(embeds.shape[0]):
        keep = mask[i].bool()
        alone = generate(_decoder(kind, model), config, embeds[i : i + 1, keep], mask[i : i + 1, keep])[0]
        assert torch.equal(batch[i, : alone.shape[0]], alone)
        assert torch.all(batch[i, alone.shape[0] :] == PAD)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_zeros_in_the_middle_of_the_mask(models, kind):
    """InstructBLIP layout: [queries ; left padding ; prompt]; positions come from the mask's cumsum."""
    model = models[kind]
    embeds, mask = _prefix(model, 4)  # left padded
    # Move each row's soft tokens in front of its padding.
    mixed_embeds, mixed_mask = embeds.clone(), mask.clone()
    for i in range(embeds.shape[0]):
        start = int((mask[i] == 0).sum())
        mixed_embeds[i, :NUM_QUERY] = embeds[i, start : start + NUM_QUERY]
        mixed_embeds[i, NUM_QUERY : start + NUM_QUERY] = 0
        mixed_mask[i, :NUM_QUERY] = 1
        mixed_mask[i, NUM_QUERY : start + NUM_QUERY] = 0
    settings = _settings(model, embeds, mask, {"repetition_penalty": 1.5}, (0,), 5)
    ours = _ours(kind, model, mixed_embeds, mixed_mask, settings)
    # transformers' penalty is exact here (no leading pads), and equals the left-padded layout.
    torch.testing.assert_close(ours, _hf_continuation(kind, model, mixed_embeds, mixed_mask, settings), rtol=0, atol=0)
    torch.testing.assert_close(ours, _ours(kind, model, embeds, mask, settings), rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 5])
def test_context_ids_are_seen_like_transformers_input_ids(models, num_beams):
    """LAVIS InstructBLIP quirk: a bos placeholder precedes the new tokens and the penalty sees it."""
    model = models["llama"]
    embeds, mask = _prefix(model, 6)
    embeds, mask = embeds[:1], mask[:1]
    frequent = _frequent_tokens(model, embeds, mask)
    settings = {"max_new_tokens": 10, "num_beams": num_beams, "repetition_penalty": 1.5, "pad_token_id": PAD}
    settings["eos_token_id"] = [frequent[3]]
    config = GenerationConfig(**{**settings, "eos_token_id": tuple(settings["eos_token_id"])})
    without = generate(CausalLMDecoder(model), config, embeds, mask)
    changed = 0
    for placeholder in without[0, :4].unique().tolist():  # tokens the model wants: penalising them matters
        context = torch.full((1, 1), placeholder)
        expected = model.generate(inputs_embeds=embeds, attention_mask=mask, input_ids=context, **settings)
        assert torch.equal(expected[:, :1], context)
        ours = generate(CausalLMDecoder(model), config.replace(context_ids=(placeholder,)), embeds, mask)
        torch.testing.assert_close(ours, expected[:, 1:], rtol=0, atol=0)
        changed += not torch.equal(ours, without)
    assert changed, "the placeholder never changed the output: the test would not show the penalty sees it"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_float64_models_match_too(kind):
    model = _tiny(kind, torch.float64)
    embeds, mask = _prefix(model, 7, left_pad=kind != "t5")
    settings = _settings(model, embeds, mask, {"length_penalty": 1.0}, (0, 1), 5)
    expected = _hf_continuation(kind, model, embeds, mask, settings)
    torch.testing.assert_close(_ours(kind, model, embeds, mask, settings), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stream_yields_the_greedy_tokens_step_by_step(models, kind):
    model = models[kind]
    embeds, mask = _prefix(model, 8, left_pad=kind != "t5")
    settings = _settings(model, embeds, mask, {}, (0,), 1)
    config = GenerationConfig(**{**settings, "eos_token_id": tuple(settings["eos_token_id"])})
    steps = list(stream(_decoder(kind, model), config, embeds, mask))
    assert all(s.shape == (3,) for s in steps)
    torch.testing.assert_close(torch.stack(steps, 1), _hf_continuation(kind, model, embeds, mask, settings))


def test_beam_scores_are_length_normalised_log_likelihoods(models):
    """The returned score of a hypothesis re-computes from the model's log-probs (no penalties set)."""
    model = models["opt"]
    embeds, mask = _prefix(model, 9)
    embeds, mask = embeds[:1], mask[:1]
    eos = _frequent_tokens(model, embeds, mask)[0]
    config = GenerationConfig(max_new_tokens=8, num_beams=4, num_return_sequences=4, eos_token_id=eos, pad_token_id=PAD)
    config = config.replace(length_penalty=0.7)
    out = beam_search(CausalLMDecoder(model), config, embeds, mask)
    assert torch.all(out.scores[:-1] >= out.scores[1:])
    for tokens, score in zip(out.sequences, out.scores):
        ends = (tokens == eos).nonzero()
        length = int(ends[0]) + 1 if len(ends) else tokens.shape[0]
        assert torch.all(tokens[length:] == PAD)
        tokens = tokens[:length]
        full = torch.cat([embeds, model.get_input_embeddings()(tokens)[None]], dim=1)
        with torch.no_grad():
            logits = model(inputs_embeds=full).logits[0, embeds.shape[1] - 1 : -1]
        log_likelihood = logits.float().log_softmax(-1).gather(1, tokens[:, None]).sum()
        torch.testing.assert_close(score, log_likelihood / length**0.7, atol=1e-4, rtol=1e-4)
