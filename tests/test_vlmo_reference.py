"""VLMo parity against the reference's rules, written out independently of vlkit's code.

No package ships unilm's VLMo, so this file carries a small functional re-statement of the reference
forward passes (vlmo-spec.md Part A: ``Attention``/``Block`` of multiway_transformer.py, ``BertEmbeddings``
as configured by vlmo_module.py, the index matrices of ``build_relative_position_embed`` and the ``infer*``
methods) that runs straight on a state dict in the unilm key layout. Random state dicts in that layout are
loaded into vlkit's model through the real converter and both are compared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlkit.checkpoints.unilm import load_unilm
from vlkit.models.vlmo import VLMo, VLMoConfig

# ------------------------------------------------------------------------ unilm-layout state dicts


def unilm_keys(cfg: VLMoConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a reference ``VLMo`` module's state dict (spec A.6), including the released buffers."""
    h, d, ff = cfg.hidden_size, cfg.depth, int(cfg.hidden_size * cfg.mlp_ratio)
    p = cfg.image_size // cfg.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "transformer.cls_token": (1, 1, h),
        "transformer.patch_embed.proj.weight": (h, 3, cfg.patch_size, cfg.patch_size),
        "transformer.patch_embed.proj.bias": (h,),
        "transformer.norm.weight": (h,),
        "transformer.norm.bias": (h,),
        "text_embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "text_embeddings.position_embeddings.weight": (cfg.max_text_len, h),
        "text_embeddings.token_type_embeddings.weight": (2, h),
        "text_embeddings.LayerNorm.weight": (h,),
        "text_embeddings.LayerNorm.bias": (h,),
        "text_embeddings.position_ids": (1, cfg.max_text_len),
        "token_type_embeddings.weight": (3 if "nlvr2" in cfg.heads else 2, h),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    if cfg.position == "absolute":
        keys["transformer.pos_embed"] = (1, p * p + 1, h)
    else:
        rows = (2 * p - 1) ** 2 + 3 + 2 * cfg.max_text_len_of_initckpt + 2
        keys["relative_position_bias_table"] = (rows, cfg.num_heads * d)
        keys["relative_position_index"] = (p * p + 1, p * p + 1)
        keys["text_relative_position_index"] = (cfg.max_text_len, cfg.max_text_len)
        n = cfg.max_text_len + p * p + 1
        keys["text_imag_relative_position_index"] = (n, n)
    for i in range(d):
        b = f"transformer.blocks.{i}."
        if cfg.layer_scale_init is not None:
            keys[b + "gamma_1"] = (h,)
            keys[b + "gamma_2"] = (h,)
        keys.update({b + "norm1.weight": (h,), b + "norm1.bias": (h,)})
        keys.update({b + "attn.q_bias": (h,), b + "attn.v_bias": (h,), b + "attn.qkv.weight": (3 * h, h)})
        keys.update({b + "attn.proj.weight": (h, h), b + "attn.proj.bias": (h,)})
        experts = ["text", "imag"] + (["vl"] if i >= cfg.vlffn_start_layer else [])
        for e in experts:
            keys.update({f"{b}norm2_{e}.weight": (h,), f"{b}norm2_{e}.bias": (h,)})
            keys.update({f"{b}mlp_{e}.fc1.weight": (ff, h), f"{b}mlp_{e}.fc1.bias": (ff,)})
            keys.update({f"{b}mlp_{e}.fc2.weight": (h, ff), f"{b}mlp_{e}.fc2.bias": (h,)})
    heads = set(cfg.heads)
    if "mlm" in heads:
        keys.update({"mlm_score.transform.dense.weight": (h, h), "mlm_score.transform.dense.bias": (h,)})
        keys.update({"mlm_score.transform.LayerNorm.weight": (h,), "mlm_score.transform.LayerNorm.bias": (h,)})
        keys.update({"mlm_score.decoder.weight": (cfg.vocab_size, h), "mlm_score.bias": (cfg.vocab_size,)})
    if "itm" in heads:
        keys.update({"itm_score.fc.weight": (2, h), "itm_score.fc.bias": (2,)})
    if heads & {"itc", "irtr"}:
        keys.update({"itc_text_proj.fc.weight": (h, h), "itc_image_proj.fc.weight": (h, h), "logit_scale": ()})
    if "itc" in heads:
        keys.update({"itc_vl_text_proj.fc.weight": (h, h), "itc_vl_image_proj.fc.weight": (h, h)})
        keys["logit_vl_scale"] = ()
    for name, din, dout in (("vqa_classifier", h, cfg.vqa_num_labels), ("nlvr2_classifier", 2 * h, 2)):
        if name.split("_")[0] in heads:
            keys.update({f"{name}.0.weight": (2 * h, din), f"{name}.0.bias": (2 * h,)})
            keys.update({f"{name}.1.weight": (2 * h,), f"{name}.1.bias": (2 * h,)})
            keys.update({f"{name}.3.weight": (dout, 2 * h), f"{name}.3.bias": (dout,)})
    return keys


