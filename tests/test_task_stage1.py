"""Task ``stage1``: ITC + ITM + ITG on the shapes world through the training engine (tiny configs)."""

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from vlkit import losses
from vlkit.checkpoints.folder import load_checkpoint as load_checkpoint_folder
from vlkit.checkpoints.folder import load_model
from vlkit.data import generate_shapes_world
from vlkit.data.tokenizers import train_wordpiece
from vlkit.errors import ConfigError
from vlkit.models.blip2 import Blip2
from vlkit.processors import QFormerTokenizer
from vlkit.tasks import stage1
from vlkit.training.checkpointing import load_checkpoint, resolve_checkpoint
from vlkit.training.dist import seed_everything
from vlkit.training.logging import read_jsonl
from vlkit.training.loop import train
from vlkit.training.optim import param_groups
from vlkit.training.recipe import OptimConfig, recipe_from_dict
from vlkit.training.task import TaskContext

TINY = {
    "vision": {"kind": "eva", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
    "qformer": {
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
        "encoder_width": 32,
        "max_position_embeddings": 32,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    },
    "num_query_tokens": 4,
    "embed_dim": 16,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stage1") / "shapes"
    generate_shapes_world(root, images=8, size=32, seed=3)
    from vlkit.data.tokenizers import qformer_corpus, shapes_texts

    train_wordpiece(qformer_corpus(shapes_texts(root)), root / "tokenizers" / "qformer")
    return root


def task_data(world: Path, **task) -> dict:
    data = {
        "name": "stage1",
        "architecture": copy.deepcopy(TINY),
        "tokenizer": "tokenizers/qformer",
        "data_root": str(world),
        "train": [
            {
                "annotations": ["annotations/coco_karpathy_train.json"],
                "images": "images",
                "transform": "blip_image_eval",
            }
        ],
        "max_txt_len": 24,
        "freeze_vision": False,
        "init_std": 0.1,  # 0.02 * sqrt(768 / 32): BERT's scale at width 32
    }
    data.update(task)
    return data


def recipe(world: Path, run: dict | None = None, optim: dict | None = None, **task):
    return recipe_from_dict(
        {
            "task": task_data(world, **task),
            "optim": {"lr": 2e-3, **(optim or {})},
            "schedule": {"name": "constant"},
            "run": {"max_steps": 4, "batch_size": 8, "progress": False, "eval_every": "end", **(run or {})},
        }
    )


def build(world: Path, tmp_path: Path, **task):
    r = recipe(world, **task)
    ctx = TaskContext(torch.device("cpu"), "fp32", 0, 1, 0, tmp_path, r)
    return stage1.build(r.task, ctx)


def test_losses_fall_on_a_fixed_batch(world, tmp_path):
    torch.manual_seed(0)
    state = build(world, tmp_path)
    batch = state.collate_fn([state.train_dataset[i] for i in range(0, 40, 5)])  # 8 different images
    assert batch["image"].shape == (8, 3, 32, 32) and batch["text_ids"].shape == (8, 24)
    model = state.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        out = state.training_step(model, batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        history.append({k: float(v.detach()) for k, v in out.items()})
    first, last = history[0], history[-1]
    assert set(first) == {"loss", "loss_itc", "loss_itm", "loss_itg", "temp"}
    assert math.isclose(first["loss"], first["loss_itc"] + first["loss_itm"] + first["loss_itg"], rel_tol=1e-5)
    assert last["loss_itc"] < 0.9 * first["loss_itc"]
    assert last["loss_itg"] < 0.5 * first["loss_itg"]
    assert math.isfinite(last["loss_itm"]) and last["loss_itm"] < first["loss_itm"] + 0.02
    assert last["loss"] < 0.6 * first["loss"]


SHAPE_WORDS = [["circle", "square", "triangle", "diamond", "cross"]]


def _first(k: int):
    return lambda n: k


def test_swap_words_exchanges_or_replaces_whole_words():
    draws = iter([1, 0, 2])
    text = "A red Circle left of a blue square and a green circle"
    # exchange: pairs of different group words are (Circle, square) and (square, circle); draw 1 -> the second
    assert stage1.swap_words(text, SHAPE_WORDS, lambda n: next(draws), exchange=True) == (
        "A red Circle left of a blue circle and a green square"
    )
    # replace (the default): occurrence 0 ("Circle") by the third other word of its group ("diamond")
    assert stage1.swap_words(text, SHAPE_WORDS, lambda n: next(draws)) == (
        "A red diamond left of a blue square and a green circle"
    )
    # one group word only: replaced even with exchange on; words are matched whole ("crossing" is not "cross")
    assert (
        stage1.swap_words("crossing a small cross", SHAPE_WORDS, _first(0), exchange=True) == "crossing a small circle"
    )
    assert stage1.swap_words("two circles and one dot", SHAPE_WORDS, _first(0)) is None
    # the same word twice gives no exchange pair, so it is replaced
    assert stage1.swap_words("a circle and a circle", SHAPE_WORDS, _first(0), exchange=True) == "a square and a circle"


def test_itm_text_negatives_join_the_itm_batch(world, tmp_path):
    torch.manual_seed(0)
    state = build(world, tmp_path, itm_text_negatives={"groups": SHAPE_WORDS, "exchange": True})
    samples = [state.train_dataset[i] for i in range(0, 40, 5)]
    batch = state.collate_fn(samples)
    m = batch["neg_owner"].shape[0]
    assert m == len(samples)  # every shapes caption names a shape
    assert batch["neg_text_ids"].shape == (m, batch["text_ids"].shape[1]) == batch["neg_text_mask"].shape
    assert not torch.equal(batch["neg_text_ids"], batch["text_ids"][batch["neg_owner"]])
    model = state.model.train()
    seen = []
    original = model.blip2.itm_logits

    def spy(embeds, ids, mask):
        seen.append(ids.shape[0])
        return original(embeds, ids, mask)

    model.blip2.itm_logits = spy
    out = state.training_step(model, batch)
    assert seen == [3 * len(samples) + m]
    out["loss"].backward()
    plain = {k: v for k, v in batch.items() if not k.startswith("neg_")}
    state.training_step(model, plain)
    assert seen[-1] == 3 * len(samples)
    with pytest.raises(ValueError, match="neg_owner"):
        state.training_step(model, {k: v for k, v in batch.items() if k != "neg_owner"})


def test_image_ids_give_multi_positive_itc(world, tmp_path):
    state = build(world, tmp_path, image_ids=True)
    samples = [state.train_dataset[i] for i in range(6)]  # captions 0-4 share image 0, caption 5 is image 1
    batch = state.collate_fn(samples)
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 0, 1] and batch["image_ids"].dtype == torch.int64
    # augmented views of one image: different pixels, one id (identical copies would make the multi-positive
    # target and the one-positive target give the same mean loss)
    batch["image"][1:5] += 0.5 * torch.randn_like(batch["image"][1:5])
    model = state.model.eval()
    with torch.no_grad():
        model.blip2.temp.fill_(1e-3)  # spread the (nearly equal) initial similarities
        out = state.training_step(model, batch)
        blip2 = model.blip2
        image_embeds = blip2.encode_image(batch["image"])
        feats = blip2.project_image(blip2.encode_queries(image_embeds).query_output)
        text = blip2.project_text(blip2.encode_text(batch["text_ids"], batch["text_mask"]))
        expected = losses.itc_loss(feats, text, blip2.temp, image_ids=batch["image_ids"]).loss
        single = losses.itc_loss(feats, text, blip2.temp).loss
    torch.testing.assert_close(out["loss_itc"], expected)
    assert not torch.allclose(expected, single)
    with pytest.raises(ValueError, match="image ids"):
        state.training_step(model, {k: v for k, v in batch.items() if k != "image_ids"})


def test_layer_decay_follows_lavis_numbering(world, tmp_path):
    state = build(world, tmp_path)
    assert state.num_layers == 3 and state.frozen == ()
    ids = {n: state.layer_id(n) for n, _ in state.model.named_parameters()}
    assert ids["blip2.vision.cls_token"] == ids["blip2.vision.pos_embed"] == ids["blip2.vision.patch_embed.weight"] == 0
    assert ids["blip2.vision.blocks.0.attn.qkv.weight"] == 1 and ids["blip2.vision.blocks.1.mlp.fc2.bias"] == 2
    assert ids["blip2.ln_vision.weight"] is None and ids["blip2.qformer.layers.0.self_attn.query.weight"] is None
    _, infos = param_groups(
        state.model.named_parameters(),
        OptimConfig(layer_decay=0.5),
        layer_id=state.layer_id,
        num_layers=state.num_layers,
    )
    scale = {name: info.lr_scale for info in infos for name in info.names}
    assert scale["blip2.vision.cls_token"] == 0.125
    assert scale["blip2.vision.blocks.0.attn.qkv.weight"] == 0.25
    assert scale["blip2.vision.blocks.1.attn.qkv.weight"] == 0.5
    assert scale["blip2.qformer.layers.0.self_attn.query.weight"] == 1.0


def test_train_evaluate_export_and_resume(world, tmp_path):
    val = {"annotations": "annotations/coco_karpathy_val.json", "images": "images"}
    cls = {"root": "classification/val", "labels": "classification/labels.txt", "template": "a {}"}
    full = recipe(world, run={"save_every": 2}, val=val, classification=cls)
    result = train(full, output_dir=tmp_path / "a")
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"itc_txt_r1", "itc_img_r1", "itc_r_mean", "zs_top1"} <= set(result.last_eval)
    assert all(0.0 <= v <= 100.0 for v in result.last_eval.values())
    assert result.best_checkpoint is not None

    # the exported folder is a loadable vlkit model with its tokenizer, holding the final weights
    assert result.exported == tmp_path / "a" / "model"
    model = load_model(result.exported)
    assert isinstance(model, Blip2)
    final, _, _ = load_checkpoint(resolve_checkpoint(tmp_path / "a"))
    for key, value in final.items():
        torch.testing.assert_close(model.state_dict()[key.removeprefix("blip2.")], value, rtol=0, atol=0)
    tok = QFormerTokenizer(result.exported)
    assert tok.vocab_size == model.config.qformer.vocab_size
    # load_checkpoint (vlkit eval, vlkit.load) finds the same tokenizer in qformer_tokenizer/
    loaded = load_checkpoint_folder(result.exported)
    assert loaded.qformer_tokenizer is not None
    assert loaded.qformer_tokenizer(["a large blue circle"])[0].tolist() == tok(["a large blue circle"])[0].tolist()

    # continuing from the step-2 checkpoint reproduces steps 3 and 4 exactly
    step2 = tmp_path / "a" / "checkpoints" / "step-00000002"
    train(full, output_dir=tmp_path / "b", resume=step2)
    resumed = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(rows[2:], resumed):
        assert a["loss"] == b["loss"] and a["loss_itm"] == b["loss_itm"]


def test_frozen_vit_with_and_without_feature_cache(world, tmp_path):
    common = {"freeze_vision": True, "run": {"max_steps": 2}}
    plain = train(recipe(world, **common), output_dir=tmp_path / "plain")
    cached = train(recipe(world, feature_cache=str(tmp_path / "cache"), **common), output_dir=tmp_path / "cached")
    a = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "cached" / "metrics.jsonl")
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-6), key
    assert any((tmp_path / "cache").rglob("shard-*.safetensors"))

    checkpoint, _, meta = load_checkpoint(resolve_checkpoint(tmp_path / "plain"))
    assert not any(k.startswith("blip2.vision.") for k in checkpoint)  # frozen parts are not saved
    assert meta["frozen"][0]["module"] == "blip2.vision"
    m_plain, m_cached = load_model(plain.exported), load_model(cached.exported)
    seed_everything(42)  # the runs' initialisation (run.seed): the frozen ViT never changed
    fresh = stage1._build_blip2(recipe(world).task, QFormerTokenizer(world / "tokenizers" / "qformer"), {})
    for key, value in fresh.vision.state_dict().items():
        assert torch.equal(m_plain.vision.state_dict()[key], value)
        assert torch.equal(m_cached.vision.state_dict()[key], value)
    assert not torch.equal(m_plain.query_tokens, fresh.query_tokens)
    torch.testing.assert_close(m_plain.query_tokens, m_cached.query_tokens)


