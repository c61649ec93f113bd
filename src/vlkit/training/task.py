"""The contract between a training task and the generic trainer.

A task module (listed in :data:`vlkit.tasks.TASKS`) exposes ``build(cfg, ctx) -> TaskState``. Everything the
trainer needs from the task is a field of :class:`TaskState`; everything else (optimiser, schedule,
precision, distribution, checkpoints, logging) is the trainer's job and is configured by the recipe.

Rules a task must follow:

- ``build`` is called on every rank after the global RNGs are seeded with ``run.seed`` (identical on all
  ranks), so the model initialises identically everywhere. Build on ``ctx.device`` or on CPU; the trainer
  moves the model to ``ctx.device``.
- ``training_step(model, batch)`` runs the forward pass and returns a dict of 0-D tensors that contains
  ``"loss"`` (what is back-propagated); every other entry is logged (e.g. ``"loss_itc"``). It receives
  the unwrapped task model and runs inside the forward of the module that DDP wraps, so gradients are
  synchronised whatever methods it calls. Under FSDP, parameters are gathered only inside ``__call__``
  of the root model and of each ``fsdp_units`` module: call ``model(...)`` (give ``forward`` keyword
  entry points for the different paths), not other methods of the root model.
- Randomness in ``train_dataset[i]`` and ``collate_fn`` should come from the global ``random``/``numpy``/
  ``torch`` RNGs: the trainer seeds them per sample (from ``run.seed``, the epoch and the sample index)
  and per batch, so augmentations are reproducible, differ across samples and ranks, and resume exactly.
- Frozen parts are declared in ``frozen`` (dotted module names). The trainer sets them to
  ``requires_grad=False`` and keeps them in ``eval()`` mode (no dropout / drop-path), logs the counts, and
  leaves them out of checkpoints. A parameter with ``requires_grad=False`` outside a declared frozen
  module is an error: what is trained must be explicit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class TaskContext:
    """What a task may know about the run it is built for.

    Attributes:
        device: where training runs (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast dtype; weights stay fp32 unless the task
            chooses otherwise for frozen parts, e.g. a frozen fp16 LLM).
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        seed: ``run.seed`` of the recipe.
        output_dir: the run directory (tasks may write caches or evaluation files below it).
        recipe: the whole recipe (:class:`vlkit.training.recipe.Recipe`), read-only.
    """

    device: torch.device
    precision: Literal["fp32", "bf16", "fp16"]
    rank: int
    world_size: int
    seed: int
    output_dir: Path
    recipe: Any


TrainingStep = Callable[[nn.Module, Any], Mapping[str, Tensor]]
Evaluate = Callable[[nn.Module], Mapping[str, float]]
Export = Callable[[nn.Module, Mapping[str, Tensor], Path], None]


@dataclass
class TaskState:
    """Everything the trainer needs from a task.

    Attributes:
        model: the whole model (trainable and frozen parts).
        train_dataset: a map-style dataset; ``train_dataset[i]`` is one sample.
        training_step: ``(model, batch) -> {"loss": Tensor, ...}`` (see the module docstring).
        collate_fn: turns a list of samples into a batch; ``torch.utils.data.default_collate`` if None.
            Tensors anywhere in the batch (dicts, lists, tuples) are moved to the device by the trainer.
        frozen: dotted names of frozen submodules (e.g. ``("visual_encoder", "llm")``).
        layer_id: maps a parameter name to its layer index for layer-wise lr decay, or None for parameters
            outside the decayed stack. A parameter with id ``i`` gets lr scale
            ``optim.layer_decay ** (num_layers - i)``.
        num_layers: the exponent base above. LAVIS's EVA ViT-g (39 blocks): ``layer_id`` is 0 for
            cls_token/pos_embed/patch_embed, ``i + 1`` for block ``i``, 39 for the rest, and
            ``num_layers = 40``.
        evaluate: optional ``model -> {metric: value}``; called on every rank in eval mode under
            ``torch.no_grad()`` and autocast; rank 0's result is logged and used for the best checkpoint.
        best_metric: key of ``evaluate``'s result that selects the best checkpoint (None: keep no best).
        best_mode: whether larger (``max``) or smaller (``min``) ``best_metric`` is better.
        fsdp_units: module classes wrapped as separate FSDP units (e.g. the transformer block class);
            the root model is always wrapped.
        find_unused_parameters: passed to DDP, for models where some trainable parameters get no gradient
            on some steps.
        deterministic_data: the dataset and ``collate_fn`` use no randomness (e.g. cached features, no
            augmentation), so the trainer can skip per-sample RNG seeding (it costs 20-80 us per sample).
        info: free-form facts logged at start (e.g. model preset, number of images).
        export: optional ``(model, state_dict, folder) -> None``, called once when a run finishes (after
            the final checkpoint), on rank 0 only, to write the final model as a standalone folder that
            later stages load (a vlkit folder, a transformers folder, ...). ``state_dict`` is the complete
            state of the model (frozen parts and buffers included) as unsharded CPU tensors, also under
            FSDP, where ``model`` itself is sharded: write tensors from ``state_dict``, use ``model`` only
            for its type and config. ``folder`` is an empty temporary directory that the trainer renames
            to ``RUN/model`` once the hook returns (an existing ``RUN/model`` is replaced).
    """

    model: nn.Module
    train_dataset: Dataset
    training_step: TrainingStep
    collate_fn: Callable[[list[Any]], Any] | None = None
    frozen: tuple[str, ...] = ()
    layer_id: Callable[[str], int | None] | None = None
    num_layers: int = 0
    evaluate: Evaluate | None = None
    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"
    fsdp_units: tuple[type[nn.Module], ...] = ()
    find_unused_parameters: bool = False
    deterministic_data: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    export: Export | None = None
