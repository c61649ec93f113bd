"""BLIP-2 stage 1: a frozen ViT, ``ln_vision``, learned queries, the Q-Former and the ITC/ITM/ITG heads.

The model returns features and logits only. Losses (``vlkit.losses``), tokenisation
(``vlkit.processors``), cross-process gathers and negative sampling live outside it; the pieces here are
what they combine::

    image_embeds = model.encode_image(pixel_values)                      # (B, N, Dv) after ln_vision
    q = model.encode_queries(image_embeds, use_cache=True)               # q.query_output (B, Q, D), q.cache
    image_feats = model.project_image(q.query_output)                    # (B, Q, E), unit norm
    text_feat = model.project_text(model.encode_text(ids, mask))         # (B, E), unit norm, from [CLS]
    sim = model.itc_similarity(image_feats, text_feat)                   # (B, B) cosine, max over queries
    itm = model.itm_logits(image_embeds, ids, mask)                      # (B, 2), class 1 = match
    lm = model.itg_logits(decoder_ids, q.cache, mask)                    # (B, T, V), [DEC] at position 0

The stage-2 LLM bridge (``Blip2Config.lm``) is added by the stage-2 model; this module covers the vision
encoder, the Q-Former and the stage-1 heads.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import ConfigError
from vlkit.layers.attention import AttentionImpl
from vlkit.layers.norm import LayerNorm
from vlkit.layers.vit import VisionConfig, VisionTransformer
from vlkit.models.qformer import QFormer, QFormerCache, QFormerConfig, QFormerOutput

DEC_TOKEN_ID = 30522  # "[DEC]", appended to bert-base-uncased's vocabulary; replaces [CLS] for ITG


@dataclass
class Blip2Config:
    """A BLIP-2 model.

    Attributes:
        vision: the ViT.
        qformer: the Q-Former; ``qformer.encoder_width`` must equal ``vision.width``.
        num_query_tokens: number of learned queries (32).
        embed_dim: width of the contrastive space of ``vision_proj``/``text_proj`` (256).
        ln_vision_eps: eps of ``ln_vision``: 1e-5 in LAVIS, 1e-6 in transformers (it reuses the ViT eps).
        itc_itm_heads: has ``vision_proj``, ``text_proj``, ``itm_head`` and ``temp`` (stage 1).
        lm: reserved for the stage-2 LLM bridge; must be None for this model.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    embed_dim: int = 256
    ln_vision_eps: float = 1e-5
    itc_itm_heads: bool = True
    lm: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.qformer.encoder_width != self.vision.width:
            raise ConfigError(
                f"qformer.encoder_width ({self.qformer.encoder_width}) must equal vision.width ({self.vision.width})"
            )
        if self.num_query_tokens <= 0 or self.embed_dim <= 0:
            raise ConfigError("num_query_tokens and embed_dim must be positive")
        if self.itc_itm_heads and not self.qformer.text_input:
            raise ConfigError("itc_itm_heads=True needs a Q-Former with text input (qformer.text_input=True)")
        if self.lm is not None:
            raise ConfigError("Blip2Config.lm: this model has no LLM bridge; build the stage-2 model for an LLM")


@dataclass
class Blip2Output:
    """Image-side and text-side features of one batch (what the stage-1 objectives start from)."""

    image_embeds: Tensor  # (B, N, Dv) ViT tokens after ln_vision
    query_output: Tensor  # (B, Q, D) query outputs of the unimodal (queries-only) pass
    image_feats: Tensor  # (B, Q, E) L2-normalised vision_proj(query_output)
    text_output: Tensor | None = None  # (B, T, D) text-only pass
    text_feat: Tensor | None = None  # (B, E) L2-normalised text_proj of the [CLS] output
    query_cache: QFormerCache | None = None  # self-attention K/V of the query pass (for ITG)


@dataclass
class LMOutput:
    """Logits of the Q-Former MLM head for the new text positions, and the updated cache."""

    logits: Tensor  # (B, T, V)
    cache: QFormerCache | None = None


