"""The task runners behind ``vlkit eval``: caption, VQA, retrieval and zero-shot classification over a
dataset, with the predictions in the official result formats and the official metrics.

Each runner takes a model-side callable (or model + tokenizer) and a dataset from :mod:`vlkit.data`, and
returns a :class:`TaskResult`. Model loading, file resolution and writing live in
:mod:`vlkit.evaluation.cli`.

Distributed runs (``torchrun``). The samples are cut into batches of ``batch_size`` consecutive samples,
exactly as one process would batch them, and batch ``b`` goes to rank ``b % world_size``: every batch has
the same composition as in a single-process run, so its outputs are the same numbers, and gathering the
records of all ranks and sorting them by sample position reproduces the single-process predictions (and
so the metrics). Retrieval encodes the whole gallery on every rank and splits the ITM re-ranking over the
ranks (:func:`vlkit.evaluation.retrieval.compute_sim_matrix`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlkit import distributed
from vlkit.data.collate import collate
from vlkit.data.datasets import CaptionDataset, ImageFolderDataset, RetrievalDataset, VQADataset
from vlkit.errors import DataError

__all__ = [
    "AGG_METRIC",
    "Answerer",
    "Captioner",
    "TaskResult",
    "gather_records",
    "predict_captions",
    "predict_classes",
    "predict_vqa",
    "run_caption",
    "run_classification",
    "run_retrieval",
    "run_vqa",
    "shard_batches",
]

#: Captioner: preprocessed images (B, 3, S, S) -> one caption per image.
Captioner = Callable[[Tensor], list[str]]
#: Answerer: images (B, 3, S, S) and one raw question per image -> one answer per image.
Answerer = Callable[[Tensor, list[str]], list[str]]
#: Class scorer: images (B, 3, S, S) -> (B, C) class logits.
ClassScorer = Callable[[Tensor], Tensor]

#: What ``agg_metrics`` is per task (what LAVIS selects checkpoints by); metrics.json records it.
AGG_METRIC = {
    "caption": "CIDEr + Bleu_4",
    "vqa": "overall",
    "retrieval": "txt_r_mean",
    "classification": "top1",
}

Record = tuple[int, Any]  # (position of the sample in the evaluated list, its result)


@dataclass
class TaskResult:
    """What a task runner produced (rank 0 holds the complete result; other ranks the same).

    Attributes:
        metrics: flat numbers (percent for accuracies and recalls; COCO scores as pycocoevalcap reports
            them); ``None`` for a metric that could not be computed (see ``details["unavailable"]``).
        predictions: per-sample outputs in the official result format (COCO caption results
            ``[{"image_id", "caption"}]``, VQA results ``[{"question_id", "answer"}]``, classification
            ``[{"image", "label", "prediction", "score", "top5"}]``); None for retrieval.
        details: breakdowns that are not single numbers (VQA per question/answer type, unavailable metrics).
        arrays: score matrices (retrieval ``i2t`` (Ni, Nt) / ``t2i`` (Nt, Ni); classification ``logits``).
        num_samples: images (caption, retrieval, classification) or questions (VQA) evaluated.
    """

    metrics: dict[str, float | None]
    predictions: list[dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    num_samples: int = 0


# ----------------------------------------------------------------------------------------------------------
# Sharding and gathering
# ----------------------------------------------------------------------------------------------------------


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of positions ``0..n-1``.

    The positions are cut into consecutive batches of ``batch_size`` (the last may be shorter), as a single
    process would batch them, and batch ``b`` belongs to rank ``b % world_size``.

    Raises:
        DataError: batch_size < 1 or a rank outside ``[0, world_size)``.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside [0, {world_size})")
    batches = [list(range(start, min(n, start + batch_size))) for start in range(0, n, batch_size)]
    return batches[rank::world_size]


def gather_records(records: Sequence[Record]) -> list[Record]:
    """All ranks' ``(position, result)`` records, sorted by position (every rank gets the full list).

    Without a process group (or with one process) this only sorts. Positions must be distinct across ranks.
    """
    everything: list[Record] = list(records)
    if distributed.world_size() > 1:
        parts: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(parts, list(records))
        everything = [record for part in parts for record in part]
    everything.sort(key=lambda record: record[0])
    positions = [p for p, _ in everything]
    if len(set(positions)) != len(positions):
        raise DataError("two ranks evaluated the same sample (the shards overlap)")
    return everything


class _Positions(Dataset):
    """``dataset[indices[p]]`` at position ``p``, returned with ``p`` so results can be put back in order."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, Any]:
        return position, self.dataset[self.indices[position]]


def _collate_positions(items: Sequence[tuple[int, Any]]) -> tuple[list[int], dict[str, Any] | None]:
    kept = [(p, s) for p, s in items if s is not None]  # None: an unreadable image skipped by the dataset
    return [p for p, _ in kept], collate([s for _, s in kept])


