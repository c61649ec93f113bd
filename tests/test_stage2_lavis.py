"""LAVIS stage-2 / InstructBLIP "trimmed" checkpoints assembled with the EVA ViT file and a local LLM folder:
the same weights as a transformers model give identical tensors and outputs; the CLI path with a preset."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from stage2_reference import hf_blip2, hf_instructblip, hf_to_lavis, save_llm_folder
from transformers.utils import logging as hf_logging

from vlkit import zoo
from vlkit.checkpoints import lavis
from vlkit.checkpoints.folder import build_loaded, load_checkpoint, load_model
from vlkit.checkpoints.io import save_torch
from vlkit.cli import main as cli
from vlkit.errors import CheckpointError
from vlkit.generation import GenerationConfig
from vlkit.prompting import LLMProcessor, caption

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning")]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    threads, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)


def _files(tmp_path, ref, kind, drop_rows=0):
    main, vit = hf_to_lavis(ref, kind)
    save_torch({"model": main, "epoch": 3}, tmp_path / "lavis.pth")
    save_torch(vit, tmp_path / "eva_vit_g.pth")
    save_llm_folder(ref, tmp_path / "llm", kind, drop_rows=drop_rows)
    return tmp_path / "lavis.pth", tmp_path / "eva_vit_g.pth", tmp_path / "llm"


def _same_outputs(a, b, ref_vocab, q=False):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(4, ref_vocab - 1, (2, 5), generator=torch.Generator().manual_seed(1))
    q_ids = torch.randint(1, 99, (2, 4)) if q else None
    config = GenerationConfig(max_new_tokens=6, num_beams=3, pad_token_id=3)
    outs = []
    with torch.no_grad():
        for m in (a, b):
            prefix = m.llm_prefix(pixels, qformer_ids=q_ids)
            dec = {"decoder_input_ids": ids[:, :3]} if m.config.lm.kind == "seq2seq" else {}
            outs.append((m.lm_logits(prefix, ids, **dec), m.generate(prefix, ids, None, config)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_blip2_stage2_assembly_equals_the_transformers_checkpoint(tmp_path, kind):
    ref = hf_blip2(kind, seed=7)
    ref.save_pretrained(tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf")
    ck, vit, llm = _files(tmp_path, ref, kind)
    loaded = lavis.load_lavis_checkpoint(ck, vision=vit, llm=llm, config=from_hf.config)
    assert loaded.config.lm.hf_config["model_type"] == kind and loaded.llm_tokenizer is not None
    if kind == "opt":  # LAVIS's fp16 copy of the tied output matrix is accepted and checked
        assert loaded.state_dict["llm.lm_head.weight"].dtype == torch.float16
    model = build_loaded("blip2", loaded.config, loaded.state_dict, source="lavis", dtype=torch.float32)
    a, b = model.state_dict(), from_hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_outputs(model, from_hf, ref.config.text_config.vocab_size)


def test_instructblip_vicuna_assembly_adds_pad_and_overrides_specials(tmp_path):
    ref = hf_instructblip("llama", seed=8)
    with torch.no_grad():  # the reference's [PAD] row is whatever the resize drew; ours is the mean of the rest
        for matrix in (ref.language_model.get_input_embeddings().weight, ref.language_model.lm_head.weight):
            matrix[-1] = matrix[:-1].mean(dim=0)
    ref.save_pretrained(tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf")
    ck, vit, llm = _files(tmp_path, ref, "llama", drop_rows=1)
    loaded = lavis.load_lavis_checkpoint(ck, vision=vit, llm=llm, config=from_hf.config)
    tok = loaded.llm_tokenizer
    vocab = ref.config.text_config.vocab_size
    assert len(tok) == vocab and tok.pad_token == "[PAD]" and tok.pad_token_id == vocab - 1
    assert tok.bos_token == tok.eos_token == tok.unk_token == "</s>" and tok.bos_token_id == 2
    assert loaded.config.lm.hf_config["vocab_size"] == vocab
    model = build_loaded("instructblip", loaded.config, loaded.state_dict, source="lavis")
    a, b = model.state_dict(), from_hf.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)  # the mean row: summation order
    assert loaded.config.instruction_aware and loaded.config.lm.zero_id_as_eos and loaded.config.lm.bos_placeholder


def test_instructblip_flant5_assembly(tmp_path):
    ref = hf_instructblip("t5", seed=9)
    ref.save_pretrained(tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf")
    ck, vit, llm = _files(tmp_path, ref, "t5")
    loaded = lavis.load_lavis_checkpoint(ck, vision=vit, llm=llm, config=from_hf.config)
    model = build_loaded("instructblip", loaded.config, loaded.state_dict, source="lavis", dtype=torch.float32)
    a, b = model.state_dict(), from_hf.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _same_outputs(model, from_hf, ref.config.text_config.vocab_size, q=True)


def _preset_shaped_reference(name: str):
    """A transformers model with the shapes of tiny preset ``name`` (what the CLI test converts)."""
    from stage2_reference import randomize
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = zoo.get_spec(name).config()
    v, q = config.vision, config.qformer
    hf = Blip2Config(
        vision_config=dict(
            hidden_size=v.width,
            intermediate_size=v.mlp_dim,
            num_hidden_layers=v.depth,
            num_attention_heads=v.heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=v.ln_eps,
        ),
        qformer_config=dict(
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            cross_attention_frequency=q.cross_attention_freq,
            vocab_size=q.vocab_size,
            max_position_embeddings=q.max_position_embeddings,
        ),
        text_config=config.lm.hf_config,
        num_query_tokens=config.num_query_tokens,
    )
    ref = Blip2ForConditionalGeneration(hf).eval()
    randomize(ref, seed=11)
    ref.language_model.tie_weights()
    return ref


def test_convert_cli_with_vision_llm_and_preset(tmp_path, subprocess_env):
    name = "tiny-blip2-opt-coco"
    ref = _preset_shaped_reference(name)
    ck, vit, llm = _files(tmp_path, ref, "opt")
    out = tmp_path / "out"
    args = ["convert", str(ck), str(out), "--vision", str(vit), "--llm", str(llm), "--preset", name]
    assert cli(args) == 0
    loaded = load_checkpoint(out)
    model = loaded.model
    assert model.config.lm.prompt == "a photo of" and model.config.ln_vision_eps == 1e-5  # the preset's
    assert model.config.lm.add_bos and model.config.lm.end_of_text == "newline"
    assert (out / "llm_tokenizer").is_dir() and loaded.llm_tokenizer is not None
    # Same tensors as the API path.
    api = lavis.load_lavis_checkpoint(ck, vision=vit, llm=llm, preset=name)
    ours = build_loaded("blip2", api.config, api.state_dict, source="api", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    # The folder is self-contained: processor + captioning work from it alone.
    processor = LLMProcessor.from_folder(out)
    newline = processor.llm.end_of_text_id
    assert processor.llm.tokenizer.decode([newline]) == "\n"
    pixels = torch.randn(2, 3, 32, 32)
    texts = caption(model, processor, pixels, max_new_tokens=5, num_beams=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_assembly_errors_name_the_problem(tmp_path):
    ref = hf_blip2("opt", seed=12)
    ref.save_pretrained(tmp_path / "hf")
    config = load_model(tmp_path / "hf").config
    ck, vit, llm = _files(tmp_path, ref, "opt")
    with pytest.raises(CheckpointError, match="opt_proj.*--llm"):
        load_model(ck, vision=vit, preset="tiny-blip2-opt")
    main = torch.load(ck, weights_only=True)["model"]
    main["opt_model.lm_head.weight"] = main["opt_model.lm_head.weight"] + 1
    save_torch({"model": main}, tmp_path / "untied.pth")
    loaded = lavis.load_lavis_checkpoint(tmp_path / "untied.pth", vision=vit, llm=llm, config=config)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        build_loaded("blip2", loaded.config, loaded.state_dict, source="untied")
    t5 = hf_blip2("t5", seed=13)
    save_llm_folder(t5, tmp_path / "t5llm", "t5")
    with pytest.raises(CheckpointError, match="preset's LLM is 'opt'.*'t5'"):
        lavis.load_lavis_checkpoint(ck, vision=vit, llm=tmp_path / "t5llm", preset="tiny-blip2-opt")
    stray = dict(main, **{"opt_model.model.decoder.layers.9.fc1.weight": torch.zeros(2, 2)})
    save_torch({"model": stray}, tmp_path / "stray.pth")
    loaded = lavis.load_lavis_checkpoint(tmp_path / "stray.pth", vision=vit, llm=llm, config=config)
    with pytest.raises(CheckpointError, match="unexpected.*layers.9.fc1"):
        build_loaded("blip2", loaded.config, loaded.state_dict, source="stray")
    wrong_family = dataclasses.replace(config, lm=None)
    with pytest.raises(CheckpointError, match="needs a config with an LLM"):
        lavis.from_lavis_stage2(main, wrong_family, vision_state_dict=None, llm_state_dict={})
