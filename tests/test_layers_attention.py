import pytest
import torch

from vlkit.layers.attention import attend, attend_eager


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_sdpa_matches_eager_with_additive_mask(dtype, atol):
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=dtype) for _ in range(3))
    k, v = torch.randn(2, 3, 7, 8, dtype=dtype), torch.randn(2, 3, 7, 8, dtype=dtype)
    keep = torch.rand(2, 1, 1, 7) > 0.3
    keep[..., 0] = True
    mask = (~keep).to(dtype) * -10000.0
    torch.testing.assert_close(attend(q, k, v, mask), attend(q, k, v, mask, impl="eager"), atol=atol, rtol=0)
    torch.testing.assert_close(attend(q, k, v, keep), attend(q, k, v, mask, impl="eager"), atol=atol, rtol=0)


def test_causal_and_probabilities():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    out, probs = attend_eager(q, k, v, is_causal=True)
    torch.testing.assert_close(attend(q, k, v, is_causal=True), out, atol=1e-5, rtol=0)
    assert torch.all(probs.triu(1) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 4))
    # First query attends only to the first key.
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
