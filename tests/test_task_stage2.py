"""Tasks ``stage2``, ``caption_ft`` and ``vqa_ft`` on a tiny shapes world with tiny presets (test-sized BLIP-2
with OPT / FlanT5 LLMs), through the task contract and the training engine."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from stage2_reference import tokenizer as tiny_tokenizer
from stage2_reference import write_bert_vocab
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import vlkit
from vlkit import losses, zoo
from vlkit.checkpoints.folder import load_checkpoint, save_pretrained
from vlkit.checkpoints.hf import read_hf_weights
from vlkit.data import generate_shapes_world
from vlkit.errors import CheckpointError, ConfigError
from vlkit.models.blip2 import Blip2, Blip2Config
from vlkit.models.instructblip import InstructBlip
from vlkit.processors import QFormerTokenizer
from vlkit.prompting import LLMProcessor
from vlkit.tasks import load_task, stage2
from vlkit.training.checkpointing import load_checkpoint as load_training_checkpoint
from vlkit.training.checkpointing import resolve_checkpoint
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import train
from vlkit.training.recipe import recipe_from_dict
from vlkit.training.task import TaskContext

VQA_TEMPLATE = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
FAMILY = {"tiny-blip2-opt": "opt", "tiny-blip2-flant5": "t5", "tiny-instructblip-vicuna": "llama"}


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a shapes world, a stage-1 model and LLM folders shaped like the tiny presets
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmtasks") / "shapes"
    generate_shapes_world(root, images=4, size=32, seed=11, questions_per_image=2)
    return root


def stage1_config(preset: str):
    """The stage-1 counterpart of a tiny stage-2 preset (same ViT and Q-Former, text parts and heads on)."""
    c = zoo.get_spec(preset).config()
    qformer = dataclasses.replace(
        c.qformer, text_input=True, lm_head=True, hidden_dropout=0.0, attention_dropout=0.0, vocab_size=96
    )
    return Blip2Config(vision=c.vision, qformer=qformer, num_query_tokens=c.num_query_tokens, embed_dim=16)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """``{"stage1": folder, "opt"/"t5"/"llama": transformers LLM folder}`` shaped like the tiny presets."""
    root = tmp_path_factory.mktemp("lmtask-models")
    write_bert_vocab(root / "vocab.txt")
    torch.manual_seed(1)
    stage1 = Blip2(stage1_config("tiny-blip2-opt"))
    out = {"stage1": save_pretrained(stage1, root / "stage1", qformer_tokenizer=QFormerTokenizer(root / "vocab.txt"))}
    for preset, family in FAMILY.items():
        lm = zoo.get_spec(preset).config().lm
        auto = AutoModelForSeq2SeqLM if lm.kind == "seq2seq" else AutoModelForCausalLM
        llm = auto.from_config(lm.transformers_config())
        _randomize(llm, 0.3)  # the default init is so small that the LLM ignores its visual prefix
        llm.save_pretrained(root / family)
        tiny_tokenizer(family).save_pretrained(root / family)
        out[family] = root / family
    return out


def _randomize(module: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)


def caption_source(**extra) -> dict:
    return {
        "kind": "caption",
        "annotations": ["annotations/coco_karpathy_train.json"],
        "images": "images",
        "transform": "blip_image_eval",
        **extra,
    }


def vqa_source(**extra) -> dict:
    return {
        "kind": "vqa",
        "annotations": ["vqa/v2_OpenEnded_shapes_train_questions.json"],
        "answers": ["vqa/v2_shapes_train_annotations.json"],
        "images": "images",
        "image_template": VQA_TEMPLATE,
        "transform": "blip_image_eval",
        **extra,
    }


CAPTION_VAL = {
    "annotations": "annotations/coco_karpathy_val.json",
    "images": "images",
    "references": "annotations/coco_karpathy_val_gt.json",
    "num_beams": 2,
    "max_new_tokens": 6,
    "min_new_tokens": 1,
}
VQA_VAL = {
    "questions": "vqa/v2_OpenEnded_shapes_val_questions.json",
    "annotations": "vqa/v2_shapes_val_annotations.json",
    "images": "images",
    "image_template": VQA_TEMPLATE,
    "max_questions": 4,
    "num_beams": 1,
    "max_new_tokens": 3,
}


def make_recipe(world: Path, task: dict, run: dict | None = None, lr: float = 1e-3):
    return recipe_from_dict(
        {
            "task": {"data_root": str(world), **task},
            "optim": {"lr": lr},
            "schedule": {"name": "constant"},
            "run": {"max_steps": 2, "batch_size": 8, "progress": False, "eval_every": "end", **(run or {})},
        }
    )


def build(world: Path, tmp_path: Path, task: dict):
    r = make_recipe(world, task)
    ctx = TaskContext(torch.device("cpu"), "fp32", 0, 1, 0, tmp_path, r)
    module, _ = load_task(r.task_name)
    return module.build(r.task, ctx)


def stage2_task(models: dict[str, Path], family: str = "opt", **extra) -> dict:
    return {
        "name": "stage2",
        "init": str(models["stage1"]),
        "llm": str(models[family]),
        "train": [caption_source()],
        **extra,
    }


def overfit(state, steps: int = 20, lr: float = 1e-2) -> tuple[float, float]:
    """Train on one fixed batch; returns (first loss, last loss)."""
    n = len(state.train_dataset)
    batch = state.collate_fn([state.train_dataset[i] for i in range(0, n, max(1, n // 8))][:8])
    model = state.model.train()
    for name in state.frozen:
        model.get_submodule(name).requires_grad_(False).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        loss = state.training_step(model, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        history.append(float(loss.detach()))
    return history[0], history[-1]


# ----------------------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_stage2_overfits_with_the_vit_and_llm_frozen(world, models, tmp_path, family):
    torch.manual_seed(0)
    state = build(world, tmp_path, stage2_task(models, family))
    blip2 = state.model.blip2
    assert state.frozen == ("blip2.llm", "blip2.vision")
    # the reference's stage-2 variant: no Q-Former text parts, no stage-1 heads, a new projection
    assert not blip2.config.qformer.text_input and not blip2.config.itc_itm_heads
    assert blip2.config.lm.kind == ("causal" if family == "opt" else "seq2seq")
    stage1 = load_checkpoint(models["stage1"]).model.state_dict()
    for key in ("qformer.layers.0.self_attn.query.weight", "query_tokens", "ln_vision.weight", "vision.pos_embed"):
        torch.testing.assert_close(blip2.state_dict()[key], stage1[key], rtol=0, atol=0)
    # the task itself freezes the LLM and the ViT (not only the trainer's `frozen` list)
    assert not any(p.requires_grad for p in [*blip2.llm.parameters(), *blip2.vision.parameters()])
    assert all(p.requires_grad for p in [*blip2.qformer.parameters(), *blip2.language_projection.parameters()])
    llm_before = {k: v.clone() for k, v in blip2.llm.state_dict().items()}
    vit_before = {k: v.clone() for k, v in blip2.vision.state_dict().items()}
    proj_before = blip2.language_projection.weight.detach().clone()

    # the prefix steers a random frozen LLM only so far: no collapse to 0
    first, last = overfit(state, steps=20 if family == "opt" else 40)
    assert last < first - 0.5
    assert all(torch.equal(v, blip2.llm.state_dict()[k]) for k, v in llm_before.items())
    assert all(torch.equal(v, blip2.vision.state_dict()[k]) for k, v in vit_before.items())
    assert not torch.equal(proj_before, blip2.language_projection.weight)


def test_caption_batches_follow_the_reference(world, models, tmp_path):
    state = build(world, tmp_path, stage2_task(models, "opt", prompt="a photo of"))
    processor = LLMProcessor(state.model.blip2.config, load_checkpoint_tokenizer(models["opt"]))
    captions = ["a red circle", "two shapes, a large blue square and a small green cross"]
    # plain captions: exactly LLMProcessor.training_batch (prompt tokens incl. BOS masked, "\n" appended)
    ours = stage2.lm_batch(processor, captions, [None, None], join="space")
    ref = processor.training_batch(captions)
    for name in ("input_ids", "attention_mask", "targets"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name
    # a prompt/answer pair: "{prompt} {answer}\n", the prompt's tokens (and BOS) are not targets
    pair = stage2.lm_batch(processor, ["Question: what color? Short answer:"], ["red"], join="space")
    q = processor.num_query_tokens
    prompt_len = processor.llm.prompt_length("Question: what color? Short answer:")
    targets = pair.targets[0, q:]
    assert (targets[:prompt_len] == losses.IGNORE_INDEX).all()
    answer = processor.llm.tokenizer.decode(pair.input_ids[0, prompt_len:].tolist())
    assert answer == " red\n" and (targets[prompt_len:] != losses.IGNORE_INDEX).all()
    # pack (InstructBLIP-Vicuna layout) and encoder-decoder pairs go through training_batch
    packed = stage2.lm_batch(processor, ["what color?"], ["red"], join="pack")
    assert torch.equal(packed.targets, processor.training_batch(["what color?"], ["red"]).targets)


def load_checkpoint_tokenizer(folder: Path):
    from vlkit.prompting import load_tokenizer

    return load_tokenizer(folder)


def test_stage2_trains_evaluates_exports_and_resumes(world, models, tmp_path):
    task = stage2_task(models, "opt", caption_val=CAPTION_VAL, vqa_val=VQA_VAL, keep_stage1=True)
    recipe = make_recipe(world, task, run={"max_steps": 4, "save_every": 2}, lr=3e-3)
    result = train(recipe, output_dir=tmp_path / "a")
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] < rows[0]["loss"]
    assert {"caption_CIDEr", "caption_Bleu_4", "vqa_overall"} <= set(result.last_eval)
    assert result.best_checkpoint is not None

    # training checkpoints hold neither the frozen LLM nor the frozen ViT
    saved, _, meta = load_training_checkpoint(resolve_checkpoint(tmp_path / "a"))
    assert saved and not any(k.startswith(("blip2.llm.", "blip2.vision.")) for k in saved)
    assert {"blip2.language_projection.weight", "blip2.query_tokens"} <= set(saved)
    assert {f["module"] for f in meta["frozen"]} == {"blip2.llm", "blip2.vision"}

    # the export: a full BLIP-2 (stage-1 heads and text parts carried unchanged) with LLM and tokenizers
    loaded = load_checkpoint(result.exported)
    model = loaded.model
    assert isinstance(model, Blip2) and model.config.itc_itm_heads and model.config.qformer.text_input
    assert loaded.llm_tokenizer is not None and loaded.qformer_tokenizer is not None
    stage1 = load_checkpoint(models["stage1"]).model.state_dict()
    exported = model.state_dict()
    for key in ("temp", "itm_head.weight", "qformer.word_embed.weight", "qformer.layers.1.text_ffn.fc1.weight"):
        torch.testing.assert_close(exported[key], stage1[key], rtol=0, atol=0)
    assert not torch.equal(
        exported["qformer.layers.0.self_attn.query.weight"], stage1["qformer.layers.0.self_attn.query.weight"]
    )
    for key, value in saved.items():
        torch.testing.assert_close(exported[key.removeprefix("blip2.")], value, rtol=0, atol=0)
    llm_file = read_hf_weights(models["opt"])
    for key, value in llm_file.items():
        torch.testing.assert_close(exported[f"llm.{key}"], value, rtol=0, atol=0)
    # vlkit.load gives a pipeline that captions / answers through the LLM and classifies / retrieves through
    # the Q-Former
    pipe = vlkit.load(result.exported)
    images = sorted((world / "images" / "val").glob("*.png"))[:2]
    assert {"caption", "answer", "classify", "retrieve", "itm"} <= {t for t in pipe.tasks}
    texts = pipe.caption(images, max_new_tokens=5, num_beams=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert isinstance(pipe.answer(images[0], "what shape is it?", max_new_tokens=3), str)
    ranked = pipe.classify(images, ["red circle", "blue square", "green cross"])
    assert len(ranked) == 2 and math.isclose(sum(r["score"] for r in ranked[0]), 1.0, rel_tol=1e-4)
    hits = pipe.retrieve(images, ["a red circle", "a blue square"], k=2)
    assert len(hits["text_to_image"]) == 2 and len(hits["image_to_text"][0]) == 2

    # continuing from the step-2 checkpoint reproduces steps 3 and 4 exactly
    train(recipe, output_dir=tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-00000002")
    resumed = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows[2:]]


def test_freeze_qformer_keeps_the_stage1_retrieval_path(world, models, tmp_path):
    task = stage2_task(models, keep_stage1=True, freeze_qformer=True)
    state = build(world, tmp_path / "state", task)
    assert state.frozen == ("blip2.llm", "blip2.vision", "blip2.qformer", "blip2.ln_vision")
    trainable = {n for n, p in state.model.named_parameters() if p.requires_grad}
    assert trainable == {"blip2.language_projection.weight", "blip2.language_projection.bias"}
    result = train(make_recipe(world, task, lr=3e-3), output_dir=tmp_path / "run")
    exported = load_checkpoint(result.exported).model.state_dict()
    stage1 = load_checkpoint(models["stage1"]).model.state_dict()
    for key, value in stage1.items():  # the whole stage-1 model, query tokens included, is unchanged
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
    assert set(exported) - set(stage1) == {k for k in exported if k.startswith(("llm.", "language_projection."))}


def test_feature_cache_gives_the_same_losses(world, models, tmp_path):
    plain = train(make_recipe(world, stage2_task(models)), output_dir=tmp_path / "plain")
    cached_task = stage2_task(models, feature_cache=str(tmp_path / "cache"))
    cached = train(make_recipe(world, cached_task), output_dir=tmp_path / "cached")
    for a, b in zip(read_jsonl(plain.run_dir / "metrics.jsonl"), read_jsonl(cached.run_dir / "metrics.jsonl")):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6)
    assert any((tmp_path / "cache").rglob("shard-*.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_folder(world, models, tmp_path_factory) -> Path:
    """A trained-for-2-steps stage-2 export with the stage-1 parts kept (so vqa_ft can use qformer_text)."""
    run = tmp_path_factory.mktemp("stage2-export")
    return train(make_recipe(world, stage2_task(models, keep_stage1=True)), output_dir=run).exported


def test_caption_ft_trains_the_vit_at_a_larger_size(world, stage2_folder, tmp_path):
    task = {"name": "caption_ft", "init": str(stage2_folder), "image_size": 48, "train": [caption_source()]}
    state = build(world, tmp_path, task)
    blip2 = state.model.blip2
    assert state.frozen == ("blip2.llm",) and blip2.config.vision.image_size == 48
    assert blip2.vision.pos_embed.shape[1] == 1 + (48 // 8) ** 2
    assert blip2.config.lm.prompt == "a photo of"
    sample = state.train_dataset[0]
    assert sample["text_input"].startswith("a photo of ") and sample["image"].shape == (3, 48, 48)
    batch = state.collate_fn([state.train_dataset[i] for i in range(4)])
    q = blip2.config.num_query_tokens
    prompt_len = LLMProcessor(blip2.config, load_checkpoint(stage2_folder).llm_tokenizer).llm.prompt_length(
        "a photo of"
    )
    assert (batch["lm"].targets[:, q : q + prompt_len] == losses.IGNORE_INDEX).all()
    assert (batch["lm"].targets[:, q + prompt_len] != losses.IGNORE_INDEX).all()
    vit_before = blip2.vision.blocks[0].attn.qkv.weight.detach().clone()
    first, last = overfit(state, steps=15)
    assert last < first and not torch.equal(vit_before, blip2.vision.blocks[0].attn.qkv.weight)


def test_caption_ft_exports_the_best_checkpoint(world, stage2_folder, tmp_path):
    task = {"name": "caption_ft", "init": str(stage2_folder), "train": [caption_source()], "caption_val": CAPTION_VAL}
    result = train(make_recipe(world, task, run={"max_steps": 3, "eval_every": 1}), output_dir=tmp_path / "ft")
    evals = read_jsonl(tmp_path / "ft" / "eval.jsonl")
    best_step = max(evals, key=lambda r: (r["caption_CIDEr"], -r["step"]))["step"]
    best, _, _ = load_training_checkpoint(tmp_path / "ft" / "checkpoints" / "best")
    exported = load_checkpoint(result.exported).model
    assert exported.config.lm.prompt == "a photo of" and result.best_value == max(r["caption_CIDEr"] for r in evals)
    assert best_step >= 1
    for key, value in best.items():
        torch.testing.assert_close(exported.state_dict()[key.removeprefix("blip2.")], value, rtol=0, atol=0)


def test_vqa_ft_gives_the_question_to_the_qformer(world, stage2_folder, tmp_path):
    task = {
        "name": "vqa_ft",
        "init": str(stage2_folder),
        "qformer_text": True,
        "train": [vqa_source(answer="most_common")],
        "vqa_val": VQA_VAL,
    }
    state = build(world, tmp_path, task)
    blip2 = state.model.blip2
    assert isinstance(blip2, InstructBlip) and not blip2.config.itc_itm_heads and not blip2.config.qformer.lm_head
    sample = state.train_dataset[0]
    assert sample["text_input"].startswith("Question: ") and sample["text_input"].endswith("Short answer:")
    batch = state.collate_fn([state.train_dataset[i] for i in range(4)])
    lm = batch["lm"]
    assert lm.qformer_ids is not None and lm.qformer_ids.shape[0] == 4
    kept = lm.targets != losses.IGNORE_INDEX
    assert 0 < int(kept.sum()) < int(lm.attention_mask.sum())  # only the answers (and "\n") are targets
    first, last = overfit(state, steps=15)
    assert last < first
    result = train(make_recipe(world, task), output_dir=tmp_path / "run")
    loaded = load_checkpoint(result.exported)
    assert isinstance(loaded.model, InstructBlip) and loaded.qformer_tokenizer is not None
    assert "vqa_overall" in result.last_eval


# ----------------------------------------------------------------------------------------------------------
# Instruction tuning
# ----------------------------------------------------------------------------------------------------------


def instruction_source(**extra) -> dict:
    return {
        "kind": "instruction",
        "annotations": ["instruct/instruct_train.jsonl"],
        "images": "images",
        "transform": "blip_image_eval",
        **extra,
    }


def instruct_task(models: dict[str, Path], family: str = "llama", **extra) -> dict:
    return {
        "name": "instruct_tune",
        "init": str(models["stage1"]),
        "llm": str(models[family]),
        "max_txt_len": 24,
        "train": [
            instruction_source(),
            caption_source(prompts=["A short image caption."]),
            vqa_source(prompts=["Question: {} Short Answer:"]),
        ],
        **extra,
    }


def test_instruct_tune_from_stage1_with_vicuna_tokens(world, models, tmp_path):
    torch.manual_seed(0)
    state = build(world, tmp_path, instruct_task(models))
    blip2 = state.model.blip2
    assert isinstance(blip2, InstructBlip) and state.frozen == ("blip2.llm", "blip2.vision")
    assert blip2.config.qformer.text_input and not blip2.config.itc_itm_heads and not blip2.config.qformer.lm_head
    stage1 = load_checkpoint(models["stage1"]).model.state_dict()
    for key in ("qformer.word_embed.weight", "qformer.layers.0.text_ffn.fc1.weight", "query_tokens"):
        torch.testing.assert_close(blip2.state_dict()[key], stage1[key], rtol=0, atol=0)
    # InstructBLIP-Vicuna's tokenizer: [PAD] added (the LLM's vocabulary grows when it lacks the row),
    # bos = eos = "</s>"; the LLM's own rows are unchanged
    base, tok = load_checkpoint_tokenizer(models["llama"]), processor_of(state).llm.tokenizer
    assert len(tok) == len(base) + 1 and tok.pad_token == "[PAD]" and tok.bos_token == tok.eos_token == "</s>"
    embed = blip2.llm.get_input_embeddings().weight
    original = read_hf_weights(models["llama"])["model.embed_tokens.weight"]
    assert embed.shape[0] == max(original.shape[0], len(tok))
    torch.testing.assert_close(embed[: original.shape[0]], original, rtol=0, atol=0)

    samples = [state.train_dataset[i] for i in range(len(state.train_dataset))]
    kinds = {s["text_input"] for s in samples}
    assert "A short image caption." in kinds and any(t.startswith("Question: ") for t in kinds)
    assert all(s["text_output"] for s in samples)  # every sample is an instruction and its response
    batch = state.collate_fn(samples[:4])
    lm = batch["lm"]
    # the instruction enters the Q-Former; the LLM's targets are the response tokens (+ "</s>") only
    assert lm.qformer_ids is not None and lm.qformer_ids.shape[0] == 4
    q = blip2.config.num_query_tokens
    for row, sample in enumerate(samples[:4]):
        kept = lm.targets[row][lm.targets[row] != losses.IGNORE_INDEX]
        response = tok(sample["text_output"], add_special_tokens=False).input_ids
        assert kept.tolist() == [*response, tok.eos_token_id], sample
        assert (lm.targets[row, :q] == losses.IGNORE_INDEX).all()

    llm_before = {k: v.clone() for k, v in blip2.llm.state_dict().items()}
    words_before = blip2.qformer.word_embed.weight.detach().clone()
    first, last = overfit(state, steps=15)
    assert last < first - 0.5
    assert all(torch.equal(v, blip2.llm.state_dict()[k]) for k, v in llm_before.items())
    assert not torch.equal(words_before, blip2.qformer.word_embed.weight)  # the Q-Former reads text and learns


def processor_of(state) -> LLMProcessor:
    """The :class:`LLMProcessor` inside a built LLM task's collate function (what it encodes text with)."""
    for cell in state.collate_fn.__closure__ or ():
        if isinstance(cell.cell_contents, LLMProcessor):
            return cell.cell_contents
    raise AssertionError("no LLMProcessor in the collate function")


