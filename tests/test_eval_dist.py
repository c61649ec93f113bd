"""``vlkit eval`` under torchrun: two processes write the files of one process (each rank a shard of whole
batches, predictions gathered on rank 0; retrieval's ITM re-ranking split over the ranks)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlkit import cli


def _torchrun(args: list[str], env: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run([*cmd, "-m", "vlkit", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "terminate called" not in proc.stderr
    return proc


def _single(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child processes (OMP_NUM_THREADS=1): the same kernels, the same numbers
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def _read(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "task, model, extra",
    [
        # 5 questions in batches of 2: rank 0 answers batches 0 and 2, rank 1 batch 1 (uneven shards).
        ("vqa", "opt", ["--limit", "5", "--batch-size", "2", "--max-new-tokens", "3"]),
        ("retrieval", "stage1", ["--k-test", "3", "--batch-size", "3", "--itm-batch-size", "7", "--save-scores"]),
    ],
)
def test_two_processes_write_the_single_process_files(
    tmp_path, subprocess_env, tiny_opt_folder, tiny_stage1_folder, tiny_shapes_world, task, model, extra
):
    folder = {"opt": tiny_opt_folder, "stage1": tiny_stage1_folder}[model]
    # On the CPU (gloo) also where a GPU exists: two ranks may not share one GPU under NCCL.
    args = ["eval", task, "--model", str(folder), "--data", str(tiny_shapes_world), "--device", "cpu", *extra]
    _single([*args, "--output", str(tmp_path / "one")])
    proc = _torchrun([*args, "--output", str(tmp_path / "two")], subprocess_env)
    assert proc.stdout.count("2 processes") == 1  # rank 0 alone reports

    one, two = tmp_path / "one", tmp_path / "two"
    assert _read(two / "metrics.json") == _read(one / "metrics.json")
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    if task == "vqa":
        assert _read(two / "predictions.json") == _read(one / "predictions.json")
        assert len(_read(two / "predictions.json")) == 5
    else:
        for name in ("scores_i2t.npy", "scores_t2i.npy"):
            np.testing.assert_allclose(np.load(two / name), np.load(one / name), rtol=0, atol=1e-5)
