"""VLMo model: configs and parameter counts, expert routing per layer, two-device split, input checks."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

from vlkit.config import from_dict, to_dict
from vlkit.errors import ConfigError
from vlkit.models.vlmo import VLMo, VLMoConfig, VLMoInputError

ALL_HEADS = ("vqa", "nlvr2", "itm", "mlm", "itc")


def _inputs(cfg: VLMoConfig, batch: int = 2, text_len: int | None = None):
    text_len = text_len or cfg.max_text_len
    ids = torch.randint(1, cfg.vocab_size, (batch, text_len))
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, text_len // 2 :] = 0
    ids[0, text_len // 2 :] = 0
    return ids, mask, torch.randn(batch, 3, cfg.image_size, cfg.image_size)


def _model(**overrides) -> VLMo:
    model = VLMo(VLMoConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():  # the reference initialises the table to zeros; make the bias matter
        if model.rel_pos_table is not None:
            model.rel_pos_table.normal_(std=0.5)
    return model


def _formula(h: int, depth: int, start: int, rows_x_cols: int, abs_positions: int, layer_scale: bool) -> int:
    """Parameter count from the spec's key list (A.6) for a model without task heads at 224 px."""
    ffn = 8 * h * h + 5 * h
    block = 2 * h + (3 * h * h + 2 * h) + (h * h + h) + 2 * (2 * h + ffn) + (2 * h if layer_scale else 0)
    vl = 2 * h + ffn
    backbone = depth * block + (depth - start) * vl + h + (3 * 16 * 16 * h + h) + 2 * h
    text = 30522 * h + 40 * h + 2 * h + 2 * h
    return backbone + text + 2 * h + (h * h + h) + rows_x_cols + abs_positions


