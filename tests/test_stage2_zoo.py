"""Stage-2 / InstructBLIP presets: real-size parameter counts on the meta device against the transformers
classes built with the same shapes, and a tiny model of every preset through forward, backward and a vlkit
folder round trip."""

from __future__ import annotations

import pytest
import torch

from vlkit import zoo
from vlkit.checkpoints.folder import load_model, save_pretrained
from vlkit.losses import causal_lm_loss, causal_lm_targets, seq2seq_lm_loss
from vlkit.prompting import shift_right

STAGE2 = [name for name, spec in zoo.MODELS.items() if spec.config().lm is not None]
REAL = [name for name in STAGE2 if not name.startswith("tiny-")]
REDUCED = ["blip2-opt2.7b-pretrain", "blip2-flant5xl-pretrain", "instructblip-vicuna7b"]
# Measured with transformers 5.23 (issue 4).
HF_TOTALS = {"blip2-opt2.7b-pretrain": 3_744_679_936, "blip2-flant5xl-pretrain": 3_876_648_448}
OPT27_PARTS = {
    "vision": 985_952_256,
    "qformer": 105_137_664,
    "projection": 1_968_640,
    "query": 24_576,
    "llm": 2_651_596_800,
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine waiting for it dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _hf_meta(config):
    """The transformers model with the same shapes (EVA ViT only), on the meta device."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    v, q = config.vision, config.qformer
    vision = dict(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
    )
    qformer = dict(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_freq,
    )
    kw = dict(
        vision_config=vision,
        qformer_config=qformer,
        text_config=config.lm.hf_config,
        num_query_tokens=config.num_query_tokens,
    )
    with torch.device("meta"):
        if config.instruction_aware:
            return InstructBlipForConditionalGeneration(InstructBlipConfig(**kw))
        return Blip2ForConditionalGeneration(Blip2Config(**kw))


def test_every_real_llm_published_checkpoint_has_a_preset():
    names = set(REAL)
    for expected in (
        "opt2.7b-pretrain",
        "opt6.7b-pretrain",
        "opt2.7b-coco",
        "opt6.7b-coco",
        "flant5xl-pretrain",
        "flant5xxl-pretrain",
        "flant5xl-vitl-pretrain",
        "flant5xl-coco",
        "llama7b-mindformers",
    ):
        assert f"blip2-{expected}" in names
    for expected in ("vicuna7b", "vicuna13b", "flant5xl", "flant5xxl"):
        assert f"instructblip-{expected}" in names
    coco = zoo.get_spec("blip2-opt2.7b-coco")
    assert coco.config().lm.prompt == "a photo of" and coco.image_size == 364 and not coco.freeze_vision
    assert zoo.get_spec("blip2-flant5xl-pretrain").config().lm.hf_config["dense_act_fn"] == "gelu"
    vicuna = zoo.get_spec("instructblip-vicuna7b").config().lm
    assert vicuna.hf_config["vocab_size"] == 32001 and vicuna.prompt_truncation == "left"
    assert vicuna.max_txt_len == 128 and vicuna.max_output_txt_len == 256 and vicuna.zero_id_as_eos


def test_parameter_counts_match_transformers(full):
    for name in REAL if full else REDUCED:
        ours = zoo.build(name, device="meta")
        config = ours.config
        ours.freeze_vision()
        ours.freeze_llm()
        v = config.vision
        trainable = count(ours, trainable_only=True)
        assert trainable == count(ours) - count(ours.vision) - count(ours.llm), name
        assert trainable == count(ours.ln_vision) + ours.query_tokens.numel() + count(ours.qformer) + count(
            ours.language_projection
        )
        ref = _hf_meta(config)
        if v.kind != "eva":  # transformers' BLIP-2 has no CLIP ViT: compare the rest (same widths)
            assert count(ours) - count(ours.vision) - count(ours.ln_vision) == count(ref) - count(ref.vision_model)
            continue
        # transformers' fused qkv bias carries a (zero) key third per block that we do not store.
        assert count(ours) + v.depth * v.width == count(ref), name
        assert count(ours.llm) == count(ref.language_model), name
        assert count(ours.qformer) == count(ref.qformer), name
        if name in HF_TOTALS:
            assert count(ref) == HF_TOTALS[name]
    ours = zoo.build("blip2-opt2.7b-pretrain", device="meta")
    parts = {
        "vision": count(ours.vision) + count(ours.ln_vision) + 39 * 1408,
        "qformer": count(ours.qformer),
        "projection": count(ours.language_projection),
        "query": ours.query_tokens.numel(),
        "llm": count(ours.llm),
    }
    assert parts == OPT27_PARTS


@pytest.mark.parametrize("name", STAGE2)
def test_tiny_version_forward_backward_round_trip(name, tmp_path):
    spec = zoo.get_spec(name)
    config = zoo.shrink(spec.config())
    assert config.lm.hf_config["model_type"] == spec.config().lm.hf_config["model_type"]
    assert type(config) is type(spec.config())
    model = zoo.build(name) if name.startswith("tiny-") else zoo.ARCHS[spec.arch][1](config)
    config = model.config
    if spec.freeze_vision:
        model.freeze_vision()
    model.freeze_llm()
    model.train()
    b, t = 2, 5
    pixels = torch.randn(b, 3, config.vision.image_size, config.vision.image_size)
    vocab = config.lm.hf_config["vocab_size"]
    ids = torch.randint(3, vocab, (b, t))
    q_ids = torch.randint(1, config.qformer.vocab_size, (b, 3)) if config.instruction_aware else None
    prefix = model.llm_prefix(pixels, qformer_ids=q_ids)
    assert prefix.shape == (b, config.num_query_tokens, model.llm.get_input_embeddings().embedding_dim)
    if config.lm.kind == "causal":
        logits = model.lm_logits(prefix, ids)
        loss = causal_lm_loss(logits, causal_lm_targets(ids, num_query_tokens=config.num_query_tokens, pad_id=1))
    else:
        labels = torch.randint(3, vocab, (b, 4))
        logits = model.lm_logits(prefix, ids, decoder_input_ids=shift_right(labels, 0, 0))
        loss = seq2seq_lm_loss(logits, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert not model.llm.training and all(p.grad is None for p in model.llm.parameters())
    for pname, p in model.named_parameters():
        if pname.startswith("llm.") or (spec.freeze_vision and pname.startswith("vision.")):
            continue
        if config.instruction_aware is False and "text_ffn" in pname:
            continue
        if "text_ffn" in pname and pname.split(".")[2] == str(config.qformer.num_layers - 1):
            continue  # the last layer's text outputs are discarded: its text FFN gets no gradient
        assert p.grad is not None, f"{name}: no gradient for {pname}"
    save_pretrained(model, tmp_path / "m", preset=name)
    loaded = load_model(tmp_path / "m")
    a, c = model.state_dict(), loaded.state_dict()
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert loaded.config == model.config and type(loaded) is type(model)
    assert loaded.tied_parameters() == model.tied_parameters()
