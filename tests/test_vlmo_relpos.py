"""Relative position bias of VLMo: index values worked out by hand, and resampling between resolutions.

``data/vlmo_relpos_interp2d.npz`` holds outputs of the reference's resampling loop run with SciPy 1.13.1's
``scipy.interpolate.interp2d(x, x, z, kind="cubic")`` (removed in SciPy 1.14) on random float32 inputs:
for each (src, dst) in (5, 9), (7, 5), (9, 13), (27, 47) it stores ``in_{src}_{dst}`` (src*src, 2),
``out_{src}_{dst}`` (dst*dst, 2) and the geometric source coordinates ``x_{src}_{dst}``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlkit.layers import relpos

GOLDEN = Path(__file__).parent / "data" / "vlmo_relpos_interp2d.npz"


def test_image_index_on_a_2x2_grid_by_hand():
    # P = 2: offsets (dh, dw) in {-1, 0, 1}^2 -> (dh + 1) * 3 + (dw + 1); R = 3*3 + 3 = 12.
    # Patches in sequence order 1..4 sit at (0,0), (0,1), (1,0), (1,1); the offset is query minus key.
    expected = torch.tensor(
        [
            [11, 9, 9, 9, 9],  # image CLS query: R-3 to every patch, R-1 to itself
            [10, 4, 3, 1, 0],  # (0,0) vs (0,0) (0,1) (1,0) (1,1): (1,1)->4, (1,0)->3, (0,1)->1, (0,0)->0
            [10, 5, 4, 2, 1],
            [10, 7, 6, 4, 3],
            [10, 8, 7, 5, 4],
        ]
    )
    assert torch.equal(relpos.image_relative_position_index(2), expected)


def test_text_and_fusion_index_by_hand():
    # P = 2 (R = 12), T0 = 4: rows = 12 + 8 + 2 = 22; token offsets at R + T0 + (key - query) = 16 + (j - i).
    text = torch.tensor([[21, 19, 19], [20, 16, 17], [20, 15, 16]])
    assert torch.equal(relpos.text_relative_position_index(3, 2, 4), text)
    assert relpos.num_table_rows(2, 4) == 22
    fused = relpos.fusion_relative_position_index(3, 2, 4)
    assert fused.shape == (8, 8)
    assert torch.equal(fused[:3, :3], text)
    assert torch.equal(fused[3:, 3:], relpos.image_relative_position_index(2))
    assert torch.all(fused[:3, 3:] == 12)  # text query -> image key: R
    assert torch.all(fused[3:, :3] == 13)  # image query -> text key: R + 1
    # A shorter text is the top-left corner of a longer one (so unpadded text is handled exactly).
    assert torch.equal(relpos.text_relative_position_index(2, 2, 4), text[:2, :2])
    with pytest.raises(ValueError):
        relpos.text_relative_position_index(5, 2, 4)


@pytest.mark.parametrize("grid, t0, text_len", [(14, 196, 40), (24, 196, 40), (30, 196, 40), (14, 196, 196)])
def test_released_geometries_use_every_row_in_range(grid, t0, text_len):
    rows = relpos.num_table_rows(grid, t0)
    assert rows == {14: 1126, 24: 2606, 30: 3878}[grid]  # spec A.4.1
    assert relpos.grid_from_table_rows(rows, t0) == grid
    fused = relpos.fusion_relative_position_index(text_len, grid, t0)
    assert int(fused.min()) == 0 and int(fused.max()) == rows - 1
    used = torch.unique(fused)
    # Every image row and the CLS/cross rows are used; text offsets use 2 * (L - 2) + 1 rows.
    assert len(used) == (2 * grid - 1) ** 2 + 3 + 2 + (2 * (text_len - 2) + 1) + 3


def test_grid_from_rows_rejects_non_square():
    assert relpos.grid_from_table_rows(1127, 196) is None
    assert relpos.grid_from_table_rows(10, 196) is None


def test_geometric_coordinates_match_the_reference():
    data = np.load(GOLDEN)
    src, dst = relpos.geometric_source_coords(27, 47)
    np.testing.assert_array_equal(src, data["x_27_47"])
    np.testing.assert_array_equal(dst, np.arange(-23.0, 24.0))
    assert src[13] == 0 and np.all(np.diff(src) > 0) and np.allclose(src, -src[::-1])


@pytest.mark.parametrize("src, dst", [(5, 9), (7, 5), (9, 13), (27, 47)])
def test_resampling_equals_scipy_interp2d_bit_for_bit(src, dst):
    data = np.load(GOLDEN)
    out = relpos.resample_offset_grid(torch.from_numpy(data[f"in_{src}_{dst}"]), src, dst)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), data[f"out_{src}_{dst}"])


def test_resampling_reproduces_a_bicubic_polynomial():
    # An interpolating bicubic spline reproduces any polynomial of degree <= 3 per axis, so on a known grid
    # the result is the polynomial evaluated at the integer target offsets.
    def poly(y, x):
        return 0.5 + 0.01 * x**3 - 0.02 * x * y**2 + 0.1 * y - 0.003 * (x * y) ** 2

    src_size, dst_size = 9, 15
    src, dst = relpos.geometric_source_coords(src_size, dst_size)
    yy, xx = np.meshgrid(src, src, indexing="ij")
    values = torch.from_numpy(np.stack([poly(yy, xx), -poly(xx, yy)], -1).reshape(-1, 2))
    out = relpos.resample_offset_grid(values.float(), src_size, dst_size).double().numpy()
    ty, tx = np.meshgrid(dst, dst, indexing="ij")
    expected = np.stack([poly(ty, tx), -poly(tx, ty)], -1).reshape(-1, 2)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=1e-5)  # float32 in and out


def test_resize_table_keeps_extra_rows_and_is_identity_at_same_size():
    t0 = 6
    table = torch.randn(relpos.num_table_rows(3, t0), 4)
    assert relpos.resize_bias_table(table, 3, t0) is table
    bigger = relpos.resize_bias_table(table, 5, t0)
    extra = relpos.num_extra_rows(t0)
    assert bigger.shape == (relpos.num_table_rows(5, t0), 4)
    assert torch.equal(bigger[-extra:], table[-extra:])
    expected = relpos.resample_offset_grid(table[:-extra], 5, 9)
    assert torch.equal(bigger[:-extra], expected)
    with pytest.raises(ValueError, match="square"):
        relpos.resize_bias_table(torch.randn(table.shape[0] + 1, 4), 5, t0)
