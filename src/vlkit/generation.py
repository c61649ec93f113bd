"""Text generation as free functions over a minimal decoder interface.

A language model takes part in generation by implementing :class:`Decoder`: ``prefill`` consumes the
conditioning embeddings (a visual prefix plus an embedded prompt for a decoder-only LM, the encoder input
for an encoder-decoder LM, image features for the Q-Former's text decoder) and returns the logits of the
first new token; ``step`` feeds one token per row and returns the next logits; ``reorder`` and ``expand``
re-index the decoder's state (its KV cache) for beam search and for several samples per input.
``models/lm.py`` adapts transformers' causal and seq2seq LMs to it.

On top of that interface this module implements greedy search, sampling (temperature, top-k, top-p) and
beam search with the exact semantics of transformers 5.x ``generate``: the same score processors in the
same order (repetition penalty, no-repeat-n-gram, min-new-tokens, then the sampling warpers), the same
beam bookkeeping (``2 * num_beams`` candidates per step, a hypothesis is finished by an eos or by the
length limit, length-normalised finished scores, ``early_stopping`` True/False/"never"), and the same
``torch.multinomial`` draws, so that with the same seed the outputs are token-identical. Every function
returns only the continuation (the new tokens), padded with ``pad_token_id`` after a row has finished.

One place where we deliberately differ: transformers 5.x hides the first ``n`` generated tokens from the
repetition penalty of a row whose ``attention_mask`` starts with ``n`` pad positions (it mistakes the
embedding prefix for token ids), so a left-padded batch then generates differently from its prompts one
by one. Here a row's penalty always sees exactly its own history, and a batch equals its prompts alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.errors import VlkitError

__all__ = [
    "BeamSearchOutput",
    "CandidateScores",
    "Decoder",
    "GenerationConfig",
    "GenerationError",
    "ban_repeated_ngrams",
    "beam_search",
    "generate",
    "greedy_search",
    "penalize_repetition",
    "process_scores",
    "sample",
    "score_candidates",
    "stream",
    "suppress_tokens",
    "top_k_filter",
    "top_p_filter",
]

S = TypeVar("S")

# Additive score that takes a beam or hypothesis out of the competition; transformers uses the same value,
# and because it is added (not assigned) the exact magnitude matters for identical tie-breaking.
_DISCARD = -1.0e9


class GenerationError(VlkitError, ValueError):
    """Generation inputs that cannot work: bad shapes, right padding for a decoder-only LM, bad settings."""


@dataclass
class GenerationConfig:
    """How to decode. Defaults are transformers' defaults (note ``top_k=50`` when sampling).

    Attributes:
        max_new_tokens: at most this many new tokens per sequence.
        min_new_tokens: eos is forbidden before this many new tokens.
        num_beams: 1 = greedy search or sampling, > 1 = beam search (beam sampling when ``do_sample``).
        do_sample: draw tokens with ``torch.multinomial`` instead of taking the best.
        temperature: logits are divided by it before top-k/top-p (sampling only).
        top_k: keep the k best tokens (sampling only); 0 disables.
        top_p: nucleus filtering threshold (sampling only); 1.0 disables.
        repetition_penalty: CTRL-style penalty on every token already in the row's history (1.0 = off).
        length_penalty: finished beam scores are divided by ``generated_length ** length_penalty``.
        no_repeat_ngram_size: forbid any n-gram of this size from occurring twice (0 = off).
        eos_token_id: one id or several; generating one finishes the sequence.
        pad_token_id: fills a sequence after it finished; defaults to the first eos id (then 0).
        num_return_sequences: sequences returned per input (best beams, or independent samples).
        early_stopping: beam search stop rule, as transformers: True stops once ``num_beams`` hypotheses
            are finished, False stops when a heuristic says no better one can come, "never" only when
            none can.
        context_ids: token ids the repetition penalty and the n-gram ban see before the first new token.
            None means the decoder's own ``start_ids`` (T5's decoder start token; nothing for a causal LM
            fed embeddings). LAVIS InstructBLIP with transformers 4.2x/4.3x saw a bos placeholder there
            (``(1,)`` for its Vicuna config), which the repetition penalty of 1.5 then penalises.
    """

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_return_sequences: int = 1
    early_stopping: bool | Literal["never"] = False
    context_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = tuple(self.eos_token_id)
        if isinstance(self.context_ids, list):
            self.context_ids = tuple(self.context_ids)
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
            (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 <= self.top_p <= 1.0, f"top_p must be in [0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}"),
            (
                isinstance(self.early_stopping, bool) or self.early_stopping == "never",
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}",
            ),
            (all(i >= 0 for i in self.eos_ids), f"eos_token_id must be non-negative, got {self.eos_token_id}"),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise GenerationError(
                f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})"
            )
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise GenerationError("greedy search returns one sequence per input: set num_return_sequences=1")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The eos ids as a tuple (empty when there is none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def fill_id(self) -> int:
        """The id written after a sequence has finished."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_ids[0] if self.eos_ids else 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class Decoder(Protocol[S]):
    """What a language model exposes to generation. ``S`` is its opaque state (usually a KV cache).

    A state is owned by the decoder: the functions here always continue with the state a call returned
    and never reuse one they passed in, so implementations may update caches in place.
    """

    #: Token ids already in the decoder's sequence before the first new token (T5's decoder start, the
    #: Q-Former's [DEC]); the repetition penalty and the n-gram ban see them unless the config overrides.
    start_ids: tuple[int, ...]

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, S]:
        """Consume the conditioning inputs (B, L, D) with their mask (B, L); return next-token logits (B, V)."""
        ...

    def step(self, token_ids: Tensor, state: S) -> tuple[Tensor, S]:
        """Feed one token per row (B,); return next-token logits (B, V)."""
        ...

    def extend(self, token_ids: Tensor, state: S) -> tuple[Tensor, S]:
        """Feed several tokens per row (B, T); return the logits after each of them (B, T, V)."""
        ...

    def reorder(self, state: S, index: Tensor) -> S:
        """Row ``i`` of the new state is row ``index[i]`` of ``state`` (beam reordering, row selection)."""
        ...

    def expand(self, state: S, times: int) -> S:
        """Repeat every row ``times`` times in place: rows (b0, b0, ..., b1, b1, ...)."""
        ...


