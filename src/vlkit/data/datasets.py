"""Datasets over the annotation formats the reference recipes use, returning typed samples.

- :class:`CaptionDataset` — LAVIS caption JSON (COCO-Karpathy, Flickr30k, VG): train files have one entry
  per caption ``{image, caption, image_id}``; val/test files one entry per image ``{image, caption: [...]}``.
- :class:`RetrievalDataset` — the same files for image-text retrieval (train pairs, or the eval view with
  ``text``, ``image``, ``img2txt`` and ``txt2img``).
- :class:`VQADataset` — the official VQAv2 pair: a questions JSON and (except for test) an annotations JSON.
- :class:`ImageFolderDataset` — one folder per class, optionally with a label-names file.
- :class:`InstructionDataset` — JSON lines ``{image, instruction, response}``.

Every dataset takes an image root, an image processor (PIL image -> tensor) and a text processor (str ->
str). A missing or corrupt image raises :class:`~vlkit.errors.ImageError` naming the file, or, with
``skip_bad_images=True``, is skipped with a warning (``__getitem__`` returns None and the collate functions
drop it). A malformed annotation file raises :class:`~vlkit.errors.DataError` naming the file and the entry.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from vlkit.data.images import DEFAULT_MAX_PIXELS, load_image
from vlkit.errors import DataError, ImageError

ImageFn = Callable[[Image.Image], Tensor]
TextFn = Callable[[str], str]
PathLike = str | os.PathLike

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# ----------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CaptionSample:
    """A training caption: ``image_id`` is a dense index (0, 1, ...) over the distinct images of the file."""

    image: Tensor  # (3, S, S)
    text: str
    image_id: int


@dataclass
class CaptionEvalSample:
    """An image to caption; ``image_id`` is the numeric suffix of its file name (the COCO id); ``captions``
    are its raw reference captions."""

    image: Tensor
    image_id: int
    captions: list[str]


@dataclass
class RetrievalSample:
    """A training image-text pair; ``image_id`` is a dense index used to mask positives in ITC."""

    image: Tensor
    text: str
    image_id: int


@dataclass
class RetrievalEvalSample:
    """An image of the retrieval gallery; ``index`` is its position in ``dataset.image``."""

    image: Tensor
    index: int


@dataclass
class VQASample:
    """A question with its distinct answers and their weights (fraction of the 10 annotators)."""

    image: Tensor
    question: str
    question_id: int
    image_id: int
    answers: list[str]  # distinct answers, first-seen order; empty without annotations
    weights: list[float]  # same length as answers, summing to 1
    question_type: str
    answer_type: str


@dataclass
class ClassificationSample:
    """An image and its class index (into ``dataset.classes``)."""

    image: Tensor
    label: int


@dataclass
class InstructionSample:
    """An image with an instruction and the expected response (both processed)."""

    image: Tensor
    instruction: str
    response: str


# ----------------------------------------------------------------------------------------------------------
# Annotation reading
# ----------------------------------------------------------------------------------------------------------


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file raises :class:`DataError` naming it (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such annotation file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from err


def _field(entry: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if key not in entry:
        raise DataError(f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{where}: key {key!r} should be {names}, got {type(value).__name__}")
    return value


def _list_of_str(entry: dict, key: str, where: str) -> list[str]:
    values = _field(entry, key, list, where)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{where}: {key}[{i}] should be str, got {type(value).__name__}")
    if not values:
        raise DataError(f"{where}: {key!r} is empty")
    return values


def _read_entries(paths: PathLike | Sequence[PathLike]) -> list[tuple[dict, str]]:
    """Entries of one or more JSON-list files, each with a ``file: entry N`` label for error messages."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[tuple[dict, str]] = []
    for path in paths:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
        for index, entry in enumerate(data):
            where = f"{path}: entry {index}"
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
            out.append((entry, where))
    if not out:
        raise DataError(f"{', '.join(map(str, paths))}: no entries")
    return out


def image_id_from_filename(image: str) -> int:
    """The COCO image id LAVIS derives from a file name: the digits after the last ``_`` of the stem.

    ``"val2014/COCO_val2014_000000391895.jpg"`` -> 391895; ``"1000092795.jpg"`` -> 1000092795.

    Raises:
        DataError: if that part is not a number.
    """
    suffix = Path(image).stem.split("_")[-1]
    if not suffix.isdigit():
        raise DataError(f"cannot derive a numeric image id from file name {image!r}")
    return int(suffix)


def _identity(x: Any) -> Any:
    return x


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


