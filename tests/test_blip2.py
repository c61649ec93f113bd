"""Blip2 model: feature/logit API, heads, freezing, attention paths, dtype/device construction."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vlkit import zoo
from vlkit.config import from_dict, to_dict
from vlkit.errors import ConfigError
from vlkit.models.blip2 import DEC_TOKEN_ID, Blip2, Blip2Config
from vlkit.models.qformer import QFormerConfig


@pytest.fixture
def model():
    return Blip2(zoo.get_spec("tiny-blip2-eva").config()).eval()


def _batch(b: int = 3, t: int = 7):
    pixels = torch.randn(b, 3, 32, 32)
    ids = torch.randint(1, 30000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, -3:] = 0
    return pixels, ids, mask


def test_config_round_trip_and_validation():
    cfg = zoo.get_spec("tiny-blip2-clip").config()
    assert from_dict(Blip2Config, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="encoder_width"):
        dataclasses.replace(cfg, qformer=dataclasses.replace(cfg.qformer, encoder_width=48))
    with pytest.raises(ConfigError, match="text input"):
        dataclasses.replace(cfg, qformer=QFormerConfig(encoder_width=32, text_input=False, lm_head=False))
    with pytest.raises(ConfigError, match="lm"):
        from_dict(Blip2Config, {**to_dict(cfg), "lm": {"name": "opt"}})


def test_forward_features(model):
    pixels, ids, mask = _batch()
    with torch.no_grad():
        out = model(pixels, ids, mask, use_cache=True)
    assert out.image_embeds.shape == (3, 17, 32)
    assert out.query_output.shape == (3, 4, 32) and out.image_feats.shape == (3, 4, 16)
    assert out.text_output.shape == (3, 7, 32) and out.text_feat.shape == (3, 16)
    torch.testing.assert_close(out.image_feats.norm(dim=-1), torch.ones(3, 4))
    torch.testing.assert_close(out.text_feat.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_feat, F.normalize(model.text_proj(out.text_output[:, 0]), dim=-1))
    assert out.query_cache.query_len == 4
    images_only = model(pixels)
    assert images_only.text_feat is None and images_only.query_cache is None


def test_itc_similarity_and_logits(model):
    image_feats = F.normalize(torch.randn(3, 4, 16), dim=-1)
    text_feats = F.normalize(torch.randn(5, 16), dim=-1)
    sim = model.itc_similarity(image_feats, text_feats)
    brute = torch.stack([torch.stack([(image_feats[i] @ text_feats[j]).max() for j in range(5)]) for i in range(3)])
    torch.testing.assert_close(sim, brute)
    with torch.no_grad():
        model.temp.fill_(0.5)
    i2t, t2i = model.itc_logits(image_feats, text_feats)
    torch.testing.assert_close(i2t, brute / 0.5)
    torch.testing.assert_close(t2i, brute.t() / 0.5)
    assert Blip2(zoo.get_spec("tiny-blip2-eva").config()).temp.item() == pytest.approx(0.07)


def test_itm_logits_average_the_head_over_queries(model):
    pixels, ids, mask = _batch()
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        logits = model.itm_logits(embeds, ids, mask)
        mm = model.encode_multimodal(embeds, ids, mask)
    assert logits.shape == (3, 2) and mm.shape == (3, 4, 32)
    torch.testing.assert_close(logits, model.itm_head(mm).mean(dim=1))
    # Bi-directional: the matching depends on the text.
    with torch.no_grad():
        other = model.itm_logits(embeds, ids.flip(0), mask.flip(0))
    assert (other - logits).abs().max() > 1e-4


def test_itg_logits_over_cached_queries(model):
    pixels, ids, mask = _batch()
    dec = ids.clone()
    dec[:, 0] = DEC_TOKEN_ID
    with torch.no_grad():
        embeds = model.encode_image(pixels)
        q = model.encode_queries(embeds, use_cache=True)
        out = model.itg_logits(dec, q.cache, mask)
        assert out.logits.shape == (3, 7, model.config.qformer.vocab_size) and out.cache is None
        # Same as the joint multimodal-causal sequence over [queries; text].
        queries = model.query_tokens.expand(3, -1, -1)
        joint = model.qformer(queries, dec, mask, embeds, causal=True)
        torch.testing.assert_close(out.logits, model.qformer.lm_logits(joint.text_output), atol=1e-5, rtol=0)
        # Logits at t do not depend on tokens after t.
        changed = dec.clone()
        changed[:, 4:] = 1
        torch.testing.assert_close(model.itg_logits(changed, q.cache, mask).logits[:, :4], out.logits[:, :4])
        step = model.itg_logits(dec[:, :1], q.cache, use_cache=True)
        assert step.cache.text_len == 1


def test_freeze_vision(model):
    model.freeze_vision()
    assert model.vision_frozen
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("vision."))
    model.train()
    assert model.training and not model.vision.training and model.qformer.training
    model.freeze_vision(False)
    assert all(p.requires_grad for p in model.vision.parameters()) and model.vision.training
    # Backward reaches ln_vision but not the frozen ViT.
    model.freeze_vision()
    pixels, ids, mask = _batch()
    out = model(pixels, ids, mask)
    (out.image_feats.sum() + out.text_feat.sum()).backward()
    assert model.ln_vision.weight.grad is not None and model.query_tokens.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 8e-2)])
def test_sdpa_and_eager_agree_end_to_end(dtype, atol):
    model = Blip2(zoo.get_spec("tiny-blip2-eva").config(), dtype=dtype).eval()
    pixels, ids, mask = _batch()

    def run():
        with torch.no_grad():
            e = model.encode_image(pixels)
            q = model.encode_queries(e, use_cache=True)
            return [
                model.project_image(q.query_output),
                model.project_text(model.encode_text(ids, mask)),
                model.itm_logits(e, ids, mask),
                model.itg_logits(ids, q.cache, mask).logits,
            ]

    fast = run()
    model.set_attn_impl("eager")
    assert model.config.qformer.attn_impl == "eager" and model.vision.blocks[0].attn.attn_impl == "eager"
    for a, b in zip(fast, run()):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def test_device_and_dtype_construction():
    cfg = zoo.get_spec("tiny-blip2-clip").config()
    meta = Blip2(cfg, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    bf16 = Blip2(cfg, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    pixels, ids, mask = _batch()
    with torch.no_grad():
        assert bf16(pixels, ids, mask).text_feat.dtype == torch.bfloat16


def test_models_without_heads_refuse_head_calls():
    cfg = zoo.get_spec("tiny-blip2-eva").config()
    cfg = dataclasses.replace(
        cfg, itc_itm_heads=False, qformer=dataclasses.replace(cfg.qformer, text_input=False, lm_head=False)
    )
    model = Blip2(cfg)
    assert "temp" not in model.state_dict() and "vision_proj.weight" not in model.state_dict()
    with torch.no_grad():
        q = model.encode_queries(model.encode_image(torch.randn(1, 3, 32, 32)))
    assert q.query_output.shape == (1, 4, 32)
    with pytest.raises(ConfigError, match="vision_proj"):
        model.project_image(q.query_output)


def test_bf16_vision_with_fp32_qformer(model):
    """The reference's mixed precision: a half-precision frozen ViT, fp32 LayerNorm math, fp32 Q-Former."""
    pixels, ids, mask = _batch()
    with torch.no_grad():
        ref = model.project_image(model.encode_queries(model.encode_image(pixels)).query_output)
        model.vision.to(torch.bfloat16)
        embeds = model.encode_image(pixels)
        assert embeds.dtype == torch.bfloat16 and model.ln_vision.weight.dtype == torch.float32
        got = model.project_image(model.encode_queries(embeds).query_output)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_sdpa_matches_eager(dtype):
    model = Blip2(zoo.get_spec("tiny-blip2-eva").config(), device="cuda", dtype=dtype).eval()
    pixels, ids, mask = (t.cuda() for t in _batch())
    with torch.no_grad():
        e = model.encode_image(pixels)
        fast = [model.itm_logits(e, ids, mask), model.project_text(model.encode_text(ids, mask))]
        model.set_attn_impl("eager")
        ref = [model.itm_logits(e, ids, mask), model.project_text(model.encode_text(ids, mask))]
    for a, b in zip(fast, ref):
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=0)
