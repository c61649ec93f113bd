"""VLMo evaluation: VQA predictions in the official format with the official accuracy and the reference's VQA
score, NLVR2 accuracy per table, retrieval recall as the reference computes it (with and without ITM
re-ranking), two-device inference, the file-level entry point on an exported folder and on the shapes world,
and unilm checkpoints through ``vlkit convert`` / ``load_model``."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from vlmo_fixtures import caption_table, nlvr2_table, png_bytes, tiny_tokenizer_dir, tiny_vlmo

from vlkit.checkpoints.folder import load_model
from vlkit.checkpoints.unilm import save_unilm_checkpoint
from vlkit.data.vlmo import NLVR2Source, RetrievalSource, VQASource
from vlkit.data.vlmo_text import VLMoTokenizer
from vlkit.data.vqa_vocab import VQAVocab
from vlkit.errors import CheckpointError, ConfigError
from vlkit.evaluation.vlmo import evaluate_nlvr2, evaluate_retrieval, evaluate_vlmo, evaluate_vqa
from vlkit.metrics.vqa import load_vqa_annotations, load_vqa_results, vqa_accuracy
from vlkit.processors import make_image_processor
from vlkit.tasks.vlmo import export_folder

ANSWERS = ("2", "red", "yes", "no", "circle")
TEMPLATE = "{data_subtype}/img_{image_id}.png"


def _vqa_files(root: Path) -> VQASource:
    """Four questions on three images in the official VQAv2 layout."""
    (root / "imgs" / "val").mkdir(parents=True)
    for image_id in (1, 2, 3):
        (root / "imgs" / "val" / f"img_{image_id}.png").write_bytes(png_bytes(10 + image_id))
    raw = {
        (101, 1, "how many dogs?"): ["2"] * 10,
        (102, 1, "what color is it?"): ["red"] * 7 + ["orange"] * 3,
        (203, 2, "is it a cat?"): ["yes"] * 2 + ["no"] * 8,
        (304, 3, "which shape?"): ["zebra"] * 10,  # no answer in the vocabulary: still evaluated
    }
    questions = {"data_subtype": "val", "questions": []}
    annotations = {"annotations": []}
    for (qid, image_id, text), answers in raw.items():
        questions["questions"].append({"image_id": image_id, "question": text, "question_id": qid})
        annotations["annotations"].append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
                "question_type": text.split()[0],
                "answer_type": "number" if qid == 101 else "other",
                "multiple_choice_answer": answers[0],
            }
        )
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(annotations))
    return VQASource(questions=[root / "q.json"], annotations=[root / "a.json"], image_root=root / "imgs",
                     image_template=TEMPLATE)  # fmt: skip


@pytest.fixture
def setup(tmp_path):
    tok = VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 12)
    model = tiny_vlmo(("vqa",), tok.vocab_size, vqa_num_labels=len(ANSWERS)).eval()
    return tok, model, _vqa_files(tmp_path), VQAVocab(ANSWERS)


def test_vqa_predictions_accuracy_and_score(setup, tmp_path):
    tok, model, source, vocab = setup
    dataset = source.open(vocab, make_image_processor("vlmo_eval", 32))
    result = evaluate_vqa(model, dataset, tok, vocab, annotations=source.annotations, batch_size=3,
                          progress=False, output=tmp_path / "out")  # fmt: skip
    preds = result.predictions
    assert [p["question_id"] for p in preds] == [101, 102, 203, 304]
    assert all(set(p) == {"question_id", "answer"} and p["answer"] in ANSWERS for p in preds)
    # the results file is the official format
    assert load_vqa_results(tmp_path / "out" / "vqa_predictions.json") == {p["question_id"]: p["answer"] for p in preds}
    # predictions are the arg-max of the classifier
    ids, mask = tok([dataset[i].question for i in range(4)])
    images = torch.stack([dataset[i].image for i in range(4)])
    logits = model.vqa_logits(ids, mask, images)
    assert [p["answer"] for p in preds] == vocab.decode(logits)
    # official accuracy, and the reference's VQA score over the answerable questions
    truth = load_vqa_annotations(source.annotations[0])
    official = vqa_accuracy({p["question_id"]: p["answer"] for p in preds}, truth)
    assert result.metrics["vqa_accuracy"] == pytest.approx(official.overall)
    soft = {101: {"2": 1.0}, 102: {"red": 1.0}, 203: {"yes": 0.6, "no": 1.0}}
    expected = [soft[p["question_id"]].get(p["answer"], 0.0) for p in preds if p["question_id"] in soft]
    assert result.metrics["vqa_score"] == pytest.approx(100 * sum(expected) / 3)
    assert result.metrics["num_samples"] == 4 and result.metrics["mean_cost_ms"] > 0
    assert result.details["per_answer_type"].keys() == {"number", "other"}


def test_vqa_accuracy_on_forced_answers(setup):
    tok, model, source, vocab = setup
    with torch.no_grad():
        model.vqa_head.fc2.bias[vocab.label("2")] = 100.0  # every answer becomes "2"
    result = evaluate_vqa(model, source.open(vocab, make_image_processor("vlmo_eval", 32)), tok, vocab,
                          annotations=source.annotations, progress=False)  # fmt: skip
    assert {p["answer"] for p in result.predictions} == {"2"}
    # q101: ten "2" -> 100; the others never say "2" -> 0
    assert result.metrics["vqa_accuracy"] == pytest.approx(25.0)
    assert result.metrics["vqa_accuracy_number"] == pytest.approx(100.0)
    assert result.metrics["vqa_score"] == pytest.approx(100 / 3)


def test_two_devices_give_identical_predictions(setup):
    tok, model, source, vocab = setup
    dataset = source.open(vocab, make_image_processor("vlmo_eval", 32))
    one = evaluate_vqa(model, dataset, tok, vocab, batch_size=2, progress=False)
    split = copy.deepcopy(model)
    two = evaluate_vqa(split, dataset, tok, vocab, batch_size=2, devices=["cpu", "cpu"], progress=False)
    assert one.predictions == two.predictions
    ids, mask = tok([dataset[i].question for i in range(4)])
    images = torch.stack([dataset[i].image for i in range(4)])
    torch.testing.assert_close(split.vqa_logits(ids, mask, images), model.vqa_logits(ids, mask, images))


def test_vqa_vocabulary_must_fit_the_head(setup):
    tok, model, source, _ = setup
    vocab = VQAVocab(("a", "b"))
    with pytest.raises(ConfigError, match="5 labels but the answer vocabulary has 2"):
        evaluate_vqa(model, source.open(vocab, None), tok, vocab, progress=False)


def test_nlvr2_accuracy_per_table(tmp_path):
    tok = VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 12)
    model = tiny_vlmo(("nlvr2",), tok.vocab_size).eval()
    rows = [{"questions": ["two dogs", "no cat", "a mat"], "answers": ["True", "False", "True"], "identifier": "d-1"}]
    dev = nlvr2_table(tmp_path / "nlvr2_dev.arrow", rows)
    test = nlvr2_table(tmp_path / "nlvr2_test1.arrow", [dict(rows[0], answers=["False", "False", "True"])], seed=7)
    dataset = NLVR2Source(arrow=[dev, test]).open(make_image_processor("vlmo_eval", 32))
    result = evaluate_nlvr2(model, dataset, tok, batch_size=4, progress=False)
    samples = [dataset[i] for i in range(len(dataset))]
    ids, mask = tok([s.sentence for s in samples])
    logits = model.nlvr2_logits(ids, mask, torch.stack([s.image_0 for s in samples]),
                                torch.stack([s.image_1 for s in samples]))  # fmt: skip
    correct = (logits.argmax(1) == torch.tensor([s.label for s in samples])).float()
    assert result.metrics["accuracy"] == pytest.approx(100 * correct.mean().item())
    assert result.metrics["accuracy_nlvr2_dev"] == pytest.approx(100 * correct[:3].mean().item())
    assert result.metrics["accuracy_nlvr2_test1"] == pytest.approx(100 * correct[3:].mean().item())
    assert [p["table"] for p in result.predictions] == ["nlvr2_dev"] * 3 + ["nlvr2_test1"] * 3


def _reference_recall(scores_i2t: torch.Tensor, iids: torch.Tensor, tiids: torch.Tensor) -> dict[str, float]:
    """unilm ``compute_irtr_recall``'s top-k rule over an (images, texts) score matrix."""
    out = {}
    for k in (1, 5, 10):
        top = scores_i2t.topk(k, dim=1).indices
        out[f"txt_r{k}"] = 100 * (iids[:, None] == tiids[top]).float().max(dim=1)[0].mean().item()
        top = scores_i2t.topk(k, dim=0).indices
        out[f"img_r{k}"] = 100 * (tiids[None, :] == iids[top]).float().max(dim=0)[0].mean().item()
    return out


