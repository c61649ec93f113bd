"""The generic trainer on the toy task, in process: recipes, loop, checkpoints, resume, precision, logs."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from vlkit.cli import main as cli_main
from vlkit.errors import CheckpointError, ConfigError
from vlkit.tasks import TASKS, TaskEntry
from vlkit.training.checkpointing import resolve_checkpoint
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import TrainingError, train
from vlkit.training.recipe import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from vlkit.training.task import TaskState


def make_recipe(task=None, optim=None, schedule=None, run=None) -> Recipe:
    data = {
        "task": {"name": "toy", "num_samples": 64, "val_samples": 32, "hidden": 16, **(task or {})},
        "optim": {"lr": 3e-3, "weight_decay": 0.01, **(optim or {})},
        "schedule": {"name": "cosine", "warmup_steps": 2, **(schedule or {})},
        "run": {"epochs": 2, "batch_size": 8, "progress": False, "eval_every": "end", **(run or {})},
    }
    return recipe_from_dict(data)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in read_jsonl(run_dir / "metrics.jsonl")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(run_dir) / "model.safetensors")


# ------------------------------------------------------------------------------------------------ recipes


def test_recipe_yaml_roundtrip_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(make_recipe())))
    recipe = load_recipe(path, ["optim.lr=1e-5", "task.depth=3", "run.max_steps=7", "run.eval_every=5"])
    assert recipe.optim.lr == 1e-5 and recipe.task.depth == 3 and recipe.run.max_steps == 7
    assert recipe.run.eval_every == 5 and recipe.source == path
    again = recipe_from_dict(recipe_to_dict(recipe))
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("task.widht=3", "unknown key task.widht"),
        ("optim.lrr=1", "unknown key optim.lrr"),
        ("run.epochz=1", "unknown key run.epochz"),
        ("schedule.name=step", "schedule.name: 'step' is not one of"),
        ("run.precision=fp8", "run.precision"),
        ("task.name=nope", "unknown task 'nope'"),
        ("run.eval_every=0", "run.eval_every must be"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 items"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(make_recipe())))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(path, [override])


def test_recipe_needs_run_and_task(tmp_path):
    with pytest.raises(ConfigError, match="missing required key run"):
        recipe_from_dict({"task": {"name": "toy"}})
    with pytest.raises(ConfigError, match="missing required key task"):
        recipe_from_dict({"run": {"epochs": 1}})
    with pytest.raises(ConfigError, match="set epochs or max_steps"):
        recipe_from_dict({"task": "toy", "run": {}})
    with pytest.raises(ConfigError, match="lavis is per epoch"):
        recipe_from_dict({"task": "toy", "run": {"max_steps": 3}, "schedule": {"name": "lavis"}})


# ------------------------------------------------------------------------------------------------ training


def test_trains_logs_checkpoints_and_keeps_best(tmp_path):
    recipe = make_recipe(run={"epochs": 4, "save_every": 3, "keep_last": 2, "eval_every": "epoch"})
    result = train(recipe, output_dir=tmp_path / "run")
    run = tmp_path / "run"
    assert result.step == 4 * 8  # 64 samples / batch 8 = 8 steps per epoch
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 33))
    for key in ("loss", "accuracy", "lr", "samples_per_s", "step_time", "epoch"):
        assert key in rows[0]
    first, last = sum(losses(run)[:4]) / 4, sum(losses(run)[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [8, 16, 24, 32]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "latest", "step-00000030", "step-00000032"]  # keep_last=2
    best = json.loads((run / "checkpoints/best/meta.json").read_text())
    assert best["metric"]["value"] == max(e["accuracy"] for e in evals)
    assert result.best_value == best["metric"]["value"]
    assert (run / "recipe.yaml").is_file() and "trainable" in (run / "train.log").read_text()
    # the schedule really drives the optimiser: warmup from 0 then cosine
    assert [r["lr"] for r in rows[:3]] == pytest.approx([0.0, 1.5e-3, 3e-3])  # 2 warmup steps, then the peak


def test_resume_continues_exactly(tmp_path):
    # dropout + random augmentation: resume must restore RNG streams and the data position exactly
    recipe = make_recipe(task={"dropout": 0.2, "noise": 0.3}, run={"epochs": 3, "save_every": 5, "keep_last": 10})
    train(recipe, output_dir=tmp_path / "full")
    # the run as a crash after step 13 would leave it: last checkpoint at step 10 (mid-epoch 1), rows to 13
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/step-00000010", part / "checkpoints/step-00000010")
    rows = read_jsonl(tmp_path / "full/metrics.jsonl")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:13]))
    result = train(recipe, resume=part)
    assert result.run_dir == part and result.step == 24
    assert losses(part) == losses(tmp_path / "full")  # bit-exact, steps 1..24, no duplicates
    for k, v in final_weights(tmp_path / "full").items():
        torch.testing.assert_close(final_weights(part)[k], v, rtol=0, atol=0)


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    common = {"task": {"noise": 0.1}, "schedule": {"warmup_steps": 0}}
    big = make_recipe(**common, run={"max_steps": 6, "batch_size": 16})
    accum = make_recipe(**common, optim={"accum_steps": 2}, run={"max_steps": 6, "batch_size": 8})
    train(big, output_dir=tmp_path / "big")
    train(accum, output_dir=tmp_path / "accum")
    torch.testing.assert_close(losses(tmp_path / "accum"), losses(tmp_path / "big"), rtol=1e-5, atol=1e-6)
    a, b = final_weights(tmp_path / "accum"), final_weights(tmp_path / "big")
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_workers_give_the_same_batches(tmp_path):
    base = {"task": {"noise": 0.5}, "run": {"max_steps": 6}}
    train(make_recipe(**base), output_dir=tmp_path / "w0")
    train(make_recipe(task={"noise": 0.5}, run={"max_steps": 6, "num_workers": 2}), output_dir=tmp_path / "w2")
    assert losses(tmp_path / "w2") == losses(tmp_path / "w0")


def test_bf16_autocast_on_cpu(tmp_path):
    result = train(make_recipe(run={"epochs": 3, "precision": "bf16"}), output_dir=tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert sum(curve[-4:]) < sum(curve[:4])
    assert all(v.dtype == torch.float32 for v in final_weights(tmp_path / "run").values())  # fp32 master weights
    assert result.last_eval is not None


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train(make_recipe(run={"precision": "fp16"}), output_dir=tmp_path / "run")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    recipe = make_recipe(task={"nan_at_step": 7}, run={"epochs": 2, "save_every": 3, "keep_last": 5})
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7 .*step-00000006"):
        train(recipe, output_dir=tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert names == ["latest", "step-00000003", "step-00000006"]
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values())


def test_frozen_encoder_is_not_trained_nor_saved(tmp_path):
    train(make_recipe(task={"freeze_encoder": True, "dropout": 0.1}, run={"max_steps": 5}), output_dir=tmp_path / "r")
    weights = final_weights(tmp_path / "r")
    assert not any(k.startswith("encoder.") for k in weights) and "logit_scale" in weights
    meta = json.loads((resolve_checkpoint(tmp_path / "r") / "meta.json").read_text())
    assert meta["frozen"] == [{"module": "encoder", "parameters": 8 * 16 + 16, "dtypes": ["float32"]}]
    assert "encoder" in (tmp_path / "r/train.log").read_text()


def test_existing_run_needs_resume_and_same_layout(tmp_path):
    recipe = make_recipe(run={"max_steps": 3})
    train(recipe, output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="--resume"):
        train(recipe, output_dir=tmp_path / "run")
    with pytest.raises(CheckpointError, match="data layout changed"):
        train(make_recipe(run={"max_steps": 6, "batch_size": 4}), resume=tmp_path / "run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(recipe, resume=tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------ task contract


@dataclass
class StrayConfig:
    freeze_without_declaring: bool = True


def build(cfg: StrayConfig, ctx) -> TaskState:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[0].requires_grad_(not cfg.freeze_without_declaring)
    data = [{"x": torch.randn(2), "y": torch.randn(1)} for _ in range(8)]

    def step(net, batch):
        return {"loss": (net(batch["x"]) - batch["y"]).pow(2).mean()}

    return TaskState(model=model, train_dataset=data, training_step=step)


def test_undeclared_frozen_parameters_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "stray", TaskEntry(__name__, "StrayConfig"))
    recipe = recipe_from_dict({"task": {"name": "stray"}, "run": {"max_steps": 2, "batch_size": 2, "progress": False}})
    with pytest.raises(ConfigError, match=r"\['0.weight', '0.bias'\].*TaskState.frozen"):
        train(recipe, output_dir=tmp_path / "run")
    ok = recipe_from_dict(
        {"task": {"name": "stray", "freeze_without_declaring": False}, "run": {"max_steps": 2, "batch_size": 2}}
    )
    assert train(ok, output_dir=tmp_path / "ok").step == 2


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_train_and_plot(tmp_path, capsys):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe_to_dict(make_recipe(run={"epochs": 3, "eval_every": "epoch"}))))
    out = tmp_path / "run"
    assert cli_main(["train", str(path), "--set", "run.epochs=2", "optim.lr=2e-3", "--output", str(out)]) == 0
    assert "trained 16 steps" in capsys.readouterr().out
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 16
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["run"]["epochs"] == 2 and saved["optim"]["lr"] == 2e-3
    # resume a finished run from its own recipe: nothing left to do, but it loads and exits cleanly
    assert cli_main(["train", "--resume", str(out)]) == 0
    png = tmp_path / "curves.png"
    assert cli_main(["plot", str(out), "--out", str(png)]) == 0
    image = Image.open(png).convert("RGB")
    assert image.size[0] == 1000 and image.size[1] > 600
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # first two series colours were drawn


def test_cli_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("task: toy\nrun: {epochs: 1, batchsize: 2}\n")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key run.batchsize" in err[0] and "bad.yaml" in err[0]
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl rows" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda(tmp_path, precision):
    recipe = make_recipe(run={"epochs": 3, "precision": precision, "device": "cuda"}, optim={"clip_grad_norm": 1.0})
    train(recipe, output_dir=tmp_path / "run")
    rows = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert sum(r["loss"] for r in rows[-4:]) < sum(r["loss"] for r in rows[:4])
    assert ("loss_scale" in rows[-1]) == (precision == "fp16")  # GradScaler only for fp16
    assert all(v.dtype == torch.float32 for v in final_weights(tmp_path / "run").values())
