"""Named model presets: one explicit dict from name to architecture and metadata.

A preset fixes the architecture (a config factory), the preprocessing that goes with it (image size, mean,
std, Q-Former tokenizer) and where the reference weights come from (file names of the original release,
transformers hub id). Nothing is downloaded: converters take local files (``vlkit convert``).

Real-size presets follow LAVIS's model types (stage 1, stage 2 with OPT / FlanT5, the COCO caption
fine-tunes, InstructBLIP with Vicuna / FlanT5) plus MindFormers' LLaMA-7B stage 2; their LLM configs have
the shapes of the original transformers checkpoints (``llm`` names the one the reference loads, from a local
folder at convert time). ``blip2-shapes`` is the small model of the synthetic-shapes demo (trained from
scratch, so its ViT is trainable); the ``tiny-*`` presets exist for tests.
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
from vlkit.models.blip2 import Blip2Config, LanguageModelConfig
from vlkit.models.instructblip import InstructBlipConfig
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
        llm: the LLM checkpoint the reference loads (stage 2 / InstructBLIP), given as a local folder to
            ``vlkit convert --llm``.
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
    llm: str | None = None


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


# LLM configs (transformers config.json content) with the shapes of the released checkpoints. ----------------
def opt_config(size: str) -> dict[str, Any]:
    """facebook/opt-{2.7b,6.7b}."""
    hidden, layers, heads, ffn = {"2.7b": (2560, 32, 32, 10240), "6.7b": (4096, 32, 32, 16384)}[size]
    return {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": ffn,
        "max_position_embeddings": 2048,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "pad_token_id": 1,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "is_encoder_decoder": False,
    }


def flan_t5_config(size: str) -> dict[str, Any]:
    """google/flan-t5-{xl,xxl} (the exact-GELU override is applied by ``LanguageModelConfig``)."""
    d_model, d_ff, heads = {"xl": (2048, 5120, 32), "xxl": (4096, 10240, 64)}[size]
    return {
        "model_type": "t5",
        "vocab_size": 32128,
        "d_model": d_model,
        "d_kv": 64,
        "d_ff": d_ff,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": heads,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "is_encoder_decoder": True,
    }


def llama_config(size: str, vocab_size: int = 32000) -> dict[str, Any]:
    """LLaMA-{7b,13b} shapes (Vicuna v1.1; InstructBLIP adds [PAD]: vocab 32001)."""
    hidden, inter, layers, heads = {"7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40)}[size]
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "is_encoder_decoder": False,
    }


def language_model(
    hf_config: dict[str, Any], *, instruction: bool = False, prompt: str = "", dtype: str | None = None
) -> LanguageModelConfig:
    """``LanguageModelConfig`` with the reference's conventions for the LLM family of ``hf_config``."""
    from vlkit.prompting import family_conventions

    kind = "seq2seq" if hf_config.get("is_encoder_decoder") else "causal"
    conventions = family_conventions(hf_config, instruction=instruction)
    return LanguageModelConfig(kind=kind, hf_config=dict(hf_config), prompt=prompt, dtype=dtype, **conventions)


def _stage2(
    llm: dict[str, Any],
    *,
    image_size: int = 224,
    vitl: bool = False,
    prompt: str = "",
    dtype: str | None = None,
    instruction: bool = False,
) -> Blip2Config:
    fine_tuned = image_size != 224
    vision = clip_vit_l() if vitl else eva_vit_g(image_size, grad_checkpointing=fine_tuned)
    lm = language_model(llm, instruction=instruction, prompt=prompt, dtype=dtype)
    if instruction:
        return InstructBlipConfig(vision=vision, qformer=qformer_base(vision.width, lm_head=False), lm=lm)
    qformer = qformer_base(vision.width, text_input=False, lm_head=False)
    return Blip2Config(vision=vision, qformer=qformer, itc_itm_heads=False, lm=lm)


_TINY_LLMS: dict[str, dict[str, Any]] = {
    "opt": {
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "ffn_dim": 64,
        "max_position_embeddings": 128,
        "vocab_size": 320,  # room for a byte-level BPE test tokenizer (256 bytes + merges)
    },
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "vocab_size": 128,
    },
    "t5": {
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "vocab_size": 128,
    },
}


