"""Task ``lm_pretrain``: tiny OPT / LLaMA causal LMs from scratch on shapes text, exported as transformers folders."""

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlkit.data import generate_shapes_world
from vlkit.data.tokenizers import build_shapes_tokenizers
from vlkit.errors import ConfigError
from vlkit.tasks import lm_pretrain
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import train
from vlkit.training.recipe import recipe_from_dict
from vlkit.training.task import TaskContext

ARCH = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "max_positions": 64, "dropout": 0.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm") / "shapes"
    generate_shapes_world(root, images=6, size=32, seed=5)
    build_shapes_tokenizers(root, root / "tokenizers", lm_vocab=400)
    return root


def task_data(world: Path, arch: str = "opt", **task) -> dict:
    data = {
        "name": "lm_pretrain",
        "arch": arch,
        "architecture": dict(ARCH),
        "tokenizer": f"tokenizers/{arch}",
        "data_root": str(world),
        "train": {
            "captions": ["annotations/coco_karpathy_train.json"],
            "vqa": [
                {
                    "questions": "vqa/v2_OpenEnded_shapes_train_questions.json",
                    "annotations": "vqa/v2_shapes_train_annotations.json",
                }
            ],
            "instructions": ["instruct/instruct_train.jsonl"],
        },
        "val": {"captions": ["annotations/coco_karpathy_val.json"]},
        "end": "\n" if arch == "opt" else "</s>",
        "max_len": 64,
    }
    data.update(task)
    return data


def recipe(world: Path, arch: str = "opt", run: dict | None = None, **task):
    return recipe_from_dict(
        {
            "task": task_data(world, arch, **task),
            "optim": {"lr": 3e-3, "no_decay": "ndim<2"},
            "schedule": {"name": "constant"},
            "run": {"max_steps": 4, "batch_size": 8, "progress": False, "eval_every": "end", **(run or {})},
        }
    )


def build(world: Path, tmp_path: Path, arch: str = "opt", **task):
    r = recipe(world, arch, **task)
    return lm_pretrain.build(r.task, TaskContext(torch.device("cpu"), "fp32", 0, 1, 0, tmp_path, r))


def test_texts_are_formatted_like_the_later_stages(world, tmp_path):
    texts = build(world, tmp_path).train_dataset.texts
    assert all(t.endswith("\n") for t in texts)
    assert texts[0] == texts[0].lower()  # blip_caption-normalised captions
    qa = [t for t in texts if t.startswith("Question: ")]
    assert qa and all(" Short answer: " in t for t in qa)
    assert len(texts) == 6 * 5 + len(qa) + 6 * 3  # captions, questions, instruction records


def test_context_copies_put_captions_of_the_same_image_before_questions(world, tmp_path):
    import json

    from vlkit.processors import blip_caption, blip_question

    template = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
    train = task_data(world)["train"]
    train["vqa"][0]["image_template"] = template
    texts = build(world, tmp_path, train=train, context_copies=2).train_dataset.texts
    plain = build(world, tmp_path).train_dataset.texts
    captions: dict[str, set[str]] = {}
    for entry in json.loads((world / "annotations" / "coco_karpathy_train.json").read_text()):
        captions.setdefault(entry["image"], set()).add(blip_caption(entry["caption"]))
    questions = json.loads((world / "vqa" / "v2_OpenEnded_shapes_train_questions.json").read_text())["questions"]
    assert len(texts) == len(plain) + 2 * (len(questions) + 6 * 3)  # each question and instruction twice more
    images_of: dict[str, set[str]] = {}
    for q in questions:
        image = template.format(data_subtype="train", image_id=q["image_id"])
        images_of.setdefault(blip_question(q["question"]), set()).add(image)
    with_context = [t for t in texts if " Question: " in t]
    assert len(with_context) == 2 * len(questions)
    for text in with_context:
        context, rest = text.split(" Question: ", 1)
        question = rest.split(" Short answer: ")[0]
        assert any(context in captions[image] for image in images_of[question]), text
    with pytest.raises(ConfigError, match="image_template"):
        recipe(world, context_copies=1)
    with pytest.raises(ConfigError, match="context_copies must be >= 0"):
        recipe(world, context_copies=-1)