class _ImageDataset(Dataset):
    """Shared image loading: root, processor, pixel limit and the skip-bad-images policy."""

    def __init__(
        self,
        image_root: PathLike,
        image_processor: ImageFn | None,
        text_processor: TextFn | None,
        skip_bad_images: bool,
        max_pixels: int | None,
    ) -> None:
        self.image_root = Path(image_root)
        self.image_processor = image_processor or _identity
        self.text_processor = text_processor or _identity
        self.skip_bad_images = skip_bad_images
        self.max_pixels = max_pixels

    def load(self, relative: str) -> Tensor | None:
        """Load and process ``image_root / relative``; None (with a warning) if bad and skipping is on."""
        path = self.image_root / relative
        try:
            image = load_image(path, max_pixels=self.max_pixels)
        except ImageError as err:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping bad image: {err}", stacklevel=2)
            return None
        return self.image_processor(image)


class CaptionDataset(_ImageDataset):
    """LAVIS caption annotations (COCO-Karpathy, Flickr30k, VG caption JSON).

    Train files (``caption`` is a string) give :class:`CaptionSample` with a dense ``image_id`` (0, 1, ...
    in first-seen order of the entries' ``image_id``). Eval files (``caption`` is a list) give
    :class:`CaptionEvalSample` whose ``image_id`` is the numeric suffix of the file name, as LAVIS's COCO
    caption evaluation derives it.

    Args:
        ann_paths: one annotation file or several (concatenated in order).
        image_root: folder that the entries' ``image`` paths are relative to.
        image_processor: PIL image -> tensor (e.g. :class:`vlkit.processors.ImageEvalProcessor`).
        text_processor: caption normaliser (e.g. :class:`vlkit.processors.BlipCaptionProcessor`), train only.
        skip_bad_images: skip unreadable images with a warning instead of raising.
        max_pixels: pixel limit per image (decompression-bomb guard).
    """

    def __init__(
        self,
        ann_paths: PathLike | Sequence[PathLike],
        image_root: PathLike,
        image_processor: ImageFn | None = None,
        text_processor: TextFn | None = None,
        *,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(image_root, image_processor, text_processor, skip_bad_images, max_pixels)
        entries = _read_entries(ann_paths)
        self.is_eval = _is_eval_file(entries)
        self.annotation: list[dict[str, Any]] = []
        self.img_ids: dict[Any, int] = {}  # raw image id -> dense index (train)
        for entry, where in entries:
            image = _field(entry, "image", str, where)
            if self.is_eval:
                captions = _list_of_str(entry, "caption", where)
                try:
                    image_id = image_id_from_filename(image)
                except DataError as err:
                    raise DataError(f"{where}: {err}") from None
                self.annotation.append({"image": image, "captions": captions, "image_id": image_id})
            else:
                caption = _field(entry, "caption", str, where)
                raw_id = _field(entry, "image_id", (str, int), where)
                dense = self.img_ids.setdefault(raw_id, len(self.img_ids))
                self.annotation.append({"image": image, "caption": caption, "image_id": dense})

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int) -> CaptionSample | CaptionEvalSample | None:
        ann = self.annotation[index]
        image = self.load(ann["image"])
        if image is None:
            return None
        if self.is_eval:
            return CaptionEvalSample(image, ann["image_id"], list(ann["captions"]))
        return CaptionSample(image, self.text_processor(ann["caption"]), ann["image_id"])


def _is_eval_file(entries: list[tuple[dict, str]]) -> bool:
    kinds = set()
    for entry, where in entries:
        caption = entry.get("caption")
        if isinstance(caption, str):
            kinds.add("train")
        elif isinstance(caption, list):
            kinds.add("eval")
        elif "caption" not in entry:
            raise DataError(f"{where}: missing key 'caption'")
        else:
            raise DataError(f"{where}: key 'caption' should be str or list, got {type(caption).__name__}")
        if len(kinds) > 1:
            raise DataError(f"{where}: mixes single captions (train) and caption lists (eval) in one dataset")
    return kinds == {"eval"}


