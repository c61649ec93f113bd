"""VLMo's shared relative position bias: table layout, index matrices, and resampling between resolutions.

VLMo (base, large) keeps one learnable table of shape (rows, heads * depth) for all layers; column
``l * heads + h`` is head ``h`` of layer ``l``. Rows are laid out as follows, with ``P`` patches per image
side, ``R = (2P - 1)**2 + 3`` and ``T0`` the text length the table was first built for (196 in every
released checkpoint):

* ``0 .. (2P-1)**2 - 1``: image patch-to-patch offsets (query minus key, row-major over (dh, dw));
* ``R - 3`` image CLS query -> patch key, ``R - 2`` patch query -> CLS key, ``R - 1`` CLS -> CLS;
* ``R`` any text query -> image key, ``R + 1`` any image query -> text key;
* ``R + 2 .. R + 2*T0 - 1``: text offsets, index ``R + T0 + (key - query)``;
* the last three rows: text CLS query -> token key, token query -> CLS key, CLS -> CLS.

The index matrices are a pure function of the grid and the text length, so they are rebuilt here rather
than loaded. Resampling a table trained at one resolution to another follows BEiT: the patch offsets are
placed on a geometrically stretched grid and a bicubic interpolating spline is evaluated at integer offsets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline
from torch import Tensor


def num_image_distances(grid: int) -> int:
    """``R``: rows used by images (patch offsets plus the three image-CLS rows) for a ``grid x grid`` patch grid."""
    return (2 * grid - 1) ** 2 + 3


def num_table_rows(grid: int, text_len_of_table: int) -> int:
    """Rows of the shared table: image rows, two cross-modal rows, ``2*T0`` text rows (incl. the text CLS rows)."""
    return num_image_distances(grid) + 2 * text_len_of_table + 2


def num_extra_rows(text_len_of_table: int) -> int:
    """Rows after the patch-offset block (kept unchanged by resampling): 3 image-CLS + 2 cross + 2*T0 text."""
    return 3 + 2 + 2 * text_len_of_table


def grid_from_table_rows(rows: int, text_len_of_table: int) -> int | None:
    """The patch grid side ``P`` a table with ``rows`` rows was built for, or None if no grid fits."""
    side2 = rows - num_extra_rows(text_len_of_table)
    if side2 <= 0:
        return None
    side = math.isqrt(side2)
    if side * side != side2 or side % 2 == 0:
        return None
    return (side + 1) // 2


def image_relative_position_index(grid: int) -> Tensor:
    """Table rows for an image sequence ``[CLS, patch_0 .. patch_{P*P-1}]`` (patches row-major).

    Args:
        grid: patches per image side ``P``.

    Returns:
        (P*P + 1, P*P + 1) int64; entry [q, k] is the table row of query q attending to key k.
    """
    side = 2 * grid - 1
    r = num_image_distances(grid)
    hh, ww = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    h, w = hh.flatten(), ww.flatten()  # (P*P,)
    dh = h[:, None] - h[None, :] + grid - 1  # query minus key, shifted to >= 0
    dw = w[:, None] - w[None, :] + grid - 1
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = dh * side + dw
    index[0, :] = r - 3
    index[:, 0] = r - 2
    index[0, 0] = r - 1
    return index


def text_relative_position_index(text_len: int, grid: int, text_len_of_table: int) -> Tensor:
    """Table rows for a text sequence ``[CLS, tok_1 .. tok_{L-1}]``.

    Args:
        text_len: sequence length ``L`` (at most ``text_len_of_table``).
        grid: patches per image side (the text rows come after the image rows).
        text_len_of_table: ``T0``, the text length the table was built for.

    Returns:
        (L, L) int64.
    """
    if not 1 <= text_len <= text_len_of_table:
        raise ValueError(f"text length {text_len} must be in 1..{text_len_of_table} (the bias table's text length)")
    r = num_image_distances(grid)
    rows = num_table_rows(grid, text_len_of_table)
    pos = torch.arange(text_len)
    # Text offsets are key minus query (the opposite sign of the image convention), as in the reference.
    index = r + text_len_of_table + (pos[None, :] - pos[:, None])
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def fusion_relative_position_index(text_len: int, grid: int, text_len_of_table: int) -> Tensor:
    """Table rows for the fused sequence ``[text (L) ; image (P*P + 1)]``.

    Returns:
        (L + P*P + 1, L + P*P + 1) int64: text block, text->image = R, image->text = R + 1, image block.
    """
    r = num_image_distances(grid)
    text = text_relative_position_index(text_len, grid, text_len_of_table)
    image = image_relative_position_index(grid)
    n_img = image.shape[0]
    top = torch.cat([text, torch.full((text_len, n_img), r, dtype=torch.long)], dim=1)
    bottom = torch.cat([torch.full((n_img, text_len), r + 1, dtype=torch.long), image], dim=1)
    return torch.cat([top, bottom], dim=0)


def geometric_source_coords(src_size: int, dst_size: int) -> tuple[np.ndarray, np.ndarray]:
    """BEiT's coordinates for resampling a ``src_size`` square of offsets to ``dst_size``.

    The source offsets ``0, +-1, +-(1+q), +-(1+q+q^2), ...`` are stretched by a ratio ``q`` found by bisection
    on [1.01, 1.5] so that the outermost one lands near ``dst_size // 2``; the targets are the integers
    ``-dst_size//2 .. dst_size//2``. The bisection, its bounds and its tolerance are the reference's, so the
    coordinates (and hence the resampled table) match it exactly.

    Returns:
        (source coordinates (src_size,), target coordinates (dst_size,)), both float64.
    """
    half_src, half_dst = src_size // 2, dst_size // 2
    left, right = 1.01, 1.5
    q = left
    while right - left > 1e-6:
        q = (left + right) / 2.0
        span = (1.0 - q**half_src) / (1.0 - q)  # 1 + q + ... + q^(half_src - 1)
        if span > half_dst:
            right = q
        else:
            left = q
    dis = []
    cur = 1.0
    for i in range(half_src):
        dis.append(cur)
        cur += q ** (i + 1)
    src = np.array([-d for d in reversed(dis)] + [0.0] + dis, dtype=np.float64)
    t = dst_size // 2.0
    dst = np.arange(-t, t + 0.1, 1.0)
    return src, dst


def resample_offset_grid(values: Tensor, src_size: int, dst_size: int) -> Tensor:
    """Resample a square grid of per-column values (one column per head) from ``src_size`` to ``dst_size``.

    Each column is fit with a bicubic interpolating spline (``RectBivariateSpline``, kx=ky=3, s=0) on the
    geometric source grid and evaluated on the integer target grid. This is what the reference did with the
    since-removed ``scipy.interpolate.interp2d(kind="cubic")``: for data on a rectangular grid both call
    FITPACK's ``regrid`` with s=0, and the results agree bit for bit (checked against SciPy 1.13 interp2d).

    Args:
        values: (src_size * src_size, C), rows row-major over (dy, dx).
        src_size: side of the source grid (odd, at least 5 so a cubic spline fits).
        dst_size: side of the target grid.

    Returns:
        (dst_size * dst_size, C) float32 on the device of ``values``.
    """
    if values.shape[0] != src_size * src_size:
        raise ValueError(f"expected {src_size * src_size} rows for a {src_size}x{src_size} grid, got {values.shape[0]}")
    if src_size < 4:
        raise ValueError(f"cannot fit a cubic spline on a {src_size}x{src_size} grid (need at least 4x4)")
    src, dst = geometric_source_coords(src_size, dst_size)
    grid = values.detach().float().cpu().numpy().reshape(src_size, src_size, -1)
    out = np.empty((dst_size, dst_size, grid.shape[-1]), dtype=np.float64)
    for c in range(grid.shape[-1]):
        # The grid is square with identical axes, so the (y, x) argument order cannot matter.
        spline = RectBivariateSpline(src, src, grid[:, :, c].astype(np.float64), kx=3, ky=3, s=0)
        out[:, :, c] = spline(dst, dst)
    return torch.from_numpy(out.reshape(dst_size * dst_size, -1)).float().to(values.device)


def resize_bias_table(table: Tensor, dst_grid: int, text_len_of_table: int) -> Tensor:
    """Resize a shared VLMo bias table to another image grid; the extra (CLS, cross, text) rows are kept.

    Args:
        table: (rows, heads * depth) for some grid.
        dst_grid: target patches per side.
        text_len_of_table: ``T0`` (fixes the number of extra rows).

    Returns:
        The table itself if the grid is unchanged, else a new float32 (rows', heads * depth) table.

    Raises:
        ValueError: if ``table`` does not have the row count of any square grid.
    """
    extra = num_extra_rows(text_len_of_table)
    src_grid = grid_from_table_rows(table.shape[0], text_len_of_table)
    if src_grid is None:
        raise ValueError(
            f"a bias table with {table.shape[0]} rows fits no square patch grid (expected (2P-1)^2 + {extra} rows)"
        )
    if src_grid == dst_grid:
        return table
    patch_rows = table[:-extra]
    resampled = resample_offset_grid(patch_rows, 2 * src_grid - 1, 2 * dst_grid - 1)
    return torch.cat([resampled, table[-extra:].float()], dim=0)
