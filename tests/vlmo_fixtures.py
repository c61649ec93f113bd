"""Builders shared by the VLMo task/data/eval tests: arrow tables in the reference's column layout (written
the way ``vlmo/utils/write_*.py`` write them: ``RecordBatchFileWriter`` over an ``OSFile``), PNG bytes, tiny
models and tokenizers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from vlkit.data.vlmo_text import train_wordpiece
from vlkit.models.vlmo import VLMo, VLMoConfig

TINY = {
    "hidden_size": 32,
    "depth": 2,
    "num_heads": 2,
    "vlffn_start_layer": 1,
    "image_size": 32,
    "patch_size": 16,
    "max_text_len": 12,
    "max_text_len_of_initckpt": 16,
    "drop_path_rate": 0.0,
}


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small random RGB PNG (non-square, so the square resize is exercised)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_arrow(path: Path, columns: dict[str, list[Any]]) -> Path:
    """Write one table as the reference does (``pa.RecordBatchFileWriter`` on a ``pa.OSFile``)."""
    table = pa.table(columns)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.RecordBatchFileWriter(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def vqa_table(path: Path, rows: list[dict[str, Any]], *, test: bool = False, seed: int = 0) -> Path:
    """``vqav2_*.arrow``: one row per image with its questions (``rows``: questions, qids, answers, labels,
    scores, image_id)."""
    return write_arrow(
        path,
        {
            "image": [png_bytes(seed + i) for i in range(len(rows))],
            "questions": [r["questions"] for r in rows],
            "answers": [[] if test else r["answers"] for r in rows],
            "answer_labels": [[] if test else r["labels"] for r in rows],
            "answer_scores": [[] if test else r["scores"] for r in rows],
            "image_id": [r["image_id"] for r in rows],
            "question_id": [r["qids"] for r in rows],
            "split": ["test" if test else "train"] * len(rows),
        },
    )


def nlvr2_table(path: Path, rows: list[dict[str, Any]], *, seed: int = 100) -> Path:
    """``nlvr2_*.arrow``: image_0, image_1, questions, answers ("True"/"False"), identifier."""
    return write_arrow(
        path,
        {
            "image_0": [png_bytes(seed + 2 * i) for i in range(len(rows))],
            "image_1": [png_bytes(seed + 2 * i + 1) for i in range(len(rows))],
            "questions": [r["questions"] for r in rows],
            "answers": [r["answers"] for r in rows],
            "identifier": [r["identifier"] for r in rows],
        },
    )


def caption_table(path: Path, captions: list[list[str]], *, seed: int = 200) -> Path:
    """``f30k_caption_karpathy_*.arrow``: image, caption (list), image_id (file name), split."""
    return write_arrow(
        path,
        {
            "image": [png_bytes(seed + i) for i in range(len(captions))],
            "caption": captions,
            "image_id": [f"{1000 + i}.jpg" for i in range(len(captions))],
            "split": ["test"] * len(captions),
        },
    )


WORDS = "what color is the red blue green circle square triangle how many shapes are there yes no a dog cat on mat"


def tiny_tokenizer_dir(path: Path) -> Path:
    """A WordPiece vocabulary trained on a few test sentences."""
    sentences = [WORDS, "is there a red circle?", "the dog is on the mat", "two cats", "how many dogs?"]
    return train_wordpiece(sentences, path, vocab_size=120)


def tiny_vlmo(heads: tuple[str, ...], vocab_size: int, **overrides: Any) -> VLMo:
    """A tiny VLMo with the given heads (deterministic under the test seed)."""
    return VLMo(VLMoConfig.preset("tiny", **{**TINY, "heads": heads, "vocab_size": vocab_size, **overrides}))


def pretrained_like(path: Path, vocab_size: int, *, std: float = 0.15, seed: int = 0, **overrides: Any) -> Path:
    """A unilm checkpoint of a tiny model whose features already differ across inputs, as a pretrained
    model's do. (At the reference initialisation a tiny model's CLS features are nearly identical for every
    input, and a contrastive loss hardly moves in a few steps.) Fully determined by ``seed``."""
    import torch

    from vlkit.checkpoints.unilm import save_unilm_checkpoint

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tiny_vlmo(("irtr", "itm"), vocab_size, **overrides)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim == 2 and ("blocks" in name or "proj" in name):
                    param.normal_(0.0, std)
                if "gamma" in name:
                    param.fill_(1.0)
    save_unilm_checkpoint(model, path)
    return path
