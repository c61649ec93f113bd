"""Classification metrics: top-k accuracy from logits and exact-match accuracy of strings.

Arrays may be numpy arrays or torch tensors (any device; converted to numpy on the CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vlkit.errors import DataError

__all__ = ["exact_match_accuracy", "to_numpy", "topk_accuracy"]


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor (bf16 becomes fp32) or nested sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def topk_accuracy(logits: Any, labels: Any, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent.

    A sample counts for top-k when fewer than ``k`` classes rank above its label, classes being ordered
    by score, and equal scores by class index (so top-1 agrees with ``argmax``, which picks the first
    maximum). ``k`` larger than the number of classes counts every sample.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` integer class indices.
        topk: the ``k`` values to report.

    Returns:
        ``{"top1": ..., "top5": ...}`` (one entry per ``k``).

    Raises:
        DataError: wrong shapes, labels out of range, non-finite scores or an empty batch.
    """
    scores = to_numpy(logits)
    target = to_numpy(labels)
    if scores.ndim != 2:
        raise DataError(f"logits must be (N, C), got shape {scores.shape}")
    if target.shape != (scores.shape[0],):
        raise DataError(f"labels must be ({scores.shape[0]},) to match logits {scores.shape}, got {target.shape}")
    if scores.shape[0] == 0:
        raise DataError("no samples to score")
    if not np.issubdtype(target.dtype, np.integer):
        raise DataError(f"labels must be integers, got {target.dtype}")
    n, c = scores.shape
    if target.min() < 0 or target.max() >= c:
        raise DataError(f"labels must lie in [0, {c}), got range [{target.min()}, {target.max()}]")
    if not np.isfinite(scores).all():
        raise DataError("logits contain NaN or infinite values")
    if any(k < 1 for k in topk):
        raise DataError(f"top-k values must be >= 1, got {list(topk)}")
    label_score = scores[np.arange(n), target][:, None]  # (N, 1)
    above = (scores > label_score).sum(axis=1)  # (N,)
    tied_before = ((scores == label_score) & (np.arange(c)[None, :] < target[:, None])).sum(axis=1)
    rank = above + tied_before  # 0 = the label is the top prediction
    return {f"top{k}": 100.0 * float((rank < k).sum()) / n for k in topk}


def exact_match_accuracy(
    predictions: Sequence[str],
    targets: Sequence[str],
    normalize: Callable[[str], str] | None = None,
    normalize_targets: bool = True,
) -> float:
    """Percentage of predictions equal to their target string.

    Args:
        predictions: predicted strings.
        targets: ground-truth strings, same length.
        normalize: optional function applied to predictions (and targets, see below) before comparing.
        normalize_targets: apply ``normalize`` to the targets too.

    Raises:
        DataError: different lengths, nothing to score, or non-string items.
    """
    if len(predictions) != len(targets):
        raise DataError(f"{len(predictions)} predictions but {len(targets)} targets")
    if len(predictions) == 0:
        raise DataError("no predictions to score")
    hits = 0
    for i, (pred, target) in enumerate(zip(predictions, targets)):
        if not isinstance(pred, str) or not isinstance(target, str):
            raise DataError(f"item {i}: predictions and targets must be strings, got {pred!r} and {target!r}")
        if normalize is not None:
            pred = normalize(pred)
            if normalize_targets:
                target = normalize(target)
        hits += pred == target
    return 100.0 * hits / len(predictions)
