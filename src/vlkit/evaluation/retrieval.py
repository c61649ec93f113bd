"""Image-text retrieval evaluation with a stage-1 BLIP-2 model (LAVIS ``compute_sim_matrix``).

1. Every text is tokenised (padded/truncated to 35) and encoded: ``text_feats`` (Nt, E) = normalised
   ``text_proj`` of [CLS].
2. Every image is encoded: ``image_feats`` (Ni, Q, E) from the queries-only pass; the ``ln_vision``
   outputs (Ni, N, Dv) are kept (on the CPU by default) for ITM.
3. ``sim[i, t]`` = max over queries of ``image_feats[i, q] . text_feats[t]`` (cosine, no temperature).
4. Image-to-text: for each image, its ``k_test`` (128) most similar texts are re-scored as
   ``ITM class-1 logit (mean over queries, no softmax) + sim``; every other entry is -100.
5. Text-to-image: the same with the ``k_test`` most similar images of each text.

Two implementations give the same matrices (a test checks it):

* ``impl="batched"`` (default): the candidate pairs of both directions are pooled, de-duplicated (a pair
  in both an image's and a text's top-k is scored once), sorted by image, and scored ``itm_batch_size``
  pairs at a time with :func:`~vlkit.evaluation.features.pair_itm_logits`, which projects each image's
  cross-attention keys/values once per batch however many of its pairs the batch holds; padding columns
  common to the whole batch are dropped (masked keys contribute nothing). Under
  ``torch.distributed`` the pairs are split evenly across ranks and the scores sum-all-reduced.
* ``impl="reference"``: LAVIS's loop, one ITM batch of ``k_test`` pairs per image and then per text, with
  rows split across ranks.

Distributed runs give exactly the single-process matrices: a rank leaves the rows it does not own at 0
before the all-reduce. (LAVIS fills them with -100, which adds -100 * (world_size - 1) to every entry;
that keeps rankings but not values.)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlkit import distributed
from vlkit.data.collate import collate
from vlkit.data.datasets import RetrievalDataset
from vlkit.errors import DataError
from vlkit.evaluation.features import FeatureError, TextProcessor, inference, pair_itm_logits, tokenize
from vlkit.losses import itc_similarity
from vlkit.models.blip2 import Blip2
from vlkit.processors import QFormerTokenizer

__all__ = [
    "K_TEST",
    "RETRIEVAL_MAX_LENGTH",
    "RetrievalFeatures",
    "RetrievalScores",
    "compute_sim_matrix",
    "evaluate_retrieval",
    "rerank",
    "retrieval_features",
]

K_TEST = 128  # LAVIS k_test: candidates re-ranked with ITM per query
RETRIEVAL_MAX_LENGTH = 35  # texts padded/truncated to 35 tokens in LAVIS's retrieval evaluation
FILL = -100.0  # score of the pairs that are not re-ranked

ImageBatches = Tensor | Iterable[Tensor | Mapping[str, Any]]


@dataclass
class RetrievalFeatures:
    """Everything the re-ranking needs about the gallery.

    Attributes:
        image_feats: (Ni, Q, E) float32 normalised query features.
        vit_embeds: (Ni, N, Dv) ``ln_vision`` outputs in the model dtype (on ``storage_device``).
        text_feats: (Nt, E) float32 normalised [CLS] features.
        text_ids: (Nt, L) token ids (L = 35).
        text_mask: (Nt, L) padding mask.
    """

    image_feats: Tensor
    vit_embeds: Tensor
    text_feats: Tensor
    text_ids: Tensor
    text_mask: Tensor


@dataclass
class RetrievalScores:
    """Score matrices of a retrieval evaluation (float32, CPU).

    Attributes:
        i2t: (Ni, Nt) image-to-text scores: ITM logit + ITC cosine for each image's k_test best texts,
            -100 elsewhere. Rank texts for image i by row i.
        t2i: (Nt, Ni) text-to-image scores, likewise.
        sim: (Ni, Nt) ITC cosine similarity (max over queries).
    """

    i2t: Tensor
    t2i: Tensor
    sim: Tensor

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """``(i2t, t2i)`` as numpy arrays, what LAVIS's ``compute_sim_matrix`` returns."""
        return self.i2t.numpy(), self.t2i.numpy()


def _progress(iterable: Iterable[Any], desc: str, total: int | None, enabled: bool) -> Iterable[Any]:
    return tqdm(iterable, desc=desc, total=total, disable=not enabled or distributed.rank() != 0, leave=False)


