"""Layer normalisation that always computes in fp32.

LAVIS wraps both ``ln_vision`` and the CLIP ViT's norms in a LayerNorm that upcasts to fp32 and casts the
result back, so a half-precision model normalises with fp32 statistics. We use the same layer everywhere:
for fp32 inputs it is exactly ``nn.LayerNorm``; for bf16/fp16 inputs the statistics stay accurate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose arithmetic runs in fp32; the output has the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