@pytest.mark.parametrize(
    "name, total, without_positions",
    [
        # Without the resolution-dependent position parameters these are the spec's 175.9M / 562.2M / 166.8M
        # (the README's 175M / 562M / 167M).
        ("base", 176_021_088, 175_858_944),
        ("large", 562_594_048, 562_161_664),
        ("base_plus", 166_863_840, 166_756_672),
    ],
)
def test_preset_parameter_counts_on_meta(name, total, without_positions):
    cfg = VLMoConfig.preset(name)
    model = VLMo(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(position_tables=False) == without_positions
    h, depth = cfg.hidden_size, cfg.depth
    table = cfg.num_bias_rows * cfg.num_heads * depth
    pos = (cfg.grid**2 + 1) * h if cfg.position == "absolute" else 0
    assert total == _formula(h, depth, cfg.vlffn_start_layer, table, pos, cfg.layer_scale_init is not None)
    assert round(without_positions / 1e6, 1) == {"base": 175.9, "large": 562.2, "base_plus": 166.8}[name]


def test_presets_match_the_reference_architectures():
    base, large, plus = (VLMoConfig.preset(n) for n in ("base", "large", "base_plus"))
    assert (base.hidden_size, base.depth, base.num_heads, base.vlffn_start_layer) == (768, 12, 12, 10)
    assert (large.hidden_size, large.depth, large.num_heads, large.vlffn_start_layer) == (1024, 24, 16, 21)
    assert (plus.hidden_size, plus.depth, plus.num_heads, plus.vlffn_start_layer) == (544, 24, 16, 21)
    assert plus.position == "absolute" and plus.layer_scale_init is None and plus.mlp_hidden_size == 2176
    assert VLMoConfig.preset("base", image_size=480).num_bias_rows == 3878
    m = VLMo(VLMoConfig.preset("base_plus"), device="meta")
    assert m.rel_pos_table is None and m.blocks[0].gamma_1 is None and m.pos_embed.shape == (1, 197, 544)


def test_config_validation_and_yaml_round_trip():
    cfg = VLMoConfig.preset("tiny", heads=["vqa", "nlvr2"])
    assert cfg.heads == ("vqa", "nlvr2") and cfg.num_token_types == 3
    assert from_dict(VLMoConfig, to_dict(cfg)) == cfg
    bad = [
        {"max_text_len": 13},  # beyond the table's text rows (T0 = 12)
        {"vlffn_start_layer": 5},
        {"num_heads": 3},
        {"image_size": 36},
        {"heads": ["vqa", "vqa"]},
        {"heads": ["captioning"]},
    ]
    for override in bad:
        with pytest.raises(ConfigError):
            VLMoConfig.preset("tiny", **override)
    with pytest.raises(ConfigError, match="unknown VLMo preset"):
        VLMoConfig.preset("huge")


def _record_routing(model: VLMo):
    """Hook every expert; returns a dict layer -> list of (expert, tokens seen)."""
    calls: dict[int, list[tuple[str, int]]] = defaultdict(list)
    handles = []
    for i, block in enumerate(model.blocks):
        for expert in ("text", "image", "vl"):
            ffn = getattr(block, f"ffn_{expert}")
            if ffn is not None:
                hook = lambda mod, args, out, i=i, e=expert: calls[i].append((e, args[0].shape[1]))  # noqa: E731
                handles.append(ffn.register_forward_hook(hook))
    return calls, handles


def test_routing_per_layer():
    model = _model(heads=("itc",))  # depth 4, VL experts in layers 2 and 3
    cfg = model.config
    assert [b.has_vl_expert for b in model.blocks] == [False, False, True, True]
    ids, mask, img = _inputs(cfg)
    n_text, n_img = cfg.max_text_len, cfg.num_image_tokens
    calls, handles = _record_routing(model)
    with torch.no_grad():
        model(ids, mask, img)
        assert dict(calls) == {
            0: [("text", n_text), ("image", n_img)],
            1: [("text", n_text), ("image", n_img)],
            2: [("vl", n_text + n_img)],
            3: [("vl", n_text + n_img)],
        }
        calls.clear()
        model.encode_text(ids, mask)
        assert dict(calls) == {i: [("text", n_text)] for i in range(4)}
        calls.clear()
        model.encode_image(img)
        assert dict(calls) == {i: [("image", n_img)] for i in range(4)}
        calls.clear()
        model.encode_text(ids, mask, vl_branch=True)  # pretraining VL-ITC: re-run of the top layers via VL
        assert dict(calls) == {
            0: [("text", n_text)],
            1: [("text", n_text)],
            2: [("text", n_text), ("vl", n_text)],
            3: [("text", n_text), ("vl", n_text)],
        }
    for h in handles:
        h.remove()


def test_lower_layers_split_text_and_image_tokens_exactly():
    model = _model()
    cfg = model.config
    ids, mask, img = _inputs(cfg)
    seen = {}
    model.blocks[0].ffn_text.register_forward_hook(lambda m, a, o: seen.__setitem__("text", a[0]))
    model.blocks[0].ffn_image.register_forward_hook(lambda m, a, o: seen.__setitem__("image", a[0]))
    captured = {}
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: captured.__setitem__("attn", o))
    with torch.no_grad():
        model(ids, mask, img)
        block = model.blocks[0]
        x = torch.cat([model.embed_text(ids), model.embed_image(img)], dim=1)
        x = x + block.gamma_1 * captured["attn"]
        torch.testing.assert_close(seen["text"], block.norm_text(x[:, : cfg.max_text_len]))
        torch.testing.assert_close(seen["image"], block.norm_image(x[:, cfg.max_text_len :]))


def test_sdpa_matches_eager():
    model = _model(heads=ALL_HEADS)
    ids, mask, img = _inputs(model.config)
    with torch.no_grad():
        outs = {}
        for impl in ("sdpa", "eager"):
            model.attention_impl = impl
            outs[impl] = (model(ids, mask, img), model.encode_text(ids, mask, vl_branch=True), model.encode_image(img))
        a, b = outs["sdpa"], outs["eager"]
        torch.testing.assert_close(a[0].text_feats, b[0].text_feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[0].image_feats, b[0].image_feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1].cls_vl_feats, b[1].cls_vl_feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[2].feats, b[2].feats, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        model.attention_impl = "flash"


