"""Vision transformers of the BLIP-2 family: EVA ViT-g/14 and OpenAI-CLIP ViT-L/14.

Both are plain pre-norm ViTs that return the tokens of their last block (CLS first, no final norm, no
pooling, no head): BLIP-2 takes all tokens of the second-to-last block of the released towers and builds
the ViT one block short of the checkpoint. The two kinds differ in small ways that matter for parity:

==================  ===============================  ================================
                    EVA (``kind="eva"``)             CLIP (``kind="clip"``)
==================  ===============================  ================================
patch conv          with bias                        no bias
before the blocks   nothing                          ``norm_pre`` (CLIP's ``ln_pre``)
qkv bias            q and v only; key bias is zero   full fused bias
activation          exact (erf) GELU                 QuickGELU
LayerNorm eps       1e-6                             1e-5
pos-embed resize    bicubic, align_corners=False     bicubic, align_corners=True
==================  ===============================  ================================

Every LayerNorm computes in fp32 (``vlkit.layers.norm.LayerNorm``), which is what LAVIS does for CLIP and
what autocast does for EVA, so a bf16/fp16 ViT matches the reference's mixed-precision numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlkit.errors import ConfigError, ImageError
from vlkit.layers.attention import AttentionImpl, attend
from vlkit.layers.mlp import Activation, Mlp
from vlkit.layers.norm import LayerNorm

QkvBias = Literal["qv", "qkv", "none"]

_KIND_DEFAULTS: dict[str, dict[str, object]] = {
    "eva": {"ln_eps": 1e-6, "act": "gelu", "qkv_bias": "qv"},
    "clip": {"ln_eps": 1e-5, "act": "quick_gelu", "qkv_bias": "qkv"},
}


@dataclass
class VisionConfig:
    """Shape and flavour of a ViT.

    ``ln_eps``, ``act`` and ``qkv_bias`` default (when None) to the reference values of ``kind``; they are
    fields so that a transformers checkpoint with other settings can be represented exactly. ``stem="conv"``
    replaces the one-conv patch embedding with a :class:`ConvStem`, ``"conv+patch"`` with a ConvStem plus the
    patch projection (towers trained from scratch; no released checkpoint, LAVIS or transformers, has one).
    """

    kind: Literal["eva", "clip"] = "eva"
    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_dim: int = 6144
    ln_eps: float | None = None
    act: Activation | None = None
    qkv_bias: QkvBias | None = None
    attn_dropout: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    attn_impl: AttentionImpl = "sdpa"
    stem: Stem = "patch"
    # Derived.
    grid: int = field(init=False)
    num_positions: int = field(init=False)
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for name, value in _KIND_DEFAULTS[self.kind].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"VisionConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(f"VisionConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"VisionConfig: image_size {self.image_size} is not a multiple of patch {self.patch_size}"
            )
        check_stem(self.stem, self.patch_size, where="VisionConfig")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"VisionConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        self.grid = self.image_size // self.patch_size
        self.num_positions = self.grid * self.grid + 1
        self.head_dim = self.width // self.heads

    @property
    def align_corners(self) -> bool:
        """The ``align_corners`` flag the reference uses when resizing this kind's position embedding."""
        return self.kind == "clip"


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``p`` (and rescale)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    With ``qkv_bias="qv"`` (EVA) the projection has no bias of its own; separate ``q_bias`` and ``v_bias``
    vectors are used and the key bias is structurally zero. (A key bias would add ``q . b_k`` to every
    logit of a query row, which softmax cancels, so it could never matter anyway.)
    """

    def __init__(self, width: int, heads: int, qkv_bias: QkvBias, attn_dropout: float, impl: AttentionImpl) -> None:
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.attn_impl: AttentionImpl = impl
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(width, width)

    def qkv_bias(self) -> Tensor | None:
        """The effective fused bias (3W,), or None."""
        if self.q_bias is not None:
            return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.qkv.bias

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias())  # (B, N, 3W)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        out = attend(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, impl=self.attn_impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, config: VisionConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(config.width, eps=config.ln_eps)
        self.attn = Attention(config.width, config.heads, config.qkv_bias, config.attn_dropout, config.attn_impl)
        self.norm2 = LayerNorm(config.width, eps=config.ln_eps)
        self.mlp = Mlp(config.width, config.mlp_dim, config.act)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


Stem = Literal["patch", "conv", "conv+patch"]


def check_stem(stem: Stem, patch_size: int, *, where: str) -> None:
    """Raise a ConfigError if ``stem`` cannot embed patches of ``patch_size`` (a conv stem halves the image
    log2(patch) times, so its patch size must be a power of two of at least 2)."""
    if stem != "patch" and (patch_size < 2 or patch_size & (patch_size - 1)):
        raise ConfigError(f"{where}: a {stem} stem needs a power-of-two patch size of at least 2, got {patch_size}")


def patch_embedding(
    stem: Stem,
    width: int,
    patch_size: int,
    *,
    bias: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The patch embedding of ``stem`` (the one-conv projection, or a :class:`ConvStem` with or without the
    patch shortcut): (B, 3, S, S) -> (B, width, S / patch, S / patch), with a ``weight`` giving its dtype."""
    if stem == "patch":
        return nn.Conv2d(3, width, patch_size, stride=patch_size, bias=bias, device=device, dtype=dtype)
    return ConvStem(width, patch_size, bias=bias, patch_shortcut=stem == "conv+patch", device=device, dtype=dtype)


