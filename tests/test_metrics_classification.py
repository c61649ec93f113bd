"""Top-k and exact-match accuracy, and the report helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlkit.errors import DataError
from vlkit.metrics.classification import exact_match_accuracy, topk_accuracy
from vlkit.metrics.report import format_table, write_json


def test_topk_hand_worked() -> None:
    logits = np.array(
        [
            [0.1, 0.9, 0.0],  # label 1 top -> top1
            [0.5, 0.3, 0.2],  # label 2 third -> only top3
            [0.2, 0.7, 0.1],  # label 0 second -> top2
            [0.0, 0.0, 0.0],  # all tied: label 0 wins (first index, like argmax)
        ]
    )
    labels = np.array([1, 2, 0, 0])
    assert topk_accuracy(logits, labels, topk=(1, 2, 3, 5)) == {
        "top1": 50.0,
        "top2": 75.0,
        "top3": 100.0,
        "top5": 100.0,
    }
    # With all scores tied, label 2 ranks after labels 0 and 1.
    assert topk_accuracy(np.zeros((1, 3)), np.array([2]), topk=(1, 2, 3)) == {"top1": 0.0, "top2": 0.0, "top3": 100.0}


def test_topk_agrees_with_argmax_and_torch_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 17, generator=gen)
    labels = torch.randint(0, 17, (200,), generator=gen)
    out = topk_accuracy(logits, labels)
    assert out["top1"] == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert out["top5"] == pytest.approx(100.0 * (top5 == labels[:, None]).any(1).float().mean().item())
    assert topk_accuracy(logits.to(torch.bfloat16), labels)["top1"] >= 0.0  # bf16 is accepted


def test_topk_rejects_bad_input() -> None:
    with pytest.raises(DataError, match=r"\(N, C\)"):
        topk_accuracy(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="labels must be"):
        topk_accuracy(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(DataError, match="range"):
        topk_accuracy(np.zeros((1, 2)), np.array([2]))
    with pytest.raises(DataError, match="integers"):
        topk_accuracy(np.zeros((1, 2)), np.array([0.0]))
    with pytest.raises(DataError, match="NaN"):
        topk_accuracy(np.array([[np.nan, 0.0]]), np.array([0]))


def test_exact_match() -> None:
    assert exact_match_accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(200 / 3)
    assert exact_match_accuracy(["A "], ["a"], normalize=lambda s: s.strip().lower()) == 100.0
    assert exact_match_accuracy(["A "], ["A"], normalize=str.lower, normalize_targets=False) == 0.0
    with pytest.raises(DataError, match="2 predictions but 1"):
        exact_match_accuracy(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no predictions"):
        exact_match_accuracy([], [])


def test_format_table() -> None:
    rows = [
        {"metric": "Bleu_4", "score": 0.33125, "n": 5},
        {"metric": "METEOR", "score": None, "n": 12},
        {"metric": "CIDEr", "score": np.float32(1.2345), "n": np.int64(3)},
    ]
    assert format_table(rows).splitlines() == [
        "metric  score   n",
        "------  -----  --",
        "Bleu_4   0.33   5",
        "METEOR    n/a  12",
        "CIDEr    1.23   3",
    ]
    assert format_table([["a", 1.5], ["bb", 22.25]], headers=["name", "value"], floatfmt=".1f").splitlines() == [
        "name  value",
        "----  -----",
        "a       1.5",
        "bb     22.2",
    ]
    assert format_table([[1, "x"]]) == "1  x"


def test_write_json_is_atomic_and_handles_numpy(tmp_path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": torch.tensor([1.0]), "é": None})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 0.5, "b": [0, 1, 2], "c": [1.0], "é": None}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})
    assert json.loads(path.read_text(encoding="utf-8"))["a"] == 0.5  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]