def test_instruct_tune_exports_an_instructblip_and_continues_from_it(world, models, tmp_path):
    task = instruct_task(models, vqa_val={**VQA_VAL, "template": "Question: {} Short Answer:"})
    result = train(make_recipe(world, task, lr=3e-3), output_dir=tmp_path / "a")
    assert "vqa_overall" in result.last_eval
    pipe = vlkit.load(result.exported)
    assert pipe.arch == "instructblip" and "instruct" in pipe.tasks
    image = sorted((world / "images" / "val").glob("*.png"))[0]
    assert isinstance(pipe.instruct(image, "what color is the shape?", max_new_tokens=4, num_beams=2), str)

    # a second round starts from the exported InstructBLIP (its LLM and tokenizers), the packed layout kept
    again = {**instruct_task(models), "init": str(result.exported), "llm": None}
    state = build(world, tmp_path / "b", again)
    exported = load_checkpoint(result.exported).model.state_dict()
    for key, value in state.model.blip2.state_dict().items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="already has its LLM"):
        build(world, tmp_path / "c", {**again, "llm": str(models["llama"])})


def test_instruct_tune_with_an_encoder_decoder_llm(world, models, tmp_path):
    state = build(world, tmp_path, instruct_task(models, "t5"))
    blip2 = state.model.blip2
    assert isinstance(blip2, InstructBlip) and blip2.config.lm.kind == "seq2seq"
    lm = state.collate_fn([state.train_dataset[i] for i in range(4)])["lm"]
    assert lm.decoder_input_ids is not None and lm.qformer_ids is not None
    first, last = overfit(state, steps=15)
    assert last < first


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_config_errors(world, models, stage2_folder, tmp_path):
    with pytest.raises(ConfigError, match="task.init"):
        make_recipe(world, {"name": "stage2", "train": [caption_source()]})
    with pytest.raises(ConfigError, match="exactly one"):
        make_recipe(world, stage2_task(models, train=[vqa_source(prompts=["no placeholder"])]))
    with pytest.raises(ConfigError, match="feature_cache"):
        make_recipe(
            world, stage2_task(models, train=[caption_source(transform="blip2_image_train")], feature_cache="c")
        )
    with pytest.raises(ConfigError, match="answers"):
        make_recipe(world, stage2_task(models, train=[vqa_source(answers=[])]))
    with pytest.raises(ConfigError, match="task.llm"):
        build(world, tmp_path, {**stage2_task(models), "llm": None})
    with pytest.raises(ConfigError, match="already has an LLM"):
        build(world, tmp_path, {**stage2_task(models), "init": str(stage2_folder), "llm": None})
    with pytest.raises(ConfigError, match="no LLM"):
        build(world, tmp_path, {"name": "caption_ft", "init": str(models["stage1"]), "train": [caption_source()]})
    with pytest.raises(CheckpointError, match="config.json"):
        build(world, tmp_path, {**stage2_task(models), "llm": str(tmp_path)})
