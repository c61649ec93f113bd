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
