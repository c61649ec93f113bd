"""Pieces shared by the training tasks: data paths, ViT layer ids, ViT weight files, tokenizers, image-text pairs.

Nothing here knows a recipe: tasks pass plain values in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlkit.data.datasets import CaptionDataset
from vlkit.data.webdataset import TarCaptionDataset
from vlkit.errors import CheckpointError, ConfigError
from vlkit.layers.vit import VisionTransformer


def resolve_path(path: str | os.PathLike | None, root: str | os.PathLike | None) -> Path | None:
    """``path`` made absolute against ``root`` (the recipe's data root) when it is relative."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_absolute() or root is None:
        return path
    return Path(root).expanduser() / path


# ----------------------------------------------------------------------------------------------------------
# ViT: layer ids for layer-wise lr decay, weight files
# ----------------------------------------------------------------------------------------------------------


def vit_layer_id(prefix: str, depth: int) -> Callable[[str], int | None]:
    """Layer index of ViT parameters for layer-wise lr decay, numbered as LAVIS does (blip2-spec §2.6).

    ``cls_token``, ``pos_embed``, ``patch_embed`` and the CLIP stem norm (``norm_pre``) are layer 0, block
    ``i`` is layer ``i + 1``, any other ViT parameter is layer ``depth``; parameters outside the ViT get
    None (lr scale 1). Use with ``num_layers = depth + 1``, so block ``i`` is scaled by
    ``decay ** (depth - i)``.

    Args:
        prefix: the ViT's parameter-name prefix in the task model, e.g. ``"blip2.vision."``.
        depth: number of ViT blocks.
    """

    def layer_id(name: str) -> int | None:
        if not name.startswith(prefix):
            return None
        rest = name[len(prefix) :]
        if rest.startswith(("cls_token", "pos_embed", "patch_embed", "norm_pre")):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
        return depth

    return layer_id


def load_vit_file(vision: VisionTransformer, path: str | os.PathLike) -> int:
    """Load an EVA-CLIP (``eva_vit_g.pth``) or OpenAI-CLIP (``clip_vit_L.pth``) ViT file into ``vision``.

    The file's last block is dropped when it has one more than the model (BLIP-2 uses the second-to-last
    block), its final norm/projection is ignored, and the position embedding is resized to the model's grid,
    exactly as for LAVIS checkpoints (:mod:`vlkit.checkpoints.lavis`). Every other key must fit.

    Returns:
        The number of tensors loaded.

    Raises:
        CheckpointError: unknown or missing keys, shape mismatches, or a file of the other ViT kind.
    """
    from vlkit.checkpoints import lavis
    from vlkit.checkpoints.io import read_checkpoint, state_dict_of
    from vlkit.checkpoints.keymap import load_exact, map_keys

    source = str(path)
    state_dict = state_dict_of(read_checkpoint(path), source=source)
    kind = lavis.vision_kind_of(state_dict)
    config = vision.config
    if kind != config.kind:
        raise CheckpointError(f"{source}: a {kind or 'unrecognised'} ViT file, but the model's ViT is {config.kind!r}")
    kept = lavis.drop_extra_blocks(state_dict, config, source=source)
    ours = map_keys(kept, lavis.vision_file_key_map(config), source=source)
    if config.kind == "clip":
        lavis._clip_shapes(ours)
    lavis.fit_pos_embed(ours, config, source=source)
    ours = {k.removeprefix("vision."): v for k, v in ours.items()}
    load_exact(vision, ours, source=source)
    return len(ours)


# ----------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------


def qformer_tokenizer(*candidates: str | os.PathLike | None):
    """The Q-Former tokenizer from the first usable candidate (vocab.txt, tokenizer or model folder).

    Falls back to the bert-base-uncased vocabulary shipped by an installed package
    (:func:`vlkit.processors.find_bert_vocab`).

    Raises:
        ConfigError: if no candidate holds a tokenizer and no bert-base-uncased vocabulary is installed.
    """
    from vlkit.processors import QFormerTokenizer, find_bert_vocab

    for candidate in candidates:
        if candidate is None:
            continue
        path = Path(candidate)
        if path.is_file() or (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file():
            return QFormerTokenizer(path)
    vocab = find_bert_vocab()
    if vocab is None:
        raise ConfigError(
            "no Q-Former tokenizer: set task.tokenizer (a vocab.txt or tokenizer folder, e.g. from "
            "`vlkit data tokenizers`), or install a package that ships bert-base-uncased's vocab.txt"
        )
    return QFormerTokenizer(vocab)


# ----------------------------------------------------------------------------------------------------------
# Image-text pairs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One training pair: which source, the image path relative to its root, the caption, a dense image id."""

    source: int
    image: str
    caption: str
    image_id: int


class PairDataset(Dataset):
    """Image-caption pairs from LAVIS caption files or WebDataset tar shards, as dict samples.

    Train-format files (one caption per entry) give one pair per entry; eval-format files (a caption list
    per image) give one pair per caption. ``image_id`` is a dense index over the distinct images of all
    sources together (what retrieval fine-tuning's ITC needs); ``key`` is the image's full path (the
    frozen-feature cache key).

    Args:
        sources: ``(annotation files, image root, image processor)`` per source (files all ending in ``.tar``:
            WebDataset shards, see :mod:`vlkit.data.webdataset`; the root is unused); the processor may be None
            when samples are served without pixels (``with_images=False``).
        text_processor: caption normaliser (``blip_caption``).
        with_images: load and transform images (False: only text, id and key, for cached features).
    """

    def __init__(
        self,
        sources: Sequence[tuple[Sequence[Path], Path, Callable[[Any], Tensor] | None]],
        text_processor: Callable[[str], str],
        *,
        with_images: bool = True,
    ) -> None:
        self.readers: list[CaptionDataset | TarCaptionDataset] = []
        self.pairs: list[Pair] = []
        offset = 0
        for index, (files, root, processor) in enumerate(sources):
            files = list(files)
            if files and all(Path(f).suffix == ".tar" for f in files):  # WebDataset shards
                reader: Any = TarCaptionDataset(files, processor)
            else:
                reader = CaptionDataset(files, root, processor)
            self.readers.append(reader)
            if reader.is_eval:
                for image_index, ann in enumerate(reader.annotation):
                    for caption in ann["captions"]:
                        self.pairs.append(Pair(index, ann["image"], caption, offset + image_index))
                offset += len(reader.annotation)
            else:
                for ann in reader.annotation:
                    self.pairs.append(Pair(index, ann["image"], ann["caption"], offset + ann["image_id"]))
                offset += len(reader.img_ids)
        self.num_images = offset
        self.text_processor = text_processor
        self.with_images = with_images
        self._by_key: dict[str, Pair] | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, pair: Pair) -> str:
        return str(self.readers[pair.source].image_root / pair.image)

    def decode(self, key: str) -> Any:
        """The image behind ``key`` as the source's reader gives it (decoded PIL image when built with
        ``with_images=False``: what the frozen-feature cache encodes)."""
        if self._by_key is None:
            self._by_key = {}
            for pair in self.pairs:
                self._by_key.setdefault(self.key(pair), pair)
        pair = self._by_key[key]
        return self.readers[pair.source].load(pair.image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        sample = {"text": self.text_processor(pair.caption), "image_id": pair.image_id, "key": self.key(pair)}
        if self.with_images:
            sample["image"] = self.readers[pair.source].load(pair.image)
        return sample


def stack_field(samples: Sequence[dict[str, Any]], name: str) -> Tensor:
    """Stack tensor field ``name`` of dict samples (B, ...)."""
    return torch.stack([s[name] for s in samples])


def ln_vision_input(blip2: Any, pixel_values: Tensor | None, vision_embeds: Tensor | None, owner: str) -> Tensor:
    """``ln_vision`` of the ViT output (B, N, Dv) for a training step: a frozen ViT runs without grad, and
    cached ViT output (the frozen-feature cache) is used as is. ``owner`` names the caller in the error."""
    if vision_embeds is None:
        if pixel_values is None:
            raise ValueError(f"{owner} needs pixel_values or vision_embeds")
        if blip2.vision_frozen:
            with torch.no_grad():
                vision_embeds = blip2.vision(pixel_values)
        else:
            vision_embeds = blip2.vision(pixel_values)
    return blip2.ln_vision(vision_embeds)