def _progress_enabled(progress: bool) -> bool:
    return progress and distributed.rank() == 0


def _sharded(
    dataset: Dataset,
    indices: Sequence[int],
    fn: Callable[[dict[str, Any]], Sequence[Any]],
    *,
    batch_size: int,
    num_workers: int,
    rank: int | None,
    world_size: int | None,
    desc: str,
    progress: bool,
) -> list[Record]:
    """Run ``fn`` over this rank's batches of ``dataset[indices]``; returns ``(position, output)`` records."""
    rank = distributed.rank() if rank is None else rank
    world_size = distributed.world_size() if world_size is None else world_size
    batches = shard_batches(len(indices), batch_size, rank, world_size)
    loader = DataLoader(
        _Positions(dataset, indices), batch_sampler=batches, collate_fn=_collate_positions, num_workers=num_workers
    )
    records: list[Record] = []
    bar = tqdm(loader, desc=desc, total=len(batches), disable=not _progress_enabled(progress), leave=False)
    for positions, batch in bar:
        if batch is None:
            continue
        outputs = list(fn(batch))
        if len(outputs) != len(positions):
            raise DataError(f"{desc}: {len(positions)} samples in a batch but {len(outputs)} outputs")
        records.extend(zip(positions, outputs))
    return records


def _limited(n: int, limit: int | None) -> int:
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    return n if limit is None else min(n, limit)


# ----------------------------------------------------------------------------------------------------------
# Captioning (COCO caption evaluation)
# ----------------------------------------------------------------------------------------------------------


def caption_images(dataset: CaptionDataset, limit: int | None = None) -> list[int]:
    """Indices of the images to caption: the first entry of every distinct image id, in file order,
    cut at ``limit`` (COCO results hold one caption per image).

    Raises:
        DataError: a training file (one caption per entry) instead of an evaluation file.
    """
    if not dataset.is_eval:
        raise DataError(
            "caption evaluation needs a val/test annotation file (one entry per image with a list of "
            "captions), not a training file (one caption per entry)"
        )
    seen: set[int] = set()
    indices = []
    for index, ann in enumerate(dataset.annotation):
        if ann["image_id"] not in seen:
            seen.add(ann["image_id"])
            indices.append(index)
    return indices[: _limited(len(indices), limit)]


