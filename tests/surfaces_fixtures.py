"""Tiny random models saved as vlkit folders (with their tokenizers), and test images, for the API, CLI and
server tests. Until the bundled shapes models exist these stand in for them.

* ``blip2``: a BLIP-2 with everything: stage-1 heads (ITC/ITM), the Q-Former MLM head and a tiny OPT LLM;
* ``stage1``: a BLIP-2 stage-1 model only (Q-Former captioning, classify, retrieve, itm, embed);
* ``instructblip``: an InstructBLIP with a tiny Vicuna-style LLaMA;
* ``vlmo``: a VLMo with a VQA classifier, ``tokenizer/vocab.txt`` and ``answer2label.txt``.

Weights are random but spread wide enough (LLM matrices ~ N(0, 0.3)) that generations vary with the image.
Folders are built once per process and reused.
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from stage2_reference import tokenizer as llm_tokenizer
from stage2_reference import write_bert_vocab

from vlkit import zoo
from vlkit.checkpoints.folder import save_pretrained
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.models.blip2 import Blip2
from vlkit.models.instructblip import InstructBlip
from vlkit.models.vlmo import VLMo, VLMoConfig
from vlkit.processors import QFormerTokenizer
from vlkit.prompting import instructblip_vicuna_tokenizer

KINDS = ("blip2", "stage1", "instructblip", "vlmo")
VLMO_ANSWERS = ("red", "green", "blue", "yellow", "circle", "square", "triangle", "1", "2", "3")
VLMO_WORDS = ("what", "color", "is", "the", "shape", "how", "many", "shapes", "are", "there", "?", "a", "of")

_lock = threading.Lock()
_built: dict[tuple[str, str], Path] = {}


def _spread(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Redraw every weight matrix from N(0, std) (norms and biases kept): a default init gives nearly the same
    output for every image, which would let a batching bug that mixes rows go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _readable_opt(model: Blip2, tok) -> None:
    """Zero the (tied) output rows of every token that is not letters/spaces or "\\n", so the random OPT
    writes readable words: a zero row scores 0 while the best of ~60 random rows scores well above."""
    keep = {tok.convert_tokens_to_ids(t) for t in ("\u010a",)}  # byte-level "\n", the caption end
    for i in range(len(tok)):
        text = tok.decode([i])
        if text.strip() and all(c.isalpha() or c == " " for c in text) and len(text.strip()) >= 2:
            keep.add(i)
    weight = model.llm.get_input_embeddings().weight
    with torch.no_grad():
        for i in range(weight.shape[0]):
            if i not in keep:
                weight[i].zero_()


def _blip2_config(*, with_lm: bool) -> zoo.Blip2Config:
    config = zoo.get_spec("tiny-blip2-eva").config()
    config = dataclasses.replace(config, qformer=dataclasses.replace(config.qformer, vocab_size=128))
    if with_lm:
        config = dataclasses.replace(config, lm=zoo.language_model(zoo.shrink_llm(zoo.opt_config("2.7b"))))
    return config


def build(kind: str, root: Path) -> Path:
    """Build (once) the tiny model folder ``kind`` under ``root`` and return its path."""
    key = (kind, str(root))
    with _lock:
        if key in _built:
            return _built[key]
        folder = root / f"tiny-{kind}"
        vocab = root / "bert_vocab.txt"
        if not vocab.is_file():
            write_bert_vocab(vocab)
        torch.manual_seed(1234)
        if kind in ("blip2", "stage1"):
            model = Blip2(_blip2_config(with_lm=kind == "blip2")).eval()
            _spread(model, 1)
            tok = llm_tokenizer("opt") if kind == "blip2" else None
            if tok is not None:
                _readable_opt(model, tok)
            save_pretrained(
                model,
                folder,
                llm_tokenizer=tok,
                qformer_tokenizer=QFormerTokenizer(vocab),
            )
        elif kind == "instructblip":
            model = InstructBlip(zoo.get_spec("tiny-instructblip-vicuna").config()).eval()
            _spread(model, 2)
            tok = instructblip_vicuna_tokenizer(llm_tokenizer("llama"))
            save_pretrained(model, folder, llm_tokenizer=tok, qformer_tokenizer=QFormerTokenizer(vocab))
        elif kind == "vlmo":
            config = VLMoConfig.preset("tiny", heads=("vqa",), vqa_num_labels=len(VLMO_ANSWERS))
            model = VLMo(config).eval()
            _spread(model, 3, std=0.1)
            save_pretrained(model, folder)
            (folder / "tokenizer").mkdir()
            words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VLMO_WORDS, *VLMO_ANSWERS]
            (folder / "tokenizer" / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
            VQAVocab(VLMO_ANSWERS).save(folder / "answer2label.txt")
        else:
            raise ValueError(kind)
        _built[key] = folder
        return folder


def shape_image(color: str = "red", shape: str = "circle", size: int = 48, background: str = "white") -> Image.Image:
    """A small RGB image of one coloured shape."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
    return image


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder: Path) -> list[Path]:
    """Four PNG files (red circle, blue square, green triangle, yellow circle) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]
    paths = []
    for i, (color, shape) in enumerate(specs):
        path = folder / f"{i}_{color}_{shape}.png"
        shape_image(color, shape).save(path)
        paths.append(path)
    return paths


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread (and a loaded 2-core machine punishes two badly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
