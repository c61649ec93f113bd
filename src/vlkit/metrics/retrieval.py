"""Image–text retrieval recall (R@1/5/10) with several captions per image, as LAVIS reports it.

Given a similarity matrix ``sim_i2t`` of shape ``(N_images, N_texts)``:

* image → text: an image's rank is the best (smallest) rank among its ground-truth captions when all texts
  are sorted by similarity; ``txt_r@k`` is the percentage of images with rank < k;
* text → image: a caption's rank is the rank of its image among all images; ``img_r@k`` likewise.

``txt_r_mean`` / ``img_r_mean`` average the recalls over k, ``r_mean`` averages the two, and
``agg_metrics`` is ``txt_r_mean`` (what LAVIS selects checkpoints by).

Ties. LAVIS orders each row with ``np.argsort(row)[::-1]`` (numpy's default sort, which is not stable)
and takes the position of the ground truth in that order; ``ties="lavis"`` (default) does exactly that,
so tied scores are ordered however numpy's sort leaves them. ``ties="optimistic"`` ranks an item after
only the strictly higher scores, ``ties="pessimistic"`` after every other item with a score >= its own:
both are independent of the sort implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from vlkit.errors import DataError
from vlkit.metrics.classification import to_numpy

__all__ = ["recall_at_k", "retrieval_ranks", "retrieval_recall"]

TieRule = Literal["lavis", "optimistic", "pessimistic"]


def _check(sim: np.ndarray, gt: list[np.ndarray], what: str) -> None:
    if sim.ndim != 2:
        raise DataError(f"{what}: the similarity matrix must be 2-D, got shape {sim.shape}")
    if len(gt) != sim.shape[0]:
        raise DataError(f"{what}: {sim.shape[0]} rows but ground truth for {len(gt)} queries")
    for q, targets in enumerate(gt):
        if targets.size == 0:
            raise DataError(f"{what}: query {q} has no ground-truth item")
        if targets.min() < 0 or targets.max() >= sim.shape[1]:
            raise DataError(f"{what}: query {q} points at item {targets.tolist()} outside [0, {sim.shape[1]})")


def retrieval_ranks(
    sim: Any, ground_truth: Sequence[Sequence[int]], ties: TieRule = "lavis", chunk_size: int | None = None
) -> np.ndarray:
    """0-based rank of the best-ranked ground-truth item of every query (row of ``sim``).

    Args:
        sim: ``(Q, N)`` query-to-item similarities (numpy or torch).
        ground_truth: for each query, the indices of its correct items (one or more).
        ties: how equal scores are ordered (see the module docstring).
        chunk_size: rows handled at once; by default about 4M scores per chunk, which bounds memory.

    Returns:
        ``(Q,)`` int64 ranks; 0 means a correct item is the top result.
    """
    scores = to_numpy(sim)
    gt = [np.asarray(t, dtype=np.int64).reshape(-1) for t in ground_truth]
    _check(scores, gt, "retrieval")
    q, n = scores.shape
    if ties not in ("lavis", "optimistic", "pessimistic"):
        raise DataError(f"unknown tie rule {ties!r}; use 'lavis', 'optimistic' or 'pessimistic'")
    chunk_size = chunk_size or max(1, (1 << 22) // max(1, n))
    # Flatten the (query, item) ground-truth pairs so each chunk is handled with array operations only.
    counts = np.array([t.size for t in gt], dtype=np.int64)
    pair_query = np.repeat(np.arange(q), counts)
    pair_item = np.concatenate(gt)
    pair_rank = np.empty(pair_query.size, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for start in range(0, q, chunk_size):
        stop = min(q, start + chunk_size)
        block = scores[start:stop]  # (R, N)
        lo, hi = offsets[start], offsets[stop]
        rows, items = pair_query[lo:hi] - start, pair_item[lo:hi]
        target = block[rows, items][:, None]  # (P, 1): score of each ground-truth pair
        candidates = block[rows]  # (P, N): its query's row
        if ties == "pessimistic":
            pair_rank[lo:hi] = (candidates >= target).sum(axis=1) - 1
            continue
        higher = (candidates > target).sum(axis=1)
        pair_rank[lo:hi] = higher
        if ties == "optimistic":
            continue
        # LAVIS order: without another item of equal score (and without NaNs, which numpy sorts last and
        # so ranks first after the reversal) the position is just the number of higher scores. Only the
        # remaining queries are sorted, exactly as LAVIS does.
        needs_sort = ((candidates == target).sum(axis=1) > 1) | np.isnan(block).any(axis=1)[rows]
        if needs_sort.any():
            queries = np.unique(rows[needs_sort])
            order = np.argsort(block[queries], axis=1)[:, ::-1]  # ascending argsort, reversed
            position = np.empty_like(order)
            np.put_along_axis(position, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
            where = np.searchsorted(queries, rows[needs_sort])
            pair_rank[lo:hi][needs_sort] = position[where, items[needs_sort]]
    ranks = np.full(q, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(ranks, pair_query, pair_rank)
    return ranks


def _ranks_reference(sim: np.ndarray, ground_truth: Sequence[Sequence[int]]) -> np.ndarray:
    """LAVIS's per-query loop, kept as the reference the vectorised ranks are tested against."""
    ranks = np.zeros(sim.shape[0], dtype=np.int64)
    for index, score in enumerate(sim):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(int(np.where(inds == i)[0][0]) for i in ground_truth[index])
    return ranks


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose rank is below ``k``."""
    return 100.0 * float((np.asarray(ranks) < k).sum()) / len(ranks)


def retrieval_recall(
    sim_i2t: Any,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    sim_t2i: Any | None = None,
    ks: Sequence[int] = (1, 5, 10),
    ties: TieRule = "lavis",
) -> dict[str, float]:
    """LAVIS retrieval metrics from similarity matrices.

    Args:
        sim_i2t: ``(N_images, N_texts)`` image-to-text scores.
        img2txt: for each image, the indices of its captions.
        txt2img: for each caption, the index of its image.
        sim_t2i: ``(N_texts, N_images)`` text-to-image scores when they differ from ``sim_i2t.T`` (LAVIS
            re-ranks each direction separately); defaults to the transpose.
        ks: recall cut-offs.
        ties: how equal scores are ordered (see the module docstring).

    Returns:
        ``txt_r{k}`` (image→text), ``img_r{k}`` (text→image), ``txt_r_mean``, ``img_r_mean``, ``r_mean`` and
        ``agg_metrics`` (= ``txt_r_mean``), all in percent.

    Raises:
        DataError: shapes and ground truth that do not fit together.
    """
    i2t = to_numpy(sim_i2t)
    t2i = i2t.T if sim_t2i is None else to_numpy(sim_t2i)
    if i2t.ndim != 2 or t2i.shape != i2t.shape[::-1]:
        raise DataError(f"sim_t2i must have shape {i2t.shape[::-1]} (the transpose of sim_i2t), got {t2i.shape}")
    if len(txt2img) != i2t.shape[1]:
        raise DataError(f"txt2img has {len(txt2img)} entries but sim_i2t has {i2t.shape[1]} texts")
    txt_ranks = retrieval_ranks(i2t, img2txt, ties)
    img_ranks = retrieval_ranks(t2i, [[int(i)] for i in txt2img], ties)
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = recall_at_k(txt_ranks, k)
    for k in ks:
        out[f"img_r{k}"] = recall_at_k(img_ranks, k)
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out
