"""transformers BLIP-2 / InstructBLIP checkpoints <-> vlkit ``Blip2`` / ``InstructBlip``.

Import covers ``Blip2ForImageTextRetrieval`` (the stage-1 "itm" models: ViT, Q-Former with text input,
ITC/ITM heads), ``Blip2Model`` / ``Blip2ForConditionalGeneration`` (stage 2: ViT, queries-only Q-Former,
``language_projection`` and the LLM) and ``InstructBlipForConditionalGeneration`` (Q-Former with text input,
LLM). The LLM keeps transformers' own parameter names: ``language_model.<name>`` becomes ``llm.<name>``
(our ``Blip2.llm`` *is* the transformers model), so the built LLM itself checks those keys. Export writes
``Blip2ForImageTextRetrieval`` folders (stage 1).

Key maps are literal (``{i}``/``{n}`` = layer index); tensors that need more than a rename go through the
named fixups below. Known differences between the transformers and LAVIS layouts, all accounted for:

* **Key bias.** transformers stores the ViT's fused ``qkv.bias`` (3W) with a key third that is a
  parameter; LAVIS (and vlkit, ``qkv_bias="qv"``) keeps only ``q_bias`` and ``v_bias``. On import the key
  third is dropped: a key bias adds ``q . b_k`` to every logit of one query row, which softmax cancels, so
  outputs are unchanged for any value of it (a test pins this with a non-zero key bias). On export the
  key third is written as zeros.
* **ln_vision eps.** transformers' ``post_layernorm`` reuses the ViT eps (1e-6); LAVIS's ``ln_vision``
  uses 1e-5. ``Blip2Config.ln_vision_eps`` is set from the source on import; export requires the two to
  agree unless ``allow_eps_change=True`` (what transformers' own converter does).
* **No ITG head, no temperature.** transformers has no Q-Former MLM head and no ``temp``. Import sets
  ``lm_head=False`` and fills ``temp`` with its initial value 0.07 (it only scales ITC logits in training
  and zero-shot softmax; ITC similarities and ITM logits do not use it). Export drops both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlkit.checkpoints.io import read_checkpoint, save_safetensors
from vlkit.checkpoints.keymap import KeyMap, map_keys
from vlkit.errors import CheckpointError, ConfigError
from vlkit.layers.vit import VisionConfig
from vlkit.models.blip2 import Blip2, Blip2Config, LanguageModelConfig
from vlkit.models.instructblip import InstructBlipConfig
from vlkit.models.qformer import QFormerConfig

RETRIEVAL = "Blip2ForImageTextRetrieval"
CONDITIONAL = "Blip2ForConditionalGeneration"
INSTRUCT = "InstructBlipForConditionalGeneration"
ARCHITECTURES = (RETRIEVAL, "Blip2Model", CONDITIONAL, INSTRUCT)
LM_PREFIXES = ("language_projection.", "language_model.")
LLM_PREFIX = "language_model."  # everything under it is the transformers LLM's own state dict -> "llm."
INITIAL_TEMP = 0.07


def _linear(src: str, dst: str) -> dict[str, str]:
    return {f"{src}.weight": f"{dst}.weight", f"{src}.bias": f"{dst}.bias"}


# transformers -> vlkit. ----------------------------------------------------------------------------------
VISION_KEYS: dict[str, str | None] = {
    "vision_model.embeddings.class_embedding": "vision.cls_token",
    "vision_model.embeddings.position_embedding": "vision.pos_embed",
    **_linear("vision_model.embeddings.patch_embedding", "vision.patch_embed"),
    **_linear("vision_model.encoder.layers.{i}.layer_norm1", "vision.blocks.{i}.norm1"),
    "vision_model.encoder.layers.{i}.self_attn.qkv.weight": "vision.blocks.{i}.attn.qkv.weight",
    # Fused bias [q; k; v]: renamed here, split into q_bias/v_bias by `split_qkv_bias`.
    "vision_model.encoder.layers.{i}.self_attn.qkv.bias": "vision.blocks.{i}.attn.qkv.bias",
    **_linear("vision_model.encoder.layers.{i}.self_attn.projection", "vision.blocks.{i}.attn.proj"),
    **_linear("vision_model.encoder.layers.{i}.layer_norm2", "vision.blocks.{i}.norm2"),
    **_linear("vision_model.encoder.layers.{i}.mlp.fc1", "vision.blocks.{i}.mlp.fc1"),
    **_linear("vision_model.encoder.layers.{i}.mlp.fc2", "vision.blocks.{i}.mlp.fc2"),
    **_linear("vision_model.post_layernorm", "ln_vision"),
}

_HF_LAYER = "qformer.encoder.layer.{n}"
_OUR_LAYER = "qformer.layers.{n}"
QFORMER_KEYS: dict[str, str | None] = {
    "query_tokens": "query_tokens",
    "embeddings.word_embeddings.weight": "qformer.word_embed.weight",
    "embeddings.position_embeddings.weight": "qformer.pos_embed.weight",
    # A buffer (0..max_pos-1) that older transformers versions saved; positions are computed instead.
    "embeddings.position_ids": None,
    **_linear("qformer.layernorm", "qformer.embed_norm"),
    **_linear(f"{_HF_LAYER}.attention.attention.query", f"{_OUR_LAYER}.self_attn.query"),
    **_linear(f"{_HF_LAYER}.attention.attention.key", f"{_OUR_LAYER}.self_attn.key"),
    **_linear(f"{_HF_LAYER}.attention.attention.value", f"{_OUR_LAYER}.self_attn.value"),
    **_linear(f"{_HF_LAYER}.attention.output.dense", f"{_OUR_LAYER}.self_attn.out"),
    **_linear(f"{_HF_LAYER}.attention.output.LayerNorm", f"{_OUR_LAYER}.self_attn.norm"),
    **_linear(f"{_HF_LAYER}.crossattention.attention.query", f"{_OUR_LAYER}.cross_attn.query"),
    **_linear(f"{_HF_LAYER}.crossattention.attention.key", f"{_OUR_LAYER}.cross_attn.key"),
    **_linear(f"{_HF_LAYER}.crossattention.attention.value", f"{_OUR_LAYER}.cross_attn.value"),
    **_linear(f"{_HF_LAYER}.crossattention.output.dense", f"{_OUR_LAYER}.cross_attn.out"),
    **_linear(f"{_HF_LAYER}.crossattention.output.LayerNorm", f"{_OUR_LAYER}.cross_attn.norm"),
    **_linear(f"{_HF_LAYER}.intermediate_query.dense", f"{_OUR_LAYER}.query_ffn.fc1"),
    **_linear(f"{_HF_LAYER}.output_query.dense", f"{_OUR_LAYER}.query_ffn.fc2"),
    **_linear(f"{_HF_LAYER}.output_query.LayerNorm", f"{_OUR_LAYER}.query_ffn.norm"),
    **_linear(f"{_HF_LAYER}.intermediate.dense", f"{_OUR_LAYER}.text_ffn.fc1"),
    **_linear(f"{_HF_LAYER}.output.dense", f"{_OUR_LAYER}.text_ffn.fc2"),
    **_linear(f"{_HF_LAYER}.output.LayerNorm", f"{_OUR_LAYER}.text_ffn.norm"),
}

HEAD_KEYS: dict[str, str | None] = {
    **_linear("vision_projection", "vision_proj"),
    **_linear("text_projection", "text_proj"),
    **_linear("itm_head", "itm_head"),
}

# InstructBLIP keeps the Q-Former's embeddings inside the Q-Former (BLIP-2's ITM model has them top-level).
INSTRUCT_QFORMER_KEYS: dict[str, str | None] = {
    **{k: v for k, v in QFORMER_KEYS.items() if not k.startswith(("embeddings.", "qformer.layernorm."))},
    "qformer.embeddings.word_embeddings.weight": "qformer.word_embed.weight",
    "qformer.embeddings.position_embeddings.weight": "qformer.pos_embed.weight",
    "qformer.embeddings.position_ids": None,  # non-persistent in transformers; older files saved it
    **_linear("qformer.embeddings.layernorm", "qformer.embed_norm"),
}
PROJECTION_KEYS: dict[str, str | None] = _linear("language_projection", "language_projection")

FROM_HF: KeyMap = {**VISION_KEYS, **QFORMER_KEYS, **HEAD_KEYS}

# vlkit -> transformers: the exact inverse, plus our tensors transformers has no slot for.
TO_HF: KeyMap = {
    **{ours: theirs for theirs, ours in FROM_HF.items() if ours is not None},
    "temp": None,  # transformers' ITC returns raw cosine similarities
    **{f"qformer.lm_head.{name}": None for name in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "bias")},
}

_ACT_FROM_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


# Fixups. -------------------------------------------------------------------------------------------------
def split_qkv_bias(state_dict: dict[str, Tensor], vision: VisionConfig, *, source: str) -> None:
    """In place: ``vision.blocks.{i}.attn.qkv.bias`` (3W) -> ``q_bias``/``v_bias`` for ``qkv_bias="qv"``.

    The key third is dropped; it has no effect on attention outputs (see the module docstring).
    """
    w = vision.width
    for key in [k for k in state_dict if k.startswith("vision.blocks.") and k.endswith(".attn.qkv.bias")]:
        bias = state_dict.pop(key)
        if tuple(bias.shape) != (3 * w,):
            raise CheckpointError(f"{source}: {key} has shape {tuple(bias.shape)}, expected ({3 * w},)")
        if vision.qkv_bias == "qv":
            prefix = key[: -len("qkv.bias")]
            state_dict[prefix + "q_bias"] = bias[:w]
            state_dict[prefix + "v_bias"] = bias[2 * w :]
        else:
            state_dict[key] = bias


def fuse_qkv_bias(state_dict: dict[str, Tensor]) -> None:
    """In place: ``q_bias``/``v_bias`` -> fused ``qkv.bias`` = [q_bias; 0; v_bias] (the inverse fixup)."""
    for key in [k for k in state_dict if k.startswith("vision.blocks.") and k.endswith(".attn.q_bias")]:
        prefix = key[: -len("q_bias")]
        q, v = state_dict.pop(key), state_dict.pop(prefix + "v_bias")
        state_dict[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def split_language_model(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate the LLM bridge's tensors (``language_projection.*``, ``language_model.*``) from the rest."""
    core, lm = {}, {}
    for key, value in state_dict.items():
        (lm if key.startswith(LM_PREFIXES) else core)[key] = value
    return core, lm


