"""Retrieval recall: hand-built matrices (ties included) and the vectorised ranks against LAVIS's loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlkit.errors import DataError
from vlkit.metrics.retrieval import _ranks_reference, recall_at_k, retrieval_ranks, retrieval_recall


def test_hand_built_two_images_four_captions() -> None:
    # Image 0 owns captions 0, 1; image 1 owns captions 2, 3.
    sim = np.array(
        [
            [0.9, 0.1, 0.8, 0.2],  # best caption 0 (own) -> rank 0
            [0.7, 0.6, 0.5, 0.1],  # own captions 2 (0.5), 3 (0.1) rank 2 and 3 -> best rank 2
        ],
        dtype=np.float32,
    )
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    assert retrieval_ranks(sim, img2txt).tolist() == [0, 2]
    # Text -> image, columns: caption 0 prefers image 0 (rank 0), 1 prefers 1 (image 0 at rank 1),
    # caption 2 prefers image 0 (own image 1 at rank 1), caption 3 prefers image 0 (own at rank 1).
    assert retrieval_ranks(sim.T, [[t] for t in txt2img]).tolist() == [0, 1, 1, 1]
    out = retrieval_recall(sim, img2txt, txt2img, ks=(1, 2))
    assert out["txt_r1"] == 50.0 and out["txt_r2"] == 50.0
    assert out["img_r1"] == 25.0 and out["img_r2"] == 100.0
    assert out["txt_r_mean"] == 50.0 and out["img_r_mean"] == 62.5
    assert out["r_mean"] == 56.25 and out["agg_metrics"] == out["txt_r_mean"]


def test_default_keys_and_values_in_percent() -> None:
    sim = np.eye(12)
    out = retrieval_recall(sim, [[i] for i in range(12)], list(range(12)))
    assert list(out) == [
        "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10",
        "txt_r_mean", "img_r_mean", "r_mean", "agg_metrics",
    ]  # fmt: skip
    assert all(v == 100.0 for v in out.values())


def test_ties_optimistic_and_pessimistic() -> None:
    # Row: the ground truth (index 2) ties with indices 0 and 3; index 1 scores higher.
    sim = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    assert retrieval_ranks(sim, [[2]], ties="optimistic").tolist() == [1]
    assert retrieval_ranks(sim, [[2]], ties="pessimistic").tolist() == [3]
    lavis = retrieval_ranks(sim, [[2]], ties="lavis").tolist()
    assert lavis == _ranks_reference(sim, [[2]]).tolist()
    assert 1 <= lavis[0] <= 3


def test_lavis_ties_are_numpy_argsort_reversed() -> None:
    # LAVIS orders by np.argsort(row)[::-1]; whatever order numpy leaves tied scores in, the "lavis" rank
    # is the position in that order, so it lies between the optimistic and pessimistic ranks.
    sim = np.array([[1.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]])
    for gt in ([[3], [0]], [[0], [2]], [[0, 3], [1, 2]]):
        lavis = retrieval_ranks(sim, gt)
        np.testing.assert_array_equal(lavis, _ranks_reference(sim, gt))
        assert (retrieval_ranks(sim, gt, ties="optimistic") <= lavis).all()
        assert (lavis <= retrieval_ranks(sim, gt, ties="pessimistic")).all()
    assert retrieval_ranks(sim, [[0, 3], [1, 2]], ties="optimistic").tolist() == [0, 0]
    assert retrieval_ranks(sim, [[0, 3], [1, 2]], ties="pessimistic").tolist() == [1, 3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_ranks_equal_lavis_loop_with_many_ties(dtype) -> None:
    rng = np.random.default_rng(0)
    n_img, per = 40, 5
    sim = rng.integers(0, 6, size=(n_img, n_img * per)).astype(dtype)  # lots of exact ties
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    np.testing.assert_array_equal(retrieval_ranks(sim, img2txt, chunk_size=7), _ranks_reference(sim, img2txt))
    t2i_gt = [[i] for i in txt2img]
    np.testing.assert_array_equal(retrieval_ranks(sim.T, t2i_gt, chunk_size=13), _ranks_reference(sim.T, t2i_gt))
    # Mixed: most rows without ties (no sort needed), some quantised rows, a NaN, a -0.0 == 0.0 tie.
    mixed = rng.standard_normal((n_img, n_img * per)).astype(dtype)
    mixed[::5] = np.round(mixed[::5])
    mixed[3, 7] = np.nan
    mixed[4, 4 * per], mixed[4, 0] = 0.0, -0.0
    np.testing.assert_array_equal(retrieval_ranks(mixed, img2txt, chunk_size=9), _ranks_reference(mixed, img2txt))
    np.testing.assert_array_equal(retrieval_ranks(mixed.T, t2i_gt), _ranks_reference(mixed.T, t2i_gt))
    # Without ties every rule gives the same ranks.
    smooth = rng.standard_normal((n_img, n_img * per)).astype(dtype)
    for rule in ("optimistic", "pessimistic"):
        np.testing.assert_array_equal(retrieval_ranks(smooth, img2txt, ties=rule), _ranks_reference(smooth, img2txt))


def test_separate_t2i_matrix_and_torch_input() -> None:
    rng = np.random.default_rng(1)
    i2t = rng.standard_normal((6, 12))
    t2i = rng.standard_normal((12, 6))
    img2txt = [[2 * i, 2 * i + 1] for i in range(6)]
    txt2img = [t // 2 for t in range(12)]
    out = retrieval_recall(torch.from_numpy(i2t).to(torch.bfloat16), img2txt, txt2img, sim_t2i=torch.from_numpy(t2i))
    ranks = _ranks_reference(t2i, [[i] for i in txt2img])
    assert out["img_r1"] == recall_at_k(ranks, 1)
    assert out["img_r5"] == 100.0 * float((ranks < 5).sum()) / 12


def test_bad_shapes_raise_data_error() -> None:
    sim = np.zeros((2, 4))
    with pytest.raises(DataError, match="ground truth for 1 queries"):
        retrieval_recall(sim, [[0]], [0, 0, 1, 1])
    with pytest.raises(DataError, match="txt2img has 3"):
        retrieval_recall(sim, [[0], [1]], [0, 0, 1])
    with pytest.raises(DataError, match="outside"):
        retrieval_recall(sim, [[0], [9]], [0, 0, 1, 1])
    with pytest.raises(DataError, match="no ground-truth"):
        retrieval_ranks(sim, [[0], []])
    with pytest.raises(DataError, match="transpose"):
        retrieval_recall(sim, [[0], [1]], [0, 0, 1, 1], sim_t2i=np.zeros((2, 4)))
    with pytest.raises(DataError, match="tie rule"):
        retrieval_ranks(sim, [[0], [1]], ties="random")
