"""WebDataset tar shards of image-caption pairs (the layout of web-scale pretraining data: CC3M, CC12M, LAION
as written by img2dataset), read with random access so they train through the same resumable sampler as
every other dataset.

A shard is a plain tar file. Members that share a *key* (the member path up to the first dot of its file
name) form one sample: ``00042.jpg`` + ``00042.txt`` (+ ``00042.json``) is the sample ``00042``. The image is
the first of the :data:`IMAGE_EXTENSIONS` present; the caption is the ``.txt`` member, else the ``"caption"``
field of the ``.json`` member. Samples without an image or a caption are skipped and counted (web data has
holes; a shard with no usable sample at all is an error).

Reading: the constructor scans each shard's headers once (``tarfile`` seeks over member data, so this costs
one 512-byte read per member) and keeps, per sample, the byte offset and size of its image; ``load`` then
reads exactly those bytes. Captions are read during the scan. Shard lists are given as brace patterns, the
WebDataset convention: ``cc3m/{00000..00331}.tar``.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from vlkit.data.images import DEFAULT_MAX_PIXELS, load_image
from vlkit.errors import DataError, ImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SHARD_SEPARATOR = "#"  # "shard.tar#member": how a sample's image is named (keys, messages)

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(pattern: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The shard paths of a brace pattern (``data/{000..009}.tar``; several ranges multiply), relative to
    ``root`` unless absolute. Zero padding follows the range's first number.

    Raises:
        DataError: a reversed range, or a shard that does not exist.
    """
    parts: list[str] = [pattern]
    while any(_BRACE.search(p) for p in parts):
        expanded = []
        for part in parts:
            match = _BRACE.search(part)
            if match is None:
                expanded.append(part)
                continue
            first, last = match.group(1), match.group(2)
            if int(last) < int(first):
                raise DataError(f"shard pattern {pattern!r}: range {first}..{last} runs backwards")
            width = len(first)
            for number in range(int(first), int(last) + 1):
                expanded.append(part[: match.start()] + f"{number:0{width}d}" + part[match.end() :])
        parts = expanded
    paths = [Path(p) if root is None or Path(p).is_absolute() else Path(root) / p for p in parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard pattern {pattern!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
    return paths


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key, caption and where its image bytes are."""

    shard: Path
    key: str
    member: str  # the image member's name
    offset: int  # byte offset of the image data in the shard
    size: int
    caption: str

    @property
    def name(self) -> str:
        return f"{self.shard}{SHARD_SEPARATOR}{self.member}"


def _key_and_extension(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _caption_of(members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile, where: str) -> str | None:
    if "txt" in members:
        handle = tar.extractfile(members["txt"])
        return None if handle is None else handle.read().decode("utf-8").strip()
    if "json" in members:
        handle = tar.extractfile(members["json"])
        if handle is None:
            return None
        try:
            meta = json.loads(handle.read().decode("utf-8"))
        except ValueError as err:
            raise DataError(f"{where}: invalid JSON ({err})") from None
        caption = meta.get("caption") if isinstance(meta, dict) else None
        return caption.strip() if isinstance(caption, str) else None
    return None


def index_shard(path: str | os.PathLike) -> tuple[list[ShardSample], int]:
    """Scan one shard: its usable samples (in member order) and how many incomplete ones were skipped.

    Raises:
        DataError: not a readable tar file, or a JSON member that does not parse.
    """
    path = Path(path)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key_and_extension(info.name)
                groups.setdefault(key, {})[ext] = info
            samples: list[ShardSample] = []
            skipped = 0
            for key, members in groups.items():
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                caption = _caption_of(members, tar, f"{path}{SHARD_SEPARATOR}{key}")
                if image is None or not caption:
                    skipped += 1
                    continue
                samples.append(ShardSample(path, key, image.name, image.offset_data, image.size, caption))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable tar shard ({err})") from None
    return samples, skipped


class TarCaptionDataset:
    """Image-caption pairs from WebDataset tar shards, with the reader interface of
    :class:`vlkit.data.datasets.CaptionDataset` (train format): ``annotation`` entries ``{image, caption,
    image_id}`` (``image`` names the shard and member), ``img_ids``, ``load(image)``.

    Args:
        shards: shard files (see :func:`expand_shards`).
        image_processor: PIL image -> tensor.
        text_processor: caption normaliser (applied by ``__getitem__``).
        skip_bad_images: skip undecodable images with a warning instead of raising.
        max_pixels: pixel limit per image.
    """

    is_eval = False
    image_root = Path("/")  # ``image`` entries are absolute ("shard#member"); image_root / image == image

    def __init__(
        self,
        shards: Sequence[str | os.PathLike],
        image_processor: Callable[[Any], Tensor] | None = None,
        text_processor: Callable[[str], str] | None = None,
        *,
        skip_bad_images: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not shards:
            raise DataError("no tar shards given")
        self.image_processor = image_processor
        self.text_processor = text_processor or (lambda text: text)
        self.skip_bad_images = skip_bad_images
        self.max_pixels = max_pixels
        self.samples: dict[str, ShardSample] = {}
        self.annotation: list[dict[str, Any]] = []
        self.img_ids: dict[str, int] = {}
        self.skipped = 0
        for shard in shards:
            found, skipped = index_shard(Path(shard).resolve())
            if not found:
                raise DataError(f"{shard}: no sample with both an image and a caption")
            self.skipped += skipped
            for sample in found:
                self.samples[sample.name] = sample
                dense = self.img_ids.setdefault(sample.name, len(self.img_ids))
                self.annotation.append({"image": sample.name, "caption": sample.caption, "image_id": dense})
        if self.skipped:
            warnings.warn(f"tar shards: skipped {self.skipped} sample(s) without an image or a caption", stacklevel=2)

    def __len__(self) -> int:
        return len(self.annotation)

    def read_bytes(self, image: str) -> bytes:
        """The encoded image bytes of sample ``image`` (``"shard#member"``)."""
        sample = self.samples.get(str(image))
        if sample is None:
            raise DataError(f"{image}: not a sample of these shards")
        with open(sample.shard, "rb") as stream:
            stream.seek(sample.offset)
            data = stream.read(sample.size)
        if len(data) != sample.size:
            raise ImageError(f"{image}: truncated shard ({len(data)} of {sample.size} bytes)")
        return data

    def load(self, image: str) -> Tensor | None:
        """Decode and process one sample's image; None (with a warning) if bad and skipping is on."""
        try:
            decoded = load_image(self.read_bytes(image), max_pixels=self.max_pixels, name=str(image))
        except ImageError as err:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping bad image: {err}", stacklevel=2)
            return None
        return self.image_processor(decoded) if self.image_processor is not None else decoded

    def __getitem__(self, index: int) -> dict[str, Any]:
        ann = self.annotation[index]
        return {
            "image": self.load(ann["image"]),
            "text": self.text_processor(ann["caption"]),
            "image_id": ann["image_id"],
        }


def write_shards(
    pairs: Iterable[tuple[bytes, str, str]],
    pattern: str | os.PathLike,
    *,
    per_shard: int = 1000,
) -> list[Path]:
    """Write ``(image bytes, image extension, caption)`` pairs as WebDataset shards.

    Args:
        pairs: the samples, in order.
        pattern: output path with one ``{}`` for the shard number (``out/shard-{}.tar``), zero-padded to 6.
        per_shard: samples per shard.

    Returns:
        The shard paths written (each written to a temporary name first and renamed, so a crash leaves no
        half-written shard under the final name).
    """
    from vlkit.checkpoints.io import atomic_path

    if per_shard < 1:
        raise DataError(f"per_shard must be >= 1, got {per_shard}")
    if str(pattern).count("{}") != 1:
        raise DataError(f"shard pattern must contain one {{}}, got {str(pattern)!r}")
    written: list[Path] = []
    samples = iter(pairs)
    index = 0
    while chunk := list(itertools.islice(samples, per_shard)):
        path = Path(str(pattern).format(f"{len(written):06d}"))
        with atomic_path(path) as tmp, tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for data, ext, caption in chunk:
                key = f"{index:09d}"
                for suffix, payload in ((ext.lstrip(".").lower(), data), ("txt", caption.encode("utf-8"))):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                index += 1
        written.append(path)
    if not written:
        raise DataError("write_shards: no samples given")
    return written


def caption_file_pairs(
    annotations: Sequence[str | os.PathLike], images: str | os.PathLike
) -> Iterable[tuple[bytes, str, str]]:
    """The ``(image bytes, extension, caption)`` pairs of LAVIS caption files (train format: one per entry;
    eval format: one per caption), images read as stored (not re-encoded), for :func:`write_shards`."""
    from vlkit.data.datasets import CaptionDataset

    reader = CaptionDataset([Path(a) for a in annotations], images)
    for ann in reader.annotation:
        path = reader.image_root / ann["image"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
        ext = path.suffix.lstrip(".").lower()
        if ext not in IMAGE_EXTENSIONS:
            raise DataError(f"{path}: not an image extension WebDataset readers know ({', '.join(IMAGE_EXTENSIONS)})")
        for caption in ann["captions"] if reader.is_eval else [ann["caption"]]:
            yield data, ext, caption
