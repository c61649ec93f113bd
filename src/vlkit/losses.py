"""Training objectives of BLIP-2 and InstructBLIP as functions of tensors.

Models return features and logits; the functions here turn them into losses, and tasks combine them.
Nothing here holds state or looks at a model, so every objective can be checked on tiny hand-made tensors.

Stage 1 (Q-Former, ``blip2-spec.md`` §2.1–2.2):

* :func:`itc_loss` — image-text contrastive loss. Similarities are the maximum over the query outputs,
  divided by a learnable, unclamped temperature. Local rows are scored against the features of the whole
  global batch, which are gathered *without* gradient ("local rows, global columns"). Label smoothing 0.1;
  with integer image ids, every caption of the same image is a positive.
* :func:`sample_itm_negatives` + :func:`build_itm_batch` + :func:`itm_loss` — image-text matching with one
  hard negative image per text and one hard negative text per image, drawn from the ITC similarities.
* :func:`itg_inputs` + :func:`itg_loss` — image-grounded captioning: [DEC] replaces [CLS] as the start token,
  next-token cross-entropy with label smoothing 0.1.

Stage 2 and InstructBLIP (§2.3–2.5): :func:`causal_lm_targets` / :func:`pack_instruction_response` build the
label tensors that decoder-only LMs (OPT, Vicuna) are trained with, :func:`seq2seq_targets` those of T5;
:func:`causal_lm_loss` and :func:`seq2seq_lm_loss` are the matching unsmoothed cross-entropies.

Retrieval: :func:`itc_similarity` is the query-max similarity matrix between any number of images and texts.

Shapes: B local batch, W world size, Q query tokens, E embedding size, T text length, V vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit import distributed
from vlkit.errors import VlkitError

__all__ = [
    "IGNORE_INDEX",
    "ItcOutput",
    "ItmBatch",
    "ItmNegatives",
    "LossInputError",
    "PackedInstruction",
    "build_itm_batch",
    "causal_lm_loss",
    "causal_lm_targets",
    "itc_loss",
    "itc_positive_mask",
    "itc_similarity",
    "itg_inputs",
    "itg_loss",
    "itm_loss",
    "pack_instruction_response",
    "sample_itm_negatives",
    "seq2seq_lm_loss",
    "seq2seq_targets",
    "shifted_cross_entropy",
]

IGNORE_INDEX = -100  # label value that the cross-entropies skip (PyTorch / transformers convention)
# Value written over the positives before the hard-negative softmax (the reference's constant).
_MASKED_SIM = -10000.0
# Elements of the (chunk, Q, Nt) intermediate that itc_similarity materialises at a time (64 MiB in fp32).
_SIM_CHUNK_ELEMENTS = 1 << 24

GatherFn = Callable[[Tensor], Tensor]


class LossInputError(VlkitError, ValueError):
    """Tensors handed to a loss have inconsistent shapes, dtypes or layouts."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise LossInputError(message)


def _at_least_fp32(x: Tensor) -> Tensor:
    # Softmax/log-softmax over fp16/bf16 logits loses digits; fp64 inputs (tests) stay fp64.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# --------------------------------------------------------------------------------------------------------------
# Similarities


