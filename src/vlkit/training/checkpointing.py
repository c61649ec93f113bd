"""Training checkpoints: written atomically, complete enough to resume a run exactly.

Layout of a run directory::

    RUN/checkpoints/step-00000100/
        model.safetensors   trainable parameters + buffers of non-frozen modules (unsharded, fp32)
        trainer.pt          optimiser, grad scaler, schedule settings, RNG states of every rank, data
                            position (epoch, steps done in it, sampler settings), step, best metric
        meta.json           step, epoch, what was frozen (module names and parameter counts), recipe
    RUN/checkpoints/latest  name of the newest complete checkpoint
    RUN/checkpoints/best/   the checkpoint with the best evaluation metric (when the task has one)

A checkpoint directory is assembled under a temporary name and renamed into place (each file is also
written atomically), so a crash or SIGKILL leaves either the old or the new checkpoint, never half of one.
Frozen weights are not saved: the task rebuilds them from its pretrained source, and ``meta.json`` records
which modules they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlkit.checkpoints.io import atomic_path, read_checkpoint, save_safetensors, save_torch
from vlkit.errors import CheckpointError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
META_FILE = "meta.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def saved_keys(model: nn.Module, frozen: tuple[str, ...]) -> list[str]:
    """Names of the state-dict entries a checkpoint holds: trainable parameters and non-frozen buffers."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = {n for n, _ in model.named_parameters()}
    keys = []
    for name in model.state_dict(keep_vars=True):
        if name in trainable or (name not in params and not _under(name, frozen)):
            keys.append(name)
    return keys


def trainable_state(model: nn.Module, frozen: tuple[str, ...]) -> dict[str, Tensor]:
    """The part of ``model.state_dict()`` a checkpoint holds (see :func:`saved_keys`), detached on CPU."""
    keys = set(saved_keys(model, frozen))
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keys}


def frozen_record(model: nn.Module, frozen: tuple[str, ...]) -> list[dict[str, Any]]:
    """What was frozen: each module with its parameter count and dtypes (kept in meta.json)."""
    out = []
    for name in frozen:
        module = model.get_submodule(name)
        params = list(module.parameters())
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        out.append({"module": name, "parameters": sum(p.numel() for p in params), "dtypes": dtypes})
    return out


def save_checkpoint(
    ckpt_dir: Path, *, model_state: dict[str, Tensor], trainer_state: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write one checkpoint directory atomically (replacing an existing one of the same name).

    Args:
        ckpt_dir: final directory, e.g. ``RUN/checkpoints/step-00000100``.
        model_state: tensors for ``model.safetensors``.
        trainer_state: everything else needed to resume (``torch.save``-able with plain types and tensors).
        meta: JSON-able description.

    Returns:
        ``ckpt_dir``.
    """
    ckpt_dir = Path(ckpt_dir)
    parent = ckpt_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{ckpt_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors(model_state, tmp / MODEL_FILE)
    save_torch(trainer_state, tmp / TRAINER_FILE)
    with atomic_path(tmp / META_FILE) as path:
        path.write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
    old = None
    if ckpt_dir.exists():
        old = parent / f".{ckpt_dir.name}.old-{os.getpid()}"
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def mark_latest(run_dir: Path, name: str) -> None:
    """Point ``RUN/checkpoints/latest`` at checkpoint ``name`` (atomic)."""
    with atomic_path(Path(run_dir) / CHECKPOINTS / LATEST) as path:
        path.write_text(name + "\n", encoding="utf-8")


def clean_partial(run_dir: Path) -> None:
    """Remove temporary directories left by a crash during a checkpoint write."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (``best`` is separate). Returns the deleted."""
    old = step_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else step_checkpoints(run_dir)
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory meant by ``--resume PATH``: a checkpoint itself, or a run directory.

    Raises:
        CheckpointError: if ``path`` holds no complete checkpoint.
    """
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    root = path / CHECKPOINTS
    latest = root / LATEST
    if latest.is_file():
        candidate = root / latest.read_text(encoding="utf-8").strip()
        if (candidate / META_FILE).is_file():
            return candidate
    found = step_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"{path}: no checkpoint to resume from (expected {CHECKPOINTS}/step-*/{META_FILE})")


def run_dir_of(ckpt_dir: Path) -> Path:
    """The run directory that holds checkpoint ``ckpt_dir``."""
    ckpt_dir = Path(ckpt_dir).resolve()
    return ckpt_dir.parent.parent if ckpt_dir.parent.name == CHECKPOINTS else ckpt_dir


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read ``(model_state, trainer_state, meta)`` from a checkpoint directory.

    Raises:
        CheckpointError: if a file is missing or unreadable.
    """
    ckpt_dir = Path(ckpt_dir)
    for name in (MODEL_FILE, TRAINER_FILE, META_FILE):
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint, {name} is missing")
    try:
        meta = json.loads((ckpt_dir / META_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{ckpt_dir / META_FILE}: not valid JSON ({err})") from err
    return read_checkpoint(ckpt_dir / MODEL_FILE), read_checkpoint(ckpt_dir / TRAINER_FILE), meta


def load_trainable(model: nn.Module, state: dict[str, Tensor], frozen: tuple[str, ...], *, source: str) -> None:
    """Copy a checkpoint's trainable part into ``model``; keys and shapes must match exactly.

    The frozen part must already be in ``model`` (built by the task from its pretrained source).

    Raises:
        CheckpointError: listing missing, unexpected or mis-shaped keys.
    """
    expected = saved_keys(model, frozen)
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: checkpoint does not match the model's trainable part: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''} "
            "(was the run resumed with different frozen modules or model settings?)"
        )
    current = model.state_dict()
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(current[k].shape)}"
        for k in expected
        if state[k].shape != current[k].shape
    ]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for {bad[:10]}")
    with torch.no_grad():
        for key in expected:
            current[key].copy_(state[key])
