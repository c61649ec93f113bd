"""COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D, as pycocoevalcap computes them.

BLEU, ROUGE-L and CIDEr-D are pure Python here and equal pycocoevalcap's numbers to floating-point
rounding (tested against it on generated corpora). METEOR is the Java meteor-1.5 scorer shipped with
pycocoevalcap, called when ``java`` and pycocoevalcap are available; otherwise it is reported as
unavailable (``None`` plus a reason), never as 0. SPICE needs Stanford CoreNLP, which pycocoevalcap
downloads on first use; vlkit never downloads at run time, so SPICE is reported unavailable unless those
jars are already installed.

The scorers take *tokenised* captions (the output of :mod:`vlkit.metrics.ptb`): lower-cased tokens
joined by single spaces. :func:`evaluate_captions` / :func:`score_captions` tokenise raw captions first,
exactly as ``COCOEvalCap.evaluate`` does (references of all images in one batch, then the candidates).

Facts that matter for equality with the official numbers:

* BLEU is a corpus score: clipped n-gram matches and n-gram counts are summed over all images before
  the ratios are taken; the reference length of an image is the one closest to the candidate length
  (the shorter on a tie); every ratio is smoothed as ``(matches + 1e-15) / (count + 1e-9)`` and the
  brevity penalty ``exp(1 - r/c)`` applies when ``(c + 1e-15) / (r + 1e-9) < 1``.
* ROUGE-L splits on single spaces (so an empty candidate is one empty token), takes the best LCS
  precision and the best LCS recall over the references separately, and combines them with β = 1.2.
* CIDEr-D weights n-grams (n = 1..4) by tf·idf with ``idf = log(#images) - log(max(1, df))`` where ``df``
  counts the *evaluated* images whose references contain the n-gram (scores depend on which images are
  scored together), clips the candidate weights at the reference weights, applies a Gaussian penalty
  ``exp(-δ²/2σ²)`` (σ = 6) on the difference in *bigram counts*, averages over n, divides by the number
  of references and multiplies by 10.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlkit.errors import DataError, VlkitError
from vlkit.metrics.ptb import tokenize_lines

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "CaptionEvaluation",
    "MetricUnavailable",
    "bleu",
    "cider_d",
    "evaluate_captions",
    "load_coco_references",
    "load_coco_results",
    "meteor",
    "rouge_l",
    "score_captions",
    "spice",
]

BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
CAPTION_METRICS: tuple[str, ...] = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DEFAULT_CAPTION_METRICS: tuple[str, ...] = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr")

_TINY = 1e-15  # added to matched n-gram counts (pycocoevalcap's smoothing)
_SMALL = 1e-9  # added to n-gram counts and lengths


class MetricUnavailable(VlkitError):
    """A metric cannot be computed on this machine (missing Java, jar or models); the message says why."""


# ----------------------------------------------------------------------------------------------------
# n-gram helpers
# ----------------------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of ``words`` (as tuples)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(words[i:] for i in range(k))))
    return counts


def _check_pairs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise DataError(f"{len(candidates)} candidates but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise DataError(f"item {i}: references must be a non-empty list of strings, got {refs!r}")


# ----------------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------------


def bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..n of tokenised captions, as pycocoevalcap's ``Bleu(n)`` (``closest`` reference length).

    Args:
        candidates: one tokenised caption per image.
        references: the tokenised reference captions of each image (at least one).
        n: highest n-gram order.

    Returns:
        ``(corpus, per_image)``: ``corpus[k]`` is BLEU-(k+1) over the whole corpus; ``per_image[k][i]`` the
        smoothed sentence-level BLEU-(k+1) of image ``i``.
    """
    _check_pairs(candidates, references)
    total_correct = [0] * n
    total_guess = [0] * n
    total_test = 0
    total_ref = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for cand, refs in zip(candidates, references):
        ref_lens = []
        ref_max: dict[tuple[str, ...], int] = {}
        for ref in refs:
            words = ref.split()
            ref_lens.append(len(words))
            for gram, count in _ngram_counts(words, n).items():
                if count > ref_max.get(gram, 0):
                    ref_max[gram] = count
        words = cand.split()
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]  # closest, shorter on ties
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(ref_max.get(gram, 0), count)

        total_test += test_len
        total_ref += ref_len
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
        for k, score in enumerate(_bleu_from_counts(correct, guess, test_len, ref_len)):
            per_image[k].append(score)
    corpus = _bleu_from_counts(total_correct, total_guess, total_test, total_ref)
    return corpus, per_image


