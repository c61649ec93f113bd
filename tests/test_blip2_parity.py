"""Parity with transformers' BLIP-2 on tiny random models, through the real converters (acceptance core).

Max abs differences are printed (``pytest -s``) so the issue note can quote them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from blip2_reference import hf_config, randomize

from vlkit.checkpoints import hf as hfconv
from vlkit.checkpoints.folder import load_model
from vlkit.cli import main as cli
from vlkit.errors import CheckpointError, ConfigError
from vlkit.models.blip2 import Blip2

pytestmark = pytest.mark.parity
ATOL = 1e-4


def _inputs(batch: int = 3, length: int = 7, vocab: int = 99, image_size: int = 32):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0  # one padded row
    ids[1, length - 3 :] = 0
    return pixels, ids, mask


def _hf_retrieval(tmp_path, seed: int = 0, **kw):
    from transformers import Blip2ForImageTextRetrieval

    model = Blip2ForImageTextRetrieval(hf_config(**kw)).eval()
    randomize(model, seed=seed)
    model.save_pretrained(tmp_path / "hf")
    return model


def _report(name: str, diffs: dict[str, float]) -> None:
    print(f"\n[parity] {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cross_freq": 1, "layers": 3, "intermediate": 45, "queries": 5},
        {"cross_freq": 3, "layers": 4, "vision_layers": 3, "image_size": 30, "patch_size": 6, "vision_heads": 2},
    ],
    ids=["default", "cross-every-layer", "cross-every-3rd"],
)
def test_retrieval_model_parity(tmp_path, kw):
    ref = _hf_retrieval(tmp_path, **kw)
    # The key third of transformers' fused qkv bias is a real parameter; randomize() made it non-zero.
    key_bias = ref.vision_model.encoder.layers[0].self_attn.qkv.bias[ref.config.vision_config.hidden_size :][:32]
    assert key_bias.abs().sum() > 0
    ours = load_model(tmp_path / "hf")
    assert isinstance(ours, Blip2) and ours.config.ln_vision_eps == 1e-6 and not ours.config.qformer.lm_head
    pixels, ids, mask = _inputs(image_size=ref.config.vision_config.image_size)
    with torch.no_grad():
        itm = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        hf_vision = ref.vision_model(pixel_values=pixels).last_hidden_state
        image_embeds = ours.encode_image(pixels)
        image_feats = ours.project_image(ours.encode_queries(image_embeds).query_output)
        text_feat = ours.project_text(ours.encode_text(ids, mask))
        sim = ours.itc_similarity(image_feats, text_feat)
        logits = ours.itm_logits(image_embeds, ids, mask)
    pairs = {
        "vision": (image_embeds, hf_vision),
        "itm_logits": (logits, itm.logits_per_image),
        "itc_sim": (sim, itc.logits_per_image),
        "image_feats": (image_feats, itc.image_embeds),
        "text_feat": (text_feat, itc.text_embeds),
    }
    diffs = {}
    for name, (a, b) in pairs.items():
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)
        diffs[name] = (a - b).abs().max().item()
    _report(f"Blip2ForImageTextRetrieval {kw or 'default'}", diffs)


def test_blip2model_qformer_parity_and_lm_handling(tmp_path):
    from transformers import Blip2Model

    ref = Blip2Model(hf_config(text_input=False, cross_freq=1, layers=3)).eval()
    randomize(ref, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="drop_lm=True"):
        load_model(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", drop_lm=True)
    assert ours.qformer.word_embed is None and ours.vision_proj is None and ours.qformer.layers[0].text_ffn is None
    pixels, _, _ = _inputs()
    with torch.no_grad():
        expected = ref.get_qformer_features(pixel_values=pixels)
        got = ours.encode_queries(ours.encode_image(pixels)).query_output
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    _report("Blip2Model Q-Former", {"query_output": (got - expected).abs().max().item()})
    # The LLM bridge's tensors come back untouched for stage 2.
    ckpt = hfconv.load_hf_folder(tmp_path / "hf")
    assert ckpt.architecture == "Blip2Model"
    saved = hfconv.read_hf_weights(tmp_path / "hf")
    assert ckpt.lm_state_dict and set(ckpt.lm_state_dict) == {k for k in saved if k.startswith("language_")}
    # The CLI does the same conversion.
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--drop-lm"]) == 0
    converted = load_model(tmp_path / "out").state_dict()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in converted.items())


def test_key_bias_is_dropped_because_softmax_cancels_it(tmp_path):
    ref = _hf_retrieval(tmp_path, seed=5)
    ours = load_model(tmp_path / "hf")
    pixels, _, _ = _inputs()
    with torch.no_grad():
        # Push the key bias far from zero: transformers' outputs must not move, and ours (without it) match.
        for layer in ref.vision_model.encoder.layers:
            w = layer.self_attn.qkv.bias.shape[0] // 3
            layer.self_attn.qkv.bias[w : 2 * w] = 5.0
        torch.testing.assert_close(
            ours.encode_image(pixels), ref.vision_model(pixel_values=pixels).last_hidden_state, atol=ATOL, rtol=0
        )


def test_ln_vision_eps_difference_is_real_and_configurable(tmp_path):
    """transformers' post_layernorm uses the ViT eps (1e-6); LAVIS's ln_vision 1e-5. Import keeps the source's."""
    _hf_retrieval(tmp_path, seed=7)
    ours = load_model(tmp_path / "hf")
    assert ours.ln_vision.eps == 1e-6
    # On low-variance inputs the two eps values give visibly different outputs.
    x = torch.randn(2, 5, 32) * 1e-3
    with torch.no_grad():
        a = ours.ln_vision(x)
        ours.ln_vision.eps = 1e-5
        b = ours.ln_vision(x)
    assert (a - b).abs().max() > 1e-2