@pytest.mark.parametrize("position", ["relative", "absolute"])
def test_unpadded_text_equals_padded_text(position):
    # The reference always pads to max_text_len (its split point); masked pads never act as keys, so the
    # real tokens and the image get the same features when the text is passed without padding.
    model = _model(position=position, layer_scale_init=None if position == "absolute" else 0.1)
    cfg = model.config
    ids, _, img = _inputs(cfg, batch=1)
    n = 5
    ids[:, n:] = 0
    mask = torch.zeros_like(ids)
    mask[:, :n] = 1
    with torch.no_grad():
        padded = model(ids, mask, img)
        short = model(ids[:, :n], None, img)
        torch.testing.assert_close(short.text_feats, padded.text_feats[:, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(short.image_feats, padded.image_feats, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(short.cls_feats, padded.cls_feats, atol=1e-5, rtol=1e-5)
        t_pad, t_short = model.encode_text(ids, mask), model.encode_text(ids[:, :n])
        torch.testing.assert_close(t_short.feats, t_pad.feats[:, :n], atol=1e-5, rtol=1e-5)


def test_split_devices_identical_outputs():
    model = _model(heads=ALL_HEADS)
    ids, mask, img = _inputs(model.config)
    with torch.no_grad():
        ref = (model.vqa_logits(ids, mask, img), model.nlvr2_logits(ids, mask, img, img.flip(0)))
        ref_t = model.encode_text(ids, mask, vl_branch=True)
        model.split_devices(["cpu", torch.device("cpu")])
        out = (model.vqa_logits(ids, mask, img), model.nlvr2_logits(ids, mask, img, img.flip(0)))
        out_t = model.encode_text(ids, mask, vl_branch=True)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    assert torch.equal(ref_t.cls_vl_feats, out_t.cls_vl_feats)


def test_split_devices_places_parameters_and_moves_activations():
    # "meta" stands in for a second accelerator: a forward only succeeds if every tensor is moved at the
    # boundary (mixing cpu and meta tensors in one op raises), and the outputs end on the last device.
    model = _model(heads=ALL_HEADS, depth=5, vlffn_start_layer=3)
    model.split_devices(["cpu", "meta"])
    first = [model.text_embed, model.patch_embed, model.token_type, *model.blocks[:3]]
    last = [*model.blocks[3:], model.norm, model.pooler, model.vqa_head, model.nlvr2_head, model.mlm_head]
    last += [model.itm_head, model.itc_text_proj, model.itc_image_proj, model.itc_vl_text_proj, model.itc_vl_image_proj]
    assert all(p.device.type == "cpu" for m in first for p in m.parameters())
    assert model.cls_token.device.type == "cpu" and model.rel_pos_table.device.type == "cpu"
    assert all(p.device.type == "meta" for m in last for p in m.parameters())
    assert model.logit_scale.is_meta and model.logit_vl_scale.is_meta
    ids, mask, img = _inputs(model.config)
    with torch.no_grad():
        logits = model.vqa_logits(ids, mask, img)
        assert logits.is_meta and logits.shape == (2, model.config.vqa_num_labels)
        assert model.nlvr2_logits(ids, mask, img, img).shape == (2, 2)
        assert model.encode_text(ids, mask, vl_branch=True).cls_vl_feats.is_meta
        assert model.encode_image(img, vl_branch=True).feats.is_meta
    with pytest.raises(ConfigError):
        model.split_devices(["cpu"] * 6)


def test_backward_reaches_every_parameter_used():
    model = _model(heads=ALL_HEADS).train()
    cfg = model.config
    ids, mask, img = _inputs(cfg)
    fused = model(ids, mask, img)
    loss = model.vqa_head(fused.cls_feats).sum() + model.itm_logits(fused.cls_feats).sum()
    loss = loss + model.mlm_logits(fused.text_feats).sum() + model.nlvr2_logits(ids, mask, img, img).sum()
    t, i = model.encode_text(ids, mask, vl_branch=True), model.encode_image(img, vl_branch=True)
    loss = loss + (t.cls_feats * i.cls_feats).sum() + (t.cls_vl_feats * i.cls_vl_feats).sum()
    loss.backward()
    # Unused by design: relative models never add text positions; logit scales belong to the losses.
    unused = {"text_embed.position.weight", "logit_scale", "logit_vl_scale"}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert no_grad == []
    assert model.text_embed.position.weight.grad is None


def test_drop_path_only_in_training():
    model = _model(drop_path_rate=0.5)
    ids, mask, img = _inputs(model.config)
    with torch.no_grad():
        a, b = model(ids, mask, img).cls_feats, model(ids, mask, img).cls_feats
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(1)
        c = model(ids, mask, img).cls_feats
        assert not torch.allclose(a, c)
    rates = [b.drop_path_rate for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)


def test_input_errors_are_clear():
    model = _model()
    cfg = model.config
    ids, mask, img = _inputs(cfg)
    with pytest.raises(VLMoInputError, match="32, 32"):
        model(ids, mask, torch.randn(2, 3, 48, 48))
    with pytest.raises(VLMoInputError, match="length"):
        model(torch.ones(2, cfg.max_text_len + 1, dtype=torch.long), None, img)
    with pytest.raises(VLMoInputError, match="mask"):
        model(ids, mask[:, :3], img)
    with pytest.raises(VLMoInputError, match="batch"):
        model(ids, mask, img[:1])
    with pytest.raises(VLMoInputError, match="token type"):
        model(ids, mask, img, image_token_type=2)  # no NLVR2 head -> only 2 token types
    with pytest.raises(ConfigError, match="vqa_head"):
        model.vqa_logits(ids, mask, img)
    with pytest.raises(ConfigError, match="itc"):
        model.encode_text(ids, mask, vl_branch=True)


def test_reference_initialisation():
    model = VLMo(VLMoConfig.preset("tiny", heads=("itc", "mlm")))
    assert torch.all(model.rel_pos_table == 0)
    assert torch.all(model.blocks[1].gamma_2 == 0.1) and torch.all(model.blocks[0].attn.q_bias == 0)
    assert model.logit_scale.item() == pytest.approx(2.6592600)
    assert model.text_embed.norm.eps == 1e-12 and model.norm.eps == 1e-6 and model.mlm_head.norm.eps == 1e-12
    assert model.blocks[0].attn.qkv.bias is None and model.itc_text_proj.bias is None
    assert model.mlm_head.decoder.bias is None and torch.all(model.mlm_head.bias == 0)


@pytest.mark.gpu
def test_cuda_split_and_bf16():
    model = _model(heads=("vqa",))
    ids, mask, img = _inputs(model.config)
    with torch.no_grad():
        ref = model.vqa_logits(ids, mask, img)
        model.split_devices(["cuda:0", "cpu"])
        torch.testing.assert_close(model.vqa_logits(ids, mask, img), ref, atol=1e-4, rtol=1e-4)
        model.split_devices(["cuda:0", "cuda:0"]).to(torch.bfloat16)
        for impl in ("sdpa", "eager"):
            model.attention_impl = impl
            out = model.vqa_logits(ids.cuda(), mask.cuda(), img.cuda())
            torch.testing.assert_close(out.float().cpu(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("stem", ["conv", "conv+patch"])
def test_conv_stem_option(tmp_path, stem):
    from vlkit.checkpoints.folder import load_model, save_pretrained
    from vlkit.checkpoints.unilm import export_unilm_state_dict
    from vlkit.layers.vit import ConvStem

    torch.manual_seed(0)
    model = _model(heads=("vqa",), stem=stem, patch_size=8, image_size=32, max_text_len=8).train()
    assert (model.patch_embed.shortcut is not None) == (stem == "conv+patch")
    assert isinstance(model.patch_embed, ConvStem) and from_dict(VLMoConfig, to_dict(model.config)) == model.config
    ids, mask, img = _inputs(model.config)
    model.vqa_head(model(ids, mask, img).cls_feats).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_embed.parameters())
    model.eval()
    loaded = load_model(save_pretrained(model, tmp_path / "folder"))
    assert isinstance(loaded.patch_embed, ConvStem)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, img).cls_feats, model(ids, mask, img).cls_feats)
    with pytest.raises(ConfigError, match=re.escape(f"a {stem} stem cannot be exported")):
        export_unilm_state_dict(model)
    with pytest.raises(ConfigError, match="power-of-two"):
        VLMoConfig.preset("tiny", stem="conv", patch_size=6, image_size=36)