def _bleu_from_counts(correct: list[int], guess: list[int], test_len: int, ref_len: int) -> list[float]:
    """Geometric means of the smoothed precisions times the brevity penalty."""
    scores = []
    product = 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        penalty = math.exp(1 - 1 / ratio)
        scores = [s * penalty for s in scores]
    return scores


# ----------------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------------


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison–Dix / Hyyrö), O(len(b)) big-int ops."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def _lcs_length_reference(a: Sequence[str], b: Sequence[str]) -> int:
    """Textbook dynamic-programming LCS, the reference the bit-parallel version is tested against."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(
    candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """ROUGE-L F-measure of tokenised captions, as pycocoevalcap's ``Rouge``.

    Returns:
        ``(mean over images, per-image scores)``.
    """
    _check_pairs(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        cand_tokens = cand.split(" ")
        best_prec = best_rec = 0.0
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand_tokens)
            best_prec = max(best_prec, lcs / float(len(cand_tokens)))
            best_rec = max(best_rec, lcs / float(len(ref_tokens)))
        if best_prec != 0 and best_rec != 0:
            score = ((1 + beta**2) * best_prec * best_rec) / float(best_rec + beta**2 * best_prec)
        else:
            score = 0.0
        scores.append(score)
    return (_mean(scores), scores)


# ----------------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------------


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D of tokenised captions, as pycocoevalcap's ``Cider`` (document frequencies over this corpus).

    Returns:
        ``(mean over images, per-image scores)``.
    """
    _check_pairs(candidates, references)
    cand_counts = [_ngram_counts(c.split(), n) for c in candidates]
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs] for refs in references]

    doc_freq: Counter[tuple[str, ...]] = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_images = math.log(float(len(candidates))) if candidates else 0.0

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        sq_norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[k][gram] = weight
            sq_norm[k] += weight**2
            if k == 1:
                bigrams += tf
        return vec, [math.sqrt(s) for s in sq_norm], bigrams

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(cand)
        per_order = [0.0] * n
        for ref in refs:
            rvec, rnorm, rlength = tfidf(ref)
            penalty = math.e ** (-(float(length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                overlap = 0.0
                for gram, weight in vec[k].items():
                    ref_weight = rvec[k].get(gram, 0.0)
                    overlap += min(weight, ref_weight) * ref_weight
                if norm[k] != 0 and rnorm[k] != 0:
                    overlap /= norm[k] * rnorm[k]
                per_order[k] += overlap * penalty
        score = sum(per_order) / n
        score /= len(refs)
        score *= 10.0
        scores.append(score)
    return (_mean(scores), scores)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------------
# METEOR and SPICE (Java, through pycocoevalcap)
# ----------------------------------------------------------------------------------------------------


def _pycocoevalcap_dir() -> Path:
    if shutil.which("java") is None:
        raise MetricUnavailable("needs Java ('java' is not on PATH)")
    try:
        import pycocoevalcap
    except ImportError as err:
        raise MetricUnavailable("needs pycocoevalcap (pip install pycocoevalcap==1.2)") from err
    return Path(next(iter(pycocoevalcap.__path__)))  # a namespace package: no __file__


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 (pycocoevalcap's Java scorer) of tokenised captions.

    Raises:
        MetricUnavailable: without Java or pycocoevalcap, or when the Java scorer fails (message says why).
    """
    _check_pairs(candidates, references)
    root = _pycocoevalcap_dir()
    if not (root / "meteor" / "meteor-1.5.jar").is_file():
        raise MetricUnavailable(f"meteor-1.5.jar is missing from {root / 'meteor'}")
    from pycocoevalcap.meteor.meteor import Meteor

    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    try:
        scorer = Meteor()
    except OSError as err:
        raise MetricUnavailable(f"could not start the Java METEOR scorer: {err}") from err
    try:
        score, scores = scorer.compute_score(gts, res)
    except Exception as err:  # the Java side died or answered garbage: report, do not crash the evaluation
        stderr = _drain(scorer.meteor_p)
        raise MetricUnavailable(f"the Java METEOR scorer failed ({type(err).__name__}: {err}) {stderr}") from err
    finally:
        _stop(scorer)
    return float(score), [float(s) for s in scores]


def _drain(proc: Any) -> str:
    try:
        proc.kill()
        return proc.stderr.read().decode(errors="replace")[-500:].strip()
    except Exception:
        return ""


def _stop(scorer: Any) -> None:
    """Shut the METEOR subprocess down ourselves; its ``__del__`` would block on a lock left held by a
    failed ``compute_score``."""
    scorer.lock = threading.Lock()
    proc = scorer.meteor_p
    for step in (proc.stdin.close, proc.kill, proc.wait):
        try:
            step()
        except Exception:
            pass


_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """SPICE (pycocoevalcap's Java scorer), only when its Stanford CoreNLP jars are already installed.

    Raises:
        MetricUnavailable: in every other case (vlkit never lets pycocoevalcap download CoreNLP).
    """
    _check_pairs(candidates, references)
    root = _pycocoevalcap_dir()
    missing = [j for j in _CORENLP_JARS if not (root / "spice" / "lib" / j).is_file()]
    if missing:
        raise MetricUnavailable(
            f"needs Stanford CoreNLP ({', '.join(missing)} in {root / 'spice' / 'lib'}), which pycocoevalcap "
            "downloads on first use; vlkit does not download at run time"
        )
    from pycocoevalcap.spice.spice import Spice

    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    try:
        score, scores = Spice().compute_score(gts, res)
    except Exception as err:
        raise MetricUnavailable(f"the Java SPICE scorer failed ({type(err).__name__}: {err})") from err
    return float(score), [float(s["All"]["f"]) for s in scores]


# ----------------------------------------------------------------------------------------------------
# Whole evaluation
# ----------------------------------------------------------------------------------------------------


@dataclass
class CaptionEvaluation:
    """Result of :func:`evaluate_captions`.

    Attributes:
        scores: corpus score per requested metric (COCO names); ``None`` where the metric is unavailable.
        per_image: ``{image_id: {metric: score}}`` for the metrics that were computed.
        unavailable: ``{metric: reason}`` for the metrics that could not be computed.
        tokenized_predictions: the PTB-tokenised candidate of every image.
        tokenized_references: the PTB-tokenised references of every image.
    """

    scores: dict[str, float | None]
    per_image: dict[Hashable, dict[str, float]]
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenized_predictions: dict[Hashable, str] = field(default_factory=dict)
    tokenized_references: dict[Hashable, list[str]] = field(default_factory=dict)


def _validate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise DataError("predictions and references must be mappings {image_id: caption(s)}")
    missing = [k for k in predictions if k not in references]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} predicted image ids have no reference captions: {shown}")
    for k, cap in predictions.items():
        if not isinstance(cap, str):
            raise DataError(f"image {k!r}: the prediction must be a string, got {type(cap).__name__}")
        refs = references[k]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise DataError(f"image {k!r}: references must be a non-empty list of strings")
        for ref in refs:
            if not isinstance(ref, str):
                raise DataError(f"image {k!r}: a reference caption is {type(ref).__name__}, not a string")


def evaluate_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
) -> CaptionEvaluation:
    """Score predicted captions against references like ``COCOEvalCap.evaluate``.

    The evaluated images are those in ``predictions`` (as LAVIS sets ``params['image_id']``); references
    of other images are ignored, also for CIDEr's document frequencies.

    Args:
        predictions: ``{image_id: caption}``.
        references: ``{image_id: [caption, ...]}``; must cover every predicted image.
        metrics: COCO metric names among :data:`CAPTION_METRICS`.

    Returns:
        A :class:`CaptionEvaluation`; unavailable metrics (METEOR without Java, SPICE without CoreNLP) are
        ``None`` in ``scores`` with the reason in ``unavailable``.

    Raises:
        DataError: unknown metric names, predictions without references, or non-string captions.
    """
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown:
        raise DataError(f"unknown caption metrics {unknown}; choose from {list(CAPTION_METRICS)}")
    _validate(predictions, references)
    if not predictions:
        raise DataError("no predictions to evaluate")
    ids = list(predictions)
    ref_lists = [list(references[k]) for k in ids]
    # Two tokenizer runs, as pycocoevalcap does: all references, then all candidates.
    flat_refs = tokenize_lines([r for refs in ref_lists for r in refs])
    tok_refs: list[list[str]] = []
    start = 0
    for refs in ref_lists:
        tok_refs.append(flat_refs[start : start + len(refs)])
        start += len(refs)
    tok_cands = tokenize_lines([predictions[k] for k in ids])

    scores: dict[str, float | None] = {}
    per_image: dict[Hashable, dict[str, float]] = {k: {} for k in ids}
    unavailable: dict[str, str] = {}

    def record(name: str, corpus: float, each: Sequence[float]) -> None:
        scores[name] = float(corpus)
        for k, value in zip(ids, each):
            per_image[k][name] = float(value)

    wanted = set(metrics)
    if wanted & set(BLEU_NAMES):
        corpus, each = bleu(tok_cands, tok_refs, 4)
        for j, name in enumerate(BLEU_NAMES):
            if name in wanted:
                record(name, corpus[j], each[j])
    for name, fn in (("METEOR", meteor), ("ROUGE_L", rouge_l), ("CIDEr", cider_d), ("SPICE", spice)):
        if name not in wanted:
            continue
        try:
            corpus_score, each_score = fn(tok_cands, tok_refs)
        except MetricUnavailable as err:
            scores[name] = None
            unavailable[name] = f"{name} unavailable: {err}"
            continue
        record(name, corpus_score, each_score)
    ordered = {m: scores[m] for m in metrics}
    return CaptionEvaluation(
        scores=ordered,
        per_image=per_image,
        unavailable=unavailable,
        tokenized_predictions=dict(zip(ids, tok_cands)),
        tokenized_references=dict(zip(ids, tok_refs)),
    )


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
) -> dict[str, float | None]:
    """Corpus scores ``{"Bleu_1": .., "METEOR": .., "ROUGE_L": .., "CIDEr": ..}`` (see :func:`evaluate_captions`)."""
    return evaluate_captions(predictions, references, metrics).scores


# ----------------------------------------------------------------------------------------------------
# COCO files
# ----------------------------------------------------------------------------------------------------


def _read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def load_coco_references(path: str | os.PathLike) -> dict[Hashable, list[str]]:
    """Read a COCO caption ground-truth file ``{"annotations": [{"image_id", "caption"}, ...]}``.

    Returns:
        ``{image_id: [caption, ...]}`` in file order.

    Raises:
        DataError: missing file, invalid JSON, or annotations without ``image_id``/``caption`` strings.
    """
    data = _read_json(path)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataError(f"{path}: expected an object with an 'annotations' list (COCO caption format)")
    refs: dict[Hashable, list[str]] = {}
    for i, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption'")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    return refs


def load_coco_results(path: str | os.PathLike) -> dict[Hashable, str]:
    """Read a COCO caption results file ``[{"image_id", "caption"}, ...]``.

    Returns:
        ``{image_id: caption}`` in file order.

    Raises:
        DataError: missing file, invalid JSON, malformed entries, or two different captions for one image.
    """
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} (COCO results format)")
    preds: dict[Hashable, str] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise DataError(f"{path}: entry {i} needs 'image_id' and a string 'caption'")
        key, cap = item["image_id"], item["caption"]
        if key in preds and preds[key] != cap:
            raise DataError(f"{path}: image {key!r} has two different captions ({preds[key]!r}, {cap!r})")
        preds[key] = cap
    return preds
