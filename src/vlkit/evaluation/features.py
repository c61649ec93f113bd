"""Feature extraction and image-text scoring with a stage-1 BLIP-2 model.

This is LAVIS's ``extract_features(samples, mode)`` and ``Blip2ITM.forward(samples, match_head)`` as plain
functions over tensors and strings:

* :func:`extract_features` with ``mode`` "image" (query outputs (B, Q, D) and their L2-normalised
  projections (B, Q, E)), "text" (last hidden states of every position (B, T, D) and their projections
  (B, T, E); texts padded to the longest, not truncated) or "multimodal" (the query outputs of the
  bi-directional queries+text pass, (B, Q, D), not projected);
* :func:`itm_scores`: probability that each (image, text) pair matches, softmax of the ITM head averaged
  over queries; texts truncated at 32 tokens as in the reference;
* :func:`itc_scores`: cosine similarity of each pair, max over the queries (no temperature).

Texts go through ``text_processor`` (LAVIS's ``blip_caption`` by default; it is idempotent, so already
processed text is unchanged) and the Q-Former tokenizer.

:func:`pair_itm_logits` is the batched ITM kernel shared with retrieval and zero-shot re-ranking. Many
pairs often share an image (an image against its top-k captions, an image against k class prompts); its
fast path projects each distinct image's tokens to cross-attention keys/values once and lets every pair of
that image attend to them (pairs that come in runs per image attend as one long query sequence, so no
per-pair copy of the keys/values is made), instead of projecting a copy of the image per pair. For the
ViT-g Q-Former that projection (677 image tokens x 1408 -> 768, six layers, keys and values) is more than
half the cost of an ITM pass. The reference path is ``Blip2.itm_logits`` on one image copy per pair; a
test checks they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.errors import VlkitError
from vlkit.layers.attention import attend
from vlkit.models.blip2 import Blip2
from vlkit.models.qformer import QFormerAttention, self_attention_mask
from vlkit.processors import QFormerTokenizer, blip_caption

__all__ = [
    "ITM_MAX_LENGTH",
    "Blip2Features",
    "TextProcessor",
    "extract_features",
    "image_features",
    "inference",
    "itc_scores",
    "itm_scores",
    "multimodal_features",
    "pair_itm_logits",
    "text_features",
    "tokenize",
]

TextProcessor = Callable[[str], str]
ITM_MAX_LENGTH = 32  # LAVIS max_txt_len: the ITM/ITC scoring API truncates texts here


class FeatureError(VlkitError, ValueError):
    """Bad inputs to feature extraction or scoring (shapes, counts, texts too long)."""


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[torch.device]:
    """Evaluate ``model`` without gradients and in eval mode (its training flag is restored afterwards).

    Yields:
        The device of the model's parameters, where inputs should go.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def tokenize(
    tokenizer: QFormerTokenizer,
    texts: Sequence[str],
    *,
    text_processor: TextProcessor | None,
    max_length: int | None,
    padding: Literal["longest", "max_length"] = "longest",
) -> tuple[Tensor, Tensor]:
    """Process and tokenise texts: (B, L) ids and mask, truncated at ``max_length`` (None = no truncation)."""
    if isinstance(texts, str):
        raise FeatureError("texts must be a list of strings, not one string")
    if len(texts) == 0:
        raise FeatureError("no texts given")
    processed = [text_processor(t) for t in texts] if text_processor is not None else list(texts)
    return tokenizer(processed, padding=padding, max_length=max_length, truncation=max_length is not None)


def _check_text_length(model: Blip2, ids: Tensor) -> None:
    limit = model.qformer.config.max_position_embeddings
    if ids.shape[1] > limit:
        raise FeatureError(
            f"a text has {ids.shape[1]} tokens but the Q-Former has {limit} positions; pass max_length to truncate"
        )


def _check_pixels(pixel_values: Tensor) -> None:
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise FeatureError(f"pixel_values must be a (B, 3, H, W) tensor, got {shape}")


