"""VLMo: a multiway (mixture-of-modality-experts) transformer for image-text tasks.

Every block has one self-attention shared by all tokens and three feed-forward experts with their own
pre-norms: a language expert, a vision expert and, in the top ``depth - vlffn_start_layer`` blocks, a
vision-language expert. Which expert a token uses depends on the pass:

* text-only / image-only passes (dual encoder, retrieval): the modality expert in every block;
* fusion pass ``[text ; image]``: below ``vlffn_start_layer`` text tokens use the language expert and image
  tokens the vision expert; from ``vlffn_start_layer`` up every token uses the vision-language expert.

base and large add a relative position bias from one table shared by all layers (``vlkit.layers.relpos``);
base_plus uses absolute positions instead and has no layer scale. The model returns features and logits;
losses live in ``vlkit.losses``. Reference: microsoft/unilm ``vlmo`` (see vlmo-spec.md Part A); the
reference's ``infer*`` methods map onto :meth:`VLMo.forward`, :meth:`VLMo.encode_text` and
:meth:`VLMo.encode_image` as listed in their docstrings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.config import from_dict
from vlkit.errors import ConfigError, VlkitError
from vlkit.layers import relpos
from vlkit.layers.attention import AttentionImpl, attend
from vlkit.layers.vit import Stem, check_stem, patch_embedding

HeadName = Literal["mlm", "itm", "itc", "irtr", "vqa", "nlvr2"]
Modality = Literal["text", "image", "vl"]


class VLMoInputError(VlkitError, ValueError):
    """Inputs whose shapes do not fit the model (image size, text length, batch sizes, token types)."""


# ----------------------------------------------------------------------------------------------- config


@dataclass
class VLMoConfig:
    """Architecture of a VLMo model.

    Attributes:
        hidden_size: width ``H``.
        depth: number of multiway blocks.
        num_heads: attention heads.
        mlp_ratio: expert hidden width / ``H`` (the hidden width is ``int(H * mlp_ratio)``).
        vlffn_start_layer: first block that has a vision-language expert (``depth`` = none, as in the
            reference's text-only pretraining stage).
        position: "relative" (shared bias table; base, large) or "absolute" (learned positions; base_plus).
        layer_scale_init: initial value of the per-block layer scales ``gamma_1``/``gamma_2``; None = no
            layer scale (base_plus).
        image_size: square input size in pixels (the model accepts exactly this size).
        patch_size: patch side in pixels.
        max_text_len: text length the model is built for (text position table, fusion split point).
        max_text_len_of_initckpt: text length ``T0`` the relative bias table was built for; 196 in every
            released checkpoint and must stay so for them to load.
        vocab_size: WordPiece vocabulary size.
        drop_path_rate: stochastic depth at the last block (linear from 0); the reference also uses it as
            the text-embedding dropout.
        heads: task heads to build: "mlm", "itm", "itc" (pretraining ITC incl. the VL-expert projections),
            "irtr" (retrieval fine-tuning ITC), "vqa", "nlvr2" (also makes a third token type).
        vqa_num_labels: answers of the VQA classifier.
        attention: "sdpa" (fast) or "eager" (reference precision: fp32 logits and softmax).
        stem: "patch" (the reference's one-conv patch embedding), "conv" (``vlkit.layers.vit.ConvStem``:
            stride-2 3x3 convolutions) or "conv+patch" (a ConvStem plus the patch projection), for small models
            trained from scratch; only "patch" exports to unilm.
    """

    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    vlffn_start_layer: int = 10
    position: Literal["relative", "absolute"] = "relative"
    layer_scale_init: float | None = 0.1
    image_size: int = 224
    patch_size: int = 16
    max_text_len: int = 40
    max_text_len_of_initckpt: int = 196
    vocab_size: int = 30522
    drop_path_rate: float = 0.1
    heads: tuple[HeadName, ...] = ()
    vqa_num_labels: int = 3129
    attention: Literal["sdpa", "eager"] = "sdpa"
    stem: Stem = "patch"

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        positive = ("hidden_size", "depth", "num_heads", "image_size", "patch_size", "max_text_len", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"VLMoConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty feed-forward layer")
        if not 0 <= self.vlffn_start_layer <= self.depth:
            raise ConfigError(f"vlffn_start_layer {self.vlffn_start_layer} must be in 0..depth ({self.depth})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        check_stem(self.stem, self.patch_size, where="VLMoConfig")
        if self.position == "relative" and not 1 <= self.max_text_len <= self.max_text_len_of_initckpt:
            raise ConfigError(
                f"max_text_len {self.max_text_len} must not exceed max_text_len_of_initckpt "
                f"{self.max_text_len_of_initckpt} (the text rows of the relative position table)"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate {self.drop_path_rate} must be in [0, 1)")
        if len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"duplicate entries in heads {self.heads}")
        if "vqa" in self.heads and self.vqa_num_labels < 1:
            raise ConfigError(f"vqa_num_labels must be positive, got {self.vqa_num_labels}")

    @property
    def grid(self) -> int:
        """Patches per image side ``P``."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """``P*P + 1`` (patches and the image CLS)."""
        return self.grid**2 + 1

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_token_types(self) -> int:
        """Modality embeddings: text, image (and a second image for NLVR2)."""
        return 3 if "nlvr2" in self.heads else 2

    @property
    def num_bias_rows(self) -> int:
        """Rows of the shared relative position table (0 for absolute positions)."""
        if self.position != "relative":
            return 0
        return relpos.num_table_rows(self.grid, self.max_text_len_of_initckpt)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VLMoConfig:
        """A named architecture (``VLMO_PRESETS``) with field overrides, validated like ``from_dict``."""
        if name not in VLMO_PRESETS:
            raise ConfigError(f"unknown VLMo preset {name!r}; known: {', '.join(VLMO_PRESETS)}")
        return from_dict(cls, {**VLMO_PRESETS[name], **overrides})


# The reference's timm architectures (``vlmo_{base,large,base_plus}_patch16``) plus a tiny one for tests.
VLMO_PRESETS: dict[str, dict[str, Any]] = {
    "base": {"hidden_size": 768, "depth": 12, "num_heads": 12, "vlffn_start_layer": 10},
    "large": {"hidden_size": 1024, "depth": 24, "num_heads": 16, "vlffn_start_layer": 21},
    "base_plus": {
        "hidden_size": 544,
        "depth": 24,
        "num_heads": 16,
        "vlffn_start_layer": 21,
        "position": "absolute",
        "layer_scale_init": None,
    },
    "tiny": {
        "hidden_size": 32,
        "depth": 4,
        "num_heads": 2,
        "vlffn_start_layer": 2,
        "image_size": 32,
        "patch_size": 8,
        "max_text_len": 8,
        "max_text_len_of_initckpt": 12,
        "vocab_size": 64,
        "vqa_num_labels": 10,
    },
}


@dataclass
class VLMoFusionOutput:
    """Fusion pass over ``[text ; image]`` (the reference's ``infer``).

    Attributes:
        text_feats: (B, L, H) after the final norm.
        image_feats: (B, 1 + P*P, H) after the final norm.
        cls_feats: (B, H) pooled text-CLS feature (tanh(Linear)), input of the VQA/NLVR2/ITM heads.
        raw_cls_feats: (B, H) text-CLS feature before pooling.
    """

    text_feats: Tensor
    image_feats: Tensor
    cls_feats: Tensor
    raw_cls_feats: Tensor


@dataclass
class VLMoUnimodalOutput:
    """Text-only or image-only pass (the reference's ``infer_text*`` / ``infer_image*``).

    Attributes:
        feats: (B, N, H) after the final norm.
        cls_feats: (B, H) L2-normalised ITC projection of ``feats[:, 0]``; None without ITC projections.
        cls_vl_feats: (B, H) L2-normalised VL-expert ITC feature (only with ``vl_branch=True``).
        raw_cls_feats: (B, H) position 0 of the last block's output *before* the final norm (as in the
            reference's unimodal passes, unlike the fusion pass).
    """

    feats: Tensor
    cls_feats: Tensor | None
    cls_vl_feats: Tensor | None
    raw_cls_feats: Tensor


@dataclass
class VLMoDualOutput:
    """Text-only and image-only passes of one batch (dual encoder), for contrastive training.

    Attributes:
        text: the text pass (:meth:`VLMo.encode_text`), None when no text was given.
        image: the image pass (:meth:`VLMo.encode_image`), None when no image was given.
        logit_scale: the learnable log inverse temperature (0-D), or None without ITC heads.
    """

    text: VLMoUnimodalOutput | None
    image: VLMoUnimodalOutput | None
    logit_scale: Tensor | None


ForwardHead = Literal["vqa", "nlvr2", "itm", "mlm", "contrastive"]

_HEAD_MODULES = (
    "mlm_head",
    "itm_head",
    "itc_text_proj",
    "itc_image_proj",
    "itc_vl_text_proj",
    "itc_vl_image_proj",
    "vqa_head",
    "nlvr2_head",
)

# ----------------------------------------------------------------------------------------------- layers


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class FeedForward(nn.Module):
    """Linear -> exact GELU -> Linear (one modality expert)."""

    def __init__(self, dim: int, hidden: int, **dd: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MultiwayAttention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection plus learnable q and v biases (k bias = 0)."""

    def __init__(self, dim: int, num_heads: int, **dd: Any) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.impl: AttentionImpl = "sdpa"
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Self-attention over ``x`` (B, N, C); ``mask`` is an additive float mask or a bool keep-mask, either
        broadcastable to (B, NH, N, N)."""
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, NH, N, D)
        if self.impl == "eager":
            # The reference scales q in the input dtype, then computes logits and softmax in fp32.
            q = q * self.scale
            out = attend(q.float(), k.float(), v.float(), mask, scale=1.0, impl="eager").to(x.dtype)
        else:
            out = attend(q, k, v, mask, scale=self.scale, impl="sdpa")
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiwayBlock(nn.Module):
    """Shared attention, then a modality expert chosen per pass (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        *,
        with_vl_expert: bool,
        layer_scale_init: float | None,
        drop_path_rate: float,
        **dd: Any,
    ) -> None:
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.attn = MultiwayAttention(dim, num_heads, **dd)
        self.norm_text = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.ffn_text = FeedForward(dim, mlp_hidden, **dd)
        self.norm_image = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.ffn_image = FeedForward(dim, mlp_hidden, **dd)
        self.norm_vl = nn.LayerNorm(dim, eps=1e-6, **dd) if with_vl_expert else None
        self.ffn_vl = FeedForward(dim, mlp_hidden, **dd) if with_vl_expert else None
        if layer_scale_init is None:
            self.gamma_1 = self.gamma_2 = None
        else:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init), **dd))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init), **dd))

    @property
    def has_vl_expert(self) -> bool:
        return self.ffn_vl is not None

    def _residual(self, x: Tensor, branch: Tensor, gamma: Tensor | None) -> Tensor:
        if gamma is not None:
            branch = gamma * branch
        return x + drop_path(branch, self.drop_path_rate, self.training)

    def forward(self, x: Tensor, mask: Tensor | None, modality: Modality, text_len: int = 0) -> Tensor:
        """One block.

        Args:
            x: (B, N, H).
            mask: attention mask for :class:`MultiwayAttention` (relative bias and/or key padding), or None.
            modality: "text" / "image" (every token through that expert) or "vl" (fused sequence).
            text_len: for "vl" without a VL expert: the first ``text_len`` tokens are text, the rest image.

        Returns:
            (B, N, H)
        """
        x = self._residual(x, self.attn(self.norm1(x), mask), self.gamma_1)
        if modality == "image":
            return self._residual(x, self.ffn_image(self.norm_image(x)), self.gamma_2)
        if modality == "text":
            return self._residual(x, self.ffn_text(self.norm_text(x)), self.gamma_2)
        if self.ffn_vl is not None:
            return self._residual(x, self.ffn_vl(self.norm_vl(x)), self.gamma_2)
        x_text, x_image = x[:, :text_len], x[:, text_len:]
        x_text = self._residual(x_text, self.ffn_text(self.norm_text(x_text)), self.gamma_2)
        x_image = self._residual(x_image, self.ffn_image(self.norm_image(x_image)), self.gamma_2)
        return torch.cat([x_text, x_image], dim=1)