# ----------------------------------------------------------------------------------------------------------
# Score processors: pure functions on (N, V) float scores and the (N, T) token history of each row.


def penalize_repetition(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty: every token in a row's history gets its score divided by ``penalty``
    (multiplied when the score is negative), once however often it occurred.

    Args:
        scores: (N, V) next-token scores.
        history: (N, T) token ids seen so far in each row; ids >= V are ignored.
        penalty: > 1 discourages repeats, < 1 encourages them.

    Returns:
        (N, V) penalised scores.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return scores
    vocab = scores.shape[-1]
    seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, history.clamp(max=vocab), True)  # ids past the head's vocab land in the spare column
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen[:, :vocab], penalised, scores)


def ban_repeated_ngrams(scores: Tensor, history: Tensor, n: int) -> Tensor:
    """Forbid every token that would complete an n-gram already present in the row's history.

    Args:
        scores: (N, V) next-token scores.
        history: (N, T) token ids seen so far.
        n: n-gram size (>= 1).

    Returns:
        (N, V) scores with banned tokens at -inf.
    """
    length = history.shape[1]
    if n <= 0 or length < n:
        return scores
    vocab = scores.shape[-1]
    windows = history.unfold(1, n, 1)  # (N, T - n + 1, n): every n-gram seen so far
    suffix = history[:, length - n + 1 :]  # (N, n - 1): the tokens the next one would follow
    completes = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=-1)  # (N, T - n + 1)
    # A window that does not match writes into a spare column, so it can never ban a real token.
    target = torch.where(completes, windows[:, :, -1].clamp(max=vocab), vocab)
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