def _chunks(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise FeatureError(f"batch_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ----------------------------------------------------------------------------------------------------------
# Features


@dataclass
class Blip2Features:
    """Features of a batch, as LAVIS's ``BlipOutputFeatures``; fields of other modes are None. All float32.

    Attributes:
        image_embeds: (B, Q, D) query outputs of the queries-only pass.
        image_embeds_proj: (B, Q, E) L2-normalised ``vision_proj`` of them.
        text_embeds: (B, T, D) last hidden states of the text-only pass (padded to the longest text).
        text_embeds_proj: (B, T, E) L2-normalised ``text_proj`` of every position (position 0 = [CLS] is
            the text feature used for similarity).
        text_mask: (B, T) 1 for real tokens.
        multimodal_embeds: (B, Q, D) query outputs of the bi-directional queries+text pass.
    """

    image_embeds: Tensor | None = None
    image_embeds_proj: Tensor | None = None
    text_embeds: Tensor | None = None
    text_embeds_proj: Tensor | None = None
    text_mask: Tensor | None = None
    multimodal_embeds: Tensor | None = None

    def similarity(self) -> Tensor:
        """(Bi, Bt) cosine similarity, max over queries, of the image and text features (both modes needed)."""
        if self.image_embeds_proj is None or self.text_embeds_proj is None:
            raise FeatureError("similarity needs image and text features")
        return Blip2.itc_similarity(self.image_embeds_proj, self.text_embeds_proj[:, 0])


def image_features(model: Blip2, pixel_values: Tensor, *, batch_size: int = 64) -> Blip2Features:
    """Query outputs and their projections for (B, 3, S, S) images ("image" mode).

    Args:
        model: a stage-1 BLIP-2 model.
        pixel_values: preprocessed images.
        batch_size: images per forward pass.

    Returns:
        Features with ``image_embeds`` (B, Q, D) and ``image_embeds_proj`` (B, Q, E).
    """
    _check_pixels(pixel_values)
    embeds, projected = [], []
    with inference(model) as device:
        for rows in _chunks(pixel_values.shape[0], batch_size):
            query_output = model.encode_queries(model.encode_image(pixel_values[rows].to(device))).query_output
            embeds.append(query_output.float())
            projected.append(model.project_image(query_output).float())
    return Blip2Features(image_embeds=torch.cat(embeds), image_embeds_proj=torch.cat(projected))


def text_features(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    text_processor: TextProcessor | None = blip_caption,
    max_length: int | None = None,
) -> Blip2Features:
    """Text-only Q-Former pass ("text" mode): every position's hidden state and its projection.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        texts: B strings.
        batch_size: texts per forward pass.
        text_processor: applied to each text first (None = use as given).
        max_length: truncate longer texts (None = no truncation, as the reference).

    Returns:
        Features with ``text_embeds`` (B, T, D), ``text_embeds_proj`` (B, T, E), ``text_mask`` (B, T).
    """
    ids, mask = tokenize(tokenizer, texts, text_processor=text_processor, max_length=max_length)
    _check_text_length(model, ids)
    embeds, projected = [], []
    with inference(model) as device:
        for rows in _chunks(ids.shape[0], batch_size):
            hidden = model.encode_text(ids[rows].to(device), mask[rows].to(device))  # (b, T, D)
            embeds.append(hidden.float())
            projected.append(F.normalize(model.text_proj(hidden).float(), dim=-1))
    return Blip2Features(text_embeds=torch.cat(embeds), text_embeds_proj=torch.cat(projected), text_mask=mask)


def _pair_count(n_images: int, n_texts: int) -> int:
    if n_images == n_texts or n_images == 1 or n_texts == 1:
        return max(n_images, n_texts)
    raise FeatureError(
        f"got {n_images} images and {n_texts} texts: pass one text per image, or a single image or single text"
    )


def multimodal_features(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    pixel_values: Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    text_processor: TextProcessor | None = blip_caption,
    max_length: int | None = None,
) -> Blip2Features:
    """Query outputs of the bi-directional queries+text pass for (image, text) pairs ("multimodal" mode).

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        pixel_values: (Bi, 3, S, S) images.
        texts: Bt strings; Bi == Bt, or one of them is 1 (broadcast).
        batch_size: pairs per forward pass.
        text_processor: applied to each text first.
        max_length: truncate longer texts (None = no truncation, as the reference).

    Returns:
        Features with ``multimodal_embeds`` (P, Q, D), P = max(Bi, Bt).
    """
    _check_pixels(pixel_values)
    ids, mask = tokenize(tokenizer, texts, text_processor=text_processor, max_length=max_length)
    _check_text_length(model, ids)
    n_images = pixel_values.shape[0]
    pairs = _pair_count(n_images, ids.shape[0])
    out = []
    with inference(model) as device:
        single = model.encode_image(pixel_values.to(device)) if n_images == 1 else None
        for rows in _chunks(pairs, batch_size):
            n = rows.stop - rows.start
            image = (
                single.expand(n, -1, -1) if single is not None else model.encode_image(pixel_values[rows].to(device))
            )
            row_ids = ids[rows] if ids.shape[0] > 1 else ids.expand(n, -1)
            row_mask = mask[rows] if mask.shape[0] > 1 else mask.expand(n, -1)
            out.append(model.encode_multimodal(image, row_ids.to(device), row_mask.to(device)).float())
    return Blip2Features(multimodal_embeds=torch.cat(out))


def extract_features(
    model: Blip2,
    tokenizer: QFormerTokenizer | None = None,
    *,
    mode: Literal["image", "text", "multimodal"] = "multimodal",
    pixel_values: Tensor | None = None,
    texts: Sequence[str] | None = None,
    batch_size: int = 64,
    text_processor: TextProcessor | None = blip_caption,
) -> Blip2Features:
    """LAVIS ``extract_features``: "image" needs images, "text" texts, "multimodal" both.

    See :func:`image_features`, :func:`text_features`, :func:`multimodal_features`.
    """
    if mode not in ("image", "text", "multimodal"):
        raise FeatureError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
    if mode in ("image", "multimodal") and pixel_values is None:
        raise FeatureError(f"mode {mode!r} needs pixel_values")
    if mode in ("text", "multimodal") and (texts is None or tokenizer is None):
        raise FeatureError(f"mode {mode!r} needs texts and a tokenizer")
    if mode == "image":
        return image_features(model, pixel_values, batch_size=batch_size)
    if mode == "text":
        return text_features(model, tokenizer, texts, batch_size=batch_size, text_processor=text_processor)
    return multimodal_features(
        model, tokenizer, pixel_values, texts, batch_size=batch_size, text_processor=text_processor
    )


# ----------------------------------------------------------------------------------------------------------
# ITM over pairs that share images


def _heads(attn: QFormerAttention, x: Tensor) -> Tensor:
    b, n, d = x.shape
    return x.view(b, n, attn.heads, d // attn.heads).transpose(1, 2)  # (B, H, N, Dh)


def _runs(image_index: Tensor | None) -> list[tuple[int, int, int]] | None:
    """(start, stop, image) of each run of consecutive pairs sharing an image, if runs average >= 2 pairs."""
    if image_index is None:
        return None
    images, counts = torch.unique_consecutive(image_index, return_counts=True)
    if 2 * images.numel() > image_index.numel():
        return None
    runs, start = [], 0
    for image, count in zip(images.tolist(), counts.tolist()):
        runs.append((start, start + count, image))
        start += count
    return runs


def _cross_attend_shared(
    attn: QFormerAttention,
    x: Tensor,
    image_embeds: Tensor,
    image_index: Tensor | None,
    runs: list[tuple[int, int, int]] | None,
) -> Tensor:
    """``attn(x, kv_input=image_embeds[image_index])`` with keys/values projected once per distinct image.

    Cross-attention has no mask, so the queries of all pairs in a run that shares an image can attend as
    one long query sequence of that image: no per-pair copy of its keys/values is ever made.

    Args:
        attn: a Q-Former cross-attention sub-layer.
        x: (P, Q, D) query states of P pairs.
        image_embeds: (U, N, Dv) distinct images.
        image_index: (P,) image of each pair, or None when U == P (pair p uses image p).
        runs: from :func:`_runs`, or None to gather one key/value copy per pair.
    """
    k, v = _heads(attn, attn.key(image_embeds)), _heads(attn, attn.value(image_embeds))  # (U, H, N, Dh)
    q = _heads(attn, attn.query(x))  # (P, H, Q, Dh)
    p = attn.attention_dropout if attn.training else 0.0
    if runs is not None:
        parts = []
        for start, stop, image in runs:
            n, heads, length, dh = q[start:stop].shape
            folded = q[start:stop].transpose(0, 1).reshape(1, heads, n * length, dh)  # (1, H, n*Q, Dh)
            out = attend(folded, k[image : image + 1], v[image : image + 1], None, dropout_p=p, impl=attn.attn_impl)
            parts.append(out.reshape(heads, n, length, dh).transpose(0, 1))  # (n, H, Q, Dh)
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    else:
        if image_index is not None:
            k, v = k.index_select(0, image_index), v.index_select(0, image_index)
        out = attend(q, k, v, None, dropout_p=p, impl=attn.attn_impl)
    out = out.transpose(1, 2).reshape(x.shape)
    return attn.norm(attn.dropout(attn.out(out)) + x)


def _itm_query_output_shared(
    model: Blip2, image_embeds: Tensor, image_index: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None
) -> Tensor:
    """Bi-directional queries+text pass (``Blip2.encode_multimodal``) with shared image keys/values."""
    qformer = model.qformer
    if qformer.word_embed is None:
        raise FeatureError("ITM needs a Q-Former with text input")
    pairs, length = input_ids.shape
    dtype = qformer.embed_norm.weight.dtype
    queries = model.query_tokens.expand(pairs, -1, -1).to(dtype)
    n_query = queries.shape[1]
    if length > qformer.config.max_position_embeddings:
        raise FeatureError(f"text of {length} tokens exceeds max_position_embeddings")
    text = qformer.word_embed(input_ids) + qformer.pos_embed(torch.arange(length, device=input_ids.device))[None]
    x = qformer.embed_dropout(qformer.embed_norm(torch.cat([queries, text], dim=1)))
    mask = self_attention_mask(
        attention_mask,
        batch=pairs,
        query_len=n_query,
        new_query_len=n_query,
        past_text_len=0,
        new_text_len=length,
        causal=False,
        dtype=dtype,
        device=x.device,
    )
    image_embeds = image_embeds.to(dtype)
    runs = _runs(image_index)
    last = len(qformer.layers) - 1
    for i, layer in enumerate(qformer.layers):
        h, _ = layer.self_attn(x, mask)
        q = h[:, :n_query]
        if layer.cross_attn is not None:
            q = _cross_attend_shared(layer.cross_attn, q, image_embeds, image_index, runs)
        if i == last:  # only the query outputs are read: the last text feed-forward can be skipped
            return layer.query_ffn(q)
        x = torch.cat([layer.query_ffn(q), layer.text_ffn(h[:, n_query:])], dim=1)
    raise FeatureError("the Q-Former has no layers")


def pair_itm_logits(
    model: Blip2,
    image_embeds: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    image_index: Tensor | None = None,
    impl: Literal["shared", "reference"] = "shared",
) -> Tensor:
    """ITM logits (P, 2) of P (image, text) pairs, possibly sharing images.

    Args:
        model: a stage-1 BLIP-2 model (call under ``torch.no_grad`` / eval mode for inference).
        image_embeds: (U, N, Dv) ``ln_vision`` outputs of the distinct images (every token valid).
        input_ids: (P, T) token ids of each pair's text.
        attention_mask: (P, T) text padding mask, or None.
        image_index: (P,) which of the U images each pair uses; None means pair p uses image p (U == P).
        impl: "shared" projects each image's cross-attention keys/values once (fast); "reference" runs
            ``Blip2.itm_logits`` on one copy of the image per pair.

    Returns:
        (P, 2) logits averaged over queries; class 1 = match.
    """
    pairs = input_ids.shape[0]
    if image_embeds.dim() != 3:
        raise FeatureError(f"image_embeds must be (U, N, Dv), got shape {tuple(image_embeds.shape)}")
    if image_index is None:
        if image_embeds.shape[0] != pairs:
            raise FeatureError(f"{image_embeds.shape[0]} images for {pairs} texts: pass image_index")
    else:
        if image_index.shape != (pairs,):
            raise FeatureError(f"image_index must have shape ({pairs},), got {tuple(image_index.shape)}")
        image_index = image_index.to(device=image_embeds.device, dtype=torch.long)
    if impl == "reference":
        images = image_embeds if image_index is None else image_embeds.index_select(0, image_index)
        return model.itm_logits(images, input_ids, attention_mask)
    if impl != "shared":
        raise FeatureError(f"impl must be 'shared' or 'reference', got {impl!r}")
    if model.itm_head is None:
        raise FeatureError("this BLIP-2 model has no itm_head (itc_itm_heads=False)")
    query_output = _itm_query_output_shared(model, image_embeds, image_index, input_ids, attention_mask)
    return model.itm_head(query_output).mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Scores of (image, text) pairs


def itm_scores(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    pixel_values: Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = ITM_MAX_LENGTH,
    text_processor: TextProcessor | None = blip_caption,
    return_logits: bool = False,
) -> Tensor:
    """Image-text matching (LAVIS ``match_head="itm"``): probability that each pair matches.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        pixel_values: (Bi, 3, S, S) images.
        texts: Bt strings; pairs are (image b, text b), or one image against every text, or every image
            against one text (when Bi or Bt is 1).
        batch_size: pairs per forward pass.
        max_length: text truncation (32 in the reference).
        text_processor: applied to each text first.
        return_logits: return the (P, 2) logits instead of the match probability.

    Returns:
        (P,) softmax probability of class 1 ("match"), or (P, 2) logits; float32 on the CPU.
    """
    _check_pixels(pixel_values)
    ids, mask = tokenize(tokenizer, texts, text_processor=text_processor, max_length=max_length)
    _check_text_length(model, ids)
    n_images, n_texts = pixel_values.shape[0], ids.shape[0]
    pairs = _pair_count(n_images, n_texts)
    logits = []
    with inference(model) as device:
        single = model.encode_image(pixel_values.to(device)) if n_images == 1 else None
        for rows in _chunks(pairs, batch_size):
            n = rows.stop - rows.start
            if single is not None:
                images, index = single, torch.zeros(n, dtype=torch.long, device=device)
            else:
                images, index = model.encode_image(pixel_values[rows].to(device)), None
            row_ids, row_mask = (ids[rows], mask[rows]) if n_texts > 1 else (ids.expand(n, -1), mask.expand(n, -1))
            width = int(row_mask.sum(dim=1).max())  # drop columns that are padding in every row
            logits.append(
                pair_itm_logits(
                    model, images, row_ids[:, :width].to(device), row_mask[:, :width].to(device), image_index=index
                )
                .float()
                .cpu()
            )
    out = torch.cat(logits)
    return out if return_logits else out.softmax(dim=-1)[:, 1]


def itc_scores(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    pixel_values: Tensor,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = ITM_MAX_LENGTH,
    text_processor: TextProcessor | None = blip_caption,
) -> Tensor:
    """Image-text contrastive score (LAVIS ``match_head="itc"``): cosine, max over queries, no temperature.

    Arguments are those of :func:`itm_scores`.

    Returns:
        (P,) float32 on the CPU.
    """
    _check_pixels(pixel_values)
    ids, mask = tokenize(tokenizer, texts, text_processor=text_processor, max_length=max_length)
    _check_text_length(model, ids)
    n_images, n_texts = pixel_values.shape[0], ids.shape[0]
    pairs = _pair_count(n_images, n_texts)
    image_feats = image_features(model, pixel_values, batch_size=batch_size).image_embeds_proj  # (Bi, Q, E)
    scores = []
    with inference(model) as device:
        for rows in _chunks(n_texts, batch_size):
            text_feat = model.project_text(model.encode_text(ids[rows].to(device), mask[rows].to(device)))
            scores.append(text_feat.float().cpu())
    text_feats = torch.cat(scores)  # (Bt, E)
    if n_images == 1:
        image_feats = image_feats.expand(pairs, -1, -1)
    if n_texts == 1:
        text_feats = text_feats.expand(pairs, -1)
    return torch.einsum("pqe,pe->pq", image_feats, text_feats).amax(dim=1)
