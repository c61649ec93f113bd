"""The BLIP-2 Querying Transformer (Q-Former).

A BERT-base encoder (post-norm, LayerNorm eps 1e-12, exact GELU, no token-type embeddings) with three
changes, all of which matter for parity with LAVIS and transformers:

* a set of learned query vectors (owned by the enclosing model) is concatenated *before* the text tokens;
  queries get no position embedding, text positions start at 0, and the embedding LayerNorm runs over the
  whole ``[queries; text]`` sequence;
* every ``cross_attention_freq``-th layer (0, f, 2f, ...) lets the *query slice only* cross-attend to the
  image tokens;
* the feed-forward block is split by modality: queries use ``query_ffn``, text uses ``text_ffn``.

Self-attention masks (additive, -10000 for "masked", as the reference) come in three modes:

* unimodal: queries alone, or text alone with its padding mask (ITC, feature extraction);
* bi-directional: queries and text see every non-pad token (ITM, multimodal features, InstructBLIP);
* multimodal causal (``causal=True``): queries see only queries, text token t sees all queries and the
  text tokens <= t (ITG and Q-Former captioning).

ITG never runs the joint sequence: the query pass caches its self-attention keys/values
(``use_cache=True``) and the text pass attends to them through ``past``. The same cache serves
token-by-token captioning.

Variants (see ``QFormerConfig``): stage-2 BLIP-2 drops the text embeddings, the text FFNs and the MLM head
(``text_input=False, lm_head=False``); InstructBLIP keeps the text path but drops the head
(``text_input=True, lm_head=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlkit.errors import ConfigError
from vlkit.layers.attention import AttentionImpl, attend
from vlkit.layers.mlp import Activation, activation
from vlkit.layers.norm import LayerNorm

MASK_VALUE = -10000.0  # the reference's additive mask value (not -inf)


@dataclass
class QFormerConfig:
    """Shape of a Q-Former. Defaults are BLIP-2's (BERT-base, vocab 30522 + ``[DEC]``, ViT-g width).

    Attributes:
        encoder_width: width of the image tokens the cross-attention reads (the ViT width).
        cross_attention_freq: layers with ``index % freq == 0`` cross-attend to the image.
        text_input: has word/position embeddings and per-layer text FFNs (stage 1, InstructBLIP).
        lm_head: has the BERT MLM head used for ITG and Q-Former captioning (stage 1 only).
        attn_impl: "sdpa" (fast) or "eager" (reference) attention.
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_width: int = 1408
    cross_attention_freq: int = 2
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    ln_eps: float = 1e-12
    act: Activation = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int | None = 0
    text_input: bool = True
    lm_head: bool = True
    attn_impl: AttentionImpl = "sdpa"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "encoder_width"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"QFormerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"QFormerConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.cross_attention_freq <= 0:
            raise ConfigError(f"QFormerConfig.cross_attention_freq must be positive, got {self.cross_attention_freq}")
        if self.lm_head and not self.text_input:
            raise ConfigError("QFormerConfig: lm_head=True needs text_input=True (the head is tied to word embeddings)")
        if self.text_input and self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"QFormerConfig.pad_token_id {self.pad_token_id} is outside the vocabulary")

    def has_cross_attention(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) cross-attends to the image."""
        return layer % self.cross_attention_freq == 0


@dataclass
class QFormerCache:
    """Self-attention keys/values of every layer for the positions processed so far.

    Positions are ordered ``[queries; text]``; ``query_len`` of them are queries.
    """

    layers: list[tuple[Tensor, Tensor]]  # per layer: keys and values, each (B, H, L, Dh)
    query_len: int

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def text_len(self) -> int:
        return self.length - self.query_len

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def index_select(self, index: Tensor) -> QFormerCache:
        """Pick/reorder/repeat batch rows (beam search): row i of the result is row ``index[i]``."""
        return QFormerCache(
            [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers], self.query_len
        )

    def repeat_interleave(self, repeats: int) -> QFormerCache:
        """Repeat every batch row ``repeats`` times in place order (one copy per beam/sample)."""
        index = torch.arange(self.batch_size, device=self.layers[0][0].device).repeat_interleave(repeats)
        return self.index_select(index)


@dataclass
class QFormerOutput:
    """Last hidden states of the new positions, ``[queries; text]``, and the updated cache."""

    hidden_states: Tensor  # (B, Q + T, D)
    query_len: int
    cache: QFormerCache | None = None

    @property
    def query_output(self) -> Tensor:
        """(B, Q, D)"""
        return self.hidden_states[:, : self.query_len]

    @property
    def text_output(self) -> Tensor:
        """(B, T, D)"""
        return self.hidden_states[:, self.query_len :]


def self_attention_mask(
    text_mask: Tensor | None,
    *,
    batch: int,
    query_len: int,
    new_query_len: int,
    past_text_len: int,
    new_text_len: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """Additive self-attention mask for keys ``[queries; text]`` and rows ``[new queries; new text]``.

    Args:
        text_mask: (B, past_text_len + new_text_len) padding mask of the text keys (1 keep, 0 pad), or None.
        batch: batch size.
        query_len: number of query keys (cached or new).
        new_query_len: number of query rows in this forward (0 when the queries are cached).
        past_text_len: number of cached text keys.
        new_text_len: number of text rows in this forward.
        causal: multimodal-causal mode (else bi-directional / unimodal).
        dtype, device: of the result.

    Returns:
        None when nothing is masked, else (B, 1, 1, Lk) or, when causal, (B, 1, Lq, Lk), 0 or -10000.
    """
    text_keys = past_text_len + new_text_len
    if text_mask is not None and tuple(text_mask.shape) != (batch, text_keys):
        raise ValueError(f"attention_mask must have shape ({batch}, {text_keys}), got {tuple(text_mask.shape)}")
    if not causal or new_text_len == 0:
        # Bi-directional (or queries alone): every row sees every non-pad key.
        if text_mask is None or text_keys == 0:
            return None
        keep = torch.cat([torch.ones(batch, query_len, device=device), text_mask.to(device, torch.float32)], dim=1)
        return ((1.0 - keep) * MASK_VALUE).to(dtype)[:, None, None, :]
    rows = new_query_len + new_text_len
    keep = torch.zeros(rows, query_len + text_keys, device=device)
    keep[:, :query_len] = 1.0  # everyone sees the queries
    positions = torch.arange(past_text_len, text_keys, device=device)  # absolute text position of each text row
    keep[new_query_len:, query_len:] = (
        torch.arange(text_keys, device=device)[None, :] <= positions[:, None]
    ).float()  # text rows see text keys up to their own position; query rows see no text
    keep = keep[None].expand(batch, -1, -1)
    if text_mask is not None:
        pad = torch.cat([torch.ones(batch, query_len, device=device), text_mask.to(device, torch.float32)], dim=1)
        keep = keep * pad[:, None, :]
    return ((1.0 - keep) * MASK_VALUE).to(dtype)[:, None]


class QFormerAttention(nn.Module):
    """BERT attention sub-layer: multi-head attention, output projection, dropout, post-norm residual."""

    def __init__(self, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)
        self.out = nn.Linear(d, d)
        self.norm = LayerNorm(d, eps=config.ln_eps)
        self.attention_dropout = config.attention_dropout
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.attn_impl: AttentionImpl = config.attn_impl

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        kv_input: Tensor | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from ``x`` (B, L, D) to itself (plus ``past``) or to ``kv_input`` (B, N, kv_width).

        Returns:
            The sub-layer output (B, L, D) and the keys/values attended to, each (B, H, Lk, Dh).
        """
        source = x if kv_input is None else kv_input
        k, v = self._split(self.key(source)), self._split(self.value(source))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        q = self._split(self.query(x))
        p = self.attention_dropout if self.training else 0.0
        out = attend(q, k, v, mask, dropout_p=p, impl=self.attn_impl)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.norm(self.dropout(self.out(out)) + x), (k, v)


