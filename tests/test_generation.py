"""Generation functions on their own: score processors vs transformers', config checks, and the decoding
loops driven by a tiny hand-made decoder whose behaviour is known exactly."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlkit.config import from_dict
from vlkit.errors import ConfigError, VlkitError
from vlkit.generation import (
    GenerationConfig,
    GenerationError,
    ban_repeated_ngrams,
    beam_search,
    generate,
    greedy_search,
    penalize_repetition,
    process_scores,
    sample,
    score_candidates,
    stream,
    top_k_filter,
    top_p_filter,
)

# ------------------------------------------------------------------------------------------------------
# Score processors against transformers' LogitsProcessors


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine waiting for a second thread at
    every small op costs more than the op itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scores_and_history(seed: int, vocab: int = 30, rows: int = 6, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, vocab, generator=generator) * 3
    history = torch.randint(0, vocab, (rows, length), generator=generator)
    return scores, history


@pytest.mark.parametrize("penalty", [1.5, 0.6])
def test_repetition_penalty_matches_transformers(penalty):
    for seed in range(5):
        scores, history = _scores_and_history(seed)
        history[0, 0] = 40  # an id beyond the head's vocabulary is ignored
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
        torch.testing.assert_close(penalize_repetition(scores, history, penalty), expected, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_ban_matches_transformers(n):
    for seed in range(5):
        scores, history = _scores_and_history(seed, vocab=6, length=12)  # small vocab: many repeats
        expected = NoRepeatNGramLogitsProcessor(n)(history, scores.clone())
        ours = ban_repeated_ngrams(scores, history, n)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        assert bool(torch.isinf(ours).any()) or n == 3
    short = torch.tensor([[1, 2]])
    assert torch.equal(ban_repeated_ngrams(torch.zeros(1, 5), short, 3), torch.zeros(1, 5))


def test_ngram_ban_example():
    # history 1 2 3 1 2: the bigram (2, 3) exists, so after "2" the token 3 is banned; 2-gram (2, 2)? no.
    scores = torch.zeros(1, 5)
    out = ban_repeated_ngrams(scores, torch.tensor([[1, 2, 3, 1, 2]]), 2)
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("k, min_keep", [(1, 1), (5, 1), (3, 4), (100, 1)])
def test_top_k_matches_transformers(k, min_keep):
    scores, history = _scores_and_history(0)
    scores[0, :4] = 2.0  # ties at the threshold are kept
    expected = TopKLogitsWarper(k, min_tokens_to_keep=min_keep)(history, scores.clone())
    torch.testing.assert_close(top_k_filter(scores, k, min_keep), expected, rtol=0, atol=0)


@pytest.mark.parametrize("p, min_keep", [(0.9, 1), (0.5, 1), (0.05, 3), (0.999, 2)])
def test_top_p_matches_transformers(p, min_keep):
    for seed in range(5):
        scores, history = _scores_and_history(seed)
        expected = TopPLogitsWarper(p, min_tokens_to_keep=min_keep)(history, scores.clone())
        torch.testing.assert_close(top_p_filter(scores, p, min_keep), expected, rtol=0, atol=0)


def test_process_scores_chain_matches_transformers_order():
    config = GenerationConfig(
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
        min_new_tokens=5,
        eos_token_id=(2, 7),
        temperature=0.7,
        top_k=12,
        top_p=0.8,
    )
    processors = [
        RepetitionPenaltyLogitsProcessor(1.3),
        NoRepeatNGramLogitsProcessor(2),
        MinNewTokensLengthLogitsProcessor(2, 5, [2, 7]),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(12),
        TopPLogitsWarper(0.8),
    ]
    for generated in (0, 3, 7):
        scores, history = _scores_and_history(generated, length=2 + generated)
        expected = scores.clone()
        for processor in processors:
            expected = processor(history, expected)
        ours = process_scores(scores, history, generated, config, warp=True)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        unwarped = process_scores(scores, history, generated, config, warp=False)
        assert bool(torch.isinf(unwarped[:, [2, 7]]).all()) == (generated < 5)


# ------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_follow_transformers():
    config = GenerationConfig()
    assert (config.top_k, config.top_p, config.temperature, config.num_beams) == (50, 1.0, 1.0, 1)
    assert config.early_stopping is False and config.length_penalty == 1.0
    assert config.eos_ids == () and config.fill_id == 0
    assert GenerationConfig(eos_token_id=[4, 5]).eos_ids == (4, 5)
    assert GenerationConfig(eos_token_id=4).fill_id == 4
    assert GenerationConfig(eos_token_id=4, pad_token_id=9).fill_id == 9


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"num_beams": 0}, "num_beams"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"num_beams": 3, "num_return_sequences": 4}, "cannot exceed"),
        ({"num_return_sequences": 2}, "greedy"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"eos_token_id": -1}, "eos_token_id"),
    ],
)
def test_config_rejects_bad_values(changes, message):
    with pytest.raises(GenerationError, match=message):
        GenerationConfig(**changes)
    assert issubclass(GenerationError, VlkitError)


def test_config_loads_from_yaml_data():
    data = {"num_beams": 5, "eos_token_id": [50118], "early_stopping": "never", "context_ids": [1]}
    config = from_dict(GenerationConfig, data)
    assert config.eos_token_id == (50118,) and config.early_stopping == "never" and config.context_ids == (1,)
    with pytest.raises(ConfigError, match="num_beam"):
        from_dict(GenerationConfig, {"num_beam": 5})
    with pytest.raises(ConfigError, match="top_p"):
        from_dict(GenerationConfig, {"top_p": 2.0})


# ------------------------------------------------------------------------------------------------------
# A decoder with known behaviour: a bigram table. Its "prefill" reads the last real position of the
# prefix, whose first feature is the start token id.


@dataclass
class _State:
    last: torch.Tensor  # (B,) last token
    steps: int


class BigramDecoder:
    start_ids: tuple[int, ...] = ()

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (V, V) logits of the next token given the last one
        self.calls = 0

    def prefill(self, inputs_embeds, attention_mask):
        last = inputs_embeds[:, -1, 0].long()
        return self.table[last], _State(last, 0)

    def step(self, token_ids, state):
        self.calls += 1
        return self.table[token_ids], _State(token_ids, state.steps + 1)

    def extend(self, token_ids, state):
        return self.table[token_ids], _State(token_ids[:, -1], state.steps + token_ids.shape[1])

    def reorder(self, state, index):
        return _State(state.last[index], state.steps)

    def expand(self, state, times):
        return _State(state.last.repeat_interleave(times), state.steps)


def _start(*tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.zeros(len(tokens), 2, 3)
    embeds[:, -1, 0] = torch.tensor(tokens, dtype=torch.float32)
    return embeds, torch.ones(len(tokens), 2, dtype=torch.long)


def _chain_table(vocab: int = 6) -> torch.Tensor:
    """0 -> 1 -> 2 -> 3 (eos), 4 -> 4 -> ... ; everything strongly peaked."""
    table = torch.full((vocab, vocab), -10.0)
    for token, following in {0: 1, 1: 2, 2: 3, 3: 3, 4: 4, 5: 3}.items():
        table[token, following] = 10.0
    return table


def test_greedy_stops_per_row_and_pads():
    decoder = BigramDecoder(_chain_table())
    config = GenerationConfig(max_new_tokens=6, eos_token_id=3, pad_token_id=5)
    out = greedy_search(decoder, config, *_start(0, 2))
    assert out.tolist() == [[1, 2, 3], [3, 5, 5]]
    assert decoder.calls == 2  # stops as soon as every row has finished
    steps = list(stream(decoder, config, *_start(0, 2)))
    assert [s.tolist() for s in steps] == [[1, 3], [2, 5], [3, 5]]
    never = greedy_search(decoder, config, *_start(4))
    assert never.tolist() == [[4] * 6]


def test_min_new_tokens_blocks_eos():
    table = _chain_table()
    table[2, 4] = 9.0  # the runner-up after 2 is 4
    config = GenerationConfig(max_new_tokens=5, eos_token_id=3, pad_token_id=5, min_new_tokens=3)
    assert greedy_search(BigramDecoder(table), config, *_start(1)).tolist() == [[2, 4, 4, 4, 4]]
    assert greedy_search(BigramDecoder(table), config.replace(min_new_tokens=1), *_start(1)).tolist() == [[2, 3]]


def test_beam_search_finds_the_better_sequence_greedy_misses():
    # From 0: token 1 (p=0.6) leads to a flat distribution; token 2 (p=0.4) leads to a sure eos (3).
    vocab = 8
    table = torch.full((vocab, vocab), -1e4)
    table[0, 1], table[0, 2] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
    table[1, 4:8] = 0.0  # four equally likely continuations, each p=0.25 -> total 0.15
    table[2, 3] = 0.0
    for token in range(4, 8):
        table[token, 3] = 0.0
    config = GenerationConfig(max_new_tokens=4, eos_token_id=3, pad_token_id=0, length_penalty=0.0)
    assert greedy_search(BigramDecoder(table), config, *_start(0)).tolist()[0][:2] == [1, 4]
    out = beam_search(BigramDecoder(table), config.replace(num_beams=2, num_return_sequences=2), *_start(0))
    assert out.sequences.tolist()[0] == [2, 3, 0]
    torch.testing.assert_close(out.scores[0], torch.tensor(0.4).log(), atol=1e-5, rtol=0)
    assert out.sequences.tolist()[1] in ([1, 4, 3], [1, 5, 3], [1, 6, 3], [1, 7, 3])
    torch.testing.assert_close(out.scores[1], torch.tensor(0.15).log(), atol=1e-5, rtol=0)
    # length_penalty 1 divides by the generated length (2 vs 3 tokens here)
    normalised = beam_search(BigramDecoder(table), config.replace(num_beams=2, length_penalty=1.0), *_start(0))
    torch.testing.assert_close(normalised.scores[0], torch.tensor(0.4).log() / 2, atol=1e-5, rtol=0)


def test_sampling_uses_the_generator_and_respects_top_k():
    table = torch.zeros(6, 6)
    table[:, 5] = -1e4  # never drawn
    config = GenerationConfig(max_new_tokens=30, do_sample=True, top_k=0, num_return_sequences=4)
    draws = sample(BigramDecoder(table), config, *_start(0), generator=torch.Generator().manual_seed(0))
    again = sample(BigramDecoder(table), config, *_start(0), generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 30) and torch.equal(draws, again)
    assert set(draws.unique().tolist()) == {0, 1, 2, 3, 4}
    table[:, 2] = 1.0
    table[:, 3] = 0.5
    top2 = sample(BigramDecoder(table), config.replace(top_k=2), *_start(0))
    assert set(top2.unique().tolist()) == {2, 3}
    top1 = generate(BigramDecoder(table), config.replace(top_p=0.1), *_start(0))
    assert set(top1.unique().tolist()) == {2}


def test_context_ids_feed_the_repetition_penalty():
    table = torch.zeros(5, 5)
    table[:, 1] = 1.0
    table[:, 2] = 0.8
    config = GenerationConfig(max_new_tokens=1, repetition_penalty=2.0)
    assert greedy_search(BigramDecoder(table), config, *_start(0)).tolist() == [[1]]
    assert greedy_search(BigramDecoder(table), config.replace(context_ids=(1,)), *_start(0)).tolist() == [[2]]


def test_stream_and_inputs_are_checked_eagerly():
    decoder = BigramDecoder(_chain_table())
    with pytest.raises(GenerationError, match="num_beams=1"):
        stream(decoder, GenerationConfig(num_beams=2), *_start(0))
    with pytest.raises(GenerationError, match=r"\(B, L, D\)"):
        generate(decoder, GenerationConfig(), torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(GenerationError, match="does not match"):
        beam_search(decoder, GenerationConfig(num_beams=2), torch.zeros(2, 3, 1), torch.ones(2, 4))


def test_score_candidates_sums_bigram_log_probs():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    log_p = table.log_softmax(-1)
    candidates = torch.tensor([[1, 2, 3], [4, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = score_candidates(BigramDecoder(table), *_start(0, 5), candidates, mask, chunk_size=1)
    for row, start in enumerate((0, 5)):
        expected = [
            -(log_p[start, 1] + log_p[1, 2] + log_p[2, 3]),
            -(log_p[start, 4] + log_p[4, 4]),
        ]
        torch.testing.assert_close(scores.sum[row], torch.stack(expected))
    torch.testing.assert_close(scores.mean, scores.sum / torch.tensor([3.0, 2.0]))
