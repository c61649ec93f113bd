"""vlkit's own checkpoint format, and loading any supported checkpoint into a model.

A vlkit folder is self-contained and loads offline::

    config.yaml         arch: blip2          # key of vlkit.models.ARCHS
                        config: {...}        # the model's config dataclass, strict (incl. the LLM's config)
                        preset: ...          # optional: zoo name it was made from
                        source: ...          # optional: what it was converted from
    model.safetensors   the state dict: exactly the model's keys, minus tied aliases (an LLM's output matrix
                        tied to its input embeddings is stored once and re-tied on load)
    llm_tokenizer/      stage 2 / InstructBLIP: the LLM's tokenizer files (transformers format)
    qformer_tokenizer/  InstructBLIP: the Q-Former's BERT tokenizer (with [DEC])

``load_model`` accepts a vlkit folder (any ``arch``: BLIP-2, InstructBLIP, VLMo), a transformers BLIP-2 /
InstructBLIP folder, a LAVIS ``.pth`` (plus its ViT file and, for stage 2, a local LLM folder) or a
microsoft/unilm VLMo ``.pt``/``.ckpt``, and converts on the fly; ``load_checkpoint`` also returns the
tokenizers found. Models are built on the meta device and the checked tensors assigned, so loading a
multi-billion-parameter model does not pay for a random initialisation first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from vlkit.checkpoints.io import read_checkpoint, save_safetensors
from vlkit.config import from_dict, to_dict
from vlkit.errors import CheckpointError, ConfigError
from vlkit.models import ARCHS

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
LLM_TOKENIZER_DIR = "llm_tokenizer"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
_TOP_LEVEL_KEYS = {"arch", "config", "preset", "source"}


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: original}`` for parameters that are the same tensor as an earlier one (``model.tied_parameters``
    when the model defines it)."""
    tied = getattr(model, "tied_parameters", None)
    return tied() if callable(tied) else {}


def arch_of(model: nn.Module) -> str:
    """The ``ARCHS`` name of ``model``'s class."""
    for name, (_, cls) in ARCHS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a vlkit architecture ({', '.join(ARCHS)})")


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    source: str | None = None,
    llm_tokenizer: Any = None,
    qformer_tokenizer: Any = None,
) -> Path:
    """Write ``model`` as a vlkit folder (``config.yaml`` + ``model.safetensors`` [+ tokenizers]).

    Args:
        model: a model of ``vlkit.models.ARCHS`` (it must have a ``config`` attribute).
        path: the folder (created if needed).
        preset, source: optional provenance written into config.yaml.
        llm_tokenizer: the LLM's tokenizer (anything with ``save_pretrained``/``save``), written to
            ``llm_tokenizer/``.
        qformer_tokenizer: the Q-Former tokenizer (``QFormerTokenizer``), written to ``qformer_tokenizer/``.

    Returns:
        The folder path.
    """
    path = Path(path)
    meta: dict[str, Any] = {"arch": arch_of(model), "config": to_dict(model.config)}
    if preset is not None:
        meta["preset"] = preset
    if source is not None:
        meta["source"] = source
    path.mkdir(parents=True, exist_ok=True)
    aliases = tied_aliases(model)
    tensors = {k: v for k, v in model.state_dict().items() if k not in aliases}
    save_safetensors(tensors, path / WEIGHTS_FILE, metadata={"format": "pt", "arch": meta["arch"]})
    for tokenizer, folder in ((llm_tokenizer, LLM_TOKENIZER_DIR), (qformer_tokenizer, QFORMER_TOKENIZER_DIR)):
        if tokenizer is not None:
            save = getattr(tokenizer, "save_pretrained", None) or tokenizer.save
            save(str(path / folder))
    (path / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    return path


def read_config(path: str | os.PathLike) -> tuple[str, Any]:
    """``(arch, config)`` of a vlkit folder.

    Raises:
        ConfigError: unknown arch, unknown top-level key, or a config that does not validate.
    """
    file = Path(path) / CONFIG_FILE
    try:
        meta = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{file}: no such file") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML: {err}") from err
    if not isinstance(meta, dict) or "arch" not in meta or "config" not in meta:
        raise ConfigError(f"{file}: expected a mapping with 'arch' and 'config'")
    unknown = sorted(set(meta) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"{file}: unknown key(s) {unknown}; known: {sorted(_TOP_LEVEL_KEYS)}")
    if meta["arch"] not in ARCHS:
        raise ConfigError(f"{file}: unknown arch {meta['arch']!r}; known: {', '.join(ARCHS)}")
    config_cls, _ = ARCHS[meta["arch"]]
    try:
        return meta["arch"], from_dict(config_cls, meta["config"], path="config")
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from err


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, optional: Mapping[str, str] | None = None
) -> None:
    """Require ``state_dict`` to have exactly ``model``'s keys and shapes.

    Args:
        optional: keys that may be absent (tied aliases, re-tied after loading).

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict and k not in (optional or {}))
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)} key(s): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
        )
    if wrong:
        problems.append(f"shape mismatch for {len(wrong)} key(s): {'; '.join(wrong[:10])}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def build_loaded(
    arch: str,
    config: Any,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build ``arch`` from ``config`` on the meta device and assign the checked ``state_dict`` to it.

    Args:
        dtype: floating-point tensors are cast to it (default: keep the checkpoint's dtypes).
        device: where the tensors end up (default: CPU).
    """
    _, model_cls = ARCHS[arch]
    model = model_cls(config, device="meta")
    aliases = tied_aliases(model)
    check_state_dict(model, state_dict, source=source, optional=aliases)
    for alias, original in aliases.items():
        # A file may hold a tied alias too (LAVIS saves OPT's lm_head.weight): it must equal its original.
        if alias in state_dict and not _same_values(state_dict[alias], state_dict[original]):
            raise CheckpointError(f"{source}: {alias} differs from {original}, to which the model ties it")
    device = torch.device(device) if device is not None else torch.device("cpu")
    tensors = {}
    for key, value in state_dict.items():
        if key in aliases:
            continue
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value
    model.load_state_dict(tensors, strict=False, assign=True)  # all keys checked above; aliases re-tied below
    if aliases:
        model.tie_parameters(aliases)
    _check_materialized(model, source)
    return model.eval()


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal after casting to the lower of the two precisions (LAVIS keeps an fp16 copy of fp32 weights)."""
    if a.shape != b.shape:
        return False
    low = a.dtype if torch.finfo(a.dtype).bits <= torch.finfo(b.dtype).bits else b.dtype
    return torch.equal(a.to(low), b.to(low))


def _check_materialized(model: nn.Module, source: str) -> None:
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{source}: no values for {len(left)} tensor(s): {', '.join(left[:10])}")


def load_folder(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a vlkit folder's model."""
    arch, config = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    return build_loaded(arch, config, read_checkpoint(weights), source=str(weights), device=device, dtype=dtype)


