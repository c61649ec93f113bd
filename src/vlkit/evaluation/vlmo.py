"""VLMo evaluation: VQA (official accuracy, the reference's VQA score, mean latency per sample), NLVR2
accuracy, and image-text retrieval recall with the dual encoder (optionally re-ranked by ITM).

The functions take a model and a dataset and do nothing else: batching with a DataLoader, a tqdm bar, an
optional split of the model over devices (``devices=["cuda:0", "cuda:1"]``: first half of the blocks on the
first, the rest on the second; outputs are identical to one device). :func:`evaluate_vlmo` is the file-level
entry point — a model folder or unilm checkpoint plus a data source — that ``vlkit eval`` wraps.

VQA results are written in the official format (``[{"question_id", "answer"}]``). Latency is reported as
the seed's "mean of cost": the model's forward time per sample (each batch's time divided by its size,
averaged over samples), without data loading; ``batch_size=1`` measures single-request latency.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlkit.config import from_dict
from vlkit.data.vlmo import (
    NLVR2Collator,
    NLVR2Source,
    RetrievalSource,
    VQACollator,
    VQASource,
)
from vlkit.data.vlmo_text import VLMoTokenizer
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.errors import ConfigError, DataError
from vlkit.models.vlmo import VLMo

TaskName = Literal["vqa", "nlvr2", "retrieval"]
VQA_PREDICTIONS_FILE = "vqa_predictions.json"


@dataclass
class EvalResult:
    """What an evaluation produced.

    Attributes:
        metrics: flat numbers (percentages for accuracies and recalls, milliseconds for latencies).
        predictions: per-sample outputs (VQA: the official results list ``{"question_id", "answer"}``;
            NLVR2: ``{"identifier", "prediction", "label", "table"}``).
        details: breakdowns that are not single numbers (accuracy per question type, ...).
    """

    metrics: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- helpers


def _prepare(model: VLMo, devices: Sequence[str | torch.device] | None) -> VLMo:
    if not isinstance(model, VLMo):
        raise ConfigError(f"expected a VLMo model, got {type(model).__name__}")
    if devices:
        model.split_devices(devices)
    return model.eval()


def _sync(model: VLMo) -> None:
    """Wait for queued GPU work on every device the model uses (for honest timings)."""
    if torch.cuda.is_available():
        for device in {p.device for p in model.parameters() if p.device.type == "cuda"}:
            torch.cuda.synchronize(device)


def _loader(dataset: Dataset, batch_size: int, collate: Any, num_workers: int) -> DataLoader:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)


class _Timer:
    """Accumulates model time per sample."""

    def __init__(self) -> None:
        self.per_sample: list[float] = []
        self.start = time.perf_counter()

    def add(self, seconds: float, n: int) -> None:
        self.per_sample += [seconds / n] * n

    def metrics(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start
        n = len(self.per_sample)
        return {
            "mean_cost_ms": 1000.0 * float(np.mean(self.per_sample)) if n else float("nan"),
            "samples_per_second": n / wall if wall > 0 else float("nan"),
            "num_samples": float(n),
        }


# ---------------------------------------------------------------------------------------------------- VQA


@torch.no_grad()
def evaluate_vqa(
    model: VLMo,
    dataset: Dataset,
    tokenizer: VLMoTokenizer,
    vocab: VQAVocab,
    *,
    annotations: Sequence[str | os.PathLike] | Mapping[Any, Any] | None = None,
    batch_size: int = 64,
    devices: Sequence[str | torch.device] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    output: str | os.PathLike | None = None,
) -> EvalResult:
    """Answer every question with the classifier's arg-max and score the answers.

    Args:
        model: a VLMo with a VQA head of ``len(vocab)`` answers.
        dataset: :class:`~vlkit.data.vlmo.VLMoVQASample` items (``VQASource.open``).
        tokenizer: the model's tokenizer (pads to ``model.config.max_text_len``).
        vocab: label -> answer.
        annotations: official VQAv2 annotation files (or a ``{question_id: answers}`` map) for the official
            accuracy; None: only the reference's VQA score from the samples' soft targets.
        batch_size: questions per forward pass.
        devices: split the model over these devices first (in place).
        num_workers: DataLoader workers.
        progress: show a tqdm bar.
        output: folder to write ``vqa_predictions.json`` (official results format) into.

    Returns:
        :class:`EvalResult` with ``vqa_accuracy`` (official, %, when annotations are given) and per answer
        type ``vqa_accuracy_<type>``, ``vqa_score`` (%, the reference's metric over questions that have an
        in-vocabulary answer), ``mean_cost_ms``, ``samples_per_second``, ``num_samples``.
    """
    from vlkit.metrics.vqa import load_vqa_annotations, vqa_accuracy

    model = _prepare(model, devices)
    if model.vqa_head is None or model.config.vqa_num_labels != len(vocab):
        raise ConfigError(
            f"the model's VQA head has {model.config.vqa_num_labels if model.vqa_head is not None else 'no'} "
            f"labels but the answer vocabulary has {len(vocab)}"
        )
    predictions: list[dict[str, Any]] = []
    scores: list[float] = []
    timer = _Timer()
    for batch in tqdm(
        _loader(dataset, batch_size, VQACollator(tokenizer, len(vocab)), num_workers),
        desc="vqa",
        disable=not progress,
        unit="batch",
    ):
        if batch is None:
            continue
        start = time.perf_counter()
        logits = model(batch["text_ids"], batch["text_mask"], batch["image"], head="vqa")
        _sync(model)
        timer.add(time.perf_counter() - start, len(batch["question"]))
        best = logits.float().argmax(dim=1).cpu()  # (B,)
        targets = batch["targets"]
        answerable = targets.sum(dim=1) > 0
        picked = targets.gather(1, best[:, None]).squeeze(1)
        scores += picked[answerable].tolist()
        for qid, label in zip(batch["question_id"].tolist(), best.tolist()):
            predictions.append({"question_id": qid, "answer": vocab.answer(label)})
    metrics = timer.metrics()
    details: dict[str, Any] = {}
    if scores:
        metrics["vqa_score"] = 100.0 * float(np.mean(scores))
    if annotations is not None:
        if isinstance(annotations, Mapping):
            ground_truth = dict(annotations)
        else:
            ground_truth = {}
            for path in annotations:
                ground_truth.update(load_vqa_annotations(path))
        evaluation = vqa_accuracy({p["question_id"]: p["answer"] for p in predictions}, ground_truth)
        metrics["vqa_accuracy"] = evaluation.overall
        for answer_type, value in evaluation.per_answer_type.items():
            metrics[f"vqa_accuracy_{answer_type}"] = value
        details["per_question_type"] = evaluation.per_question_type
        details["per_answer_type"] = evaluation.per_answer_type
    if output is not None:
        from vlkit.metrics.report import write_json

        details["predictions_file"] = str(write_json(Path(output) / VQA_PREDICTIONS_FILE, predictions, indent=None))
    return EvalResult(metrics, predictions, details)


# -------------------------------------------------------------------------------------------------- NLVR2


@torch.no_grad()
def evaluate_nlvr2(
    model: VLMo,
    dataset: Dataset,
    tokenizer: VLMoTokenizer,
    *,
    batch_size: int = 64,
    devices: Sequence[str | torch.device] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> EvalResult:
    """NLVR2 accuracy, overall and per source table (the reference reports ``nlvr2_dev`` and ``nlvr2_test1``
    apart).

    Returns:
        :class:`EvalResult` with ``accuracy`` and ``accuracy_<table>`` (%), ``mean_cost_ms``, ... and one
        prediction per statement.
    """
    model = _prepare(model, devices)
    predictions: list[dict[str, Any]] = []
    timer = _Timer()
    for batch in tqdm(
        _loader(dataset, batch_size, NLVR2Collator(tokenizer), num_workers),
        desc="nlvr2",
        disable=not progress,
        unit="batch",
    ):
        if batch is None:
            continue
        start = time.perf_counter()
        logits = model(batch["text_ids"], batch["text_mask"], batch["image_0"], head="nlvr2", image_1=batch["image_1"])
        _sync(model)
        timer.add(time.perf_counter() - start, len(batch["labels"]))
        guesses = logits.float().argmax(dim=1).cpu().tolist()
        for ident, guess, label, table in zip(batch["identifier"], guesses, batch["labels"].tolist(), batch["table"]):
            predictions.append({"identifier": ident, "prediction": guess, "label": label, "table": table})
    if not predictions:
        raise DataError("no NLVR2 samples to evaluate")
    metrics = timer.metrics()
    metrics["accuracy"] = 100.0 * float(np.mean([p["prediction"] == p["label"] for p in predictions]))
    for table in sorted({p["table"] for p in predictions}):
        rows = [p["prediction"] == p["label"] for p in predictions if p["table"] == table]
        metrics[f"accuracy_{table}"] = 100.0 * float(np.mean(rows))
    return EvalResult(metrics, predictions)


# ---------------------------------------------------------------------------------------------- retrieval


def _gallery_images(dataset: Any, batch_size: int, num_workers: int) -> DataLoader:
    def collate(samples: list[Any]) -> dict[str, Tensor]:
        kept = [s for s in samples if s is not None]
        if len(kept) != len(samples):
            raise DataError("retrieval evaluation cannot skip images: every gallery image must load")
        return {"image": torch.stack([s.image for s in kept]), "index": torch.tensor([s.index for s in kept])}

    return _loader(dataset, batch_size, collate, num_workers)


@torch.no_grad()
def retrieval_scores(
    model: VLMo,
    dataset: Any,
    tokenizer: VLMoTokenizer,
    *,
    batch_size: int = 64,
    itm_rerank_k: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Tensor, Tensor, _Timer]:
    """Image-to-text and text-to-image score matrices of a gallery (see :func:`evaluate_retrieval`).

    Returns:
        ``(scores_i2t (N_img, N_txt), scores_t2i (N_txt, N_img), timer)`` on the CPU, float32.
    """
    if model.itc_text_proj is None:
        raise ConfigError("retrieval needs a model with ITC projections (heads 'irtr' or 'itc')")
    timer = _Timer()
    text_feats, image_feats, all_ids, all_masks, all_images = [], [], [], [], []
    texts = list(dataset.text)
    for start in tqdm(range(0, len(texts), batch_size), desc="texts", disable=not progress, unit="batch"):
        ids, mask = tokenizer(texts[start : start + batch_size])
        t0 = time.perf_counter()
        text_feats.append(model(ids, mask, None, head="contrastive").text.cls_feats.float().cpu())
        _sync(model)
        timer.add(time.perf_counter() - t0, ids.shape[0])
        if itm_rerank_k:
            all_ids.append(ids)
            all_masks.append(mask)
    order: list[int] = []
    for batch in tqdm(
        _gallery_images(dataset, batch_size, num_workers), desc="images", disable=not progress, unit="batch"
    ):
        t0 = time.perf_counter()
        image_feats.append(model(None, None, batch["image"], head="contrastive").image.cls_feats.float().cpu())
        _sync(model)
        timer.add(time.perf_counter() - t0, batch["image"].shape[0])
        order += batch["index"].tolist()
        if itm_rerank_k:
            all_images.append(batch["image"])
    if order != list(range(len(order))):
        raise DataError("gallery images must come in index order")
    sims = torch.cat(image_feats) @ torch.cat(text_feats).t()  # (N_img, N_txt) cosine, no temperature
    if not itm_rerank_k:
        return sims, sims.t().contiguous(), timer
    if model.itm_head is None:
        raise ConfigError("ITM re-ranking needs a model with an ITM head")
    ids, masks, images = torch.cat(all_ids), torch.cat(all_masks), torch.cat(all_images)
    k_txt, k_img = min(itm_rerank_k, sims.shape[1]), min(itm_rerank_k, sims.shape[0])
    # The reference: -100 everywhere, the ITM "match" logit for the top-k candidates, then + the ITC score.
    i2t = torch.full_like(sims, -100.0)
    for i in tqdm(range(sims.shape[0]), desc="itm rerank i2t", disable=not progress, unit="img"):
        top = sims[i].topk(k_txt).indices
        i2t[i, top] = _itm_scores(
            model, ids[top], masks[top], images[i : i + 1].expand(len(top), -1, -1, -1), batch_size
        )
    t2i = torch.full_like(sims.t(), -100.0)
    for t in tqdm(range(sims.shape[1]), desc="itm rerank t2i", disable=not progress, unit="text"):
        top = sims[:, t].topk(k_img).indices
        t2i[t, top] = _itm_scores(
            model, ids[t : t + 1].expand(len(top), -1), masks[t : t + 1].expand(len(top), -1), images[top], batch_size
        )
    return i2t + sims, t2i + sims.t(), timer


def _itm_scores(model: VLMo, ids: Tensor, mask: Tensor, images: Tensor, batch_size: int) -> Tensor:
    out = []
    for s in range(0, ids.shape[0], batch_size):
        out.append(
            model(ids[s : s + batch_size], mask[s : s + batch_size], images[s : s + batch_size], head="itm")[:, 1]
        )
    return torch.cat(out).float().cpu()


@torch.no_grad()
def evaluate_retrieval(
    model: VLMo,
    dataset: Any,
    tokenizer: VLMoTokenizer,
    *,
    batch_size: int = 64,
    itm_rerank_k: int = 0,
    devices: Sequence[str | torch.device] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Recall@1/5/10 of the dual encoder on a gallery, as the reference's ``compute_irtr_recall``.

    Texts and images are encoded separately (text-only and image-only passes, L2-normalised ITC
    projections) and ranked by cosine similarity. With ``itm_rerank_k`` > 0 the top k candidates of every
    query are re-scored with the ITM head's "match" logit added to the cosine, and the rest get -100 + cosine
    (the reference's ``compute_irtr_recall_with_rerank``).

    Args:
        dataset: the gallery: ``text`` (captions), ``img2txt``, ``txt2img`` and ``dataset[i]`` = image ``i``
            (``RetrievalSource.open(..., train=False)``).

    Returns:
        :class:`EvalResult` with ``txt_r1/5/10`` (image->text, the reference's TR@k), ``img_r1/5/10`` (IR@k),
        their means, ``r_mean`` (%), and the encoding latency ``mean_cost_ms``.
    """
    from vlkit.metrics.retrieval import retrieval_recall

    model = _prepare(model, devices)
    for attribute in ("text", "img2txt", "txt2img"):
        if not hasattr(dataset, attribute):
            raise DataError(f"a retrieval gallery needs {attribute!r} (open the source with train=False)")
    i2t, t2i, timer = retrieval_scores(
        model,
        dataset,
        tokenizer,
        batch_size=batch_size,
        itm_rerank_k=itm_rerank_k,
        num_workers=num_workers,
        progress=progress,
    )
    img2txt = [dataset.img2txt[i] for i in range(i2t.shape[0])]
    txt2img = [dataset.txt2img[t] for t in range(i2t.shape[1])]
    metrics = retrieval_recall(i2t.float().numpy(), img2txt, txt2img, sim_t2i=t2i.float().numpy())
    metrics.pop("agg_metrics", None)
    metrics.update(timer.metrics())
    return EvalResult(metrics)


