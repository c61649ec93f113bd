"""LAVIS stage-1 checkpoints: key accounting, parity with the equivalent transformers checkpoint, CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from blip2_reference import hf_config, lavis_stage1, lavis_to_hf

from vlkit import zoo
from vlkit.checkpoints import lavis
from vlkit.checkpoints.folder import build_loaded, load_model
from vlkit.checkpoints.io import save_torch
from vlkit.cli import main as cli
from vlkit.errors import CheckpointError

pytestmark = pytest.mark.parity
PRESET = "tiny-blip2-eva"


def _dims(config) -> dict:
    v, q = config.vision, config.qformer
    return dict(
        vision_width=v.width,
        depth=v.depth,
        mlp=v.mlp_dim,
        image_size=v.image_size,
        patch=v.patch_size,
        hidden=q.hidden_size,
        layers=q.num_layers,
        intermediate=q.intermediate_size,
        cross_freq=q.cross_attention_freq,
        vocab=q.vocab_size,
        max_pos=q.max_position_embeddings,
        queries=config.num_query_tokens,
        embed_dim=config.embed_dim,
    )


def _hf_twin(config, main, vit):
    """transformers Blip2ForImageTextRetrieval holding the same weights (converted by the spec's rules)."""
    from transformers import Blip2ForImageTextRetrieval

    v, q = config.vision, config.qformer
    hf = Blip2ForImageTextRetrieval(
        hf_config(
            vision_width=v.width,
            vision_layers=v.depth,
            vision_heads=v.heads,
            vision_mlp=v.mlp_dim,
            image_size=v.image_size,
            patch_size=v.patch_size,
            hidden=q.hidden_size,
            layers=q.num_layers,
            heads=q.num_heads,
            intermediate=q.intermediate_size,
            cross_freq=q.cross_attention_freq,
            vocab=q.vocab_size,
            max_pos=q.max_position_embeddings,
            queries=config.num_query_tokens,
            embed_dim=config.embed_dim,
        )
    ).eval()
    result = hf.load_state_dict(lavis_to_hf(main, vit, v.depth), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


@pytest.fixture
def files(tmp_path):
    config = zoo.get_spec(PRESET).config()
    main, vit = lavis_stage1(**_dims(config))
    save_torch({"model": main, "epoch": 3}, tmp_path / "blip2_pretrained.pth")
    save_torch(vit, tmp_path / "eva_vit_g.pth")
    return config, main, vit, tmp_path


def _inputs(config, batch=3, length=6):
    g = torch.Generator().manual_seed(4)
    s = config.vision.image_size
    pixels = torch.randn(batch, 3, s, s, generator=g)
    ids = torch.randint(1, 1000, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return pixels, ids, mask


def test_lavis_checkpoint_matches_equivalent_hf_checkpoint(files):
    config, main, vit, d = files
    ours = load_model(d / "blip2_pretrained.pth", vision=d / "eva_vit_g.pth", preset=PRESET)
    # Zero unexplained keys: every tensor is used except the documented drops.
    dropped = {"Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight"}
    dropped |= {"Qformer.cls.predictions.decoder.bias"}
    extra_block = {k for k in vit if k.startswith(f"blocks.{config.vision.depth}.")}
    assert len(ours.state_dict()) == len(main) - len(dropped) + len(vit) - len(extra_block)
    assert ours.temp.item() == pytest.approx(0.05) and ours.ln_vision.eps == 1e-5

    ref = _hf_twin(config, main, vit)
    pixels, ids, mask = _inputs(config)

    def compare(atol):
        with torch.no_grad():
            e = ours.encode_image(pixels)
            f = ours.project_image(ours.encode_queries(e).query_output)
            t = ours.project_text(ours.encode_text(ids, mask))
            itm = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
            itc = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
            pairs = {
                "itm_logits": (ours.itm_logits(e, ids, mask), itm.logits_per_image),
                "itc_sim": (ours.itc_similarity(f, t), itc.logits_per_image),
                "image_feats": (f, itc.image_embeds),
                "text_feat": (t, itc.text_embeds),
            }
        for name, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=name)
        return {k: (a - b).abs().max().item() for k, (a, b) in pairs.items()}

    diffs = compare(1e-4)  # ln_vision eps 1e-5 (LAVIS) vs 1e-6 (transformers): within tolerance
    ours.ln_vision.eps = 1e-6
    same_eps = compare(1e-5)
    print(f"\n[parity] LAVIS vs transformers twin: {diffs}; with equal ln eps: {same_eps}")


def test_itg_head_is_the_tied_bert_mlm_head(files):
    config, main, _, d = files
    ours = load_model(d / "blip2_pretrained.pth", vision=d / "eva_vit_g.pth", preset=PRESET)
    h = torch.randn(2, 5, config.qformer.hidden_size)
    p = "Qformer.cls.predictions."
    x = F.linear(h, main[p + "transform.dense.weight"], main[p + "transform.dense.bias"])
    x = F.layer_norm(
        F.gelu(x), (x.shape[-1],), main[p + "transform.LayerNorm.weight"], main[p + "transform.LayerNorm.bias"], 1e-12
    )
    expected = x @ main["Qformer.bert.embeddings.word_embeddings.weight"].t() + main[p + "bias"]
    with torch.no_grad():
        torch.testing.assert_close(ours.qformer.lm_logits(h), expected, atol=1e-5, rtol=0)


def test_lavis_and_hf_layouts_load_to_the_same_model(files, tmp_path):
    config, main, vit, d = files
    from_lavis = load_model(d / "blip2_pretrained.pth", vision=d / "eva_vit_g.pth", preset=PRESET)
    _hf_twin(config, main, vit).save_pretrained(tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf")
    a, b = from_lavis.state_dict(), from_hf.state_dict()
    # transformers has no ITG head and no temperature; everything else is the same tensor.
    assert set(a) - set(b) == {k for k in a if k.startswith("qformer.lm_head.")}
    for key in b:
        if key != "temp":
            assert torch.equal(a[key], b[key]), key


def test_errors_name_the_problem(files):
    config, main, vit, d = files
    ck, vf = d / "blip2_pretrained.pth", d / "eva_vit_g.pth"
    with pytest.raises(CheckpointError, match="no ViT weights.*eva_vit_g.pth"):
        load_model(ck, preset=PRESET)
    bad = dict(main, **{"Qformer.bert.encoder.layer.0.attention.self.rotary.weight": torch.ones(1)})
    save_torch({"model": bad}, d / "bad.pth")
    with pytest.raises(CheckpointError, match="rotary"):
        load_model(d / "bad.pth", vision=vf, preset=PRESET)
    untied = dict(
        main, **{"Qformer.cls.predictions.decoder.weight": main["Qformer.cls.predictions.decoder.weight"] + 1}
    )
    save_torch({"model": untied}, d / "untied.pth")
    with pytest.raises(CheckpointError, match="decoder.weight differs"):
        load_model(d / "untied.pth", vision=vf, preset=PRESET)
    missing = {k: v for k, v in main.items() if k != "itm_head.bias"}
    save_torch({"model": missing}, d / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): itm_head.bias"):
        load_model(d / "missing.pth", vision=vf, preset=PRESET)
    stage2 = dict(main, **{"opt_proj.weight": torch.ones(2, 2)})
    save_torch({"model": stage2}, d / "stage2.pth")
    with pytest.raises(CheckpointError, match="opt_proj.*stage-2"):
        load_model(d / "stage2.pth", vision=vf, preset=PRESET)
    two_extra = dict(vit, **{f"blocks.{config.vision.depth + 1}.norm1.weight": torch.ones(config.vision.width)})
    save_torch(two_extra, d / "vit_too_deep.pth")
    with pytest.raises(CheckpointError, match="drops only the file's last block"):
        load_model(ck, vision=d / "vit_too_deep.pth", preset=PRESET)
    # Without a preset the real-size architecture is inferred, and the tiny tensors do not fit it.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(ck, vision=vf)


def test_finetuned_checkpoint_with_vit_and_pos_embed_resize(files, tmp_path):
    """A 'coco'-style checkpoint carries visual_encoder.*; loading at a larger size resizes pos_embed like
    transformers' interpolate_pos_encoding (bicubic, align_corners=False)."""
    config, main, vit, d = files
    full = dict(main, **{f"visual_encoder.{k}": v for k, v in vit.items() if not k.startswith("blocks.2.")})
    save_torch({"model": full}, tmp_path / "coco.pth")
    with pytest.raises(CheckpointError, match="already contains the ViT"):
        load_model(tmp_path / "coco.pth", vision=d / "eva_vit_g.pth", preset=PRESET)
    big = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=48))
    cfg, sd = lavis.load_lavis(tmp_path / "coco.pth", config=big)
    ours = build_loaded("blip2", cfg, sd, source="coco.pth")
    assert ours.vision.pos_embed.shape[1] == 37
    ref = _hf_twin(config, main, vit)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = ref.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        ours.ln_vision.eps = 1e-6
        torch.testing.assert_close(ours.encode_image(pixels), expected, atol=1e-5, rtol=0)


def _clip_file(width: int, depth: int, mlp: int, grid: int, patch: int) -> dict:
    g = torch.Generator().manual_seed(9)

    def r(*shape, around=0.0):
        return around + torch.randn(shape, generator=g) * 0.2

    sd = {
        "class_embedding": r(width),
        "positional_embedding": r(grid * grid + 1, width),
        "conv1.weight": r(width, 3, patch, patch),
        "ln_pre.weight": r(width, around=1.0),
        "ln_pre.bias": r(width),
        "ln_post.weight": r(width, around=1.0),
        "ln_post.bias": r(width),
        "proj": r(width, 8),
    }
    for i in range(depth + 1):
        p = f"transformer.resblocks.{i}."
        sd |= {
            p + "attn.in_proj_weight": r(3 * width, width),
            p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width),
            p + "attn.out_proj.bias": r(width),
            p + "ln_1.weight": r(width, around=1.0),
            p + "ln_1.bias": r(width),
            p + "mlp.c_fc.weight": r(mlp, width),
            p + "mlp.c_fc.bias": r(mlp),
            p + "mlp.c_proj.weight": r(width, mlp),
            p + "mlp.c_proj.bias": r(width),
            p + "ln_2.weight": r(width, around=1.0),
            p + "ln_2.bias": r(width),
        }
    return sd