class TextEmbeddings(nn.Module):
    """BERT embeddings as VLMo uses them: word + BERT token type 0 (+ positions if absolute), LayerNorm, dropout.

    The position table exists for relative models too (it is in their checkpoints) but is not added.
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, *, absolute: bool, dropout: float, **dd: Any) -> None:
        super().__init__()
        self.absolute = absolute
        self.dropout = dropout
        self.word = nn.Embedding(vocab_size, dim, padding_idx=0, **dd)
        self.position = nn.Embedding(max_len, dim, **dd)
        self.token_type = nn.Embedding(2, dim, **dd)
        self.norm = nn.LayerNorm(dim, eps=1e-12, **dd)

    def forward(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, H)."""
        x = self.word(ids) + self.token_type.weight[0]
        if self.absolute:
            x = x + self.position.weight[: ids.shape[1]]
        return F.dropout(self.norm(x), self.dropout, self.training)


class ClassifierHead(nn.Module):
    """Linear -> LayerNorm(eps 1e-5) -> GELU -> Linear (the VQA and NLVR2 classifiers)."""

    def __init__(self, dim_in: int, dim_hidden: int, num_classes: int, **dd: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden, **dd)
        self.norm = nn.LayerNorm(dim_hidden, eps=1e-5, **dd)
        self.fc2 = nn.Linear(dim_hidden, num_classes, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class MLMHead(nn.Module):
    """BERT prediction head: Linear -> GELU -> LayerNorm(eps 1e-12) -> bias-free decoder + separate bias."""

    def __init__(self, dim: int, vocab_size: int, **dd: Any) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim, **dd)
        self.norm = nn.LayerNorm(dim, eps=1e-12, **dd)
        self.decoder = nn.Linear(dim, vocab_size, bias=False, **dd)
        self.bias = nn.Parameter(torch.zeros(vocab_size, **dd))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x)))) + self.bias


