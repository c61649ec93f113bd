"""Named model presets: one explicit dict from name to architecture and metadata.

A preset fixes the architecture (a config factory), the preprocessing that goes with it (image size, mean,
std, Q-Former tokenizer) and where the reference weights come from (file names of the original release,
transformers hub id). Nothing is downloaded: converters take local files (``vlkit convert``).

Real-size presets follow LAVIS's model types; ``blip2-shapes`` is the small model of the synthetic-shapes
demo (trained from scratch, so its ViT is trainable); the ``tiny-*`` presets exist for tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlkit.errors import ConfigError
from vlkit.layers.vit import VisionConfig
from vlkit.models import ARCHS
from vlkit.models.blip2 import Blip2Config
from vlkit.models.qformer import QFormerConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QFORMER_TOKENIZER = "bert-base-uncased+[DEC]"  # WordPiece, lower case, "[DEC]" added as id 30522


@dataclass(frozen=True)
class ModelSpec:
    """A named preset.

    Attributes:
        arch: key of ``vlkit.models.ARCHS``.
        config: builds a fresh config (configs are mutable, so never share one instance).
        description: one line for listings.
        image_size: eval resize (square warp), pixels.
        mean, std: per-channel normalisation after scaling to [0, 1].
        tokenizer: text tokenizer the model was trained with (None: no text side).
        freeze_vision: whether the reference recipe keeps the ViT frozen.
        source: where the original weights come from ("lavis", "none").
        weights: file names of the original release needed to assemble the model, main file first.
        hf_id: transformers hub id of the same weights, if any.
    """

    arch: str
    config: Callable[[], Any]
    description: str
    image_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    tokenizer: str | None = QFORMER_TOKENIZER
    freeze_vision: bool = True
    source: str = "none"
    weights: tuple[str, ...] = ()
    hf_id: str | None = None


# ----------------------------------------------------------------------------------------- building blocks
def eva_vit_g(image_size: int = 224, *, grad_checkpointing: bool = False) -> VisionConfig:
    """EVA-CLIP ViT-g/14 as BLIP-2 uses it: 39 of its 40 blocks, no final norm."""
    return VisionConfig(
        kind="eva",
        image_size=image_size,
        patch_size=14,
        width=1408,
        depth=39,
        heads=16,
        mlp_dim=6144,
        grad_checkpointing=grad_checkpointing,
    )


def clip_vit_l(image_size: int = 224) -> VisionConfig:
    """OpenAI CLIP ViT-L/14 as BLIP-2 uses it: 23 of its 24 blocks, ``ln_pre``, no ``ln_post``."""
    return VisionConfig(kind="clip", image_size=image_size, patch_size=14, width=1024, depth=23, heads=16, mlp_dim=4096)


def qformer_base(encoder_width: int, *, text_input: bool = True, lm_head: bool = True) -> QFormerConfig:
    """BERT-base Q-Former (12 layers, 768 wide, vocab 30523 with [DEC], cross-attention every 2nd layer)."""
    return QFormerConfig(encoder_width=encoder_width, text_input=text_input, lm_head=lm_head)


def _blip2_vitg(image_size: int = 224, grad_checkpointing: bool = False) -> Blip2Config:
    return Blip2Config(vision=eva_vit_g(image_size, grad_checkpointing=grad_checkpointing), qformer=qformer_base(1408))


def _blip2_vitl() -> Blip2Config:
    return Blip2Config(vision=clip_vit_l(), qformer=qformer_base(1024))


def _blip2_shapes() -> Blip2Config:
    vision = VisionConfig(kind="eva", image_size=64, patch_size=8, width=192, depth=6, heads=3, mlp_dim=768)
    qformer = QFormerConfig(
        hidden_size=192, num_layers=4, num_heads=4, intermediate_size=768, encoder_width=192, max_position_embeddings=64
    )
    return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=16, embed_dim=128)


def _tiny(kind: str) -> Blip2Config:
    vision = VisionConfig(kind=kind, image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64)
    qformer = QFormerConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, encoder_width=32, max_position_embeddings=64
    )
    return Blip2Config(vision=vision, qformer=qformer, num_query_tokens=4, embed_dim=16)


MODELS: dict[str, ModelSpec] = {
    "blip2-vitg-pretrain": ModelSpec(
        arch="blip2",
        config=_blip2_vitg,
        description="BLIP-2 stage 1, EVA ViT-g/14 224 px (LAVIS blip2 'pretrain')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/blip2-itm-vit-g",
    ),
    "blip2-vitl-pretrain": ModelSpec(
        arch="blip2",
        config=_blip2_vitl,
        description="BLIP-2 stage 1, CLIP ViT-L/14 224 px (LAVIS blip2 'pretrain_vitL')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_vitL.pth", "clip_vit_L.pth"),
    ),
    "blip2-vitg-coco": ModelSpec(
        arch="blip2",
        config=lambda: _blip2_vitg(364, grad_checkpointing=True),
        description="BLIP-2 stage 1 fine-tuned for COCO retrieval, EVA ViT-g/14 364 px (LAVIS blip2 'coco')",
        image_size=364,
        freeze_vision=False,
        source="lavis",
        weights=("blip2_finetune_coco.pth",),
        hf_id="Salesforce/blip2-itm-vit-g-coco",
    ),
    "blip2-shapes": ModelSpec(
        arch="blip2",
        config=_blip2_shapes,
        description="small BLIP-2 (64 px, ViT 6x192, Q-Former 4x192) for the synthetic-shapes demo",
        image_size=64,
        freeze_vision=False,
    ),
    "tiny-blip2-eva": ModelSpec(
        arch="blip2", config=lambda: _tiny("eva"), description="tiny EVA-style BLIP-2 for tests", image_size=32
    ),
    "tiny-blip2-clip": ModelSpec(
        arch="blip2", config=lambda: _tiny("clip"), description="tiny CLIP-style BLIP-2 for tests", image_size=32
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The preset called ``name``.

    Raises:
        ConfigError: listing the known names.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A randomly initialised model of preset ``name`` (weights come from ``vlkit.checkpoints``)."""
    spec = get_spec(name)
    _, model_cls = ARCHS[spec.arch]
    # Freezing is the training recipe's call (``spec.freeze_vision`` says what the reference did).
    return model_cls(spec.config(), device=device, dtype=dtype)


def shrink(config: Blip2Config) -> Blip2Config:
    """A tiny config of the same family: same kinds, flags and quirks, test-sized shapes.

    Keeps the ViT kind, activation, qkv-bias style and eps values, the Q-Former variant flags, the
    cross-attention frequency and ``ln_vision_eps``; shrinks widths, depths, image size and vocabulary.
    """
    v, q = config.vision, config.qformer
    vision = dataclasses.replace(v, image_size=32, patch_size=8, width=32, depth=2, heads=2, mlp_dim=48)
    qformer = dataclasses.replace(
        q,
        hidden_size=32,
        num_layers=max(2, q.cross_attention_freq + 1),
        num_heads=2,
        intermediate_size=48,
        encoder_width=32,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return dataclasses.replace(config, vision=vision, qformer=qformer, num_query_tokens=4, embed_dim=16)
