"""AdamW with the reference parameter groups, layer-wise lr decay and per-module lr multipliers.

Each parameter group carries an ``lr_scale``; the trainer sets ``group["lr"] = schedule(step) * lr_scale``
before every optimiser step. That is what makes layer-wise decay real: LAVIS builds per-layer groups with
an ``lr_scale`` but its schedulers then write one lr into every group, so its layer decay does nothing
(blip2-spec §2.6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vlkit.errors import ConfigError
from vlkit.training.recipe import OptimConfig

# unilm VLMo ``set_schedule``: substring match on the parameter name (vlmo-spec §A.5).
VLMO_NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)


def is_no_decay(name: str, param: torch.Tensor, rule: str) -> bool:
    """Whether parameter ``name`` gets weight decay 0 under ``rule`` (see :class:`OptimConfig`).

    ``blip2`` is LAVIS ``Blip2Base.get_optimizer_params``: ``len(param.shape) == 1 or
    name.endswith(".bias")``. A 0-D parameter (``temp``) has ``len(shape) == 0`` and is therefore decayed.
    """
    if rule == "blip2":
        return param.ndim == 1 or name.endswith(".bias")
    if rule == "vlmo":
        # The rule is a substring match on the reference's parameter names, so a vlkit VLMo parameter is
        # judged by its unilm name (vlkit's ``vqa_head.norm.weight`` is unilm's ``vqa_classifier.1.weight``,
        # which the reference decays).
        from vlkit.checkpoints.unilm import unilm_key

        reference = unilm_key(name) or name
        return any(token in reference for token in VLMO_NO_DECAY)
    if rule == "ndim<2":
        return param.ndim < 2 or name.endswith(".bias")
    raise ConfigError(f"optim.no_decay: unknown rule {rule!r}")


@dataclass
class GroupInfo:
    """How one parameter group was formed (logged, and checked on resume)."""

    weight_decay: float
    lr_scale: float
    names: list[str]


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    cfg: OptimConfig,
    *,
    layer_id: Callable[[str], int | None] | None = None,
    num_layers: int = 0,
) -> tuple[list[dict], list[GroupInfo]]:
    """Split trainable parameters into AdamW groups by (weight decay, lr scale).

    Args:
        named_params: ``model.named_parameters()``; parameters with ``requires_grad=False`` are skipped.
        cfg: the recipe's optimiser section.
        layer_id: the task's parameter-name -> layer index map (None: no layer-wise decay possible).
        num_layers: lr scale of a parameter in layer ``i`` is ``cfg.layer_decay ** (num_layers - i)``.

    Returns:
        ``(groups, infos)``: torch param-group dicts (``params``, ``weight_decay``, ``lr_scale``, ``lr``) in
        first-appearance order, and the matching :class:`GroupInfo` with parameter names.

    Raises:
        ConfigError: ``layer_decay`` < 1 without ``layer_id``; an ``lr_mult`` pattern matching nothing or
            two patterns matching one parameter; no trainable parameters at all.
    """
    if cfg.layer_decay != 1.0 and layer_id is None:
        raise ConfigError(
            f"optim.layer_decay={cfg.layer_decay} needs layer ids, and this task defines no layer_id; "
            "set optim.layer_decay to 1.0"
        )
    groups: dict[tuple[float, float], tuple[dict, GroupInfo]] = {}
    used_patterns: set[str] = set()
    for name, param in named_params:
        if not param.requires_grad:
            continue
        weight_decay = 0.0 if is_no_decay(name, param, cfg.no_decay) else cfg.weight_decay
        scale = 1.0
        if cfg.layer_decay != 1.0 and layer_id is not None:
            layer = layer_id(name)
            if layer is not None:
                if not 0 <= layer <= num_layers:
                    raise ConfigError(f"layer_id({name!r}) = {layer} lies outside [0, num_layers={num_layers}]")
                scale = cfg.layer_decay ** (num_layers - layer)
        matches = [pattern for pattern in cfg.lr_mult if pattern in name]
        if len(matches) > 1:
            raise ConfigError(f"optim.lr_mult: patterns {matches} all match parameter {name}; make them disjoint")
        if matches:
            scale *= cfg.lr_mult[matches[0]]
            used_patterns.add(matches[0])
        key = (weight_decay, scale)
        if key not in groups:
            groups[key] = (
                {"params": [], "weight_decay": weight_decay, "lr_scale": scale, "lr": cfg.lr * scale},
                GroupInfo(weight_decay, scale, []),
            )
        groups[key][0]["params"].append(param)
        groups[key][1].names.append(name)
    unused = [pattern for pattern in cfg.lr_mult if pattern not in used_patterns]
    if unused:
        raise ConfigError(f"optim.lr_mult: pattern(s) {unused} match no trainable parameter")
    if not groups:
        raise ConfigError("the model has no trainable parameters (every parameter is frozen)")
    return [g for g, _ in groups.values()], [info for _, info in groups.values()]


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    layer_id: Callable[[str], int | None] | None = None,
    num_layers: int = 0,
) -> tuple[torch.optim.AdamW, list[GroupInfo]]:
    """``torch.optim.AdamW`` over :func:`param_groups` of ``model``.

    Uses the fused CUDA kernel when every trainable parameter is a plain CUDA tensor.
    """
    groups, infos = param_groups(model.named_parameters(), cfg, layer_id=layer_id, num_layers=num_layers)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda and type(p.data) is torch.Tensor for p in params) or None
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    return optimizer, infos


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Set every group's lr to ``base_lr * group["lr_scale"]``."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0)


def count_parameters(model: nn.Module) -> list[tuple[str, int, int]]:
    """Trainable and frozen parameter counts per top-level child (plus ``total``).

    Returns:
        Rows ``(name, trainable, frozen)``; names are top-level children, then ``total``.
    """
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        top = name.split(".", 1)[0] if "." in name else name
        row = rows.setdefault(top, [0, 0])
        row[0 if param.requires_grad else 1] += param.numel()
    out = [(name, t, f) for name, (t, f) in rows.items()]
    out.append(("total", sum(r[1] for r in out), sum(r[2] for r in out)))
    return out
