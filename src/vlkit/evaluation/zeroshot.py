"""Zero-shot image classification with a stage-1 BLIP-2 model (MindFormers-style API).

Each label becomes a prompt ``hypothesis_template.format(label)``, normalised by ``blip_caption`` and
encoded by the Q-Former's text path into a unit text feature. An image's score for class c is

    softmax over classes of  max_q(image_feat_q . text_feat_c) / temp

with the model's learned temperature (LAVIS's BLIP recipe; BLIP-2 ships no packaged routine). Optionally
the ``rerank_k`` best classes of each image are re-scored by the ITM head: the result then lists those k
classes only, ordered by the probability that image and prompt match.

The class text features depend only on the label set and the weights, so :class:`ZeroShotClassifier`
computes them once; :func:`classify` keeps recent classifiers per model and rebuilds one only when the
labels, template, processor or weights change (weights are tracked through the parameters' in-place
version counters, so a training step or ``load_state_dict`` invalidates the cache).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlkit.data.collate import collate
from vlkit.data.datasets import ImageFolderDataset
from vlkit.evaluation.features import (
    ITM_MAX_LENGTH,
    FeatureError,
    TextProcessor,
    inference,
    pair_itm_logits,
    tokenize,
)
from vlkit.models.blip2 import Blip2
from vlkit.processors import QFormerTokenizer, blip_caption

__all__ = [
    "DEFAULT_TEMPLATE",
    "ClassPrompts",
    "ClassificationResult",
    "ZeroShotClassifier",
    "classify",
    "encode_class_prompts",
    "evaluate_classification",
]

DEFAULT_TEMPLATE = "a photo of {}."
_CACHE_SIZE = 8  # label sets remembered per model by classify()


@dataclass
class ClassPrompts:
    """The encoded prompts of one label set (no reference to the model, so caches can hold it).

    Attributes:
        labels: class names.
        prompts: ``hypothesis_template.format(label)`` per class, before text processing.
        text_ids: (C, L) token ids of the processed prompts.
        text_mask: (C, L) their padding mask.
        text_feats: (C, E) float32 unit [CLS] features, on the model's device.
    """

    labels: list[str]
    prompts: list[str]
    text_ids: Tensor
    text_mask: Tensor
    text_feats: Tensor


def encode_class_prompts(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    candidate_labels: Sequence[str],
    hypothesis_template: str = DEFAULT_TEMPLATE,
    *,
    text_processor: TextProcessor | None = blip_caption,
    max_length: int = ITM_MAX_LENGTH,
    batch_size: int = 256,
) -> ClassPrompts:
    """Build and encode the class prompts (arguments as :class:`ZeroShotClassifier`)."""
    labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
    if not labels:
        raise FeatureError("candidate_labels is empty")
    if len(set(labels)) != len(labels):
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        raise FeatureError(f"candidate_labels has duplicates: {duplicates}")
    if "{}" not in hypothesis_template:
        raise FeatureError(f"hypothesis_template needs a '{{}}' for the label, got {hypothesis_template!r}")
    prompts = [hypothesis_template.format(label) for label in labels]
    ids, mask = tokenize(tokenizer, prompts, text_processor=text_processor, max_length=max_length)  # (C, L)
    feats = []
    with inference(model) as device:
        for start in range(0, len(labels), batch_size):
            rows = slice(start, start + batch_size)
            out = model.encode_text(ids[rows].to(device), mask[rows].to(device))
            feats.append(model.project_text(out).float())
    return ClassPrompts(labels, prompts, ids, mask, torch.cat(feats))


class ZeroShotClassifier:
    """Class prompts of one label set, encoded once, and the scoring of images against them.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        candidate_labels: class names (distinct, at least one).
        hypothesis_template: prompt with one ``{}`` for the label.
        text_processor: applied to each prompt (LAVIS ``blip_caption``; None = as given).
        max_length: prompts are truncated at this many tokens (32, the ITM limit).
        batch_size: prompts per text pass.
    """

    def __init__(
        self,
        model: Blip2,
        tokenizer: QFormerTokenizer,
        candidate_labels: Sequence[str],
        hypothesis_template: str = DEFAULT_TEMPLATE,
        *,
        text_processor: TextProcessor | None = blip_caption,
        max_length: int = ITM_MAX_LENGTH,
        batch_size: int = 256,
    ) -> None:
        classes = encode_class_prompts(
            model,
            tokenizer,
            candidate_labels,
            hypothesis_template,
            text_processor=text_processor,
            max_length=max_length,
            batch_size=batch_size,
        )
        self._set(model, classes)

    @classmethod
    def from_prompts(cls, model: Blip2, classes: ClassPrompts) -> ZeroShotClassifier:
        """A classifier over already encoded class prompts (of this model)."""
        classifier = cls.__new__(cls)
        classifier._set(model, classes)
        return classifier

    def _set(self, model: Blip2, classes: ClassPrompts) -> None:
        self.model = model
        self.labels = classes.labels
        self.prompts = classes.prompts
        self.text_ids, self.text_mask = classes.text_ids, classes.text_mask  # (C, L)
        self.text_feats = classes.text_feats  # (C, E)

    def image_inputs(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """ViT outputs (B, N, Dv) and query features (B, Q, E) of a batch of images (call under no_grad)."""
        device = self.text_feats.device
        image_embeds = self.model.encode_image(pixel_values.to(device))
        feats = self.model.project_image(self.model.encode_queries(image_embeds).query_output).float()
        return image_embeds, feats

    def logits(self, image_feats: Tensor) -> Tensor:
        """(B, C) ``max_q(image_feat_q . text_feat_c) / temp`` for query features (B, Q, E)."""
        sim = Blip2.itc_similarity(image_feats.float(), self.text_feats)
        return sim / self.model.temp.float()

    def rerank(self, image_embeds: Tensor, candidates: Tensor) -> Tensor:
        """ITM match probabilities (B, k) of each image with its candidate classes (B, k)."""
        batch, k = candidates.shape
        flat = candidates.reshape(-1).to(self.text_ids.device)
        ids, mask = self.text_ids[flat], self.text_mask[flat]
        width = int(mask.sum(dim=1).max())
        device = image_embeds.device
        index = torch.arange(batch, device=device).repeat_interleave(k)  # pair p uses image p // k
        logits = pair_itm_logits(
            self.model, image_embeds, ids[:, :width].to(device), mask[:, :width].to(device), image_index=index
        )
        return logits.float().softmax(dim=-1)[:, 1].view(batch, k)

    def scores(self, pixel_values: Tensor, *, rerank_k: int | None = None) -> tuple[Tensor, Tensor]:
        """Class scores of a batch of images.

        Args:
            pixel_values: (B, 3, S, S) preprocessed images.
            rerank_k: re-score each image's k best classes with ITM (None = no re-ranking).

        Returns:
            ``(scores, classes)``, both (B, K) sorted best first: K = C softmax probabilities without
            re-ranking, or K = k ITM match probabilities with it; ``classes`` are label indices.
        """
        if pixel_values.dim() != 4:
            raise FeatureError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        with inference(self.model):
            image_embeds, image_feats = self.image_inputs(pixel_values)
            probs = self.logits(image_feats).softmax(dim=-1)  # (B, C)
            if rerank_k is None:
                scores, classes = probs.sort(dim=-1, descending=True)
                return scores.cpu(), classes.cpu()
            if rerank_k < 1:
                raise FeatureError(f"rerank_k must be >= 1, got {rerank_k}")
            candidates = probs.topk(min(rerank_k, len(self.labels)), dim=-1).indices  # (B, k)
            itm = self.rerank(image_embeds, candidates)
            order = itm.argsort(dim=-1, descending=True, stable=True)  # ties keep the ITC order
            return itm.gather(1, order).cpu(), candidates.gather(1, order).cpu()

    def __call__(
        self, pixel_values: Tensor, *, top_k: int | None = None, rerank_k: int | None = None, batch_size: int = 32
    ) -> list[list[dict[str, Any]]]:
        """Per image, ``[{"label": str, "score": float}, ...]`` sorted by descending score.

        Args:
            pixel_values: (B, 3, S, S) preprocessed images.
            top_k: keep only the best ``top_k`` entries per image (None = all).
            rerank_k: re-rank each image's k best classes by ITM match probability (see :meth:`scores`).
            batch_size: images per forward pass.
        """
        if top_k is not None and top_k < 1:
            raise FeatureError(f"top_k must be >= 1, got {top_k}")
        results = []
        for start in range(0, pixel_values.shape[0], batch_size):
            scores, classes = self.scores(pixel_values[start : start + batch_size], rerank_k=rerank_k)
            for row_scores, row_classes in zip(scores[:, :top_k].tolist(), classes[:, :top_k].tolist()):
                results.append([{"label": self.labels[c], "score": float(s)} for s, c in zip(row_scores, row_classes)])
        return results


# ----------------------------------------------------------------------------------------------------------
# classify(): the one-call API, with the class features cached per model


def _weights_stamp(model: Blip2) -> tuple[Any, ...]:
    # A parameter's _version counter moves with every in-place update (optimizer steps, load_state_dict,
    # .copy_), its id with replacement, and model.to() changes device or dtype: together they tell whether
    # cached text features went stale.
    first = next(model.parameters())
    return (str(first.device), first.dtype, *((id(p), p._version) for p in model.parameters()))


# Per model (held weakly), the encoded prompts of recent label sets with the weights stamp they were
# computed under. Entries hold no reference to the model, so the cache never keeps a model alive.
_cache: weakref.WeakKeyDictionary[Blip2, OrderedDict[tuple, tuple[Any, ClassPrompts]]] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _classifier(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    labels: Sequence[str],
    template: str,
    text_processor: TextProcessor | None,
) -> ZeroShotClassifier:
    labels = [labels] if isinstance(labels, str) else list(labels)
    key = (tuple(labels), template, tokenizer, text_processor)
    stamp = _weights_stamp(model)
    with _cache_lock:
        entries = _cache.setdefault(model, OrderedDict())
        hit = entries.get(key)
        if hit is not None and hit[0] == stamp:
            entries.move_to_end(key)
            return ZeroShotClassifier.from_prompts(model, hit[1])
    classes = encode_class_prompts(model, tokenizer, labels, template, text_processor=text_processor)
    with _cache_lock:
        entries = _cache.setdefault(model, OrderedDict())
        entries[key] = (stamp, classes)
        entries.move_to_end(key)
        while len(entries) > _CACHE_SIZE:
            entries.popitem(last=False)
    return ZeroShotClassifier.from_prompts(model, classes)


def classify(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    pixel_values: Tensor,
    candidate_labels: Sequence[str],
    hypothesis_template: str = DEFAULT_TEMPLATE,
    *,
    top_k: int | None = None,
    rerank_k: int | None = None,
    batch_size: int = 32,
    text_processor: TextProcessor | None = blip_caption,
) -> list[list[dict[str, Any]]]:
    """Zero-shot classification of images among ``candidate_labels``.

    Args:
        model: a stage-1 BLIP-2 model.
        tokenizer: the Q-Former tokenizer.
        pixel_values: (B, 3, S, S) preprocessed images.
        candidate_labels: class names.
        hypothesis_template: prompt with one ``{}`` for the label.
        top_k: keep only the best ``top_k`` classes per image.
        rerank_k: re-rank the k best classes by ITM match probability; the result then has those k only,
            with ``score`` = ITM probability of a match.
        batch_size: images per forward pass.
        text_processor: applied to each prompt (``blip_caption``).

    Returns:
        Per image, ``[{"label": str, "score": float}, ...]`` sorted by descending score. Without
        re-ranking, scores are softmax probabilities over all labels.
    """
    classifier = _classifier(model, tokenizer, candidate_labels, hypothesis_template, text_processor)
    return classifier(pixel_values, top_k=top_k, rerank_k=rerank_k, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------
# Accuracy over a labelled image folder


@dataclass
class ClassificationResult:
    """Accuracy of zero-shot classification over a labelled dataset.

    Attributes:
        top1: top-1 accuracy in percent.
        top5: top-5 accuracy in percent (top-C when there are fewer than 5 classes).
        predictions: (N,) predicted label index of every image.
        labels: (N,) true label index.
        probs: (N, C) class probabilities (ITC softmax).
    """

    top1: float
    top5: float
    predictions: Tensor
    labels: Tensor
    probs: Tensor


def evaluate_classification(
    model: Blip2,
    tokenizer: QFormerTokenizer,
    dataset: ImageFolderDataset,
    hypothesis_template: str = DEFAULT_TEMPLATE,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> ClassificationResult:
    """Zero-shot accuracy on a class-folder dataset, prompts built from ``dataset.classes``.

    Class names with underscores are prompted with spaces ("traffic_light" -> "a photo of traffic light.").
    """
    classifier = ZeroShotClassifier(
        model, tokenizer, [name.replace("_", " ") for name in dataset.classes], hypothesis_template
    )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    probs, labels = [], []
    with inference(model):
        for batch in tqdm(loader, desc="zero-shot", disable=not progress, leave=False):
            if batch is None:
                continue
            _, image_feats = classifier.image_inputs(batch["image"])
            probs.append(classifier.logits(image_feats).softmax(dim=-1).cpu())
            labels.append(batch["label"])
    if not probs:
        raise FeatureError("no images to classify")
    all_probs, all_labels = torch.cat(probs), torch.cat(labels)
    k = min(5, all_probs.shape[1])
    top = all_probs.topk(k, dim=-1).indices
    top1 = (top[:, 0] == all_labels).float().mean().item() * 100
    top5 = (top == all_labels[:, None]).any(dim=-1).float().mean().item() * 100
    return ClassificationResult(top1, top5, top[:, 0], all_labels, all_probs)