# Configs. ------------------------------------------------------------------------------------------------
def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"transformers config {name}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def config_from_hf(hf_config: Mapping[str, Any], architecture: str, *, tokenizer: Any = None) -> Blip2Config:
    """Our config for a transformers BLIP-2 / InstructBLIP ``config.json`` (defaults filled by transformers).

    Args:
        hf_config: the parsed ``config.json``.
        architecture: one of ``ARCHITECTURES``.
        tokenizer: the LLM's tokenizer, if the folder has one: its bos/eos framing is probed.

    Returns:
        A ``Blip2Config`` (with ``lm`` for ``Blip2ForConditionalGeneration``), or an ``InstructBlipConfig``.

    Raises:
        ConfigError: for a model type or setting vlkit cannot represent exactly.
    """
    from transformers import Blip2Config as HFBlip2Config  # heavy import, only when converting
    from transformers import InstructBlipConfig as HFInstructBlipConfig

    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"unsupported transformers architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    expected = "instructblip" if architecture == INSTRUCT else "blip-2"
    if hf_config.get("model_type") != expected:
        raise ConfigError(
            f"{architecture} needs a transformers config with model_type {expected!r}, "
            f"got {hf_config.get('model_type')!r}"
        )
    config_cls = HFInstructBlipConfig if architecture == INSTRUCT else HFBlip2Config
    cfg = config_cls.from_dict(dict(hf_config))
    v, q = cfg.vision_config, cfg.qformer_config
    retrieval = architecture == RETRIEVAL
    text_input = retrieval or architecture == INSTRUCT
    if architecture != INSTRUCT and bool(q.use_qformer_text_input) != retrieval:
        raise ConfigError(
            f"{architecture} with qformer_config.use_qformer_text_input={q.use_qformer_text_input} is not supported "
            "(vlkit's Q-Former has text embeddings exactly when it has text feed-forward blocks)"
        )
    for name, act in (("vision_config", v.hidden_act), ("qformer_config", q.hidden_act)):
        if act not in _ACT_FROM_HF:
            raise ConfigError(f"transformers {name}.hidden_act={act!r} is not supported")
    vision = VisionConfig(
        kind="eva",
        image_size=_square(v.image_size, "vision_config.image_size"),
        patch_size=_square(v.patch_size, "vision_config.patch_size"),
        width=v.hidden_size,
        depth=v.num_hidden_layers,
        heads=v.num_attention_heads,
        mlp_dim=v.intermediate_size,
        ln_eps=float(v.layer_norm_eps),
        act=_ACT_FROM_HF[v.hidden_act],
        qkv_bias="qv" if v.qkv_bias else "none",
        attn_dropout=float(v.attention_dropout),
    )
    qformer = QFormerConfig(
        hidden_size=q.hidden_size,
        num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        encoder_width=v.hidden_size,
        cross_attention_freq=q.cross_attention_frequency,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        ln_eps=float(q.layer_norm_eps),
        act=_ACT_FROM_HF[q.hidden_act],
        hidden_dropout=float(q.hidden_dropout_prob),
        attention_dropout=float(q.attention_probs_dropout_prob),
        pad_token_id=q.pad_token_id,
        text_input=text_input,
        lm_head=False,
    )
    common = dict(
        vision=vision,
        qformer=qformer,
        num_query_tokens=cfg.num_query_tokens,
        ln_vision_eps=float(v.layer_norm_eps),
    )
    if architecture == INSTRUCT:
        return InstructBlipConfig(
            **common, lm=lm_config_from_hf(cfg.text_config, instruction=True, tokenizer=tokenizer)
        )
    return Blip2Config(
        **common,
        embed_dim=cfg.image_text_hidden_size,
        itc_itm_heads=retrieval,
        lm=lm_config_from_hf(cfg.text_config, instruction=False, tokenizer=tokenizer)
        if architecture == CONDITIONAL
        else None,
    )


