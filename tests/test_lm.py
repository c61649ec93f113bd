"""The transformers LM adapters: cached vs reference path, candidate scoring, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from vlkit.generation import GenerationConfig, GenerationError, generate, score_candidates
from vlkit.models.lm import CausalLMDecoder, Seq2SeqDecoder

VOCAB = 120
WIDTH = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine waiting for a second thread at
    every small op costs more than the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(kind: str) -> torch.nn.Module:
    if kind == "opt":
        model = OPTForCausalLM(
            OPTConfig(
                vocab_size=VOCAB,
                hidden_size=WIDTH,
                word_embed_proj_dim=WIDTH,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=WIDTH,
                num_hidden_layers=2,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            )
        )
    else:
        model = T5ForConditionalGeneration(
            T5Config(
                vocab_size=VOCAB,
                d_model=WIDTH,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                dense_act_fn="gelu",
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {kind: _tiny(kind) for kind in ("opt", "llama", "t5")}


def _decoder(kind, model, use_cache=True):
    return Seq2SeqDecoder(model, use_cache=use_cache) if kind == "t5" else CausalLMDecoder(model, use_cache=use_cache)


def _prefix(kind: str, layout: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Random prefix embeddings for 3 rows of different lengths: left padded, right padded (T5), or
    InstructBLIP-style [4 query slots ; padding ; prompt]."""
    generator = torch.Generator().manual_seed(11)
    embeds = torch.randn(3, 9, WIDTH, generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    for row, pads in enumerate((0, 3, 1)):
        if layout == "left":
            mask[row, :pads] = 0
        elif layout == "right":
            mask[row, 9 - pads :] = 0
        else:
            mask[row, 4 : 4 + pads] = 0
    return embeds * mask[..., None], mask


@pytest.mark.parametrize("kind, layout", [("opt", "left"), ("llama", "middle"), ("t5", "right")])
def test_cached_and_reference_paths_agree(kind, layout):
    # float64, so that agreement can be asserted far below float32 rounding noise
    model = _tiny(kind).double()
    embeds, mask = _prefix(kind, layout)
    embeds = embeds.double()
    fast, slow = _decoder(kind, model), _decoder(kind, model, use_cache=False)
    with torch.no_grad():
        fast_logits, fast_state = fast.prefill(embeds, mask)
        slow_logits, slow_state = slow.prefill(embeds, mask)
        torch.testing.assert_close(fast_logits, slow_logits, atol=1e-10, rtol=1e-10)
        # Expand to 2 beams, step, reorder across beams, step again, then a multi-token extend.
        fast_state, slow_state = fast.expand(fast_state, 2), slow.expand(slow_state, 2)
        tokens = fast_logits.argmax(-1).repeat_interleave(2)
        tokens[1::2] = (tokens[1::2] + 5) % VOCAB
        for _ in range(3):
            fast_logits, fast_state = fast.step(tokens, fast_state)
            slow_logits, slow_state = slow.step(tokens, slow_state)
            torch.testing.assert_close(fast_logits, slow_logits, atol=1e-10, rtol=1e-10)
            index = torch.tensor([1, 1, 2, 3, 5, 4])
            fast_state, slow_state = fast.reorder(fast_state, index), slow.reorder(slow_state, index)
            tokens = fast_logits.argmax(-1)[index]
        more = torch.randint(4, VOCAB, (6, 3))
        fast_logits, _ = fast.extend(more, fast_state)
        slow_logits, _ = slow.extend(more, slow_state)
        assert fast_logits.shape == (6, 3, VOCAB)
        torch.testing.assert_close(fast_logits, slow_logits, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind, layout", [("opt", "left"), ("llama", "middle"), ("t5", "right")])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_cached_and_reference_generation_are_token_identical(models, kind, layout, num_beams):
    model = models[kind]
    embeds, mask = _prefix(kind, layout)
    config = GenerationConfig(max_new_tokens=8, num_beams=num_beams, eos_token_id=(5, 6), repetition_penalty=1.3)
    fast = generate(_decoder(kind, model), config, embeds, mask)
    slow = generate(_decoder(kind, model, use_cache=False), config, embeds, mask)
    assert fast.shape[0] == 3
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


def test_prefill_positions_follow_the_mask(models):
    """A left-padded row gives the logits of the same row without padding (positions from the cumsum)."""
    model = models["opt"]
    embeds, mask = _prefix("opt", "left")
    logits, _ = CausalLMDecoder(model).prefill(embeds, mask)
    for row in range(3):
        keep = mask[row].bool()
        alone, _ = CausalLMDecoder(model).prefill(embeds[row : row + 1, keep], mask[row : row + 1, keep])
        torch.testing.assert_close(logits[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def _direct_causal_loss(model, embeds, mask, candidates, candidate_mask):
    """Per-candidate summed CE from one full forward over [prefix ; candidate] (B = 1)."""
    out = []
    for ids, keep in zip(candidates, candidate_mask):
        full = torch.cat([embeds, model.get_input_embeddings()(ids)[None]], dim=1)
        full_mask = torch.cat([mask, torch.ones(1, len(ids), dtype=torch.long)], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(inputs_embeds=full, attention_mask=full_mask, position_ids=positions).logits
        logits = logits[0, embeds.shape[1] - 1 : -1]
        loss = F.cross_entropy(logits.float(), ids, reduction="none")
        out.append((loss * keep).sum())
    return torch.stack(out)


def _direct_seq2seq_loss(model, embeds, mask, candidates, candidate_mask):
    labels = candidates.masked_fill(candidate_mask == 0, -100)
    out = []
    for row in labels:
        logits = model(inputs_embeds=embeds, attention_mask=mask, labels=row[None]).logits[0]
        out.append(F.cross_entropy(logits.float(), row, reduction="sum", ignore_index=-100))
    return torch.stack(out)


@pytest.mark.parametrize("kind, layout", [("opt", "left"), ("llama", "middle"), ("t5", "right")])
@pytest.mark.parametrize("use_cache", [True, False])
def test_score_candidates_equals_a_direct_computation(models, kind, layout, use_cache):
    model = models[kind]
    embeds, mask = _prefix(kind, layout)
    generator = torch.Generator().manual_seed(3)
    candidates = torch.randint(2, VOCAB, (4, 5), generator=generator)
    candidate_mask = torch.ones(4, 5, dtype=torch.long)
    candidate_mask[1, 3:] = 0
    candidate_mask[2, 1:] = 0  # a one-token candidate
    decoder = _decoder(kind, model, use_cache)
    with torch.no_grad():
        scores = score_candidates(decoder, embeds, mask, candidates, candidate_mask)
        chunked = score_candidates(decoder, embeds, mask, candidates, candidate_mask, chunk_size=3)
        direct = _direct_seq2seq_loss if kind == "t5" else _direct_causal_loss
        for row in range(3):
            keep = mask[row].bool()
            expected = direct(model, embeds[row : row + 1, keep], mask[row : row + 1, keep], candidates, candidate_mask)
            torch.testing.assert_close(scores.sum[row], expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(chunked.sum, scores.sum, atol=1e-5, rtol=1e-5)
    assert scores.num_tokens.tolist() == [[5, 3, 1, 5]] * 3
    torch.testing.assert_close(scores.mean, scores.sum / scores.num_tokens)


def test_score_candidates_per_input_candidates(models):
    model = models["opt"]
    embeds, mask = _prefix("opt", "left")
    generator = torch.Generator().manual_seed(4)
    candidates = torch.randint(2, VOCAB, (3, 2, 4), generator=generator)
    with torch.no_grad():
        scores = score_candidates(CausalLMDecoder(model), embeds, mask, candidates)
        for row in range(3):
            shared = score_candidates(
                CausalLMDecoder(model), embeds[row : row + 1], mask[row : row + 1], candidates[row]
            )
            torch.testing.assert_close(scores.sum[row], shared.sum[0], atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(models):
    model = models["opt"]
    embeds, mask = _prefix("opt", "right")
    with pytest.raises(GenerationError, match="left padding"):
        CausalLMDecoder(model).prefill(embeds, mask)
    with pytest.raises(GenerationError, match=r"inputs_embeds must be \(B, L, 32\)"):
        CausalLMDecoder(model).prefill(torch.zeros(2, 3, 16), torch.ones(2, 3))
    with pytest.raises(GenerationError, match="does not match"):
        CausalLMDecoder(model).prefill(torch.zeros(2, 3, WIDTH), torch.ones(2, 4))
    empty_row = torch.ones(2, 3, dtype=torch.long)
    empty_row[1] = 0
    with pytest.raises(GenerationError, match="at least one real"):
        Seq2SeqDecoder(models["t5"]).prefill(torch.zeros(2, 3, WIDTH), empty_row)
    t5 = _tiny("t5")
    t5.config.decoder_start_token_id = None
    with pytest.raises(GenerationError, match="decoder_start_token_id"):
        Seq2SeqDecoder(t5)
    assert Seq2SeqDecoder(t5, decoder_start_token_id=0).start_ids == (0,)
    with pytest.raises(GenerationError, match="candidate_ids"):
        score_candidates(CausalLMDecoder(model), *_prefix("opt"), torch.zeros(2, 2, 2, 2, dtype=torch.long))