def random_unilm_state_dict(cfg: VLMoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the unilm layout; index buffers hold garbage (they must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in unilm_keys(cfg).items():
        if key.endswith("index") or key.endswith("position_ids"):
            sd[key] = torch.randint(0, 5, shape, generator=g)
        elif "LayerNorm.weight" in key or ".norm" in key and key.endswith("weight") or key.endswith(".1.weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.startswith("relative_position_bias_table"):
            sd[key] = torch.randn(shape, generator=g)
        elif key.endswith("gamma_1") or key.endswith("gamma_2"):
            sd[key] = 0.5 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.05 * torch.randn(shape, generator=g)
    return sd


# ------------------------------------------------------------------------- the reference, restated


def ref_indices(cfg: VLMoConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, text, fusion) index matrices, built step by step as ``build_relative_position_embed`` does."""
    p = cfg.image_size // cfg.patch_size
    t0, lt = cfg.max_text_len_of_initckpt, cfg.max_text_len
    nrd = (2 * p - 1) ** 2 + 3
    all_nrd = nrd + 2 * t0 + 2
    coords = torch.stack(torch.meshgrid([torch.arange(p), torch.arange(p)], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += p - 1
    rel[:, :, 1] += p - 1
    rel[:, :, 0] *= 2 * p - 1
    img = torch.zeros((p * p + 1,) * 2, dtype=torch.long)
    img[1:, 1:] = rel.sum(-1)
    img[0, 0:] = nrd - 3
    img[0:, 0] = nrd - 2
    img[0, 0] = nrd - 1
    ids = torch.arange(lt - 1)
    mat = ids.unsqueeze(-2) - ids.unsqueeze(-1) - (2 - t0) + nrd + 2
    txt = torch.zeros((lt, lt), dtype=torch.long)
    txt[1:, 1:] = mat
    txt[0, 0:] = all_nrd - 3
    txt[0:, 0] = all_nrd - 2
    txt[0, 0] = all_nrd - 1
    t2i = torch.ones(lt, p * p + 1) * nrd
    i2t = torch.ones(p * p + 1, lt) * (nrd + 1)
    fused = torch.cat([torch.cat([txt, t2i], 1), torch.cat([i2t, img], 1)], 0)  # float, as in the reference
    return img, txt, fused


def ref_biases(sd, cfg, index):
    if "relative_position_bias_table" not in sd:
        return [None] * cfg.depth
    b = F.embedding(index.long(), sd["relative_position_bias_table"]).permute(2, 0, 1).contiguous()
    return torch.chunk(b, cfg.depth, dim=0)


def ref_block(sd, cfg, i, x, mask, modality, bias):
    b = f"transformer.blocks.{i}."
    bsz, n, c = x.shape
    nh = cfg.num_heads

    def ln(t, name):
        return F.layer_norm(t, (c,), sd[b + name + ".weight"], sd[b + name + ".bias"], 1e-6)

    def mlp(t, e):
        t = F.gelu(F.linear(t, sd[f"{b}mlp_{e}.fc1.weight"], sd[f"{b}mlp_{e}.fc1.bias"]))
        return F.linear(t, sd[f"{b}mlp_{e}.fc2.weight"], sd[f"{b}mlp_{e}.fc2.bias"])

    g1, g2 = sd.get(b + "gamma_1", 1.0), sd.get(b + "gamma_2", 1.0)
    h = ln(x, "norm1")
    qkv_bias = torch.cat((sd[b + "attn.q_bias"], torch.zeros_like(sd[b + "attn.v_bias"]), sd[b + "attn.v_bias"]))
    qkv = F.linear(h, sd[b + "attn.qkv.weight"], qkv_bias).reshape(bsz, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // nh) ** -0.5, qkv[1], qkv[2]
    attn = q.float() @ k.float().transpose(-2, -1)
    if bias is not None:
        attn = attn + bias.unsqueeze(0)
    if mask is not None:
        attn = attn.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    attn = attn.softmax(dim=-1).type_as(x)
    out = F.linear((attn @ v).transpose(1, 2).reshape(bsz, n, c), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
    x = x + g1 * out
    if modality == "image":
        return x + g2 * mlp(ln(x, "norm2_imag"), "imag")
    if modality == "text":
        return x + g2 * mlp(ln(x, "norm2_text"), "text")
    if b + "mlp_vl.fc1.weight" not in sd:
        lt = cfg.max_text_len  # the fixed split point
        xt, xi = x[:, :lt], x[:, lt:]
        xt = xt + g2 * mlp(ln(xt, "norm2_text"), "text")
        xi = xi + g2 * mlp(ln(xi, "norm2_imag"), "imag")
        return torch.cat([xt, xi], dim=1)
    return x + g2 * mlp(ln(x, "norm2_vl"), "vl")


def ref_text_embed(sd, cfg, ids):
    h = cfg.hidden_size
    x = F.embedding(ids, sd["text_embeddings.word_embeddings.weight"])
    x = x + sd["text_embeddings.token_type_embeddings.weight"][0]
    if cfg.position == "absolute":  # BertEmbeddings adds positions only for "absolute"
        x = x + sd["text_embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = F.layer_norm(x, (h,), sd["text_embeddings.LayerNorm.weight"], sd["text_embeddings.LayerNorm.bias"], 1e-12)
    return x + sd["token_type_embeddings.weight"][0]


def ref_image_embed(sd, cfg, img, token_type=1):
    x = F.conv2d(
        img, sd["transformer.patch_embed.proj.weight"], sd["transformer.patch_embed.proj.bias"], stride=cfg.patch_size
    )
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["transformer.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    if "transformer.pos_embed" in sd:
        x = x + sd["transformer.pos_embed"]
    return x + sd["token_type_embeddings.weight"][token_type]


def ref_norm(sd, cfg, x):
    return F.layer_norm(x, (cfg.hidden_size,), sd["transformer.norm.weight"], sd["transformer.norm.bias"], 1e-6)


def ref_infer(sd, cfg, ids, mask, img, token_type=1):
    """``infer``: fused pass -> (text_feats, image_feats, cls_feats)."""
    te, ie = ref_text_embed(sd, cfg, ids), ref_image_embed(sd, cfg, img, token_type)
    x = torch.cat([te, ie], dim=1)
    co_mask = torch.cat([mask, torch.ones(ie.shape[:2], dtype=mask.dtype)], dim=1)
    biases = ref_biases(sd, cfg, ref_indices(cfg)[2])
    for i in range(cfg.depth):
        x = ref_block(sd, cfg, i, x, co_mask, "vl", biases[i])
    x = ref_norm(sd, cfg, x)
    cls = torch.tanh(F.linear(x[:, 0], sd["pooler.dense.weight"], sd["pooler.dense.bias"]))
    return x[:, : ids.shape[1]], x[:, ids.shape[1] :], cls


def ref_unimodal(sd, cfg, x, mask, modality, index, proj, vl_proj):
    """``infer_text``/``infer_image`` (and their ``_ft`` variants when ``vl_proj`` is None)."""
    biases = ref_biases(sd, cfg, index)
    hidden = []
    for i in range(cfg.depth):
        x = ref_block(sd, cfg, i, x, mask, modality, biases[i])
        hidden.append(x)
    feats = ref_norm(sd, cfg, hidden[-1])
    cls = F.normalize(F.linear(feats[:, 0], sd[proj]), dim=-1) if proj in sd else None
    cls_vl = None
    if vl_proj is not None:
        h = hidden[cfg.vlffn_start_layer - 1]
        for i in range(cfg.vlffn_start_layer, cfg.depth):
            h = ref_block(sd, cfg, i, h, mask, "vl", biases[i])
        cls_vl = F.normalize(F.linear(ref_norm(sd, cfg, h)[:, 0], sd[vl_proj]), dim=-1)
    return feats, cls, cls_vl


def ref_classifier(sd, name, x, n_hidden):
    x = F.linear(x, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"])
    x = F.gelu(F.layer_norm(x, (n_hidden,), sd[f"{name}.1.weight"], sd[f"{name}.1.bias"], 1e-5))
    return F.linear(x, sd[f"{name}.3.weight"], sd[f"{name}.3.bias"])


# ------------------------------------------------------------------------------------------ tests

CONFIGS = {
    "relative": VLMoConfig.preset("tiny", heads=("vqa", "itc", "mlm", "itm")),
    "absolute": VLMoConfig.preset(
        "tiny", position="absolute", layer_scale_init=None, depth=3, vlffn_start_layer=2, heads=("nlvr2", "irtr")
    ),
    "three_heads_odd": VLMoConfig.preset(
        "tiny", hidden_size=24, num_heads=3, depth=3, vlffn_start_layer=1, image_size=40, heads=("vqa", "irtr")
    ),
}


def _inputs(cfg: VLMoConfig, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lt = cfg.max_text_len
    ids = torch.randint(1, cfg.vocab_size, (batch, lt), generator=g)
    mask = torch.ones(batch, lt, dtype=torch.long)
    for b in range(batch):  # [CLS] ... [SEP] [PAD]...
        n = max(2, lt - 2 * b)
        ids[b, n:] = 0
        mask[b, n:] = 0
    img = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return ids, mask, img


def _loaded(cfg: VLMoConfig, impl: str = "sdpa"):
    sd = random_unilm_state_dict(cfg)
    model = VLMo(cfg).eval()
    load_unilm(model, sd)
    model.attention_impl = impl
    return sd, model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fusion_and_heads_match_reference(name, impl):
    cfg = CONFIGS[name]
    sd, model = _loaded(cfg, impl)
    ids, mask, img = _inputs(cfg)
    with torch.no_grad():
        out = model(ids, mask, img)
        text_ref, image_ref, cls_ref = ref_infer(sd, cfg, ids, mask, img)
        torch.testing.assert_close(out.text_feats, text_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.image_feats, image_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.cls_feats, cls_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.raw_cls_feats, text_ref[:, 0])
        if "vqa" in cfg.heads:
            vqa_ref = ref_classifier(sd, "vqa_classifier", cls_ref, 2 * cfg.hidden_size)
            torch.testing.assert_close(model.vqa_logits(ids, mask, img), vqa_ref, atol=2e-5, rtol=1e-4)
        if "nlvr2" in cfg.heads:
            img2 = img.flip(0)
            cls2 = ref_infer(sd, cfg, ids, mask, img2, token_type=2)[2]
            nlvr2_ref = ref_classifier(sd, "nlvr2_classifier", torch.cat([cls_ref, cls2], -1), 2 * cfg.hidden_size)
            torch.testing.assert_close(model.nlvr2_logits(ids, mask, img, img2), nlvr2_ref, atol=2e-5, rtol=1e-4)
        if "itm" in cfg.heads:
            itm_ref = F.linear(cls_ref, sd["itm_score.fc.weight"], sd["itm_score.fc.bias"])
            torch.testing.assert_close(model.itm_logits(out.cls_feats), itm_ref, atol=2e-5, rtol=1e-4)
        if "mlm" in cfg.heads:
            t = F.linear(text_ref, sd["mlm_score.transform.dense.weight"], sd["mlm_score.transform.dense.bias"])
            t = F.layer_norm(
                F.gelu(t), (cfg.hidden_size,), sd["mlm_score.transform.LayerNorm.weight"],
                sd["mlm_score.transform.LayerNorm.bias"], 1e-12,
            )  # fmt: skip
            mlm_ref = F.linear(t, sd["mlm_score.decoder.weight"]) + sd["mlm_score.bias"]
            torch.testing.assert_close(model.mlm_logits(out.text_feats), mlm_ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unimodal_passes_match_reference(name):
    cfg = CONFIGS[name]
    sd, model = _loaded(cfg)
    ids, mask, img = _inputs(cfg)
    img_idx, txt_idx, _ = ref_indices(cfg)
    vl = "itc" in cfg.heads
    with torch.no_grad():
        t = model.encode_text(ids, mask, vl_branch=vl)
        feats, cls, cls_vl = ref_unimodal(
            sd, cfg, ref_text_embed(sd, cfg, ids), mask, "text", txt_idx, "itc_text_proj.fc.weight",
            "itc_vl_text_proj.fc.weight" if vl else None,
        )  # fmt: skip
        torch.testing.assert_close(t.feats, feats, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(t.cls_feats, cls, atol=2e-5, rtol=1e-4)
        if vl:
            torch.testing.assert_close(t.cls_vl_feats, cls_vl, atol=2e-5, rtol=1e-4)
        i = model.encode_image(img, vl_branch=vl)
        feats, cls, cls_vl = ref_unimodal(
            sd, cfg, ref_image_embed(sd, cfg, img), None, "image", img_idx, "itc_image_proj.fc.weight",
            "itc_vl_image_proj.fc.weight" if vl else None,
        )  # fmt: skip
        torch.testing.assert_close(i.feats, feats, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(i.cls_feats, cls, atol=2e-5, rtol=1e-4)
        if vl:
            torch.testing.assert_close(i.cls_vl_feats, cls_vl, atol=2e-5, rtol=1e-4)


def test_reference_index_matrices_match_relpos():
    for cfg in CONFIGS.values():
        if cfg.position != "relative":
            continue
        img, txt, fused = ref_indices(cfg)
        model = VLMo(cfg, device="meta")
        assert torch.equal(model.relative_position_index("image"), img)
        assert torch.equal(model.relative_position_index("text", cfg.max_text_len), txt)
        assert torch.equal(model.relative_position_index("fusion", cfg.max_text_len), fused.long())
    # The released base/large geometry at 480 px, where the reference's float fusion matrix must be exact.
    cfg = VLMoConfig.preset("base", image_size=480)
    img, txt, fused = ref_indices(cfg)
    model = VLMo(cfg, device="meta")
    assert torch.equal(model.relative_position_index("fusion", 40), fused.long())
    assert int(fused.max()) < cfg.num_bias_rows and math.isclose(float(fused.max()), cfg.num_bias_rows - 1)


def test_bf16_forward_close_to_fp32():
    cfg = CONFIGS["relative"]
    sd, model = _loaded(cfg)
    ids, mask, img = _inputs(cfg)
    with torch.no_grad():
        ref = model(ids, mask, img)
        model.to(torch.bfloat16)
        for impl in ("sdpa", "eager"):
            model.attention_impl = impl
            out = model(ids, mask, img)
            assert out.cls_feats.dtype == torch.bfloat16
            torch.testing.assert_close(out.cls_feats.float(), ref.cls_feats, atol=3e-2, rtol=3e-2)
            torch.testing.assert_close(out.image_feats.float(), ref.image_feats, atol=6e-2, rtol=5e-2)