# Keys of a transformers config dict that describe the saving library, not the model.
_HF_CONFIG_NOISE = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
)


def lm_config_from_hf(text_config: Any, *, instruction: bool, tokenizer: Any = None) -> LanguageModelConfig:
    """``LanguageModelConfig`` for a transformers LLM config (a ``PretrainedConfig`` or its dict).

    The activation is taken as the config says (transformers' BLIP-2 FlanT5 folders already have exact GELU);
    text conventions are the reference's for the LLM family, with bos/eos framing probed from ``tokenizer``
    when one is given.
    """
    from vlkit import prompting

    data = text_config if isinstance(text_config, dict) else text_config.to_dict()
    data = {k: v for k, v in data.items() if k not in _HF_CONFIG_NOISE}
    encoder_decoder = bool(data.get("is_encoder_decoder", False))
    kind = "seq2seq" if encoder_decoder else "causal"
    exact = data.get("dense_act_fn") == "gelu" or not LanguageModelConfig.is_t5_gelu(data)
    conventions = prompting.family_conventions(data, instruction=instruction, tokenizer=tokenizer)
    return LanguageModelConfig(kind=kind, hf_config=data, exact_gelu=exact, **conventions)


def config_to_hf(config: Blip2Config, *, allow_eps_change: bool = False) -> dict[str, Any]:
    """A transformers ``Blip2ForImageTextRetrieval`` ``config.json`` dict for ``config``.

    Raises:
        ConfigError: if transformers cannot represent the model (CLIP ViT, conv stem, no text input or ITC/ITM heads,
            or ``ln_vision_eps`` != ViT eps without ``allow_eps_change``).
    """
    from transformers import Blip2Config as HFBlip2Config

    v, q = config.vision, config.qformer
    if v.kind != "eva" or v.qkv_bias == "qkv":
        raise ConfigError("transformers' Blip2VisionModel cannot represent a CLIP-style ViT")
    if v.stem != "patch":
        raise ConfigError(f"transformers' Blip2VisionModel has a one-conv patch embedding, not a {v.stem} stem")
    if not config.itc_itm_heads:
        raise ConfigError("only models with ITC/ITM heads export to transformers (Blip2ForImageTextRetrieval)")
    if config.ln_vision_eps != v.ln_eps and not allow_eps_change:
        raise ConfigError(
            f"transformers uses one LayerNorm eps for the ViT and ln_vision, but ln_vision_eps={config.ln_vision_eps} "
            f"!= vision.ln_eps={v.ln_eps}; pass allow_eps_change=True to write {v.ln_eps} for both"
        )
    hf = HFBlip2Config(
        vision_config={
            "hidden_size": v.width,
            "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": _ACT_TO_HF[v.act],
            "layer_norm_eps": v.ln_eps,
            "attention_dropout": v.attn_dropout,
            "qkv_bias": v.qkv_bias == "qv",
        },
        qformer_config={
            "vocab_size": q.vocab_size,
            "hidden_size": q.hidden_size,
            "num_hidden_layers": q.num_layers,
            "num_attention_heads": q.num_heads,
            "intermediate_size": q.intermediate_size,
            "hidden_act": _ACT_TO_HF[q.act],
            "hidden_dropout_prob": q.hidden_dropout,
            "attention_probs_dropout_prob": q.attention_dropout,
            "max_position_embeddings": q.max_position_embeddings,
            "layer_norm_eps": q.ln_eps,
            "pad_token_id": q.pad_token_id,
            "cross_attention_frequency": q.cross_attention_freq,
            "encoder_hidden_size": v.width,
            "use_qformer_text_input": True,
        },
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.embed_dim,
    )
    out = hf.to_dict()
    out["architectures"] = [RETRIEVAL]
    return out


