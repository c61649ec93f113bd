"""BERT -> Q-Former initialisation (blip2-spec §1.6): every key accounted for, outputs equal to BERT's."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

from vlkit.checkpoints.bert import init_qformer_from_bert
from vlkit.errors import CheckpointError
from vlkit.models.qformer import QFormer, QFormerConfig

VOCAB = 40


def bert_config(**kw) -> BertConfig:
    args = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**args, **kw})


def qformer(**kw) -> QFormer:
    args = dict(
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        intermediate_size=48,
        encoder_width=16,
        vocab_size=VOCAB + 1,  # + [DEC]
        max_position_embeddings=24,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    return QFormer(QFormerConfig(**{**args, **kw})).eval()


@pytest.fixture
def bert_folder(tmp_path):
    torch.manual_seed(3)
    model = BertForMaskedLM(bert_config()).eval()
    with torch.no_grad():
        # The Q-Former has no token types: with a zero type-0 vector BERT computes exactly what it computes.
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        for p in model.parameters():  # move LayerNorms / biases away from their 1/0 init so mix-ups show
            p.add_(0.05 * torch.randn_like(p))
        model.bert.embeddings.token_type_embeddings.weight.zero_()
    folder = tmp_path / "bert"
    model.save_pretrained(folder)
    return folder, model


def test_outputs_equal_bert_and_query_ffn_copied(bert_folder):
    folder, bert = bert_folder
    torch.manual_seed(0)
    q = qformer()
    cross_before = {k: v.clone() for k, v in q.state_dict().items() if ".cross_attn." in k}
    report = init_qformer_from_bert(q, folder)

    ids = torch.randint(0, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ours = q(input_ids=ids, attention_mask=mask).hidden_states
        hf = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        theirs = hf.hidden_states[-1]
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=1e-5)
        logits = q.lm_logits(ours)  # (B, T, VOCAB + 1)
        torch.testing.assert_close(logits[..., :VOCAB][mask.bool()], hf.logits[mask.bool()], atol=1e-4, rtol=1e-4)

    state = q.state_dict()
    for n in range(3):
        for part in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight", "norm.bias"):
            assert torch.equal(state[f"layers.{n}.query_ffn.{part}"], state[f"layers.{n}.text_ffn.{part}"])
    for key, value in cross_before.items():  # cross-attention keeps its random BERT-style init
        assert torch.equal(state[key], value)
    # [DEC]: a new random row; the decoder bias padded with zero
    assert report.new_vocab_rows == 1
    assert state["word_embed.weight"].shape == (VOCAB + 1, 32)
    assert 0 < float(state["word_embed.weight"][VOCAB].std()) < 0.05
    assert float(state["lm_head.bias"][VOCAB]) == 0.0
    assert report.has_head and len(report.copied) == 18
    assert sorted(report.random) == sorted(cross_before)
    assert sorted(report.loaded + report.copied + report.random) == sorted(state)


def test_bert_model_folder_without_head(tmp_path):
    torch.manual_seed(1)
    BertModel(bert_config(), add_pooling_layer=True).save_pretrained(tmp_path / "bm")
    q = qformer()
    head_before = {k: v.clone() for k, v in q.state_dict().items() if k.startswith("lm_head.")}
    report = init_qformer_from_bert(q, tmp_path / "bm")
    assert not report.has_head and "no MLM head" in report.summary()
    assert all(torch.equal(q.state_dict()[k], v) for k, v in head_before.items())
    assert set(head_before) <= set(report.random)


def test_original_gamma_beta_names_load(bert_folder, tmp_path):
    folder, _ = bert_folder
    sd = load_file(folder / "model.safetensors")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in sd.items()
    }
    a, b = qformer(), qformer()
    init_qformer_from_bert(a, sd, generator=torch.Generator().manual_seed(0))
    init_qformer_from_bert(b, renamed, generator=torch.Generator().manual_seed(0))
    for key, value in a.state_dict().items():
        if ".cross_attn." not in key:
            assert torch.equal(value, b.state_dict()[key]), key


def _copy_folder(src, dst, change):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = dict(load_file(src / "model.safetensors"))
    change(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_extra_key_is_named(bert_folder, tmp_path):
    folder, _ = bert_folder

    def add(sd):
        sd["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)

    bad = _copy_folder(folder, tmp_path / "extra", add)
    with pytest.raises(CheckpointError, match="rotary"):
        init_qformer_from_bert(qformer(), bad)


def test_missing_key_is_named(bert_folder, tmp_path):
    folder, _ = bert_folder

    def drop(sd):
        del sd["bert.encoder.layer.2.output.dense.weight"]

    bad = _copy_folder(folder, tmp_path / "missing", drop)
    with pytest.raises(CheckpointError, match=r"layers\.2\.text_ffn\.fc2\.weight"):
        init_qformer_from_bert(qformer(), bad)


def test_layer_count_and_vocab_mismatch(bert_folder):
    folder, _ = bert_folder
    with pytest.raises(CheckpointError, match="layers.2"):  # BERT has a third layer the Q-Former lacks
        init_qformer_from_bert(qformer(num_layers=2), folder)
    with pytest.raises(CheckpointError, match="word embeddings"):
        init_qformer_from_bert(qformer(vocab_size=VOCAB - 1), folder)


def test_config_and_tied_weights_checked(bert_folder, tmp_path):
    folder, _ = bert_folder
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        init_qformer_from_bert(qformer(num_heads=4), folder)

    def untie(sd):
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"] + 1

    bad = _copy_folder(folder, tmp_path / "untied", untie)
    with pytest.raises(CheckpointError, match="decoder.weight differs"):
        init_qformer_from_bert(qformer(), bad)

    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_act"):
        init_qformer_from_bert(qformer(), folder)
