"""LAVIS BLIP-2 checkpoints (stage 1, stage 2, caption fine-tunes, InstructBLIP) -> vlkit.

LAVIS saves only trainable tensors, so a stage-1 model is assembled from two files:

* the main checkpoint (``blip2_pretrained.pth``, ``blip2_pretrained_vitL.pth``, ``blip2_finetune_coco.pth``):
  ``{"model": state_dict, ...}`` with ``query_tokens``, ``ln_vision.*``, ``Qformer.bert.*``,
  ``Qformer.cls.*`` (the ITG head), ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``; only the
  ``coco`` fine-tune (ViT unfrozen) also has ``visual_encoder.*``;
* the frozen ViT's own file: ``eva_vit_g.pth`` (EVA layout, 40 blocks, 224 px) or ``clip_vit_L.pth``
  (OpenAI CLIP layout, 24 blocks), both bare state dicts.

Keys dropped on purpose (everything else must be accounted for):

* ``Qformer.bert.embeddings.position_ids``: a buffer ``arange(512)``; positions are computed.
* ``Qformer.cls.predictions.decoder.weight`` / ``.decoder.bias``: the decoder weight is tied to the word
  embeddings and its bias is the same tensor as ``predictions.bias``; both are checked to be equal to
  what they alias before being dropped.
* in the ViT file, the last block (BLIP-2 uses the second-to-last block's output: the ViT is built one
  block short of the file, so a file may have at most ``depth + 1`` blocks) and the tower's final norm or
  projection (EVA-CLIP ``norm``/``fc_norm``/``head``, CLIP ``ln_post``/``proj``), which BLIP-2 never uses.

The position embedding is resized (fp32, bicubic; ``align_corners`` per ViT kind) when the file's grid
differs from the target image size, as LAVIS does for the 364-px models.

Stage 2 and InstructBLIP ("trimmed" files: ``blip2_pretrained_opt2.7b.pth``, ``blip2_caption_flant5xl.pth``,
``instruct_blip_vicuna7b_trimmed.pth`` ...) hold the core keys, the projection (``opt_proj`` / ``t5_proj`` /
``llm_proj`` -> ``language_projection``) and, for InstructBLIP, the Q-Former's text embeddings and text FFNs;
caption fine-tunes also hold ``visual_encoder.*``. The frozen LLM comes from its own local transformers folder
(``config.json``, weights, tokenizer), as LAVIS loads it from the hub: its tensors become ``llm.*`` and any
``opt_model.*`` / ``t5_model.*`` / ``llm_model.*`` tensors of the checkpoint are laid over them, as LAVIS's
non-strict load does. In practice that is only OPT's ``lm_head.weight``, which LAVIS's runner saves because
it is tied to the (frozen) input embeddings; it must equal them. InstructBLIP-Vicuna's tokenizer gets a
``[PAD]`` token and bos = eos = unk = ``</s>``; the LLM's embedding and output matrices grow by one row,
set to the mean of the existing rows (LAVIS draws it at random; the row is only ever masked padding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlkit.checkpoints.io import read_checkpoint, state_dict_of
from vlkit.checkpoints.keymap import KeyMap, map_keys
from vlkit.errors import CheckpointError
from vlkit.layers.pos_embed import resize_pos_embed
from vlkit.layers.vit import VisionConfig
from vlkit.models.blip2 import Blip2Config


def _linear(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


def _prefixed(key_map: KeyMap, src: str, dst: str) -> dict[str, str | None]:
    return {src + k: (None if v is None else dst + v) for k, v in key_map.items()}


# ViT files (relative names; also used under "visual_encoder." in full checkpoints). ---------------------------
EVA_KEYS: dict[str, str | None] = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    **_linear("patch_embed.proj", "patch_embed"),
    **_linear("blocks.{i}.norm1", "blocks.{i}.norm1"),
    "blocks.{i}.attn.qkv.weight": "blocks.{i}.attn.qkv.weight",
    "blocks.{i}.attn.q_bias": "blocks.{i}.attn.q_bias",
    "blocks.{i}.attn.v_bias": "blocks.{i}.attn.v_bias",
    **_linear("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    **_linear("blocks.{i}.norm2", "blocks.{i}.norm2"),
    **_linear("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    **_linear("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
}
CLIP_KEYS: dict[str, str | None] = {
    "class_embedding": "cls_token",  # (W,) -> (1, 1, W) by `_clip_shapes`
    "positional_embedding": "pos_embed",  # (N, W) -> (1, N, W) by `_clip_shapes`
    "conv1.weight": "patch_embed.weight",
    **_linear("ln_pre", "norm_pre"),
    "transformer.resblocks.{i}.attn.in_proj_weight": "blocks.{i}.attn.qkv.weight",
    "transformer.resblocks.{i}.attn.in_proj_bias": "blocks.{i}.attn.qkv.bias",
    **_linear("transformer.resblocks.{i}.attn.out_proj", "blocks.{i}.attn.proj"),
    **_linear("transformer.resblocks.{i}.ln_1", "blocks.{i}.norm1"),
    **_linear("transformer.resblocks.{i}.ln_2", "blocks.{i}.norm2"),
    **_linear("transformer.resblocks.{i}.mlp.c_fc", "blocks.{i}.mlp.fc1"),
    **_linear("transformer.resblocks.{i}.mlp.c_proj", "blocks.{i}.mlp.fc2"),
}
# Heads of the released towers that BLIP-2 does not use (it takes block outputs, before any final norm).
EVA_FILE_UNUSED: dict[str, str | None] = {
    **{k: None for k in _linear("norm", "_")},
    **{k: None for k in _linear("fc_norm", "_")},
    **{k: None for k in _linear("head", "_")},
}
CLIP_FILE_UNUSED: dict[str, str | None] = {**{k: None for k in _linear("ln_post", "_")}, "proj": None}
_BLOCK_PATTERNS = {"eva": re.compile(r"blocks\.(\d+)\."), "clip": re.compile(r"transformer\.resblocks\.(\d+)\.")}

# Main checkpoint. ---------------------------------------------------------------------------------------
_L = "Qformer.bert.encoder.layer.{n}"
_O = "qformer.layers.{n}"
CORE_KEYS: dict[str, str | None] = {
    "query_tokens": "query_tokens",
    **_linear("ln_vision", "ln_vision"),
    **_linear("Qformer.bert.embeddings.LayerNorm", "qformer.embed_norm"),
    "Qformer.bert.embeddings.position_ids": None,  # buffer arange(512); positions are computed
    **_linear(f"{_L}.attention.self.query", f"{_O}.self_attn.query"),
    **_linear(f"{_L}.attention.self.key", f"{_O}.self_attn.key"),
    **_linear(f"{_L}.attention.self.value", f"{_O}.self_attn.value"),
    **_linear(f"{_L}.attention.output.dense", f"{_O}.self_attn.out"),
    **_linear(f"{_L}.attention.output.LayerNorm", f"{_O}.self_attn.norm"),
    **_linear(f"{_L}.crossattention.self.query", f"{_O}.cross_attn.query"),
    **_linear(f"{_L}.crossattention.self.key", f"{_O}.cross_attn.key"),
    **_linear(f"{_L}.crossattention.self.value", f"{_O}.cross_attn.value"),
    **_linear(f"{_L}.crossattention.output.dense", f"{_O}.cross_attn.out"),
    **_linear(f"{_L}.crossattention.output.LayerNorm", f"{_O}.cross_attn.norm"),
    **_linear(f"{_L}.intermediate_query.dense", f"{_O}.query_ffn.fc1"),
    **_linear(f"{_L}.output_query.dense", f"{_O}.query_ffn.fc2"),
    **_linear(f"{_L}.output_query.LayerNorm", f"{_O}.query_ffn.norm"),
}
TEXT_KEYS: dict[str, str | None] = {
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.word_embed.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.pos_embed.weight",
    **_linear(f"{_L}.intermediate.dense", f"{_O}.text_ffn.fc1"),
    **_linear(f"{_L}.output.dense", f"{_O}.text_ffn.fc2"),
    **_linear(f"{_L}.output.LayerNorm", f"{_O}.text_ffn.norm"),
}
LM_HEAD_KEYS: dict[str, str | None] = {
    "Qformer.cls.predictions.bias": "qformer.lm_head.bias",
    **_linear("Qformer.cls.predictions.transform.dense", "qformer.lm_head.dense"),
    **_linear("Qformer.cls.predictions.transform.LayerNorm", "qformer.lm_head.norm"),
    # Aliases checked by `check_tied_head`: tied to the word embeddings / the same tensor as predictions.bias.
    "Qformer.cls.predictions.decoder.weight": None,
    "Qformer.cls.predictions.decoder.bias": None,
}
HEAD_KEYS: dict[str, str | None] = {
    **_linear("vision_proj", "vision_proj"),
    **_linear("text_proj", "text_proj"),
    **_linear("itm_head", "itm_head"),
    "temp": "temp",
}
_STAGE2_PREFIXES = ("opt_proj.", "t5_proj.", "llm_proj.", "opt_model.", "t5_model.", "llm_model.")
PROJECTIONS = ("opt_proj", "t5_proj", "llm_proj")
LLM_PREFIXES = ("opt_model.", "t5_model.", "llm_model.")


def main_key_map(config: Blip2Config, *, with_vision: bool) -> dict[str, str | None]:
    """The literal key map of a LAVIS checkpoint for a model shaped like ``config`` (LLM tensors apart)."""
    key_map = dict(CORE_KEYS)
    if config.lm is not None:
        for name in PROJECTIONS:
            key_map.update(_linear(name, "language_projection"))
    if config.qformer.text_input:
        key_map.update(TEXT_KEYS)
    if config.qformer.lm_head:
        key_map.update(LM_HEAD_KEYS)
    if config.itc_itm_heads:
        key_map.update(HEAD_KEYS)
    if with_vision:
        vision_keys = EVA_KEYS if config.vision.kind == "eva" else CLIP_KEYS
        key_map.update(_prefixed(vision_keys, "visual_encoder.", "vision."))
    return key_map


def vision_file_key_map(vision: VisionConfig) -> dict[str, str | None]:
    """The literal key map of a separate EVA/CLIP ViT file (after `drop_extra_blocks`)."""
    if vision.kind == "eva":
        return _prefixed({**EVA_KEYS, **EVA_FILE_UNUSED}, "", "vision.")
    return _prefixed({**CLIP_KEYS, **CLIP_FILE_UNUSED}, "", "vision.")


# Fixups. ------------------------------------------------------------------------------------------------
def check_tied_head(state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Verify the MLM decoder's aliases (weight tied to the word embeddings, bias = predictions.bias)."""
    pairs = (
        ("Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
        ("Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias"),
    )
    for alias, original in pairs:
        if alias in state_dict:
            if original not in state_dict:
                raise CheckpointError(f"{source}: {alias} is present but {original}, which it aliases, is not")
            if not torch.equal(state_dict[alias], state_dict[original]):
                raise CheckpointError(f"{source}: {alias} differs from {original}; the reference ties them")


def drop_extra_blocks(state_dict: Mapping[str, Tensor], vision: VisionConfig, *, source: str) -> dict[str, Tensor]:
    """Remove the ViT file's blocks at index >= depth (at most one: the reference drops the last block)."""
    pattern = _BLOCK_PATTERNS[vision.kind]
    out: dict[str, Tensor] = {}
    dropped: set[int] = set()
    for key, value in state_dict.items():
        m = pattern.match(key)
        if m and int(m.group(1)) >= vision.depth:
            dropped.add(int(m.group(1)))
            continue
        out[key] = value
    if dropped and max(dropped) > vision.depth:
        raise CheckpointError(
            f"{source}: has {max(dropped) + 1} blocks but the model uses {vision.depth}; BLIP-2 drops only the "
            "file's last block (check the preset's vision depth)"
        )
    return out


def _clip_shapes(state_dict: dict[str, Tensor]) -> None:
    """OpenAI CLIP stores the class embedding as (W,) and positions as (N, W); ours are (1, 1, W), (1, N, W)."""
    if "vision.cls_token" in state_dict and state_dict["vision.cls_token"].dim() == 1:
        state_dict["vision.cls_token"] = state_dict["vision.cls_token"].reshape(1, 1, -1)
    if "vision.pos_embed" in state_dict and state_dict["vision.pos_embed"].dim() == 2:
        state_dict["vision.pos_embed"] = state_dict["vision.pos_embed"].unsqueeze(0)


def fit_pos_embed(state_dict: dict[str, Tensor], vision: VisionConfig, *, source: str) -> None:
    """Resize ``vision.pos_embed`` in place to the config's grid if the checkpoint's grid differs."""
    pos = state_dict.get("vision.pos_embed")
    if pos is not None and pos.shape[-2] != vision.num_positions:
        state_dict["vision.pos_embed"] = resize_pos_embed(
            pos, vision.grid, align_corners=vision.align_corners, source=f"{source}: vision pos_embed"
        )


# Conversion. --------------------------------------------------------------------------------------------
def from_lavis_state_dict(
    state_dict: Mapping[str, Tensor],
    config: Blip2Config,
    *,
    vision_state_dict: Mapping[str, Tensor] | None = None,
    source: str = "LAVIS checkpoint",
    vision_source: str = "ViT weights",
) -> dict[str, Tensor]:
    """Convert a LAVIS stage-1 state dict (+ the separate ViT weights) to vlkit names.

    Args:
        state_dict: the checkpoint's ``"model"`` dict.
        config: the architecture to load into (a LAVIS file carries none).
        vision_state_dict: the EVA/CLIP ViT file, required unless ``state_dict`` has ``visual_encoder.*``.
        source, vision_source: names for error messages.

    Raises:
        CheckpointError: unknown keys, aliases that disagree, ViT weights missing or given twice.
    """
    stage2 = sorted({k.split(".")[0] for k in state_dict if k.startswith(_STAGE2_PREFIXES)})
    if stage2:
        raise CheckpointError(f"{source}: has LLM-bridge tensors ({', '.join(stage2)}): a stage-2 checkpoint")
    check_tied_head(state_dict, source=source)
    with_vision = any(k.startswith("visual_encoder.") for k in state_dict)
    if with_vision and vision_state_dict is not None:
        raise CheckpointError(
            f"{source} already contains the ViT (visual_encoder.*); do not pass a separate ViT file as well"
        )
    if not with_vision and vision_state_dict is None:
        raise CheckpointError(
            f"{source} has no ViT weights (LAVIS saves only trainable tensors): pass the "
            f"{'eva_vit_g.pth' if config.vision.kind == 'eva' else 'clip_vit_L.pth'} file as the vision weights"
        )
    ours = map_keys(state_dict, main_key_map(config, with_vision=with_vision), source=source)
    if vision_state_dict is not None:
        kept = drop_extra_blocks(vision_state_dict, config.vision, source=vision_source)
        ours.update(map_keys(kept, vision_file_key_map(config.vision), source=vision_source))
    if config.vision.kind == "clip":
        _clip_shapes(ours)
    fit_pos_embed(ours, config.vision, source=source)
    return ours


def vision_kind_of(state_dict: Mapping[str, Tensor], prefix: str = "") -> str | None:
    """ "eva" or "clip" from a ViT state dict's keys (None if neither layout is recognised)."""
    if f"{prefix}cls_token" in state_dict:
        return "eva"
    if f"{prefix}class_embedding" in state_dict:
        return "clip"
    return None


def infer_preset(state_dict: Mapping[str, Tensor], vision_state_dict: Mapping[str, Tensor] | None) -> str:
    """The zoo preset a LAVIS stage-1 checkpoint belongs to, from its layout and shapes."""
    if vision_state_dict is not None:
        kind = vision_kind_of(vision_state_dict)
    else:
        kind = vision_kind_of(state_dict, "visual_encoder.")
    if kind is None:
        raise CheckpointError("cannot tell the ViT layout (EVA or CLIP) of this checkpoint; pass a preset")
    if kind == "clip":
        return "blip2-vitl-pretrain"
    pos = state_dict.get("visual_encoder.pos_embed")
    return "blip2-vitg-coco" if pos is not None and pos.shape[-2] == 677 else "blip2-vitg-pretrain"


@dataclass
class LavisCheckpoint:
    """A LAVIS checkpoint assembled for vlkit: config, state dict (vlkit names) and the LLM tokenizer."""

    config: Blip2Config
    state_dict: dict[str, Tensor]
    llm_tokenizer: Any = None


def is_stage2(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a checkpoint with an LLM projection (BLIP-2 stage 2, caption fine-tune, InstructBLIP)."""
    return any(k.startswith(_STAGE2_PREFIXES) for k in state_dict)


def load_lavis_checkpoint(
    path: str | os.PathLike,
    *,
    vision: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    config: Blip2Config | None = None,
    preset: str | None = None,
) -> LavisCheckpoint:
    """Read a LAVIS checkpoint with its ViT file and (stage 2 / InstructBLIP) its LLM folder.

    Args:
        path: the LAVIS ``.pth`` (read with ``weights_only=True``).
        vision: the EVA/CLIP ViT file, unless the checkpoint contains ``visual_encoder.*``.
        llm: stage 2 / InstructBLIP: local transformers folder of the LLM (config.json, weights, tokenizer).
        config: the architecture; else ``preset``'s; else inferred from the checkpoint's layout (real sizes).
            For stage 2 the LLM's own config always comes from the ``llm`` folder.
        preset: a name in ``vlkit.zoo.MODELS``.
    """
    from vlkit import zoo

    source = str(path)
    state_dict = state_dict_of(read_checkpoint(path), source=source)
    vision_sd = None
    if vision is not None:
        vision_sd = state_dict_of(read_checkpoint(vision), source=str(vision))
    if not is_stage2(state_dict):
        if llm is not None:
            raise CheckpointError(f"{source}: a stage-1 checkpoint (no LLM projection); do not pass an LLM folder")
        if config is None:
            config = zoo.get_spec(preset or infer_preset(state_dict, vision_sd)).config()
        ours = from_lavis_state_dict(
            state_dict, config, vision_state_dict=vision_sd, source=source, vision_source=str(vision or path)
        )
        return LavisCheckpoint(config, ours)
    if llm is None:
        bridge = sorted({k.split(".")[0] for k in state_dict if k.startswith(_STAGE2_PREFIXES)})
        raise CheckpointError(
            f"{source}: has LLM-bridge tensors ({', '.join(bridge)}): a stage-2 / InstructBLIP checkpoint, whose "
            "frozen LLM LAVIS does not save: pass the LLM's local transformers folder (--llm path/to/opt-2.7b)"
        )
    llm_config, llm_sd, tokenizer = read_llm_folder(llm)
    if config is None and preset is not None:
        config = zoo.get_spec(preset).config()
    config = stage2_config(state_dict, vision_sd, llm_config, tokenizer, base=config, source=source)
    if tokenizer is not None and config.instruction_aware and config.lm.kind == "causal":
        from vlkit.prompting import instructblip_vicuna_tokenizer

        tokenizer = instructblip_vicuna_tokenizer(tokenizer)
        llm_sd = grow_vocabulary(llm_sd, config.lm.hf_config, len(tokenizer))
    ours = from_lavis_stage2(
        state_dict,
        config,
        vision_state_dict=vision_sd,
        llm_state_dict=llm_sd,
        source=source,
        vision_source=str(vision or path),
    )
    return LavisCheckpoint(config, ours, tokenizer)


def load_lavis(
    path: str | os.PathLike,
    *,
    vision: str | os.PathLike | None = None,
    config: Blip2Config | None = None,
    preset: str | None = None,
    llm: str | os.PathLike | None = None,
) -> tuple[Blip2Config, dict[str, Tensor]]:
    """``(config, vlkit state dict)`` of a LAVIS checkpoint (see ``load_lavis_checkpoint``)."""
    loaded = load_lavis_checkpoint(path, vision=vision, llm=llm, config=config, preset=preset)
    return loaded.config, loaded.state_dict


def read_llm_folder(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor], Any]:
    """``(config.json dict, weights, tokenizer or None)`` of a local transformers LLM folder."""
    from vlkit.checkpoints.hf import load_llm_tokenizer, read_hf_weights

    path = Path(path)
    try:
        hf_config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no config.json (expected a transformers LLM folder)") from err
    except ValueError as err:
        raise CheckpointError(f"{path}/config.json: not valid JSON ({err})") from err
    if "model_type" not in hf_config:
        raise CheckpointError(f"{path}/config.json has no model_type")
    return hf_config, read_hf_weights(path), load_llm_tokenizer(path)


def stage2_config(
    state_dict: Mapping[str, Tensor],
    vision_state_dict: Mapping[str, Tensor] | None,
    llm_config: Mapping[str, Any],
    tokenizer: Any,
    *,
    base: Blip2Config | None = None,
    source: str = "LAVIS checkpoint",
) -> Blip2Config:
    """The config of a LAVIS stage-2 / InstructBLIP checkpoint.

    The LLM config is ``llm_config`` (the LLM folder's); vision and Q-Former come from ``base`` (a preset) or
    are inferred at real size from the layout: EVA ViT-g (364 px when ``visual_encoder.pos_embed`` has 677
    positions) or CLIP ViT-L, a BERT-base Q-Former with text input exactly for InstructBLIP.
    """
    from vlkit import zoo
    from vlkit.checkpoints.hf import lm_config_from_hf
    from vlkit.models.instructblip import InstructBlipConfig

    instruct = "Qformer.bert.embeddings.word_embeddings.weight" in state_dict or any(
        k.startswith("llm_proj.") for k in state_dict
    )
    lm = lm_config_from_hf(dict(llm_config), instruction=instruct, tokenizer=tokenizer)
    fine_tuned = any(k.startswith("visual_encoder.") for k in state_dict)
    if base is not None:
        if base.lm is not None and base.lm.hf_config["model_type"] != lm.hf_config["model_type"]:
            raise CheckpointError(
                f"{source}: the preset's LLM is {base.lm.hf_config['model_type']!r} but the LLM folder holds a "
                f"{lm.hf_config['model_type']!r} model"
            )
        if base.instruction_aware != instruct:
            raise CheckpointError(
                f"{source}: the preset {'is' if base.instruction_aware else 'is not'} InstructBLIP "
                f"but the checkpoint {'is' if instruct else 'is not'}"
            )
        keep = base.lm
        if keep is not None:  # the preset's conventions, the folder's LLM (exact_gelu re-applied)
            lm = dataclasses.replace(
                keep, hf_config=lm.hf_config, add_bos=lm.add_bos, add_eos=lm.add_eos, exact_gelu=keep.exact_gelu
            )
        return dataclasses.replace(base, lm=lm)
    if fine_tuned and not instruct:
        lm.prompt = "a photo of"
    kind = vision_kind_of(vision_state_dict) if vision_state_dict is not None else "eva"
    if kind is None:
        raise CheckpointError(f"{source}: cannot tell the ViT layout (EVA or CLIP) of the vision file; pass a preset")
    if kind == "clip":
        vision = zoo.clip_vit_l()
    else:
        pos = state_dict.get("visual_encoder.pos_embed")
        size = 364 if pos is not None and pos.shape[-2] == 677 else 224
        vision = zoo.eva_vit_g(size, grad_checkpointing=fine_tuned)
    qformer = zoo.qformer_base(vision.width, text_input=instruct, lm_head=False)
    if instruct:
        return InstructBlipConfig(vision=vision, qformer=qformer, lm=lm)
    return Blip2Config(vision=vision, qformer=qformer, itc_itm_heads=False, lm=lm)


def grow_vocabulary(llm_state_dict: dict[str, Tensor], hf_config: dict[str, Any], size: int) -> dict[str, Tensor]:
    """Grow the LLM's vocabulary-sized matrices to ``size`` rows (InstructBLIP-Vicuna's ``[PAD]``).

    New rows are the mean of the existing ones (LAVIS draws them at random; they only ever meet masked
    padding). ``hf_config["vocab_size"]`` is updated in place.
    """
    vocab = int(hf_config["vocab_size"])
    if size <= vocab:
        return llm_state_dict
    out = dict(llm_state_dict)
    for key, value in llm_state_dict.items():
        if value.dim() == 2 and value.shape[0] == vocab:
            extra = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(size - vocab, -1)
            out[key] = torch.cat([value, extra])
    hf_config["vocab_size"] = size
    return out


def _llm_keys(llm_state_dict: Mapping[str, Tensor], config: Blip2Config) -> dict[str, Tensor]:
    """LLM-folder keys -> ``llm.*``, adding the base-model prefix where an older file omitted it."""
    from vlkit.models.blip2 import build_llm

    reference = build_llm(config.lm, device="meta")
    expected = set(reference.state_dict())
    prefix = getattr(reference, "base_model_prefix", "")
    out = {}
    for key, value in llm_state_dict.items():
        if key not in expected and prefix and f"{prefix}.{key}" in expected:
            key = f"{prefix}.{key}"
        out["llm." + key] = value
    return out


def from_lavis_stage2(
    state_dict: Mapping[str, Tensor],
    config: Blip2Config,
    *,
    vision_state_dict: Mapping[str, Tensor] | None,
    llm_state_dict: Mapping[str, Tensor],
    source: str = "LAVIS checkpoint",
    vision_source: str = "ViT weights",
) -> dict[str, Tensor]:
    """Convert a LAVIS stage-2 / InstructBLIP state dict (+ ViT file + LLM weights) to vlkit names."""
    if config.lm is None:
        raise CheckpointError(f"{source}: a stage-2 checkpoint needs a config with an LLM")
    core = {k: v for k, v in state_dict.items() if not k.startswith(LLM_PREFIXES)}
    with_vision = any(k.startswith("visual_encoder.") for k in core)
    if with_vision and vision_state_dict is not None:
        raise CheckpointError(
            f"{source} already contains the ViT (visual_encoder.*); do not pass a separate ViT file as well"
        )
    if not with_vision and vision_state_dict is None:
        raise CheckpointError(f"{source} has no ViT weights: pass the eva_vit_g.pth / clip_vit_L.pth file")
    ours = map_keys(core, main_key_map(config, with_vision=with_vision), source=source)
    if vision_state_dict is not None:
        kept = drop_extra_blocks(vision_state_dict, config.vision, source=vision_source)
        ours.update(map_keys(kept, vision_file_key_map(config.vision), source=vision_source))
    if config.vision.kind == "clip":
        _clip_shapes(ours)
    fit_pos_embed(ours, config.vision, source=source)
    ours.update(_llm_keys(llm_state_dict, config))
    # LAVIS's non-strict load lays the checkpoint's LLM tensors over the LLM's (OPT's tied lm_head quirk).
    for key, value in state_dict.items():
        if key.startswith(LLM_PREFIXES):
            ours["llm." + key.split(".", 1)[1]] = value
    return ours


def qformer_tokenizer(source: str | os.PathLike | None = None) -> Any:
    """The Q-Former tokenizer (bert-base-uncased + [DEC]) from ``source``, else from an installed package's
    vocabulary, else None."""
    from vlkit.processors import QFormerTokenizer, find_bert_vocab

    found = source if source is not None else find_bert_vocab()
    return QFormerTokenizer(found, truncation_side="left") if found is not None else None


def is_lavis_file(path: str | os.PathLike) -> bool:
    """True for a file that looks like a pickled torch checkpoint (LAVIS's format)."""
    path = Path(path)
    return path.is_file() and path.suffix in (".pth", ".pt", ".bin")