def _image_batches(images: ImageBatches, batch_size: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(pixels (B, 3, S, S), gallery indices (B,) or None) for a tensor, tensors or collated dict batches."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise FeatureError(f"images must be (N, 3, S, S), got shape {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size], None
        return
    for batch in images:
        if batch is None:  # every image of the batch was skipped as unreadable
            continue
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise DataError(f"image batch has no 'image' field (fields: {sorted(batch)})")
            index = batch.get("index")
            yield batch["image"], (torch.as_tensor(index) if index is not None else None)
        elif isinstance(batch, Tensor):
            yield batch, None
        else:
            raise DataError(f"image batches must be tensors or dicts with 'image', got {type(batch).__name__}")


def _batch_count(images: ImageBatches, batch_size: int) -> int | None:
    if isinstance(images, Tensor):
        return -(-images.shape[0] // batch_size)
    try:
        return len(images)  # a DataLoader or a list of batches
    except TypeError:
        return None


def retrieval_features(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    images: ImageBatches,
    texts: Sequence[str],
    *,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    max_length: int = RETRIEVAL_MAX_LENGTH,
    text_processor: TextProcessor | None = None,
    storage_device: torch.device | str = "cpu",
    progress: bool = True,
) -> RetrievalFeatures:
    """Encode the gallery: text features (texts in chunks) and image features plus ViT outputs.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        images: the gallery images in order: an (Ni, 3, S, S) tensor, or an iterable of (B, 3, S, S) batches
            or of collated dict batches with "image" (and optionally "index", the gallery position of each
            image, as :class:`~vlkit.data.datasets.RetrievalDataset` gives with ``collate``).
        texts: the gallery texts in order (already normalised, e.g. ``RetrievalDataset.text``).
        image_batch_size: images per pass when ``images`` is one tensor.
        text_batch_size: texts per pass (256 in LAVIS).
        max_length: texts are padded and truncated to this many tokens (35).
        text_processor: applied to each text first (None: texts are used as given).
        storage_device: where the ViT outputs are kept for ITM (the CPU, as LAVIS, or the model's device).
        progress: show tqdm progress bars (rank 0 only).

    Returns:
        The gallery features.
    """
    if len(texts) == 0:
        raise FeatureError("no texts in the retrieval gallery")
    if image_batch_size < 1 or text_batch_size < 1:
        raise FeatureError(f"batch sizes must be >= 1, got images {image_batch_size}, texts {text_batch_size}")
    ids, mask = tokenize(tokenizer, texts, text_processor=text_processor, max_length=max_length, padding="max_length")
    text_feats, image_feats, vit_embeds, indices = [], [], [], []
    with inference(model) as device:
        chunks = range(0, ids.shape[0], text_batch_size)
        for start in _progress(chunks, "texts", len(chunks), progress):
            rows = slice(start, start + text_batch_size)
            text_out = model.encode_text(ids[rows].to(device), mask[rows].to(device))
            text_feats.append(model.project_text(text_out).float())
        batches = _image_batches(images, image_batch_size)
        for pixels, index in _progress(batches, "images", _batch_count(images, image_batch_size), progress):
            vit = model.encode_image(pixels.to(device))  # (B, N, Dv)
            image_feats.append(model.project_image(model.encode_queries(vit).query_output).float())
            vit_embeds.append(vit.to(storage_device))
            indices.append(index)
    if not image_feats:
        raise FeatureError("no images in the retrieval gallery")
    image_feats_all, vit_all = torch.cat(image_feats), torch.cat(vit_embeds)
    if any(index is not None for index in indices):
        image_feats_all, vit_all = _in_gallery_order(image_feats_all, vit_all, indices)
    return RetrievalFeatures(image_feats_all, vit_all, torch.cat(text_feats), ids, mask)


def _in_gallery_order(image_feats: Tensor, vit_embeds: Tensor, indices: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Put images in gallery order by their "index" field; every position must appear exactly once."""
    if any(index is None for index in indices):
        raise DataError("some image batches carry an 'index' field and some do not")
    order = torch.cat([index.reshape(-1).long().cpu() for index in indices])
    n = order.numel()
    if n != image_feats.shape[0]:
        raise DataError(f"{image_feats.shape[0]} images but {n} gallery indices")
    seen = torch.zeros(n, dtype=torch.bool)
    valid = (order >= 0) & (order < n)
    seen[order[valid]] = True
    if not bool(valid.all()) or not bool(seen.all()):
        missing = torch.nonzero(~seen).flatten()[:10].tolist()
        raise DataError(
            f"the gallery images are not positions 0..{n - 1} exactly once (missing {missing}); "
            "retrieval needs every image (an unreadable image cannot be skipped)"
        )
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return image_feats[inverse.to(image_feats.device)], vit_embeds[inverse.to(vit_embeds.device)]


def _top(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best columns of every row: values (R, k) and indices (R, k) on the CPU."""
    top = sims.topk(k, dim=1)
    return top.values.float().cpu(), top.indices.cpu()


def _reduce(t: Tensor, device: torch.device) -> Tensor:
    # NCCL reduces CUDA tensors only: reduce on the model's device, return to the CPU.
    return distributed.all_reduce_sum(t.to(device)).cpu() if distributed.world_size() > 1 else t


def _itm_class1(model: Blip2, images: Tensor, ids: Tensor, mask: Tensor, index: Tensor | None, impl: str) -> Tensor:
    return pair_itm_logits(model, images, ids, mask, image_index=index, impl=impl)[:, 1].float().cpu()


def _rerank_batched(
    model: Blip2,
    features: RetrievalFeatures,
    sims: Tensor,
    k_i2t: int,
    k_t2i: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    n_img, n_txt = sims.shape
    i2t_values, i2t_texts = _top(sims, k_i2t)  # (Ni, k)
    t2i_values, t2i_images = _top(sims.t(), k_t2i)  # (Nt, k)
    # Candidate pairs as flat indices image * Nt + text; sorted, so the pairs of one image are adjacent.
    i2t_pairs = (torch.arange(n_img)[:, None] * n_txt + i2t_texts).reshape(-1)
    t2i_pairs = (t2i_images * n_txt + torch.arange(n_txt)[:, None]).reshape(-1)
    pairs = torch.unique(torch.cat([i2t_pairs, t2i_pairs]))
    # Even split of the pairs over ranks; each rank scores its share, the rest stays 0 for the sum.
    world, rank = distributed.world_size(), distributed.rank()
    begin, end = pairs.numel() * rank // world, pairs.numel() * (rank + 1) // world
    scores = torch.zeros(pairs.numel())
    starts = range(begin, end, batch_size)
    for start in _progress(starts, "ITM re-rank", len(starts), progress):
        stop = min(end, start + batch_size)
        chunk = pairs[start:stop]
        images, texts = chunk // n_txt, chunk % n_txt
        distinct, index = torch.unique_consecutive(images, return_inverse=True)
        ids, mask = features.text_ids[texts], features.text_mask[texts]
        width = int(mask.sum(dim=1).max())  # drop columns that are padding in every row of the batch
        scores[start:stop] = _itm_class1(
            model,
            features.vit_embeds[distinct.to(features.vit_embeds.device)].to(device),
            ids[:, :width].to(device),
            mask[:, :width].to(device),
            index.to(device),
            "shared",
        )
    scores = _reduce(scores, device)
    i2t = torch.full((n_img, n_txt), FILL)
    i2t.view(-1)[i2t_pairs] = scores[torch.searchsorted(pairs, i2t_pairs)] + i2t_values.reshape(-1)
    t2i = torch.full((n_txt, n_img), FILL)
    t2i_cells = (torch.arange(n_txt)[:, None] * n_img + t2i_images).reshape(-1)
    t2i.view(-1)[t2i_cells] = scores[torch.searchsorted(pairs, t2i_pairs)] + t2i_values.reshape(-1)
    return i2t, t2i


def _rerank_reference(
    model: Blip2,
    features: RetrievalFeatures,
    sims: Tensor,
    k_i2t: int,
    k_t2i: int,
    device: torch.device,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    def one_direction(sims: Tensor, k: int, image_rows: bool, desc: str) -> Tensor:
        rows, cols = sims.shape
        values, candidates = _top(sims, k)
        world, rank = distributed.world_size(), distributed.rank()
        step = rows // world + 1  # LAVIS's split of the rows over ranks
        begin, end = min(rows, rank * step), min(rows, rank * step + step)
        out = torch.zeros(rows, cols)
        out[begin:end] = FILL
        for r in _progress(range(begin, end), desc, end - begin, progress):
            idx = candidates[r]
            if image_rows:  # one image against its k texts
                images = features.vit_embeds[r].to(device).repeat(k, 1, 1)
                ids, mask = features.text_ids[idx], features.text_mask[idx]
            else:  # one text against its k images
                images = features.vit_embeds[idx.to(features.vit_embeds.device)].to(device)
                ids, mask = features.text_ids[r].repeat(k, 1), features.text_mask[r].repeat(k, 1)
            out[r, idx] = _itm_class1(model, images, ids.to(device), mask.to(device), None, "reference") + values[r]
        return _reduce(out, device)

    return one_direction(sims, k_i2t, True, "ITM i2t"), one_direction(sims.t(), k_t2i, False, "ITM t2i")


def rerank(
    model: Blip2,
    features: RetrievalFeatures,
    *,
    k_test: int = K_TEST,
    itm_batch_size: int = 128,
    impl: Literal["batched", "reference"] = "batched",
    progress: bool = True,
) -> RetrievalScores:
    """ITC similarity matrix and top-``k_test`` ITM re-ranking in both directions.

    Args:
        model: the model that produced ``features``.
        features: from :func:`retrieval_features`.
        k_test: candidates re-ranked per image and per text (clipped to the gallery size).
        itm_batch_size: (image, text) pairs per ITM pass ("batched" only).
        impl: "batched" (pooled, de-duplicated, shared image keys/values) or "reference" (LAVIS's loop).
        progress: show tqdm progress bars (rank 0 only).

    Returns:
        The i2t and t2i score matrices and the ITC similarity matrix.
    """
    if k_test < 1:
        raise FeatureError(f"k_test must be >= 1, got {k_test}")
    if itm_batch_size < 1:
        raise FeatureError(f"itm_batch_size must be >= 1, got {itm_batch_size}")
    if impl not in ("batched", "reference"):
        raise FeatureError(f"impl must be 'batched' or 'reference', got {impl!r}")
    with inference(model) as device:
        image_feats, text_feats = features.image_feats.to(device), features.text_feats.to(device)
        sims = itc_similarity(image_feats, text_feats)  # (Ni, Nt) cosine, max over queries
        n_img, n_txt = sims.shape
        k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)
        if impl == "batched":
            i2t, t2i = _rerank_batched(model, features, sims, k_i2t, k_t2i, itm_batch_size, device, progress)
        else:
            i2t, t2i = _rerank_reference(model, features, sims, k_i2t, k_t2i, device, progress)
    return RetrievalScores(i2t=i2t, t2i=t2i, sim=sims.float().cpu())


def compute_sim_matrix(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    images: ImageBatches,
    texts: Sequence[str],
    *,
    k_test: int = K_TEST,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    itm_batch_size: int = 128,
    max_length: int = RETRIEVAL_MAX_LENGTH,
    text_processor: TextProcessor | None = None,
    storage_device: torch.device | str = "cpu",
    impl: Literal["batched", "reference"] = "batched",
    progress: bool = True,
) -> RetrievalScores:
    """Retrieval score matrices of a gallery (LAVIS ``compute_sim_matrix``).

    :func:`retrieval_features` then :func:`rerank`; see them for the arguments. Every rank encodes the
    whole gallery (as LAVIS); the ITM re-ranking is split across ranks.

    Returns:
        ``i2t`` (Ni, Nt), ``t2i`` (Nt, Ni) and ``sim`` (Ni, Nt), float32 on the CPU.
    """
    features = retrieval_features(
        model,
        tokenizer,
        images,
        texts,
        image_batch_size=image_batch_size,
        text_batch_size=text_batch_size,
        max_length=max_length,
        text_processor=text_processor,
        storage_device=storage_device,
        progress=progress,
    )
    return rerank(model, features, k_test=k_test, itm_batch_size=itm_batch_size, impl=impl, progress=progress)


def evaluate_retrieval(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    dataset: RetrievalDataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    **options: Any,
) -> RetrievalScores:
    """Score matrices of an eval-split :class:`~vlkit.data.datasets.RetrievalDataset`.

    Texts are ``dataset.text`` (processed by the dataset's text processor); images are loaded in order with
    a ``DataLoader``. Ground truth for Recall@K is ``dataset.img2txt`` / ``dataset.txt2img``.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        dataset: an eval-split retrieval dataset (one entry per image, a list of captions each).
        batch_size: images per batch.
        num_workers: DataLoader workers.
        **options: keyword arguments of :func:`compute_sim_matrix` (k_test, itm_batch_size, impl, ...).

    Returns:
        The score matrices.
    """
    if not getattr(dataset, "is_eval", False):
        raise DataError("evaluate_retrieval needs an eval-split RetrievalDataset (caption lists per image)")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    return compute_sim_matrix(model, tokenizer, loader, dataset.text, **options)
