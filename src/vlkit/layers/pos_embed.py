"""Resizing learned absolute position embeddings to a new patch grid.

A checkpoint trained at 224 px (16x16 patches of 14 px) is used at 364 px (26x26) by resizing its patch
grid of position vectors with bicubic interpolation; the class-token entry is kept as it is. The two
reference ViTs differ in one flag: EVA (and HF) use ``align_corners=False``, OpenAI-CLIP-style code uses
``align_corners=True``. Interpolation runs in fp32 on the checkpoint tensor, before loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.errors import CheckpointError


def grid_size(num_patches: int, *, source: str = "position embedding") -> int:
    """Side of the square patch grid with ``num_patches`` cells.

    Raises:
        CheckpointError: if ``num_patches`` is not a perfect square.
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise CheckpointError(f"{source}: {num_patches} patch positions do not form a square grid")
    return side


def resize_pos_embed(
    pos_embed: Tensor, new_grid: int, *, align_corners: bool, num_prefix_tokens: int = 1, source: str = "pos_embed"
) -> Tensor:
    """Resize the patch-grid part of a position embedding.

    Args:
        pos_embed: (1, P + G*G, D) or (P + G*G, D), where P = ``num_prefix_tokens`` (the CLS entry).
        new_grid: side of the target grid.
        align_corners: False for EVA/HF, True for OpenAI-CLIP ViTs.
        num_prefix_tokens: leading entries kept unchanged.
        source: name used in error messages.

    Returns:
        The resized embedding, same rank as the input, in fp32 (the caller casts when loading).
    """
    squeeze = pos_embed.dim() == 2
    x = pos_embed.unsqueeze(0) if squeeze else pos_embed
    if x.dim() != 3 or x.shape[0] != 1:
        raise CheckpointError(f"{source}: expected shape (1, N, D) or (N, D), got {tuple(pos_embed.shape)}")
    x = x.float()
    prefix, grid = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    old = grid_size(grid.shape[1], source=source)
    if old != new_grid:
        dim = grid.shape[-1]
        grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=align_corners)
        grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim)
    out = torch.cat([prefix, grid], dim=1)
    return out[0] if squeeze else out


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position vectors of a ``grid`` x ``grid`` patch grid, row-major: (grid*grid, dim).

    The first half of each vector encodes the column, the second half the row, each as ``dim / 4`` sines and
    cosines at frequencies ``10000 ** (-k / (dim / 4))`` (the MAE form). Every offset between two patches is
    then a fixed rotation of these features, so "left of" and "above" are linear in them from the first step.

    Raises:
        ValueError: if ``dim`` is not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values: Tensor) -> Tensor:  # (G*G,) -> (G*G, dim/2)
        angles = values.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


@torch.no_grad()
def init_sincos_(pos_embed: Tensor, *, num_prefix_tokens: int = 1, source: str = "pos_embed") -> None:
    """Fill a (1, P + G*G, D) position embedding in place: zeros for the P prefix entries (CLS), then
    :func:`sincos_2d` for the patch grid. A from-scratch initialisation; the parameter stays learnable."""
    grid = grid_size(pos_embed.shape[1] - num_prefix_tokens, source=source)
    pos_embed.zero_()
    pos_embed[0, num_prefix_tokens:] = sincos_2d(grid, pos_embed.shape[-1]).to(pos_embed.dtype)
