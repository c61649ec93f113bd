"""Inference and evaluation with stage-1 BLIP-2 models: features, ITM/ITC scores, retrieval, zero-shot.

- :mod:`vlkit.evaluation.features`: ``extract_features`` (image / text / multimodal), ``itm_scores``,
  ``itc_scores``, and ``pair_itm_logits`` (ITM over pairs that share images).
- :mod:`vlkit.evaluation.retrieval`: ``compute_sim_matrix`` / ``evaluate_retrieval`` (ITC similarity,
  top-k ITM re-ranking, both directions, batched and distributed).
- :mod:`vlkit.evaluation.zeroshot`: ``classify`` and ``ZeroShotClassifier`` (candidate labels and a
  hypothesis template), ``evaluate_classification`` (accuracy on a class-folder dataset).

Q-Former captioning lives with the model: :mod:`vlkit.models.qformer_decoding`.
"""

from __future__ import annotations

from vlkit.evaluation.features import (
    Blip2Features,
    extract_features,
    image_features,
    itc_scores,
    itm_scores,
    multimodal_features,
    pair_itm_logits,
    text_features,
)
from vlkit.evaluation.retrieval import (
    RetrievalFeatures,
    RetrievalScores,
    compute_sim_matrix,
    evaluate_retrieval,
    rerank,
    retrieval_features,
)
from vlkit.evaluation.zeroshot import ClassificationResult, ZeroShotClassifier, classify, evaluate_classification

__all__ = [
    "Blip2Features",
    "ClassificationResult",
    "RetrievalFeatures",
    "RetrievalScores",
    "ZeroShotClassifier",
    "classify",
    "compute_sim_matrix",
    "evaluate_classification",
    "evaluate_retrieval",
    "extract_features",
    "image_features",
    "itc_scores",
    "itm_scores",
    "multimodal_features",
    "pair_itm_logits",
    "rerank",
    "retrieval_features",
    "text_features",
]