def shrink_llm(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A test-sized LLM config of the same family (model type, activations, tying and special ids kept)."""
    model_type = hf_config.get("model_type")
    if model_type not in _TINY_LLMS:
        raise ConfigError(f"shrink: no tiny shape for LLM model_type {model_type!r} ({', '.join(_TINY_LLMS)})")
    return {**hf_config, **_TINY_LLMS[model_type]}


def _tiny_stage2(family: str, llm: dict[str, Any], prompt: str = "") -> Blip2Config:
    base = _stage2(llm, instruction=family == "instructblip", prompt=prompt)
    return shrink(base)


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
    # ---------------------------------------------------------------------------------------- stage 2
    "blip2-opt2.7b-pretrain": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(opt_config("2.7b"), dtype="float16"),
        description="BLIP-2 stage 2, EVA ViT-g + OPT-2.7B (LAVIS blip2_opt 'pretrain_opt2.7b')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_opt2.7b.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/blip2-opt-2.7b",
        llm="facebook/opt-2.7b",
    ),
    "blip2-opt6.7b-pretrain": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(opt_config("6.7b"), dtype="float16"),
        description="BLIP-2 stage 2, EVA ViT-g + OPT-6.7B (LAVIS blip2_opt 'pretrain_opt6.7b')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_opt6.7b.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/blip2-opt-6.7b",
        llm="facebook/opt-6.7b",
    ),
    "blip2-opt2.7b-coco": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(opt_config("2.7b"), image_size=364, prompt="a photo of", dtype="float16"),
        description="BLIP-2 OPT-2.7B fine-tuned for COCO captions, 364 px (LAVIS 'caption_coco_opt2.7b')",
        image_size=364,
        freeze_vision=False,
        source="lavis",
        weights=("blip2_caption_opt2.7b.pth",),
        hf_id="Salesforce/blip2-opt-2.7b-coco",
        llm="facebook/opt-2.7b",
    ),
    "blip2-opt6.7b-coco": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(opt_config("6.7b"), image_size=364, prompt="a photo of", dtype="float16"),
        description="BLIP-2 OPT-6.7B fine-tuned for COCO captions, 364 px (LAVIS 'caption_coco_opt6.7b')",
        image_size=364,
        freeze_vision=False,
        source="lavis",
        weights=("blip2_caption_opt6.7b.pth",),
        hf_id="Salesforce/blip2-opt-6.7b-coco",
        llm="facebook/opt-6.7b",
    ),
    "blip2-flant5xl-pretrain": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(flan_t5_config("xl"), dtype="bfloat16"),
        description="BLIP-2 stage 2, EVA ViT-g + FlanT5-XL (LAVIS blip2_t5 'pretrain_flant5xl')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_flant5xl.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/blip2-flan-t5-xl",
        llm="google/flan-t5-xl",
    ),
    "blip2-flant5xxl-pretrain": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(flan_t5_config("xxl"), dtype="bfloat16"),
        description="BLIP-2 stage 2, EVA ViT-g + FlanT5-XXL (LAVIS blip2_t5 'pretrain_flant5xxl')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_flant5xxl.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/blip2-flan-t5-xxl",
        llm="google/flan-t5-xxl",
    ),
    "blip2-flant5xl-vitl-pretrain": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(flan_t5_config("xl"), vitl=True, dtype="bfloat16"),
        description="BLIP-2 stage 2, CLIP ViT-L + FlanT5-XL (LAVIS blip2_t5 'pretrain_flant5xl_vitL')",
        image_size=224,
        source="lavis",
        weights=("blip2_pretrained_flant5xl_vitL.pth", "clip_vit_L.pth"),
        llm="google/flan-t5-xl",
    ),
    "blip2-flant5xl-coco": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(flan_t5_config("xl"), image_size=364, prompt="a photo of", dtype="bfloat16"),
        description="BLIP-2 FlanT5-XL fine-tuned for COCO captions, 364 px (LAVIS 'caption_coco_flant5xl')",
        image_size=364,
        freeze_vision=False,
        source="lavis",
        weights=("blip2_caption_flant5xl.pth",),
        hf_id="Salesforce/blip2-flan-t5-xl-coco",
        llm="google/flan-t5-xl",
    ),
    "blip2-llama7b-mindformers": ModelSpec(
        arch="blip2",
        config=lambda: _stage2(llama_config("7b"), dtype="float16"),
        description="BLIP-2 stage 2, EVA ViT-g + LLaMA-7B (MindFormers 'blip2_stage2_vit_g_llama_7b')",
        image_size=224,
        source="mindformers",
        llm="llama-7b",
    ),
    # ---------------------------------------------------------------------------------------- InstructBLIP
    "instructblip-vicuna7b": ModelSpec(
        arch="instructblip",
        config=lambda: _stage2(llama_config("7b", 32001), instruction=True, dtype="float16"),
        description="InstructBLIP, EVA ViT-g + Vicuna-7B v1.1 (LAVIS blip2_vicuna_instruct 'vicuna7b')",
        image_size=224,
        source="lavis",
        weights=("instruct_blip_vicuna7b_trimmed.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/instructblip-vicuna-7b",
        llm="lmsys/vicuna-7b-v1.1",
    ),
    "instructblip-vicuna13b": ModelSpec(
        arch="instructblip",
        config=lambda: _stage2(llama_config("13b", 32001), instruction=True, dtype="float16"),
        description="InstructBLIP, EVA ViT-g + Vicuna-13B v1.1 (LAVIS blip2_vicuna_instruct 'vicuna13b')",
        image_size=224,
        source="lavis",
        weights=("instruct_blip_vicuna13b_trimmed.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/instructblip-vicuna-13b",
        llm="lmsys/vicuna-13b-v1.1",
    ),
    "instructblip-flant5xl": ModelSpec(
        arch="instructblip",
        config=lambda: _stage2(flan_t5_config("xl"), instruction=True, dtype="bfloat16"),
        description="InstructBLIP, EVA ViT-g + FlanT5-XL (LAVIS blip2_t5_instruct 'flant5xl')",
        image_size=224,
        source="lavis",
        weights=("instruct_blip_flanxl_trimmed.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/instructblip-flan-t5-xl",
        llm="google/flan-t5-xl",
    ),
    "instructblip-flant5xxl": ModelSpec(
        arch="instructblip",
        config=lambda: _stage2(flan_t5_config("xxl"), instruction=True, dtype="bfloat16"),
        description="InstructBLIP, EVA ViT-g + FlanT5-XXL (LAVIS blip2_t5_instruct 'flant5xxl')",
        image_size=224,
        source="lavis",
        weights=("instruct_blip_flanxxl_trimmed.pth", "eva_vit_g.pth"),
        hf_id="Salesforce/instructblip-flan-t5-xxl",
        llm="google/flan-t5-xxl",
    ),
    "tiny-blip2-opt": ModelSpec(
        arch="blip2",
        config=lambda: _tiny_stage2("blip2", opt_config("2.7b")),
        description="tiny BLIP-2 stage 2 with an OPT-style LLM, for tests",
        image_size=32,
    ),
    "tiny-blip2-opt-coco": ModelSpec(
        arch="blip2",
        config=lambda: _tiny_stage2("blip2", opt_config("2.7b"), prompt="a photo of"),
        description="tiny BLIP-2 OPT caption fine-tune (prompt 'a photo of'), for tests",
        image_size=32,
        freeze_vision=False,
    ),
    "tiny-blip2-flant5": ModelSpec(
        arch="blip2",
        config=lambda: _tiny_stage2("blip2", flan_t5_config("xl")),
        description="tiny BLIP-2 stage 2 with a FlanT5-style LLM, for tests",
        image_size=32,
    ),
    "tiny-instructblip-vicuna": ModelSpec(
        arch="instructblip",
        config=lambda: _tiny_stage2("instructblip", llama_config("7b", 32001)),
        description="tiny InstructBLIP with a Vicuna-style LLM, for tests",
        image_size=32,
    ),
    "tiny-instructblip-flant5": ModelSpec(
        arch="instructblip",
        config=lambda: _tiny_stage2("instructblip", flan_t5_config("xl")),
        description="tiny InstructBLIP with a FlanT5-style LLM, for tests",
        image_size=32,
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
    # Freezing is the training recipe's call (``spec.freeze_vision`` says what the reference did; the LLM
    # is always frozen in the reference).
    return model_cls(spec.config(), device=device, dtype=dtype)


def shrink(config: Blip2Config) -> Blip2Config:
    """A tiny config of the same family: same kinds, flags and quirks, test-sized shapes.

    Keeps the ViT kind, activation, qkv-bias style and eps values, the Q-Former variant flags, the
    cross-attention frequency, ``ln_vision_eps`` and the LLM's family and text conventions; shrinks widths,
    depths, image size and vocabularies.
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
    lm = config.lm
    if lm is not None:
        lm = dataclasses.replace(lm, hf_config=shrink_llm(lm.hf_config), dtype=None)
    return dataclasses.replace(config, vision=vision, qformer=qformer, num_query_tokens=4, embed_dim=16, lm=lm)