def suppress_tokens(scores: Tensor, token_ids: Sequence[int]) -> Tensor:
    """Set the scores of ``token_ids`` to -inf (used to forbid eos before ``min_new_tokens``)."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    hit = torch.isin(vocab, torch.tensor(list(token_ids), device=scores.device))
    return torch.where(hit, -float("inf"), scores)


def top_k_filter(scores: Tensor, k: int, min_keep: int = 1) -> Tensor:
    """Keep the ``max(k, min_keep)`` best scores of each row (ties with the last kept one survive)."""
    k = min(max(k, min_keep), scores.shape[-1])
    threshold = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < threshold, -float("inf"))


def top_p_filter(scores: Tensor, p: float, min_keep: int = 1) -> Tensor:
    """Nucleus filtering: keep the smallest set of best tokens whose probability reaches ``p``.

    The cumulative probability is accumulated from the *least* likely token upwards and everything whose
    running total stays within ``1 - p`` is dropped; transformers does the same, and the float rounding of
    that order decides borderline tokens, so we keep it.
    """
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - p)
    drop_sorted[..., -min_keep:] = False
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, -float("inf"))


def process_scores(
    scores: Tensor,
    history: Tensor,
    num_generated: int,
    config: GenerationConfig,
    *,
    warp: bool,
    min_keep: int = 1,
) -> Tensor:
    """Apply the configured processors in transformers' order.

    Repetition penalty, n-gram ban, eos suppression before ``min_new_tokens``, then (only when ``warp``)
    temperature, top-k and top-p.

    Args:
        scores: (N, V) float32 logits (greedy/sampling) or log-probabilities (beam search).
        history: (N, P + t) context ids followed by the tokens generated so far.
        num_generated: t, the number of tokens generated so far.
        config: the decoding settings.
        warp: apply the sampling warpers.
        min_keep: the warpers never keep fewer tokens than this (beam sampling keeps n_eos + 1).

    Returns:
        (N, V) processed scores.
    """
    scores = penalize_repetition(scores, history, config.repetition_penalty)
    if config.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, history, config.no_repeat_ngram_size)
    if config.eos_ids and num_generated < config.min_new_tokens:
        scores = suppress_tokens(scores, config.eos_ids)
    if warp:
        if config.temperature != 1.0:
            scores = scores / config.temperature
        if config.top_k != 0:
            scores = top_k_filter(scores, config.top_k, min_keep)
        if config.top_p < 1.0:
            scores = top_p_filter(scores, config.top_p, min_keep)
    return scores


# ----------------------------------------------------------------------------------------------------------
# Greedy search and sampling


def _check_inputs(inputs_embeds: Tensor, attention_mask: Tensor) -> None:
    if inputs_embeds.dim() != 3:
        raise GenerationError(f"inputs_embeds must be (B, L, D), got shape {tuple(inputs_embeds.shape)}")
    if attention_mask.shape != inputs_embeds.shape[:2]:
        raise GenerationError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match inputs_embeds "
            f"{tuple(inputs_embeds.shape[:2])}"
        )


def _context(decoder: Decoder[Any], config: GenerationConfig, rows: int, device: torch.device) -> Tensor:
    ids = config.context_ids if config.context_ids is not None else tuple(decoder.start_ids)
    return torch.tensor(ids, dtype=torch.long, device=device).reshape(1, -1).expand(rows, -1)


def _token_stream(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    do_sample: bool,
    generator: torch.Generator | None,
) -> Iterator[Tensor]:
    """Greedy search or sampling, one (B * num_return_sequences,) tensor of tokens per step."""
    # Validate now rather than at the first next() of the generator.
    if config.num_beams != 1:
        raise GenerationError(f"greedy search and sampling need num_beams=1, got {config.num_beams}")
    _check_inputs(inputs_embeds, attention_mask)
    return _token_loop(decoder, config, inputs_embeds, attention_mask, do_sample, generator)


@torch.no_grad()
def _token_loop(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    do_sample: bool,
    generator: torch.Generator | None,
) -> Iterator[Tensor]:
    logits, state = decoder.prefill(inputs_embeds, attention_mask)
    copies = config.num_return_sequences
    if copies > 1:
        logits = logits.repeat_interleave(copies, dim=0)
        state = decoder.expand(state, copies)
    rows = logits.shape[0]
    device = logits.device
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
    history = _context(decoder, config, rows, device)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    for t in range(config.max_new_tokens):
        scores = process_scores(logits.float(), history, t, config, warp=do_sample)
        if do_sample:
            tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        if config.eos_ids:  # finished rows keep producing pad (their draws are still made, as transformers)
            tokens = torch.where(unfinished, tokens, config.fill_id)
        history = torch.cat([history, tokens[:, None]], dim=1)
        yield tokens
        if config.eos_ids:
            unfinished &= ~torch.isin(tokens, eos)
        if t + 1 == config.max_new_tokens or not bool(unfinished.any()):
            return
        logits, state = decoder.step(tokens, state)


def stream(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the new tokens step by step, as they are decided (greedy search or sampling).

    Args:
        decoder: the language model adapter.
        config: decoding settings; ``num_beams`` must be 1 (beam hypotheses change until the end).
        inputs_embeds: (B, L, D) conditioning embeddings.
        attention_mask: (B, L) 1 = real, 0 = padding.
        generator: random source for sampling (the global one when None, as transformers).

    Yields:
        (B * num_return_sequences,) token ids of one step; rows that already finished get ``pad``.
    """
    return _token_stream(decoder, config, inputs_embeds, attention_mask, config.do_sample, generator)


