"""Scaled dot-product attention with a fast path and a reference path.

``attend`` is the single place where attention weights are computed. The fast path is PyTorch's
``scaled_dot_product_attention`` (fused kernels on CUDA, oneDNN/flash on CPU); the eager path writes the
softmax out in plain tensor ops and exists to pin down the semantics (tests compare the two) and to
return attention probabilities when a caller wants to look at them.

One exception inside the fast path: on CPU, when autograd records a bf16/fp16 attention over at most
``CPU_EAGER_MAX_KEYS`` keys, ``attend`` runs the plain ops. PyTorch's CPU flash-attention backward in reduced
precision is 6-9x slower than matmul + softmax for the short sequences of the small models trained on CPU
(measured with torch 2.13, one thread, bf16, 4 heads of 32: 65 tokens 34.7 ms vs 5.3 ms forward+backward,
40 tokens 85 ms vs 10 ms; 257 tokens 150 ms vs 142 ms), and it was half of a shapes stage-1 training step.
Inference and fp32 keep the fused kernel (it is the faster one there).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionImpl = Literal["sdpa", "eager"]

CPU_EAGER_MAX_KEYS = 320  # the longest key sequence measured where the plain ops are no slower (see above)


def _cpu_reduced_precision_backward(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``attend``'s fast path should run the plain ops (see the module docstring)."""
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= CPU_EAGER_MAX_KEYS
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    )


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
    if impl == "sdpa" and not _cpu_reduced_precision_backward(q, k, v):
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


def eager_transformers_attention_for_cpu_training(model: torch.nn.Module, device: torch.device, precision: str) -> int:
    """Switch the transformers models inside ``model`` from SDPA to eager attention when training on CPU in
    bf16/fp16, for the reason in the module docstring (a shapes LM step: 0.097 s -> 0.058 s). Our own layers
    decide per call in :func:`attend`; a transformers model picks its kernel once, so the trainer asks here.

    Returns:
        How many transformers models were switched (the outermost ones; their submodules follow).
    """
    if device.type != "cpu" or precision not in ("bf16", "fp16"):
        return 0
    switched = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and callable(
            getattr(module, "set_attn_implementation", None)
        ):
            module.set_attn_implementation("eager")
            switched += 1
    return switched