@dataclass
class LoadedCheckpoint:
    """A model with the tokenizers that came with its checkpoint.

    Attributes:
        model: the model, in eval mode.
        llm_tokenizer: the LLM's transformers tokenizer (stage 2 / InstructBLIP), or None if none was found.
        qformer_tokenizer: the Q-Former's ``QFormerTokenizer`` (InstructBLIP), or None.
        source: a description of the files it was read from.
    """

    model: nn.Module
    llm_tokenizer: Any = None
    qformer_tokenizer: Any = None
    source: str = ""


def _arch_for(config: Any) -> str:
    for name, (config_cls, _) in ARCHS.items():
        if type(config) is config_cls:
            return name
    raise ConfigError(f"{type(config).__name__} is not the config of a vlkit architecture")


def _folder_tokenizers(path: Path, config: Any) -> tuple[Any, Any]:
    from vlkit.processors import QFormerTokenizer
    from vlkit.prompting import load_tokenizer

    llm = load_tokenizer(path / LLM_TOKENIZER_DIR) if (path / LLM_TOKENIZER_DIR).is_dir() else None
    qformer = QFormerTokenizer(path / QFORMER_TOKENIZER_DIR) if (path / QFORMER_TOKENIZER_DIR).is_dir() else None
    return llm, qformer


