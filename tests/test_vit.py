"""Vision transformer layers: config, EVA/CLIP structure, attention paths, drop path, checkpointing, pos-embed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlkit.config import from_dict, to_dict
from vlkit.errors import CheckpointError, ConfigError, ImageError
from vlkit.layers.mlp import activation, quick_gelu
from vlkit.layers.norm import LayerNorm
from vlkit.layers.pos_embed import resize_pos_embed, sincos_2d
from vlkit.layers.vit import ConvStem, VisionConfig, VisionTransformer


def tiny(kind: str = "eva", **kw) -> VisionConfig:
    base = dict(kind=kind, image_size=32, patch_size=8, width=32, depth=3, heads=4, mlp_dim=48)
    return VisionConfig(**{**base, **kw})


def test_config_defaults_per_kind_and_round_trip():
    eva, clip = tiny("eva"), tiny("clip")
    assert (eva.ln_eps, eva.act, eva.qkv_bias) == (1e-6, "gelu", "qv")
    assert (clip.ln_eps, clip.act, clip.qkv_bias) == (1e-5, "quick_gelu", "qkv")
    assert (eva.grid, eva.num_positions, eva.head_dim) == (4, 17, 8)
    assert not eva.align_corners and clip.align_corners
    data = to_dict(eva)
    assert "grid" not in data and from_dict(VisionConfig, data) == eva
    assert from_dict(VisionConfig, {**data, "image_size": 48}).num_positions == 37
    with pytest.raises(ConfigError, match="divisible"):
        tiny(heads=5)
    with pytest.raises(ConfigError, match="multiple of patch"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="kind"):
        from_dict(VisionConfig, {"kind": "swin"})


def test_eva_and_clip_structure():
    eva, clip = VisionTransformer(tiny("eva")), VisionTransformer(tiny("clip"))
    assert eva.patch_embed.bias is not None and clip.patch_embed.bias is None
    assert eva.norm_pre is None and clip.norm_pre is not None
    a = eva.blocks[0].attn
    assert a.qkv.bias is None and a.q_bias.shape == (32,) and a.v_bias.shape == (32,)
    with torch.no_grad():
        a.q_bias.fill_(1.0)
        a.v_bias.fill_(2.0)
    bias = a.qkv_bias()
    assert torch.all(bias[:32] == 1) and torch.all(bias[32:64] == 0) and torch.all(bias[64:] == 2)
    assert clip.blocks[0].attn.qkv.bias.shape == (96,) and clip.blocks[0].attn.q_bias is None
    assert "blocks.0.attn.q_bias" in eva.state_dict() and "blocks.0.attn.qkv.bias" not in eva.state_dict()
    # No final norm: the output of the last block is returned as it is.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = eva(x)
        assert out.shape == (2, 17, 32)
        assert (out.mean(-1).abs().max() > 1e-3) or (out.std(-1) - 1).abs().max() > 1e-3


def test_activations():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    torch.testing.assert_close(activation("gelu", x), 0.5 * x * (1 + torch.erf(x / 2**0.5)))
    assert (activation("gelu_tanh", x) - activation("gelu", x)).abs().max() > 1e-5


@pytest.mark.parametrize("kind", ["eva", "clip"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_sdpa_and_eager_agree(kind, dtype, atol):
    model = VisionTransformer(tiny(kind)).to(dtype).eval()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        fast = model(x)
        for block in model.blocks:
            block.attn.attn_impl = "eager"
        ref = model(x)
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), ref.float(), atol=atol, rtol=0)


def test_fp32_layernorm_for_half_inputs():
    ln = LayerNorm(64, eps=1e-5)
    x = torch.randn(4, 64) * 30 + 100  # large mean: bf16 statistics would be poor
    out = ln(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.layer_norm(x.bfloat16().float(), (64,), eps=1e-5), atol=2e-2, rtol=0)
    ln_bf16 = LayerNorm(64).to(torch.bfloat16)
    assert ln_bf16(x.bfloat16()).dtype == torch.bfloat16


def test_drop_path_schedule_and_train_eval():
    model = VisionTransformer(tiny(drop_path_rate=0.5))
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.25, 0.5])
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError):
        tiny(drop_path_rate=1.0)


def test_gradient_checkpointing_gives_the_same_values_and_grads():
    torch.manual_seed(0)
    model = VisionTransformer(tiny()).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_wrong_image_size_is_a_clear_error():
    model = VisionTransformer(tiny())
    with pytest.raises(ImageError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 48, 48))


def test_meta_device_construction():
    with torch.device("meta"):
        model = VisionTransformer(dataclasses.replace(tiny(), depth=4))
    assert all(p.is_meta for p in model.parameters())


def test_resize_pos_embed():
    pos = torch.randn(1, 17, 8)
    same = resize_pos_embed(pos, 4, align_corners=False)
    torch.testing.assert_close(same, pos)
    out = resize_pos_embed(pos.half(), 6, align_corners=False)
    assert out.shape == (1, 37, 8) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], pos[:, 0].half().float())  # the CLS entry is kept
    # A constant grid stays constant; 2-D (CLIP) layout keeps its rank.
    const = torch.cat([torch.zeros(1, 1, 8), torch.full((1, 16, 8), 3.0)], dim=1)
    torch.testing.assert_close(resize_pos_embed(const, 7, align_corners=True)[:, 1:], torch.full((1, 49, 8), 3.0))
    assert resize_pos_embed(pos[0], 6, align_corners=True).shape == (37, 8)
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    for align in (False, True):
        expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=align).permute(0, 2, 3, 1)
        torch.testing.assert_close(resize_pos_embed(pos, 6, align_corners=align)[:, 1:], expected.reshape(1, 36, 8))
    with pytest.raises(CheckpointError, match="square"):
        resize_pos_embed(torch.randn(1, 16, 8), 4, align_corners=False)


# ------------------------------------------------------------------------------------------- conv stem


def _stem_by_hand(stem: ConvStem, x: Tensor) -> Tensor:
    """The conv stem written out: conv, normalise each pixel's channels (mean/variance), GELU; then 1x1."""
    for conv in stem.convs:
        x = F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        x = F.gelu((x - mean) / torch.sqrt(var + 1e-5))
    return F.conv2d(x, stem.proj.weight, stem.proj.bias)