def itc_similarity(
    image_feats: Tensor,
    text_feats: Tensor,
    *,
    impl: Literal["chunked", "reference"] = "chunked",
    chunk_size: int | None = None,
) -> Tensor:
    """Image-text similarity as the maximum over query tokens of the dot product.

    ``sim[i, t] = max_q <image_feats[i, q], text_feats[t]>``. No temperature is applied (retrieval ranks by
    the raw cosine of normalised features; :func:`itc_loss` divides by the temperature itself).

    The chunked path runs one matmul per block of images and keeps only a (chunk, Q, Nt) intermediate,
    so a 5k × 25k COCO test matrix fits in memory; the reference path is the literal einsum. Both back-
    propagate to the arg-max query only, as ``Tensor.max`` does.

    Args:
        image_feats: (Ni, Q, E) per-query image features.
        text_feats: (Nt, E) text features.
        impl: "chunked" (fast, bounded memory) or "reference".
        chunk_size: images per block for "chunked"; chosen from a 64 MiB budget when None.

    Returns:
        (Ni, Nt) in the dtype of the inputs.
    """
    _check(image_feats.dim() == 3, f"image_feats must be (N, Q, E), got shape {tuple(image_feats.shape)}")
    _check(text_feats.dim() == 2, f"text_feats must be (N, E), got shape {tuple(text_feats.shape)}")
    _check(
        image_feats.shape[-1] == text_feats.shape[-1],
        f"embedding sizes differ: image_feats {tuple(image_feats.shape)} vs text_feats {tuple(text_feats.shape)}",
    )
    if impl == "reference":
        return torch.einsum("iqe,te->itq", image_feats, text_feats).max(dim=-1).values
    if impl != "chunked":
        raise LossInputError(f"impl must be 'chunked' or 'reference', got {impl!r}")
    n_img, n_query, _ = image_feats.shape
    n_txt = text_feats.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _SIM_CHUNK_ELEMENTS // max(1, n_query * n_txt))
    _check(chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    text_t = text_feats.t()  # (E, Nt)
    blocks = []
    for start in range(0, n_img, chunk_size):
        block = image_feats[start : start + chunk_size]  # (c, Q, E)
        sim = (block.reshape(-1, block.shape[-1]) @ text_t).view(block.shape[0], n_query, n_txt)  # (c, Q, Nt)
        blocks.append(sim.max(dim=1).values)  # (c, Nt)
    if not blocks:
        return image_feats.new_zeros(0, n_txt)
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)


# --------------------------------------------------------------------------------------------------------------
# ITC


@dataclass
class ItcOutput:
    """Result of :func:`itc_loss`; the similarities and positives feed ITM hard-negative sampling."""

    loss: Tensor  # () mean of the two directions
    loss_i2t: Tensor  # ()
    loss_t2i: Tensor  # ()
    sim_i2t: Tensor  # (B, B·W) local images vs all texts, divided by temp
    sim_t2i: Tensor  # (B, B·W) local texts vs all images, divided by temp
    positive_mask: Tensor  # (B, B·W) bool, True where column j is a positive of local row b
    rank: int  # this process's rank: local row b is global column rank·B + b


