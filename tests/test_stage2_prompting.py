"""LLM text conventions of BLIP-2 stage 2 / InstructBLIP against the reference's tokenizer calls, training
targets, generation settings, decoding, and the caption / VQA / ranking helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stage2_reference import tokenizer, write_bert_vocab
from transformers.utils import logging as hf_logging

from vlkit import zoo
from vlkit.losses import IGNORE_INDEX
from vlkit.processors import QFormerTokenizer
from vlkit.prompting import (
    VQA_PROMPT,
    LLMProcessor,
    answer,
    caption,
    instructblip_vicuna_tokenizer,
    lm_loss,
    probe_framing,
    rank_candidates,
)

CAPTIONS = ["a photo of a cat sitting on a red sofa", "two dogs", "a man riding a bike down the street " * 3]


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    threads, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def qformer_vocab(tmp_path_factory):
    """A small WordPiece vocabulary (fits the tiny Q-Formers' 128 ids) covering the test texts."""
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    write_bert_vocab(path)
    return path


_QFORMER_VOCAB: list = []


@pytest.fixture(autouse=True)
def _vocab(qformer_vocab):
    _QFORMER_VOCAB[:] = [qformer_vocab]


def _processor(name: str, **lm_changes):
    config = zoo.get_spec(name).config()
    for key, value in lm_changes.items():
        setattr(config.lm, key, value)
    kind = {"opt": "opt", "t5": "t5", "llama": "llama"}[config.lm.hf_config["model_type"]]
    tok = tokenizer(kind)
    qformer = None
    if config.instruction_aware:
        tok = instructblip_vicuna_tokenizer(tok) if kind == "llama" else tok
        qformer = QFormerTokenizer(_QFORMER_VOCAB[0])
        assert len(qformer) <= config.qformer.vocab_size
    return LLMProcessor(config, tok, qformer)


def _hf(tok, texts, **kw):
    enc = tok(list(texts), padding="longest", return_tensors="pt", **kw)
    return enc["input_ids"], enc["attention_mask"]


def test_framing_is_probed_from_the_tokenizer():
    assert probe_framing(tokenizer("opt")) == (True, False)
    assert probe_framing(tokenizer("t5")) == (False, True)
    assert probe_framing(tokenizer("llama")) == (True, False)


def test_opt_caption_targets_match_lavis():
    proc = _processor("tiny-blip2-opt-coco", max_txt_len=12)
    tok = proc.llm.tokenizer
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and proc.llm.end_of_text_id == newline[0]
    # prompt_len counts the bos: the reference's prompt_tokens.attention_mask.sum()
    assert proc.llm.prompt_length("a photo of") == len(tok("a photo of")["input_ids"])
    batch = proc.training_batch(CAPTIONS)
    ids, mask = _hf(tok, [c + "\n" for c in CAPTIONS], truncation=True, max_length=12)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert bool((ids[:, 0] == tok.bos_token_id).all())
    q, n = proc.num_query_tokens, proc.llm.prompt_length("a photo of")
    t = batch.targets
    assert t.shape == (3, q + ids.shape[1]) and bool((t[:, : q + n] == IGNORE_INDEX).all())
    expected = ids.masked_fill(mask == 0, IGNORE_INDEX)
    expected[:, :n] = IGNORE_INDEX
    assert torch.equal(t[:, q:], expected)
    assert int(ids[1, mask[1].sum() - 1]) == newline[0]  # a short caption ends with "\n"
    # Without a prompt the bos stays a target: the last query position learns to predict </s>.
    plain = _processor("tiny-blip2-opt").training_batch(CAPTIONS[:1])
    assert int(plain.targets[0, proc.num_query_tokens]) == tok.bos_token_id


def test_opt_prompts_are_left_padded_and_truncated_like_lavis_vqa():
    proc = _processor("tiny-blip2-opt", max_txt_len=8)
    tok = proc.llm.tokenizer
    prompts = [VQA_PROMPT.format(q) for q in ("what color is the bus?", "why")]
    batch = proc.prompts(prompts)
    tok.padding_side = "left"
    ids, mask = _hf(tok, prompts, truncation=True, max_length=8)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert batch.qformer_ids is None
    config = proc.generation_config("vqa")
    assert (config.num_beams, config.max_new_tokens, config.length_penalty) == (5, 10, 0.0)
    assert config.eos_token_id == proc.llm.end_of_text_id and config.pad_token_id == tok.pad_token_id
    coco = proc.generation_config("caption", min_new_tokens=8)
    assert (coco.num_beams, coco.max_new_tokens, coco.min_new_tokens) == (5, 30, 8)


def test_flant5_encoder_and_labels_match_lavis():
    proc = _processor("tiny-blip2-flant5")
    tok = proc.llm.tokenizer
    batch = proc.training_batch(["a photo of", "question: what is this? short answer:"], ["a cat", "two dogs on grass"])
    ids, mask = _hf(tok, ["a photo of", "question: what is this? short answer:"], truncation=True, max_length=32)
    out, out_mask = _hf(tok, ["a cat", "two dogs on grass"], truncation=True, max_length=32)
    assert torch.equal(batch.input_ids, ids) and torch.equal(batch.attention_mask, mask)
    assert int(ids[0, mask[0].sum() - 1]) == tok.eos_token_id  # encoder text ends with </s>
    assert torch.equal(batch.targets, out.masked_fill(out == tok.pad_token_id, IGNORE_INDEX))
    assert torch.equal(batch.decoder_attention_mask, out_mask)
    assert torch.equal(batch.decoder_input_ids[:, 1:], out[:, :-1]) and bool((batch.decoder_input_ids[:, 0] == 0).all())
    # Captions alone: the model's prompt is the encoder text.
    alone = proc.training_batch(["a cat"])
    assert torch.equal(alone.targets, batch.targets[:1, : alone.targets.shape[1]])
    assert proc.generation_config("vqa").length_penalty == -1.0
    assert proc.generation_config("vqa").eos_token_id == tok.eos_token_id


def test_vicuna_instruction_packing_matches_lavis():
    proc = _processor("tiny-instructblip-vicuna", max_txt_len=6, max_output_txt_len=5)
    tok = proc.llm.tokenizer
    eos = tok.eos_token_id
    assert eos == tok.bos_token_id == tok.unk_token_id == tok.convert_tokens_to_ids("</s>")
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == len(tok) - 1
    instructions = ["describe the image in detail please", "what is this?"]
    responses = ["a cat", "a man riding a bike down the street"]
    batch = proc.training_batch(instructions, responses)
    content = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    for i, (instr, resp) in enumerate(zip(instructions, responses)):
        head = [eos] + content(instr)[-5:]  # left truncation at 6 tokens incl. the bos
        tail = (content(resp + "</s>"))[:4]  # right truncation at 5 incl. the (dropped) bos
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert row == head + tail, i
        targets = batch.targets[i, proc.num_query_tokens :][batch.attention_mask[i].bool()].tolist()
        assert targets == [IGNORE_INDEX] * len(head) + tail
    assert int(batch.input_ids[0, batch.attention_mask[0].sum() - 1]) == eos  # short response keeps "</s>"
    assert bool((batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all())
    assert batch.qformer_ids is not None and proc.qformer.truncation_side == "left"
    config = proc.generation_config("instruct")
    assert (config.repetition_penalty, config.max_new_tokens, config.context_ids) == (1.5, 256, (1,))
    # Generation prompts: left-padded, not truncated (LAVIS's generate does not cut the LLM prompt).
    long = proc.prompts(["describe the image in detail please " * 3])
    assert long.input_ids.shape[1] == 1 + len(content("describe the image in detail please " * 3))
    # Decoding: id 0 (what LAVIS's padding became) turns into </s> and disappears.
    text = proc.decode(torch.tensor([content("a cat") + [eos, 0, 0]]))
    assert text == [tok.decode(content("a cat"), skip_special_tokens=True).strip()]


def _tiny_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = zoo.build(name).eval()
    with torch.no_grad():
        for p in model.llm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def test_rank_candidates_equals_summed_cross_entropy_of_full_sequences():
    proc = _processor("tiny-instructblip-vicuna")
    model = _tiny_model("tiny-instructblip-vicuna")
    pixels = torch.randn(2, 3, 32, 32)
    prompts = ["what is this?", "which animal is it? answer:"]
    candidates = ["a cat", "dog", "the red sofa"]
    ranks, losses = rank_candidates(model, proc, pixels, prompts, candidates)
    cand_ids, cand_mask = proc.candidates(candidates)
    for b in range(2):
        batch = proc.prompts([prompts[b]])
        prefix = model.llm_prefix(pixels[b : b + 1], qformer_ids=batch.qformer_ids, qformer_mask=batch.qformer_mask)
        for c in range(3):
            cand = cand_ids[c][cand_mask[c].bool()]
            ids = torch.cat([batch.input_ids[0], cand])[None]
            with torch.no_grad():
                logits = model.lm_logits(prefix, ids)[0]
            start = prefix.shape[1] + batch.input_ids.shape[1]
            manual = F.cross_entropy(logits[start - 1 : -1], cand, reduction="sum")
            torch.testing.assert_close(losses[b, c], manual, atol=1e-4, rtol=1e-5)
    assert torch.equal(ranks, losses.argsort(dim=-1))


def test_caption_answer_and_loss_helpers_run_end_to_end():
    proc = _processor("tiny-blip2-flant5")
    model = _tiny_model("tiny-blip2-flant5", seed=1)
    pixels = torch.randn(2, 3, 32, 32)
    captions = caption(model, proc, pixels, max_new_tokens=4)
    answers = answer(model, proc, pixels, ["What is it?", "Why?"], max_new_tokens=3, num_beams=2)
    assert len(captions) == len(answers) == 2 and all(isinstance(t, str) for t in captions + answers)
    batch = proc.training_batch(["a photo of", "a photo of"], ["a cat", "two dogs"])
    loss = lm_loss(model, pixels, batch)
    prefix = model.llm_prefix(pixels)
    embeds, mask = model.llm_inputs(prefix, batch.input_ids, batch.attention_mask)
    reference = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=batch.targets).loss  # T5's own loss
    torch.testing.assert_close(loss, reference)
    with pytest.raises(Exception, match="2 images but 1 questions"):
        answer(model, proc, pixels, ["one?"])


def test_probe_uses_positions_not_stale_ids():
    # A fast tokenizer keeps prepending "<s>" after its bos is overridden to "</s>"; framing must use "</s>".
    tok = instructblip_vicuna_tokenizer(tokenizer("llama"))
    assert tok("a b")["input_ids"][0] == 1 and tok.bos_token_id == 2
    assert probe_framing(tok) == (True, False)
