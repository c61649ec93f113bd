"""Collective helpers that work with and without an initialised process group.

LAVIS calls ``torch.distributed.get_rank()`` unconditionally inside its losses, so it cannot run as a single
plain process. Every helper here degrades to the single-process meaning when no process group exists
(rank 0, world size 1, gathers that return the local tensor), so a loss written once runs unchanged under
``python``, ``torchrun --nproc_per_node 1`` and multi-GPU ``torchrun``.

The two gathers differ in how gradients flow, and the BLIP-2 objectives need both:

* :func:`all_gather_no_grad` returns constants. ITC gathers its negatives this way, so only the local rows
  of the similarity matrix carry gradient. The result is detached even on one process, where the gather is
  an identity, because the gradient must not depend on the number of processes.
* :func:`all_gather_with_grad` is autograd-aware: the backward pass sums the gradient every rank computed
  for the gathered tensor and hands each rank the slice of its own input. ITM gathers the image embeddings
  this way, since a hard negative picked on one rank may belong to another.

All gathers concatenate along dim 0 in rank order and need the same shape on every rank (use
``drop_last`` or a padded sampler, and pad text to a fixed length).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_sum",
    "barrier",
    "init_from_env",
    "is_distributed",
    "rank",
    "shutdown",
    "world_size",
]


def is_distributed() -> bool:
    """True when a default process group is initialised (even one with a single process)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def _gather_cat(t: Tensor) -> Tensor:
    # List-based all_gather works on every backend (gloo has no all_gather_into_tensor for all dtypes).
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, as a constant (no gradient).

    Args:
        t: (B, ...) the same shape on every rank.

    Returns:
        (W·B, ...) rank-ordered; rows ``rank·B : (rank+1)·B`` are this rank's ``t``. Always detached, also
        on a single process (where it is ``t.detach()``).
    """
    if world_size() == 1:
        return t.detach()
    return _gather_cat(t)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor) -> Tensor:  # (B, ...) -> (W·B, ...)
        ctx.batch = t.shape[0]
        return _gather_cat(t)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # (W·B, ...) -> (B, ...)
        # Every rank holds only the gradient of its own loss w.r.t. the gathered tensor; summing over ranks
        # gives the gradient of the sum of all ranks' losses, and each rank keeps its own rows.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from every rank along dim 0, keeping the gradient path to every rank.

    Backward: the gradients that all ranks computed for the gathered tensor are summed (all-reduce) and
    each rank receives the slice that belongs to its own ``t``. The identity on a single process.

    Args:
        t: (B, ...) the same shape on every rank.

    Returns:
        (W·B, ...) rank-ordered.
    """
    if world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum of ``t`` over all ranks, as a new tensor (``t`` is not modified).

    Args:
        t: any shape, the same on every rank.

    Returns:
        Same shape as ``t``; a copy of ``t`` on a single process.
    """
    out = t.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialised: bool  # whether a process group is initialised


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as err:
        from vlkit.errors import ConfigError

        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from err


def init_from_env(backend: str | None = None, *, timeout: timedelta | None = None) -> DistInfo:
    """Initialise the default process group from the variables ``torchrun`` sets, if present.

    Without ``RANK``/``WORLD_SIZE`` in the environment this is a plain single process: nothing is
    initialised and the helpers above keep their single-process meaning. With them, the process group is
    created with ``backend`` (default: nccl when CUDA is available, else gloo) and, on CUDA, this process
    is bound to ``cuda:LOCAL_RANK``. Calling it again after a group exists only reports the state.

    Args:
        backend: "gloo", "nccl", or None to choose by device.
        timeout: collective timeout (torch's default when None).

    Returns:
        DistInfo with rank, world size, local rank and the device this process should use.
    """
    local_rank = _env_int("LOCAL_RANK") or 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if is_distributed():
        return DistInfo(rank(), world_size(), local_rank, device, True)
    env_rank, env_world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if env_rank is None or env_world is None:
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(0, 1, 0, device, False)
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    kwargs: dict = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if cuda:
        torch.cuda.set_device(device)
        if backend == "nccl":
            # Binding the group to the device lets barrier() and friends use the right GPU without warnings.
            kwargs["device_id"] = device
    dist.init_process_group(backend=backend, init_method="env://", rank=env_rank, world_size=env_world, **kwargs)
    return DistInfo(env_rank, env_world, local_rank, device, True)


def shutdown() -> None:
    """Tear down the process group cleanly: barrier, then destroy. A no-op without a process group.

    Exiting with a live group makes some processes abort at interpreter shutdown ("terminate called
    without an active exception" with gloo); the barrier makes sure no rank is still in a collective.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