def _hf_clip_vision(sd: dict, width: int, depth: int, heads: int, mlp: int, image: int, patch: int):
    """transformers CLIPVisionModel with the same weights: an independent reference for the CLIP-kind ViT."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPVisionModel(cfg).eval()
    m = {
        "embeddings.class_embedding": sd["class_embedding"],
        "embeddings.patch_embedding.weight": sd["conv1.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "pre_layrnorm.weight": sd["ln_pre.weight"],
        "pre_layrnorm.bias": sd["ln_pre.bias"],
        "post_layernorm.weight": sd["ln_post.weight"],
        "post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(depth):
        s, t = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            m[t + f"self_attn.{name}.weight"] = sd[s + "attn.in_proj_weight"].chunk(3)[j]
            m[t + f"self_attn.{name}.bias"] = sd[s + "attn.in_proj_bias"].chunk(3)[j]
        for ours_name, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            m[t + theirs + ".weight"] = sd[s + ours_name + ".weight"]
            m[t + theirs + ".bias"] = sd[s + ours_name + ".bias"]
    result = model.load_state_dict(m, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"embeddings.position_ids"}
    return model


def test_clip_vit_layout_matches_transformers_clip(tmp_path):
    config = zoo.get_spec("tiny-blip2-clip").config()
    v = config.vision
    main, _ = lavis_stage1(**_dims(config))
    vit = _clip_file(v.width, v.depth, v.mlp_dim, v.grid, v.patch_size)
    save_torch({"model": main}, tmp_path / "blip2_pretrained_vitL.pth")
    save_torch(vit, tmp_path / "clip_vit_L.pth")
    ours = load_model(
        tmp_path / "blip2_pretrained_vitL.pth", vision=tmp_path / "clip_vit_L.pth", preset="tiny-blip2-clip"
    )
    ref = _hf_clip_vision(vit, v.width, v.depth, v.heads, v.mlp_dim, v.image_size, v.patch_size)
    pixels = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state  # encoder output, before post_layernorm
        got = ours.vision(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    print(f"\n[parity] CLIP-kind ViT vs transformers CLIPVisionModel: {(got - expected).abs().max().item():.2e}")
    # Resizing for a larger image uses align_corners=True for CLIP (EVA/transformers use False).
    big = dataclasses.replace(config, vision=dataclasses.replace(v, image_size=48))
    _, sd = lavis.load_lavis(tmp_path / "blip2_pretrained_vitL.pth", vision=tmp_path / "clip_vit_L.pth", config=big)
    grid = vit["positional_embedding"][1:].reshape(1, v.grid, v.grid, -1).permute(0, 3, 1, 2)
    for align, equal in ((True, True), (False, False)):
        resized = (
            F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=align).permute(0, 2, 3, 1).reshape(36, -1)
        )
        assert torch.allclose(sd["vision.pos_embed"][0, 1:], resized, atol=1e-6) is equal
    assert torch.equal(sd["vision.pos_embed"][0, 0], vit["positional_embedding"][0])


def test_infer_preset_from_layout():
    eva = {"cls_token": torch.zeros(1)}
    clip = {"class_embedding": torch.zeros(1)}
    assert lavis.infer_preset({}, eva) == "blip2-vitg-pretrain"
    assert lavis.infer_preset({}, clip) == "blip2-vitl-pretrain"
    coco = {"visual_encoder.cls_token": torch.zeros(1), "visual_encoder.pos_embed": torch.zeros(1, 677, 2)}
    assert lavis.infer_preset(coco, None) == "blip2-vitg-coco"
    with pytest.raises(CheckpointError, match="EVA or CLIP"):
        lavis.infer_preset({}, {"weird": torch.zeros(1)})


def test_cli_convert_lavis_then_load(files, capsys):
    config, _, _, d = files
    out = d / "converted"
    argv = [
        "convert",
        str(d / "blip2_pretrained.pth"),
        str(out),
        "--vision",
        str(d / "eva_vit_g.pth"),
        "--preset",
        PRESET,
    ]
    assert cli(argv) == 0
    assert "wrote" in capsys.readouterr().out
    a = load_model(out).state_dict()
    b = load_model(d / "blip2_pretrained.pth", vision=d / "eva_vit_g.pth", preset=PRESET).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "preset: tiny-blip2-eva" in (out / "config.yaml").read_text()
    # Bad input: one line on stderr, exit status 2.
    assert cli(["convert", str(d / "blip2_pretrained.pth"), str(d / "x"), "--preset", PRESET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ViT weights" in err[0]
    # bf16 output.
    assert cli([*argv[:2], str(d / "bf16"), *argv[3:], "--dtype", "bfloat16"]) == 0
    assert load_model(d / "bf16").query_tokens.dtype == torch.bfloat16


def test_half_precision_vit_file_loads_as_float32(files):
    _, _, vit, d = files
    save_torch({k: v.half() for k, v in vit.items()}, d / "eva_fp16.pth")
    model = load_model(d / "blip2_pretrained.pth", vision=d / "eva_fp16.pth", preset=PRESET)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.vision.cls_token, vit["cls_token"].half().float())
    bf16 = load_model(d / "blip2_pretrained.pth", vision=d / "eva_fp16.pth", preset=PRESET, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