def test_round_trips_ours_hf_ours_and_hf_ours_hf(tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    ref = _hf_retrieval(tmp_path, seed=11)
    ours = load_model(tmp_path / "hf")
    # ours -> transformers folder -> ours: bit-exact state dict and config.
    hfconv.save_hf_folder(ours, tmp_path / "back")
    again = load_model(tmp_path / "back")
    assert again.config == ours.config
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # transformers loads our export and computes the same numbers.
    exported = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back").eval()
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        x = exported(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        y = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(x.logits_per_image, y.logits_per_image, atol=ATOL, rtol=0)
    # transformers -> ours -> transformers: every tensor equal except the key third of qkv.bias (now zero).
    theirs = ref.state_dict()
    out = hfconv.to_hf_state_dict(ours.state_dict())
    assert out.keys() == theirs.keys()
    for key, value in out.items():
        if key.endswith("self_attn.qkv.bias"):
            w = value.shape[0] // 3
            assert torch.equal(value[:w], theirs[key][:w]) and torch.equal(value[2 * w :], theirs[key][2 * w :])
            assert torch.all(value[w : 2 * w] == 0)
        else:
            assert torch.equal(value, theirs[key]), key


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    from vlkit import zoo

    clip = Blip2(zoo.get_spec("tiny-blip2-clip").config())
    with pytest.raises(ConfigError, match="CLIP"):
        hfconv.config_to_hf(clip.config)
    eva_config = zoo.get_spec("tiny-blip2-eva").config()
    with pytest.raises(ConfigError, match="conv stem"):
        hfconv.config_to_hf(dataclasses.replace(eva_config, vision=dataclasses.replace(eva_config.vision, stem="conv")))
    eva = Blip2(eva_config)  # LAVIS eps: ln_vision 1e-5, ViT 1e-6
    with pytest.raises(ConfigError, match="allow_eps_change"):
        hfconv.save_hf_folder(eva, tmp_path / "x")
    hfconv.save_hf_folder(eva, tmp_path / "x", allow_eps_change=True)
    written = json.loads((tmp_path / "x" / "config.json").read_text())
    assert written["vision_config"]["layer_norm_eps"] == 1e-6 and written["architectures"] == [hfconv.RETRIEVAL]


def test_unknown_hf_key_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_retrieval(tmp_path)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["qformer.encoder.layer.0.surprise.weight"] = torch.ones(2)
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="surprise"):
        load_model(tmp_path / "hf")


def test_sharded_hf_folder(tmp_path):
    ref = _hf_retrieval(tmp_path, seed=2)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a, b = load_model(tmp_path / "hf").state_dict(), load_model(tmp_path / "sharded").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
