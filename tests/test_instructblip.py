"""InstructBLIP model: config rules, and the instruction really conditions the visual prefix."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlkit import zoo
from vlkit.errors import ConfigError
from vlkit.models.blip2 import Blip2
from vlkit.models.instructblip import InstructBlip, InstructBlipConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine waiting for it dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_config_rules():
    config = zoo.get_spec("tiny-instructblip-vicuna").config()
    assert isinstance(config, InstructBlipConfig) and config.instruction_aware and not config.itc_itm_heads
    assert not config.qformer.lm_head and config.qformer.text_input
    with pytest.raises(ConfigError, match="lm is required"):
        dataclasses.replace(config, lm=None)
    with pytest.raises(ConfigError, match="text input"):
        dataclasses.replace(config, qformer=dataclasses.replace(config.qformer, text_input=False))
    with pytest.raises(ConfigError, match="InstructBlipConfig"):
        InstructBlip(zoo.get_spec("tiny-blip2-opt").config())


def test_instruction_conditions_the_prefix_and_stage1_heads_are_absent():
    torch.manual_seed(0)
    model = zoo.build("tiny-instructblip-flant5").eval()
    pixels = torch.randn(2, 3, 32, 32)
    a = torch.randint(5, 100, (2, 4))
    b = a.clone()
    b[:, 2] = (b[:, 2] + 1) % 100
    with torch.no_grad():
        pa, pb = model.llm_prefix(pixels, qformer_ids=a), model.llm_prefix(pixels, qformer_ids=b)
        alone = model.llm_prefix(pixels)
        # Padding the instruction changes nothing: masked tokens are invisible to the queries.
        padded = torch.cat([a, torch.zeros(2, 3, dtype=torch.long)], 1)
        mask = torch.cat([torch.ones(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)], 1)
        pp = model.llm_prefix(pixels, qformer_ids=padded, qformer_mask=mask)
    assert pa.shape == (2, 4, 32) and not torch.allclose(pa, pb) and not torch.allclose(pa, alone)
    torch.testing.assert_close(pp, pa, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="itc_itm_heads"):
        model.project_image(torch.zeros(1, 4, 32))


def test_stage1_model_has_no_llm():
    model = Blip2(zoo.get_spec("tiny-blip2-eva").config())
    with pytest.raises(ConfigError, match="no LLM"):
        model.llm_prefix(torch.randn(1, 3, 32, 32))
    assert model.tied_parameters() == {}


def test_llm_storage_dtype_casts_parameters_but_not_buffers():
    config = zoo.get_spec("tiny-instructblip-vicuna").config()
    config.lm.dtype = "float16"
    model = InstructBlip(config)
    assert {p.dtype for p in model.llm.parameters()} == {torch.float16}
    assert {b.dtype for b in model.llm.buffers()} == {torch.float32}  # LLaMA's rotary frequencies stay fp32
    assert model.query_tokens.dtype == torch.float32