@pytest.mark.parametrize("rerank", [0, 3])
def test_retrieval_recall_as_the_reference(tmp_path, rerank):
    tok = VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 12)
    model = tiny_vlmo(("irtr", "itm"), tok.vocab_size).eval()
    captions = [["a red dog", "dog on mat"], ["two cats"], ["a blue circle", "circle"], ["how many"], ["a mat"],
                ["cat"], ["green square"], ["the dog"], ["no"], ["yes"], ["red cat"], ["blue dog"]]  # fmt: skip
    path = caption_table(tmp_path / "f30k_caption_karpathy_test.arrow", captions)
    gallery = RetrievalSource(arrow=[path]).open(make_image_processor("vlmo_eval", 32), train=False)
    result = evaluate_retrieval(model, gallery, tok, batch_size=5, itm_rerank_k=rerank, progress=False)
    # the reference's computation, written out
    ids, mask = tok(gallery.text)
    images = torch.stack([gallery[i].image for i in range(len(gallery))])
    text = model.encode_text(ids, mask).cls_feats
    image = model.encode_image(images).cls_feats
    scores = image @ text.t()
    iids = torch.arange(len(gallery))
    tiids = torch.tensor([gallery.txt2img[t] for t in range(len(gallery.text))])
    if rerank:
        i2t = torch.full_like(scores, -100.0)
        for i in range(len(gallery)):
            top = scores[i].topk(rerank).indices
            i2t[i, top] = model(ids[top], mask[top], images[i].expand(rerank, -1, -1, -1), head="itm")[:, 1]
        t2i = torch.full_like(scores.t(), -100.0)
        for t in range(len(gallery.text)):
            top = scores[:, t].topk(rerank).indices
            t2i[t, top] = model(ids[t].expand(rerank, -1), mask[t].expand(rerank, -1), images[top], head="itm")[:, 1]
        i2t, t2i = i2t + scores, t2i + scores.t()
        expected = {}
        for k in (1, 5, 10):
            top = i2t.topk(k, dim=1).indices
            expected[f"txt_r{k}"] = 100 * (iids[:, None] == tiids[top]).float().max(dim=1)[0].mean().item()
            top = t2i.topk(k, dim=1).indices
            expected[f"img_r{k}"] = 100 * (tiids[:, None] == iids[top]).float().max(dim=1)[0].mean().item()
    else:
        expected = _reference_recall(scores, iids, tiids)
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-4), key
    assert result.metrics["r_mean"] == pytest.approx(sum(expected.values()) / 6, abs=1e-4)