def test_context_caption_longest_puts_the_images_longest_caption_before_questions(world, tmp_path):
    import json
    from collections import Counter

    from vlkit.processors import blip_caption, blip_question

    template = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
    train = task_data(world)["train"]
    train["vqa"][0]["image_template"] = template
    texts = build(world, tmp_path, train=train, context_copies=2, context_caption="longest").train_dataset.texts
    longest: dict[str, str] = {}
    for entry in json.loads((world / "annotations" / "coco_karpathy_train.json").read_text()):
        caption = blip_caption(entry["caption"])
        if len(caption) > len(longest.get(entry["image"], "")):
            longest[entry["image"]] = caption
    questions = json.loads((world / "vqa" / "v2_OpenEnded_shapes_train_questions.json").read_text())["questions"]
    expected = sorted(
        longest[template.format(data_subtype="train", image_id=q["image_id"])] for q in questions for _ in range(2)
    )
    contexts = sorted(t.split(" Question: ", 1)[0] for t in texts if " Question: " in t)
    assert contexts == expected
    # the instructions too: each record after its image's longest caption, twice
    records = [json.loads(line) for line in (world / "instruct" / "instruct_train.jsonl").read_text().splitlines()]
    wanted = Counter()
    for record in records:
        text = f"{blip_question(record['instruction'])} {blip_caption(record['response'])}\n"
        wanted[f"{longest[record['image']]} {text}"] += 2
    assert not wanted - Counter(texts)
    with pytest.raises(ConfigError, match="context_caption.*shortest"):
        recipe(world, train=train, context_copies=2, context_caption="shortest")


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_batches_and_overfit(world, tmp_path, arch):
    extra = {"bos_token": "</s>"} if arch == "llama" else {}
    state = build(world, tmp_path, arch, **extra)
    texts = state.train_dataset.texts[:6]
    batch = state.collate_fn(texts)
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizers" / arch))
    assert bool((ids[:, 0] == 2).all())  # OPT's BOS is </s>; the LLaMA run feeds InstructBLIP-Vicuna's </s>
    assert bool((targets[mask == 0] == -100).all()) and bool((targets[mask == 1] == ids[mask == 1]).all())
    end = tok("\n", add_special_tokens=False)["input_ids"][-1] if arch == "opt" else tok.eos_token_id
    lengths = mask.sum(1)
    assert all(int(ids[i, lengths[i] - 1]) == end for i in range(len(texts)))  # every text ends with "end"

    model = state.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = last = None
    for _ in range(40):
        loss = state.training_step(model, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    assert last < 0.4 * first


def test_train_resume_export_generate(world, tmp_path):
    r = recipe(world, run={"save_every": 2})
    result = train(r, output_dir=tmp_path / "a")
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert result.last_eval["val_ppl"] == pytest.approx(math.exp(result.last_eval["val_loss"]))
    assert result.best_value == result.last_eval["val_ppl"] or result.best_value < result.last_eval["val_ppl"]

    train(r, output_dir=tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-00000002")
    resumed = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [row["loss"] for row in resumed] == [row["loss"] for row in rows[2:]]

    # a standard transformers folder: model + tokenizer, loadable offline, generates
    folder = result.exported
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert type(model).__name__ == "OPTForCausalLM" and type(tok).__name__ == "GPT2Tokenizer"
    state = build(world, tmp_path)
    batch = state.collate_fn(state.train_dataset.texts[:3])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-1] == len(tok)
    out = model.generate(**tok(["a large"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3 + 3)


def test_llama_export(world, tmp_path):
    result = train(recipe(world, "llama", run={"max_steps": 1}, bos_token="</s>"), output_dir=tmp_path / "l")
    model = AutoModelForCausalLM.from_pretrained(str(result.exported), local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.bos_token_id == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer": None}, "task.tokenizer"),
        ({"train": {}}, "task.train"),
        ({"vqa_template": "Q: {q}"}, "vqa_template"),
        ({"architecture": {**ARCH, "num_heads": 3}}, "divisible"),
        ({"arch": "gpt"}, "task.arch"),
        ({"bogus": 1}, "unknown key task.bogus"),
    ],
)
def test_config_errors(world, change, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"task": task_data(world, **change), "run": {"max_steps": 1}})


def test_runtime_errors(world, tmp_path):
    with pytest.raises(ConfigError, match="no residual dropout"):
        build(world, tmp_path, "llama", architecture={**ARCH, "dropout": 0.1})
    with pytest.raises(ConfigError, match="bos_token"):
        build(world, tmp_path, "opt", bos_token="<nonexistent>")
    with pytest.raises(ConfigError, match="not a tokenizer folder"):
        build(world, tmp_path, "opt", tokenizer="missing")


def test_a_failing_export_leaves_no_model_folder(world, tmp_path, monkeypatch):
    original = lm_pretrain.build

    def build_with_broken_export(cfg, ctx):
        state = original(cfg, ctx)

        def export(model, state_dict, folder):
            (folder / "half-written").write_text("x")
            raise RuntimeError("disk full")

        state.export = export
        return state

    monkeypatch.setattr(lm_pretrain, "build", build_with_broken_export)
    with pytest.raises(RuntimeError, match="disk full"):
        train(recipe(world, run={"max_steps": 1}), output_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "model").exists()
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".model")]
    assert (tmp_path / "r" / "checkpoints" / "latest").is_file()  # the final checkpoint was written first


def _questions_by_image(world: Path, template: str) -> dict[str, list[tuple[str, str]]]:
    import json

    from vlkit.processors import blip_question

    questions = json.loads((world / "vqa" / "v2_OpenEnded_shapes_train_questions.json").read_text())["questions"]
    answers = json.loads((world / "vqa" / "v2_shapes_train_annotations.json").read_text())["annotations"]
    answer_of = {a["question_id"]: a["multiple_choice_answer"] for a in answers}
    out: dict[str, list[tuple[str, str]]] = {}
    for q in questions:
        image = template.format(data_subtype="train", image_id=q["image_id"])
        out.setdefault(image, []).append((blip_question(q["question"]), answer_of[q["question_id"]]))
    return out


