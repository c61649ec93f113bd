"""Frozen-feature cache: run a frozen encoder once per image, train later stages on the stored output.

When the vision encoder is frozen and the image transform is deterministic, its output for an image never
changes, so computing it every epoch is wasted work (for BLIP-2 the ViT is most of the compute). The cache
stores the encoder output per image key in sharded safetensors files::

    ROOT/<cache id>/meta.json                 encoder fingerprint, transform signature, dtype
    ROOT/<cache id>/shard-<rank>-<uuid>.safetensors
                                              tensors named "0", "1", ...; the header metadata maps
                                              image keys to those names

The cache id hashes the encoder fingerprint (its class and weights, see :func:`fingerprint_module`) and the
transform signature, so changing either starts a new, empty cache: stale features are never served.
Shards are written atomically; an interrupted fill keeps every finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlkit.checkpoints.io import atomic_path, save_safetensors
from vlkit.errors import DataError


def fingerprint_module(module: nn.Module, extra: str = "") -> str:
    """A sha256 over a module's class, parameter/buffer names, shapes, dtypes and values.

    Args:
        module: the (frozen) encoder.
        extra: anything else that changes its output (e.g. autocast precision, output layer choice).
    """
    h = hashlib.sha256()
    h.update(f"{type(module).__module__}.{type(module).__qualname__}\n{extra}\n".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def transform_signature(transform: Any) -> str:
    """A stable string for a deterministic transform: its ``signature()`` if it has one, else its ``repr``.

    A dataclass-based transform (the usual case in vlkit) has a repr listing all of its settings.
    """
    sig = getattr(transform, "signature", None)
    return sig() if callable(sig) else repr(transform)


class _Pending(Dataset):
    def __init__(self, keys: Sequence[str], load: Callable[[str], Tensor]) -> None:
        self.keys, self.load = keys, load

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Tensor:
        return self.load(self.keys[i])


class FeatureCache:
    """Encoder outputs keyed by image key, for one (encoder, transform) pair.

    Args:
        root: cache root directory (shared by every encoder/transform; each pair gets a subdirectory).
        encoder_fingerprint: identifies the encoder and its weights (:func:`fingerprint_module`).
        transform_signature: identifies the deterministic transform (:func:`transform_signature`).
    """

    def __init__(self, root: str | os.PathLike, *, encoder_fingerprint: str, transform_signature: str) -> None:
        self.encoder_fingerprint = encoder_fingerprint
        self.transform_signature = transform_signature
        cache_id = hashlib.sha256(f"{encoder_fingerprint}\n{transform_signature}".encode()).hexdigest()[:24]
        self.dir = Path(root) / cache_id
        self._index: dict[str, tuple[str, str]] = {}  # key -> (shard file name, tensor name)
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the shard headers (after another process added shards)."""
        self._index.clear()
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                mapping = json.loads((f.metadata() or {}).get("keys", "{}"))
            for key, name in mapping.items():
                self._index[key] = (shard.name, name)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys (in order, without duplicates) that have no cached features yet."""
        seen: set[str] = set()
        out = []
        for key in keys:
            if key not in self._index and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def get(self, key: str) -> Tensor:
        """The cached features of ``key``, exactly as the encoder returned them (dtype included).

        Raises:
            DataError: if ``key`` was never computed.
        """
        try:
            shard, name = self._index[key]
        except KeyError:
            raise DataError(f"feature cache {self.dir}: no features for {key!r}; fill() the cache first") from None
        if os.getpid() != self._pid:  # file handles do not survive fork into DataLoader workers
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return handle.get_tensor(name)

    def fill(
        self,
        keys: Sequence[str],
        *,
        load: Callable[[str], Tensor],
        encode: Callable[[Tensor], Tensor],
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        shard_bytes: int = 256 << 20,
        autocast_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
    ) -> int:
        """Compute and store the features of every key not yet cached.

        Under torchrun every rank calls ``fill`` with the same keys; each computes a disjoint share and
        all ranks meet at a barrier before reading the complete cache.

        Args:
            keys: image keys (e.g. relative paths or ids); duplicates are computed once.
            load: ``key -> image tensor`` (C, H, W), after the deterministic transform.
            encode: the frozen encoder, ``(B, C, H, W) -> (B, ...)``; called under ``torch.no_grad()``.
            device: where ``encode`` runs.
            batch_size, num_workers: batching of the images.
            shard_bytes: start a new shard file once this many bytes of features are pending.
            autocast_dtype: run ``encode`` under autocast with this dtype (must be part of the fingerprint).
            rank, world_size: this process's share of the work.
            progress: show a progress bar (rank 0).

        Returns:
            The number of keys computed (by all ranks).
        """
        distributed = world_size > 1
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError("FeatureCache.fill with world_size > 1 needs an initialised process group")
        share = self.share(keys, rank, world_size)
        if share:
            loader = DataLoader(_Pending(share, load), batch_size=batch_size, num_workers=num_workers)
            self._compute(share, loader, encode, torch.device(device), shard_bytes, autocast_dtype, rank, progress)
        computed = len(share)
        if distributed:
            on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces only CUDA tensors
            count = torch.tensor([computed], dtype=torch.int64, device="cuda" if on_gpu else "cpu")
            torch.distributed.all_reduce(count)  # also the barrier after which every shard is written
            computed = int(count.item())
        self.refresh()
        still = self.missing(keys)
        if still:
            raise DataError(f"feature cache {self.dir}: {len(still)} keys still missing after fill, e.g. {still[0]!r}")
        return computed

    def share(self, keys: Sequence[str], rank: int, world_size: int) -> list[str]:
        """The missing keys that ``rank`` computes: every ``world_size``-th of the distinct ``keys``.

        Ownership follows the position in ``keys`` (identical on every rank), not the list of missing keys:
        that list depends on when a rank looks (others may already have written shards), and splitting it
        by position would leave keys to nobody.
        """
        distinct = list(dict.fromkeys(keys))
        return [k for k in distinct[rank::world_size] if k not in self._index]

    def _compute(
        self,
        keys: list[str],
        loader: DataLoader,
        encode: Callable[[Tensor], Tensor],
        device: torch.device,
        shard_bytes: int,
        autocast_dtype: torch.dtype | None,
        rank: int,
        progress: bool,
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            record = {"encoder_fingerprint": self.encoder_fingerprint, "transform": self.transform_signature}
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        if isinstance(encode, nn.Module):
            encode.eval()
        pending: dict[str, Tensor] = {}
        pending_keys: dict[str, str] = {}
        pending_bytes = done = 0
        bar = tqdm(total=len(keys), desc="feature cache", unit="img", disable=not (progress and rank == 0))
        autocast = torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        )
        for images in loader:
            with torch.no_grad(), autocast:
                feats = encode(images.to(device))
            if feats.shape[0] != images.shape[0]:
                raise DataError(f"feature cache: encoder returned {feats.shape[0]} rows for {images.shape[0]} images")
            for row in feats.detach().cpu():
                name = str(len(pending))
                pending[name] = row.clone()
                pending_keys[keys[done]] = name
                pending_bytes += row.numel() * row.element_size()
                done += 1
                if pending_bytes >= shard_bytes:
                    self._write_shard(pending, pending_keys, rank)
                    pending, pending_keys, pending_bytes = {}, {}, 0
            bar.update(images.shape[0])
        if pending:
            self._write_shard(pending, pending_keys, rank)
        bar.close()

    def _write_shard(self, tensors: dict[str, Tensor], keys: dict[str, str], rank: int) -> None:
        path = self.dir / f"shard-{rank:03d}-{uuid.uuid4().hex[:12]}.safetensors"
        save_safetensors(tensors, path, metadata={"keys": json.dumps(keys)})


class CachedFeatureDataset(Dataset):
    """Wraps a dataset of samples (dicts without pixels) and adds each sample's cached features.

    Args:
        base: map-style dataset of dict samples; build it so that it does not load images.
        cache: a filled :class:`FeatureCache`.
        key_of: ``sample -> image key`` (e.g. ``lambda s: s["image_path"]``).
        field: name of the added entry (e.g. ``"image_embeds"``).
    """

    def __init__(self, base: Dataset, cache: FeatureCache, key_of: Callable[[dict], str], field: str) -> None:
        self.base, self.cache, self.key_of, self.field = base, cache, key_of, field

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        sample = dict(self.base[i])
        sample[self.field] = self.cache.get(self.key_of(sample))
        return sample
