"""Stage-2 BLIP-2 and InstructBLIP vs transformers on tiny random models, through the real converter.

transformers 5.x is driven as it expects: ``config.image_token_index`` set, ``num_query_tokens`` image-token
ids in ``input_ids`` (where the projected queries are scattered), and for decoder-only LLMs its ``generate``
returns prompt + image tokens + new tokens, so the comparison takes the continuation. Max abs logit
differences are printed (``pytest -s``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stage2_reference import NUM_QUERY, hf_blip2, hf_inputs, hf_instructblip, tokenizer, write_bert_vocab
from transformers.utils import logging as hf_logging

from vlkit.checkpoints.folder import load_checkpoint, load_model
from vlkit.cli import main as cli
from vlkit.generation import GenerationConfig
from vlkit.losses import IGNORE_INDEX, causal_lm_loss, causal_lm_targets, seq2seq_lm_loss
from vlkit.models.blip2 import Blip2
from vlkit.models.instructblip import InstructBlip
from vlkit.prompting import shift_right

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore:Passing `.*` with `inputs_embeds`:UserWarning")]
ATOL = 1e-4
PAD = 3  # fill id after eos in the comparisons (a real id of every tiny vocabulary, never an eos here)
CASES = [("blip2", "opt"), ("blip2", "t5"), ("blip2", "llama"), ("instructblip", "llama"), ("instructblip", "t5")]
PROMPT_LENGTHS = (5, 2, 4)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    threads, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)  # tiny models: a second thread only adds waiting on a busy machine
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)


_PAIRS: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    def get(case):
        if case not in _PAIRS:
            family, kind = case
            ref = hf_blip2(kind) if family == "blip2" else hf_instructblip(kind)
            folder = tmp_path_factory.mktemp(f"{family}-{kind}")
            ref.save_pretrained(folder)
            _PAIRS[case] = (ref, load_model(folder), folder)
        return _PAIRS[case]

    yield get
    _PAIRS.clear()


def _vocab(ref) -> int:
    return ref.config.text_config.vocab_size


def _text(ref, lengths=PROMPT_LENGTHS, seed: int = 0, left_pad: bool = False):
    """(B, T) random LLM ids (never the image token) padded with id 0 and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        span = slice(width - n, width) if left_pad else slice(0, n)
        ids[i, span] = torch.randint(4, _vocab(ref) - 1, (n,), generator=g)
        mask[i, span] = 1
    return ids, mask


def _qformer_text(ref, batch: int, seed: int = 1):
    if not hasattr(ref.config, "qformer_config") or ref.config.model_type != "instructblip":
        return None, None
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, ref.config.qformer_config.vocab_size, (batch, 6), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # one padded instruction
        mask[1, 4:] = 0
        ids[1, 4:] = 0
    return ids, mask


