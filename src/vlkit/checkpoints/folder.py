"""vlkit's own checkpoint format, and loading any supported checkpoint into a model.

A vlkit folder holds two files::

    config.yaml         arch: blip2          # key of vlkit.models.ARCHS
                        config: {...}        # the model's config dataclass, strict
                        preset: ...          # optional: zoo name it was made from
                        source: ...          # optional: what it was converted from
    model.safetensors   the state dict, exactly the model's keys

``load_model`` accepts a vlkit folder (any ``arch``: BLIP-2, VLMo), a transformers BLIP-2 folder, a LAVIS
``.pth`` (plus its ViT file) or a microsoft/unilm VLMo ``.pt``/``.ckpt``, and converts on the fly. Models are
built on the meta device and the checked tensors assigned, so loading a 1B-parameter model does not pay for
a random initialisation first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
_TOP_LEVEL_KEYS = {"arch", "config", "preset", "source"}


def arch_of(model: nn.Module) -> str:
    """The ``ARCHS`` name of ``model``'s class."""
    for name, (_, cls) in ARCHS.items():
        if type(model) is cls:
            return name
    raise ConfigError(f"{type(model).__name__} is not a vlkit architecture ({', '.join(ARCHS)})")


def save_pretrained(
    model: nn.Module, path: str | os.PathLike, *, preset: str | None = None, source: str | None = None
) -> Path:
    """Write ``model`` as a vlkit folder (``config.yaml`` + ``model.safetensors``).

    Args:
        model: a model of ``vlkit.models.ARCHS`` (it must have a ``config`` attribute).
        path: the folder (created if needed).
        preset, source: optional provenance written into config.yaml.

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
    save_safetensors(model.state_dict(), path / WEIGHTS_FILE, metadata={"format": "pt", "arch": meta["arch"]})
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


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Require ``state_dict`` to have exactly ``model``'s keys and shapes.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
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
    check_state_dict(model, state_dict, source=source)
    device = torch.device(device) if device is not None else torch.device("cpu")
    tensors = {}
    for key, value in state_dict.items():
        value = value.to(device)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load_folder(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a vlkit folder."""
    arch, config = read_config(path)
    weights = Path(path) / WEIGHTS_FILE
    return build_loaded(arch, config, read_checkpoint(weights), source=str(weights), device=device, dtype=dtype)


def load_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vision: str | os.PathLike | None = None,
    preset: str | None = None,
    drop_lm: bool = False,
) -> nn.Module:
    """Load a model from a vlkit folder, a transformers BLIP-2 folder, a LAVIS or a unilm VLMo checkpoint.

    Args:
        path: a vlkit folder (``config.yaml``), a transformers folder (``config.json``), a LAVIS ``.pth`` or
            a unilm VLMo ``.pt``/``.ckpt`` (recognised by its keys; its architecture is read from the tensors).
        device: target device (default CPU).
        dtype: cast floating-point weights. Default: as stored for a vlkit folder; float32 when
            converting a LAVIS or transformers checkpoint (their files mix fp16 and fp32 tensors, and the
            references run on CPU in fp32).
        vision: LAVIS only: the EVA/CLIP ViT weights file (LAVIS checkpoints omit the frozen ViT).
        preset: LAVIS only: a ``vlkit.zoo`` name fixing the architecture (default: inferred).
        drop_lm: transformers only: load just the vision encoder and Q-Former of a checkpoint that also
            holds a language model (``Blip2Model``/``Blip2ForConditionalGeneration``).

    Returns:
        The model in eval mode. Freezing parts for training is the caller's decision.

    Raises:
        CheckpointError: unrecognised path, or keys/shapes that do not fit.
    """
    from vlkit.checkpoints import hf, lavis

    p = Path(path)
    foreign_dtype = dtype if dtype is not None else torch.float32
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        _no_extra(vision=vision, preset=preset, kind="a vlkit folder")
        return load_folder(p, device=device, dtype=dtype)
    if p.is_dir() and hf.is_hf_folder(p):
        _no_extra(vision=vision, preset=preset, kind="a transformers folder")
        ckpt = hf.load_hf_folder(p)
        if ckpt.lm_state_dict and not drop_lm:
            raise CheckpointError(
                f"{p}: {ckpt.architecture} holds a language model ({len(ckpt.lm_state_dict)} tensors); vlkit's stage-1 "
                "Blip2 covers the vision encoder and Q-Former: pass drop_lm=True (--drop-lm) to load just those"
            )
        return build_loaded("blip2", ckpt.config, ckpt.state_dict, source=str(p), device=device, dtype=foreign_dtype)
    unilm_sd = _unilm_state_dict_or_none(p)
    if unilm_sd is not None:
        from vlkit.checkpoints import unilm

        _no_extra(vision=vision, preset=preset, kind="a unilm VLMo checkpoint")
        config = unilm.infer_unilm_config(unilm_sd, source=str(p))
        converted, _ = unilm.convert_unilm_state_dict(unilm_sd, config, source=str(p))
        return build_loaded("vlmo", config, converted, source=str(p), device=device, dtype=foreign_dtype)
    if lavis.is_lavis_file(p):
        config, state_dict = lavis.load_lavis(p, vision=vision, preset=preset)
        return build_loaded("blip2", config, state_dict, source=str(p), device=device, dtype=foreign_dtype)
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


def _no_extra(*, vision: Any, preset: Any, kind: str) -> None:
    if vision is not None or preset is not None:
        raise CheckpointError(f"vision= and preset= only apply to LAVIS checkpoints, not to {kind}")
