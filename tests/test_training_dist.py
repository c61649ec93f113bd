"""Real processes: torchrun DDP/FSDP on CPU gloo against one process, and SIGKILL + --resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlkit.training.checkpointing import resolve_checkpoint, step_checkpoints
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import train
from vlkit.training.recipe import load_recipe

pytestmark = pytest.mark.slow


def write_recipe(path, *, task=None, run=None, optim=None):
    data = {
        "task": {"name": "toy", "num_samples": 64, "val_samples": 16, "hidden": 16, "noise": 0.2, **(task or {})},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, **(optim or {})},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "run": {"batch_size": 4, "progress": False, "eval_every": "end", **(run or {})},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def run_vlkit(args, env, *, torchrun=0, timeout=180):
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
    cmd += ["-m", "vlkit", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "terminate called" not in proc.stderr
    return proc


def weights(run_dir):
    return load_file(resolve_checkpoint(run_dir) / "model.safetensors")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, subprocess_env, full, mode):
    steps = 16 if full else 4
    run = {"max_steps": steps, "distributed": mode, "save_every": 2, "keep_last": steps}
    optim = {"clip_grad_norm": 1.0, "accum_steps": 2 if full else 1}
    task = {}
    if mode == "fsdp":  # frozen parameters beside sharded ones, and a feature cache filled by both ranks
        task = {"freeze_encoder": True, "noise": 0.0, "feature_cache": str(tmp_path / "cache")}
    recipe = write_recipe(tmp_path / "r.yaml", task=task, run=run, optim=optim)
    proc = run_vlkit(["train", str(recipe), "--output", str(tmp_path / "two")], subprocess_env, torchrun=2)
    assert proc.stdout.count("trained") == 1  # rank 0 reports; logging is rank-0 only
    if mode == "fsdp":
        assert len(list((tmp_path / "cache").glob("*/shard-00[01]-*.safetensors"))) == 2  # one per rank
    one = load_recipe(recipe, ["run.batch_size=8", "run.distributed=none"])
    train(one, output_dir=tmp_path / "one")
    two_rows, one_rows = read_jsonl(tmp_path / "two/metrics.jsonl"), read_jsonl(tmp_path / "one/metrics.jsonl")
    assert [r["step"] for r in two_rows] == list(range(1, steps + 1))
    torch.testing.assert_close([r["loss"] for r in two_rows], [r["loss"] for r in one_rows], rtol=1e-5, atol=1e-6)
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert sorted(a) == sorted(b)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    meta = json.loads((resolve_checkpoint(tmp_path / "two") / "meta.json").read_text())
    assert meta["step"] == steps
    if mode == "fsdp":  # resuming a sharded run: full state dicts scattered back onto the shards
        resumed = tmp_path / "resumed"
        shutil.copytree(tmp_path / "two/checkpoints/step-00000002", resumed / "checkpoints/step-00000002")
        run_vlkit(["train", "--resume", str(resumed)], subprocess_env, torchrun=2)
        assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl")] == list(range(3, steps + 1))
        for key, value in weights(tmp_path / "two").items():
            torch.testing.assert_close(weights(resumed)[key], value, rtol=0, atol=1e-7, msg=key)


def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, subprocess_env, full):
    steps, save_every = (60, 7) if full else (24, 5)
    task = {"dropout": 0.1, "step_delay": 0.05}
    recipe = write_recipe(
        tmp_path / "r.yaml", task=task, run={"max_steps": steps, "save_every": save_every, "keep_last": 3}
    )
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vlkit", "train", str(recipe), "--output", str(run_dir)]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = 2 * save_every + 2  # past the second checkpoint, before the end
    deadline = time.monotonic() + 120
    try:
        while len(read_jsonl(run_dir / "metrics.jsonl")) < target:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = [int(p.name.split("-")[1]) for p in step_checkpoints(run_dir)]
    assert done and max(done) < steps  # killed mid-way, after at least one checkpoint
    logged = len(read_jsonl(run_dir / "metrics.jsonl"))
    assert max(done) < logged < steps  # some logged steps must be redone

    train(load_recipe(recipe), resume=run_dir)  # recipe unchanged; --resume picks the latest checkpoint
    straight = tmp_path / "straight"
    train(load_recipe(recipe, ["task.step_delay=0"]), output_dir=straight)
    resumed_rows, straight_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == list(range(1, steps + 1))
    torch.testing.assert_close([r["loss"] for r in resumed_rows], [r["loss"] for r in straight_rows], rtol=0, atol=1e-6)
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(run_dir)[key], value, rtol=0, atol=1e-6, msg=key)
