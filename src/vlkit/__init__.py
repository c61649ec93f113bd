"""vlkit: BLIP-2, InstructBLIP and VLMo on current PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
