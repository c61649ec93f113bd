"""The training loop: one explicit loop for every task, precision and process layout.

Per optimiser step::

    lr = schedule(step) * group lr_scale            for every parameter group
    for each of accum_steps micro-batches:           (DDP gradient sync only on the last one)
        with autocast: losses = task.training_step(model, batch)
        backward(losses["loss"] / accum_steps)       (scaled by the GradScaler in fp16)
    mean losses over micro-batches and ranks          -> stop if not finite, naming the step
    [unscale, clip], optimiser step, zero grads
    log row; checkpoint every save_every; evaluate every eval_every

At the end of a finished run the final checkpoint is written and, if the task has an ``export`` hook,
the final model is exported to ``RUN/model/`` (a standalone model folder that later stages and
``vlkit eval`` load; see :class:`vlkit.training.task.TaskState`).

:func:`train` wraps it with process-group setup and a clean teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from vlkit import __version__
from vlkit.errors import CheckpointError, ConfigError, VlkitError
from vlkit.layers.attention import eager_transformers_attention_for_cpu_training
from vlkit.tasks import load_task
from vlkit.training import checkpointing as ckpt
from vlkit.training.dist import (
    BatchFetcher,
    DistEnv,
    EpochBatchSampler,
    all_reduce_mean,
    barrier,
    broadcast_object,
    gather_objects,
    rng_state,
    seed_everything,
    set_rng_state,
    setup,
    teardown,
    worker_init,
)
from vlkit.training.logging import RunLog
from vlkit.training.optim import build_optimizer, count_parameters, set_learning_rates
from vlkit.training.recipe import Recipe, recipe_to_dict, save_recipe
from vlkit.training.schedule import LrSchedule
from vlkit.training.task import TaskContext, TaskState

RECIPE_FILE = "recipe.yaml"
EXPORT_DIR = "model"  # RUN/model/: the task's exported final model (TaskState.export)


class TrainingError(VlkitError):
    """Training cannot continue (a non-finite loss or parameter); the message names the step."""


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run directory.
        step: optimiser steps done in total.
        last_checkpoint: the final checkpoint directory.
        best_checkpoint: the best-metric checkpoint, if the task has a ``best_metric``.
        best_value: its metric value.
        last_row: the last metrics row (rank 0; empty on other ranks).
        last_eval: the last evaluation result, if any.
        exported: ``RUN/model`` when the task exported its final model (TaskState.export), else None.
    """

    run_dir: Path
    step: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_value: float | None
    last_row: dict[str, Any]
    last_eval: dict[str, float] | None
    exported: Path | None = None


def train(recipe: Recipe, *, output_dir: str | Path | None = None, resume: str | Path | None = None) -> TrainResult:
    """Train ``recipe``; continue from a checkpoint with ``resume`` (a run or checkpoint directory).

    Works as a single process or under torchrun (DDP/FSDP, see ``run.distributed``).

    Raises:
        ConfigError: inconsistent settings (e.g. fp16 on CPU, an existing run directory without --resume).
        CheckpointError: an unusable checkpoint to resume from.
        TrainingError: a non-finite loss; the last good checkpoint is kept.
    """
    env = setup(recipe.run.distributed, recipe.run.device)
    success = False
    trainer = None
    try:
        trainer = _Trainer(recipe, env, output_dir, resume)
        result = trainer.run()
        success = True
        return result
    finally:
        # DDP/FSDP communication state and DataLoader workers must be gone before the process group is;
        # left to interpreter shutdown they can abort the process ("terminate called ...").
        del trainer
        gc.collect()
        teardown(env, success=success)


class _StepModule(nn.Module):
    """Makes ``training_step`` the forward pass that DDP sees (its hooks run only through ``__call__``)."""

    def __init__(self, model: nn.Module, state: TaskState) -> None:
        super().__init__()
        self.model = model
        self._step = state.training_step

    def forward(self, batch: Any) -> Mapping[str, Tensor]:
        return self._step(self.model, batch)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: _to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