def test_group_questions_puts_all_of_an_images_questions_after_one_caption(world, tmp_path):
    from collections import Counter

    template = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
    train = task_data(world)["train"]
    train["vqa"][0]["image_template"] = template
    texts = build(world, tmp_path, train=train, context_copies=2, group_questions=True).train_dataset.texts
    ungrouped = build(world, tmp_path, train=train, context_copies=2).train_dataset.texts
    by_image = _questions_by_image(world, template)
    longest = build(world, tmp_path, train=train, context_copies=1, context_caption="longest").train_dataset.texts
    captions = {t.split(" Question: ", 1)[0] for t in longest if " Question: " in t} | set(
        t.removesuffix("\n") for t in ungrouped if "Question" not in t
    )
    grouped = [t for t in texts if " Question: " in t]
    assert len(grouped) == 2 * len(by_image)  # one text per image and copy
    n_questions = sum(len(v) for v in by_image.values())
    assert len(texts) == len(ungrouped) - 2 * n_questions + 2 * len(by_image)
    seen = Counter()
    for text in grouped:
        context, rest = text.split(" Question: ", 1)
        turns = ("Question: " + rest).removesuffix("\n").split("\n")
        pairs = sorted(tuple(turn.removeprefix("Question: ").split(" Short answer: ")) for turn in turns)
        image = next(i for i, qa in by_image.items() if sorted(qa) == pairs)
        assert context in captions, context
        seen[image] += 1
    assert seen == {image: 2 for image in by_image}  # every image's whole set of questions, twice
    with pytest.raises(ConfigError, match="group_questions.*context_copies"):
        recipe(world, train=train, group_questions=True)


def test_loss_on_responses_targets_only_answers_and_responses(world, tmp_path):
    template = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
    train = task_data(world)["train"]
    train["vqa"][0]["image_template"] = template
    long = {"max_len": 160, "architecture": {**ARCH, "max_positions": 160}}  # whole grouped texts
    state = build(world, tmp_path, train=train, context_copies=1, group_questions=True, loss_on="responses", **long)
    items = state.train_dataset.items
    tok = AutoTokenizer.from_pretrained(str(world / "tokenizers" / "opt"))
    plain = build(world, tmp_path, train=train, context_copies=1, group_questions=True, **long).train_dataset.items
    assert [i.text for i in items] == [i.text for i in plain]  # the same texts, other targets
    batch = state.collate_fn(items)
    same = state.collate_fn([i.text for i in items])
    assert torch.equal(batch["input_ids"], same["input_ids"])  # the spans do not change the tokens
    kinds = Counter()
    for i, item in enumerate(items):
        ids, targets = batch["input_ids"][i], batch["targets"][i]
        real = batch["attention_mask"][i] == 1
        kept = tok.decode(ids[real & (targets != -100)])
        if "Short answer:" in item.text:
            # the answers, each with its end, and nothing else
            answers = [turn.split(" Short answer: ")[1] for turn in item.text.removesuffix("\n").split("\n")]
            assert kept.split() == answers and kept.count("\n") == len(answers), (item.text, kept)
            kinds["vqa"] += 1
        elif item.targets is None:
            assert bool((targets[real] == ids[real]).all())  # captions: every token
            kinds["caption"] += 1
        else:  # an instruction: its response and end
            assert item.text.endswith(kept) and kept.endswith("\n") and len(kept) < len(item.text), item.text
            kinds["instruction"] += 1
    assert min(kinds.values()) > 0 and len(kinds) == 3
    with pytest.raises(ConfigError, match="exactly once"):
        recipe(world, loss_on="responses", vqa_template="Question: {question} {answer} Answer: {answer}")


def test_context_free_false_keeps_only_the_texts_after_a_caption(world, tmp_path):
    template = "{data_subtype}/shapes_{data_subtype}_{image_id:06d}.png"
    train = task_data(world)["train"]
    train["vqa"][0]["image_template"] = template
    every = build(world, tmp_path, train=train, context_copies=2).train_dataset.texts
    texts = build(world, tmp_path, train=train, context_copies=2, context_free=False).train_dataset.texts
    free = [t for t in every if t.startswith("Question: ")]
    n_instructions = 6 * 3
    assert free and len(texts) == len(every) - len(free) - n_instructions
    assert not any(t.startswith("Question: ") for t in texts)
    removed = Counter(every) - Counter(texts)
    assert not Counter(texts) - Counter(every) and sum(removed.values()) == len(free) + n_instructions
    assert not Counter(free) - removed  # every context-free question is gone, and only instructions beside them
    grouped = build(world, tmp_path, train=train, context_copies=1, group_questions=True, context_free=False)
    assert not any(t.startswith("Question: ") for t in grouped.train_dataset.texts)
    with pytest.raises(ConfigError, match="context_free"):
        recipe(world, context_free=False)
