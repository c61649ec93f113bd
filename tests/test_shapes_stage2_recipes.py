"""The demo's recipes configs/shapes/stage2.yaml and instruct.yaml, run as the demo pipeline runs them
(``vlkit train RECIPE --output ... --set task.data_root=... --set task.models_root=...``) with few steps on a
tiny shapes world, from tiny prerequisite models laid out like the earlier runs (``stage1/model``,
``lm_opt/model``, ``lm_llama/model``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, OPTConfig

import vlkit
from vlkit import cli
from vlkit.checkpoints.folder import load_checkpoint
from vlkit.data import generate_shapes_world
from vlkit.data.tokenizers import build_shapes_tokenizers
from vlkit.models.blip2 import Blip2
from vlkit.models.instructblip import InstructBlip
from vlkit.training.logging import read_jsonl

pytestmark = pytest.mark.slow

# few steps, no warmup and a larger lr (so that a few steps move the loss), small evaluations
REDUCED = [
    "run.max_steps=8",
    "optim.lr=5e-3",
    "run.batch_size=8",
    "run.log_every=1",
    "run.progress=false",
    "schedule.warmup_steps=0",
    "task.vqa_val.max_questions=4",
]


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory, tiny_stage1_folder) -> tuple[Path, Path]:
    """``(data, runs)``: a tiny shapes world with its tokenizers, and the prerequisite runs' exports."""
    root = tmp_path_factory.mktemp("shapes-pipeline")
    data, runs = root / "data", root / "runs"
    generate_shapes_world(data, images=8, size=32, seed=3, questions_per_image=2)
    build_shapes_tokenizers(data, data / "tokenizers", qformer_vocab=300, lm_vocab=300)
    shutil.copytree(tiny_stage1_folder, runs / "stage1" / "model")
    torch.manual_seed(0)
    for name, config_cls, extra in (
        ("opt", OPTConfig, {"ffn_dim": 64, "word_embed_proj_dim": 32, "pad_token_id": 1}),
        ("llama", LlamaConfig, {"intermediate_size": 64}),
    ):
        tokenizer = AutoTokenizer.from_pretrained(data / "tokenizers" / name)
        config = config_cls(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
        )
        folder = runs / f"lm_{name}" / "model"
        llm = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # the default init is so small that the LLM ignores its visual prefix
            for p in llm.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.15)
        llm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return data, runs


def run_recipe(name: str, data: Path, runs: Path, *extra: str) -> Path:
    args = ["train", str(REPO / "configs" / "shapes" / f"{name}.yaml"), "--output", str(runs / name)]
    for setting in (f"task.data_root={data}", f"task.models_root={runs}", *REDUCED, *extra):
        args += ["--set", setting]
    assert cli.main(args) == 0
    rows = read_jsonl(runs / name / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    print(name, losses)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert sum(losses[-2:]) < sum(losses[:2])
    return runs / name / "model"


def test_stage2_recipe_exports_a_full_blip2(pipeline_dirs):
    data, runs = pipeline_dirs
    exported = run_recipe("stage2", data, runs, "task.caption_val.max_images=2")
    loaded = load_checkpoint(exported)
    model = loaded.model
    stage1 = load_checkpoint(runs / "stage1" / "model").model
    # the architecture comes from the stage-1 checkpoint; its heads and text parts are kept
    assert type(model) is Blip2 and model.config.vision == stage1.config.vision
    assert model.config.itc_itm_heads and model.config.qformer.text_input and model.config.lm is not None
    assert model.config.lm.hf_config["model_type"] == "opt"
    # the stage-1 model is carried over whole (freeze_qformer), so it classifies and retrieves as before
    stage2_weights = model.state_dict()
    for key, value in stage1.state_dict().items():
        torch.testing.assert_close(stage2_weights[key], value, rtol=0, atol=0, msg=key)
    pipe = vlkit.load(exported)
    image = sorted((data / "images" / "test").glob("*.png"))[0]
    assert {"caption", "answer", "classify", "retrieve"} <= set(pipe.tasks)
    assert isinstance(pipe.caption(image, num_beams=1, max_new_tokens=4), str)
    assert len(pipe.classify(image, ["red circle", "blue square"])) == 2


def test_instruct_recipe_exports_an_instructblip(pipeline_dirs):
    data, runs = pipeline_dirs
    exported = run_recipe("instruct", data, runs)
    loaded = load_checkpoint(exported)
    assert isinstance(loaded.model, InstructBlip)
    assert loaded.model.config.lm.hf_config["model_type"] == "llama"
    assert loaded.llm_tokenizer.pad_token == "[PAD]"  # InstructBLIP-Vicuna's token conventions
    pipe = vlkit.load(exported)
    image = sorted((data / "images" / "test").glob("*.png"))[0]
    assert isinstance(pipe.instruct(image, "what color is the circle?", num_beams=1, max_new_tokens=3), str)