@contextlib.contextmanager
def _preserved_rngs(device: torch.device):
    """Evaluation must not change the training RNG streams (exact resume depends on it)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Trainer:
    def __init__(self, recipe: Recipe, env: DistEnv, output_dir: str | Path | None, resume: str | Path | None):
        self.recipe, self.env = recipe, env
        self.replicated: list[nn.Parameter] = []  # FSDP: parameters left unsharded (see _wrap)
        run = recipe.run
        if run.precision == "fp16" and env.device.type != "cuda":
            raise ConfigError("run.precision=fp16 needs CUDA (GradScaler); use bf16 on CPU")
        if run.deterministic and env.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

        self.resume_from = ckpt.resolve_checkpoint(resume) if resume is not None else None
        if output_dir is not None:
            self.run_dir = Path(output_dir)
        elif run.output_dir is not None:
            self.run_dir = Path(run.output_dir)
        elif self.resume_from is not None:
            self.run_dir = ckpt.run_dir_of(self.resume_from)
        else:
            self.run_dir = Path("runs") / (recipe.source.stem if recipe.source else recipe.task_name)
        if self.resume_from is None and ckpt.step_checkpoints(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds a run with checkpoints; continue it with --resume {self.run_dir} "
                "or choose another --output"
            )
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.run_dir)
            save_recipe(recipe, self.run_dir / RECIPE_FILE)
        barrier(env)

    # ------------------------------------------------------------------------------------------ set-up

    def _build(self) -> None:
        recipe, env, run = self.recipe, self.env, self.recipe.run
        seed_everything(run.seed)  # identical initialisation on every rank
        module, _ = load_task(recipe.task_name)
        ctx = TaskContext(env.device, run.precision, env.rank, env.world_size, run.seed, self.run_dir, recipe)
        state = module.build(recipe.task, ctx)
        if not isinstance(state, TaskState) or not isinstance(state.model, nn.Module):
            raise ConfigError(f"task {recipe.task_name}: build() must return a TaskState with an nn.Module model")
        self.state = state
        model = state.model
        for name in state.frozen:
            try:
                model.get_submodule(name).requires_grad_(False)
            except AttributeError as err:
                raise ConfigError(f"task {recipe.task_name}: frozen module {name!r} does not exist") from err
        stray = [
            n
            for n, p in model.named_parameters()
            if not p.requires_grad and not any(n == f or n.startswith(f + ".") for f in state.frozen)
        ]
        if stray:
            raise ConfigError(
                f"task {recipe.task_name}: parameters {stray[:5]}{'...' if len(stray) > 5 else ''} have "
                "requires_grad=False but are not under a module listed in TaskState.frozen"
            )
        if run.grad_checkpointing:
            if not callable(getattr(model, "set_grad_checkpointing", None)):
                raise ConfigError(f"run.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        model.to(env.device)
        eager_transformers_attention_for_cpu_training(model, env.device, run.precision)
        self.model = model

    def _wrap(self) -> None:
        env, state = self.env, self.state
        if env.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            # fully_shard cannot shard 0-D parameters (BLIP-2's temp): they stay replicated and their
            # gradients are averaged by hand in _sync_replicated_grads.
            scalars = {p for p in self.model.parameters() if p.ndim == 0}
            self.replicated = [p for p in scalars if p.requires_grad]
            units = [m for m in self.model.modules() if state.fsdp_units and isinstance(m, state.fsdp_units)]
            for unit in units:
                if unit is not self.model:
                    fully_shard(unit, ignored_params=scalars)
            fully_shard(self.model, ignored_params=scalars)
            self.step_module: nn.Module = _StepModule(self.model, state)
            self.forward_module: nn.Module = self.step_module
        elif env.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = _StepModule(self.model, state)
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.forward_module = DistributedDataParallel(
                self.step_module, device_ids=ids, find_unused_parameters=state.find_unused_parameters
            )
        else:
            self.step_module = _StepModule(self.model, state)
            self.forward_module = self.step_module

    def _data(self) -> None:
        run, env, state = self.recipe.run, self.env, self.state
        dataset = state.train_dataset
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(f"task {self.recipe.task_name}: train_dataset must be a map-style dataset")
        self.sampler = EpochBatchSampler(
            len(dataset), run.batch_size, rank=env.rank, world_size=env.world_size, seed=run.seed, shuffle=run.shuffle
        )
        generator = torch.Generator()  # keeps DataLoader seeding off the global RNG
        generator.manual_seed(run.seed + 7919 * env.rank)
        self.loader = DataLoader(
            BatchFetcher(dataset, state.collate_fn or default_collate, seeded=not state.deterministic_data),
            batch_size=None,
            sampler=self.sampler,
            num_workers=run.num_workers,
            pin_memory=env.device.type == "cuda",
            worker_init_fn=worker_init,
            persistent_workers=run.num_workers > 0,
            generator=generator,
        )
        accum = self.recipe.optim.accum_steps
        self.steps_per_epoch = self.sampler.batches_per_epoch // accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one epoch has {self.sampler.batches_per_epoch} batches per rank, fewer than optim.accum_steps={accum}"
            )
        self.total_steps = run.max_steps or (run.epochs or 1) * self.steps_per_epoch

    def _optimizer(self) -> None:
        state, recipe = self.state, self.recipe
        self.optimizer, self.groups = build_optimizer(
            self.model, recipe.optim, layer_id=state.layer_id, num_layers=state.num_layers
        )
        self.schedule = LrSchedule(
            recipe.schedule,
            base_lr=recipe.optim.lr,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
            epochs=recipe.run.epochs,
            accum_steps=recipe.optim.accum_steps,
        )
        self.scaler = None
        if recipe.run.precision == "fp16":
            if self.env.mode == "fsdp":
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler("cuda")
            else:
                self.scaler = torch.amp.GradScaler("cuda")
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        precision = self.recipe.run.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    def _set_train_mode(self) -> None:
        self.step_module.train()
        for name in self.state.frozen:
            self.model.get_submodule(name).eval()  # frozen = no dropout / drop-path (LAVIS disabled_train)

    # ------------------------------------------------------------------------------------------ state

    def _model_state(self) -> dict[str, Tensor]:
        """Trainable part of the model, unsharded on CPU (collective under FSDP)."""
        if self.env.mode != "fsdp":
            return ckpt.trainable_state(self.model, self.state.frozen)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.model, options=options)
        keys = set(ckpt.saved_keys(self.model, self.state.frozen))
        return {k: v for k, v in full.items() if k in keys}

    def _optim_state(self) -> dict[str, Any]:
        if self.env.mode != "fsdp":
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _save(self, name: str, *, metric: dict[str, float] | None = None) -> Path:
        """Write checkpoint ``name`` (all ranks take part; rank 0 writes)."""
        for p in self.trainable:
            if not bool(torch.isfinite(p.detach()).all()):
                raise TrainingError(
                    f"a trainable parameter is not finite at step {self.step}; not saving. "
                    f"Last good checkpoint: {self.last_checkpoint or 'none'}"
                )
        model_state = self._model_state()
        optim_state = self._optim_state()
        rngs = gather_objects(rng_state(), self.env)
        path = self.run_dir / ckpt.CHECKPOINTS / name
        if self.env.is_main:
            trainer_state = {
                "step": self.step,
                "epoch": self.epoch,
                "steps_in_epoch": self.in_epoch,
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "schedule": self.schedule.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": rngs,
                "world_size": self.env.world_size,
                "group_names": [info.names for info in self.groups],
                "best": self.best,
                "last_eval_step": self.last_eval_step,
                "distributed": self.env.mode,
            }
            meta = {
                "step": self.step,
                "epoch": self.epoch,
                "steps_in_epoch": self.in_epoch,
                "task": self.recipe.task_name,
                "frozen": ckpt.frozen_record(self.model, self.state.frozen),
                "trainable_parameters": sum(v.numel() for v in model_state.values()),
                "metric": metric,
                "vlkit": __version__,
                "time": time.time(),
                "recipe": recipe_to_dict(self.recipe),
            }
            ckpt.save_checkpoint(path, model_state=model_state, trainer_state=trainer_state, meta=meta)
        barrier(self.env)
        return path

    def _save_step(self) -> None:
        path = self._save(ckpt.step_name(self.step))
        if self.env.is_main:
            ckpt.mark_latest(self.run_dir, path.name)
            ckpt.prune(self.run_dir, self.recipe.run.keep_last)
        self.last_checkpoint, self.last_saved_step = path, self.step
        self.log.info(f"saved checkpoint {path}")
        barrier(self.env)

    def _resume(self) -> list[str]:
        """Load the checkpoint to resume from; returns messages to log."""
        path = self.resume_from
        assert path is not None
        model_state, trainer, meta = ckpt.load_checkpoint(path)
        source = str(path)
        if trainer.get("world_size") != self.env.world_size:
            raise CheckpointError(
                f"{source}: written by {trainer.get('world_size')} process(es), resumed with {self.env.world_size}; "
                "exact resume needs the same number of processes"
            )
        if trainer.get("sampler") != self.sampler.state_dict():
            raise CheckpointError(
                f"{source}: the data layout changed (saved {trainer.get('sampler')}, now {self.sampler.state_dict()}); "
                "resume with the same dataset, run.batch_size, run.seed and run.shuffle"
            )
        if trainer.get("group_names") != [info.names for info in self.groups]:
            raise CheckpointError(f"{source}: the optimiser parameter groups differ from the checkpoint's")
        notes = []
        changed = self.schedule.check_resumable(trainer["schedule"], source=source)
        if changed:
            notes.append(f"resume: schedule settings changed: {'; '.join(changed)}")
        if self.env.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            expected = set(ckpt.saved_keys(self.model, self.state.frozen))
            if set(model_state) != expected:
                raise CheckpointError(f"{source}: checkpoint keys do not match the model's trainable part")
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, model_state, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, trainer["optimizer"], options=options)
        else:
            ckpt.load_trainable(self.model, model_state, self.state.frozen, source=source)
            try:
                self.optimizer.load_state_dict(trainer["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{source}: optimiser state does not fit ({err})") from err
        if self.scaler is not None and trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        self.step, self.epoch, self.in_epoch = trainer["step"], trainer["epoch"], trainer["steps_in_epoch"]
        self.best = trainer.get("best")
        self.last_eval_step = trainer.get("last_eval_step", -1)
        set_rng_state(trainer["rng"][self.env.rank])
        self.last_checkpoint, self.last_saved_step = path, self.step
        best_dir = self.run_dir / ckpt.CHECKPOINTS / ckpt.BEST
        if self.best is not None and best_dir.is_dir():
            self.best_checkpoint = best_dir
        notes.append(f"resumed from {path} at step {self.step} (epoch {self.epoch}, {self.in_epoch} steps into it)")
        return notes

    # ------------------------------------------------------------------------------------------ evaluation

    def _evaluate(self) -> dict[str, float] | None:
        state = self.state
        if state.evaluate is None:
            return None
        self.step_module.eval()
        with _preserved_rngs(self.env.device), torch.no_grad(), self._autocast():
            raw = state.evaluate(self.model)
        self._set_train_mode()
        metrics = broadcast_object({k: float(v) for k, v in raw.items()}, self.env)
        self.last_eval, self.last_eval_step = metrics, self.step
        self.log.evaluation({"step": self.step, "epoch": self.epoch, **metrics})
        if state.best_metric is not None:
            if state.best_metric not in metrics:
                raise ConfigError(
                    f"best_metric {state.best_metric!r} is not among the evaluation results {list(metrics)}"
                )
            value = metrics[state.best_metric]
            best = None if self.best is None else self.best["value"]
            better = best is None or (value > best if state.best_mode == "max" else value < best)
            if better and math.isfinite(value):
                self.best = {"metric": state.best_metric, "value": value, "step": self.step}
                path = self._save(ckpt.BEST, metric=self.best)
                self.best_checkpoint = path
                self.log.info(f"new best {state.best_metric}={value:.6g} at step {self.step}: {path}")
        return metrics

    # ------------------------------------------------------------------------------------------ the loop

    def run(self) -> TrainResult:
        run, env = self.recipe.run, self.env
        self._build()
        self.step, self.epoch, self.in_epoch = 0, 0, 0
        self.best: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self.best_checkpoint: Path | None = None
        self.last_saved_step = -1
        self.last_eval: dict[str, float] | None = None
        self.last_eval_step = -1
        self._data()
        self._wrap()
        seed_everything(run.seed + env.rank)  # dropout etc. differ across ranks; init was identical
        self._optimizer()
        notes = self._resume() if self.resume_from is not None else []
        self.log = RunLog(
            self.run_dir, enabled=env.is_main, total_steps=self.total_steps, start_step=self.step, progress=run.progress
        )
        try:
            for note in notes:
                self.log.info(note)
            self._describe()
            last_row = self._loop()
            exported = self._export()
        finally:
            self.log.close()
        return TrainResult(
            self.run_dir,
            self.step,
            self.last_checkpoint,
            self.best_checkpoint,
            None if self.best is None else self.best["value"],
            last_row,
            self.last_eval,
            exported,
        )

    def _export(self) -> Path | None:
        """Hand the final model to the task's ``export`` hook (rank 0), written atomically to RUN/model."""
        export = self.state.export
        if export is None:
            return None
        if self.env.mode == "fsdp":  # collective: every rank takes part, rank 0 receives the full tensors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.env.is_main else {}
        target = self.run_dir / EXPORT_DIR
        if self.env.is_main:
            tmp = Path(tempfile.mkdtemp(prefix=f".{EXPORT_DIR}.", dir=self.run_dir))
            try:
                export(self.model, full, tmp)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.log.info(f"exported the final model to {target}")
        barrier(self.env)
        return target

    def _describe(self) -> None:
        recipe, env = self.recipe, self.env
        log = self.log
        log.info(
            f"task {recipe.task_name} on {env.device} ({env.mode}, {env.world_size} process(es)), "
            f"precision {recipe.run.precision}, run dir {self.run_dir}"
        )
        for key, value in self.state.info.items():
            log.info(f"  {key}: {value}")
        rows = count_parameters(self.model)
        width = max(len(name) for name, _, _ in rows)
        log.info(f"  {'module'.ljust(width)}  {'trainable':>12}  {'frozen':>12}")
        for name, trainable, frozen in rows:
            log.info(f"  {name.ljust(width)}  {trainable:>12,}  {frozen:>12,}")
        log.info(f"  frozen modules: {', '.join(self.state.frozen) or 'none'}")
        for info in self.groups:
            wd, scale = info.weight_decay, info.lr_scale
            log.info(f"  param group: {len(info.names)} tensors, weight_decay {wd}, lr_scale {scale:.4g}")
        global_batch = recipe.run.batch_size * recipe.optim.accum_steps * env.world_size
        log.info(
            f"  {len(self.state.train_dataset)} samples, global batch {global_batch}, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        )

    def _loop(self) -> dict[str, Any]:
        run, env, optim_cfg = self.recipe.run, self.env, self.recipe.optim
        accum = optim_cfg.accum_steps
        global_batch = run.batch_size * accum * env.world_size
        keys: list[str] | None = None
        last_row: dict[str, Any] = {}
        self._set_train_mode()
        while self.step < self.total_steps:
            if self.in_epoch >= self.steps_per_epoch:
                self.epoch, self.in_epoch = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch, self.in_epoch * accum)
            batches = iter(self.loader)
            while self.in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                t0 = time.perf_counter()
                base_lr = self.schedule.lr(self.step)
                set_learning_rates(self.optimizer, base_lr)
                totals: Tensor | None = None
                for micro in range(accum):
                    batch = _to_device(next(batches), env.device)
                    out, keys = self._forward_backward(batch, last=micro == accum - 1, keys=keys)
                    totals = out if totals is None else totals + out
                assert totals is not None and keys is not None
                means = all_reduce_mean(totals / accum, env).tolist()
                losses = dict(zip(keys, means))
                if not math.isfinite(losses["loss"]):
                    bad = ", ".join(f"{k}={v}" for k, v in losses.items())
                    raise TrainingError(
                        f"non-finite loss at step {self.step + 1} (epoch {self.epoch}): {bad}. Stopping; "
                        f"last good checkpoint: {self.last_checkpoint or 'none (no checkpoint was written yet)'}"
                    )
                grad_norm = self._optimizer_step()
                self.step += 1
                self.in_epoch += 1
                step_time = time.perf_counter() - t0
                if self.step % run.log_every == 0 or self.step == self.total_steps:
                    row = {"step": self.step, "epoch": self.epoch, **losses, "lr": base_lr}
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    if self.scaler is not None:
                        row["loss_scale"] = float(self.scaler.get_scale())
                    row |= {"samples_per_s": global_batch / step_time, "step_time": step_time, "time": time.time()}
                    self.log.step(row)
                    last_row = row if env.is_main else {}
                self.log.advance()
                # evaluate before saving, so a checkpoint already holds the evaluation of its step
                epoch_end = self.in_epoch == self.steps_per_epoch
                if (run.eval_every == "epoch" and epoch_end) or (
                    isinstance(run.eval_every, int) and self.step % run.eval_every == 0
                ):
                    self._evaluate()
                if run.save_every and self.step % run.save_every == 0:
                    self._save_step()
            del batches
        if self.state.evaluate is not None and self.last_eval_step != self.step:
            self._evaluate()  # always evaluate the final model
        if self.last_saved_step != self.step:
            self._save_step()
        self.log.info(f"done: {self.step} steps, last checkpoint {self.last_checkpoint}")
        return last_row

    def _forward_backward(self, batch: Any, *, last: bool, keys: list[str] | None) -> tuple[Tensor, list[str]]:
        """One micro-batch: forward under autocast, backward; returns the detached loss values."""
        env, accum = self.env, self.recipe.optim.accum_steps
        if env.mode == "ddp" and not last:
            sync = self.forward_module.no_sync()
        else:
            sync = nullcontext()
            if env.mode == "fsdp":
                self.model.set_requires_gradient_sync(last)
        with sync:
            with self._autocast():
                out = self.forward_module(batch)
            if not isinstance(out, Mapping) or "loss" not in out:
                raise ConfigError(f"task {self.recipe.task_name}: training_step must return a dict with a 'loss'")
            loss = out["loss"]
            if not isinstance(loss, Tensor) or loss.ndim != 0 or not loss.requires_grad:
                raise ConfigError(
                    f"task {self.recipe.task_name}: training_step's 'loss' must be a 0-D tensor that requires grad"
                )
            scaled = loss.float() / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        names = ["loss"] + sorted(k for k in out if k != "loss")
        if keys is not None and names != keys:
            raise ConfigError(f"task {self.recipe.task_name}: training_step returned {names}, earlier {keys}")
        values = torch.stack([torch.as_tensor(out[k]).detach().float().reshape(()) for k in names])
        return values.to(env.device), names

    def _sync_replicated_grads(self) -> None:
        if not self.replicated:
            return
        import torch.distributed as dist

        for p in self.replicated:
            if p.grad is None:  # unused this step on this rank; others may have a gradient
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.env.world_size

    def _optimizer_step(self) -> float | None:
        self._sync_replicated_grads()
        clip = self.recipe.optim.clip_grad_norm
        grad_norm = None
        if clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
            if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
                norm = norm.full_tensor()
            grad_norm = float(norm)
            if self.scaler is None and not math.isfinite(grad_norm):
                raise TrainingError(
                    f"non-finite gradient norm at step {self.step + 1} (epoch {self.epoch}). Stopping; "
                    f"last good checkpoint: {self.last_checkpoint or 'none'}"
                )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
