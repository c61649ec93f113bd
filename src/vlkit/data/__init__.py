"""Data: safe image loading, datasets over the reference annotation formats, collation, and the synthetic
shapes world (``vlkit data shapes``)."""

from __future__ import annotations

from vlkit.data.collate import TextCollator, collate, collate_vqa
from vlkit.data.datasets import (
    CaptionDataset,
    CaptionEvalSample,
    CaptionSample,
    ClassificationSample,
    ImageFolderDataset,
    InstructionDataset,
    InstructionSample,
    RetrievalDataset,
    RetrievalEvalSample,
    RetrievalSample,
    VQADataset,
    VQASample,
    image_id_from_filename,
    read_json,
    read_labels,
)
from vlkit.data.images import DEFAULT_MAX_PIXELS, load_image
from vlkit.data.shapes import ShapesPaths, generate_shapes_world, shapes_paths

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "CaptionDataset",
    "CaptionEvalSample",
    "CaptionSample",
    "ClassificationSample",
    "ImageFolderDataset",
    "InstructionDataset",
    "InstructionSample",
    "RetrievalDataset",
    "RetrievalEvalSample",
    "RetrievalSample",
    "TextCollator",
    "VQADataset",
    "VQASample",
    "collate",
    "collate_vqa",
    "generate_shapes_world",
    "shapes_paths",
    "ShapesPaths",
    "image_id_from_filename",
    "load_image",
    "read_json",
    "read_labels",
]