class Blip2(nn.Module):
    """BLIP-2 vision encoder + Q-Former with the stage-1 heads.

    Args:
        config: the architecture.
        device: where to create the parameters (``"meta"`` builds a shape-only model instantly).
        dtype: parameter dtype (default: torch's default dtype).
    """

    def __init__(
        self, config: Blip2Config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.config = config
        d = config.qformer.hidden_size
        with torch.device(device) if device is not None else nullcontext():
            self.vision = VisionTransformer(config.vision)
            self.ln_vision = LayerNorm(config.vision.width, eps=config.ln_vision_eps)
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, d))
            self.qformer = QFormer(config.qformer)
            if config.itc_itm_heads:
                self.vision_proj = nn.Linear(d, config.embed_dim)
                self.text_proj = nn.Linear(d, config.embed_dim)
                self.itm_head = nn.Linear(d, 2)
                self.temp = nn.Parameter(torch.tensor(0.07))
            else:
                self.vision_proj = self.text_proj = self.itm_head = None
                self.temp = None
            self._init_own_weights()
        if dtype is not None:
            self.to(dtype)
        self._vision_frozen = False

    @torch.no_grad()
    def _init_own_weights(self) -> None:
        nn.init.normal_(self.query_tokens, std=0.02)
        for head in (self.vision_proj, self.text_proj, self.itm_head):
            if head is not None:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    # ----------------------------------------------------------------------------------- training state
    def freeze_vision(self, frozen: bool = True) -> None:
        """Freeze (or unfreeze) the ViT: no gradients, and kept in eval mode by ``train()``.

        ``ln_vision`` is not part of the frozen ViT: it stays trainable, as in every reference stage.
        """
        self._vision_frozen = frozen
        self.vision.requires_grad_(not frozen)
        self.vision.train(False if frozen else self.training)

    @property
    def vision_frozen(self) -> bool:
        return self._vision_frozen

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        if self._vision_frozen:
            self.vision.eval()
        return self

    def set_attn_impl(self, impl: AttentionImpl) -> None:
        """Switch every attention layer to "sdpa" (fast) or "eager" (reference)."""
        for module in self.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl
        self.config.vision.attn_impl = impl
        self.config.qformer.attn_impl = impl

    # ----------------------------------------------------------------------------------- image side
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """ViT + ``ln_vision``: (B, 3, S, S) -> image_embeds (B, N, Dv), the Q-Former's cross-attention input."""
        return self.ln_vision(self.vision(pixel_values))

    def encode_queries(
        self, image_embeds: Tensor, *, image_mask: Tensor | None = None, use_cache: bool = False
    ) -> QFormerOutput:
        """Queries-only (unimodal) Q-Former pass over ``image_embeds`` (B, N, Dv).

        Returns:
            QFormerOutput: ``query_output`` (B, Q, D); with ``use_cache`` also the self-attention K/V of
            every layer, which ITG and Q-Former captioning attend to.
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds=image_embeds, image_mask=image_mask, use_cache=use_cache)

    def project_image(self, query_output: Tensor) -> Tensor:
        """L2-normalised ``vision_proj`` of every query output: (B, Q, D) -> image_feats (B, Q, E)."""
        return F.normalize(self._head("vision_proj")(query_output), dim=-1)

    # ----------------------------------------------------------------------------------- text side
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Text-only (unimodal) Q-Former pass: (B, T) ids -> text_output (B, T, D)."""
        return self.qformer(input_ids=input_ids, attention_mask=attention_mask).hidden_states

    def project_text(self, text_output: Tensor) -> Tensor:
        """L2-normalised ``text_proj`` of the [CLS] (position 0) output: (B, T, D) -> text_feat (B, E)."""
        return F.normalize(self._head("text_proj")(text_output[:, 0]), dim=-1)

    # ----------------------------------------------------------------------------------- multimodal
    def encode_multimodal(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Bi-directional queries+text pass: query outputs (B, Q, D) (LAVIS's multimodal_embeds).

        Args:
            image_embeds: (B, N, Dv).
            input_ids: (B, T).
            attention_mask: (B, T) text padding mask.
        """
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        out = self.qformer(queries, input_ids, attention_mask, image_embeds)
        return out.query_output

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Image-text matching logits (B, 2): ``itm_head`` of each query output, averaged over queries.

        Class 1 means "match". Retrieval re-ranking uses the raw class-1 logit.
        """
        return self._head("itm_head")(self.encode_multimodal(image_embeds, input_ids, attention_mask)).mean(dim=1)

    def itg_logits(
        self,
        input_ids: Tensor,
        query_cache: QFormerCache,
        attention_mask: Tensor | None = None,
        *,
        use_cache: bool = False,
    ) -> LMOutput:
        """Image-grounded text generation logits: causal text over the cached query keys/values.

        Args:
            input_ids: (B, T) decoder ids, ``[DEC]`` (``DEC_TOKEN_ID``) at position 0 of the caption.
            query_cache: cache of ``encode_queries(..., use_cache=True)`` (or of an earlier decode step).
            attention_mask: (B, query_cache.text_len + T) text padding mask, or None.
            use_cache: also return the cache extended by these tokens (token-by-token decoding).

        Returns:
            LMOutput with logits (B, T, V): position t predicts token t + 1.
        """
        out = self.qformer(
            input_ids=input_ids, attention_mask=attention_mask, causal=True, past=query_cache, use_cache=use_cache
        )
        return LMOutput(self.qformer.lm_logits(out.hidden_states), out.cache)

    # ----------------------------------------------------------------------------------- contrastive
    @staticmethod
    def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
        """Cosine image-text similarity, max over queries (no temperature).

        Args:
            image_feats: (Bi, Q, E) unit-norm query features.
            text_feats: (Bt, E) unit-norm text features.

        Returns:
            (Bi, Bt)
        """
        bi, q, e = image_feats.shape
        sim = image_feats.reshape(bi * q, e) @ text_feats.to(image_feats.dtype).t()  # (Bi*Q, Bt)
        return sim.view(bi, q, -1).amax(dim=1)

    def itc_logits(self, image_feats: Tensor, text_feats: Tensor) -> tuple[Tensor, Tensor]:
        """Contrastive logits: similarity / ``temp`` (learnable, not clamped).

        Returns:
            (logits_i2t (Bi, Bt), logits_t2i (Bt, Bi))
        """
        sim = self.itc_similarity(image_feats, text_feats) / self._head("temp")
        return sim, sim.t()

    def forward(
        self,
        pixel_values: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        use_cache: bool = False,
    ) -> Blip2Output:
        """Image-side features and (with text) text-side features of a batch.

        Args:
            pixel_values: (B, 3, S, S).
            input_ids, attention_mask: (B, T) tokenised captions, or None for images only.
            use_cache: keep the query pass's self-attention K/V (needed for ITG).
        """
        image_embeds = self.encode_image(pixel_values)
        q = self.encode_queries(image_embeds, use_cache=use_cache)
        out = Blip2Output(image_embeds, q.query_output, self.project_image(q.query_output), query_cache=q.cache)
        if input_ids is not None:
            out.text_output = self.encode_text(input_ids, attention_mask)
            out.text_feat = self.project_text(out.text_output)
        return out

    def _head(self, name: str) -> Any:
        module = getattr(self, name)
        if module is None:
            raise ConfigError(f"this BLIP-2 model has no {name} (itc_itm_heads=False)")
        return module