def itc_positive_mask(
    batch: int,
    total: int,
    rank: int,
    *,
    image_ids: Tensor | None = None,
    image_ids_all: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Which global columns are positives of each local row.

    Without ids the only positive of local sample b is its own column ``rank·B + b``. With ids (retrieval
    fine-tuning, several captions per image) every column with the same image id is a positive.

    Args:
        batch: B, local batch size.
        total: B·W, global batch size.
        rank: this process's rank.
        image_ids: (B,) int ids of the local samples, or None.
        image_ids_all: (B·W,) gathered ids; required with ``image_ids``.
        device: device of the result when no ids are given.

    Returns:
        (B, B·W) bool.
    """
    if image_ids is not None:
        _check(image_ids_all is not None, "image_ids_all is required together with image_ids")
        return image_ids.reshape(-1, 1) == image_ids_all.reshape(1, -1)
    _check((rank + 1) * batch <= total, f"rank {rank} with local batch {batch} exceeds the global batch {total}")
    mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
    local = torch.arange(batch, device=device)
    mask[local, rank * batch + local] = True
    return mask


def _soft_target_ce(logits: Tensor, positive_mask: Tensor, label_smoothing: float) -> Tensor:
    # Target of row b: (1 - ε)·pos/rowsum(pos) + ε/K. With one positive per row this is exactly
    # F.cross_entropy(label_smoothing=ε); with several it is the reference's multi-positive target.
    logp = F.log_softmax(_at_least_fp32(logits), dim=1)  # (B, K)
    pos = positive_mask.to(logp.dtype)
    target = (1.0 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / logits.shape[1]
    return -(target * logp).sum(dim=1).mean()


def itc_loss(
    image_feats: Tensor,
    text_feat: Tensor,
    temp: Tensor | float,
    *,
    image_ids: Tensor | None = None,
    label_smoothing: float = 0.1,
    rank: int | None = None,
    gather: GatherFn | None = None,
) -> ItcOutput:
    """Image-text contrastive loss of BLIP-2 stage 1 ("local rows, global columns").

    ``sim_i2t[b, j] = max_q <image_feats[b, q], text_all[j]> / temp`` and
    ``sim_t2i[b, j] = max_q <text_feat[b], image_all[j, q]> / temp``, where ``*_all`` are the features of
    every rank gathered without gradient. The positive of local sample b is column ``rank·B + b`` (or, with
    ``image_ids``, every column with the same id). Loss per direction: the mean over rows of the cross-
    entropy against the soft target ``(1 - ε)·pos/rowsum(pos) + ε/(B·W)``; the result averages the two
    directions. Gradients reach the local rows only (and ``temp``).

    Args:
        image_feats: (B, Q, E) L2-normalised projected query outputs.
        text_feat: (B, E) L2-normalised projected [CLS] outputs.
        temp: temperature (learnable 0-d tensor or float); used as is, no clamping.
        image_ids: (B,) integer image ids, or None for one positive per row.
        label_smoothing: ε (0.1 in the reference for both directions).
        rank: position of this process's rows in the gathered batch; from the process group when None.
        gather: no-grad all-gather along dim 0; :func:`vlkit.distributed.all_gather_no_grad` when None.
            Its result is detached here whatever it returns.

    Returns:
        ItcOutput with the loss, both directions, the two (B, B·W) similarity matrices and the positives.
    """
    _check(image_feats.dim() == 3, f"image_feats must be (B, Q, E), got shape {tuple(image_feats.shape)}")
    _check(text_feat.dim() == 2, f"text_feat must be (B, E), got shape {tuple(text_feat.shape)}")
    _check(
        image_feats.shape[0] == text_feat.shape[0],
        f"batch sizes differ: image_feats {tuple(image_feats.shape)} vs text_feat {tuple(text_feat.shape)}",
    )
    if gather is None:
        gather = distributed.all_gather_no_grad
        rank = distributed.rank() if rank is None else rank
    _check(rank is not None, "rank is required when a custom gather is given")
    batch = image_feats.shape[0]

    image_all = gather(image_feats).detach()  # (B·W, Q, E)
    text_all = gather(text_feat).detach()  # (B·W, E)
    sim_i2t = itc_similarity(image_feats, text_all) / temp  # (B, B·W)
    sim_t2i = itc_similarity(image_all, text_feat).t() / temp  # (B, B·W)

    ids_all = None
    if image_ids is not None:
        image_ids = image_ids.reshape(-1)
        _check(image_ids.shape[0] == batch, f"image_ids has {image_ids.shape[0]} entries for a batch of {batch}")
        _check(not image_ids.is_floating_point(), f"image_ids must be integers, got {image_ids.dtype}")
        ids_all = gather(image_ids)
    positive_mask = itc_positive_mask(
        batch, sim_i2t.shape[1], rank, image_ids=image_ids, image_ids_all=ids_all, device=sim_i2t.device
    )
    loss_i2t = _soft_target_ce(sim_i2t, positive_mask, label_smoothing)
    loss_t2i = _soft_target_ce(sim_t2i, positive_mask, label_smoothing)
    return ItcOutput(
        loss=(loss_i2t + loss_t2i) / 2,
        loss_i2t=loss_i2t,
        loss_t2i=loss_t2i,
        sim_i2t=sim_i2t,
        sim_t2i=sim_t2i,
        positive_mask=positive_mask,
        rank=rank,
    )


# --------------------------------------------------------------------------------------------------------------
# ITM


@dataclass
class ItmNegatives:
    """Hard negatives drawn by :func:`sample_itm_negatives`, as indices into the gathered batch."""

    image_index: Tensor  # (B,) long: negative image (global column) for each local text
    text_index: Tensor  # (B,) long: negative text (global column) for each local image
    # (B,) bool: False where every column is a positive, so the reference's uniform draw could only pick
    # a positive (it is labelled "no match" anyway, as in the reference).
    has_negative: Tensor


@torch.no_grad()
def sample_itm_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    positive_mask: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> ItmNegatives:
    """Draw one hard negative image per text and one hard negative text per image.

    Positives are overwritten with -10000 before a softmax over the columns, so more similar negatives
    are drawn more often and positives (probability exactly 0 in fp32) never are. One multinomial draw per
    row, without gradient.

    Args:
        sim_i2t: (B, B·W) similarities of local images to all texts (``ItcOutput.sim_i2t``).
        sim_t2i: (B, B·W) similarities of local texts to all images (``ItcOutput.sim_t2i``).
        positive_mask: (B, B·W) bool (``ItcOutput.positive_mask``).
        generator: random generator on the device of the similarities, for reproducible draws.

    Returns:
        ItmNegatives with global column indices.
    """
    _check(
        sim_i2t.shape == sim_t2i.shape == positive_mask.shape and sim_i2t.dim() == 2,
        "sim_i2t, sim_t2i and positive_mask must share one (B, B·W) shape, got "
        f"{tuple(sim_i2t.shape)}, {tuple(sim_t2i.shape)}, {tuple(positive_mask.shape)}",
    )
    _check(positive_mask.dtype == torch.bool, f"positive_mask must be bool, got {positive_mask.dtype}")
    weights_t2i = F.softmax(_at_least_fp32(sim_t2i).masked_fill(positive_mask, _MASKED_SIM), dim=1)  # (B, B·W)
    weights_i2t = F.softmax(_at_least_fp32(sim_i2t).masked_fill(positive_mask, _MASKED_SIM), dim=1)  # (B, B·W)
    image_index = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (B,)
    text_index = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (B,)
    return ItmNegatives(image_index, text_index, (~positive_mask).any(dim=1))


@dataclass
class ItmBatch:
    """The (image, text) pairs scored by the ITM head: 3B of them from :func:`build_itm_batch` (positives,
    negative images, negative texts), plus M non-matches from :func:`add_itm_text_negatives`."""

    image_embeds: Tensor  # (3B [+ M], N, D) [pos images; neg images; pos images (; owners' images)]
    text_ids: Tensor  # (3B [+ M], T) [pos texts; pos texts; neg texts (; swapped texts)]
    text_mask: Tensor  # (3B [+ M], T)
    labels: Tensor  # (3B [+ M],) long: [1]*B + [0]*2B (+ [0]*M)


def build_itm_batch(
    image_embeds: Tensor,
    text_ids: Tensor,
    text_mask: Tensor,
    negatives: ItmNegatives,
    *,
    gather_with_grad: GatherFn | None = None,
    gather: GatherFn | None = None,
) -> ItmBatch:
    """Assemble the ITM triplets from local tensors and the sampled negative indices.

    Negative images are taken from the image embeddings of all ranks gathered *with* gradient (a hard
    negative may live on another rank and still gets its gradient there); negative texts from the token ids
    and masks gathered without gradient.

    Args:
        image_embeds: (B, N, D) vision features the Q-Former cross-attends (after ln_vision).
        text_ids: (B, T) token ids, padded to the same T on every rank.
        text_mask: (B, T) attention mask.
        negatives: from :func:`sample_itm_negatives`.
        gather_with_grad: autograd-aware all-gather; :func:`vlkit.distributed.all_gather_with_grad` when None.
        gather: no-grad all-gather; :func:`vlkit.distributed.all_gather_no_grad` when None.

    Returns:
        ItmBatch of 3B pairs with labels [1]*B + [0]*2B.
    """
    batch = image_embeds.shape[0]
    _check(
        text_ids.shape[0] == batch and text_mask.shape == text_ids.shape,
        f"image_embeds {tuple(image_embeds.shape)}, text_ids {tuple(text_ids.shape)} and text_mask "
        f"{tuple(text_mask.shape)} must share the batch size (and ids/mask one shape)",
    )
    _check(
        negatives.image_index.shape == (batch,) and negatives.text_index.shape == (batch,),
        f"negatives must hold {batch} indices per direction, got {tuple(negatives.image_index.shape)} and "
        f"{tuple(negatives.text_index.shape)}",
    )
    gather_with_grad = gather_with_grad or distributed.all_gather_with_grad
    gather = gather or distributed.all_gather_no_grad
    image_all = gather_with_grad(image_embeds)  # (B·W, N, D)
    ids_all = gather(text_ids)  # (B·W, T)
    mask_all = gather(text_mask)  # (B·W, T)

    image_neg = image_all.index_select(0, negatives.image_index)  # (B, N, D)
    ids_neg = ids_all.index_select(0, negatives.text_index)  # (B, T)
    mask_neg = mask_all.index_select(0, negatives.text_index)  # (B, T)
    labels = torch.zeros(3 * batch, dtype=torch.long, device=image_embeds.device)
    labels[:batch] = 1
    return ItmBatch(
        image_embeds=torch.cat([image_embeds, image_neg, image_embeds], dim=0),
        text_ids=torch.cat([text_ids, text_ids, ids_neg], dim=0),
        text_mask=torch.cat([text_mask, text_mask, mask_neg], dim=0),
        labels=labels,
    )


def add_itm_text_negatives(
    batch: ItmBatch, image_embeds: Tensor, owner: Tensor, text_ids: Tensor, text_mask: Tensor
) -> ItmBatch:
    """Append (image, caption) non-matches to an ITM batch: caption m is scored with local image ``owner[m]``.

    For hard negatives made from the text (e.g. a caption with one word swapped); not in the reference.

    Args:
        batch: from :func:`build_itm_batch`.
        image_embeds: (B, N, D) the local vision features ``batch`` was built from.
        owner: (M,) long, indices into the local batch.
        text_ids, text_mask: (M, T) the captions, padded to the batch's T.

    Returns:
        ItmBatch of 3B + M pairs, the new ones labelled 0.
    """
    _check(
        owner.dim() == 1 and text_ids.shape == text_mask.shape == (owner.shape[0], batch.text_ids.shape[1]),
        f"owner {tuple(owner.shape)}, text_ids {tuple(text_ids.shape)} and text_mask {tuple(text_mask.shape)} "
        f"must be (M,), (M, {batch.text_ids.shape[1]}), (M, {batch.text_ids.shape[1]})",
    )
    _check(
        owner.numel() == 0 or (0 <= int(owner.min()) and int(owner.max()) < image_embeds.shape[0]),
        f"owner indices must lie in [0, {image_embeds.shape[0]})",
    )
    return ItmBatch(
        image_embeds=torch.cat([batch.image_embeds, image_embeds.index_select(0, owner)], dim=0),
        text_ids=torch.cat([batch.text_ids, text_ids], dim=0),
        text_mask=torch.cat([batch.text_mask, text_mask], dim=0),
        labels=torch.cat([batch.labels, batch.labels.new_zeros(owner.shape[0])]),
    )


def itm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Image-text matching loss: plain cross-entropy, no smoothing.

    Args:
        logits: (3B, 2) ITM head output averaged over query positions.
        labels: (3B,) long, 1 = match.

    Returns:
        () mean loss.
    """
    _check(logits.dim() == 2 and logits.shape[0] == labels.shape[0], "itm logits must be (N, 2) with N labels")
    return F.cross_entropy(_at_least_fp32(logits), labels)


# --------------------------------------------------------------------------------------------------------------
# Language-model losses


def shifted_cross_entropy(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0) -> Tensor:
    """Next-token cross-entropy: position t predicts ``labels[:, t + 1]``; -100 is skipped.

    Equal to ``F.cross_entropy(logits[:, :-1], labels[:, 1:])`` averaged over non-ignored targets, but
    shifts the labels instead of slicing the (large) logits. Computed in fp32.

    Args:
        logits: (B, T, V).
        labels: (B, T) long, -100 where no loss is taken.
        label_smoothing: ε of ``F.cross_entropy``.

    Returns:
        () mean over non-ignored targets (NaN if there are none, as in PyTorch).
    """
    _check(logits.dim() == 3, f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    _check(
        labels.shape == logits.shape[:2],
        f"labels {tuple(labels.shape)} must match the first two dims of logits {tuple(logits.shape)}",
    )
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): last position predicts nothing
    return F.cross_entropy(
        _at_least_fp32(logits.flatten(0, 1)),
        shifted.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def itg_inputs(input_ids: Tensor, *, dec_token_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Decoder input and labels for the Q-Former's image-grounded text generation.

    The caption's first token ([CLS]) is replaced by [DEC] (30522 in the BERT vocabulary extended by
    BLIP-2); labels are those ids with pad -> -100. The [DEC] at position 0 is never a target because the
    loss is shifted; targets are the word-pieces and the final [SEP].

    Args:
        input_ids: (B, T) caption ids starting with [CLS].
        dec_token_id: id of [DEC].
        pad_id: id of [PAD] (0 for BERT).

    Returns:
        (decoder_input_ids (B, T), labels (B, T)).
    """
    _check(input_ids.dim() == 2 and input_ids.shape[1] >= 1, f"input_ids must be (B, T), got {input_ids.shape}")
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = dec_token_id
    return decoder_ids, decoder_ids.masked_fill(decoder_ids == pad_id, IGNORE_INDEX)


def itg_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.1) -> Tensor:
    """Image-grounded text generation loss: shifted cross-entropy with label smoothing (0.1 by default).

    Args:
        logits: (B, T, V) Q-Former LM-head output on the text positions.
        labels: (B, T) from :func:`itg_inputs`.
        label_smoothing: ε (0.1 in the reference).

    Returns:
        () mean over non-ignored targets.
    """
    return shifted_cross_entropy(logits, labels, label_smoothing=label_smoothing)


def _prepend_ignored(targets: Tensor, num_query_tokens: int) -> Tensor:
    _check(num_query_tokens >= 0, f"num_query_tokens must be >= 0, got {num_query_tokens}")
    head = targets.new_full((targets.shape[0], num_query_tokens), IGNORE_INDEX)
    return torch.cat([head, targets], dim=1)


def causal_lm_targets(input_ids: Tensor, *, num_query_tokens: int, pad_id: int, prompt_len: int = 0) -> Tensor:
    """Labels for a decoder-only LM fed ``[query soft tokens; text tokens]`` (BLIP-2 stage 2, OPT).

    Pad ids -> -100; when a prompt is set (``prompt_len > 0``) its first ``prompt_len`` text positions
    (the prompt's tokens *including* the BOS) -> -100; then ``num_query_tokens`` × -100 are prepended for the
    query positions. With no prompt the BOS stays a target (the reference's behaviour: the last query
    position learns to predict ``</s>``).

    Args:
        input_ids: (B, T) right-padded token ids (text + "\\n" for OPT captions).
        num_query_tokens: Q, soft tokens in front of the text.
        pad_id: the tokenizer's pad id.
        prompt_len: tokens of the prompt alone including BOS (e.g. 4 for "a photo of" with OPT); 0 = none.

    Returns:
        (B, Q + T) long.
    """
    _check(input_ids.dim() == 2, f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    _check(prompt_len >= 0, f"prompt_len must be >= 0, got {prompt_len}")
    targets = input_ids.masked_fill(input_ids == pad_id, IGNORE_INDEX)
    if prompt_len > 0:
        targets[:, :prompt_len] = IGNORE_INDEX
    return _prepend_ignored(targets, num_query_tokens)


def causal_lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Standard next-token cross-entropy of a causal LM (no smoothing), mean over non-ignored targets.

    Args:
        logits: (B, L, V) over the whole input, query positions included.
        targets: (B, L) from :func:`causal_lm_targets` or :func:`pack_instruction_response`.

    Returns:
        () loss.
    """
    return shifted_cross_entropy(logits, targets)


@dataclass
class PackedInstruction:
    """Instruction and response of InstructBLIP-Vicuna packed into one right-padded sequence."""

    input_ids: Tensor  # (B, Li + Lr - 1)
    attention_mask: Tensor  # (B, Li + Lr - 1) ones first, then zeros
    targets: Tensor  # (B, Q + Li + Lr - 1) -100 on queries, instruction and padding
    instruction_lengths: Tensor  # (B,) long: n_i, real instruction tokens (BOS included)


def pack_instruction_response(
    instr_ids: Tensor,
    instr_mask: Tensor,
    resp_ids: Tensor,
    resp_mask: Tensor,
    pad_id: int,
    *,
    num_query_tokens: int,
) -> PackedInstruction:
    """Pack instruction and response the way InstructBLIP-Vicuna trains (``blip2-spec.md`` §2.5).

    For row i with n_i real instruction tokens: ids = ``instr[:n_i] ++ resp[1:] ++ instr[n_i:]`` — the
    response's own leading BOS is dropped and the instruction's padding moves to the end, so real tokens
    are contiguous. The mask is packed the same way. Targets: pad -> -100, the first n_i positions -> -100,
    then ``num_query_tokens`` × -100 prepended.

    Args:
        instr_ids: (B, Li) right-padded instruction ids, each starting with BOS.
        instr_mask: (B, Li) right-padded mask (ones, then zeros).
        resp_ids: (B, Lr) right-padded response ids (response + "</s>"), each starting with BOS.
        resp_mask: (B, Lr).
        pad_id: the LM tokenizer's pad id (32000 for Vicuna).
        num_query_tokens: Q, soft tokens in front of the text.

    Returns:
        PackedInstruction.
    """
    _check(
        instr_ids.dim() == 2 and instr_mask.shape == instr_ids.shape,
        f"instr_ids {tuple(instr_ids.shape)} and instr_mask {tuple(instr_mask.shape)} must be one (B, Li) shape",
    )
    _check(
        resp_ids.dim() == 2 and resp_mask.shape == resp_ids.shape and resp_ids.shape[0] == instr_ids.shape[0],
        f"resp_ids {tuple(resp_ids.shape)} and resp_mask {tuple(resp_mask.shape)} must be one (B, Lr) shape "
        f"with the instruction's batch size {instr_ids.shape[0]}",
    )
    _check(resp_ids.shape[1] >= 1, "responses must hold at least their BOS token")
    _check(
        not bool((instr_mask[:, 1:] > instr_mask[:, :-1]).any()),
        "instr_mask must be right-padded (ones, then zeros) to be packed",
    )
    len_instr, len_resp = instr_ids.shape[1], resp_ids.shape[1]
    n = instr_mask.sum(dim=1).long()  # (B,)
    pos = torch.arange(len_instr + len_resp - 1, device=instr_ids.device).unsqueeze(0)  # (1, L)
    start = n.unsqueeze(1)  # (B, 1) first response position
    in_resp = (pos >= start) & (pos < start + len_resp - 1)  # (B, L)
    # Instruction index: p in the head, p - (Lr - 1) in the tail; response index: p - n + 1.
    instr_idx = torch.where(pos < start, pos, pos - (len_resp - 1)).clamp(0, len_instr - 1)
    resp_idx = (pos - start + 1).clamp(0, len_resp - 1)

    def pack(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(in_resp, b.gather(1, resp_idx), a.gather(1, instr_idx))

    ids = pack(instr_ids, resp_ids)
    mask = pack(instr_mask, resp_mask)
    targets = ids.masked_fill((ids == pad_id) | (pos < start), IGNORE_INDEX)
    return PackedInstruction(ids, mask, _prepend_ignored(targets, num_query_tokens), n)


def seq2seq_targets(output_ids: Tensor, *, pad_id: int) -> Tensor:
    """Decoder labels of an encoder-decoder LM (FlanT5): pad -> -100.

    Args:
        output_ids: (B, T) target ids (text + "</s>"), right-padded.
        pad_id: the tokenizer's pad id (0 for T5).

    Returns:
        (B, T) long.
    """
    return output_ids.masked_fill(output_ids == pad_id, IGNORE_INDEX)


def seq2seq_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of decoder logits against unshifted labels (T5 shifts its inputs, not the labels).

    Args:
        logits: (B, T, V) decoder output.
        labels: (B, T) from :func:`seq2seq_targets`.

    Returns:
        () mean over non-ignored targets.
    """
    _check(
        logits.dim() == 3 and labels.shape == logits.shape[:2],
        f"labels {tuple(labels.shape)} must match the first two dims of logits {tuple(logits.shape)}",
    )
    return F.cross_entropy(_at_least_fp32(logits.flatten(0, 1)), labels.flatten(), ignore_index=IGNORE_INDEX)
