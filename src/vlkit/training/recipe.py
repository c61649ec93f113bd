"""Training recipes: one YAML file, typed end to end.

A recipe has four sections::

    task:                 # the task's own config dataclass, plus ``name`` (a key of vlkit.tasks.TASKS)
      name: stage1
      ...                 # model preset / checkpoint, data paths, task options
    optim: {...}          # OptimConfig
    schedule: {...}       # ScheduleConfig
    run: {...}            # RunConfig

Every key is checked: an unknown or mistyped key fails with its dotted name (``task.data.root``,
``optim.lr``). ``--set a.b=value`` overrides apply to the plain data before it is typed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vlkit.config import apply_overrides, from_dict, to_dict
from vlkit.errors import ConfigError


@dataclass
class OptimConfig:
    """AdamW and its parameter groups.

    Attributes:
        lr: peak learning rate (``init_lr`` in LAVIS).
        betas, eps: AdamW moments (BLIP-2 LAVIS: (0.9, 0.999); VLMo: (0.9, 0.98)).
        weight_decay: decoupled weight decay of the decayed group.
        no_decay: which parameters get weight decay 0:
            ``blip2`` — LAVIS BLIP-2 rule: exactly 1-D parameters or names ending in ``.bias`` (so 0-D
            ``temp`` and 3-D ``query_tokens`` ARE decayed);
            ``vlmo`` — unilm VLMo rule: names containing ``bias`` or one of the LayerNorm names
            ``LayerNorm.weight``, ``norm.weight``, ``norm1.weight``, ``norm2.weight`` (substring match);
            ``ndim<2`` — every parameter with fewer than 2 dimensions, and biases.
        layer_decay: layer-wise lr decay factor (1.0 = off); needs the task's ``layer_id``.
        lr_mult: lr multipliers by parameter-name substring, e.g. ``{vqa_classifier: 20}`` (VLMo).
            A pattern that matches no trainable parameter is an error.
        clip_grad_norm: max global gradient norm (None = no clipping, as in LAVIS).
        accum_steps: micro-batches per optimiser step (loss divided accordingly).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    no_decay: Literal["blip2", "vlmo", "ndim<2"] = "blip2"
    layer_decay: float = 1.0
    lr_mult: dict[str, float] = field(default_factory=dict)
    clip_grad_norm: float | None = None
    accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")
        for pattern, mult in self.lr_mult.items():
            if not pattern or mult <= 0:
                raise ConfigError(f"optim.lr_mult.{pattern}: needs a non-empty pattern and a positive value")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ConfigError(f"optim.clip_grad_norm must be positive, got {self.clip_grad_norm}")
        if self.accum_steps < 1:
            raise ConfigError(f"optim.accum_steps must be >= 1, got {self.accum_steps}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, evaluated per optimiser step.

    Attributes:
        name: ``cosine`` — linear warmup from ``warmup_lr`` to ``optim.lr``, then per-step cosine to
            ``min_lr`` at the last step (= HF ``get_cosine_schedule_with_warmup`` when both are 0);
            ``lavis`` — LAVIS ``linear_warmup_cosine_lr``: warmup only inside epoch 0, counted in
            micro-batches, then one cosine value per epoch: ``min_lr + (lr - min_lr)/2 (1 + cos(pi e/E))``;
            ``linear`` — warmup then polynomial decay ``(1 - progress) ** power`` to ``min_lr``
            (VLMo / HF ``get_polynomial_decay_schedule_with_warmup``);
            ``constant`` — warmup then ``optim.lr``.
        warmup_steps: optimiser steps of linear warmup (micro-batches for ``lavis``).
        warmup_fraction: warmup as a fraction of the total steps (VLMo's float ``warmup_steps``);
            exclusive with ``warmup_steps``.
        warmup_lr: learning rate at step 0 of warmup (LAVIS ``warmup_lr``).
        min_lr: final learning rate (LAVIS ``min_lr``, VLMo ``end_lr``).
        power: exponent of the ``linear`` (polynomial) decay.
    """

    name: Literal["cosine", "lavis", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None:
            if not 0.0 <= self.warmup_fraction < 1.0:
                raise ConfigError(f"schedule.warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")
            if self.warmup_steps:
                raise ConfigError("schedule: give warmup_steps or warmup_fraction, not both")
            if self.name == "lavis":
                raise ConfigError("schedule.warmup_fraction is not supported by the lavis schedule")
        if self.warmup_lr < 0 or self.min_lr < 0:
            raise ConfigError("schedule.warmup_lr and schedule.min_lr must be >= 0")
        if self.power <= 0:
            raise ConfigError(f"schedule.power must be positive, got {self.power}")


@dataclass
class RunConfig:
    """How long, how big, where and on what.

    Attributes:
        epochs: passes over the training data; the schedule's length is ``epochs * steps_per_epoch``
            unless ``max_steps`` is set.
        max_steps: optimiser steps to train for (takes precedence over ``epochs``).
        batch_size: samples per process per micro-batch (global batch = batch_size x accum x world).
        num_workers: DataLoader worker processes.
        precision: ``fp32``; ``bf16`` autocast (CPU and CUDA); ``fp16`` autocast + GradScaler (CUDA only).
            Master weights stay fp32 in every mode.
        seed: model init uses ``seed`` on every rank; dropout etc. use ``seed + rank``; data order and
            per-sample augmentation seeds derive from ``seed``, the epoch and the sample index.
        log_every: write a metrics row (and update the progress bar) every N steps.
        save_every: write a checkpoint every N steps (0: only at the end).
        eval_every: evaluate every N steps, at every epoch end (``epoch``), or only at the end (``end``);
            ignored when the task has no ``evaluate``.
        keep_last: how many step checkpoints to keep (the best one is kept apart).
        device: ``auto`` (CUDA if present), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun on CUDA
            every process uses ``cuda:LOCAL_RANK``.
        distributed: ``auto`` (DDP when started by torchrun with more than one process), ``none``,
            ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard`` over the task's ``fsdp_units``).
        grad_checkpointing: calls ``model.set_grad_checkpointing(True)``.
        shuffle: shuffle the training data every epoch.
        deterministic: cuDNN deterministic kernels (LAVIS sets this).
        progress: show a progress bar on rank 0.
        output_dir: run directory (``--output`` overrides; default ``runs/<recipe name>``).
    """

    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    num_workers: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 42
    log_every: int = 1
    save_every: int = 0
    eval_every: int | Literal["epoch", "end"] = "epoch"
    keep_last: int = 2
    device: str = "auto"
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    grad_checkpointing: bool = False
    shuffle: bool = True
    deterministic: bool = False
    progress: bool = True
    output_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_steps is None:
            raise ConfigError("run: set epochs or max_steps")
        for key in ("epochs", "max_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {value}")
        for key in ("batch_size", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("num_workers", "save_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"run.{key} must be >= 0, got {getattr(self, key)}")
        if isinstance(self.eval_every, int) and self.eval_every < 1:
            raise ConfigError(f"run.eval_every must be >= 1, 'epoch' or 'end', got {self.eval_every}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class _Sections:
    run: RunConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class Recipe:
    """A typed training recipe.

    Attributes:
        task_name: key of :data:`vlkit.tasks.TASKS` (``task.name`` in YAML).
        task: the task's config dataclass instance (the rest of the ``task:`` section).
        optim, schedule, run: the generic sections.
        source: the file the recipe came from, if any (not part of the YAML).
    """

    task_name: str
    task: Any
    optim: OptimConfig
    schedule: ScheduleConfig
    run: RunConfig
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.schedule.name == "lavis" and self.run.epochs is None:
            raise ConfigError("schedule.name=lavis is per epoch: set run.epochs")


def recipe_from_dict(data: Any, *, source: Path | None = None) -> Recipe:
    """Type plain recipe data (parsed YAML), importing the named task's module for its config class.

    Raises:
        ConfigError: on an unknown task, or an unknown / missing / mistyped key anywhere (named by path).
    """
    from vlkit.tasks import load_task

    if not isinstance(data, dict):
        raise ConfigError(f"a recipe must be a mapping, got {type(data).__name__}")
    data = dict(data)
    if "task" not in data:
        raise ConfigError("missing required key task (a mapping with a name: one of vlkit.tasks.TASKS)")
    task = data.pop("task")
    if isinstance(task, str):
        task = {"name": task}
    if not isinstance(task, dict) or not isinstance(task.get("name"), str):
        raise ConfigError("task: expected a mapping with a string key name")
    task = dict(task)
    name = task.pop("name")
    _, config_cls = load_task(name)
    task_cfg = from_dict(config_cls, task, path="task")
    sections = from_dict(_Sections, data)
    return Recipe(name, task_cfg, sections.optim, sections.schedule, sections.run, source)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data for ``recipe`` that :func:`recipe_from_dict` turns back into an equal recipe."""
    return {
        "task": {"name": recipe.task_name, **to_dict(recipe.task)},
        "optim": to_dict(recipe.optim),
        "schedule": to_dict(recipe.schedule),
        "run": to_dict(recipe.run),
    }


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML file and apply ``a.b=value`` overrides.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such recipe file") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    try:
        if isinstance(data.get("task"), str):  # allow --set task.x=... on the short form
            data["task"] = {"name": data["task"]}
        data = apply_overrides(data, list(overrides))
        return recipe_from_dict(data, source=path)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (after overrides) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


def replace_run(recipe: Recipe, **changes: Any) -> Recipe:
    """A copy of ``recipe`` with some ``run`` fields changed (validated again)."""
    return dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, **changes))