# State dicts. --------------------------------------------------------------------------------------------
def from_hf_state_dict(
    state_dict: Mapping[str, Tensor],
    config: Blip2Config,
    *,
    source: str = "transformers checkpoint",
    architecture: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Convert a transformers BLIP-2 / InstructBLIP state dict to vlkit names.

    Args:
        state_dict: the checkpoint's tensors.
        config: the architecture (``config_from_hf``).
        source: name for error messages.
        architecture: the transformers class name (default: inferred from ``config``).

    Returns:
        (our state dict, the LLM-bridge tensors left unconverted). With ``config.lm`` set the bridge is
        converted too (``language_projection.*`` kept, ``language_model.*`` -> ``llm.*``) and the second
        dict is empty; without it they are handed back untouched (``drop_lm``).

    Raises:
        CheckpointError: for any key no rule accounts for.
    """
    core, lm = split_language_model(state_dict)
    instruct = architecture == INSTRUCT or (architecture is None and config.instruction_aware)
    key_map = {**VISION_KEYS, **(INSTRUCT_QFORMER_KEYS if instruct else QFORMER_KEYS), **HEAD_KEYS}
    ours = map_keys(core, key_map, source=source)
    split_qkv_bias(ours, config.vision, source=source)
    if config.itc_itm_heads and "temp" not in ours:
        ours["temp"] = torch.tensor(INITIAL_TEMP)
    if config.lm is not None:
        ours.update(
            map_keys({k: v for k, v in lm.items() if not k.startswith(LLM_PREFIX)}, PROJECTION_KEYS, source=source)
        )
        ours.update({"llm." + k[len(LLM_PREFIX) :]: v for k, v in lm.items() if k.startswith(LLM_PREFIX)})
        lm = {}
    return ours, lm


def to_hf_state_dict(state_dict: Mapping[str, Tensor], *, source: str = "vlkit model") -> dict[str, Tensor]:
    """Convert a vlkit ``Blip2`` state dict to transformers names (drops ``temp`` and the MLM head)."""
    ours = dict(state_dict)
    fuse_qkv_bias(ours)
    return map_keys(ours, TO_HF, source=source)


# Folders. ------------------------------------------------------------------------------------------------
@dataclass
class HFCheckpoint:
    """A transformers BLIP-2 folder converted to vlkit."""

    architecture: str
    config: Blip2Config
    state_dict: dict[str, Tensor]  # vlkit names
    lm_state_dict: dict[str, Tensor]  # language_projection.* / language_model.*, for the LLM bridge
    hf_config: dict[str, Any]


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder holding a transformers ``config.json``."""
    return (Path(path) / "config.json").is_file()


def read_hf_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a transformers folder: single or sharded safetensors, else pytorch_model.bin (weights only)."""
    path = Path(path)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
            out: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                out.update(read_checkpoint(path / shard))
            missing = sorted(set(weight_map) - set(out))
            if missing:
                raise CheckpointError(
                    f"{index}: {len(missing)} indexed tensor(s) missing from the shards: {missing[:10]}"
                )
            return out
        if (path / single).is_file():
            return dict(read_checkpoint(path / single))
    raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found")


def _architecture(hf_config: Mapping[str, Any], keys: set[str], source: str) -> str:
    listed = hf_config.get("architectures") or []
    for name in listed:
        if name in ARCHITECTURES:
            return name
    if listed:
        raise CheckpointError(f"{source}: unsupported architecture {listed}; supported: {', '.join(ARCHITECTURES)}")
    if hf_config.get("model_type") == "instructblip":
        return INSTRUCT
    if "itm_head.weight" in keys:
        return RETRIEVAL
    return "Blip2ForConditionalGeneration" if any(k.startswith(LM_PREFIXES) for k in keys) else "Blip2Model"


def load_hf_folder(path: str | os.PathLike, *, drop_lm: bool = False) -> HFCheckpoint:
    """Read and convert a transformers BLIP-2 / InstructBLIP folder (``config.json`` + weights).

    Args:
        path: the folder.
        drop_lm: convert only the vision encoder and Q-Former (the LLM-bridge tensors are returned apart).
    """
    path = Path(path)
    config_file = path / "config.json"
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: no config.json") from err
    except ValueError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    weights = read_hf_weights(path)
    architecture = _architecture(hf_config, set(weights), str(path))
    tokenizer = None if drop_lm else load_llm_tokenizer(path)
    config = config_from_hf(hf_config, architecture, tokenizer=tokenizer)
    if config.lm is not None and drop_lm:
        config = dataclasses.replace(config, lm=None)
    ours, lm = from_hf_state_dict(weights, config, source=str(path), architecture=architecture)
    return HFCheckpoint(architecture, config, ours, lm, hf_config)


def load_llm_tokenizer(path: str | os.PathLike) -> Any:
    """The LLM tokenizer saved in a transformers folder (``AutoTokenizer``, local files only), or None."""
    path = Path(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many kinds; report which folder failed
        raise CheckpointError(f"{path}: cannot load the LLM tokenizer ({type(err).__name__}: {err})") from err


def save_hf_folder(model: Blip2, path: str | os.PathLike, *, allow_eps_change: bool = False) -> Path:
    """Write ``model`` as a transformers ``Blip2ForImageTextRetrieval`` folder (config.json + model.safetensors)."""
    path = Path(path)
    hf_config = config_to_hf(model.config, allow_eps_change=allow_eps_change)
    tensors = to_hf_state_dict(model.state_dict())
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
