"""A tiny synthetic classification task that exercises the whole trainer in seconds.

Inputs ``x`` are Gaussian vectors; labels come from a fixed random linear "teacher", so the task is
learnable and the loss falls. The model is ``encoder`` (a linear stem, optionally frozen), a stack of
residual MLP blocks (layer ids for layer-wise lr decay), a head, and a 0-D ``logit_scale`` (exercises the
weight-decay rule for 0-D parameters). Options add dropout, random per-sample augmentation noise, a
frozen encoder served from the frozen-feature cache, an artificial per-step delay (for kill/resume tests)
and a NaN loss at a given step (for the non-finite-loss test).

It is the reference example of the task interface (:mod:`vlkit.training.task`) for task authors.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlkit.errors import ConfigError
from vlkit.training.task import TaskContext, TaskState


@dataclass
class ToyConfig:
    """Options of the ``toy`` task.

    Attributes:
        num_samples: training set size.
        val_samples: evaluation set size (0: no evaluation).
        in_dim, hidden, depth, num_classes: model and data sizes.
        dropout: dropout inside the blocks.
        noise: std of Gaussian noise added to each training sample when it is fetched (an augmentation).
        freeze_encoder: freeze the linear stem (declared in ``TaskState.frozen``).
        feature_cache: directory of a frozen-feature cache; needs ``freeze_encoder`` and ``noise: 0``.
        data_seed: seed of the synthetic data (independent of ``run.seed``).
        step_delay: seconds to sleep in every training step.
        nan_at_step: return a NaN loss on this (1-based) call of ``training_step``.
    """

    num_samples: int = 256
    val_samples: int = 64
    in_dim: int = 8
    hidden: int = 32
    depth: int = 2
    num_classes: int = 4
    dropout: float = 0.0
    noise: float = 0.0
    freeze_encoder: bool = False
    feature_cache: Path | None = None
    data_seed: int = 1234
    step_delay: float = 0.0
    nan_at_step: int | None = None

    def __post_init__(self) -> None:
        if min(self.num_samples, self.in_dim, self.hidden, self.depth, self.num_classes) < 1:
            raise ConfigError("task: num_samples, in_dim, hidden, depth and num_classes must be >= 1")
        if self.feature_cache is not None and (not self.freeze_encoder or self.noise):
            raise ConfigError("task.feature_cache needs freeze_encoder: true and noise: 0 (a deterministic input)")


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop(F.gelu(self.fc(self.norm(x))))


class ToyNet(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.encoder = nn.Linear(cfg.in_dim, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.dropout) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor | None = None, *, features: Tensor | None = None) -> Tensor:
        """Logits (B, C) from inputs ``x`` (B, in_dim) or from precomputed encoder ``features`` (B, hidden).

        One entry point for both, because under FSDP parameters are gathered only inside ``__call__``.
        """
        h = self.encoder(x) if features is None else features
        for block in self.blocks:
            h = block(h)
        return self.head(h) * self.logit_scale


def make_data(cfg: ToyConfig, n: int, offset: int) -> tuple[Tensor, Tensor]:
    """Synthetic inputs (n, in_dim) and teacher labels (n,), fixed by ``cfg.data_seed``."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    teacher = torch.randn(cfg.in_dim, cfg.num_classes, generator=g)
    g.manual_seed(cfg.data_seed + 1 + offset)
    x = torch.randn(n, cfg.in_dim, generator=g)
    return x, (x @ teacher).argmax(-1)


class ToyDataset(Dataset):
    """``{"x": (in_dim,), "y": ()}`` samples, with optional per-fetch noise from the global torch RNG."""

    def __init__(self, x: Tensor, y: Tensor, noise: float = 0.0) -> None:
        self.x, self.y, self.noise = x, y, noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.x[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return {"x": x, "y": self.y[i], "key": f"sample-{i}"}


def _collate(samples: list[dict]) -> dict:
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "key"}
    out["key"] = [s["key"] for s in samples]
    return out


def layer_id(name: str) -> int | None:
    """Layer index for layer-wise lr decay: encoder 0, block i -> i + 1, everything else None."""
    if name.startswith("encoder."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return None


def build(cfg: ToyConfig, ctx: TaskContext) -> TaskState:
    """Build the toy task (see :mod:`vlkit.training.task` for the contract)."""
    model = ToyNet(cfg)
    x, y = make_data(cfg, cfg.num_samples, 0)
    dataset: Dataset = ToyDataset(x, y, cfg.noise)
    info = {"samples": cfg.num_samples}
    if cfg.feature_cache is not None:
        from vlkit.training.feature_cache import CachedFeatureDataset, FeatureCache, fingerprint_module

        encoder = model.encoder
        cache = FeatureCache(
            cfg.feature_cache, encoder_fingerprint=fingerprint_module(encoder), transform_signature="toy:identity"
        )
        keys = [f"sample-{i}" for i in range(len(x))]
        computed = cache.fill(
            keys,
            load=lambda key: x[int(key.split("-")[1])],
            encode=encoder,
            device=ctx.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        info["feature cache"] = f"{cache.dir} ({computed} computed, {len(keys) - computed} cached)"
        dataset = CachedFeatureDataset(dataset, cache, key_of=operator.itemgetter("key"), field="h")

    calls = 0

    def training_step(net: ToyNet, batch: dict) -> dict[str, Tensor]:
        nonlocal calls
        calls += 1
        if cfg.step_delay:
            time.sleep(cfg.step_delay)
        # with the feature cache the batch carries the frozen encoder's output "h" instead of running it
        logits = net(features=batch["h"]) if "h" in batch else net(batch["x"])
        loss = F.cross_entropy(logits.float(), batch["y"])
        if cfg.nan_at_step is not None and calls == cfg.nan_at_step:
            loss = loss * float("nan")
        accuracy = (logits.argmax(-1) == batch["y"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    evaluate = None
    if cfg.val_samples:
        vx, vy = make_data(cfg, cfg.val_samples, 1)

        def evaluate(net: ToyNet) -> dict[str, float]:
            logits = net(vx.to(ctx.device)).float()
            target = vy.to(ctx.device)
            return {
                "accuracy": float((logits.argmax(-1) == target).float().mean()),
                "val_loss": float(F.cross_entropy(logits, target)),
            }

    return TaskState(
        model=model,
        train_dataset=dataset,
        training_step=training_step,
        collate_fn=_collate,
        frozen=("encoder",) if cfg.freeze_encoder else (),
        layer_id=layer_id,
        num_layers=cfg.depth + 1,
        evaluate=evaluate,
        best_metric="accuracy" if cfg.val_samples else None,
        fsdp_units=(Block,),
        deterministic_data=cfg.noise == 0,
        info=info,
    )
