"""VLMo data: the samples the VLMo tasks and evaluations consume, read from vlkit's JSON formats, and their
collation (text padded to the model's ``max_text_len``, VQA soft-score targets).

The same samples come from the reference's ViLT ``.arrow`` tables (:mod:`vlkit.data.arrow`), so every task
takes either source:

- VQA: the official VQAv2 question/annotation pair (:class:`VQAJsonDataset`) — targets are computed from the
  ten raw annotator answers with the answer vocabulary exactly as the reference's ``write_vqa.py`` does
  (:meth:`vlkit.data.vqa_vocab.VQAVocab.targets`); or arrow tables, which carry the targets already.
- NLVR2: the official JSON-lines files (:class:`NLVR2JsonDataset`) or arrow tables.
- Retrieval: LAVIS/Flickr caption JSON (:class:`vlkit.data.datasets.RetrievalDataset`) or arrow tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from vlkit.data.datasets import COCO_VQA_IMAGE_TEMPLATE, VQADataset, _ImageDataset
from vlkit.data.images import DEFAULT_MAX_PIXELS
from vlkit.data.vlmo_text import VLMoTokenizer
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.errors import ConfigError, DataError

ImageFn = Callable[[Any], Tensor]
PathLike = str | os.PathLike

# ----------------------------------------------------------------------------------------------------- samples


@dataclass
class VLMoVQASample:
    """One question about one image with its soft-score target (the reference's ``vqa_labels``/``vqa_scores``).

    ``labels``/``scores`` are empty for test questions and for questions without an in-vocabulary answer.
    """

    image: Tensor  # (3, S, S)
    question: str
    question_id: int
    labels: list[int]
    scores: list[float]


@dataclass
class NLVR2Sample:
    """A statement about a pair of images; ``label`` 1 = "True". ``table`` names the source split (the
    reference reports accuracy per table, e.g. ``nlvr2_dev`` and ``nlvr2_test1``)."""

    image_0: Tensor
    image_1: Tensor
    sentence: str
    label: int
    identifier: str
    table: str


@dataclass
class RetrievalPair:
    """A training caption with its image; ``image_index`` identifies the image within the dataset."""

    image: Tensor
    text: str
    image_index: int


# ----------------------------------------------------------------------------------------------- JSON sources


class VQAJsonDataset(Dataset):
    """VLMo VQA samples from the official VQAv2 pair (questions JSON + annotations JSON, or questions only).

    Args:
        questions: ``v2_OpenEnded_*_questions.json``.
        annotations: ``v2_*_annotations.json`` (None for test questions: empty targets).
        image_root: folder the image template is relative to.
        vocab: the answer vocabulary (targets are computed from the raw answers with it).
        image_processor: PIL image -> (3, S, S) tensor.
        image_template: image path from ``image_id`` and ``data_subtype`` (COCO layout by default).
        drop_unanswerable: leave out questions none of whose raw answers is in the vocabulary, as the
            reference does for its train and val tables (keep them for evaluation: they still count).
        data_subtype: fills ``{data_subtype}`` when the questions file has none.
    """

    def __init__(
        self,
        questions: PathLike,
        annotations: PathLike | None,
        image_root: PathLike,
        vocab: VQAVocab,
        image_processor: ImageFn | None = None,
        *,
        image_template: str = COCO_VQA_IMAGE_TEMPLATE,
        drop_unanswerable: bool = False,
        data_subtype: str | None = None,
    ) -> None:
        self.source = VQADataset(
            questions,
            annotations,
            image_root,
            image_processor,
            image_template=image_template,
            data_subtype=data_subtype,
        )
        self.vocab = vocab
        self.records: list[tuple[dict[str, Any], list[int], list[float]]] = []
        for record in self.source.questions:
            labels, scores = vocab.targets(record["answers"]) if record["answers"] else ([], [])
            if drop_unanswerable and not labels:
                continue
            self.records.append((record, labels, scores))
        if not self.records:
            raise DataError(f"{questions}: no question has an answer in the vocabulary of {len(vocab)} answers")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VLMoVQASample:
        record, labels, scores = self.records[index]
        image = self.source.load(record["image"])
        return VLMoVQASample(image, record["question"], record["question_id"], list(labels), list(scores))

    @property
    def question_ids(self) -> list[int]:
        return [record["question_id"] for record, _, _ in self.records]

    def texts(self) -> list[str]:
        """Every question, in order (no image is read)."""
        return [record["question"] for record, _, _ in self.records]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such NLVR2 file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected an object")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def nlvr2_label(value: Any, where: str) -> int:
    """1 for "True" (or true), 0 for "False" (or false); the reference compares the string with "True"."""
    if value in ("True", True):
        return 1
    if value in ("False", False):
        return 0
    raise DataError(f"{where}: label must be 'True' or 'False', got {value!r}")


class NLVR2JsonDataset(_ImageDataset):
    """NLVR2 from its official JSON-lines files (``train.json``, ``dev.json``, ``test1.json``).

    Each line has ``identifier`` (``{split}-{set}-{pair}-{sentence}``), ``sentence``, ``label`` ("True"/"False")
    and, for train, ``directory``. The images are ``{image_root}/[{directory}/]{pair id}-img0.png`` and
    ``-img1.png`` where the pair id is the identifier without its last part (the reference's layout:
    ``images/train/{directory}/`` for train, ``{split}/`` for dev and test1).

    Args:
        path: the JSON-lines file.
        image_root: the folder holding the split's images.
        image_processor: PIL image -> tensor.
        table: name reported with each sample (default: ``nlvr2_{file stem}``).
    """

    def __init__(
        self,
        path: PathLike,
        image_root: PathLike,
        image_processor: ImageFn | None = None,
        *,
        table: str | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(image_root, image_processor, None, skip_bad_images, DEFAULT_MAX_PIXELS)
        path = Path(path)
        self.table = table or f"nlvr2_{path.stem}"
        self.records: list[tuple[str, str, str, int]] = []  # (image prefix, sentence, identifier, label)
        for number, record in enumerate(_read_jsonl(path), 1):
            where = f"{path}: line {number}"
            for key in ("identifier", "sentence", "label"):
                if key not in record:
                    raise DataError(f"{where}: missing key {key!r}")
            identifier = str(record["identifier"])
            pair = "-".join(identifier.split("-")[:-1])
            if not pair:
                raise DataError(f"{where}: identifier {identifier!r} is not '<split>-<set>-<pair>-<sentence>'")
            prefix = f"{record['directory']}/{pair}" if "directory" in record else pair
            self.records.append((prefix, str(record["sentence"]), identifier, nlvr2_label(record["label"], where)))

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        """Every statement, in order (no image is read)."""
        return [sentence for _, sentence, _, _ in self.records]

    def __getitem__(self, index: int) -> NLVR2Sample | None:
        prefix, sentence, identifier, label = self.records[index]
        image_0 = self.load(f"{prefix}-img0.png")
        image_1 = self.load(f"{prefix}-img1.png")
        if image_0 is None or image_1 is None:
            return None
        return NLVR2Sample(image_0, image_1, sentence, label, identifier, self.table)


# ------------------------------------------------------------------------------------------ source specs
# Typed descriptions of where a split lives, used by the recipes (``task.data``) and by the evaluation entry
# point. Exactly one kind of source per spec: ``arrow`` tables, or the JSON files.


def _under(root: Path, paths: Sequence[Path]) -> list[Path]:
    return [root / p for p in paths]  # an absolute p stays as it is


@dataclass
class VQASource:
    """A VQA split: ViLT arrow tables, or VQAv2 question/annotation files with an image folder.

    Attributes:
        arrow: ``.arrow`` files (e.g. ``vqav2_train.arrow`` + ``vqav2_trainable_val.arrow``).
        questions: ``v2_OpenEnded_*_questions.json`` files.
        annotations: the matching ``v2_*_annotations.json`` files, in the same order (empty for test).
        image_root: folder the image template is relative to.
        image_template: image path from ``image_id`` and ``data_subtype`` (COCO layout by default; the shapes
            world's is ``{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png``).
    """

    arrow: list[Path] = field(default_factory=list)
    questions: list[Path] = field(default_factory=list)
    annotations: list[Path] = field(default_factory=list)
    image_root: Path | None = None
    image_template: str = COCO_VQA_IMAGE_TEMPLATE

    def __post_init__(self) -> None:
        if bool(self.arrow) == bool(self.questions):
            raise ConfigError("a VQA source needs either arrow files or questions files (not both)")
        if self.questions:
            if self.annotations and len(self.annotations) != len(self.questions):
                raise ConfigError(
                    f"{len(self.questions)} questions files but {len(self.annotations)} annotations files; "
                    "give one annotations file per questions file, or none (test)"
                )
            if self.image_root is None:
                raise ConfigError("a VQA source with questions files needs image_root")

    def with_root(self, root: Path | None) -> VQASource:
        """A copy with relative paths taken relative to ``root`` (None: unchanged)."""
        if root is None:
            return self
        return VQASource(
            arrow=_under(root, self.arrow),
            questions=_under(root, self.questions),
            annotations=_under(root, self.annotations),
            image_root=None if self.image_root is None else root / self.image_root,
            image_template=self.image_template,
        )

    def open(
        self, vocab: VQAVocab | None, image_processor: ImageFn | None, *, drop_unanswerable: bool = False
    ) -> Dataset:
        """The dataset of :class:`VLMoVQASample` (``vocab`` is needed for JSON files only)."""
        if self.arrow:
            from vlkit.data.arrow import ArrowVQADataset

            return ArrowVQADataset(self.arrow, image_processor)
        if vocab is None:
            raise DataError("reading VQAv2 JSON files needs the answer vocabulary")
        parts = [
            VQAJsonDataset(
                q,
                self.annotations[i] if self.annotations else None,
                self.image_root,  # type: ignore[arg-type]  # checked in __post_init__
                vocab,
                image_processor,
                image_template=self.image_template,
                drop_unanswerable=drop_unanswerable,
            )
            for i, q in enumerate(self.questions)
        ]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)


@dataclass
class NLVR2Source:
    """An NLVR2 split: arrow tables, or official JSON-lines files each with its image folder.

    Attributes:
        arrow: ``.arrow`` files (``nlvr2_train.arrow``; ``nlvr2_dev.arrow`` + ``nlvr2_test1.arrow``).
        jsonl: ``train.json`` / ``dev.json`` / ``test1.json`` files.
        image_roots: one image folder per JSON-lines file.
    """

    arrow: list[Path] = field(default_factory=list)
    jsonl: list[Path] = field(default_factory=list)
    image_roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if bool(self.arrow) == bool(self.jsonl):
            raise ConfigError("an NLVR2 source needs either arrow files or jsonl files (not both)")
        if self.jsonl and len(self.image_roots) != len(self.jsonl):
            raise ConfigError(f"{len(self.jsonl)} jsonl files need as many image_roots, got {len(self.image_roots)}")

    def with_root(self, root: Path | None) -> NLVR2Source:
        """A copy with relative paths taken relative to ``root`` (None: unchanged)."""
        if root is None:
            return self
        return NLVR2Source(_under(root, self.arrow), _under(root, self.jsonl), _under(root, self.image_roots))

    def open(self, image_processor: ImageFn | None) -> Dataset:
        """The dataset of :class:`NLVR2Sample`."""
        if self.arrow:
            from vlkit.data.arrow import ArrowNLVR2Dataset

            return ArrowNLVR2Dataset(self.arrow, image_processor)
        parts = [NLVR2JsonDataset(p, root, image_processor) for p, root in zip(self.jsonl, self.image_roots)]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)


@dataclass
class RetrievalSource:
    """A retrieval split: caption arrow tables, or LAVIS-format caption JSON with an image folder.

    Attributes:
        arrow: ``.arrow`` caption tables (``f30k_caption_karpathy_train.arrow``, ``coco_caption_karpathy_*``).
        annotations: LAVIS caption JSON files (``flickr30k_train.json``; val/test files list captions per image).
        image_root: folder the JSON ``image`` paths are relative to.
    """

    arrow: list[Path] = field(default_factory=list)
    annotations: list[Path] = field(default_factory=list)
    image_root: Path | None = None

    def __post_init__(self) -> None:
        if bool(self.arrow) == bool(self.annotations):
            raise ConfigError("a retrieval source needs either arrow files or annotations files (not both)")
        if self.annotations and self.image_root is None:
            raise ConfigError("a retrieval source with annotations files needs image_root")

    def with_root(self, root: Path | None) -> RetrievalSource:
        """A copy with relative paths taken relative to ``root`` (None: unchanged)."""
        if root is None:
            return self
        image_root = None if self.image_root is None else root / self.image_root
        return RetrievalSource(_under(root, self.arrow), _under(root, self.annotations), image_root)

    def open(self, image_processor: ImageFn | None, *, train: bool) -> Dataset:
        """Training pairs (``train=True``) or the evaluation gallery (``text``, ``img2txt``, ``txt2img``)."""
        if self.arrow:
            from vlkit.data.arrow import ArrowCaptionDataset

            return ArrowCaptionDataset(self.arrow, image_processor, train=train)
        from vlkit.data.datasets import RetrievalDataset

        dataset = RetrievalDataset(self.annotations, self.image_root, image_processor)  # type: ignore[arg-type]
        if dataset.is_eval == train:
            kind = "one caption per entry (train)" if train else "caption lists per image (val/test)"
            raise DataError(f"{', '.join(map(str, self.annotations))}: expected {kind}")
        return dataset


def dataset_texts(dataset: Dataset) -> list[str]:
    """The texts of a VLMo dataset (questions, statements or captions) without reading images — e.g. to train
    a tokenizer. Works through ``ConcatDataset`` and on vlkit's caption/retrieval datasets."""
    if isinstance(dataset, ConcatDataset):
        return [t for part in dataset.datasets for t in dataset_texts(part)]
    if callable(getattr(dataset, "texts", None)):
        return list(dataset.texts())
    annotation = getattr(dataset, "annotation", None)
    if annotation is not None and not getattr(dataset, "is_eval", True):
        return [a["caption"] for a in annotation]  # RetrievalDataset / CaptionDataset train files
    if hasattr(dataset, "text"):
        return list(dataset.text)  # retrieval galleries
    raise DataError(f"cannot list the texts of a {type(dataset).__name__}")


# ---------------------------------------------------------------------------------------------- collation


def _keep(samples: Sequence[Any | None]) -> list[Any]:
    return [s for s in samples if s is not None]


class VQACollator:
    """Batch VQA samples: images, text padded to the tokenizer's length, dense soft-score targets.

    Returns a dict with ``image`` (B, 3, S, S), ``text_ids``/``text_mask`` (B, L), ``targets``
    (B, num_labels) float (the reference's ``vqa_targets``), ``question_id`` (B,) and ``question`` list.
    """

    def __init__(self, tokenizer: VLMoTokenizer, num_labels: int) -> None:
        self.tokenizer = tokenizer
        self.num_labels = int(num_labels)

    def __call__(self, samples: Sequence[VLMoVQASample | None]) -> dict[str, Any] | None:
        kept = _keep(samples)
        if not kept:
            return None
        ids, mask = self.tokenizer([s.question for s in kept])
        targets = torch.zeros(len(kept), self.num_labels)
        for row, sample in enumerate(kept):
            for label, score in zip(sample.labels, sample.scores):
                if not 0 <= label < self.num_labels:
                    raise DataError(
                        f"question {sample.question_id}: answer label {label} outside the classifier's "
                        f"{self.num_labels} labels"
                    )
                targets[row, label] = score
        return {
            "image": torch.stack([s.image for s in kept]),
            "text_ids": ids,
            "text_mask": mask,
            "targets": targets,
            "question_id": torch.tensor([s.question_id for s in kept], dtype=torch.long),
            "question": [s.question for s in kept],
        }


class NLVR2Collator:
    """Batch NLVR2 samples: ``image_0``/``image_1`` (B, 3, S, S), ``text_ids``/``text_mask``, ``labels`` (B,),
    ``identifier`` and ``table`` lists."""

    def __init__(self, tokenizer: VLMoTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[NLVR2Sample | None]) -> dict[str, Any] | None:
        kept = _keep(samples)
        if not kept:
            return None
        ids, mask = self.tokenizer([s.sentence for s in kept])
        return {
            "image_0": torch.stack([s.image_0 for s in kept]),
            "image_1": torch.stack([s.image_1 for s in kept]),
            "text_ids": ids,
            "text_mask": mask,
            "labels": torch.tensor([s.label for s in kept], dtype=torch.long),
            "identifier": [s.identifier for s in kept],
            "table": [s.table for s in kept],
        }


class RetrievalCollator:
    """Batch retrieval training pairs (:class:`RetrievalPair`, or vlkit's ``RetrievalSample``): ``image``,
    ``text_ids``/``text_mask``, ``image_index`` (B,)."""

    def __init__(self, tokenizer: VLMoTokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: Sequence[Any | None]) -> dict[str, Any] | None:
        kept = _keep(samples)
        if not kept:
            return None
        ids, mask = self.tokenizer([s.text for s in kept])
        index = [getattr(s, "image_index", getattr(s, "image_id", None)) for s in kept]
        return {
            "image": torch.stack([s.image for s in kept]),
            "text_ids": ids,
            "text_mask": mask,
            "image_index": torch.tensor(index, dtype=torch.long),
        }


__all__ = [
    "NLVR2Collator",
    "NLVR2Source",
    "RetrievalSource",
    "VQASource",
    "NLVR2JsonDataset",
    "NLVR2Sample",
    "RetrievalCollator",
    "RetrievalPair",
    "VLMoVQASample",
    "VQACollator",
    "dataset_texts",
    "VQAJsonDataset",
    "nlvr2_label",
]
