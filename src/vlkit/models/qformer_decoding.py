"""Q-Former captioning: the stage-1 BLIP-2 text decoder (ITG) behind ``vlkit.generation``'s Decoder protocol.

A stage-1 BLIP-2 model can caption without any LLM: the Q-Former's MLM head, run in multimodal-causal mode
over ``[queries; text]``, is a small image-conditioned language model (the ITG objective trained it).
Decoding starts from ``[DEC]`` (``DEC_TOKEN_ID``), stops at ``[SEP]`` and pads with ``[PAD]`` (0).

:class:`QFormerCaptionDecoder` has two paths that give the same tokens:

* cached (default): the queries run once per image (``encode_queries(use_cache=True)``), their
  self-attention keys/values of every layer are kept, and each new token only attends to that cache plus
  the text cache. Beams and samples repeat the cache, not the image.
* reference (``use_cache=False``): every step re-runs ``[queries; all tokens so far]`` through the whole
  Q-Former with cross-attention to the image, which is what LAVIS effectively does (no KV cache reaches
  its ``prepare_inputs_for_generation``). Queries only see queries under the causal mask, so re-running
  them reproduces the cached query states exactly; tests check both paths agree.

Length semantics. LAVIS ``Blip2Qformer.generate`` (transformers 4.26) passes ``max_length=30`` and
``min_length=10`` to ``generate`` with the one-token prompt ``[DEC]``, and 4.26 counts that prompt token:
the sequence stops at 30 ids *including* ``[DEC]`` and ``[SEP]`` is forbidden while it is shorter than 10
ids. In generated tokens (what ``vlkit.generation`` counts) that is ``max_new_tokens = max_length - 1``
(29) and ``min_new_tokens = min_length - 1`` (9): at least 9 word pieces before ``[SEP]``.
:func:`lavis_caption_config` does this conversion.

Beam search follows ``vlkit.generation`` (transformers 5.x bookkeeping). It normalises a hypothesis score
by its generated length; transformers 4.26 divided by the length including ``[DEC]`` but excluding the
final ``[SEP]``, which is the same number for hypotheses that end in ``[SEP]``. The two differ only for
beams cut off by the length limit (4.26 divides by ``max_length``, we by ``max_length - 1``), so beam
results can differ from LAVIS only when a caption runs into the 29-token limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from vlkit.generation import GenerationConfig, GenerationError, generate
from vlkit.models.blip2 import DEC_TOKEN_ID, Blip2
from vlkit.models.qformer import QFormerCache
from vlkit.processors import QFormerTokenizer

__all__ = [
    "LAVIS_MAX_LENGTH",
    "LAVIS_MIN_LENGTH",
    "LAVIS_NUM_BEAMS",
    "LAVIS_TOP_P",
    "PAD_TOKEN_ID",
    "SEP_TOKEN_ID",
    "QFormerCaptionDecoder",
    "QFormerDecodeState",
    "caption_qformer",
    "generate_caption_ids",
    "lavis_caption_config",
]

SEP_TOKEN_ID = 102  # bert-base-uncased "[SEP]": the end of a caption
PAD_TOKEN_ID = 0  # "[PAD]"

# Defaults of LAVIS Blip2Qformer.generate (lengths count the [DEC] start token, see the module docstring).
LAVIS_NUM_BEAMS = 3
LAVIS_MAX_LENGTH = 30
LAVIS_MIN_LENGTH = 10
LAVIS_TOP_P = 0.9


def lavis_caption_config(
    *,
    use_nucleus_sampling: bool = False,
    num_beams: int = LAVIS_NUM_BEAMS,
    max_length: int = LAVIS_MAX_LENGTH,
    min_length: int = LAVIS_MIN_LENGTH,
    top_p: float = LAVIS_TOP_P,
    repetition_penalty: float = 1.0,
    num_captions: int = 1,
    eos_token_id: int = SEP_TOKEN_ID,
    pad_token_id: int = PAD_TOKEN_ID,
) -> GenerationConfig:
    """Decoding settings of LAVIS ``Blip2Qformer.generate``, in ``vlkit.generation`` terms.

    Args:
        use_nucleus_sampling: sample (top-p ``top_p``, top-k 50 as transformers' default, temperature 1)
            with one beam, as LAVIS forces ``num_beams = 1`` when sampling; else beam search.
        num_beams: beams for beam search (1 = greedy search).
        max_length: LAVIS length limit, counting the ``[DEC]`` start token: at most ``max_length - 1``
            new tokens (``[SEP]`` included).
        min_length: LAVIS minimum length, counting ``[DEC]``: ``[SEP]`` is forbidden before
            ``min_length - 1`` new tokens.
        top_p: nucleus threshold (sampling only).
        repetition_penalty: CTRL repetition penalty (1.0 = off, the LAVIS default).
        num_captions: captions returned per image (independent samples, or the best beams; at most
            ``num_beams`` for beam search).
        eos_token_id: ``[SEP]``.
        pad_token_id: ``[PAD]``, written after a caption ended.

    Returns:
        The equivalent :class:`~vlkit.generation.GenerationConfig`.
    """
    if max_length < 2:
        raise GenerationError(f"max_length counts the [DEC] start token and must be >= 2, got {max_length}")
    if min_length < 0:
        raise GenerationError(f"min_length must be >= 0, got {min_length}")
    return GenerationConfig(
        max_new_tokens=max_length - 1,
        min_new_tokens=max(0, min_length - 1),
        num_beams=1 if use_nucleus_sampling else num_beams,
        do_sample=use_nucleus_sampling,
        top_p=top_p if use_nucleus_sampling else 1.0,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        num_return_sequences=num_captions,
    )


@dataclass
class QFormerDecodeState:
    """Decoding state of :class:`QFormerCaptionDecoder`.

    Attributes:
        tokens: (B, T) decoder ids consumed so far, ``[DEC]`` first.
        cache: self-attention keys/values of ``[queries; tokens]`` (cached path), else None.
        image_embeds: (B, N, Dv) image tokens (reference path), else None.
        image_mask: (B, N) image padding mask (reference path), or None when every image token is valid.
    """

    tokens: Tensor
    cache: QFormerCache | None = None
    image_embeds: Tensor | None = None
    image_mask: Tensor | None = None


class QFormerCaptionDecoder:
    """The Q-Former's causal text decoder as a :class:`vlkit.generation.Decoder`.

    ``prefill`` takes the image tokens (``model.encode_image(pixels)``, (B, N, Dv)) and their mask (B, N)
    in place of the prefix embeddings, runs the queries, feeds ``[DEC]`` and returns the logits of the
    first caption token.

    Args:
        model: a stage-1 :class:`~vlkit.models.blip2.Blip2` with the Q-Former MLM head; put it in eval mode.
        start_token_id: the decoder start token (``[DEC]``).
        use_cache: False selects the reference path that re-runs ``[queries; all tokens]`` every step.
    """

    def __init__(self, model: Blip2, *, start_token_id: int = DEC_TOKEN_ID, use_cache: bool = True) -> None:
        qformer = model.qformer
        if qformer.lm_head is None:
            raise GenerationError("Q-Former captioning needs the MLM head of a stage-1 model (qformer.lm_head)")
        if not 0 <= start_token_id < qformer.config.vocab_size:
            raise GenerationError(
                f"start_token_id {start_token_id} is outside the Q-Former vocabulary of {qformer.config.vocab_size}"
            )
        self.model = model
        self.use_cache = use_cache
        self.start_ids: tuple[int, ...] = (int(start_token_id),)

    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, QFormerDecodeState]:
        """Run the queries over the image tokens (B, N, Dv) and feed ``[DEC]``; return logits (B, V)."""
        width = self.model.config.vision.width
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise GenerationError(
                f"Q-Former captioning expects image tokens (B, N, {width}), got shape {tuple(inputs_embeds.shape)}"
            )
        if attention_mask.shape != inputs_embeds.shape[:2]:
            raise GenerationError(
                f"image mask shape {tuple(attention_mask.shape)} does not match image tokens "
                f"{tuple(inputs_embeds.shape[:2])}"
            )
        # An all-ones mask is the reference's case; dropping it keeps the unmasked attention kernel.
        image_mask = None if bool((attention_mask != 0).all()) else attention_mask
        start = torch.tensor(self.start_ids, dtype=torch.long, device=inputs_embeds.device)
        empty = start.new_zeros(inputs_embeds.shape[0], 0)
        if self.use_cache:
            queries = self.model.encode_queries(inputs_embeds, image_mask=image_mask, use_cache=True)
            state = QFormerDecodeState(tokens=empty, cache=queries.cache)
        else:
            state = QFormerDecodeState(tokens=empty, image_embeds=inputs_embeds, image_mask=image_mask)
        logits, state = self.extend(start.expand(inputs_embeds.shape[0], -1), state)
        return logits[:, -1], state

    def extend(self, token_ids: Tensor, state: QFormerDecodeState) -> tuple[Tensor, QFormerDecodeState]:
        """Feed (B, T) tokens; return the logits after each of them (B, T, V)."""
        tokens = torch.cat([state.tokens, token_ids], dim=1)
        if state.cache is not None:
            out = self.model.itg_logits(token_ids, state.cache, use_cache=True)
            return out.logits, replace(state, tokens=tokens, cache=out.cache)
        # Reference path: the whole [queries; tokens] sequence again, in multimodal-causal mode.
        queries = self.model.query_tokens.expand(tokens.shape[0], -1, -1)
        out = self.model.qformer(
            queries,
            tokens,
            image_embeds=state.image_embeds,
            image_mask=state.image_mask,
            causal=True,
        )
        logits = self.model.qformer.lm_logits(out.text_output[:, -token_ids.shape[1] :])
        return logits, replace(state, tokens=tokens)

    def step(self, token_ids: Tensor, state: QFormerDecodeState) -> tuple[Tensor, QFormerDecodeState]:
        """Feed one token per row (B,); return the next-token logits (B, V)."""
        logits, state = self.extend(token_ids[:, None], state)
        return logits[:, -1], state

    def reorder(self, state: QFormerDecodeState, index: Tensor) -> QFormerDecodeState:
        """Row ``i`` of the result is row ``index[i]`` of ``state``."""
        return QFormerDecodeState(
            tokens=state.tokens.index_select(0, index),
            cache=state.cache.index_select(index) if state.cache is not None else None,
            image_embeds=state.image_embeds.index_select(0, index) if state.image_embeds is not None else None,
            image_mask=state.image_mask.index_select(0, index) if state.image_mask is not None else None,
        )

    def expand(self, state: QFormerDecodeState, times: int) -> QFormerDecodeState:
        """Repeat every row ``times`` times in place (one copy per beam or sample)."""
        index = torch.arange(state.tokens.shape[0], device=state.tokens.device).repeat_interleave(times)
        return self.reorder(state, index)


def _image_inputs(model: Blip2, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    if pixel_values.dim() != 4:
        raise GenerationError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    device = model.query_tokens.device
    image_embeds = model.encode_image(pixel_values.to(device))  # (B, N, Dv)
    return image_embeds, torch.ones(image_embeds.shape[:2], dtype=torch.long, device=device)


@torch.no_grad()
def generate_caption_ids(
    model: Blip2,
    pixel_values: Tensor,
    config: GenerationConfig | None = None,
    *,
    start_token_id: int = DEC_TOKEN_ID,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Caption token ids for a batch of images with the Q-Former decoder.

    Args:
        model: a stage-1 BLIP-2 model (evaluated in eval mode; its training flag is restored).
        pixel_values: (B, 3, S, S) preprocessed images.
        config: decoding settings; LAVIS's defaults (:func:`lavis_caption_config`) when None.
        start_token_id: ``[DEC]``.
        use_cache: False runs the reference (uncached) decoder.
        generator: random source for sampling.

    Returns:
        (B * num_return_sequences, T) new tokens (without ``[DEC]``), ``[SEP]``-terminated and padded.
    """
    config = lavis_caption_config() if config is None else config
    decoder = QFormerCaptionDecoder(model, start_token_id=start_token_id, use_cache=use_cache)
    was_training = model.training
    model.eval()
    try:
        image_embeds, image_mask = _image_inputs(model, pixel_values)
        return generate(decoder, config, image_embeds, image_mask, generator=generator)
    finally:
        model.train(was_training)


def caption_qformer(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    pixel_values: Tensor,
    generation_config: GenerationConfig | None = None,
    *,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Caption images with a stage-1 BLIP-2 model's Q-Former (LAVIS ``Blip2Qformer.generate``).

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: a :class:`vlkit.processors.QFormerTokenizer` (its ``[DEC]``, ``[SEP]``, ``[PAD]`` ids are
            used; ``batch_decode`` turns ids into text).
        pixel_values: (B, 3, S, S) preprocessed images (``ImageEvalProcessor``).
        generation_config: decoding settings; None = LAVIS defaults (beam search, 3 beams, LAVIS max_length
            30 / min_length 10 = at most 29 / at least 9 new tokens). A config without ``eos_token_id`` or
            ``pad_token_id`` gets the tokenizer's ``[SEP]`` / ``[PAD]``.
        use_cache: False runs the reference (uncached) decoder.
        generator: random source for sampling.

    Returns:
        B * num_return_sequences captions (special tokens removed, stripped); image b's captions are
        entries b*R ... b*R + R - 1.
    """
    sep, pad = int(tokenizer.sep_token_id), int(tokenizer.pad_token_id)
    if generation_config is None:
        config = lavis_caption_config(eos_token_id=sep, pad_token_id=pad)
    else:
        config = generation_config.replace(
            eos_token_id=sep if generation_config.eos_token_id is None else generation_config.eos_token_id,
            pad_token_id=pad if generation_config.pad_token_id is None else generation_config.pad_token_id,
        )
    ids = generate_caption_ids(
        model,
        pixel_values,
        config,
        start_token_id=int(tokenizer.bos_token_id),
        use_cache=use_cache,
        generator=generator,
    )
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