class QFormerFeedForward(nn.Module):
    """BERT feed-forward sub-layer: ``norm(dropout(fc2(act(fc1(x)))) + x)``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, eps=config.ln_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.act = config.act

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.dropout(self.fc2(activation(self.act, self.fc1(x)))) + x)


class QFormerLayer(nn.Module):
    """Self-attention over ``[queries; text]``, cross-attention for the queries (some layers), split FFN."""

    def __init__(self, config: QFormerConfig, index: int) -> None:
        super().__init__()
        self.self_attn = QFormerAttention(config, config.hidden_size)
        self.cross_attn = QFormerAttention(config, config.encoder_width) if config.has_cross_attention(index) else None
        self.query_ffn = QFormerFeedForward(config)
        self.text_ffn = QFormerFeedForward(config) if config.text_input else None

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None,
        query_len: int,
        image_embeds: Tensor | None,
        image_mask: Tensor | None,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self.self_attn(x, mask, past=past)
        parts = []
        if query_len > 0:
            q = h[:, :query_len]
            if self.cross_attn is not None:
                if image_embeds is None:
                    raise ValueError("image_embeds are required when queries pass a cross-attention layer")
                q, _ = self.cross_attn(q, image_mask, kv_input=image_embeds)
            parts.append(self.query_ffn(q))
        if h.shape[1] > query_len:
            parts.append(self.text_ffn(h[:, query_len:]))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), kv


class QFormerLMHead(nn.Module):
    """BERT MLM head: dense, activation, LayerNorm, then the word embeddings (tied) plus a bias."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = LayerNorm(config.hidden_size, eps=config.ln_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.act = config.act

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(activation(self.act, self.dense(hidden))), word_embeddings, self.bias)