def _collect(steps: Iterator[Tensor]) -> Tensor:
    return torch.stack(list(steps), dim=1)  # (N, T)


def greedy_search(
    decoder: Decoder[Any], config: GenerationConfig, inputs_embeds: Tensor, attention_mask: Tensor
) -> Tensor:
    """Pick the best-scoring token at every step (the sampling warpers are not applied).

    Returns:
        (B, T) new tokens, padded with ``pad_token_id`` after each row's eos.
    """
    return _collect(_token_stream(decoder, config, inputs_embeds, attention_mask, False, None))


def sample(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw every token from the processed distribution (temperature -> top-k -> top-p).

    With the same global seed the draws equal transformers' (same processors, same ``torch.multinomial``).

    Returns:
        (B * num_return_sequences, T) new tokens; the samples of input b are rows b*R ... b*R + R - 1.
    """
    return _collect(_token_stream(decoder, config, inputs_embeds, attention_mask, True, generator))


# ----------------------------------------------------------------------------------------------------------
# Beam search


@dataclass
class BeamSearchOutput:
    """Best finished hypotheses.

    Attributes:
        sequences: (B * R, T) new tokens, best first within each input, padded with ``pad_token_id``.
        scores: (B * R,) length-normalised sum of token log-probabilities.
    """

    sequences: Tensor
    scores: Tensor


def _take(values: Tensor, index: Tensor) -> Tensor:
    """Gather along dim 1 of (B, K, ...) ``values`` with (B, J) ``index``."""
    while index.dim() < values.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(values, index, dim=1)


@dataclass
class _Hypotheses:
    """(B, K, ...) tensors of beam hypotheses: tokens, summed log-probs, lengths, finished flags."""

    tokens: Tensor  # (B, K, max_new) long, fill after the length
    scores: Tensor  # (B, K) float32
    lengths: Tensor  # (B, K) long
    done: Tensor  # (B, K) bool

    def select(self, index: Tensor) -> _Hypotheses:
        return _Hypotheses(
            _take(self.tokens, index), _take(self.scores, index), _take(self.lengths, index), _take(self.done, index)
        )


@torch.no_grad()
def beam_search(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> BeamSearchOutput:
    """Beam search (beam sampling when ``config.do_sample``) with transformers 5.x semantics.

    Each step keeps the ``max(2, 1 + n_eos) * num_beams`` best continuations over all beams. A continuation
    that ends in eos, or reaches ``max_new_tokens``, becomes a finished hypothesis if it ranks among the
    first ``num_beams``; its score is divided by ``generated_length ** length_penalty``. The best
    ``num_beams`` unfinished continuations go on. Decoding stops when no beam can still improve the
    finished set (per ``early_stopping``) or the length limit is reached.

    Returns:
        The ``num_return_sequences`` best finished hypotheses per input.
    """
    _check_inputs(inputs_embeds, attention_mask)
    beams, max_new = config.num_beams, config.max_new_tokens
    eos_ids, fill = config.eos_ids, config.fill_id
    logits, state = decoder.prefill(inputs_embeds, attention_mask)
    batch, device = logits.shape[0], logits.device
    logits = logits.repeat_interleave(beams, dim=0)
    state = decoder.expand(state, beams)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos_ids)) * beams
    # Only the first num_beams candidates of a step may enter the finished set; the rest are spares that
    # guarantee num_beams unfinished beams survive even when the best ones all end.
    may_finish = torch.arange(keep, device=device) < beams
    row_offset = torch.arange(batch, device=device)[:, None] * beams
    context = _context(decoder, config, batch * beams, device)
    warp_keep = len(eos_ids) + 1 if eos_ids else 2

    def empty(score: float) -> _Hypotheses:
        return _Hypotheses(
            tokens=torch.full((batch, beams, max_new), fill, dtype=torch.long, device=device),
            scores=torch.full((batch, beams), score, dtype=torch.float32, device=device),
            lengths=torch.zeros(batch, beams, dtype=torch.long, device=device),
            done=torch.zeros(batch, beams, dtype=torch.bool, device=device),
        )

    running = empty(_DISCARD)
    running.scores[:, 0] = 0.0  # all beams start identical: only the first one may spawn candidates
    finished = empty(_DISCARD)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)

    for t in range(max_new):
        history = torch.cat([context, running.tokens[:, :, :t].reshape(batch * beams, t)], dim=1)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = process_scores(log_probs, history, t, config, warp=config.do_sample, min_keep=warp_keep)
        vocab = log_probs.shape[-1]
        if keep > beams * vocab:
            raise GenerationError(f"{keep} beam candidates per step need more than {vocab} vocabulary entries")
        totals = (log_probs.view(batch, beams, vocab) + running.scores[:, :, None]).view(batch, beams * vocab)

        # Candidates: the `keep` best (or sampled) continuations of all beams of an input.
        if config.do_sample:
            picked = torch.multinomial(totals.softmax(dim=-1), num_samples=keep, generator=generator)
            # best first, as transformers >= 5.24 orders the drawn candidates (the same seed gives the same tokens)
            cand_scores, order = torch.gather(totals, 1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            cand_scores, picked = torch.topk(totals, keep)
        source, new_token = picked // vocab, picked % vocab
        cand = running.select(source)
        cand.tokens[:, :, t] = new_token
        cand.scores = cand_scores
        cand.lengths = torch.full_like(new_token, t + 1)
        ended = torch.isin(new_token, eos) | (t + 1 >= max_new)  # (B, keep)

        # The best unfinished candidates continue.
        alive_scores = cand_scores + ended.to(torch.float32) * _DISCARD
        chosen = torch.topk(alive_scores, beams).indices
        running = cand.select(chosen)
        running.scores = _take(alive_scores, chosen)
        beam_source = _take(source, chosen)

        # Ended candidates compete with the finished hypotheses on length-normalised scores.
        just_done = ended & may_finish[None, :]
        normalised = cand_scores / ((t + 1) ** config.length_penalty)
        full = finished.done.all(dim=-1, keepdim=True) & (config.early_stopping is True)
        normalised = normalised + full.to(torch.float32) * _DISCARD
        normalised = normalised + (~improvable).to(torch.float32) * _DISCARD
        normalised = normalised + (~just_done).to(torch.float32) * _DISCARD
        cand.scores, cand.done = normalised, just_done
        pool = _Hypotheses(
            tokens=torch.cat([finished.tokens, cand.tokens], dim=1),
            scores=torch.cat([finished.scores, cand.scores], dim=1),
            lengths=torch.cat([finished.lengths, cand.lengths], dim=1),
            done=torch.cat([finished.done, cand.done], dim=1),
        )
        finished = pool.select(torch.topk(pool.scores, beams).indices)

        # Can a running beam still beat the worst finished hypothesis?
        generated = t + 1
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_new
        else:
            best_length = generated
        best_running = running.scores[:, :1] / (best_length**config.length_penalty)
        worst_finished = torch.where(finished.done, finished.scores.min(dim=1, keepdim=True).values, _DISCARD)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_full = bool(finished.done.all()) and config.early_stopping is True
        if generated == max_new or not bool(improvable.any()) or all_full or bool(ended.all()):
            break
        state = decoder.reorder(state, (beam_source + row_offset).reshape(-1))
        logits, state = decoder.step(running.tokens[:, :, t].reshape(-1), state)

    count = config.num_return_sequences
    lengths = finished.lengths[:, :count].reshape(-1)
    width = int(lengths.max())
    sequences = finished.tokens[:, :count, :width].reshape(batch * count, width)
    return BeamSearchOutput(sequences=sequences, scores=finished.scores[:, :count].reshape(-1))


# ----------------------------------------------------------------------------------------------------------
# Dispatcher


def generate(
    decoder: Decoder[Any],
    config: GenerationConfig,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate continuations with the strategy ``config`` selects.

    Args:
        decoder: the language model adapter (``models.lm.CausalLMDecoder``, ``Seq2SeqDecoder``, ...).
        config: decoding settings.
        inputs_embeds: (B, L, D) conditioning embeddings (left-padded for a decoder-only LM).
        attention_mask: (B, L) 1 = real, 0 = padding.
        generator: random source for sampling (the global one when None).

    Returns:
        (B * num_return_sequences, T) new tokens only, padded with ``pad_token_id``; the sequences of
        input b are rows b*R ... b*R + R - 1.
    """
    if config.num_beams > 1:
        return beam_search(decoder, config, inputs_embeds, attention_mask, generator=generator).sequences
    if config.do_sample:
        return sample(decoder, config, inputs_embeds, attention_mask, generator=generator)
    return greedy_search(decoder, config, inputs_embeds, attention_mask)


# ----------------------------------------------------------------------------------------------------------
# Candidate ranking


@dataclass
class CandidateScores:
    """Language-model loss of candidate continuations.

    Attributes:
        sum: (B, N) summed token cross-entropy of each candidate (its negative log-likelihood).
        mean: (B, N) ``sum`` divided by the candidate's number of tokens.
        num_tokens: (B, N) number of candidate tokens counted.
    """

    sum: Tensor
    mean: Tensor
    num_tokens: Tensor


def score_candidates(
    decoder: Decoder[Any],
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    candidate_ids: Tensor,
    candidate_mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> CandidateScores:
    """Score how likely each candidate continuation is after each input (answer/class ranking).

    The prefix is encoded once per chunk and its state repeated for every candidate; the candidate's
    tokens are then fed in one ``extend`` call. Lower loss = more likely; rank with ``argsort``.

    Args:
        decoder: the language model adapter.
        inputs_embeds: (B, L, D) conditioning embeddings of each input.
        attention_mask: (B, L) their mask.
        candidate_ids: (N, T) candidates shared by all inputs, or (B, N, T) per input; right-padded.
        candidate_mask: same shape as ``candidate_ids``, 1 = real token; all ones when None.
        chunk_size: score at most this many candidates per forward pass (memory bound); all when None.

    Returns:
        Per input and candidate: summed and mean token cross-entropy, and token counts.
    """
    _check_inputs(inputs_embeds, attention_mask)
    batch = inputs_embeds.shape[0]
    if candidate_ids.dim() == 2:
        candidate_ids = candidate_ids.unsqueeze(0).expand(batch, -1, -1)
        if candidate_mask is not None:
            candidate_mask = candidate_mask.unsqueeze(0).expand(batch, -1, -1)
    if candidate_ids.dim() != 3 or candidate_ids.shape[0] != batch:
        raise GenerationError(
            f"candidate_ids must be (N, T) or (B={batch}, N, T), got shape {tuple(candidate_ids.shape)}"
        )
    if candidate_mask is None:
        candidate_mask = torch.ones_like(candidate_ids)
    if candidate_mask.shape != candidate_ids.shape:
        raise GenerationError(
            f"candidate_mask shape {tuple(candidate_mask.shape)} does not match candidate_ids "
            f"{tuple(candidate_ids.shape)}"
        )
    count, length = candidate_ids.shape[1], candidate_ids.shape[2]
    if length == 0:
        raise GenerationError("candidate_ids has no tokens")
    chunk = count if chunk_size is None else chunk_size
    if chunk < 1:
        raise GenerationError(f"chunk_size must be >= 1, got {chunk_size}")

    sums = []
    for start in range(0, count, chunk):
        ids = candidate_ids[:, start : start + chunk]  # (B, n, T)
        n = ids.shape[1]
        first, state = decoder.prefill(inputs_embeds, attention_mask)  # (B, V)
        first = first.repeat_interleave(n, dim=0)[:, None]  # (B*n, 1, V)
        flat = ids.reshape(batch * n, length)
        if length > 1:
            state = decoder.expand(state, n)
            rest, _ = decoder.extend(flat[:, :-1], state)  # (B*n, T-1, V)
            logits = torch.cat([first, rest], dim=1)
        else:
            logits = first
        log_probs = F.log_softmax(logits.float(), dim=-1)
        token_loss = -log_probs.gather(-1, flat[:, :, None]).squeeze(-1)  # (B*n, T)
        mask = candidate_mask[:, start : start + chunk].reshape(batch * n, length).to(token_loss.dtype)
        sums.append((token_loss * mask).sum(dim=-1).view(batch, n))
    total = torch.cat(sums, dim=1)
    num_tokens = candidate_mask.sum(dim=-1).to(torch.long)
    return CandidateScores(sum=total, mean=total / num_tokens.clamp(min=1).to(total.dtype), num_tokens=num_tokens)