def test_retrieval_needs_the_right_heads(tmp_path):
    tok = VLMoTokenizer(tiny_tokenizer_dir(tmp_path / "tok"), 12)
    path = caption_table(tmp_path / "c.arrow", [["a dog"], ["a cat"]])
    gallery = RetrievalSource(arrow=[path]).open(make_image_processor("vlmo_eval", 32), train=False)
    with pytest.raises(ConfigError, match="ITM head"):
        evaluate_retrieval(tiny_vlmo(("irtr",), tok.vocab_size), gallery, tok, itm_rerank_k=2, progress=False)
    with pytest.raises(ConfigError, match="ITC projections"):
        evaluate_retrieval(tiny_vlmo(("vqa",), tok.vocab_size), gallery, tok, progress=False)


def test_evaluate_vlmo_on_an_exported_folder(setup, tmp_path):
    tok, model, source, vocab = setup
    folder = export_folder(model, model.state_dict(), tmp_path / "model", tokenizer=tok, vocab=vocab)
    data = {"questions": [str(source.questions[0])], "annotations": [str(source.annotations[0])],
            "image_root": str(source.image_root), "image_template": TEMPLATE}  # fmt: skip
    out = evaluate_vlmo("vqa", folder, data, output_dir=tmp_path / "eval", progress=False)
    direct = evaluate_vqa(model, source.open(vocab, make_image_processor("vlmo_eval", 32)), tok, vocab,
                          annotations=source.annotations, progress=False)  # fmt: skip
    assert out["vqa_accuracy"] == pytest.approx(direct.metrics["vqa_accuracy"])
    assert load_vqa_results(out["predictions_file"]) == {p["question_id"]: p["answer"] for p in direct.predictions}
    two = evaluate_vlmo("vqa", folder, data, devices=["cpu", "cpu"], progress=False)
    assert two["vqa_accuracy"] == out["vqa_accuracy"] and two["devices"] == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="unknown VLMo evaluation task"):
        evaluate_vlmo("caption", folder, data)  # type: ignore[arg-type]


def test_unilm_checkpoint_through_vlkit_convert_and_load_model(tmp_path):
    from vlkit.cli import main

    model = tiny_vlmo(("irtr",), 120, patch_size=8)
    pt = tmp_path / "vlmo_tiny_384_f30k.pt"
    save_unilm_checkpoint(model, pt)
    assert main(["convert", str(pt), str(tmp_path / "converted")]) == 0
    for loaded in (load_model(pt), load_model(tmp_path / "converted")):
        # the architecture comes from the tensors (drop-path and an absent head's size are not in a file)
        assert replace(loaded.config, drop_path_rate=0.0, vqa_num_labels=0) == replace(model.config, vqa_num_labels=0)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"visual_encoder.cls_token": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError):
        load_model(other)  # not mistaken for a VLMo file (falls through to the LAVIS reader)
    # a retrieval evaluation straight from the unilm file, with the tokenizer it was trained with
    tok_dir = tiny_tokenizer_dir(tmp_path / "tok")
    path = caption_table(tmp_path / "c.arrow", [["a dog"], ["a cat"], ["a mat"]])
    out = evaluate_vlmo("retrieval", pt, {"arrow": [str(path)]}, tokenizer=tok_dir, progress=False)
    assert {"txt_r1", "img_r1", "r_mean", "mean_cost_ms"} <= out.keys()
