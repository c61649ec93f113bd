"""VLMo through ``vlkit eval`` (vqa / retrieval, shapes world and explicit files, vlkit folders and unilm
files, one and two devices) and through ``vlkit.load(...).answer``: the same numbers and predictions as
:func:`vlkit.evaluation.vlmo.evaluate_vlmo`, the inference guide's "mean of cost" line, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vlmo_fixtures import tiny_vlmo

from vlkit import cli
from vlkit.data.shapes import shapes_paths
from vlkit.data.vlmo_text import VLMoTokenizer, train_wordpiece
from vlkit.data.vqa_vocab import build_vqa_vocab
from vlkit.evaluation.vlmo import evaluate_vlmo


@pytest.fixture(scope="module")
def shapes_vlmo(tmp_path_factory, tiny_shapes_world):
    """A tiny random VLMo VQA folder whose tokenizer and answers come from the tiny shapes world."""
    from vlkit.tasks.vlmo import export_folder

    root = tmp_path_factory.mktemp("vlmo_cli")
    train = shapes_paths(tiny_shapes_world, "train")
    texts = [q["question"] for q in json.loads(train.vqa_questions.read_text())["questions"]]
    tok = VLMoTokenizer(train_wordpiece(texts, root / "tok", vocab_size=200), 12)
    vocab = build_vqa_vocab(
        [train.vqa_annotations, shapes_paths(tiny_shapes_world, "test").vqa_annotations], min_count=1
    )
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = tiny_vlmo(("vqa",), tok.vocab_size, vqa_num_labels=len(vocab), max_text_len=12).eval()
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim == 2:
                    param.normal_(0.0, 0.3)  # answers that depend on the input
    return export_folder(model, model.state_dict(), root / "model", tokenizer=tok, vocab=vocab)


def _run(capsys, *args):
    rc = cli.main(["eval", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _test_data(world: Path) -> dict:
    test = shapes_paths(world, "test")
    return {"questions": [str(test.vqa_questions)], "annotations": [str(test.vqa_annotations)],
            "image_root": str(test.image_root), "image_template": test.vqa_image_template}  # fmt: skip


def test_vqa_on_the_shapes_world_equals_evaluate_vlmo(capsys, tmp_path, shapes_vlmo, tiny_shapes_world):
    rc, out, err = _run(capsys, "vqa", "--model", shapes_vlmo, "--data", tiny_shapes_world, "--device", "cpu",
                        "--output", tmp_path / "eval", "--quiet")  # fmt: skip
    assert rc == 0, err
    direct = evaluate_vlmo("vqa", shapes_vlmo, _test_data(tiny_shapes_world), output_dir=tmp_path / "d", progress=False)
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert predictions == json.loads(Path(direct["predictions_file"]).read_text())
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["model_kind"] == "vlmo" and doc["num_samples"] == len(predictions) == 8
    assert doc["metrics"]["vqa_accuracy"] == pytest.approx(direct["vqa_accuracy"])
    assert set(doc["per_answer_type"]) <= {"yes/no", "number", "other"} and doc["per_question_type"]
    assert doc["timing"]["mean_cost_ms"] > 0 and "mean_cost_ms" not in doc["metrics"]

    # the table and the inference guide's latency line; two devices give the same answers
    rc, out, err = _run(capsys, "vqa", "--model", shapes_vlmo, "--data", tiny_shapes_world, "--devices", "cpu,cpu",
                        "--output", tmp_path / "two", "--batch-size", 3)  # fmt: skip
    assert rc == 0, err
    assert "vqa_accuracy" in out and "mean of cost:" in out and "batch size 3" in out
    assert json.loads((tmp_path / "two" / "predictions.json").read_text()) == predictions
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["devices"] == ["cpu", "cpu"]


def test_vqa_from_explicit_files(capsys, tmp_path, shapes_vlmo, tiny_shapes_world):
    test = shapes_paths(tiny_shapes_world, "test")
    rc, _, err = _run(capsys, "vqa", "--model", shapes_vlmo, "--data", test.vqa_questions, "--annotations",
                      test.vqa_annotations, "--images", test.image_root, "--image-template",
                      test.vqa_image_template, "--output", tmp_path / "eval", "--quiet")  # fmt: skip
    assert rc == 0, err
    direct = evaluate_vlmo("vqa", shapes_vlmo, _test_data(tiny_shapes_world), progress=False)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["vqa_accuracy"] == pytest.approx(
        direct["vqa_accuracy"]
    )


def test_retrieval_from_a_unilm_file(capsys, tmp_path, tiny_shapes_world):
    from vlkit.checkpoints.unilm import save_unilm_checkpoint

    test = shapes_paths(tiny_shapes_world, "test")
    tok_dir = train_wordpiece(["a red circle", "a blue square above a green cross"], tmp_path / "tok", vocab_size=150)
    model = tiny_vlmo(("irtr", "itm"), VLMoTokenizer(tok_dir).vocab_size, max_text_len=16)
    pt = tmp_path / "vlmo_tiny.pt"
    save_unilm_checkpoint(model, pt)
    rc, out, err = _run(capsys, "retrieval", "--model", pt, "--data", tiny_shapes_world, "--vlmo-tokenizer", tok_dir,
                        "--itm-rerank-k", 2, "--output", tmp_path / "eval")  # fmt: skip
    assert rc == 0, err
    data = {"annotations": [str(test.flickr)], "image_root": str(test.image_root)}
    direct = evaluate_vlmo("retrieval", pt, data, tokenizer=tok_dir, itm_rerank_k=2, progress=False)
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("txt_r1", "img_r1", "r_mean"):
        assert doc["metrics"][key] == pytest.approx(direct[key])
    assert "mean of cost:" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit", "2"], "--limit is not supported for VLMo"),
        (["--template", "Q: {}"], "does not apply to VLMo"),
        (["--split", "nope"], "unknown split"),
    ],
)
def test_bad_vlmo_options_are_one_line(capsys, tmp_path, shapes_vlmo, tiny_shapes_world, extra, message):
    rc, _, err = _run(capsys, "vqa", "--model", shapes_vlmo, "--data", tiny_shapes_world, *extra,
                      "--output", tmp_path / "out")  # fmt: skip
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_pipeline_answers_as_the_evaluation(tmp_path, shapes_vlmo, tiny_shapes_world):
    import vlkit

    test = shapes_paths(tiny_shapes_world, "test")
    questions = json.loads(test.vqa_questions.read_text())
    pipe = vlkit.load(shapes_vlmo)
    assert isinstance(pipe.text_tokenizer, VLMoTokenizer)  # one tokenizer for training, evaluation and the API
    images = [test.image_root / test.vqa_image_template.format(data_subtype=questions["data_subtype"], **q)
              for q in questions["questions"]]  # fmt: skip
    answers = pipe.answer(images, [q["question"] for q in questions["questions"]])
    out = evaluate_vlmo("vqa", shapes_vlmo, _test_data(tiny_shapes_world), output_dir=tmp_path, progress=False)
    expected = {p["question_id"]: p["answer"] for p in json.loads(Path(out["predictions_file"]).read_text())}
    assert answers == [expected[q["question_id"]] for q in questions["questions"]]