def test_conv_stem_patch_shortcut_adds_the_patch_projection():
    torch.manual_seed(0)
    stem = ConvStem(32, 8, patch_shortcut=True)
    assert stem.shortcut.kernel_size == (8, 8) and stem.shortcut.stride == (8, 8) and stem.shortcut.bias is None
    x = torch.randn(2, 3, 32, 32)
    expected = _stem_by_hand(stem, x) + F.conv2d(x, stem.shortcut.weight, stride=8)
    torch.testing.assert_close(stem(x), expected, rtol=1e-4, atol=1e-5)
    model = VisionTransformer(tiny(stem="conv+patch"))
    plain = VisionTransformer(tiny(stem="conv"))
    assert model.state_dict().keys() - plain.state_dict().keys() == {"patch_embed.shortcut.weight"}


@pytest.mark.parametrize(
    ("patch", "width", "channels"),
    [(8, 128, [32, 64, 128]), (4, 64, [32, 64]), (16, 64, [16, 16, 32, 64]), (2, 24, [24])],
)
def test_conv_stem_structure_and_values(patch, width, channels):
    torch.manual_seed(0)
    stem = ConvStem(width, patch)
    assert [conv.out_channels for conv in stem.convs] == channels
    assert all(conv.stride == (2, 2) and conv.kernel_size == (3, 3) for conv in stem.convs)
    assert stem.proj.kernel_size == (1, 1) and stem.proj.out_channels == width
    x = torch.randn(2, 3, 4 * patch, 4 * patch)
    out = stem(x)
    assert out.shape == (2, width, 4, 4)
    torch.testing.assert_close(out, _stem_by_hand(stem, x), rtol=1e-4, atol=1e-5)


def test_conv_stem_is_translation_equivariant_away_from_the_borders():
    torch.manual_seed(0)
    stem = ConvStem(32, 8)
    x = torch.randn(1, 3, 64, 64)
    shifted = torch.roll(x, shifts=8, dims=-1)  # one patch to the right; columns 0-7 wrap round
    out, out_shifted = stem(x), stem(shifted)
    # Cells whose receptive field (15 px) touches neither the image border nor the wrapped seam.
    torch.testing.assert_close(out_shifted[..., 2:7], out[..., 1:6], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_shifted[..., 1:7], out[..., 1:7], atol=1e-3)


def test_conv_stem_vit_trains_end_to_end_and_round_trips_its_config():
    config = tiny(stem="conv")
    assert from_dict(VisionConfig, to_dict(config)) == config
    model = VisionTransformer(config)
    assert isinstance(model.patch_embed, ConvStem)
    assert VisionTransformer(tiny()).state_dict().keys() - model.state_dict().keys() == {
        "patch_embed.weight",
        "patch_embed.bias",
    }
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_embed.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("patch", [1, 6, 12])
def test_conv_stem_needs_a_power_of_two_patch(patch):
    with pytest.raises(ConfigError, match="power-of-two"):
        tiny(stem="conv", image_size=4 * patch, patch_size=patch)
    with pytest.raises(ConfigError, match="power-of-two"):
        ConvStem(32, patch)


def test_sincos_2d_encodes_column_then_row():
    table = sincos_2d(3, 8)  # frequencies 1 and 10000 ** -0.5 = 0.01
    assert table.shape == (9, 8)
    for row in range(3):
        for col in range(3):
            expected = []
            for value in (col, row):
                expected += [math.sin(value), math.sin(value * 0.01), math.cos(value), math.cos(value * 0.01)]
            torch.testing.assert_close(table[row * 3 + col], torch.tensor(expected))
    # the similarity of two positions depends only on their offset
    gram = table @ table.T
    torch.testing.assert_close(gram[0 * 3 + 0, 1 * 3 + 1], gram[1 * 3 + 1, 2 * 3 + 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(3, 6)