class RetrievalDataset(_ImageDataset):
    """Image-text retrieval over LAVIS caption annotations.

    Train files give :class:`RetrievalSample` (one per caption, dense ``image_id``). Eval files give
    :class:`RetrievalEvalSample` (one per image) and expose the gallery as LAVIS does:

    - ``text``: every caption, processed, in file order;
    - ``image``: every image path;
    - ``img2txt[i]``: indices into ``text`` of image i's captions;
    - ``txt2img[t]``: index of the image that caption t describes.

    Arguments are those of :class:`CaptionDataset`.
    """

    def __init__(
        self,
        ann_paths: PathLike | Sequence[PathLike],
        image_root: PathLike,
        image_processor: ImageFn | None = None,
        text_processor: TextFn | None = None,
        *,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(image_root, image_processor, text_processor, skip_bad_images, max_pixels)
        entries = _read_entries(ann_paths)
        self.is_eval = _is_eval_file(entries)
        self.annotation: list[dict[str, Any]] = []
        self.img_ids: dict[Any, int] = {}
        self.text: list[str] = []
        self.image: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for entry, where in entries:
            image = _field(entry, "image", str, where)
            if self.is_eval:
                captions = _list_of_str(entry, "caption", where)
                img_index = len(self.image)
                self.image.append(image)
                self.img2txt[img_index] = []
                for caption in captions:
                    self.img2txt[img_index].append(len(self.text))
                    self.txt2img[len(self.text)] = img_index
                    self.text.append(self.text_processor(caption))
                self.annotation.append({"image": image})
            else:
                caption = _field(entry, "caption", str, where)
                raw_id = _field(entry, "image_id", (str, int), where)
                dense = self.img_ids.setdefault(raw_id, len(self.img_ids))
                self.annotation.append({"image": image, "caption": caption, "image_id": dense})

    def __len__(self) -> int:
        return len(self.annotation)

    def __getitem__(self, index: int) -> RetrievalSample | RetrievalEvalSample | None:
        ann = self.annotation[index]
        image = self.load(ann["image"])
        if image is None:
            return None
        if self.is_eval:
            return RetrievalEvalSample(image, index)
        return RetrievalSample(image, self.text_processor(ann["caption"]), ann["image_id"])


#: Where the official VQAv2 release keeps images, relative to the COCO image root.
COCO_VQA_IMAGE_TEMPLATE = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"


class VQADataset(_ImageDataset):
    """The official VQAv2 pair: questions JSON (+ annotations JSON for train/val).

    Image files are found from each question's ``image_id`` with ``image_template`` (a ``str.format``
    pattern over ``image_id`` and ``data_subtype``; the official COCO layout by default, the shapes world's
    pattern is in its manifest).

    Args:
        questions_path: ``{"questions": [{"image_id", "question", "question_id"}], "data_subtype"?}``.
        annotations_path: ``{"annotations": [{"question_id", "image_id", "answers": [{"answer"}...],
            "question_type", "answer_type", "multiple_choice_answer"}]}``, or None (test questions).
        image_root: folder the template is relative to.
        image_processor: PIL image -> tensor.
        text_processor: question normaliser (e.g. :class:`vlkit.processors.BlipQuestionProcessor`).
        answer_processor: applied to each answer before weighting (default: unchanged).
        image_template: pattern of image paths.
        data_subtype: overrides the questions file's ``data_subtype`` in the template.
        skip_bad_images: skip unreadable images with a warning instead of raising.
        max_pixels: pixel limit per image.
    """

    def __init__(
        self,
        questions_path: PathLike,
        annotations_path: PathLike | None,
        image_root: PathLike,
        image_processor: ImageFn | None = None,
        text_processor: TextFn | None = None,
        *,
        answer_processor: TextFn | None = None,
        image_template: str = COCO_VQA_IMAGE_TEMPLATE,
        data_subtype: str | None = None,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(image_root, image_processor, text_processor, skip_bad_images, max_pixels)
        self.answer_processor = answer_processor or _identity
        q_data = read_json(questions_path)
        where = f"{questions_path}"
        questions = _field(q_data, "questions", list, where)
        subtype = data_subtype if data_subtype is not None else q_data.get("data_subtype")
        if subtype is None and "{data_subtype" in image_template:
            raise DataError(f"{questions_path}: no 'data_subtype' key to fill {image_template!r}; pass data_subtype=")
        by_qid: dict[int, dict] = {}
        if annotations_path is not None:
            a_data = read_json(annotations_path)
            for index, ann in enumerate(_field(a_data, "annotations", list, f"{annotations_path}")):
                at = f"{annotations_path}: annotation {index}"
                qid = _field(ann, "question_id", int, at)
                _field(ann, "image_id", int, at)
                answers = _field(ann, "answers", list, at)
                if not answers:
                    raise DataError(f"{at}: 'answers' is empty")
                for k, answer in enumerate(answers):
                    _field(answer, "answer", str, f"{at}: answers[{k}]")
                if qid in by_qid:
                    raise DataError(f"{at}: duplicate question_id {qid}")
                by_qid[qid] = ann
        self.has_answers = annotations_path is not None
        self.questions: list[dict[str, Any]] = []
        for index, q in enumerate(questions):
            at = f"{questions_path}: question {index}"
            qid = _field(q, "question_id", int, at)
            image_id = _field(q, "image_id", int, at)
            text = _field(q, "question", str, at)
            try:
                image = image_template.format(image_id=image_id, data_subtype=subtype)
            except (KeyError, ValueError, IndexError) as err:
                raise DataError(f"{at}: image_template {image_template!r} cannot be filled ({err})") from None
            record: dict[str, Any] = {
                "question_id": qid,
                "image_id": image_id,
                "question": text,
                "image": image,
                "answers": [],
                "question_type": "",
                "answer_type": "",
            }
            if self.has_answers:
                if qid not in by_qid:
                    raise DataError(f"{annotations_path}: no annotation for question_id {qid} ({at})")
                ann = by_qid[qid]
                if ann["image_id"] != image_id:
                    raise DataError(
                        f"{annotations_path}: question_id {qid} has image_id {ann['image_id']} but the question "
                        f"says {image_id}"
                    )
                record["answers"] = [a["answer"] for a in ann["answers"]]
                record["question_type"] = str(ann.get("question_type", ""))
                record["answer_type"] = str(ann.get("answer_type", ""))
            self.questions.append(record)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> VQASample | None:
        q = self.questions[index]
        image = self.load(q["image"])
        if image is None:
            return None
        weights: dict[str, float] = {}
        raw = [self.answer_processor(a) for a in q["answers"]]
        for answer in raw:
            weights[answer] = weights.get(answer, 0.0) + 1 / len(raw)
        return VQASample(
            image=image,
            question=self.text_processor(q["question"]),
            question_id=q["question_id"],
            image_id=q["image_id"],
            answers=list(weights),
            weights=list(weights.values()),
            question_type=q["question_type"],
            answer_type=q["answer_type"],
        )


def read_labels(path: PathLike) -> list[str]:
    """Class names from a label file: one per line, blank lines ignored, line order = label index."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{path}: no such label file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    names = [line.strip() for line in lines if line.strip()]
    seen: set[str] = set()
    for number, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"{path}: label {name!r} appears twice (label {number})")
        seen.add(name)
    if not names:
        raise DataError(f"{path}: no labels")
    return names


class ImageFolderDataset(_ImageDataset):
    """Classification images stored as ``root/{class name}/*.png``.

    Without ``labels_file`` the classes are the sorted sub-folder names (torchvision's ImageFolder order);
    with it, the file's line order, and every sub-folder must be listed there.

    Args:
        root: folder of class folders.
        image_processor: PIL image -> tensor.
        labels_file: optional label-names file (e.g. the shapes world's ``classification/labels.txt``).
        extensions: image file suffixes to include (case-insensitive).
        skip_bad_images: skip unreadable images with a warning instead of raising.
        max_pixels: pixel limit per image.
    """

    def __init__(
        self,
        root: PathLike,
        image_processor: ImageFn | None = None,
        labels_file: PathLike | None = None,
        *,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(root, image_processor, None, skip_bad_images, max_pixels)
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root}: no such image folder")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if labels_file is not None:
            self.classes = read_labels(labels_file)
            unknown = [f for f in folders if f not in set(self.classes)]
            if unknown:
                raise DataError(f"{root}: folders {unknown[:5]} are not listed in {labels_file}")
        else:
            self.classes = folders
        if not self.classes:
            raise DataError(f"{root}: no class folders")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        suffixes = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            folder = root / name
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.is_file() and file.suffix.lower() in suffixes:
                    self.samples.append((f"{name}/{file.name}", self.class_to_idx[name]))
        if not self.samples:
            raise DataError(f"{root}: no images with suffixes {list(suffixes)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ClassificationSample | None:
        relative, label = self.samples[index]
        image = self.load(relative)
        return None if image is None else ClassificationSample(image, label)


class InstructionDataset(_ImageDataset):
    """Instruction-tuning records, one JSON object per line: ``{"image", "instruction", "response"}``.

    Args:
        path: the JSONL file (blank lines are ignored).
        image_root: folder the ``image`` paths are relative to.
        image_processor: PIL image -> tensor.
        text_processor: applied to instructions (InstructBLIP: ``blip_question``).
        response_processor: applied to responses (InstructBLIP: ``blip_caption``); unchanged by default.
        skip_bad_images: skip unreadable images with a warning instead of raising.
        max_pixels: pixel limit per image.
    """

    def __init__(
        self,
        path: PathLike,
        image_root: PathLike,
        image_processor: ImageFn | None = None,
        text_processor: TextFn | None = None,
        response_processor: TextFn | None = None,
        *,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(image_root, image_processor, text_processor, skip_bad_images, max_pixels)
        self.response_processor = response_processor or _identity
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as err:
            raise DataError(f"{path}: no such instruction file") from err
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read ({err})") from err
        self.records: list[dict[str, str]] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            self.records.append({key: _field(record, key, str, where) for key in ("image", "instruction", "response")})
        if not self.records:
            raise DataError(f"{path}: no records")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> InstructionSample | None:
        record = self.records[index]
        image = self.load(record["image"])
        if image is None:
            return None
        return InstructionSample(
            image, self.text_processor(record["instruction"]), self.response_processor(record["response"])
        )
