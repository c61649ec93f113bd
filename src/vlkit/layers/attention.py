"""Scaled dot-product attention with a fast path and a reference path.

``attend`` is the single place where attention weights are computed. The fast path is PyTorch's
``scaled_dot_product_attention`` (fused kernels on CUDA, oneDNN/flash on CPU); the eager path writes the
softmax out in plain tensor ops and exists to pin down the semantics (tests compare the two) and to
return attention probabilities when a caller wants to look at them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionImpl = Literal["sdpa", "eager"]


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
    impl: AttentionImpl = "sdpa",
) -> Tensor:
    """Attention of ``q`` over ``k``/``v``.

    Args:
        q: queries (B, H, Lq, D).
        k: keys (B, H, Lk, D).
        v: values (B, H, Lk, Dv).
        mask: additive float mask broadcastable to (B, H, Lq, Lk) (0 = keep, large negative = drop),
            or a bool mask where True = keep.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        scale: logit scale; ``D ** -0.5`` when None.
        is_causal: apply a causal mask aligned to the bottom-right (only without ``mask``).
        impl: "sdpa" (fast) or "eager" (reference).

    Returns:
        (B, H, Lq, Dv)
    """
    if impl == "sdpa":
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )
    out, _ = attend_eager(q, k, v, mask, dropout_p=dropout_p, scale=scale, is_causal=is_causal)
    return out


def attend_eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    dropout_p: float = 0.0,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reference attention; same arguments as :func:`attend`.

    Returns:
        (output (B, H, Lq, Dv), probabilities (B, H, Lq, Lk))
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), probs
