"""Feed-forward blocks and the activations the reference models use."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["gelu", "gelu_tanh", "quick_gelu"]


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: Activation, x: Tensor) -> Tensor:
    """Apply the activation called ``name`` ("gelu" is the exact erf form)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return quick_gelu(x)
    raise ValueError(f"unknown activation {name!r}")


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` (ViT MLP; no dropout, as in both reference ViTs)."""

    def __init__(self, dim: int, hidden_dim: int, act: Activation = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(activation(self.act, self.fc1(x)))
