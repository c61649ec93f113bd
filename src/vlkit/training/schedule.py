"""Learning-rate schedules as pure functions of the optimiser step.

``LrSchedule.lr(step)`` is the base learning rate used by optimiser step ``step`` (0-based: the first
update uses ``lr(0)``). Being a pure function of the step, a schedule needs no state to resume; its
``state_dict`` only records its settings so a resumed run can check they did not change.
"""

from __future__ import annotations

import math
from typing import Any

from vlkit.errors import CheckpointError, ConfigError
from vlkit.training.recipe import ScheduleConfig


class LrSchedule:
    """The schedule of a recipe, bound to the run's length.

    Args:
        cfg: the recipe's schedule section.
        base_lr: peak learning rate (``optim.lr``).
        total_steps: optimiser steps in the whole run.
        steps_per_epoch: optimiser steps per epoch (needed by ``lavis``).
        epochs: number of epochs (needed by ``lavis``).
        accum_steps: micro-batches per optimiser step (``lavis`` counts warmup in micro-batches).
    """

    def __init__(
        self,
        cfg: ScheduleConfig,
        *,
        base_lr: float,
        total_steps: int,
        steps_per_epoch: int = 0,
        epochs: int | None = None,
        accum_steps: int = 1,
    ) -> None:
        if total_steps < 1:
            raise ConfigError(f"schedule: the run has {total_steps} steps; it needs at least one")
        if cfg.name == "lavis" and (not epochs or steps_per_epoch < 1):
            raise ConfigError("schedule.name=lavis needs run.epochs and at least one step per epoch")
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.epochs = epochs
        self.accum_steps = accum_steps
        if cfg.warmup_fraction is not None:
            self.warmup_steps = int(cfg.warmup_fraction * total_steps)  # VLMo: int(max_steps * warmup)
        else:
            self.warmup_steps = cfg.warmup_steps

    def lr(self, step: int) -> float:
        """Base learning rate of optimiser step ``step`` (0-based)."""
        cfg, peak = self.cfg, self.base_lr
        if cfg.name == "lavis":
            return self._lavis(step)
        if step < self.warmup_steps:
            return cfg.warmup_lr + (peak - cfg.warmup_lr) * step / self.warmup_steps
        if cfg.name == "constant":
            return peak
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if cfg.name == "cosine":
            return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.name == "linear":
            return cfg.min_lr + (peak - cfg.min_lr) * (1.0 - progress) ** cfg.power
        raise ConfigError(f"schedule.name: unknown schedule {cfg.name!r}")

    def _lavis(self, step: int) -> float:
        # LAVIS calls scheduler.step(cur_epoch, cur_step=i) before every micro-batch i of the epoch and
        # steps the optimiser after micro-batches accum-1, 2*accum-1, ...; the update therefore uses the lr
        # set for its last micro-batch.
        cfg, peak = self.cfg, self.base_lr
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if epoch == 0:
            iteration = in_epoch * self.accum_steps + self.accum_steps - 1
            return min(peak, cfg.warmup_lr + (peak - cfg.warmup_lr) * iteration / max(self.warmup_steps, 1))
        assert self.epochs is not None
        return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))

    def state_dict(self) -> dict[str, Any]:
        """The settings this schedule was built with."""
        return {
            "name": self.cfg.name,
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_lr": self.cfg.warmup_lr,
            "min_lr": self.cfg.min_lr,
            "power": self.cfg.power,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "accum_steps": self.accum_steps,
        }

    def check_resumable(self, saved: dict[str, Any], *, source: str) -> list[str]:
        """Compare with a checkpoint's schedule; returns the settings that changed (resume still works).

        Raises:
            CheckpointError: if the saved record is not a schedule state.
        """
        if not isinstance(saved, dict) or "name" not in saved:
            raise CheckpointError(f"{source}: no schedule state")
        mine = self.state_dict()
        return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