class QFormer(nn.Module):
    """Q-Former encoder (embeddings, layers, optional MLM head); the query vectors are passed in."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        if config.text_input:
            self.word_embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
            self.pos_embed = nn.Embedding(config.max_position_embeddings, d)
        else:
            self.word_embed = self.pos_embed = None
        self.embed_norm = LayerNorm(d, eps=config.ln_eps)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))
        self.lm_head = QFormerLMHead(config) if config.lm_head else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.bias)

    @torch.no_grad()
    def init_query_ffn_from_text(self) -> None:
        """Copy every text FFN into its query FFN, as BLIP-2 does after loading BERT weights."""
        if not self.config.text_input:
            raise ConfigError("init_query_ffn_from_text: this Q-Former has no text FFNs")
        for layer in self.layers:
            layer.query_ffn.load_state_dict(layer.text_ffn.state_dict())

    def forward(
        self,
        query_embeds: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        *,
        causal: bool = False,
        past: QFormerCache | None = None,
        use_cache: bool = False,
    ) -> QFormerOutput:
        """Run the Q-Former over ``[queries; text]``.

        Args:
            query_embeds: (B, Q, D) query vectors (not allowed together with ``past``: queries come first).
            input_ids: (B, T) text token ids.
            attention_mask: (B, T) text padding mask (1 keep, 0 pad); with ``past`` it covers the cached
                text too: (B, past.text_len + T). Queries are never masked. None = no padding.
            image_embeds: (B, N, encoder_width) image tokens for the cross-attention layers.
            image_mask: (B, N) image padding mask, or None (all tokens valid, the reference's case).
            causal: multimodal-causal mask (ITG, captioning) instead of bi-directional.
            past: cached keys/values of earlier positions (from ``use_cache=True``).
            use_cache: return the keys/values of all positions (past + new) in ``output.cache``.

        Returns:
            QFormerOutput with hidden states (B, Q + T, D) of the new positions.
        """
        if query_embeds is None and input_ids is None:
            raise ValueError("QFormer.forward needs query_embeds, input_ids or both")
        if query_embeds is not None and past is not None:
            raise ValueError("queries must come first: pass query_embeds without past, then text with past")
        if input_ids is not None and self.word_embed is None:
            raise ConfigError("this Q-Former has no text input (text_input=False): pass query_embeds only")
        dtype = self.embed_norm.weight.dtype
        batch = (query_embeds if query_embeds is not None else input_ids).shape[0]
        device = self.embed_norm.weight.device
        new_queries = query_embeds.shape[1] if query_embeds is not None else 0
        query_len = past.query_len if past is not None else new_queries
        past_text = past.text_len if past is not None else 0
        new_text = input_ids.shape[1] if input_ids is not None else 0
        if past is not None and past.batch_size != batch:
            raise ValueError(f"past holds {past.batch_size} rows but the input has {batch}")

        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.to(dtype))
        if input_ids is not None:
            if past_text + new_text > self.config.max_position_embeddings:
                raise ValueError(
                    f"text of {past_text + new_text} tokens exceeds max_position_embeddings "
                    f"{self.config.max_position_embeddings}"
                )
            positions = torch.arange(past_text, past_text + new_text, device=input_ids.device)
            parts.append(self.word_embed(input_ids) + self.pos_embed(positions)[None])
        x = self.embed_dropout(self.embed_norm(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]))

        mask = self_attention_mask(
            attention_mask,
            batch=batch,
            query_len=query_len,
            new_query_len=new_queries,
            past_text_len=past_text,
            new_text_len=new_text,
            causal=causal,
            dtype=dtype,
            device=device,
        )
        cross_mask = None
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)
            if image_mask is not None:
                cross_mask = ((1.0 - image_mask.to(device, torch.float32)) * MASK_VALUE).to(dtype)[:, None, None, :]

        cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, new_queries, image_embeds, cross_mask, None if past is None else past.layers[i])
            if use_cache:
                cache.append(kv)
        return QFormerOutput(x, new_queries, QFormerCache(cache, query_len) if use_cache else None)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """MLM-head logits (..., vocab) for text hidden states (..., D)."""
        if self.lm_head is None:
            raise ConfigError("this Q-Former has no MLM head (lm_head=False)")
        return self.lm_head(hidden, self.word_embed.weight)
