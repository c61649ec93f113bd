"""CPU training: attention forward+backward, PyTorch's fused SDPA vs the plain ops ``vlkit.layers.attention.attend``
runs for bf16/fp16 training on CPU.

Each row times forward + backward of one attention of the given shape (batch, heads, tokens, head size), one
thread, on the same random tensors: ``torch.nn.functional.scaled_dot_product_attention`` (what transformers'
"sdpa" and vlkit's fast path call elsewhere) against ``vlkit.layers.attention.attend``. The ratio is fused /
vlkit time (> 1: vlkit faster). "max |grad diff|" compares vlkit's query gradient with the fused kernel's.
The shapes are those of the shapes-world models trained on CPU (ViT 65 tokens, ITM pairs 40 tokens) and a
patch-4 ViT (257 tokens), plus the fp32 case where vlkit keeps the fused kernel.

    python benchmarks/cpu_training_attention.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

from vlkit.layers.attention import attend  # noqa: E402

CASES = [
    ((64, 4, 65, 32), torch.bfloat16),
    ((192, 4, 40, 32), torch.bfloat16),
    ((64, 4, 257, 32), torch.bfloat16),
    ((64, 4, 65, 32), torch.float32),
]


def _time(fn, tensors: list[torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    def once() -> torch.Tensor:
        for t in tensors:
            t.grad = None
        fn(*tensors).float().sum().backward()
        return tensors[0].grad

    once()
    start = time.perf_counter()
    for _ in range(repeats):
        grad = once()
    return (time.perf_counter() - start) / repeats, grad


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, forward + backward per call")
    header = (
        f"{'shape (B, H, L, D)':<20} {'dtype':<9} {'fused ms':>9} {'vlkit ms':>9} {'ratio':>6} {'max |grad diff|':>16}"
    )
    print(header)
    print("-" * len(header))
    for shape, dtype in CASES:
        tensors = [torch.randn(shape, dtype=dtype).requires_grad_() for _ in range(3)]
        repeats = 3 if shape[2] > 100 else 10
        fused, grad_fused = _time(F.scaled_dot_product_attention, tensors, repeats)
        ours, grad_ours = _time(attend, tensors, repeats)
        diff = (grad_fused.float() - grad_ours.float()).abs().max().item()
        print(
            f"{str(shape):<20} {str(dtype).removeprefix('torch.'):<9} {fused * 1e3:9.1f} {ours * 1e3:9.1f} "
            f"{fused / ours:6.2f} {diff:16.2e}"
        )


if __name__ == "__main__":
    main()