# ------------------------------------------------------------------------------------------------ model


class VLMo(nn.Module):
    """The VLMo backbone with its optional task heads.

    Construction is pure: no files are read; ``device="meta"`` builds a weightless model (e.g. to count
    parameters or to load weights with ``to_empty`` and a state dict afterwards).
    """

    def __init__(
        self, config: VLMoConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = config
        c = config
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        h = c.hidden_size
        self.text_embed = TextEmbeddings(
            c.vocab_size, h, c.max_text_len, absolute=c.position == "absolute", dropout=c.drop_path_rate, **dd
        )
        self.patch_embed = patch_embedding(c.stem, h, c.patch_size, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, h, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_image_tokens, h, **dd)) if c.position == "absolute" else None
        self.token_type = nn.Embedding(c.num_token_types, h, **dd)
        self.rel_pos_table = (
            nn.Parameter(torch.zeros(c.num_bias_rows, c.num_heads * c.depth, **dd))
            if c.position == "relative"
            else None
        )
        rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList(
            MultiwayBlock(
                h,
                c.num_heads,
                c.mlp_hidden_size,
                with_vl_expert=i >= c.vlffn_start_layer,
                layer_scale_init=c.layer_scale_init,
                drop_path_rate=rates[i],
                **dd,
            )
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(h, eps=1e-6, **dd)
        self.pooler = nn.Linear(h, h, **dd)

        heads = set(c.heads)
        self.mlm_head = MLMHead(h, c.vocab_size, **dd) if "mlm" in heads else None
        self.itm_head = nn.Linear(h, 2, **dd) if "itm" in heads else None
        has_itc = bool(heads & {"itc", "irtr"})
        self.itc_text_proj = nn.Linear(h, h, bias=False, **dd) if has_itc else None
        self.itc_image_proj = nn.Linear(h, h, bias=False, **dd) if has_itc else None
        self.logit_scale = nn.Parameter(torch.empty((), **dd)) if has_itc else None
        self.itc_vl_text_proj = nn.Linear(h, h, bias=False, **dd) if "itc" in heads else None
        self.itc_vl_image_proj = nn.Linear(h, h, bias=False, **dd) if "itc" in heads else None
        self.logit_vl_scale = nn.Parameter(torch.empty((), **dd)) if "itc" in heads else None
        self.vqa_head = ClassifierHead(h, 2 * h, c.vqa_num_labels, **dd) if "vqa" in heads else None
        self.nlvr2_head = ClassifierHead(2 * h, 2 * h, 2, **dd) if "nlvr2" in heads else None

        self.attention_impl = c.attention
        self._index_cache: dict[tuple[str, int, str], Tensor] = {}
        if torch.device(device if device is not None else "cpu").type != "meta":
            self.reset_parameters()

    # ------------------------------------------------------------------------------------------ set-up

    @property
    def attention_impl(self) -> AttentionImpl:
        """Attention implementation of every block ("sdpa" or "eager"); settable."""
        return self.blocks[0].attn.impl

    @attention_impl.setter
    def attention_impl(self, impl: AttentionImpl) -> None:
        if impl not in ("sdpa", "eager"):
            raise ConfigError(f"attention must be 'sdpa' or 'eager', got {impl!r}")
        for block in self.blocks:
            block.attn.impl = impl

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation (new heads and a from-scratch backbone)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Backbone linears: truncated normal; embeddings and heads: plain normal (BERT style).
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            for name in ("q_bias", "v_bias"):
                nn.init.zeros_(getattr(block.attn, name))
            if block.gamma_1 is not None:
                block.gamma_1.fill_(self.config.layer_scale_init)
                block.gamma_2.fill_(self.config.layer_scale_init)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.rel_pos_table is not None:
            nn.init.zeros_(self.rel_pos_table)
        self.patch_embed.reset_parameters()
        bert_style = [self.text_embed, self.token_type, self.pooler]
        bert_style += [m for m in (self.mlm_head, self.itm_head, self.vqa_head, self.nlvr2_head) if m is not None]
        bert_style += [m for m in (self.itc_text_proj, self.itc_image_proj) if m is not None]
        bert_style += [m for m in (self.itc_vl_text_proj, self.itc_vl_image_proj) if m is not None]
        for root in bert_style:
            for module in root.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.mlm_head is not None:
            nn.init.zeros_(self.mlm_head.bias)
        for scale in (self.logit_scale, self.logit_vl_scale):
            if scale is not None:
                scale.fill_(math.log(1 / 0.07))

    def num_parameters(self, *, position_tables: bool = True) -> int:
        """Parameter count; ``position_tables=False`` leaves out the resolution-dependent position parameters
        (the relative bias table, or base_plus's absolute image positions)."""
        skip = set() if position_tables else {id(self.rel_pos_table), id(self.pos_embed)}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    def split_devices(self, devices: Sequence[torch.device | str]) -> VLMo:
        """Place the model across ``devices`` for pipelined inference (e.g. ``["cuda:0", "cuda:1"]``).

        Embeddings, the bias table and the first blocks go on ``devices[0]``; the blocks are cut into
        consecutive equal parts (block ``i`` on ``devices[i * n // depth]``, so two devices get the first half
        and the rest); the final norm, pooler and heads go on the last device. The forward passes move the
        hidden states at each boundary, so outputs equal a single-device run and end on the last device.

        Returns:
            self
        """
        devs = [torch.device(d) for d in devices]
        n = len(devs)
        if not 1 <= n <= len(self.blocks):
            raise ConfigError(f"need between 1 and {len(self.blocks)} devices (one per block at most), got {n}")
        first, last = devs[0], devs[-1]
        for module in (self.text_embed, self.patch_embed, self.token_type):
            module.to(first)
        for i, block in enumerate(self.blocks):
            block.to(devs[i * n // len(self.blocks)])
        for name in ("norm", "pooler", *_HEAD_MODULES):
            module = getattr(self, name)
            if module is not None:
                module.to(last)
        for name, device in (("cls_token", first), ("pos_embed", first), ("rel_pos_table", first)):
            self._move_parameter(name, device)
        for name in ("logit_scale", "logit_vl_scale"):
            self._move_parameter(name, last)
        return self

    def _move_parameter(self, name: str, device: torch.device) -> None:
        param = getattr(self, name)
        if param is not None and param.device != device:
            setattr(self, name, nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad))

    # ------------------------------------------------------------------------------------- embeddings

    @property
    def input_device(self) -> torch.device:
        """Device of the embeddings (where inputs are moved)."""
        return self.patch_embed.weight.device

    def relative_position_index(self, kind: Literal["text", "image", "fusion"], text_len: int = 0) -> Tensor:
        """Rows of the shared bias table used for each (query, key) pair of a sequence (see ``layers.relpos``).

        Args:
            kind: "image" (``[CLS, patches]``), "text" (``text_len`` tokens) or "fusion" (``[text ; image]``).
            text_len: text length for "text" and "fusion".

        Returns:
            (N, N) int64 on the CPU.
        """
        c = self.config
        if kind == "image":
            return relpos.image_relative_position_index(c.grid)
        if kind == "text":
            return relpos.text_relative_position_index(text_len, c.grid, c.max_text_len_of_initckpt)
        return relpos.fusion_relative_position_index(text_len, c.grid, c.max_text_len_of_initckpt)

    def _index(self, kind: Literal["text", "image", "fusion"], text_len: int, device: torch.device) -> Tensor:
        key = (kind, text_len, str(device))
        if key not in self._index_cache:
            self._index_cache[key] = self.relative_position_index(kind, text_len).to(device)
        return self._index_cache[key]

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, H): BERT embeddings plus the text modality embedding."""
        c = self.config
        if text_ids.ndim != 2 or not 1 <= text_ids.shape[1] <= c.max_text_len:
            raise VLMoInputError(f"text ids must be (batch, length <= {c.max_text_len}), got {tuple(text_ids.shape)}")
        text_ids = text_ids.to(self.input_device)
        return self.text_embed(text_ids) + self.token_type.weight[0]

    def embed_image(self, image: Tensor, token_type: int = 1) -> Tensor:
        """(B, 3, S, S) pixels -> (B, 1 + P*P, H): patches, CLS, (absolute positions), modality embedding."""
        c = self.config
        if image.ndim != 4 or tuple(image.shape[1:]) != (3, c.image_size, c.image_size):
            raise VLMoInputError(
                f"images must be (batch, 3, {c.image_size}, {c.image_size}) for this model, got {tuple(image.shape)}"
            )
        if not 1 <= token_type < c.num_token_types:
            raise VLMoInputError(f"image token type {token_type} not in 1..{c.num_token_types - 1}")
        image = image.to(self.input_device, self.patch_embed.weight.dtype)
        x = self.patch_embed(image).flatten(2).transpose(1, 2)  # (B, P*P, H)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x + self.token_type.weight[token_type]

    # --------------------------------------------------------------------------------------- backbone

    def _layer_mask(self, layer: int, index: Tensor | None, keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """Attention mask of one layer on its device: its relative bias (NH, N, N) and/or the key padding."""
        bias = None
        if self.rel_pos_table is not None and index is not None:
            nh = self.config.num_heads
            table = self.rel_pos_table[:, layer * nh : (layer + 1) * nh].to(index.device)
            bias = F.embedding(index, table).permute(2, 0, 1)[None]  # (1, NH, N, N)
        if keep is None:
            return bias
        if bias is None:
            return keep[:, None, None, :]  # bool keep-mask (B, 1, 1, N)
        # Padded keys get -inf on top of the bias, as in the reference; logits are fp32 in the eager path.
        bias = bias.float() if self.attention_impl == "eager" else bias.to(dtype)
        return bias.masked_fill(~keep[:, None, None, :], float("-inf"))

    def _run_blocks(
        self,
        x: Tensor,
        keep: Tensor | None,
        index: Tensor | None,
        modality: Modality,
        text_len: int,
        start: int = 0,
        collect: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run blocks ``start..depth-1``, moving activations to each block's device; returns (out, per-block outs)."""
        outs: list[Tensor] = []
        for i in range(start, len(self.blocks)):
            block = self.blocks[i]
            device = block.norm1.weight.device
            if x.device != device:
                x = x.to(device)
                keep = keep.to(device) if keep is not None else None
                index = index.to(device) if index is not None else None
            x = block(x, self._layer_mask(i, index, keep, x.dtype), modality, text_len)
            if collect:
                outs.append(x)
        return x, outs

    def _final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x.to(self.norm.weight.device))

    def _text_keep(self, text_ids: Tensor, text_mask: Tensor | None) -> Tensor:
        if text_mask is None:
            return torch.ones(text_ids.shape, dtype=torch.bool, device=self.input_device)
        if tuple(text_mask.shape) != tuple(text_ids.shape):
            raise VLMoInputError(
                f"text mask shape {tuple(text_mask.shape)} does not match text ids {tuple(text_ids.shape)}"
            )
        return text_mask.to(self.input_device).bool()

    def forward(
        self,
        text_ids: Tensor | None,
        text_mask: Tensor | None,
        image: Tensor | None,
        *,
        image_token_type: int = 1,
        head: ForwardHead | None = None,
        image_1: Tensor | None = None,
    ) -> VLMoFusionOutput | VLMoDualOutput | Tensor:
        """Fusion pass over ``[text ; image]`` (the reference's ``infer``), or a task head on top of it.

        Lower blocks send text tokens through the language expert and image tokens through the vision
        expert; blocks from ``vlffn_start_layer`` up send all tokens through the VL expert. The text/image
        split is at the given text length: text padded to ``max_text_len`` with masked pads (what the
        reference requires) gives the same features for the real tokens as unpadded text.

        ``head`` selects what is returned. Every training path is reachable through this one call, because
        wrappers such as FSDP gather parameters only inside ``__call__`` of the root module:

        * None: the :class:`VLMoFusionOutput`;
        * "vqa": (B, vqa_num_labels) answer logits from the pooled CLS feature;
        * "itm": (B, 2) image-text matching logits (index 1 = match);
        * "mlm": (B, L, vocab_size) masked-language-model logits on the fused text features (VL pretraining);
        * "nlvr2": (B, 2) logits (index 1 = "True") from the fusions of ``image`` (token type 1) and
          ``image_1`` (token type 2) with the same text;
        * "contrastive": a :class:`VLMoDualOutput` — the text-only and image-only passes (dual encoder, the
          reference's ``infer_text_ft``/``infer_image_ft``) and the logit scale; either input may be None
          (e.g. to encode a retrieval gallery), its pass is then skipped.

        Args:
            text_ids: (B, L) WordPiece ids, ``[CLS] ... [SEP] [PAD]...``, L <= max_text_len (None only for
                ``head="contrastive"``).
            text_mask: (B, L) 1 = real token, 0 = padding (None = all real).
            image: (B, 3, S, S) normalised pixels, S = ``config.image_size`` (None only for
                ``head="contrastive"``).
            image_token_type: modality embedding row of the image (1; NLVR2 uses 2 for its second image).
            head: see above.
            image_1: the second image, for ``head="nlvr2"`` only.

        Returns:
            See ``head``; on the last device.
        """
        if (image_1 is not None) != (head == "nlvr2"):
            raise VLMoInputError('image_1 is given exactly when head="nlvr2"')
        if head == "contrastive":
            self._head("itc_text_proj")
            if text_ids is None and image is None:
                raise VLMoInputError('head="contrastive" needs text_ids, image or both')
            text = self.encode_text(text_ids, text_mask) if text_ids is not None else None
            img = self.encode_image(image, image_token_type=image_token_type) if image is not None else None
            return VLMoDualOutput(text=text, image=img, logit_scale=self.logit_scale)
        if text_ids is None or image is None:
            raise VLMoInputError(f"the fusion pass (head={head!r}) needs both text_ids and image")
        if head is None:
            return self._fuse(text_ids, text_mask, image, image_token_type)
        if head == "vqa":
            return self._head("vqa_head")(self._fuse(text_ids, text_mask, image, image_token_type).cls_feats)
        if head == "itm":
            return self._head("itm_head")(self._fuse(text_ids, text_mask, image, image_token_type).cls_feats)
        if head == "mlm":
            return self._head("mlm_head")(self._fuse(text_ids, text_mask, image, image_token_type).text_feats)
        if head == "nlvr2":
            classifier = self._head("nlvr2_head")
            first = self._fuse(text_ids, text_mask, image, 1).cls_feats
            second = self._fuse(text_ids, text_mask, image_1, 2).cls_feats
            return classifier(torch.cat([first, second], dim=-1))
        raise VLMoInputError(f"unknown head {head!r}; choose one of vqa, itm, mlm, nlvr2, contrastive")

    def _fuse(
        self, text_ids: Tensor, text_mask: Tensor | None, image: Tensor, image_token_type: int
    ) -> VLMoFusionOutput:
        text = self.embed_text(text_ids)  # (B, L, H)
        img = self.embed_image(image, image_token_type)  # (B, 1 + P*P, H)
        if text.shape[0] != img.shape[0]:
            raise VLMoInputError(f"batch sizes differ: {text.shape[0]} texts, {img.shape[0]} images")
        n_text = text.shape[1]
        text_keep = self._text_keep(text_ids, text_mask)
        keep = torch.cat([text_keep, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)], dim=1)
        index = self._index("fusion", n_text, img.device) if self.rel_pos_table is not None else None
        x, _ = self._run_blocks(torch.cat([text, img], dim=1), keep, index, "vl", n_text)
        x = self._final_norm(x)
        return VLMoFusionOutput(
            text_feats=x[:, :n_text],
            image_feats=x[:, n_text:],
            cls_feats=torch.tanh(self.pooler(x[:, 0])),
            raw_cls_feats=x[:, 0],
        )

    def _unimodal(
        self,
        x: Tensor,
        keep: Tensor | None,
        index: Tensor | None,
        modality: Literal["text", "image"],
        proj: nn.Linear | None,
        vl_proj: nn.Linear | None,
        vl_branch: bool,
    ) -> VLMoUnimodalOutput:
        if vl_branch and vl_proj is None:
            raise ConfigError("vl_branch=True needs the pretraining ITC heads (config.heads must include 'itc')")
        last, outs = self._run_blocks(x, keep, index, modality, 0, collect=vl_branch)
        feats = self._final_norm(last)
        cls = F.normalize(proj(feats[:, 0]), dim=-1) if proj is not None else None
        cls_vl = None
        if vl_branch:
            start = self.config.vlffn_start_layer
            # Re-run the VL-expert blocks on the output of block start-1 (Python's [-1] for start 0, as in
            # the reference). A unimodal pass through the VL expert is what pretraining's VL-ITC contrasts.
            h = outs[start - 1]
            if keep is not None:
                keep = keep.to(h.device)
            if index is not None:
                index = index.to(h.device)
            vl, _ = self._run_blocks(h, keep, index, "vl", 0, start=start)
            cls_vl = F.normalize(vl_proj(self._final_norm(vl)[:, 0]), dim=-1)
        return VLMoUnimodalOutput(feats=feats, cls_feats=cls, cls_vl_feats=cls_vl, raw_cls_feats=last[:, 0])

    def encode_text(
        self, text_ids: Tensor, text_mask: Tensor | None = None, *, vl_branch: bool = False
    ) -> VLMoUnimodalOutput:
        """Text-only pass through the language expert in every block.

        ``vl_branch=False`` is the reference's ``infer_text_ft`` (retrieval) and, for ``feats``,
        ``infer_text_mlm``; ``vl_branch=True`` is ``infer_text`` (pretraining ITC).

        Args:
            text_ids: (B, L) ids, L <= max_text_len.
            text_mask: (B, L) 1 = real token (None = all real).
            vl_branch: also compute the VL-expert feature ``cls_vl_feats``.
        """
        x = self.embed_text(text_ids)
        keep = self._text_keep(text_ids, text_mask)
        index = self._index("text", x.shape[1], x.device) if self.rel_pos_table is not None else None
        return self._unimodal(x, keep, index, "text", self.itc_text_proj, self.itc_vl_text_proj, vl_branch)

    def encode_image(self, image: Tensor, *, image_token_type: int = 1, vl_branch: bool = False) -> VLMoUnimodalOutput:
        """Image-only pass through the vision expert in every block.

        ``vl_branch=False`` is the reference's ``infer_image_ft``; ``vl_branch=True`` is ``infer_image``.

        Args:
            image: (B, 3, S, S) pixels.
            image_token_type: modality embedding row of the image.
            vl_branch: also compute the VL-expert feature ``cls_vl_feats``.
        """
        x = self.embed_image(image, image_token_type)
        index = self._index("image", 0, x.device) if self.rel_pos_table is not None else None
        return self._unimodal(x, None, index, "image", self.itc_image_proj, self.itc_vl_image_proj, vl_branch)

    # ------------------------------------------------------------------------------------------ heads

    def _head(self, name: str) -> nn.Module:
        head = getattr(self, name)
        if head is None:
            raise ConfigError(f"this VLMo model has no {name} (config.heads = {self.config.heads})")
        return head

    def vqa_logits(self, text_ids: Tensor, text_mask: Tensor | None, image: Tensor) -> Tensor:
        """(B, vqa_num_labels) answer logits from the fusion CLS feature (``self(..., head="vqa")``)."""
        return self(text_ids, text_mask, image, head="vqa")

    def nlvr2_logits(self, text_ids: Tensor, text_mask: Tensor | None, image_0: Tensor, image_1: Tensor) -> Tensor:
        """(B, 2) logits (index 1 = "True") from the fusion CLS features of both images (token types 1 and 2)."""
        return self(text_ids, text_mask, image_0, head="nlvr2", image_1=image_1)

    def itm_logits(self, cls_feats: Tensor) -> Tensor:
        """(B, 2) image-text matching logits (index 1 = match) from fusion ``cls_feats`` (B, H)."""
        return self._head("itm_head")(cls_feats)

    def mlm_logits(self, text_feats: Tensor) -> Tensor:
        """(B, L, vocab) masked-language-model logits from text features (fusion or text-only)."""
        return self._head("mlm_head")(text_feats)