def load_checkpoint(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vision: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    preset: str | None = None,
    drop_lm: bool = False,
    qformer_tokenizer: str | os.PathLike | None = None,
) -> LoadedCheckpoint:
    """Load a model and its tokenizers from a vlkit folder, a transformers folder, a LAVIS or a unilm VLMo
    checkpoint.

    Args:
        path: a vlkit folder (``config.yaml``), a transformers BLIP-2 / InstructBLIP folder (``config.json``),
            a LAVIS ``.pth`` or a unilm VLMo ``.pt``/``.ckpt`` (recognised by its keys; its architecture is
            read from the tensors).
        device: target device (default CPU).
        dtype: cast floating-point weights. Default: as stored for a vlkit folder; float32 when
            converting a LAVIS or transformers checkpoint (their files mix fp16 and fp32 tensors, and the
            references run on CPU in fp32).
        vision: LAVIS only: the EVA/CLIP ViT weights file (LAVIS checkpoints omit the frozen ViT).
        llm: LAVIS stage 2 / InstructBLIP only: the local transformers folder of the frozen LLM (weights,
            config.json and tokenizer), which LAVIS checkpoints omit.
        preset: LAVIS only: a ``vlkit.zoo`` name fixing the architecture (default: inferred).
        drop_lm: transformers only: load just the vision encoder and Q-Former of a checkpoint that also
            holds a language model.
        qformer_tokenizer: LAVIS InstructBLIP: bert-base-uncased ``vocab.txt`` or tokenizer folder for the
            Q-Former (default: the vocabulary an installed package ships, if any).

    Raises:
        CheckpointError: unrecognised path, or keys/shapes that do not fit.
    """
    from vlkit.checkpoints import hf, lavis

    p = Path(path)
    foreign_dtype = dtype if dtype is not None else torch.float32
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        _no_extra(vision=vision, preset=preset, llm=llm, kind="a vlkit folder")
        model = load_folder(p, device=device, dtype=dtype)
        return LoadedCheckpoint(model, *_folder_tokenizers(p, model.config), source=str(p))
    if p.is_dir() and hf.is_hf_folder(p):
        _no_extra(vision=vision, preset=preset, llm=llm, kind="a transformers folder")
        ckpt = hf.load_hf_folder(p, drop_lm=drop_lm)
        if ckpt.lm_state_dict and not drop_lm:
            raise CheckpointError(
                f"{p}: {ckpt.architecture} holds a language model without an LM head ({len(ckpt.lm_state_dict)} "
                "tensors); vlkit loads Blip2ForConditionalGeneration for stage 2: pass drop_lm=True (--drop-lm) "
                "to load just the vision encoder and Q-Former"
            )
        model = build_loaded(
            _arch_for(ckpt.config), ckpt.config, ckpt.state_dict, source=str(p), device=device, dtype=foreign_dtype
        )
        llm_tok = hf.load_llm_tokenizer(p) if ckpt.config.lm is not None else None
        qformer_tok = None
        if ckpt.config.instruction_aware and (p / QFORMER_TOKENIZER_DIR).is_dir():
            from vlkit.processors import QFormerTokenizer

            qformer_tok = QFormerTokenizer(p / QFORMER_TOKENIZER_DIR)
        return LoadedCheckpoint(model, llm_tok, qformer_tok, source=str(p))
    unilm_sd = _unilm_state_dict_or_none(p)
    if unilm_sd is not None:
        from vlkit.checkpoints import unilm

        _no_extra(vision=vision, preset=preset, llm=llm, kind="a unilm VLMo checkpoint")
        config = unilm.infer_unilm_config(unilm_sd, source=str(p))
        converted, _ = unilm.convert_unilm_state_dict(unilm_sd, config, source=str(p))
        model = build_loaded("vlmo", config, converted, source=str(p), device=device, dtype=foreign_dtype)
        return LoadedCheckpoint(model, source=str(p))
    if lavis.is_lavis_file(p):
        loaded = lavis.load_lavis_checkpoint(p, vision=vision, preset=preset, llm=llm)
        model = build_loaded(
            _arch_for(loaded.config),
            loaded.config,
            loaded.state_dict,
            source=str(p),
            device=device,
            dtype=foreign_dtype,
        )
        qformer_tok = None
        if loaded.config.instruction_aware:
            qformer_tok = lavis.qformer_tokenizer(qformer_tokenizer)
        parts = [str(p.resolve())] + [str(Path(x).resolve()) for x in (vision, llm) if x is not None]
        return LoadedCheckpoint(model, loaded.llm_tokenizer, qformer_tok, source=" + ".join(parts))
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    raise CheckpointError(
        f"{p}: not a vlkit folder (config.yaml), a transformers folder (config.json), a LAVIS .pth or a unilm "
        "VLMo .pt/.ckpt checkpoint"
    )


UNILM_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")
# Keys every unilm VLMo state dict has (and no BLIP-2 checkpoint does).
_UNILM_MARKERS = ("transformer.patch_embed.proj.weight", "transformer.blocks.0.mlp_text.fc1.weight")


def _unilm_state_dict_or_none(path: Path) -> dict[str, Tensor] | None:
    """The state dict of a unilm VLMo file, or None for any other file (LAVIS's .pth, ...).

    unilm releases use ``.pt`` like LAVIS, so the keys decide. Files are memory-mapped by the weights-only
    loader, so looking costs little even for a large LAVIS checkpoint read again afterwards.
    """
    if not path.is_file() or path.suffix not in UNILM_SUFFIXES:
        return None
    from vlkit.checkpoints import unilm

    try:
        obj = unilm.read_unilm_file(path)
        sd = unilm.unilm_state_dict(obj, source=str(path))
    except CheckpointError:
        return None
    return sd if all(key in sd for key in _UNILM_MARKERS) else None


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vision: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    preset: str | None = None,
    drop_lm: bool = False,
) -> nn.Module:
    """Load a model from a vlkit folder, a transformers folder, or a LAVIS checkpoint (see
    ``load_checkpoint``, which also returns the tokenizers).

    Returns:
        The model in eval mode. Freezing parts for training is the caller's decision.
    """
    return load_checkpoint(
        path, device=device, dtype=dtype, vision=vision, llm=llm, preset=preset, drop_lm=drop_lm
    ).model


def _no_extra(*, vision: Any, preset: Any, llm: Any, kind: str) -> None:
    if vision is not None or preset is not None or llm is not None:
        raise CheckpointError(f"vision=, llm= and preset= only apply to LAVIS checkpoints, not to {kind}")
