"""Every zoo entry: real-size parameter counts (meta device, against transformers), and a tiny model of the
same family through forward, backward and a vlkit-folder round trip."""

from __future__ import annotations

import pytest
import torch

from vlkit import zoo
from vlkit.checkpoints.folder import load_model, save_pretrained
from vlkit.errors import ConfigError
from vlkit.models import ARCHS
from vlkit.models.blip2 import Blip2
from vlkit.models.qformer import QFormer

# Measured with transformers 5.23 (issue 4): Blip2VisionModel ViT-g incl. post_layernorm and the fused key
# bias; the stage-2 Q-Former (no text path); 32 x 768 query tokens.
HF_VITG = 985_952_256
HF_QFORMER_STAGE2 = 105_137_664
QUERY_TOKENS = 24_576


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_spec_is_consistent():
    for name, spec in zoo.MODELS.items():
        assert spec.arch in ARCHS, name
        config = spec.config()
        assert config is not spec.config(), "config factories must return fresh objects"
        assert config.vision.image_size == spec.image_size, name
        assert len(spec.mean) == 3 and len(spec.std) == 3
    with pytest.raises(ConfigError, match="known models"):
        zoo.get_spec("blip2-nope")


def _hf_retrieval_meta(image_size: int = 224):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(
        vision_config={"image_size": image_size},
        qformer_config={"use_qformer_text_input": True, "vocab_size": 30523},
    )
    with torch.device("meta"):
        return Blip2ForImageTextRetrieval(cfg)


@pytest.mark.parametrize("name, image_size", [("blip2-vitg-pretrain", 224), ("blip2-vitg-coco", 364)])
def test_vitg_parameter_counts_match_transformers(name, image_size):
    ours = zoo.build(name, device="meta")
    ref = _hf_retrieval_meta(image_size)
    v = ours.config.vision
    # transformers' fused qkv bias has a (zero) key third per block that we do not store.
    assert count(ours.vision) + count(ours.ln_vision) + v.depth * v.width == count(ref.vision_model)
    if image_size == 224:
        assert count(ref.vision_model) == HF_VITG
    assert ours.query_tokens.numel() == ref.query_tokens.numel() == QUERY_TOKENS
    lm_head = count(ours.qformer.lm_head)
    assert count(ours.qformer) - lm_head == count(ref.qformer) + count(ref.embeddings)
    heads = count(ours.vision_proj) + count(ours.text_proj) + count(ours.itm_head)
    assert heads == count(ref.vision_projection) + count(ref.text_projection) + count(ref.itm_head)
    assert count(ours) == count(ref) - v.depth * v.width + lm_head + 1  # + temp
    # The full stage-1 Q-Former: ~186 M with the MLM head, 23.4 M of it word embeddings.
    assert ours.qformer.word_embed.weight.numel() == 30523 * 768
    assert 185e6 < count(ours.qformer) < 188e6


def test_stage2_qformer_count_matches_transformers():
    from transformers import Blip2Config, Blip2QFormerModel

    cfg = zoo.get_spec("blip2-vitg-pretrain").config()
    cfg.qformer.text_input = cfg.qformer.lm_head = False
    with torch.device("meta"):
        ours = QFormer(cfg.qformer)
        ref = Blip2QFormerModel(Blip2Config().qformer_config)
    assert count(ours) == count(ref) == HF_QFORMER_STAGE2


def test_vitl_parameter_count_matches_transformers_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ours = zoo.build("blip2-vitl-pretrain", device="meta")
    v = ours.config.vision
    ref_cfg = CLIPVisionConfig(
        hidden_size=v.width,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.depth,
        num_attention_heads=v.heads,
        patch_size=v.patch_size,
        image_size=v.image_size,
        hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        ref = CLIPVisionModel(ref_cfg)
    # CLIP's post_layernorm (unused by BLIP-2) has the size of our ln_vision.
    assert count(ours.vision) + count(ours.ln_vision) == count(ref) == 290_583_552
    assert ours.qformer.layers[0].cross_attn.key.in_features == 1024


@pytest.mark.parametrize("name", [n for n, spec in zoo.MODELS.items() if spec.config().lm is None])
def test_tiny_version_forward_backward_round_trip(name, tmp_path):
    spec = zoo.get_spec(name)
    config = zoo.shrink(spec.config())
    assert config.vision.kind == spec.config().vision.kind
    model = Blip2(config)
    if spec.freeze_vision:
        model.freeze_vision()
    model.train()
    b, t = 2, 5
    pixels = torch.randn(b, 3, config.vision.image_size, config.vision.image_size)
    ids = torch.randint(1, config.qformer.vocab_size, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    out = model(pixels, ids, mask, use_cache=True)
    itm = model.itm_logits(out.image_embeds, ids, mask)
    itg = model.itg_logits(ids, out.query_cache, mask).logits
    q = config.num_query_tokens
    assert out.image_feats.shape == (b, q, config.embed_dim) and itm.shape == (b, 2)
    assert itg.shape == (b, t, config.qformer.vocab_size)
    tensors = [out.image_feats, out.text_feat, itm, itg]
    assert all(torch.isfinite(x).all() for x in tensors)
    loss = sum(x.float().square().mean() for x in tensors) + model.itc_logits(out.image_feats, out.text_feat)[0].mean()
    loss.backward()
    for pname, p in model.named_parameters():
        frozen = spec.freeze_vision and pname.startswith("vision.")
        if frozen:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for {pname}"
    # vlkit folder round trip.
    save_pretrained(model, tmp_path / "m", preset=name)
    loaded = load_model(tmp_path / "m")
    a, b_ = model.state_dict(), loaded.state_dict()
    assert a.keys() == b_.keys() and all(torch.equal(a[k], b_[k]) for k in a)
    assert loaded.config == model.config and not loaded.training