def _pixels(batch: int = 3, seed: int = 2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_lm_logits_and_loss_match_transformers(pairs, case):
    ref, ours, _ = pairs(case)
    family, kind = case
    assert isinstance(ours, InstructBlip if family == "instructblip" else Blip2)
    pixels = _pixels()
    ids, mask = _text(ref)
    q_ids, q_mask = _qformer_text(ref, 3)
    extra = {"qformer_input_ids": q_ids, "qformer_attention_mask": q_mask} if q_ids is not None else {}
    hf_ids, hf_mask = hf_inputs(ref, ids, mask, left_pad=False)
    with torch.no_grad():
        prefix = ours.llm_prefix(pixels, qformer_ids=q_ids, qformer_mask=q_mask)
        if kind == "t5":
            labels = torch.randint(4, _vocab(ref) - 1, (3, 5), generator=torch.Generator().manual_seed(3))
            labels[0, 3:] = IGNORE_INDEX
            dec_in = shift_right(labels, 0, 0)
            expected = ref(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=labels, **extra)
            got = ours.lm_logits(prefix, ids, mask, decoder_input_ids=dec_in)
            loss = seq2seq_lm_loss(got, labels)
        else:
            targets = causal_lm_targets(ids.masked_fill(mask == 0, 1), num_query_tokens=NUM_QUERY, pad_id=1)
            # Labels over the whole input, -100 at the image tokens (and padding), as transformers expects.
            expected = ref(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, labels=targets, **extra)
            got = ours.lm_logits(prefix, ids, mask)
            loss = causal_lm_loss(got, targets)
    assert got.shape == expected.logits.shape
    # Padded positions attend to nothing real in some LLMs: compare the rows the loss sees.
    keep = (hf_mask if kind != "t5" else torch.ones(got.shape[:2], dtype=torch.long)).bool()
    torch.testing.assert_close(got[keep], expected.logits[keep], atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=ATOL, rtol=0)
    diff = (got[keep] - expected.logits[keep]).abs().max().item()
    print(f"\n[parity] {family}-{kind}: logits max abs diff {diff:.2e}, loss diff {(loss - expected.loss).abs():.2e}")


def _frequent_token(ref, ours, pixels, ids, mask, q_ids, q_mask) -> int:
    """A token the model produces mid-sequence, used as eos so that hypotheses really end (greedy: surely)."""
    prefix = ours.llm_prefix(pixels, qformer_ids=q_ids, qformer_mask=q_mask)
    out = ours.generate(prefix, ids, mask, GenerationConfig(max_new_tokens=8, pad_token_id=PAD))
    return int(out[0, 2])


def _hf_generate(ref, kind, pixels, ids, mask, q_ids, q_mask, settings) -> torch.Tensor:
    hf_ids, hf_mask = hf_inputs(ref, ids, mask, left_pad=kind != "t5")
    extra = {"qformer_input_ids": q_ids, "qformer_attention_mask": q_mask} if q_ids is not None else {}
    out = ref.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **extra, **settings)
    out = out[:, 1:] if kind == "t5" else out[:, hf_ids.shape[1] :]  # continuation only
    eos = torch.tensor([settings["eos_token_id"]])
    ended = torch.isin(out, eos).long().cumsum(dim=1) - torch.isin(out, eos).long()
    return out.masked_fill(ended > 0, PAD)  # transformers may fill finished beams with eos; we use pad


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "beam5"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_generation_is_token_identical_to_transformers(pairs, case, num_beams):
    ref, ours, _ = pairs(case)
    kind = case[1]
    pixels = _pixels()
    ids, mask = _text(ref, left_pad=kind != "t5", seed=4)
    q_ids, q_mask = _qformer_text(ref, 3)
    with torch.no_grad():
        eos = _frequent_token(ref, ours, pixels, ids, mask, q_ids, q_mask)
        settings = dict(max_new_tokens=8, num_beams=num_beams, eos_token_id=eos, pad_token_id=PAD, do_sample=False)
        expected = _hf_generate(ref, kind, pixels, ids, mask, q_ids, q_mask, settings)
        prefix = ours.llm_prefix(pixels, qformer_ids=q_ids, qformer_mask=q_mask)
        config = GenerationConfig(max_new_tokens=8, num_beams=num_beams, eos_token_id=eos, pad_token_id=PAD)
        got = ours.generate(prefix, ids, mask, config)
    assert torch.equal(got, expected[:, : got.shape[1]]) and bool((expected[:, got.shape[1] :] == PAD).all())
    if num_beams == 1:
        assert bool((got == PAD).any()) or got.shape[1] < 8, "no sequence ended: eos handling untested"


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "beam5"])
@pytest.mark.parametrize("case", [("blip2", "opt"), ("blip2", "t5"), ("instructblip", "llama")], ids="-".join)
def test_mixed_length_batch_equals_one_by_one(pairs, case, num_beams):
    """The most reported transformers BLIP-2 bug: a padded batch must generate what each prompt does alone."""
    ref, ours, _ = pairs(case)
    kind = case[1]
    pixels = _pixels(seed=5)
    ids, mask = _text(ref, left_pad=kind != "t5", seed=6)
    q_ids, q_mask = _qformer_text(ref, 3)
    config = GenerationConfig(max_new_tokens=8, num_beams=num_beams, pad_token_id=PAD, repetition_penalty=1.3)
    with torch.no_grad():
        config = config.replace(eos_token_id=_frequent_token(ref, ours, pixels, ids, mask, q_ids, q_mask))
        prefix = ours.llm_prefix(pixels, qformer_ids=q_ids, qformer_mask=q_mask)
        batch = ours.generate(prefix, ids, mask, config)
        for i in range(3):
            keep = mask[i].bool()
            qi = None if q_ids is None else q_ids[i : i + 1, q_mask[i].bool()]
            alone_prefix = ours.llm_prefix(pixels[i : i + 1], qformer_ids=qi)
            alone = ours.generate(alone_prefix, ids[i : i + 1, keep], None, config)[0]
            assert torch.equal(batch[i, : alone.shape[0]], alone), i
            assert bool((batch[i, alone.shape[0] :] == PAD).all())


def test_cached_and_reference_decoding_agree(pairs):
    ref, ours, _ = pairs(("blip2", "opt"))
    pixels = _pixels()
    ids, mask = _text(ref, left_pad=True)
    config = GenerationConfig(max_new_tokens=6, num_beams=3, pad_token_id=PAD)
    with torch.no_grad():
        prefix = ours.llm_prefix(pixels)
        cached = ours.generate(prefix, ids, mask, config)
        reference = ours.generate(prefix, ids, mask, config, use_cache=False)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("case", [("blip2", "opt"), ("instructblip", "t5")], ids="-".join)