def predict_captions(
    captioner: Captioner,
    dataset: CaptionDataset,
    indices: Sequence[int],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> list[Record]:
    """This rank's ``(position, {"image_id", "caption"})`` records for ``dataset[indices]``."""

    def step(batch: dict[str, Any]) -> list[dict[str, Any]]:
        captions = captioner(batch["image"])
        return [{"image_id": int(i), "caption": c} for i, c in zip(batch["image_id"].tolist(), captions)]

    return _sharded(
        dataset,
        indices,
        step,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        desc="caption",
        progress=progress,
    )


def run_caption(
    captioner: Captioner,
    dataset: CaptionDataset,
    references: Mapping[Hashable, Sequence[str]] | None = None,
    *,
    metrics: Sequence[str] | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Caption every image of an eval-split caption file and score the captions as ``COCOEvalCap`` does.

    Args:
        captioner: images -> captions (Q-Former or LLM captioning with the chosen settings).
        dataset: an eval-split :class:`~vlkit.data.datasets.CaptionDataset` (image ids from file names).
        references: ``{image_id: [caption, ...]}`` (a COCO ground-truth file); default: the caption lists
            of the annotation file itself.
        metrics: COCO metric names (default: all of :data:`vlkit.metrics.caption.CAPTION_METRICS`;
            unavailable ones, such as SPICE without CoreNLP, are ``None`` with the reason in ``details``).
        batch_size: images per generation call.
        limit: caption only the first ``limit`` images.
        num_workers: DataLoader workers.
        progress: tqdm bar on rank 0.

    Returns:
        COCO scores plus ``agg_metrics`` = CIDEr + Bleu_4 (LAVIS), the COCO results list as predictions.
    """
    from vlkit.metrics.caption import CAPTION_METRICS, evaluate_captions

    indices = caption_images(dataset, limit)
    local = predict_captions(
        captioner, dataset, indices, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    predictions = [record for _, record in gather_records(local)]
    if not predictions:
        raise DataError("no image could be captioned (every image was skipped)")
    if references is None:
        references = {ann["image_id"]: ann["captions"] for ann in dataset.annotation}
    evaluation = evaluate_captions(
        {p["image_id"]: p["caption"] for p in predictions},
        references,
        tuple(metrics) if metrics is not None else CAPTION_METRICS,
    )
    scores: dict[str, float | None] = dict(evaluation.scores)
    if scores.get("CIDEr") is not None and scores.get("Bleu_4") is not None:
        scores["agg_metrics"] = scores["CIDEr"] + scores["Bleu_4"]  # type: ignore[operator]
    details = {"unavailable": dict(evaluation.unavailable)} if evaluation.unavailable else {}
    return TaskResult(scores, predictions, details, num_samples=len(predictions))


# ----------------------------------------------------------------------------------------------------------
# VQA (official VQAv2 accuracy)
# ----------------------------------------------------------------------------------------------------------


def predict_vqa(
    answerer: Answerer,
    dataset: VQADataset,
    indices: Sequence[int],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> list[Record]:
    """This rank's ``(position, {"question_id", "answer"})`` records for ``dataset[indices]``."""

    def step(batch: dict[str, Any]) -> list[dict[str, Any]]:
        answers = answerer(batch["image"], list(batch["question"]))
        return [{"question_id": int(q), "answer": a} for q, a in zip(batch["question_id"].tolist(), answers)]

    return _sharded(
        dataset,
        indices,
        step,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        desc="vqa",
        progress=progress,
    )


def run_vqa(
    answerer: Answerer,
    dataset: VQADataset,
    annotations: Mapping[Hashable, Any] | None = None,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Answer every question of a VQAv2-format split and score the answers with the official accuracy.

    Args:
        answerer: images + raw questions -> answers.
        dataset: a :class:`~vlkit.data.datasets.VQADataset` (raw questions: the answerer normalises them).
        annotations: ``{question_id: annotation}`` (:func:`vlkit.metrics.vqa.load_vqa_annotations`); None
            (test-dev style questions without answers) gives predictions and no metrics.
        batch_size: questions per generation call.
        limit: answer only the first ``limit`` questions.
        num_workers: DataLoader workers.
        progress: tqdm bar on rank 0.

    Returns:
        ``overall``, the accuracy of every answer type (keys "yes/no", "number", "other") and ``agg_metrics``
        (= overall), in percent; per question type and
        per answer type in ``details``; the VQA results list as predictions.
    """
    from vlkit.metrics.vqa import vqa_accuracy

    indices = list(range(_limited(len(dataset), limit)))
    local = predict_vqa(answerer, dataset, indices, batch_size=batch_size, num_workers=num_workers, progress=progress)
    predictions = [record for _, record in gather_records(local)]
    if not predictions:
        raise DataError("no question could be answered (every image was skipped)")
    if annotations is None:
        return TaskResult({}, predictions, {"note": "no annotations: predictions only"}, num_samples=len(predictions))
    evaluation = vqa_accuracy({p["question_id"]: p["answer"] for p in predictions}, annotations)
    metrics: dict[str, float | None] = {"overall": evaluation.overall}
    metrics.update(sorted(evaluation.per_answer_type.items()))  # "yes/no", "number", "other", as LAVIS reports
    metrics["agg_metrics"] = evaluation.overall
    details = {
        "per_answer_type": dict(sorted(evaluation.per_answer_type.items())),
        "per_question_type": dict(sorted(evaluation.per_question_type.items())),
    }
    return TaskResult(metrics, predictions, details, num_samples=len(predictions))


# ----------------------------------------------------------------------------------------------------------
# Retrieval (LAVIS compute_sim_matrix + Recall@K)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Gallery:
    """The images and texts of a retrieval evaluation, and their ground truth.

    Attributes:
        images: dataset indices of the gallery images, in gallery order.
        texts: every caption of those images (processed), in gallery order.
        img2txt: for each gallery image, the indices of its texts.
        txt2img: for each text, the gallery index of its image.
    """

    images: list[int]
    texts: list[str]
    img2txt: list[list[int]]
    txt2img: list[int]


def retrieval_gallery(dataset: RetrievalDataset, limit: int | None = None) -> Gallery:
    """The gallery of an eval-split retrieval dataset, cut to its first ``limit`` images (with their texts)."""
    if not dataset.is_eval:
        raise DataError(
            "retrieval evaluation needs a val/test annotation file (one entry per image with a list of "
            "captions), not a training file (one caption per entry)"
        )
    n = _limited(len(dataset.image), limit)
    texts: list[str] = []
    img2txt: list[list[int]] = []
    txt2img: list[int] = []
    for image in range(n):
        own = []
        for t in dataset.img2txt[image]:
            own.append(len(texts))
            txt2img.append(image)
            texts.append(dataset.text[t])
        img2txt.append(own)
    return Gallery(list(range(n)), texts, img2txt, txt2img)


def run_retrieval(
    model: Any,
    tokenizer: Any,
    dataset: RetrievalDataset,
    *,
    k_test: int = 128,
    batch_size: int = 16,
    itm_batch_size: int = 128,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Image-text retrieval with a stage-1 BLIP-2 (ITC similarity, top-``k_test`` ITM re-ranking).

    Args:
        model: a stage-1 :class:`~vlkit.models.blip2.Blip2` with ITC/ITM heads.
        tokenizer: its Q-Former tokenizer.
        dataset: an eval-split :class:`~vlkit.data.datasets.RetrievalDataset` (texts already processed).
        k_test: candidates re-ranked with ITM per query (LAVIS: 128).
        batch_size: images per encoder pass.
        itm_batch_size: (image, text) pairs per ITM pass.
        limit: use only the first ``limit`` images and their captions.
        num_workers: DataLoader workers.
        progress: tqdm bars on rank 0.

    Returns:
        Recall@1/5/10 both ways, means and ``agg_metrics`` (= ``txt_r_mean``); ``i2t``/``t2i`` arrays.
    """
    from torch.utils.data import Subset

    from vlkit.evaluation.retrieval import compute_sim_matrix
    from vlkit.metrics.retrieval import retrieval_recall

    gallery = retrieval_gallery(dataset, limit)
    loader = DataLoader(
        Subset(dataset, gallery.images),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )
    scores = compute_sim_matrix(
        model,
        tokenizer,
        loader,
        gallery.texts,
        k_test=k_test,
        image_batch_size=batch_size,
        itm_batch_size=itm_batch_size,
        progress=_progress_enabled(progress),
    )
    i2t, t2i = scores.numpy()
    metrics: dict[str, float | None] = dict(retrieval_recall(i2t, gallery.img2txt, gallery.txt2img, sim_t2i=t2i))
    details = {"images": len(gallery.images), "texts": len(gallery.texts)}
    return TaskResult(metrics, None, details, {"i2t": i2t, "t2i": t2i}, num_samples=len(gallery.images))


# ----------------------------------------------------------------------------------------------------------
# Zero-shot classification (top-1 / top-5)
# ----------------------------------------------------------------------------------------------------------


def predict_classes(
    scorer: ClassScorer,
    dataset: ImageFolderDataset,
    indices: Sequence[int],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> list[Record]:
    """This rank's ``(position, (logits (C,) float32 numpy, label))`` records for ``dataset[indices]``."""

    def step(batch: dict[str, Any]) -> list[tuple[np.ndarray, int]]:
        logits = scorer(batch["image"]).float().cpu().numpy()
        return list(zip(logits, batch["label"].tolist()))

    return _sharded(
        dataset,
        indices,
        step,
        batch_size=batch_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        desc="classify",
        progress=progress,
    )


def run_classification(
    scorer: ClassScorer,
    dataset: ImageFolderDataset,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> TaskResult:
    """Classify every image of a class-folder dataset and report top-1 / top-5 accuracy.

    Args:
        scorer: images -> (B, C) logits over ``dataset.classes`` (e.g. ITC similarity / temperature).
        dataset: an :class:`~vlkit.data.datasets.ImageFolderDataset`.
        batch_size: images per pass.
        limit: classify only the first ``limit`` images (in the dataset's class-then-file order).
        num_workers: DataLoader workers.
        progress: tqdm bar on rank 0.

    Returns:
        ``top1``, ``top5`` (percent; top-C with fewer than 5 classes) and ``agg_metrics`` (= top1);
        predictions ``[{"image", "label", "prediction", "score", "top5"}]`` (score: softmax probability of
        the prediction); the (N, C) ``logits`` array.
    """
    from vlkit.metrics.classification import topk_accuracy

    indices = list(range(_limited(len(dataset), limit)))
    local = predict_classes(scorer, dataset, indices, batch_size=batch_size, num_workers=num_workers, progress=progress)
    records = gather_records(local)
    if not records:
        raise DataError("no image could be classified (every image was skipped)")
    logits = np.stack([row for _, (row, _) in records]).astype(np.float32)  # (N, C)
    labels = np.array([label for _, (_, label) in records], dtype=np.int64)
    if logits.shape[1] != len(dataset.classes):
        raise DataError(f"the scorer gave {logits.shape[1]} scores per image for {len(dataset.classes)} classes")
    metrics: dict[str, float | None] = dict(topk_accuracy(logits, labels, topk=(1, 5)))
    metrics["agg_metrics"] = metrics["top1"]
    probs = torch.from_numpy(logits).softmax(dim=-1)
    top = probs.topk(min(5, probs.shape[1]), dim=-1)
    predictions = []
    for (position, (_, label)), values, classes in zip(records, top.values.tolist(), top.indices.tolist()):
        predictions.append(
            {
                "image": dataset.samples[indices[position]][0],
                "label": dataset.classes[label],
                "prediction": dataset.classes[classes[0]],
                "score": values[0],
                "top5": [dataset.classes[c] for c in classes],
            }
        )
    return TaskResult(metrics, predictions, {"classes": len(dataset.classes)}, {"logits": logits}, len(predictions))