class ConvStem(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers see better").

    ``log2(patch)`` 3x3 stride-2 convolutions, each followed by a per-pixel normalisation over channels (no
    affine) and a GELU, with channels doubling up to ``width``, then a 1x1 convolution to ``width``: the same
    (B, W, G, G) grid as the one-conv patch embedding, with a translation-equivariant front end that learns
    shapes from far fewer images. With ``patch_shortcut`` the one-conv patch projection (no bias) is added to
    the output: early in training that linear path carries colour and size at once. With a 100-step warm-up the
    contrastive loss then left its plateau within a few hundred steps in every run tried (three), where the
    convolutions alone stayed on it for up to 700 steps with some seeds (a 300-step warm-up fixes that too; see
    configs/shapes/README.md). An option for towers trained from scratch; no released checkpoint has it.
    """

    def __init__(
        self,
        width: int,
        patch_size: int,
        *,
        bias: bool = True,
        patch_shortcut: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_stem("conv", patch_size, where="ConvStem")
        steps = patch_size.bit_length() - 1
        channels = [3] + [max(width >> (steps - i), 16) for i in range(1, steps + 1)]
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=2, padding=1, device=device, dtype=dtype)
            for i in range(steps)
        )
        self.proj = nn.Conv2d(channels[-1], width, 1, bias=bias, device=device, dtype=dtype)
        self.shortcut = (
            nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False, device=device, dtype=dtype)
            if patch_shortcut
            else None
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He-normal 3x3 convolutions with zero bias (they feed GELUs); PyTorch's default for the projection."""
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.proj.reset_parameters()
        if self.shortcut is not None:
            self.shortcut.reset_parameters()

    @property
    def weight(self) -> Tensor:
        """The projection's weight (the stem's dtype and device)."""
        return self.proj.weight

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, width, S / patch, S / patch)."""
        pixels = x
        for conv in self.convs:
            x = conv(x)  # (B, C_i, S / 2^i, S / 2^i)
            x = F.gelu(F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2))
        out = self.proj(x)
        return out if self.shortcut is None else out + self.shortcut(pixels)


class VisionTransformer(nn.Module):
    """EVA- or CLIP-style ViT returning all tokens of its last block, (B, 1 + grid^2, width)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.patch_embed = patch_embedding(config.stem, w, config.patch_size, bias=config.kind == "eva")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_positions, w))
        self.norm_pre = LayerNorm(w, eps=config.ln_eps) if config.kind == "clip" else None
        # Linear stochastic-depth schedule from 0 at the first block to drop_path_rate at the last.
        rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.grad_checkpointing = config.grad_checkpointing
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference-style initialisation (only matters when training from scratch)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.kind == "eva":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            # EVA scales each block's output projections down with depth: 1/sqrt(2 * layer) (1-indexed).
            for i, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * i))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * i))
        else:
            scale = self.config.width**-0.5
            nn.init.normal_(self.pos_embed, std=scale)
            nn.init.normal_(self.cls_token, std=scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass to save activation memory (training only)."""
        self.grad_checkpointing = enable

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode images.

        Args:
            pixel_values: (B, 3, S, S) normalised images, S = ``config.image_size``.

        Returns:
            (B, 1 + grid^2, width) token features of the last block (CLS first).
        """
        size = self.config.image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ImageError(f"pixel_values must have shape (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, W, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, W)
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x
