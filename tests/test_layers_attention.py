import pytest
import torch

from vlkit.layers.attention import (
    CPU_EAGER_MAX_KEYS,
    attend,
    attend_eager,
    eager_transformers_attention_for_cpu_training,
)


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


def _counting_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_cpu_reduced_precision_backward_runs_the_plain_ops(monkeypatch):
    """On CPU, a bf16 attention that autograd records takes the plain ops (PyTorch's CPU flash backward is
    slow there); its values and gradients stay those of fp32 attention to bf16 precision."""
    calls = _counting_sdpa(monkeypatch)
    torch.manual_seed(0)
    ref = [torch.randn(2, 4, 9, 16) for _ in range(3)]
    mask = torch.zeros(2, 1, 1, 9)
    mask[0, ..., -3:] = -10000.0
    low = [t.to(torch.bfloat16).requires_grad_() for t in ref]
    out = attend(*low, mask.to(torch.bfloat16))
    assert calls == []  # the plain ops ran
    full = [t.clone().requires_grad_() for t in ref]
    expected = attend(*full, mask, impl="eager")
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=0)
    weights = torch.randn_like(expected)
    (out.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    for got, want in zip(low, full, strict=True):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "dtype, grad, keys",
    [
        (torch.bfloat16, False, 9),  # inference: the fused kernel
        (torch.float32, True, 9),  # fp32 training: the fused kernel is the faster one
        (torch.bfloat16, True, CPU_EAGER_MAX_KEYS + 1),  # long sequences: the fused kernel
    ],
)
def test_fused_kernel_elsewhere(monkeypatch, dtype, grad, keys):
    calls = _counting_sdpa(monkeypatch)
    q = torch.randn(1, 2, 3, 8, dtype=dtype, requires_grad=grad)
    k, v = torch.randn(1, 2, keys, 8, dtype=dtype), torch.randn(1, 2, keys, 8, dtype=dtype)
    out = attend(q, k, v)
    assert calls == [dtype]
    torch.testing.assert_close(
        out, attend(q, k, v, impl="eager"), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0
    )


def test_transformers_models_switch_to_eager_only_for_cpu_reduced_precision_training():
    from transformers import OPTConfig, OPTForCausalLM

    def tiny() -> OPTForCausalLM:
        config = OPTConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=32,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
        config._attn_implementation = "sdpa"
        return OPTForCausalLM(config)

    wrapper = torch.nn.ModuleDict({"llm": tiny()})
    assert eager_transformers_attention_for_cpu_training(wrapper, torch.device("cpu"), "fp32") == 0
    assert eager_transformers_attention_for_cpu_training(wrapper, torch.device("cuda"), "bf16") == 0
    assert wrapper["llm"].config._attn_implementation == "sdpa"
    assert eager_transformers_attention_for_cpu_training(wrapper, torch.device("cpu"), "bf16") == 1
    assert wrapper["llm"].config._attn_implementation == "eager"
    assert eager_transformers_attention_for_cpu_training(wrapper, torch.device("cpu"), "bf16") == 0