def test_convert_cli_keeps_weights_tokenizers_and_ties(pairs, case, tmp_path):
    ref, ours, folder = pairs(case)
    kind = case[1]
    tok = tokenizer(kind)
    tok.save_pretrained(folder)  # a transformers folder ships its processor's tokenizer at the root
    if case[0] == "instructblip":  # ... and InstructBLIP's Q-Former tokenizer in qformer_tokenizer/
        from vlkit.processors import QFormerTokenizer

        write_bert_vocab(tmp_path / "vocab.txt")
        QFormerTokenizer(tmp_path / "vocab.txt").save(folder / "qformer_tokenizer")
    assert cli(["convert", str(folder), str(tmp_path / "out")]) == 0
    loaded = load_checkpoint(tmp_path / "out")
    model = loaded.model
    if case[0] == "instructblip":
        assert loaded.qformer_tokenizer is not None and (tmp_path / "out" / "qformer_tokenizer").is_dir()
        assert loaded.qformer_tokenizer.bos_token_id == len(loaded.qformer_tokenizer) - 1  # [DEC] kept
    assert loaded.llm_tokenizer is not None and len(loaded.llm_tokenizer) == len(tok)
    assert model.config == ours.config and model.config.lm.add_bos == (kind == "opt")
    assert model.config.lm.add_eos == (kind == "t5")
    if kind == "opt":  # tied output matrix: stored once, tied again on load
        assert model.tied_parameters() == {"llm.lm_head.weight": "llm.model.decoder.embed_tokens.weight"}
        assert model.llm.lm_head.weight is model.llm.model.decoder.embed_tokens.weight
    mine, theirs = model.state_dict(), ours.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_t5_folder_keeps_its_activation_and_lavis_style_forces_exact_gelu():
    from stage2_reference import text_config

    from vlkit.checkpoints.hf import lm_config_from_hf
    from vlkit.models.blip2 import LanguageModelConfig

    tanh = dict(text_config("t5"), dense_act_fn="gelu_new")
    assert lm_config_from_hf(tanh, instruction=False).hf_config["dense_act_fn"] == "gelu_new"
    forced = LanguageModelConfig(kind="seq2seq", hf_config=tanh)
    assert forced.hf_config["dense_act_fn"] == "gelu"
    assert forced.transformers_config().dense_act_fn == "gelu"
    with pytest.raises(Exception, match="is_encoder_decoder"):
        LanguageModelConfig(kind="causal", hf_config=dict(tanh, is_encoder_decoder=True))


def test_loss_matches_manual_cross_entropy_of_logits(pairs):
    """The building blocks compose: causal_lm_loss over lm_logits is the mean CE of the text targets."""
    ref, ours, _ = pairs(("blip2", "opt"))
    pixels = _pixels()
    ids, mask = _text(ref)
    with torch.no_grad():
        logits = ours.lm_logits(ours.llm_prefix(pixels), ids, mask)
    targets = causal_lm_targets(ids.masked_fill(mask == 0, 1), num_query_tokens=NUM_QUERY, pad_id=1)
    manual = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(causal_lm_loss(logits, targets), manual)


@pytest.mark.parametrize("case", [("blip2", "opt"), ("instructblip", "t5")], ids="-".join)
def test_sampling_with_a_seed_matches_transformers(pairs, case):
    ref, ours, _ = pairs(case)
    kind = case[1]
    pixels = _pixels(batch=1)
    ids, mask = _text(ref, lengths=(3,), left_pad=kind != "t5", seed=7)
    q_ids, q_mask = _qformer_text(ref, 1)
    settings = dict(max_new_tokens=6, do_sample=True, top_p=0.9, top_k=20, num_return_sequences=3, pad_token_id=PAD)
    with torch.no_grad():
        eos = _frequent_token(ref, ours, pixels, ids, mask, q_ids, q_mask)
        prefix = ours.llm_prefix(pixels, qformer_ids=q_ids, qformer_mask=q_mask)
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = _hf_generate(ref, kind, pixels, ids, mask, q_ids, q_mask, dict(settings, eos_token_id=eos))
            torch.manual_seed(seed)
            config = GenerationConfig(**{k: v for k, v in settings.items() if k != "do_sample"}, do_sample=True)
            got = ours.generate(prefix, ids, mask, config.replace(eos_token_id=eos))
            assert torch.equal(got, expected[:, : got.shape[1]]) and bool((expected[:, got.shape[1] :] == PAD).all())