# ---------------------------------------------------------------------------------------------- entry point


def _source(task: TaskName, data: Any) -> VQASource | NLVR2Source | RetrievalSource:
    classes = {"vqa": VQASource, "nlvr2": NLVR2Source, "retrieval": RetrievalSource}
    if task not in classes:
        raise ConfigError(f"unknown VLMo evaluation task {task!r}; choose one of {', '.join(classes)}")
    cls = classes[task]
    if isinstance(data, cls):
        return data
    if isinstance(data, Mapping):
        return from_dict(cls, dict(data), path="data")
    raise ConfigError(f"data must be a {cls.__name__} or a mapping of its fields, got {type(data).__name__}")


def load_vlmo(
    model: str | os.PathLike | VLMo, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> VLMo:
    """A VLMo from a vlkit folder or a unilm ``.pt``/``.ckpt`` file (or the model itself)."""
    if isinstance(model, VLMo):
        return model
    from vlkit.checkpoints.folder import load_model

    loaded = load_model(model, dtype=dtype, device=device)
    if not isinstance(loaded, VLMo):
        raise ConfigError(f"{model}: holds a {type(loaded).__name__}, not a VLMo")
    return loaded


def evaluate_vlmo(
    task: TaskName,
    model: str | os.PathLike | VLMo,
    data: VQASource | NLVR2Source | RetrievalSource | Mapping[str, Any],
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a VLMo on a VQA, NLVR2 or retrieval split (the function ``vlkit eval`` wraps).

    Args:
        task: "vqa", "nlvr2" or "retrieval".
        model: a vlkit folder (e.g. ``RUN/model`` from ``vlkit train``), a unilm ``.pt``/``.ckpt``, or a VLMo.
        data: the split: a :class:`~vlkit.data.vlmo.VQASource` / ``NLVR2Source`` / ``RetrievalSource`` or a
            mapping of its fields (``{"questions": [...], "annotations": [...], "image_root": ...}``,
            ``{"arrow": [...]}``).
        **options: see :func:`evaluate_vlmo_result` (tokenizer, answers, devices, batch_size, ...).

    Returns:
        The metrics (see :func:`evaluate_vqa`, :func:`evaluate_nlvr2`, :func:`evaluate_retrieval`), plus
        ``task``, ``model``, ``devices`` and, for VQA, ``predictions_file`` when written.
    """
    out, result = evaluate_vlmo_result(task, model, data, **options)
    out.update(result.metrics)
    return out


def evaluate_vlmo_result(
    task: TaskName,
    model: str | os.PathLike | VLMo,
    data: VQASource | NLVR2Source | RetrievalSource | Mapping[str, Any],
    *,
    tokenizer: str | os.PathLike | VLMoTokenizer | None = None,
    answers: str | os.PathLike | VQAVocab | None = None,
    devices: Sequence[str | torch.device] | None = None,
    batch_size: int = 64,
    itm_rerank_k: int = 0,
    output_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], EvalResult]:
    """:func:`evaluate_vlmo` with the whole :class:`EvalResult` (predictions and breakdowns) kept apart.

    Args:
        task: "vqa", "nlvr2" or "retrieval".
        model: a vlkit folder (e.g. ``RUN/model`` from ``vlkit train``), a unilm ``.pt``/``.ckpt``, or a VLMo.
        data: the split: a :class:`~vlkit.data.vlmo.VQASource` / ``NLVR2Source`` / ``RetrievalSource`` or a
            mapping of its fields (``{"questions": [...], "annotations": [...], "image_root": ...}``,
            ``{"arrow": [...]}``).
        tokenizer: a ``vocab.txt``/folder or a tokenizer; default: the model folder's ``tokenizer/``, else
            bert-base-uncased (what the released checkpoints use).
        answers: VQA label file or vocabulary; default: the model folder's ``answer2label.txt``, else rebuilt
            from arrow tables.
        devices: split the model over these devices (e.g. ``["cuda:0", "cuda:1"]``).
        batch_size: samples per forward pass (1 measures single-request latency).
        itm_rerank_k: retrieval: re-rank the top k with ITM (0: dual encoder only).
        output_dir: VQA: where ``vqa_predictions.json`` is written.
        num_workers: DataLoader workers.
        dtype: cast the model's weights (e.g. ``torch.bfloat16``); default float32 for unilm files.
        progress: show progress bars.

    Returns:
        ``(info, result)``: ``task``, ``model``, ``devices`` (and, for VQA, ``predictions_file`` when
        written), and the task's :class:`EvalResult`.
    """
    from vlkit.processors import make_image_processor
    from vlkit.tasks.vlmo import ANSWERS_FILE, folder_tokenizer

    source = _source(task, data)
    net = load_vlmo(model, dtype=dtype)
    if devices is not None and len(devices) == 1:
        net = net.to(torch.device(devices[0]))
        devices = None
    max_len = net.config.max_text_len
    if isinstance(tokenizer, VLMoTokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = VLMoTokenizer(tokenizer, max_len)
    elif not isinstance(model, VLMo) and Path(model).is_dir():
        tok = folder_tokenizer(model, max_len)
    else:
        tok = VLMoTokenizer(None, max_len)
    if tok.vocab_size > net.config.vocab_size:
        raise ConfigError(f"the tokenizer ({tok.vocab_size} tokens) does not fit the model ({net.config.vocab_size})")
    processor = make_image_processor("vlmo_eval", net.config.image_size)
    out: dict[str, Any] = {"task": task, "model": str(model) if not isinstance(model, VLMo) else "<VLMo>"}
    out["devices"] = [str(d) for d in devices] if devices else [str(next(net.parameters()).device)]
    if task == "vqa":
        assert isinstance(source, VQASource)
        if isinstance(answers, VQAVocab):
            vocab = answers
        elif answers is not None:
            vocab = VQAVocab.load(answers)
        elif not isinstance(model, VLMo) and (Path(model) / ANSWERS_FILE).is_file():
            vocab = VQAVocab.load(Path(model) / ANSWERS_FILE)
        elif source.arrow:
            from vlkit.data.arrow import arrow_vqa_vocab

            vocab = arrow_vqa_vocab(source.arrow)
        else:
            raise ConfigError("VQA evaluation needs the answer vocabulary: pass answers= (answer2label.txt)")
        dataset = source.open(vocab, processor)
        result = evaluate_vqa(
            net,
            dataset,
            tok,
            vocab,
            annotations=source.annotations or None,
            batch_size=batch_size,
            devices=devices,
            num_workers=num_workers,
            progress=progress,
            output=output_dir,
        )
        if "predictions_file" in result.details:
            out["predictions_file"] = result.details["predictions_file"]
    elif task == "nlvr2":
        assert isinstance(source, NLVR2Source)
        result = evaluate_nlvr2(
            net,
            source.open(processor),
            tok,
            batch_size=batch_size,
            devices=devices,
            num_workers=num_workers,
            progress=progress,
        )
    else:
        assert isinstance(source, RetrievalSource)
        result = evaluate_retrieval(
            net,
            source.open(processor, train=False),
            tok,
            batch_size=batch_size,
            itm_rerank_k=itm_rerank_k,
            devices=devices,
            num_workers=num_workers,
            progress=progress,
        )
    return out, result


__all__ = [
    "EvalResult",
    "evaluate_nlvr2",
    "evaluate_retrieval",
    "evaluate_vlmo",
    "evaluate_vlmo_result",
    "evaluate_vqa",
    "load_vlmo",
    "retrieval_scores",
]
