"""Safe reading and atomic writing of weight files.

Pickled checkpoints (``.pth``/``.pt``/``.bin``) are only ever read with ``torch.load(weights_only=True)``,
which refuses to execute code. Writes go to a temporary file in the same directory and are renamed into
place, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _load_safetensors
from safetensors.torch import save_file as _save_safetensors
from torch import Tensor

from vlkit.errors import CheckpointError


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Read a ``.safetensors`` or pickled torch file without executing code.

    Raises:
        CheckpointError: if the file is missing, not a checkpoint, or needs arbitrary code to unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".safetensors":
            return _load_safetensors(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zipfile(path))
    except Exception as err:  # torch/safetensors raise many different types here
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def _is_zipfile(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def state_dict_of(
    obj: Any, *, source: str, keys: tuple[str, ...] = ("model", "state_dict", "module")
) -> dict[str, Tensor]:
    """Find the state dict inside a loaded checkpoint (bare, or under one of ``keys``)."""
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj and isinstance(obj[key], Mapping):
                return dict(obj[key])
        if all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointError(f"{source}: no state dict found (looked for a bare dict of tensors or keys {keys})")


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success rename it over ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write tensors (made contiguous; shared storage is cloned) to ``path``."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() > 0:
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    with atomic_path(path) as tmp:
        _save_safetensors(out, str(tmp), metadata=metadata)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` ``obj`` to ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256(path: str | os.PathLike, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()
