"""Shapes tokenizers: standard transformers folders with the special-token conventions of the real models."""

import json

import pytest
from transformers import AutoTokenizer

from vlkit.cli import main as cli_main
from vlkit.data import generate_shapes_world
from vlkit.data.tokenizers import BYTE_TOKENS, build_shapes_tokenizers, shapes_texts
from vlkit.errors import DataError
from vlkit.processors import QFormerTokenizer

CAPTION = "a large red circle to the left of a small blue square"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes_world(root / "world", images=12, size=32, seed=1)
    folders = build_shapes_tokenizers(root / "world", root / "tok", lm_vocab=400)
    return root / "world", folders


def test_files_and_classes(tokenizers):
    _, folders = tokenizers
    expected = {"qformer": "BertTokenizer", "opt": "GPT2Tokenizer", "llama": "LlamaTokenizer"}
    for name, folder in folders.items():
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (folder / file).is_file(), (name, file)
        assert type(AutoTokenizer.from_pretrained(str(folder), local_files_only=True)).__name__ == expected[name]
    assert (folders["qformer"] / "vocab.txt").read_text().splitlines()[:5] == [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]


def test_qformer_wordpiece(tokenizers):
    _, folders = tokenizers
    tok = AutoTokenizer.from_pretrained(str(folders["qformer"]))
    ids = tok(CAPTION.upper())["input_ids"]  # lower-cases
    assert ids[0] == tok.cls_token_id == 2 and ids[-1] == tok.sep_token_id == 3
    assert tok.pad_token_id == 0 and tok.unk_token_id == 1 and tok.mask_token_id == 4
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    assert tok.unk_token_id not in tok("a red circle? yes: 2, (3)!")["input_ids"]  # ASCII is in the alphabet
    q = QFormerTokenizer(folders["qformer"])  # appends [DEC] as the next id
    assert q.bos_token_id == len(tok) and q.vocab_size == len(tok) + 1
    ids, mask = q([CAPTION, "a cross"], padding="max_length", max_length=32)
    assert ids.shape == (2, 32) and int(mask[1].sum()) == 4 and int(ids[1, -1]) == 0


def test_opt_byte_level_bpe(tokenizers):
    _, folders = tokenizers
    tok = AutoTokenizer.from_pretrained(str(folders["opt"]))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.bos_token == tok.eos_token == tok.unk_token == "</s>" and tok.pad_token_id == 1
    ids = tok(CAPTION + "\n")["input_ids"]
    assert ids[0] == 2  # OPT's BOS is </s>
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and ids[-1] == newline[0]  # "\n" is one token, also right after a word
    assert tok(CAPTION + ".\n", add_special_tokens=False)["input_ids"][-1] == newline[0]
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION + "\n"
    assert tok.decode(tok("Zürich ✓")["input_ids"], skip_special_tokens=True) == "Zürich ✓"  # byte level
    batch = tok(["a", CAPTION], padding=True)["input_ids"]
    assert batch[0][-1] == 1  # right padding with <pad>


def test_llama_bpe(tokenizers):
    _, folders = tokenizers
    tok = AutoTokenizer.from_pretrained(str(folders["llama"]))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [vocab[t] for t in BYTE_TOKENS[:2]] == [3, 4] and vocab["<0x0A>"] == 13  # as in LLaMA's vocabulary
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    ids = tok(CAPTION)["input_ids"]
    assert ids[0] == 1 and 2 not in ids  # <s> prepended, no eos appended
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["▁a", "▁large"]
    assert tok(CAPTION + "\n")["input_ids"][-1] == 13  # byte fallback
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    assert tok.decode(tok("ça ✓")["input_ids"], skip_special_tokens=True) == "ça ✓"
    # "</s>" written in the text is the eos token (InstructBLIP-Vicuna appends it to responses as text)
    assert tok("red</s>", add_special_tokens=False)["input_ids"][-1] == 2
    # InstructBLIP-Vicuna's later overrides (done by the processors) give sequences that start with id 2.
    # transformers 5 keeps tokenizer.json's BOS template until the template is rebuilt, and rebuilds it from
    # add_bos_token (not saved in tokenizer_config.json since v5): setting it rebuilds the template.
    tok.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"})
    tok.add_bos_token = True
    assert tok("a red circle")["input_ids"][0] == 2 and tok.pad_token_id == len(vocab)


def test_texts_cover_every_kind(tokenizers):
    world, _ = tokenizers
    texts = shapes_texts(world, ["train", "val"])
    assert len(texts["classes"]) == 60 and all(texts[k] for k in texts)
    assert len(texts["questions"]) == len(texts["answers"]) // 10  # ten annotator answers per question
    with pytest.raises(DataError, match="unknown split"):
        build_shapes_tokenizers(world, world / "x", splits=["dev"])


def test_cli(tokenizers, tmp_path, capsys):
    world, folders = tokenizers
    assert cli_main(["data", "tokenizers", str(world), str(tmp_path / "t"), "--lm-vocab", "400"]) == 0
    assert "qformer:" in capsys.readouterr().out
    for name in ("qformer", "opt", "llama"):  # deterministic: the same files again
        for file in ("tokenizer.json", "tokenizer_config.json"):
            assert json.loads((tmp_path / "t" / name / file).read_text()) == json.loads(
                (folders[name] / file).read_text()
            )
    assert cli_main(["data", "tokenizers", str(tmp_path / "nowhere"), str(tmp_path / "u")]) == 2
