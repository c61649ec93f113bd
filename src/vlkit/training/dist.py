"""Process groups, data sharding and seeding for single-process and torchrun runs.

``python -m torch.distributed.run --nproc_per_node N -m vlkit train RECIPE`` sets ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``; :func:`setup` reads them. :func:`teardown` ends a successful run with a barrier and
``destroy_process_group()``: without both, torchrun + gloo aborts at exit in a sizeable fraction of runs
("terminate called without an active exception").

Data order is owned by :class:`EpochBatchSampler`: it yields whole batches of sample indices for one rank,
can start an epoch at any batch (exact resume), and attaches a seed to every sample and batch so that
random augmentations do not depend on worker processes, world size or interruptions.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler, get_worker_info

from vlkit.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mode: str  # "none", "ddp" or "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def _pick_device(device: str, local_rank: int, launched: bool) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={device} but CUDA is not available")
    if launched:  # one GPU per process
        return torch.device("cuda", local_rank)
    return torch.device(device if device.startswith("cuda:") else "cuda")


def setup(mode: str, device: str) -> DistEnv:
    """Create the process group if the run is distributed.

    Args:
        mode: ``run.distributed`` (auto, none, ddp, fsdp).
        device: ``run.device``.

    Raises:
        ConfigError: ``ddp``/``fsdp`` requested without torchrun, or ``none`` under a multi-process launch.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "auto":
        mode = "ddp" if launched and world > 1 else "none"
    if mode == "none" and world > 1:
        raise ConfigError(f"run.distributed=none, but {world} processes were launched")
    if mode in ("ddp", "fsdp") and not launched:
        raise ConfigError(f"run.distributed={mode} needs torchrun (python -m torch.distributed.run ...)")
    dev = _pick_device(device, local_rank, launched)
    if mode != "none":
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, dev, mode)


def teardown(env: DistEnv, *, success: bool) -> None:
    """End the process group. After a success every rank meets at a barrier first.

    After a failure there is no barrier (the other ranks may never reach it); torchrun stops them.
    """
    if not env.distributed or not dist.is_initialized():
        return
    try:
        if success:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean of a tensor over ranks (identity when not distributed); NaN on any rank gives NaN."""
    if not env.distributed:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / env.world_size


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------- seeding


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. run seed, epoch, sample index)."""
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


@contextmanager
def seeded_rngs(seed: int):
    """Run the body with python/numpy/torch-CPU RNGs seeded by ``seed``.

    In the main process the previous states are restored afterwards (training randomness such as dropout
    must not depend on data loading); in DataLoader workers nothing else uses them, so restoring is skipped.
    """
    restore = get_worker_info() is None
    if restore:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only; torch.manual_seed would also reseed every GPU
    try:
        yield
    finally:
        if restore:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- sampling


class BatchKey(NamedTuple):
    """One batch for one rank: sample indices with their seeds, and a seed for the collate function."""

    epoch: int
    batch: int  # index of this batch within the epoch on this rank
    indices: tuple[int, ...]
    sample_seeds: tuple[int, ...]
    collate_seed: int


class EpochBatchSampler(Sampler[BatchKey]):
    """Shuffled (or ordered) batches of one rank's share of the data, resumable at any batch.

    Every epoch the ``n`` indices are permuted with a generator seeded by ``seed + epoch`` (the same on all
    ranks), padded by wrapping around to a multiple of ``world_size`` and dealt round-robin: rank ``r`` gets
    positions ``r, r + W, r + 2W, ...``. Batch ``j`` of all ranks together therefore covers permuted
    positions ``[j*B*W, (j+1)*B*W)`` — the same samples as batch ``j`` of a single process with batch
    size ``B*W``. Incomplete last batches are dropped (each rank has the same number of batches).

    Args:
        n: dataset size.
        batch_size: samples per batch on this rank.
        rank, world_size: this rank and the number of ranks.
        seed: run seed.
        shuffle: permute every epoch.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool) -> None:
        if n < 1:
            raise ConfigError("the training dataset is empty")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.per_rank = -(-n // world_size)
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ConfigError(
                f"the training dataset has {n} samples: too few for batch_size={batch_size} on {world_size} rank(s)"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch, and the first batch to yield (for resuming inside an epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> list[int]:
        """This rank's sample indices for ``epoch``, before batching."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.world_size
        padded = perm + (perm * (-(-total // self.n)))[: total - self.n]
        return padded[self.rank : total : self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[BatchKey]:
        order = self.order(self.epoch)
        for b in range(self.start_batch, self.batches_per_epoch):
            indices = tuple(order[b * self.batch_size : (b + 1) * self.batch_size])
            seeds = tuple(derive_seed(self.seed, self.epoch, i) for i in indices)
            yield BatchKey(self.epoch, b, indices, seeds, derive_seed(self.seed, self.epoch, self.rank, b, 1 << 40))


class BatchFetcher(Dataset):
    """Turns a :class:`BatchKey` into a collated batch: each sample fetched under its own seed.

    Used as the dataset of a ``DataLoader(batch_size=None)`` so worker processes build whole batches.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any], *, seeded: bool = True) -> None:
        self.dataset, self.collate_fn, self.seeded = dataset, collate_fn, seeded

    def __getitem__(self, key: BatchKey) -> Any:  # type: ignore[override]
        if not self.seeded:  # the task promised deterministic data: skip the ~20-80 us per sample of seeding
            return self.collate_fn([self.dataset[i] for i in key.indices])
        samples = []
        for index, seed in zip(key.indices, key.sample_seeds):
            with seeded_rngs(seed):
                samples.append(self.dataset[index])
        with seeded_rngs(key.collate_seed):
            return self.collate_fn(samples)


def worker_init(worker_id: int) -> None:
    """Seed numpy and python in a DataLoader worker from torch's per-worker seed (not duplicated)."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)
