"""Batching: stack pixel tensors, keep text as lists, and (in :class:`TextCollator`) tokenise and pad.

Samples are the dataclasses of :mod:`vlkit.data.datasets`. ``None`` samples (images skipped with
``skip_bad_images=True``) are dropped; a batch with no sample left collates to ``None``, which training and
evaluation loops skip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from vlkit.data.datasets import VQASample
from vlkit.errors import DataError

Batch = dict[str, Any]


def collate(samples: Sequence[Any | None]) -> Batch | None:
    """Collate dataclass samples into a dict of batched fields.

    Tensor fields are stacked (e.g. ``image`` -> (B, 3, S, S)); int fields become a LongTensor (B,);
    everything else (text, lists of answers or captions) becomes a Python list of length B.

    Returns:
        The batch, or None when every sample was None.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    kind = type(kept[0])
    if not dataclasses.is_dataclass(kind):
        raise DataError(f"collate expects dataclass samples, got {kind.__name__}")
    if any(type(s) is not kind for s in kept):
        raise DataError(f"cannot collate a mix of sample types: {sorted({type(s).__name__ for s in kept})}")
    batch: Batch = {}
    for field in dataclasses.fields(kind):
        values = [getattr(s, field.name) for s in kept]
        if all(isinstance(v, Tensor) for v in values):
            batch[field.name] = torch.stack(values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            batch[field.name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[field.name] = values
    return batch


def collate_vqa(samples: Sequence[VQASample | None]) -> Batch | None:
    """Collate VQA samples the way LAVIS's VQA training expects.

    Returns:
        ``image`` (B, 3, S, S); ``question`` list[str]; ``answer`` flat list of every sample's distinct
        answers; ``weight`` (sum n_answers,) float; ``n_answers`` (B,) long; ``question_id`` and
        ``image_id`` (B,) long; ``question_type``/``answer_type`` lists. None when every sample was None.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        return None
    return {
        "image": torch.stack([s.image for s in kept]),
        "question": [s.question for s in kept],
        "answer": [a for s in kept for a in s.answers],
        "weight": torch.tensor([w for s in kept for w in s.weights], dtype=torch.float32),
        "n_answers": torch.tensor([len(s.answers) for s in kept], dtype=torch.long),
        "question_id": torch.tensor([s.question_id for s in kept], dtype=torch.long),
        "image_id": torch.tensor([s.image_id for s in kept], dtype=torch.long),
        "question_type": [s.question_type for s in kept],
        "answer_type": [s.answer_type for s in kept],
    }


class Tokenizer(Protocol):
    """What :class:`TextCollator` needs: :class:`vlkit.processors.QFormerTokenizer` is one."""

    def __call__(
        self,
        texts: Sequence[str],
        padding: Literal["longest", "max_length"] = ...,
        max_length: int | None = ...,
        truncation: bool = ...,
    ) -> tuple[Tensor, Tensor]: ...


class TextCollator:
    """Collate, then tokenise the named text fields with a tokenizer that pads.

    For each field ``f`` the batch gains ``f"{f}_ids"`` and ``f"{f}_mask"`` (int64, (B, L)); the text list
    itself is kept.

    Args:
        tokenizer: callable ``(texts, padding=, max_length=, truncation=) -> (ids, mask)``.
        fields: text fields to tokenise (e.g. ``("text",)``, ``("question",)``, ``("instruction", "response")``).
        max_length: length limit in tokens (None: no truncation).
        padding: "longest" (per batch) or "max_length".
        base: the collate function that builds the batch first (:func:`collate` or :func:`collate_vqa`).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        fields: Sequence[str] = ("text",),
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
        base: Any = collate,
    ) -> None:
        self.tokenizer = tokenizer
        self.fields = tuple(fields)
        self.max_length = max_length
        self.padding = padding
        self.base = base

    def __call__(self, samples: Sequence[Any | None]) -> Batch | None:
        batch = self.base(samples)
        if batch is None:
            return None
        for field in self.fields:
            if field not in batch:
                raise DataError(f"batch has no text field {field!r} (fields: {', '.join(batch)})")
            ids, mask = self.tokenizer(
                batch[field], padding=self.padding, max_length=self.max_length, truncation=self.max_length is not None
            )
            batch[f"{field}_ids"], batch[f"{field}_mask"] = ids, mask
        return batch
