"""VLMo tasks: the reference losses pinned on small tensors, each task overfitting a fixed batch through its
training step, loading pretrained weights (unilm file / vlkit folder) into a task model, the optimiser rule,
recipes, and a whole ``vlkit train`` run that exports a model folder."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from vlmo_fixtures import caption_table, nlvr2_table, pretrained_like, tiny_tokenizer_dir, tiny_vlmo, vqa_table

from vlkit.checkpoints.folder import load_model, save_pretrained
from vlkit.checkpoints.unilm import load_unilm, save_unilm_checkpoint
from vlkit.errors import CheckpointError, ConfigError
from vlkit.layers.pos_embed import sincos_2d
from vlkit.models.vlmo import VLMo
from vlkit.tasks import load_task
from vlkit.tasks.vlmo import (
    VLMoModelSpec,
    build,
    build_model,
    config_from_dict,
    contrastive_loss,
    gather_local_first,
    itm_hard_negatives,
    mask_tokens,
    resolve_paths,
    vqa_loss,
)
from vlkit.training.optim import param_groups
from vlkit.training.recipe import OptimConfig, load_recipe
from vlkit.training.task import TaskContext

REPO = Path(__file__).resolve().parents[1]
#: Overrides that make configs/shapes/vlmo_vqa.yaml fine-tune a model given by task.model.checkpoint (its
#: initialisation settings apply to models from scratch only).
FROM_PRETRAINED = ("task.model.init_std=null", "task.model.pos_init=normal")
MODEL = {"preset": "tiny", "config": {"hidden_size": 32, "depth": 2, "num_heads": 2, "vlffn_start_layer": 1,
                                      "image_size": 32, "patch_size": 16, "max_text_len": 10,
                                      "max_text_len_of_initckpt": 16, "drop_path_rate": 0.0}}  # fmt: skip


# --------------------------------------------------------------------------------------------------- losses


def test_vqa_loss_is_the_per_sample_sum_over_answers():
    logits = torch.randn(3, 5)
    targets = torch.tensor([[1.0, 0.3, 0, 0, 0], [0, 0, 0.6, 0, 0], [0, 0, 0, 0, 0.9]])
    # BCE summed over the 5 answers of each question, averaged over the 3 questions (ban-vqa)
    p = torch.sigmoid(logits)
    manual = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum(dim=1).mean()
    torch.testing.assert_close(vqa_loss(logits, targets), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vqa_loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets) * 5)


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_contrastive_loss_single_process_is_clip():
    img, txt = _norm(torch.randn(4, 8)), _norm(torch.randn(4, 8))
    scale = torch.tensor(math.log(1 / 0.07))
    out = contrastive_loss(img, txt, scale)
    logits = img @ txt.t() / 0.07
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())


def test_contrastive_loss_puts_local_rows_first_and_keeps_others_constant():
    # Two ranks of two samples; we are rank 1. The reference orders the matrix [local, rank 0].
    world_img, world_txt = _norm(torch.randn(4, 8)), _norm(torch.randn(4, 8))
    local_img = world_img[2:].clone().requires_grad_(True)
    local_txt = world_txt[2:].clone().requires_grad_(True)
    gathered = {id(local_img): world_img, id(local_txt): world_txt}

    def gather(t: torch.Tensor) -> torch.Tensor:  # rank-ordered, no gradient
        return gathered[id(t)].detach()

    scale = torch.tensor(0.0, requires_grad=True)
    out = contrastive_loss(local_img, local_txt, scale, rank=1, gather=gather)
    order = torch.tensor([2, 3, 0, 1])
    logits = world_img[order] @ world_txt[order].t()
    torch.testing.assert_close(out.logits_per_image.detach(), logits)
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    # gradient as if the other rank's rows were constants, computed by hand
    img = world_img[2:].clone().requires_grad_(True)
    txt = world_txt[2:].clone().requires_grad_(True)
    logits = torch.cat([img, world_img[:2]]) @ torch.cat([txt, world_txt[:2]]).t()
    ((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2).backward()
    torch.testing.assert_close(local_img.grad, img.grad)
    torch.testing.assert_close(local_txt.grad, txt.grad)
    assert gather_local_first(local_img, rank=0, gather=lambda t: t.detach()) is local_img  # one process


def test_itm_hard_negatives_never_draw_the_positive():
    logits = torch.full((6, 6), -5.0)
    logits.fill_diagonal_(50.0)  # the positive dominates the softmax...
    logits[0, 3] = 10.0  # ...and among the negatives column 3 dominates row 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        image_index, text_index = itm_hard_negatives(logits, logits.t(), 4, generator=g)
        assert image_index.shape == text_index.shape == (4,)
        assert (image_index != torch.arange(4)).all() and (text_index != torch.arange(4)).all()
        assert text_index[0].item() == 3 and image_index[3].item() == 0


# -------------------------------------------------------------------------------------------- task building


def _ctx(tmp_path: Path) -> TaskContext:
    return TaskContext(torch.device("cpu"), "fp32", 0, 1, 0, tmp_path / "run", None)


def _data(tmp_path: Path) -> dict[str, Path]:
    rows = [
        {"questions": ["what color is the dog?", "is there a cat?"], "qids": [1, 2],
         "answers": [["red"], ["yes", "no"]], "labels": [[0], [1, 2]], "scores": [[1.0], [0.9, 0.3]], "image_id": 1},
        {"questions": ["how many cats?"], "qids": [3], "answers": [["two"]], "labels": [[3]], "scores": [[1.0]],
         "image_id": 2},
        {"questions": ["is the dog on the mat?"], "qids": [4], "answers": [["no"]], "labels": [[2]],
         "scores": [[1.0]], "image_id": 3},
    ]  # fmt: skip
    nlvr2 = [
        {"questions": ["two dogs", "no cat"], "answers": ["True", "False"], "identifier": "train-1-0"},
        {"questions": ["a red circle"], "answers": ["False"], "identifier": "train-2-0"},
        {"questions": ["the mat is blue"], "answers": ["True"], "identifier": "train-3-1"},
    ]
    captions = [["a red dog", "dog on a mat"], ["two cats"], ["a blue circle"], ["how many shapes"]]
    return {
        "vqa": vqa_table(tmp_path / "vqav2_train.arrow", rows),
        "nlvr2": nlvr2_table(tmp_path / "nlvr2_train.arrow", nlvr2),
        "captions": caption_table(tmp_path / "f30k_train.arrow", captions),
        "tokenizer": tiny_tokenizer_dir(tmp_path / "tok"),
        "pretrained": pretrained_like(tmp_path / "pretrained.pt", 120, max_text_len=10),
    }


def _cfg(kind: str, d: dict[str, Path], source: str, *, pretrained: bool = False, **extra):
    """A task config on the tiny model (from scratch, or fine-tuning a pretrained-like checkpoint), the test
    tokenizer and one arrow table."""
    model = {"checkpoint": str(d["pretrained"]), "config": {"drop_path_rate": 0.0}} if pretrained else MODEL
    data = {"model": model, "data": {"arrow": [str(d[source])]}, "tokenizer": str(d["tokenizer"]),
            "train_transform": "vlmo_eval", **extra}  # fmt: skip
    return config_from_dict(kind, data)


def _overfit(state, steps: int = 30, lr: float = 3e-3, head_mult: float = 20) -> tuple[float, float]:
    model = state.model.train()
    batch = state.collate_fn([state.train_dataset[i] for i in range(len(state.train_dataset))])
    # new classifiers learn faster (the reference's lr_mult of 20 for the VQA classifier)
    head = [p for n, p in model.named_parameters() if n.startswith(("vqa_head", "nlvr2_head"))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("vqa_head", "nlvr2_head"))]
    opt = torch.optim.AdamW([{"params": rest}, {"params": head, "lr": head_mult * lr}], lr=lr)
    losses = []
    for _ in range(steps):
        out = state.training_step(model, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses[0], losses[-1]


def test_vqa_task_overfits_a_batch(tmp_path):
    d = _data(tmp_path)
    state = build(_cfg("vlmo_vqa", d, "vqa", pretrained=True), _ctx(tmp_path))
    # the answers come from the tables; the pretrained ITC/ITM heads are dropped, the classifier is new
    assert state.model.config.heads == ("vqa",) and state.model.config.vqa_num_labels == 4
    assert state.export is not None and state.deterministic_data
    # soft targets 0.9 / 0.3 leave an irreducible binary entropy
    floor = sum(-(t * math.log(t) + (1 - t) * math.log(1 - t)) for t in (0.9, 0.3)) / 4
    first, last = _overfit(state, steps=40)
    assert floor < last < 0.35 * first, (first, last, floor)


def test_vqa_task_from_scratch_learns(tmp_path):
    d = _data(tmp_path)
    state = build(_cfg("vlmo_vqa", d, "vqa"), _ctx(tmp_path))
    vocab = (d["tokenizer"] / "vocab.txt").read_text().splitlines()
    assert state.model.config.vocab_size == len(vocab) and state.model.config.hidden_size == 32
    first, last = _overfit(state, steps=60, lr=1e-2, head_mult=1)
    assert last < 0.6 * first, (first, last)


def test_retrieval_task_overfits_a_batch_with_itm(tmp_path):
    d = _data(tmp_path)
    state = build(_cfg("vlmo_retrieval", d, "captions", pretrained=True, itm=True), _ctx(tmp_path))
    assert set(state.model.config.heads) == {"irtr", "itm"}
    model = state.model.train()
    batch = state.collate_fn([state.train_dataset[i] for i in range(len(state.train_dataset))])
    out = state.training_step(model, batch)
    assert set(out) == {"loss", "loss_irtr", "loss_itm", "logit_scale"}
    torch.testing.assert_close(out["loss"], out["loss_irtr"] + out["loss_itm"])
    first, last = _overfit(state)
    assert last < 0.5 * first, (first, last)


def test_mask_tokens_follows_the_bert_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 50, (400, 12), generator=g)
    ids[:, 0], ids[:, 9], ids[:, 10:] = 2, 3, 0  # [CLS] text [SEP] [PAD] [PAD]
    keep = ids != 0
    masked, labels = mask_tokens(ids, keep, mask_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=50,
                                 probability=0.15, generator=g)  # fmt: skip
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 9:].any()  # never specials or padding
    assert picked.any(dim=1).all()  # every text has a target
    torch.testing.assert_close(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    rate = picked[:, 1:9].float().mean().item()
    assert 0.13 < rate < 0.2, rate
    as_mask = (masked[picked] == 4).float().mean().item()
    kept = (masked[picked] == ids[picked]).float().mean().item()
    assert 0.74 < as_mask < 0.86 and 0.05 < kept < 0.17, (as_mask, kept)


def test_retrieval_task_with_mlm_trains_all_three_objectives(tmp_path):
    d = _data(tmp_path)
    state = build(_cfg("vlmo_retrieval", d, "captions", pretrained=True, itm=True, mlm=True), _ctx(tmp_path))
    assert set(state.model.config.heads) == {"irtr", "itm", "mlm"}
    model = state.model.train()
    batch = state.collate_fn([state.train_dataset[i] for i in range(len(state.train_dataset))])
    out = state.training_step(model, batch)
    assert {"loss_irtr", "loss_itm", "loss_mlm", "mlm_accuracy"} <= set(out)
    torch.testing.assert_close(out["loss"], out["loss_irtr"] + out["loss_itm"] + out["loss_mlm"])
    logits = model(batch["text_ids"], batch["text_mask"], batch["image"], head="mlm")
    assert logits.shape == (*batch["text_ids"].shape, model.config.vocab_size)
    first, last = _overfit(state, steps=40)
    assert last < 0.6 * first, (first, last)
    with pytest.raises(ConfigError, match="mlm_probability"):
        config_from_dict("vlmo_retrieval", {"data": {"arrow": ["x.arrow"]}, "mlm_probability": 0})


def test_models_root_makes_the_checkpoint_relative(tmp_path):
    fields = {"model": {"checkpoint": "pre/model"}, "models_root": str(tmp_path / "runs"),
              "data_root": str(tmp_path / "data"), "data": {"arrow": ["t.arrow"]}}  # fmt: skip
    cfg = config_from_dict("vlmo_vqa", fields)
    resolved = resolve_paths(cfg)
    assert resolved.model.checkpoint == tmp_path / "runs" / "pre" / "model"
    assert resolved.data.arrow == [tmp_path / "data" / "t.arrow"]
    absolute = config_from_dict("vlmo_vqa", {"model": {"checkpoint": str(tmp_path / "x.pt")}, "models_root": "r",
                                             "data": {"arrow": ["t.arrow"]}})  # fmt: skip
    assert resolve_paths(absolute).model.checkpoint == tmp_path / "x.pt"
    unset = config_from_dict("vlmo_vqa", {"model": {"checkpoint": "pre/model"}, "data": {"arrow": ["t.arrow"]}})
    assert resolve_paths(unset).model.checkpoint == Path("pre/model")  # the working directory


def test_nlvr2_task_overfits_a_batch(tmp_path):
    d = _data(tmp_path)
    state = build(_cfg("vlmo_nlvr2", d, "nlvr2", pretrained=True), _ctx(tmp_path))
    assert state.model.config.num_token_types == 3
    first, last = _overfit(state)
    assert last < 0.1 * first, (first, last)


def test_tokenizer_train_builds_the_vocabulary_from_the_questions(tmp_path):
    d = _data(tmp_path)
    cfg = config_from_dict("vlmo_vqa", {"model": MODEL, "data": {"arrow": [str(d["vqa"])]}, "tokenizer": "train"})
    state = build(cfg, _ctx(tmp_path))
    vocab = (tmp_path / "run" / "tokenizer" / "vocab.txt").read_text().splitlines()
    assert "dog" in vocab and "mat" in vocab
    assert state.model.config.vocab_size == len(vocab)
    batch = state.collate_fn([state.train_dataset[0]])
    assert batch["text_ids"].shape == (1, 10) and 1 not in batch["text_ids"].tolist()  # no [UNK]
    with pytest.raises(ConfigError, match="only a model from scratch"):
        build(config_from_dict("vlmo_vqa", {"model": {"checkpoint": str(tmp_path / "x.pt")},
                                            "data": {"arrow": [str(d["vqa"])]}, "tokenizer": "train"}),
              _ctx(tmp_path))  # fmt: skip


def test_data_root_makes_paths_relative(tmp_path):
    d = _data(tmp_path)
    cfg = config_from_dict("vlmo_vqa", {"model": MODEL, "data_root": str(tmp_path),
                                        "data": {"arrow": ["vqav2_train.arrow"]}, "tokenizer": "tok"})  # fmt: skip
    state = build(cfg, _ctx(tmp_path))
    assert len(state.train_dataset) == 4 and d["vqa"].is_file()


# ----------------------------------------------------------------------------------------- from checkpoints


def test_task_model_from_a_unilm_file_and_a_vlkit_folder(tmp_path):
    pretrained = tiny_vlmo(("mlm", "itm", "itc"), 120, patch_size=8, max_text_len=12)  # 4x4 grid
    pt = tmp_path / "vlmo_tiny_pretrained.pt"
    save_unilm_checkpoint(pretrained, pt)
    folder = save_pretrained(pretrained, tmp_path / "folder")
    for source in (pt, folder):
        spec = VLMoModelSpec(checkpoint=source, config={"image_size": 48, "max_text_len": 8})
        model = build_model(spec, ("vqa",), vqa_num_labels=7)
        c = model.config
        assert (c.image_size, c.max_text_len, c.heads, c.vqa_num_labels) == (48, 8, ("vqa",), 7)
        assert model.training and model.mlm_head is None and model.itm_head is None
        same = model.state_dict()
        for key in ("blocks.1.attn.qkv.weight", "blocks.1.ffn_vl.fc1.weight", "text_embed.word.weight", "cls_token"):
            torch.testing.assert_close(same[key], pretrained.state_dict()[key])
        torch.testing.assert_close(same["text_embed.position.weight"], pretrained.text_embed.position.weight[:8])
        assert model.rel_pos_table.shape[0] > pretrained.rel_pos_table.shape[0]  # resampled to a 6x6 grid
        # the text rows of the table are copied unchanged
        torch.testing.assert_close(model.rel_pos_table[-20:], pretrained.rel_pos_table[-20:])
    nlvr2 = build_model(VLMoModelSpec(checkpoint=pt), ("nlvr2",))
    torch.testing.assert_close(nlvr2.token_type.weight[2], pretrained.token_type.weight[1])


def test_task_model_from_a_conv_stem_folder(tmp_path):
    # The unilm layout has no conv stem, so a vlkit folder is adapted in vlkit's own key layout.
    pretrained = tiny_vlmo(("mlm", "itm", "itc"), 120, patch_size=8, max_text_len=12, stem="conv")
    folder = save_pretrained(pretrained, tmp_path / "folder")
    model = build_model(VLMoModelSpec(checkpoint=folder, config={"image_size": 48, "max_text_len": 8}), ("vqa",))
    assert model.config.stem == "conv" and model.vqa_head is not None and model.mlm_head is None
    for key, value in pretrained.state_dict().items():
        if key.startswith("patch_embed.") or key.startswith("blocks.1."):
            torch.testing.assert_close(model.state_dict()[key], value)
    assert model.rel_pos_table.shape[0] > pretrained.rel_pos_table.shape[0]  # resampled to a 6x6 grid
    nlvr2 = VLMo(dataclasses.replace(model.config, heads=("nlvr2",)))
    with pytest.raises(CheckpointError, match=r"lacks task heads the model has \(nlvr2\)"):
        load_unilm(nlvr2, pretrained.state_dict(), drop_heads=("mlm", "itm", "itc"), layout="vlkit")
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\) in the file: patch_embed.convs.9.weight"):
        load_unilm(model, {**model.state_dict(), "patch_embed.convs.9.weight": torch.zeros(1)}, layout="vlkit")


def test_pos_init_sincos_starts_the_image_positions_from_sincos(tmp_path):
    config = {**MODEL["config"], "position": "absolute"}
    model = build_model(VLMoModelSpec(preset="tiny", config=config, pos_init="sincos"), ("vqa",), vqa_num_labels=3)
    torch.testing.assert_close(model.pos_embed[0, 0], torch.zeros(32))
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_2d(2, 32))
    assert model.pos_embed.requires_grad  # learned from there
    with pytest.raises(ConfigError, match="absolute"):
        build_model(VLMoModelSpec(preset="tiny", config=MODEL["config"], pos_init="sincos"), ("vqa",), vqa_num_labels=3)
    with pytest.raises(ConfigError, match="from scratch only"):
        VLMoModelSpec(checkpoint=tmp_path / "model", pos_init="sincos")


def test_model_spec_rejects_task_owned_fields():
    with pytest.raises(ConfigError, match="set by the task"):
        VLMoModelSpec(config={"heads": ["vqa"]})


# ----------------------------------------------------------------------------------------- optimiser, recipes


def test_vlmo_optimiser_rule_and_classifier_multiplier():
    model = tiny_vlmo(("vqa",), 64)
    cfg = OptimConfig(lr=3e-5, betas=(0.9, 0.98), weight_decay=0.01, no_decay="vlmo", lr_mult={"vqa_head": 20})
    _, infos = param_groups(model.named_parameters(), cfg)
    where = {name: (info.weight_decay, info.lr_scale) for info in infos for name in info.names}
    assert where["vqa_head.fc1.weight"] == (0.01, 20) and where["vqa_head.fc1.bias"] == (0.0, 20)
    assert where["vqa_head.norm.weight"] == (0.01, 20)  # unilm's vqa_classifier.1.weight: decayed
    assert where["blocks.0.norm1.weight"] == (0.0, 1)
    assert where["blocks.0.norm_text.weight"] == (0.01, 1)  # norm2_text.weight: decayed (reference quirk)
    assert where["blocks.0.attn.q_bias"] == (0.0, 1) and where["blocks.0.gamma_1"] == (0.01, 1)
    # unilm's relative_position_bias_table contains "bias": not decayed (vlmo-spec §A.5 says otherwise)
    assert where["text_embed.norm.weight"] == (0.0, 1) and where["rel_pos_table"] == (0.0, 1)
    assert where["norm.weight"] == (0.0, 1) and where["pooler.weight"] == (0.01, 1)


def test_vlmo_recipes_load_with_reference_hyperparameters():
    shapes = [REPO / "configs" / "shapes" / f"vlmo_{name}.yaml" for name in ("pretrain", "vqa")]
    files = sorted((REPO / "configs" / "vlmo").glob("*.yaml")) + shapes
    assert len(files) >= 4
    recipes = {f.stem: load_recipe(f) for f in files}
    for name, recipe in recipes.items():
        assert recipe.task_name.startswith("vlmo_"), name
        assert recipe.optim.no_decay == "vlmo" and recipe.optim.betas == (0.9, 0.98), name
        load_task(recipe.task_name)
    vqa = recipes["vqa_base_480"]
    assert vqa.task.model.config["image_size"] == 480 and vqa.optim.lr == 3e-5
    assert vqa.optim.lr_mult == {"vqa_head": 20.0} and vqa.schedule.warmup_fraction == 0.1
    assert vqa.run.batch_size * vqa.optim.accum_steps == 128 and vqa.run.epochs == 10
    raw = yaml.safe_load((REPO / "configs" / "vlmo" / "vqa_base_480.yaml").read_text())
    assert raw["task"]["model"]["config"]["drop_path_rate"] == 0.15


# ------------------------------------------------------------------------------------------------- end to end


def test_vlkit_train_exports_a_loadable_folder(tmp_path):
    from vlkit.cli import main

    d = _data(tmp_path)
    recipe = {
        "task": {"name": "vlmo_vqa", "model": MODEL, "data": {"arrow": [str(d["vqa"])]},
                 "tokenizer": str(d["tokenizer"]), "train_transform": "vlmo_eval"},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.01, "no_decay": "vlmo",
                  "lr_mult": {"vqa_head": 20}},
        "schedule": {"name": "linear", "warmup_fraction": 0.1},
        "run": {"max_steps": 2, "batch_size": 2, "device": "cpu", "progress": False},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 0
    exported = tmp_path / "run" / "model"
    assert (exported / "tokenizer" / "vocab.txt").is_file() and (exported / "answer2label.txt").is_file()
    model = load_model(exported)
    assert model.config.heads == ("vqa",) and not model.training
    from vlkit.training.checkpointing import load_checkpoint

    state, _, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002")
    for key, value in state.items():
        torch.testing.assert_close(model.state_dict()[key], value)


@pytest.mark.slow
def test_shapes_vlmo_recipes(tmp_path, full):
    """configs/shapes/vlmo_vqa.yaml from scratch as the demo pipeline runs it (its own world, the main world's
    tokenizer, paths set by ``task.data_root`` / ``task.tokenizer``), then ``vlkit eval vqa`` on the test split;
    and vlmo_pretrain.yaml, whose model the VQA recipe can start from instead. CI runs a few steps on tiny
    worlds; ``--full`` runs the VQA recipe as written on the pipeline's world and needs >= 80 % VQA accuracy."""
    from vlkit.cli import main
    from vlkit.data.shapes import generate_shapes_world, shapes_paths
    from vlkit.demo import WORLDS

    out = tmp_path / "out"
    data, world = out / "data", out / "data_vlmo"
    if full:
        for folder, images in ((data, WORLDS["data"]), (world, WORLDS["data_vlmo"])):
            made = main(["data", "shapes", str(folder), "--train-images", str(images), "--images", "200", "--quiet"])
            assert made == 0
    else:
        generate_shapes_world(data, images=3, size=64)
        generate_shapes_world(world, images=3, train_images=5, size=64)
    assert main(["data", "tokenizers", str(data), str(data / "tokenizers")]) == 0
    quick = [] if full else ["run.max_steps=2", "run.batch_size=4", "run.eval_every=end", "task.eval_batch_size=8"]
    tokenizer = f"task.tokenizer={data / 'tokenizers' / 'qformer'}"
    vqa = ["train", str(REPO / "configs" / "shapes" / "vlmo_vqa.yaml"), "--output", str(out / "runs" / "vlmo"),
           "--set", f"task.data_root={world}", tokenizer, "run.progress=false", *quick]  # fmt: skip
    assert main(vqa) == 0
    model = load_model(out / "runs" / "vlmo" / "model")
    assert model.config.heads == ("vqa",)
    evaluation = tmp_path / "eval"
    assert main(["eval", "vqa", "--model", str(out / "runs" / "vlmo" / "model"), "--data", str(world),
                 "--split", "test", "--output", str(evaluation), "--quiet"]) == 0  # fmt: skip
    doc = json.loads((evaluation / "metrics.json").read_text())
    questions = json.loads(shapes_paths(world, "test").vqa_questions.read_text())["questions"]
    predictions = json.loads((evaluation / "predictions.json").read_text())
    assert [p["question_id"] for p in predictions] == [q["question_id"] for q in questions]
    if full:
        assert doc["metrics"]["vqa_accuracy"] >= 80.0, doc["metrics"]
        return

    # VLMo's own pre-training objectives on the captions, and the VQA recipe fine-tuning that model
    common = [f"task.data_root={data}", "run.progress=false", *quick]
    pretrain = ["train", str(REPO / "configs" / "shapes" / "vlmo_pretrain.yaml"), "--output",
                str(out / "runs" / "vlmo_pretrain"), "--set", *common]  # fmt: skip
    assert main(pretrain) == 0
    pretrained = load_model(out / "runs" / "vlmo_pretrain" / "model")
    assert set(pretrained.config.heads) == {"irtr", "itm", "mlm"}
    from_pretrained = ["train", str(REPO / "configs" / "shapes" / "vlmo_vqa.yaml"), "--output",
                       str(out / "runs" / "vlmo_ft"), "--set", *common, *FROM_PRETRAINED,
                       f"task.model.checkpoint={out / 'runs' / 'vlmo_pretrain' / 'model'}"]  # fmt: skip
    assert main(from_pretrained) == 0
    tuned = load_model(out / "runs" / "vlmo_ft" / "model")
    assert tuned.config.heads == ("vqa",) and tuned.config.hidden_size == pretrained.config.hidden_size
    # the fine-tuned backbone started from the pre-trained one: a block weight moved only by the few steps
    key = "blocks.0.attn.qkv.weight"
    moved = (tuned.state_dict()[key] - pretrained.state_dict()[key]).abs().max()
    apart = (model.state_dict()[key] - pretrained.state_dict()[key]).abs().max()  # the model from scratch
    assert 0 < moved < 0.1 * apart
