"""Adapters that let transformers' language models serve ``vlkit.generation``.

BLIP-2 and InstructBLIP feed a frozen LLM with embeddings (the projected visual prefix followed by the
embedded prompt), never with token ids alone. :class:`CausalLMDecoder` wraps any
``AutoModelForCausalLM`` (OPT, LLaMA/Vicuna, ...) and :class:`Seq2SeqDecoder` any
``AutoModelForSeq2SeqLM`` (T5/FlanT5) behind the :class:`vlkit.generation.Decoder` interface, keeping
transformers' own cache objects (``DynamicCache``, ``EncoderDecoderCache``) as the KV cache.

Both take ``use_cache=False`` for the reference path: every step then recomputes the whole sequence
without a cache, which is slow but has nothing to get wrong; tests check that both paths agree.

The models are called exactly as transformers' ``generate`` calls them (same position ids, same mask
handling, same cache classes), so that our decoding can be token-identical to theirs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from vlkit.generation import GenerationError

__all__ = ["CausalLMDecoder", "CausalLMState", "Seq2SeqDecoder", "Seq2SeqState"]


def _accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _check_prefix(inputs_embeds: Tensor, attention_mask: Tensor, width: int) -> None:
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
        raise GenerationError(f"inputs_embeds must be (B, L, {width}), got shape {tuple(inputs_embeds.shape)}")
    if attention_mask.shape != inputs_embeds.shape[:2]:
        raise GenerationError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match inputs_embeds "
            f"{tuple(inputs_embeds.shape[:2])}"
        )
    if not bool((attention_mask.sum(dim=-1) > 0).all()):
        raise GenerationError("every row of attention_mask needs at least one real (1) position")


@dataclass
class CausalLMState:
    """Decoding state of a causal LM.

    Attributes:
        mask: (B, T) 1 = real position, over everything the model has consumed so far.
        pass_mask: whether ``mask`` is given to the model; False when the prefix had no padding at all,
            which lets SDPA use its causal kernel (transformers drops an all-ones mask the same way).
        cache: the KV cache, or None on the reference path.
        embeds: (B, T, D) every input embedding so far, reference path only.
    """

    mask: Tensor
    pass_mask: bool
    cache: DynamicCache | None
    embeds: Tensor | None


class CausalLMDecoder:
    """A transformers causal LM driven by input embeddings (the visual prefix + prompt).

    Batches are left-padded: the last column of the mask must be real for every row. Zeros may also sit
    in the middle (InstructBLIP puts the query embeddings before the padding); position ids come from the
    mask's cumulative sum, so every row sees the positions it would have alone.

    Args:
        model: an ``AutoModelForCausalLM`` in eval mode.
        use_cache: False selects the reference path that recomputes the full sequence at every step.
    """

    start_ids: tuple[int, ...] = ()

    def __init__(self, model: nn.Module, *, use_cache: bool = True) -> None:
        self.model = model
        self.use_cache = use_cache
        # Pass what transformers' generate passes, and only where the model's forward names it.
        self._logits_to_keep = _accepts(model, "logits_to_keep")
        self._position_ids = _accepts(model, "position_ids")

    @property
    def embed_dim(self) -> int:
        """Width of the input embeddings the model expects."""
        return self.model.get_input_embeddings().embedding_dim

    def _forward(self, state: CausalLMState, new_mask: Tensor, keep: int, **inputs: Tensor) -> Tensor:
        """Run the model on new inputs given everything consumed so far; return the last ``keep`` logits."""
        mask = torch.cat([state.mask, new_mask], dim=1) if state.mask.shape[1] else new_mask
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
        new = new_mask.shape[1]
        if state.cache is not None:
            positions = positions[:, -new:]
        extra: dict[str, int | Tensor] = {"logits_to_keep": keep} if self._logits_to_keep else {}
        if self._position_ids:
            extra["position_ids"] = positions
        out = self.model(
            **inputs,
            attention_mask=mask if state.pass_mask else None,
            past_key_values=state.cache,
            use_cache=state.cache is not None,
            return_dict=True,
            **extra,
        )
        state.mask = mask
        return out.logits[:, -keep:]

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, CausalLMState]:
        """Consume the prefix (B, L, D) with its left-padded mask (B, L); return logits (B, V)."""
        _check_prefix(inputs_embeds, attention_mask, self.embed_dim)
        if not bool((attention_mask[:, -1] != 0).all()):
            raise GenerationError(
                "decoder-only generation needs left padding: the last column of attention_mask must be 1 in every "
                "row (pad prompts on the left)"
            )
        mask = attention_mask.long()
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True)) if self.use_cache else None
        empty = mask[:, :0]
        state = CausalLMState(mask=empty, pass_mask=not bool((mask == 1).all()), cache=cache, embeds=None)
        logits = self._forward(state, mask, 1, inputs_embeds=inputs_embeds)
        if cache is None:
            state.embeds = inputs_embeds
        return logits[:, -1], state

    def extend(self, token_ids: Tensor, state: CausalLMState) -> tuple[Tensor, CausalLMState]:
        """Feed (B, T) tokens; return the logits after each (B, T, V)."""
        new = token_ids.shape[1]
        new_mask = state.mask.new_ones(token_ids.shape)
        if state.cache is not None:
            return self._forward(state, new_mask, new, input_ids=token_ids), state
        embeds = torch.cat([state.embeds, self.model.get_input_embeddings()(token_ids)], dim=1)
        logits = self._forward(state, new_mask, new, inputs_embeds=embeds)
        state.embeds = embeds
        return logits, state

    def step(self, token_ids: Tensor, state: CausalLMState) -> tuple[Tensor, CausalLMState]:
        """Feed one token per row (B,); return logits (B, V)."""
        logits, state = self.extend(token_ids[:, None], state)
        return logits[:, -1], state

    def reorder(self, state: CausalLMState, index: Tensor) -> CausalLMState:
        """Select rows ``index`` of the state (the cache is re-indexed in place)."""
        if state.cache is not None:
            state.cache.reorder_cache(index)
        embeds = state.embeds.index_select(0, index) if state.embeds is not None else None
        return replace(state, mask=state.mask.index_select(0, index), embeds=embeds)

    def expand(self, state: CausalLMState, times: int) -> CausalLMState:
        """Repeat every row ``times`` times (row-major: b0, b0, ..., b1, b1, ...)."""
        if state.cache is not None:
            state.cache.batch_repeat_interleave(times)
        embeds = state.embeds.repeat_interleave(times, dim=0) if state.embeds is not None else None
        return replace(state, mask=state.mask.repeat_interleave(times, dim=0), embeds=embeds)


@dataclass
class Seq2SeqState:
    """Decoding state of an encoder-decoder LM.

    Attributes:
        encoder_hidden: (B, L, D) encoder output.
        encoder_mask: (B, L) encoder attention mask.
        cache: self- and cross-attention KV cache, or None on the reference path.
        decoder_ids: (B, T) decoder tokens so far, reference path only.
    """

    encoder_hidden: Tensor
    encoder_mask: Tensor
    cache: EncoderDecoderCache | None
    decoder_ids: Tensor | None


class Seq2SeqDecoder:
    """A transformers encoder-decoder LM (T5/FlanT5) whose encoder is fed input embeddings.

    The decoder starts from ``decoder_start_token_id`` (T5: the pad id 0), which is part of the token
    history the repetition penalty sees, as in transformers.

    Args:
        model: an ``AutoModelForSeq2SeqLM`` in eval mode.
        decoder_start_token_id: defaults to ``model.config.decoder_start_token_id``.
        use_cache: False selects the reference path that re-runs the decoder over all tokens every step.
    """

    def __init__(self, model: nn.Module, *, decoder_start_token_id: int | None = None, use_cache: bool = True) -> None:
        start = decoder_start_token_id
        if start is None:
            start = getattr(model.config, "decoder_start_token_id", None)
        if start is None:
            raise GenerationError(
                f"{type(model).__name__}: config has no decoder_start_token_id; pass decoder_start_token_id="
            )
        self.model = model
        self.use_cache = use_cache
        self.start_ids: tuple[int, ...] = (int(start),)

    @property
    def embed_dim(self) -> int:
        """Width of the encoder input embeddings."""
        return self.model.get_input_embeddings().embedding_dim

    def _decode(self, state: Seq2SeqState, decoder_ids: Tensor) -> Tensor:
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=state.encoder_hidden),
            attention_mask=state.encoder_mask,
            decoder_input_ids=decoder_ids,
            past_key_values=state.cache,
            use_cache=state.cache is not None,
            return_dict=True,
        )
        return out.logits

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Seq2SeqState]:
        """Encode (B, L, D) embeddings with mask (B, L), feed the start token; return logits (B, V)."""
        _check_prefix(inputs_embeds, attention_mask, self.embed_dim)
        mask = attention_mask.long()
        encoded = self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=mask, return_dict=True)
        cache = None
        if self.use_cache:
            config = self.model.config.get_text_config(decoder=True)
            cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        state = Seq2SeqState(encoder_hidden=encoded.last_hidden_state, encoder_mask=mask, cache=cache, decoder_ids=None)
        start = torch.tensor(self.start_ids, dtype=torch.long, device=mask.device).expand(mask.shape[0], -1)
        return self.extend(start, state)[0][:, -1], state

    def extend(self, token_ids: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        """Feed (B, T) decoder tokens; return the logits after each (B, T, V)."""
        if state.cache is not None:
            return self._decode(state, token_ids), state
        ids = token_ids if state.decoder_ids is None else torch.cat([state.decoder_ids, token_ids], dim=1)
        state.decoder_ids = ids
        return self._decode(state, ids)[:, -token_ids.shape[1] :], state

    def step(self, token_ids: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        """Feed one decoder token per row (B,); return logits (B, V)."""
        logits, state = self.extend(token_ids[:, None], state)
        return logits[:, -1], state

    def reorder(self, state: Seq2SeqState, index: Tensor) -> Seq2SeqState:
        """Select rows ``index`` of the state (the cache is re-indexed in place)."""
        if state.cache is not None:
            state.cache.reorder_cache(index)
        ids = state.decoder_ids.index_select(0, index) if state.decoder_ids is not None else None
        return replace(
            state,
            encoder_hidden=state.encoder_hidden.index_select(0, index),
            encoder_mask=state.encoder_mask.index_select(0, index),
            decoder_ids=ids,
        )

    def expand(self, state: Seq2SeqState, times: int) -> Seq2SeqState:
        """Repeat every row ``times`` times (row-major: b0, b0, ..., b1, b1, ...)."""
        if state.cache is not None:
            state.cache.batch_repeat_interleave(times)
        ids = state.decoder_ids.repeat_interleave(times, dim=0) if state.decoder_ids is not None else None
        return replace(
            state,
            encoder_hidden=state.encoder_hidden.repeat_interleave(times, dim=0),
            encoder_mask=state.encoder_mask.repeat_interleave(times, dim=0),
            decoder_ids=ids,
        )
