"""ViLT/VLMo ``.arrow`` datasets, read with pyarrow (the optional ``arrow`` extra, imported lazily).

The reference converts every dataset into Arrow IPC files (``vlmo/utils/write_*.py``): one row per image,
the encoded image bytes in an ``image`` column (``image_0``/``image_1`` for NLVR2) and a list of texts per
row; a sample is one (row, text) pair, and the row index identifies the image (``img_index``). Column layouts:

================  =========================================================================================
VQAv2             ``image``, ``questions`` [str], ``answers`` [[str]], ``answer_labels`` [[int]],
                  ``answer_scores`` [[float]], ``image_id``, ``question_id`` [int], ``split``
                  (test tables hold empty answer lists)
NLVR2             ``image_0``, ``image_1``, ``questions`` [str], ``answers`` [str "True"/"False"],
                  ``identifier``
captions          ``image``, ``caption`` [str], ``image_id``, ``split`` (COCO / Flickr30k Karpathy)
================  =========================================================================================

Several files are concatenated in order (the reference's train split is ``vqav2_train`` +
``vqav2_trainable_val``); each row remembers the file it came from (its "table"). Unlike the reference, a
missing file or column is an error naming it, not a silently smaller dataset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from vlkit.data.datasets import RetrievalEvalSample
from vlkit.data.images import DEFAULT_MAX_PIXELS, load_image
from vlkit.data.vlmo import NLVR2Sample, RetrievalPair, VLMoVQASample, nlvr2_label
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.errors import DataError, ImageError

ImageFn = Callable[[Any], Tensor]
PathLike = str | os.PathLike

VQA_COLUMNS = ("image", "questions", "answers", "answer_labels", "answer_scores", "question_id")
NLVR2_COLUMNS = ("image_0", "image_1", "questions", "answers")
CAPTION_COLUMNS = ("image", "caption")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodule used below)
    except ImportError as err:  # pragma: no cover - pyarrow is installed in the test environment
        raise DataError("reading .arrow datasets needs pyarrow: pip install 'vlkit[arrow]'") from err
    return pyarrow


def arrow_paths(root: PathLike, names: Sequence[str]) -> list[Path]:
    """``root/{name}.arrow`` for each name (the reference's ``data_dir`` + ``names``)."""
    return [Path(root) / f"{name}.arrow" for name in names]


def read_arrow(paths: PathLike | Sequence[PathLike], columns: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """Read and concatenate Arrow IPC files (memory-mapped, so image bytes stay on disk until used).

    Args:
        paths: one ``.arrow`` file or several, concatenated in order.
        columns: columns every file must have.

    Returns:
        ``(table, table_names)``: the ``pyarrow.Table`` and, per row, the stem of the file it came from.

    Raises:
        DataError: a missing or unreadable file, or a missing column (naming both).
    """
    pa = _pyarrow()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no .arrow files given")
    tables, names = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(f"{path}: no such .arrow file")
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not an Arrow IPC file ({err})") from err
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; it has {table.column_names}")
        tables.append(table)
        names += [path.stem] * table.num_rows
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
    return table, names


class _ArrowImages(Dataset):
    """Image decoding shared by the arrow datasets."""

    def __init__(self, paths: PathLike | Sequence[PathLike], columns: Sequence[str], image_processor: ImageFn | None):
        self.table, self.table_names = read_arrow(paths, columns)
        self.image_processor = image_processor or (lambda image: image)
        self.max_pixels: int | None = DEFAULT_MAX_PIXELS

    def image(self, row: int, column: str = "image") -> Tensor:
        """Decode and process the image bytes of ``row``."""
        data = self.table.column(column)[row].as_py()
        name = f"{self.table_names[row]}.arrow row {row} column {column}"
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"{name}: expected encoded image bytes, got {type(data).__name__}")
        return self.image_processor(load_image(data, max_pixels=self.max_pixels, name=name))

    def _texts(self, column: str) -> list[list[str]]:
        values = self.table.column(column).to_pylist()
        for row, texts in enumerate(values):
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise DataError(f"{self.table_names[row]}.arrow row {row}: column {column!r} must be a list of strings")
        return values


class ArrowVQADataset(_ArrowImages):
    """VQAv2 arrow tables (``vqav2_train``, ``vqav2_trainable_val``, ``vqav2_rest_val``, ``vqav2_test``...).

    One :class:`~vlkit.data.vlmo.VLMoVQASample` per (row, question), with the table's ``answer_labels`` and
    ``answer_scores`` as the target (empty for test tables).

    Args:
        paths: the ``.arrow`` files.
        image_processor: PIL image -> tensor.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], image_processor: ImageFn | None = None) -> None:
        super().__init__(paths, VQA_COLUMNS, image_processor)
        questions = self._texts("questions")
        qids = self.table.column("question_id").to_pylist()
        labels = self.table.column("answer_labels").to_pylist()
        scores = self.table.column("answer_scores").to_pylist()
        self.samples: list[tuple[int, str, int, list[int], list[float]]] = []
        for row, texts in enumerate(questions):
            where = f"{self.table_names[row]}.arrow row {row}"
            if len(qids[row]) != len(texts):
                raise DataError(f"{where}: {len(texts)} questions but {len(qids[row])} question ids")
            row_labels, row_scores = labels[row] or [], scores[row] or []
            if row_labels and len(row_labels) != len(texts):
                raise DataError(f"{where}: {len(texts)} questions but {len(row_labels)} answer label lists")
            for j, text in enumerate(texts):
                lab = list(row_labels[j]) if row_labels else []
                sco = [float(s) for s in row_scores[j]] if row_labels else []
                if len(lab) != len(sco):
                    raise DataError(f"{where}: question {j} has {len(lab)} labels but {len(sco)} scores")
                self.samples.append((row, text, int(qids[row][j]), lab, sco))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> VLMoVQASample:
        row, question, qid, labels, scores = self.samples[index]
        return VLMoVQASample(self.image(row), question, qid, list(labels), list(scores))

    @property
    def has_answers(self) -> bool:
        """Whether any question carries a target (False for test tables)."""
        return any(labels for _, _, _, labels, _ in self.samples)

    def answers(self, index: int) -> tuple[list[int], list[float]]:
        """``(labels, scores)`` of sample ``index`` without decoding its image."""
        _, _, _, labels, scores = self.samples[index]
        return list(labels), list(scores)

    @property
    def question_ids(self) -> list[int]:
        return [qid for _, _, qid, _, _ in self.samples]

    def texts(self) -> list[str]:
        """Every question, in order (no image is decoded)."""
        return [question for _, question, _, _, _ in self.samples]


def arrow_vqa_vocab(paths: PathLike | Sequence[PathLike]) -> VQAVocab:
    """Rebuild the answer vocabulary from the ``answers``/``answer_labels`` columns of VQA tables.

    This is how the reference recovers ``id2answer`` at test time. Labels that no table mentions cannot be
    named; then the full label file (``answer2label.txt``) is needed.

    Raises:
        DataError: on a label with two answers, or gaps in the label ids.
    """
    table, names = read_arrow(paths, ("answers", "answer_labels"))
    answer_of: dict[int, str] = {}
    for row, (answers, labels) in enumerate(
        zip(table.column("answers").to_pylist(), table.column("answer_labels").to_pylist())
    ):
        for q_answers, q_labels in zip(answers or [], labels or []):
            for answer, label in zip(q_answers, q_labels):
                if answer_of.setdefault(int(label), answer) != answer:
                    raise DataError(
                        f"{names[row]}.arrow row {row}: label {label} is both {answer_of[int(label)]!r} and {answer!r}"
                    )
    if not answer_of:
        raise DataError("the VQA tables hold no answers (test tables?); pass the label file (answer2label.txt)")
    size = max(answer_of) + 1
    gaps = [i for i in range(size) if i not in answer_of]
    if gaps:
        raise DataError(
            f"labels {gaps[:10]}{' ...' if len(gaps) > 10 else ''} of {size} never occur in the tables, so their "
            "answers are unknown; pass the full label file (answer2label.txt)"
        )
    return VQAVocab(tuple(answer_of[i] for i in range(size)))


class ArrowNLVR2Dataset(_ArrowImages):
    """NLVR2 arrow tables (``nlvr2_train``, ``nlvr2_dev``, ``nlvr2_test1``): one
    :class:`~vlkit.data.vlmo.NLVR2Sample` per (row, statement); ``table`` is the file's stem."""

    def __init__(self, paths: PathLike | Sequence[PathLike], image_processor: ImageFn | None = None) -> None:
        super().__init__(paths, NLVR2_COLUMNS, image_processor)
        questions = self._texts("questions")
        answers = self.table.column("answers").to_pylist()
        identifiers = self.table.column("identifier").to_pylist() if "identifier" in self.table.column_names else None
        self.samples: list[tuple[int, str, int, str]] = []
        for row, texts in enumerate(questions):
            where = f"{self.table_names[row]}.arrow row {row}"
            if len(answers[row]) != len(texts):
                raise DataError(f"{where}: {len(texts)} statements but {len(answers[row])} answers")
            ident = str(identifiers[row]) if identifiers is not None else str(row)
            for j, text in enumerate(texts):
                label = nlvr2_label(answers[row][j], f"{where} answer {j}")
                self.samples.append((row, text, label, f"{ident}-{j}"))

    def __len__(self) -> int:
        return len(self.samples)

    def texts(self) -> list[str]:
        """Every statement, in order (no image is decoded)."""
        return [text for _, text, _, _ in self.samples]

    def __getitem__(self, index: int) -> NLVR2Sample:
        row, text, label, identifier = self.samples[index]
        return NLVR2Sample(
            self.image(row, "image_0"), self.image(row, "image_1"), text, label, identifier, self.table_names[row]
        )


class ArrowCaptionDataset(_ArrowImages):
    """COCO / Flickr30k Karpathy caption tables for retrieval.

    ``train=True``: one :class:`~vlkit.data.vlmo.RetrievalPair` per (row, caption), ``image_index`` = row.
    ``train=False``: the evaluation gallery — ``dataset[i]`` is image ``i``
    (:class:`~vlkit.data.datasets.RetrievalEvalSample`) and, as :class:`vlkit.data.datasets.RetrievalDataset`,
    ``text`` lists every caption, ``img2txt[i]`` the captions of image ``i`` and ``txt2img[t]`` the image of
    caption ``t``.
    """

    def __init__(
        self, paths: PathLike | Sequence[PathLike], image_processor: ImageFn | None = None, *, train: bool = True
    ) -> None:
        super().__init__(paths, CAPTION_COLUMNS, image_processor)
        self.is_eval = not train
        captions = self._texts("caption")
        self.pairs: list[tuple[int, str]] = [(row, text) for row, texts in enumerate(captions) for text in texts]
        self.text: list[str] = [text for _, text in self.pairs]
        self.txt2img: dict[int, int] = {t: row for t, (row, _) in enumerate(self.pairs)}
        self.img2txt: dict[int, list[int]] = {row: [] for row in range(len(captions))}
        for t, (row, _) in enumerate(self.pairs):
            self.img2txt[row].append(t)

    def texts(self) -> list[str]:
        """Every caption, in order (no image is decoded)."""
        return list(self.text)

    def __len__(self) -> int:
        return len(self.img2txt) if self.is_eval else len(self.pairs)

    def __getitem__(self, index: int) -> RetrievalPair | RetrievalEvalSample:
        if self.is_eval:
            return RetrievalEvalSample(self.image(index), index)
        row, text = self.pairs[index]
        return RetrievalPair(self.image(row), text, row)


__all__ = [
    "ArrowCaptionDataset",
    "ArrowNLVR2Dataset",
    "ArrowVQADataset",
    "arrow_paths",
    "arrow_vqa_vocab",
    "read_arrow",
]
