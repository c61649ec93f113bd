"""Datasets and collation: every shapes-world format loads; every malformed input is a named error."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vlkit.data import (
    CaptionDataset,
    CaptionEvalSample,
    CaptionSample,
    ImageFolderDataset,
    InstructionDataset,
    RetrievalDataset,
    TextCollator,
    VQADataset,
    collate,
    collate_vqa,
    generate_shapes_world,
    image_id_from_filename,
    shapes_paths,
)
from vlkit.errors import DataError, ImageError
from vlkit.processors import (
    BlipCaptionProcessor,
    BlipQuestionProcessor,
    ImageEvalProcessor,
    QFormerTokenizer,
    blip_caption,
)

S = 16
EVAL = ImageEvalProcessor(S)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "shapes"
    generate_shapes_world(out, images=8, size=32, seed=5)
    return out


@pytest.fixture
def copy(world, tmp_path) -> Path:
    """A private copy of the world that a test may damage."""
    target = tmp_path / "shapes"
    shutil.copytree(world, target)
    return target


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> QFormerTokenizer:
    words = "a an the small large red green blue yellow purple orange circle square triangle diamond cross"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words.split()]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n")
    return QFormerTokenizer(path)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------ every format loads


def test_caption_train_and_eval(world):
    train_paths, test_paths = shapes_paths(world, "train"), shapes_paths(world, "test")
    train = CaptionDataset(train_paths.coco_captions, train_paths.image_root, EVAL, BlipCaptionProcessor("a photo of "))
    assert not train.is_eval and len(train) == 40
    raw = json.loads(train_paths.coco_captions.read_text())
    sample = train[7]
    assert isinstance(sample, CaptionSample) and sample.image.shape == (3, S, S)
    assert sample.text == "a photo of " + blip_caption(raw[7]["caption"])
    assert [train[i].image_id for i in range(0, 40, 5)] == list(range(8))  # dense, first-seen order
    test = CaptionDataset(test_paths.coco_captions, test_paths.image_root, EVAL)
    assert test.is_eval and len(test) == 8
    first = test[0]
    assert isinstance(first, CaptionEvalSample) and first.image_id == 17 and len(first.captions) == 5
    gt = json.loads(test_paths.coco_ground_truth.read_text())
    assert sorted(test[i].image_id for i in range(8)) == sorted(img["id"] for img in gt["images"])
    batch = collate([test[0], test[1]])
    assert batch["image"].shape == (2, 3, S, S) and batch["image_id"].tolist() == [17, 18]
    assert len(batch["captions"]) == 2


def test_multiple_annotation_files_concatenate(world):
    p = shapes_paths(world, "val")
    both = CaptionDataset([p.coco_captions, p.flickr], p.image_root, EVAL)
    assert len(both) == 16


def test_retrieval_train_and_eval(world):
    p = shapes_paths(world, "test")
    ds = RetrievalDataset(p.flickr, p.image_root, EVAL, BlipCaptionProcessor())
    assert ds.is_eval and len(ds) == 8 and len(ds.text) == 40 and len(ds.image) == 8
    for img, texts in ds.img2txt.items():
        assert texts == list(range(5 * img, 5 * img + 5))
        assert all(ds.txt2img[t] == img for t in texts)
    assert ds.text[0] == blip_caption(json.loads(p.flickr.read_text())[0]["caption"][0])
    sample = ds[3]
    assert sample.index == 3 and sample.image.shape == (3, S, S)
    train = RetrievalDataset(shapes_paths(world, "train").flickr, p.image_root, EVAL)
    pair = train[12]
    assert pair.image_id == 2 and isinstance(pair.text, str)
    batch = collate([train[i] for i in range(6)])
    assert batch["image_id"].tolist() == [0, 0, 0, 0, 0, 1] and len(batch["text"]) == 6


def test_vqa_with_and_without_annotations(world):
    p = shapes_paths(world, "val")
    ds = VQADataset(
        p.vqa_questions, p.vqa_annotations, p.image_root, EVAL, BlipQuestionProcessor(),
        image_template=p.vqa_image_template,
    )  # fmt: skip
    assert ds.has_answers and len(ds) == 24
    anns = json.loads(p.vqa_annotations.read_text())["annotations"]
    for i, sample in enumerate(ds):
        assert sample.image.shape == (3, S, S) and sample.question_id == anns[i]["question_id"]
        raw = [a["answer"] for a in anns[i]["answers"]]
        assert sample.answers == list(dict.fromkeys(raw))
        assert sample.weights == pytest.approx([raw.count(a) / 10 for a in sample.answers])
        assert sample.question_type == anns[i]["question_type"]
    batch = collate_vqa([ds[0], None, ds[1]])
    assert batch["image"].shape == (2, 3, S, S)
    assert batch["n_answers"].tolist() == [len(ds[0].answers), len(ds[1].answers)]
    assert len(batch["answer"]) == batch["weight"].numel() == sum(batch["n_answers"].tolist())
    test = VQADataset(p.vqa_questions, None, p.image_root, EVAL, image_template=p.vqa_image_template)
    assert not test.has_answers and test[0].answers == [] and test[0].weights == []


def test_image_folder(world):
    p = shapes_paths(world, "train")
    with_labels = ImageFolderDataset(p.classification_root, EVAL, p.labels)
    without = ImageFolderDataset(p.classification_root, EVAL)
    assert with_labels.classes == without.classes and len(with_labels.classes) == 60
    assert len(with_labels) == 8 and with_labels.samples == without.samples
    sample = with_labels[0]
    name = with_labels.classes[sample.label]
    assert with_labels.samples[0][0].startswith(name + "/")
    batch = collate([with_labels[i] for i in range(4)])
    assert batch["label"].dtype == torch.long and batch["image"].shape == (4, 3, S, S)


def test_instructions(world, tiny_tokenizer):
    p = shapes_paths(world, "train")
    ds = InstructionDataset(p.instructions, p.image_root, EVAL, BlipQuestionProcessor(), BlipCaptionProcessor())
    assert len(ds) == 24
    collator = TextCollator(tiny_tokenizer, fields=("instruction", "response"), max_length=12)
    loader = DataLoader(ds, batch_size=5, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["image"].shape == (5, 3, S, S)
    assert batch["instruction_ids"].shape[0] == 5 and batch["instruction_ids"].shape[1] <= 12
    assert batch["response_mask"].dtype == torch.long and len(batch["response"]) == 5
    assert (batch["instruction_ids"][:, 0] == tiny_tokenizer.cls_token_id).all()


def test_text_collator_pads_to_max_length(world, tiny_tokenizer):
    p = shapes_paths(world, "train")
    ds = CaptionDataset(p.coco_captions, p.image_root, EVAL, BlipCaptionProcessor())
    batch = TextCollator(tiny_tokenizer, max_length=30, padding="max_length")([ds[0], ds[1], None])
    assert batch["text_ids"].shape == batch["text_mask"].shape == (2, 30)
    ids = tiny_tokenizer(["a small red circle"])[0][0].tolist()
    assert ids[1:-1] == [tiny_tokenizer.tokenizer.convert_tokens_to_ids(w) for w in "a small red circle".split()]
    with pytest.raises(DataError, match="no text field 'question'"):
        TextCollator(tiny_tokenizer, fields=("question",))([ds[0]])
    assert TextCollator(tiny_tokenizer)([None, None]) is None


def test_collate_rejects_mixed_samples(world):
    p = shapes_paths(world, "test")
    caption = CaptionDataset(p.coco_captions, p.image_root, EVAL)[0]
    retrieval = RetrievalDataset(p.flickr, p.image_root, EVAL)[0]
    with pytest.raises(DataError, match="mix of sample types"):
        collate([caption, retrieval])
    assert collate([]) is None and collate_vqa([None]) is None


def test_image_id_from_filename():
    assert image_id_from_filename("val2014/COCO_val2014_000000391895.jpg") == 391895
    assert image_id_from_filename("1000092795.jpg") == 1000092795
    assert image_id_from_filename("test/shapes_test_000017.png") == 17
    with pytest.raises(DataError, match="numeric image id"):
        image_id_from_filename("val/cat.jpg")


# ------------------------------------------------------------------ bad images


def test_corrupt_image_names_the_file_or_is_skipped(copy):
    p = shapes_paths(copy, "test")
    ds = CaptionDataset(p.coco_captions, p.image_root, EVAL)
    victim = p.image_root / ds.annotation[2]["image"]
    victim.write_bytes(victim.read_bytes()[:60])
    with pytest.raises(ImageError, match=str(victim)):
        ds[2]
    skipping = CaptionDataset(p.coco_captions, p.image_root, EVAL, skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipping bad image: .*shapes_test_000019.png"):
        assert skipping[2] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(DataLoader(skipping, batch_size=4, collate_fn=collate))
    assert [b["image"].shape[0] for b in batches] == [3, 4]
    assert 19 not in batches[0]["image_id"].tolist()


def test_missing_image_and_pixel_limit(copy):
    p = shapes_paths(copy, "train")
    ds = ImageFolderDataset(p.classification_root, EVAL)
    (p.classification_root / ds.samples[0][0]).unlink()
    with pytest.raises(ImageError, match="no such image file"):
        ds[0]
    small_limit = ImageFolderDataset(p.classification_root, EVAL, max_pixels=100)
    with pytest.raises(ImageError, match="above the limit of 100"):
        small_limit[1]


# ------------------------------------------------------------------ malformed annotations


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "ann.json", '[\n{"image": "a_1.png", "caption": "x"},\n{"image": \n')
    with pytest.raises(DataError, match=r"ann\.json: malformed JSON at line 4"):
        CaptionDataset(path, tmp_path)
    with pytest.raises(DataError, match=r"missing\.json: no such annotation file"):
        CaptionDataset(tmp_path / "missing.json", tmp_path)
    with pytest.raises(DataError, match="expected a JSON list"):
        CaptionDataset(write(tmp_path / "obj.json", '{"a": 1}'), tmp_path)
    with pytest.raises(DataError, match="no entries"):
        CaptionDataset(write(tmp_path / "empty.json", "[]"), tmp_path)


@pytest.mark.parametrize(
    "entries,message",
    [
        ([{"image": "a_1.png", "caption": "x", "image_id": "1"}, {"caption": "y", "image_id": "2"}],
         r"entry 1: missing key 'image'"),
        ([{"image": "a_1.png", "caption": "x"}], r"entry 0: missing key 'image_id'"),
        ([{"image": "a_1.png", "caption": 3, "image_id": "1"}], r"entry 0: key 'caption' should be str or list"),
        ([{"image": "a_1.png", "image_id": "1"}], r"entry 0: missing key 'caption'"),
        ([{"image": 5, "caption": "x", "image_id": "1"}], r"entry 0: key 'image' should be str, got int"),
        ([{"image": "a_1.png", "caption": "x", "image_id": 1.5}], r"entry 0: key 'image_id' should be str or int"),
        ([{"image": "a_1.png", "caption": ["x", 2]}], r"entry 0: caption\[1\] should be str"),
        ([{"image": "a_1.png", "caption": []}], r"entry 0: 'caption' is empty"),
        ([{"image": "a_1.png", "caption": "x", "image_id": "1"}, {"image": "a_2.png", "caption": ["y"]}],
         r"entry 1: mixes single captions"),
        ([{"image": "cat.png", "caption": ["y"]}], r"entry 0: cannot derive a numeric image id"),
        (["just a string"], r"entry 0: expected an object, got str"),
    ],
)  # fmt: skip
def test_bad_caption_entries_name_file_entry_and_key(tmp_path, entries, message):
    path = write(tmp_path / "bad.json", json.dumps(entries))
    with pytest.raises(DataError, match=r"bad\.json: " + message):
        CaptionDataset(path, tmp_path)
    if "numeric image id" not in message:  # retrieval needs no numeric ids
        with pytest.raises(DataError, match=r"bad\.json: " + message):
            RetrievalDataset(path, tmp_path)


def vqa_files(tmp_path, questions, annotations, subtype="val"):
    q = {"questions": questions}
    if subtype is not None:
        q["data_subtype"] = subtype
    qp = write(tmp_path / "q.json", json.dumps(q))
    ap = write(tmp_path / "a.json", json.dumps({"annotations": annotations}))
    return qp, ap


def answers(word):
    return [{"answer": word, "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]


def test_bad_vqa_files(tmp_path):
    question = {"image_id": 1, "question": "what?", "question_id": 10}
    ann = {"question_id": 10, "image_id": 1, "answers": answers("red")}
    qp, ap = vqa_files(tmp_path, [question], [ann])
    ds = VQADataset(qp, ap, tmp_path, image_template="{data_subtype}/img_{image_id:03d}.png")
    assert ds.questions[0]["image"] == "val/img_001.png"

    qp, ap = vqa_files(tmp_path, [question], [{**ann, "question_id": 11}])
    with pytest.raises(DataError, match=r"a\.json: no annotation for question_id 10"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [question], [{**ann, "image_id": 2}])
    with pytest.raises(DataError, match="question_id 10 has image_id 2 but the question says 1"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [question], [ann, ann])
    with pytest.raises(DataError, match=r"a\.json: annotation 1: duplicate question_id 10"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [question], [{"question_id": 10, "image_id": 1}])
    with pytest.raises(DataError, match=r"a\.json: annotation 0: missing key 'answers'"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [question], [{**ann, "answers": [{"answer": 3}]}])
    with pytest.raises(DataError, match=r"annotation 0: answers\[0\]: key 'answer' should be str"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [{"image_id": 1, "question_id": 10}], [ann])
    with pytest.raises(DataError, match=r"q\.json: question 0: missing key 'question'"):
        VQADataset(qp, ap, tmp_path)
    qp, ap = vqa_files(tmp_path, [question], [ann], subtype=None)
    with pytest.raises(DataError, match="no 'data_subtype'"):
        VQADataset(qp, ap, tmp_path)
    assert VQADataset(qp, ap, tmp_path, data_subtype="x").questions[0]["image"].startswith("x/COCO_x_")
    write(qp, json.dumps({"qs": []}))
    with pytest.raises(DataError, match=r"q\.json: missing key 'questions'"):
        VQADataset(qp, None, tmp_path)


def test_bad_image_folder(copy, tmp_path):
    root = shapes_paths(copy, "train").classification_root
    labels = write(tmp_path / "labels.txt", "small red circle\nlarge red circle\n")
    with pytest.raises(DataError, match=r"are not listed in .*labels\.txt"):
        ImageFolderDataset(root, EVAL, labels)
    with pytest.raises(DataError, match="appears twice"):
        ImageFolderDataset(root, EVAL, write(tmp_path / "dup.txt", "a\nb\na\n"))
    with pytest.raises(DataError, match="no such image folder"):
        ImageFolderDataset(tmp_path / "nothing", EVAL)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", EVAL)


def test_bad_instruction_lines(tmp_path):
    good = json.dumps({"image": "a.png", "instruction": "hi", "response": "yo"})
    with pytest.raises(DataError, match=r"inst\.jsonl: line 3: malformed JSON"):
        InstructionDataset(write(tmp_path / "inst.jsonl", f"{good}\n\n{{oops\n"), tmp_path)
    with pytest.raises(DataError, match=r"inst\.jsonl: line 2: missing key 'response'"):
        InstructionDataset(
            write(tmp_path / "inst.jsonl", f'{good}\n{{"image": "a.png", "instruction": "x"}}\n'), tmp_path
        )
    with pytest.raises(DataError, match=r"line 1: key 'instruction' should be str"):
        InstructionDataset(
            write(tmp_path / "inst.jsonl", '{"image": "a", "instruction": 1, "response": "r"}'), tmp_path
        )
    with pytest.raises(DataError, match="no records"):
        InstructionDataset(write(tmp_path / "inst.jsonl", "\n\n"), tmp_path)
    assert len(InstructionDataset(write(tmp_path / "inst.jsonl", f"{good}\n\n{good}\n"), tmp_path)) == 2