def test_from_scratch_with_bert_and_vision_file(world, tmp_path):
    tok = QFormerTokenizer(world / "tokenizers" / "qformer")
    torch.manual_seed(5)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok) - 1,  # + [DEC]
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    donor = Blip2(recipe(world).task.architecture)
    # the EVA-CLIP file layout: our names except the patch embedding's conv under "proj."
    vit = {k.replace("patch_embed.", "patch_embed.proj."): v.clone() for k, v in donor.vision.state_dict().items()}
    for k, v in list(vit.items()):  # the file has one block more than BLIP-2 uses
        if k.startswith("blocks.1."):
            vit[k.replace("blocks.1.", "blocks.2.")] = torch.randn_like(v)
    torch.save(vit, tmp_path / "eva_vit.pth")

    state = build(
        world, tmp_path, bert=str(tmp_path / "bert"), vision_weights=str(tmp_path / "eva_vit.pth"), init_std=None
    )
    blip2 = state.model.blip2
    assert "from the text FFNs" in state.info["Q-Former init"] and "tensors from" in state.info["vision weights"]
    torch.testing.assert_close(blip2.qformer.word_embed.weight[:-1], bert.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(blip2.qformer.lm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    for key, value in donor.vision.state_dict().items():
        assert torch.equal(blip2.vision.state_dict()[key], value), key


def test_init_from_an_exported_folder(world, tmp_path):
    result = train(recipe(world, run={"max_steps": 1}), output_dir=tmp_path / "first")
    # the tokenizer defaults to the one exported with the model
    state = build(world, tmp_path, architecture=None, init=str(result.exported), tokenizer=None, init_std=None)
    for key, value in load_model(result.exported).state_dict().items():
        assert torch.equal(state.model.blip2.state_dict()[key], value)
    other = QFormerTokenizer(train_wordpiece(["completely different words"], tmp_path / "other", vocab_size=300))
    with pytest.raises(ConfigError, match="vocabulary"):
        task = recipe(world, architecture=None, init=str(result.exported), init_std=None).task
        stage1._build_blip2(task, other, {})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": []}, "at least one caption dataset"),
        ({"feature_cache": "c"}, "freeze_vision"),
        (
            {"feature_cache": "c", "freeze_vision": True, "train": [{"annotations": ["a.json"], "images": "i"}]},
            "deterministic",
        ),
        ({"init": "x", "bert": "b", "init_std": None}, "do not combine"),
        ({"bert": "b"}, "init_std"),
        ({"architecture": None}, "set model"),
        ({"model": "blip2-shapes"}, "not both"),
        ({"init_vision": "v.pth"}, "init_vision goes with"),
        ({"train": [{"annotations": ["a.json"], "images": "i", "transform": "crop"}]}, "unknown 'crop'"),
        ({"classification": {"root": "c", "template": "a"}}, "task.classification"),
        ({"colour": "red"}, "unknown key task.colour"),
        ({"itm_text_negatives": {"groups": [["circle"]]}}, "at least two different words"),
        ({"itm_text_negatives": {"groups": [["circle", "square"], ["Circle", "cross"]]}}, "one group only"),
        ({"itm_text_negatives": {"groups": [["circle", "red square"]]}}, "not single words"),
    ],
)
def test_config_errors(world, change, message):
    data = task_data(world, **change)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({"task": data, "run": {"max_steps": 1}})
