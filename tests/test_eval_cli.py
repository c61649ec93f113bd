"""``vlkit eval``: every task on a tiny shapes split with tiny saved models, the official file formats, the
metrics against direct calls of the metric functions, the outputs against direct calls of the model
helpers, sharding, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

from vlkit import cli
from vlkit.checkpoints.folder import load_checkpoint, save_pretrained
from vlkit.data.datasets import CaptionDataset, ImageFolderDataset, RetrievalDataset, VQADataset
from vlkit.data.shapes import shapes_paths
from vlkit.evaluation import tasks
from vlkit.evaluation.retrieval import evaluate_retrieval
from vlkit.evaluation.zeroshot import ZeroShotClassifier
from vlkit.metrics.caption import evaluate_captions, load_coco_references, load_coco_results
from vlkit.metrics.classification import topk_accuracy
from vlkit.metrics.retrieval import retrieval_recall
from vlkit.metrics.vqa import load_vqa_annotations, load_vqa_results, vqa_accuracy
from vlkit.models.qformer_decoding import caption_qformer, lavis_caption_config
from vlkit.processors import BlipCaptionProcessor, blip_question, make_image_processor
from vlkit.prompting import LLMProcessor, generate_text, rank_candidates

FAST_METRICS = "Bleu_1,Bleu_4,ROUGE_L,CIDEr,SPICE"  # METEOR starts a JVM (seconds): its parity is tested elsewhere


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    threads, level = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    hf_logging.set_verbosity_error()
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(level)


@pytest.fixture(scope="module")
def world(tiny_shapes_world):
    return shapes_paths(tiny_shapes_world, "test")


@pytest.fixture(scope="module")
def instructblip_folder(tmp_path_factory):
    from stage2_reference import tokenizer, write_bert_vocab

    from vlkit import zoo
    from vlkit.processors import QFormerTokenizer
    from vlkit.prompting import instructblip_vicuna_tokenizer

    root = tmp_path_factory.mktemp("instructblip")
    write_bert_vocab(root / "vocab.txt")
    model = zoo.build("tiny-instructblip-vicuna")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_pretrained(
        model,
        root / "model",
        llm_tokenizer=instructblip_vicuna_tokenizer(tokenizer("llama")),
        qformer_tokenizer=QFormerTokenizer(root / "vocab.txt"),
    )


def run(capsys, task, *args, device="cpu"):
    # The outputs are compared with direct calls on the CPU (a CUDA run is tested separately).
    rc = cli.main(["eval", task, *map(str, args), "--device", device])
    out, err = capsys.readouterr()
    return rc, out, err


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def pixels_of(dataset, indices):
    return torch.stack([dataset[i].image for i in indices])


# ----------------------------------------------------------------------------------------------------------
# caption


def test_caption_stage1_writes_coco_results_scored_like_cocoevalcap(capsys, tmp_path, tiny_stage1_folder, world):
    out = tmp_path / "out"
    rc, stdout, _ = run(
        capsys, "caption", "--model", tiny_stage1_folder, "--data", world.root, "--output", out,
        "--batch-size", 3, "--max-new-tokens", 8, "--min-new-tokens", 2, "--metrics", FAST_METRICS,
    )  # fmt: skip
    assert rc == 0
    predictions = read(out / "predictions.json")
    assert all(set(p) == {"image_id", "caption"} for p in predictions)
    assert all(isinstance(p["image_id"], int) and isinstance(p["caption"], str) for p in predictions)
    gt = read(world.coco_ground_truth)
    assert [p["image_id"] for p in predictions] == [image["id"] for image in gt["images"]]

    doc = read(out / "metrics.json")
    direct = evaluate_captions(
        load_coco_results(out / "predictions.json"),
        load_coco_references(world.coco_ground_truth),
        FAST_METRICS.split(","),
    )
    assert {k: v for k, v in doc["metrics"].items() if k != "agg_metrics"} == direct.scores
    assert doc["metrics"]["agg_metrics"] == direct.scores["CIDEr"] + direct.scores["Bleu_4"]
    assert doc["metrics"]["SPICE"] is None and "CoreNLP" in doc["unavailable"]["SPICE"]
    assert doc["task"] == "caption" and doc["model_kind"] == "stage1" and doc["num_samples"] == 4
    assert doc["data"]["references"] == str(world.coco_ground_truth) and doc["files"] == ["predictions.json"]
    assert "CIDEr" in stdout and "SPICE" in stdout

    # The captions are the model's own Q-Former captions with LAVIS's settings (3 beams) and the overrides.
    generation = doc["settings"]["generation"]
    assert (generation["num_beams"], generation["max_new_tokens"], generation["min_new_tokens"]) == (3, 8, 2)
    loaded = load_checkpoint(tiny_stage1_folder)
    dataset = CaptionDataset(world.coco_captions, world.image_root, make_image_processor("blip_image_eval", 32))
    config = lavis_caption_config(eos_token_id=102, pad_token_id=0).replace(max_new_tokens=8, min_new_tokens=2)
    expected = []
    for batch in ([0, 1, 2], [3]):
        expected += caption_qformer(loaded.model, loaded.qformer_tokenizer, pixels_of(dataset, batch), config)
    assert [p["caption"] for p in predictions] == expected
    assert len(set(expected)) > 1  # the tiny model's captions depend on the image


def test_caption_stage2_uses_coco_settings_and_falls_back_to_the_files_captions(
    capsys, tmp_path, tiny_opt_folder, world
):
    # An annotation file without a *_gt.json beside it: the references are its own caption lists.
    annotations = tmp_path / "data" / "captions_test.json"
    annotations.parent.mkdir()
    shutil.copy(world.coco_captions, annotations)
    out = tmp_path / "out"
    rc, _, _ = run(
        capsys, "caption", "--model", tiny_opt_folder, "--data", annotations, "--images", world.image_root,
        "--output", out, "--limit", 3, "--batch-size", 2, "--max-new-tokens", 9, "--prompt", "a photo of",
        "--metrics", "Bleu_4,CIDEr",
    )  # fmt: skip
    assert rc == 0
    doc = read(out / "metrics.json")
    assert doc["data"]["references"] is None and doc["num_samples"] == 3 and doc["model_kind"] == "stage2"
    settings = doc["settings"]
    assert settings["prompt"] == "a photo of" and settings["decoder"] == "llm"
    assert (settings["generation"]["num_beams"], settings["generation"]["min_new_tokens"]) == (5, 8)
    dataset = CaptionDataset(annotations, world.image_root)
    references = {ann["image_id"]: ann["captions"] for ann in dataset.annotation}
    predictions = load_coco_results(out / "predictions.json")
    assert len(predictions) == 3
    assert doc["metrics"]["CIDEr"] == evaluate_captions(predictions, references, ["Bleu_4", "CIDEr"]).scores["CIDEr"]

    loaded = load_checkpoint(tiny_opt_folder)
    processor = LLMProcessor(loaded.model.config, loaded.llm_tokenizer)
    config = processor.generation_config("caption", min_new_tokens=8, max_new_tokens=9)
    dataset = CaptionDataset(annotations, world.image_root, make_image_processor("blip_image_eval", 32))
    expected = []
    for batch in ([0, 1], [2]):
        expected += generate_text(
            loaded.model, processor, pixels_of(dataset, batch), ["a photo of"] * len(batch), config
        )
    assert list(predictions.values()) == expected


def test_flant5_counts_the_decoder_start_in_the_minimum_length(capsys, tmp_path, world):
    from stage2_reference import tokenizer

    from vlkit import zoo

    folder = save_pretrained(zoo.build("tiny-blip2-flant5"), tmp_path / "t5", llm_tokenizer=tokenizer("t5"))
    out = tmp_path / "out"
    rc, _, _ = run(
        capsys, "caption", "--model", folder, "--data", world.root, "--output", out, "--limit", 1,
        "--max-new-tokens", 9, "--metrics", "CIDEr",
    )  # fmt: skip
    assert rc == 0
    generation = read(out / "metrics.json")["settings"]["generation"]
    assert (generation["min_new_tokens"], generation["max_new_tokens"], generation["num_beams"]) == (7, 9, 5)
    assert len(read(out / "predictions.json")) == 1


def test_instructblip_caption_and_vqa_defaults(capsys, tmp_path, instructblip_folder, world):
    rc, _, _ = run(
        capsys, "caption", "--model", instructblip_folder, "--data", world.root, "--output", tmp_path / "c",
        "--limit", 2, "--max-new-tokens", 11, "--metrics", "CIDEr",
    )  # fmt: skip
    assert rc == 0
    settings = read(tmp_path / "c" / "metrics.json")["settings"]
    assert settings["prompt"] == "A short image caption."
    assert (settings["generation"]["min_new_tokens"], settings["generation"]["max_new_tokens"]) == (10, 11)

    rc, _, _ = run(
        capsys, "vqa", "--model", instructblip_folder, "--data", world.root, "--output", tmp_path / "v",
        "--limit", 3, "--batch-size", 3, "--max-new-tokens", 3,
    )  # fmt: skip
    assert rc == 0
    doc = read(tmp_path / "v" / "metrics.json")
    assert doc["model_kind"] == "instructblip" and doc["settings"]["template"] == "Question: {} Short Answer:"
    assert doc["settings"]["generation"]["length_penalty"] == -1.0
    loaded = load_checkpoint(instructblip_folder)
    processor = LLMProcessor(loaded.model.config, loaded.llm_tokenizer, loaded.qformer_tokenizer)
    dataset = VQADataset(
        world.vqa_questions, world.vqa_annotations, world.image_root, make_image_processor("blip_image_eval", 32),
        image_template=world.vqa_image_template,
    )  # fmt: skip
    prompts = [f"Question: {blip_question(dataset[i].question)} Short Answer:" for i in range(3)]
    config = processor.generation_config("vqa", length_penalty=-1.0, max_new_tokens=3)
    expected = generate_text(loaded.model, processor, pixels_of(dataset, range(3)), prompts, config)
    assert [p["answer"] for p in read(tmp_path / "v" / "predictions.json")] == expected


# ----------------------------------------------------------------------------------------------------------
# vqa


def test_vqa_writes_vqa_results_scored_with_the_official_accuracy(capsys, tmp_path, tiny_opt_folder, world):
    out = tmp_path / "out"
    rc, stdout, _ = run(
        capsys, "vqa", "--model", tiny_opt_folder, "--data", world.root, "--output", out, "--batch-size", 3,
        "--max-new-tokens", 3,
    )  # fmt: skip
    assert rc == 0
    predictions = read(out / "predictions.json")
    questions = read(world.vqa_questions)["questions"]
    assert [p["question_id"] for p in predictions] == [q["question_id"] for q in questions]
    assert all(set(p) == {"question_id", "answer"} and isinstance(p["answer"], str) for p in predictions)

    doc = read(out / "metrics.json")
    direct = vqa_accuracy(load_vqa_results(out / "predictions.json"), load_vqa_annotations(world.vqa_annotations))
    assert doc["metrics"]["overall"] == doc["metrics"]["agg_metrics"] == direct.overall
    assert doc["per_question_type"] == direct.per_question_type
    assert doc["per_answer_type"] == direct.per_answer_type
    assert doc["metrics"] == {"overall": direct.overall, **direct.per_answer_type, "agg_metrics": direct.overall}
    assert doc["settings"]["template"] == "Question: {} Short answer:"
    generation = doc["settings"]["generation"]
    assert (generation["num_beams"], generation["length_penalty"], generation["max_new_tokens"]) == (5, 0.0, 3)
    assert "overall" in stdout and "question type" in stdout

    loaded = load_checkpoint(tiny_opt_folder)
    processor = LLMProcessor(loaded.model.config, loaded.llm_tokenizer)
    dataset = VQADataset(
        world.vqa_questions, None, world.image_root, make_image_processor("blip_image_eval", 32),
        image_template=world.vqa_image_template,
    )  # fmt: skip
    config = processor.generation_config("vqa", max_new_tokens=3)
    expected = []
    for start in range(0, len(dataset), 3):
        batch = list(range(start, min(len(dataset), start + 3)))
        prompts = [f"Question: {blip_question(dataset[i].question)} Short answer:" for i in batch]
        expected += generate_text(loaded.model, processor, pixels_of(dataset, batch), prompts, config)
    assert [p["answer"] for p in predictions] == expected


def test_vqa_explicit_files_equal_the_shapes_root(capsys, tmp_path, tiny_opt_folder, world):
    common = ["--model", tiny_opt_folder, "--limit", 4, "--batch-size", 2, "--max-new-tokens", 2]
    assert run(capsys, "vqa", *common, "--data", world.root, "--output", tmp_path / "a")[0] == 0
    rc, _, _ = run(
        capsys, "vqa", *common, "--questions", world.vqa_questions, "--annotations", world.vqa_annotations,
        "--images", world.image_root, "--image-template", world.vqa_image_template, "--output", tmp_path / "b",
    )  # fmt: skip
    assert rc == 0
    assert read(tmp_path / "a" / "predictions.json") == read(tmp_path / "b" / "predictions.json")
    a, b = read(tmp_path / "a" / "metrics.json"), read(tmp_path / "b" / "metrics.json")
    assert a["metrics"] == b["metrics"] and a["num_samples"] == 4

    # Questions without annotations (a test-dev split): predictions only.
    rc, stdout, _ = run(
        capsys, "vqa", *common, "--data", world.vqa_questions, "--images", world.image_root,
        "--image-template", world.vqa_image_template, "--output", tmp_path / "c",
    )  # fmt: skip
    assert rc == 0
    c = read(tmp_path / "c" / "metrics.json")
    assert c["metrics"] == {} and c["data"]["vqa_annotations"] is None
    assert read(tmp_path / "c" / "predictions.json") == read(tmp_path / "a" / "predictions.json")


def test_vqa_rank_candidates_picks_from_the_answer_list(capsys, tmp_path, tiny_opt_folder, world):
    candidates = ["red", "blue", "green", "yes", "no", "2", "circle"]
    answer_list = tmp_path / "answers.json"
    answer_list.write_text(json.dumps(candidates))
    out = tmp_path / "out"
    rc, _, _ = run(
        capsys, "vqa", "--model", tiny_opt_folder, "--data", world.root, "--output", out, "--limit", 4,
        "--batch-size", 4, "--rank-candidates", answer_list,
    )  # fmt: skip
    assert rc == 0
    answers = [p["answer"] for p in read(out / "predictions.json")]
    loaded = load_checkpoint(tiny_opt_folder)
    processor = LLMProcessor(loaded.model.config, loaded.llm_tokenizer)
    dataset = VQADataset(
        world.vqa_questions, None, world.image_root, make_image_processor("blip_image_eval", 32),
        image_template=world.vqa_image_template,
    )  # fmt: skip
    prompts = [f"Question: {blip_question(dataset[i].question)} Short answer:" for i in range(4)]
    ranks, _ = rank_candidates(loaded.model, processor, pixels_of(dataset, range(4)), prompts, candidates)
    assert answers == [candidates[i] for i in ranks[:, 0].tolist()]
    assert read(out / "metrics.json")["settings"]["mode"] == "rank"


# ----------------------------------------------------------------------------------------------------------
# retrieval and classification


def test_retrieval_scores_and_recall(capsys, tmp_path, tiny_stage1_folder, world):
    out = tmp_path / "out"
    rc, stdout, _ = run(
        capsys, "retrieval", "--model", tiny_stage1_folder, "--data", world.root, "--output", out,
        "--k-test", 3, "--batch-size", 3, "--save-scores",
    )  # fmt: skip
    assert rc == 0
    i2t, t2i = np.load(out / "scores_i2t.npy"), np.load(out / "scores_t2i.npy")
    dataset = RetrievalDataset(
        world.flickr, world.image_root, make_image_processor("blip_image_eval", 32), BlipCaptionProcessor()
    )
    assert i2t.shape == (4, len(dataset.text)) and t2i.shape == (len(dataset.text), 4)
    doc = read(out / "metrics.json")
    img2txt = [dataset.img2txt[i] for i in range(4)]
    txt2img = [dataset.txt2img[t] for t in range(len(dataset.text))]
    assert doc["metrics"] == retrieval_recall(i2t, img2txt, txt2img, sim_t2i=t2i)
    assert doc["files"] == ["scores_i2t.npy", "scores_t2i.npy"] and "txt_r1" in stdout

    loaded = load_checkpoint(tiny_stage1_folder)
    scores = evaluate_retrieval(loaded.model, loaded.qformer_tokenizer, dataset, k_test=3, progress=False)
    np.testing.assert_allclose(i2t, scores.i2t.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(t2i, scores.t2i.numpy(), rtol=0, atol=1e-6)
    assert (i2t == -100).sum(axis=1).tolist() == [len(dataset.text) - 3] * 4  # k_test re-ranked per image


def test_retrieval_limit_keeps_the_first_images_and_their_captions(capsys, tmp_path, tiny_stage1_folder, world):
    rc, _, _ = run(
        capsys, "retrieval", "--model", tiny_stage1_folder, "--data", world.flickr, "--images", world.image_root,
        "--output", tmp_path, "--limit", 2, "--save-scores",
    )  # fmt: skip
    assert rc == 0
    dataset = RetrievalDataset(world.flickr, world.image_root)
    assert np.load(tmp_path / "scores_i2t.npy").shape == (2, len(dataset.img2txt[0]) + len(dataset.img2txt[1]))
    assert read(tmp_path / "metrics.json")["num_samples"] == 2


def test_classification_predictions_and_topk(capsys, tmp_path, tiny_stage1_folder, world):
    out = tmp_path / "out"
    rc, stdout, _ = run(
        capsys, "classification", "--model", tiny_stage1_folder, "--data", world.root, "--output", out,
        "--batch-size", 3, "--save-scores",
    )  # fmt: skip
    assert rc == 0
    dataset = ImageFolderDataset(world.classification_root, make_image_processor("blip_image_eval", 32), world.labels)
    logits = np.load(out / "scores_logits.npy")
    assert logits.shape == (len(dataset), 60)
    labels = np.array([label for _, label in dataset.samples])
    doc = read(out / "metrics.json")
    assert doc["metrics"] == {**topk_accuracy(logits, labels), "agg_metrics": topk_accuracy(logits, labels)["top1"]}
    predictions = read(out / "predictions.json")
    assert [p["image"] for p in predictions] == [path for path, _ in dataset.samples]
    assert [p["label"] for p in predictions] == [dataset.classes[i] for i in labels]
    assert [p["prediction"] for p in predictions] == [dataset.classes[i] for i in logits.argmax(axis=1)]
    assert all(len(p["top5"]) == 5 and p["top5"][0] == p["prediction"] for p in predictions)

    loaded = load_checkpoint(tiny_stage1_folder)
    classifier = ZeroShotClassifier(loaded.model, loaded.qformer_tokenizer, dataset.classes, "a photo of {}.")
    with torch.no_grad():
        expected = classifier.logits(classifier.image_inputs(pixels_of(dataset, range(len(dataset))))[1])
    np.testing.assert_allclose(logits, expected.numpy(), rtol=0, atol=1e-5)
    assert "top1" in stdout


# ----------------------------------------------------------------------------------------------------------
# runners with oracle models: non-trivial scores, id alignment, sharding


def _key(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def processor32():
    return make_image_processor("blip_image_eval", 32)


def test_oracle_captions_score_like_the_metric_functions(world, processor32):
    dataset = CaptionDataset(world.coco_captions, world.image_root, processor32)
    truth = {_key(dataset[i].image): dataset[i].captions[0] for i in range(len(dataset))}

    def oracle(pixels):
        return [truth[_key(p)] for p in pixels]

    result = tasks.run_caption(oracle, dataset, metrics=["Bleu_4", "CIDEr"], batch_size=3, progress=False)
    references = {ann["image_id"]: ann["captions"] for ann in dataset.annotation}
    assert [p["caption"] for p in result.predictions] == [references[p["image_id"]][0] for p in result.predictions]
    direct = evaluate_captions(
        {p["image_id"]: p["caption"] for p in result.predictions}, references, ["Bleu_4", "CIDEr"]
    )
    assert result.metrics == {**direct.scores, "agg_metrics": direct.scores["CIDEr"] + direct.scores["Bleu_4"]}
    assert result.metrics["CIDEr"] > 1 and result.metrics["Bleu_4"] > 0.5


def test_oracle_answers_score_like_the_official_accuracy(world, processor32):
    dataset = VQADataset(
        world.vqa_questions, world.vqa_annotations, world.image_root, processor32,
        image_template=world.vqa_image_template,
    )  # fmt: skip
    annotations = {a["question_id"]: a for a in read(world.vqa_annotations)["annotations"]}
    truth = {
        (_key(dataset[i].image), dataset[i].question): annotations[dataset[i].question_id]["multiple_choice_answer"]
        for i in range(len(dataset))
    }

    def oracle(pixels, questions):
        return [truth[(_key(p), q)] for p, q in zip(pixels, questions)]

    result = tasks.run_vqa(oracle, dataset, load_vqa_annotations(world.vqa_annotations), batch_size=3, progress=False)
    direct = vqa_accuracy({p["question_id"]: p["answer"] for p in result.predictions}, annotations)
    assert result.metrics["overall"] == direct.overall > 80
    assert result.details["per_question_type"] == direct.per_question_type


@pytest.mark.parametrize("n, batch_size, world_size", [(7, 2, 2), (4, 3, 2), (5, 1, 3), (2, 4, 3)])
def test_shards_are_whole_batches_dealt_round_robin(n, batch_size, world_size):
    single = tasks.shard_batches(n, batch_size)
    shards = [tasks.shard_batches(n, batch_size, rank, world_size) for rank in range(world_size)]
    assert sorted(b for shard in shards for b in shard) == single  # the same batches, each exactly once
    assert [b for b in single if b in shards[0]] == single[::world_size]
    assert tasks.shard_batches(7, 2, 1, 2) == [[2, 3], [6]]


def test_sharded_predictions_merge_into_the_single_process_ones(world, processor32):
    dataset = ImageFolderDataset(world.classification_root, processor32, world.labels)
    g = torch.Generator().manual_seed(0)
    table = {}

    def scorer(pixels):  # per-image logits, and a batch-size dependence would show in the merged result
        return torch.stack([table.setdefault(_key(p), torch.randn(60, generator=g)) for p in pixels])

    indices = list(range(len(dataset)))
    single = tasks.gather_records(tasks.predict_classes(scorer, dataset, indices, batch_size=3, progress=False))
    parts = [
        tasks.predict_classes(scorer, dataset, indices, batch_size=3, rank=r, world_size=2, progress=False)
        for r in range(2)
    ]
    assert [p for p, _ in parts[0]] == [0, 1, 2] and [p for p, _ in parts[1]] == [3]
    merged = tasks.gather_records(parts[1] + parts[0])
    assert [p for p, _ in merged] == [p for p, _ in single] == indices
    for (_, (a, la)), (_, (b, lb)) in zip(merged, single):
        assert la == lb and np.array_equal(a, b)
    with pytest.raises(Exception, match="overlap"):
        tasks.gather_records(parts[0] + parts[0])


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2


def _vlmo_folder(path):
    from vlkit.models import VLMo, VLMoConfig

    config = VLMoConfig(
        hidden_size=32, depth=2, num_heads=2, vlffn_start_layer=1, image_size=32, patch_size=16, max_text_len=8,
        vocab_size=64, heads=("vqa",), vqa_num_labels=4,
    )  # fmt: skip
    return save_pretrained(VLMo(config), path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("vqa-stage1", "vlkit eval vqa needs a stage-2 BLIP-2 (with an LLM), an InstructBLIP model, a VLMo"),
        ("retrieval-opt", "needs the Q-Former's text input and the ITC/ITM heads"),
        ("classification-opt", "a stage-2 one only when trained with keep_stage1"),
        ("nlvr2-stage1", "vlkit eval nlvr2 needs a VLMo model"),
        ("missing-data", "no such file"),
        ("no-data", "vlkit eval caption needs --data"),
        ("no-images", "vlkit eval retrieval needs --images"),
        ("missing-model", "--model"),
        ("train-split", "not a training file"),
        ("bad-template", "needs exactly one '{}'"),
        ("bad-metric", "--metrics 'BLEU'"),
        ("stage1-prompt", "takes no prompt"),
        ("missing-candidates", "--rank-candidates"),
        ("vlmo", "--limit is not supported for VLMo"),
        ("vlmo-caption", "vlkit eval caption needs a stage-1 BLIP-2"),
        ("bad-limit", "--limit must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case, message, tiny_stage1_folder, tiny_opt_folder, world):
    s1, opt, root = tiny_stage1_folder, tiny_opt_folder, world.root
    vlmo = _vlmo_folder(tmp_path / "vlmo") if case.startswith("vlmo") else None
    args = {
        "vqa-stage1": ["vqa", "--model", s1, "--data", root],
        "retrieval-opt": ["retrieval", "--model", opt, "--data", root],
        "classification-opt": ["classification", "--model", opt, "--data", root],
        "nlvr2-stage1": ["nlvr2", "--model", s1, "--data", root],
        "missing-data": ["caption", "--model", s1, "--data", tmp_path / "nope.json", "--images", tmp_path],
        "no-data": ["caption", "--model", s1, "--images", world.image_root],
        "no-images": ["retrieval", "--model", s1, "--data", world.flickr],
        "missing-model": ["caption", "--model", tmp_path / "no-model", "--data", root],
        "train-split": ["caption", "--model", s1, "--data", root, "--split", "train"],
        "bad-template": ["vqa", "--model", opt, "--data", root, "--template", "Q: {} {}"],
        "bad-metric": ["caption", "--model", s1, "--data", root, "--metrics", "BLEU"],
        "stage1-prompt": ["caption", "--model", s1, "--data", root, "--prompt", "a photo of"],
        "missing-candidates": ["vqa", "--model", opt, "--data", root, "--rank-candidates", tmp_path / "x.json"],
        "vlmo": ["vqa", "--model", vlmo, "--data", root, "--limit", 2],
        "vlmo-caption": ["caption", "--model", vlmo, "--data", root],
        "bad-limit": ["caption", "--model", s1, "--data", root, "--limit", 0],
    }[case]
    rc, stdout, stderr = run(capsys, *args, "--output", tmp_path / "out")
    assert rc == 2
    assert stderr.count("\n") == 1 and stderr.startswith("vlkit: error: ") and message in stderr, stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_help_lists_the_tasks(capsys):
    assert cli.main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    assert all(task in usage for task in ("caption", "vqa", "retrieval", "classification"))


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["caption", "vqa", "retrieval", "classification"])
def test_a_cuda_run_agrees_with_the_cpu_run(capsys, tmp_path, task, tiny_stage1_folder, tiny_opt_folder, world):
    model = tiny_opt_folder if task == "vqa" else tiny_stage1_folder
    extra = {
        "caption": ["--max-new-tokens", 6, "--min-new-tokens", 2, "--metrics", "Bleu_4,CIDEr"],
        "vqa": ["--max-new-tokens", 2],
        "retrieval": ["--k-test", 3, "--save-scores"],
        "classification": ["--save-scores"],
    }[task]
    for device in ("cpu", "cuda"):
        args = ["--model", model, "--data", world.root, "--output", tmp_path / device, "--batch-size", 3, *extra]
        assert run(capsys, task, *args, device=device)[0] == 0
    cpu, gpu = read(tmp_path / "cpu" / "metrics.json"), read(tmp_path / "cuda" / "metrics.json")
    assert gpu["num_samples"] == cpu["num_samples"] and gpu["settings"] == cpu["settings"]
    if task in ("caption", "vqa"):  # generated text may differ in near-ties: compare the ids, rescore the text
        key = "image_id" if task == "caption" else "question_id"
        on_gpu = read(tmp_path / "cuda" / "predictions.json")
        assert [p[key] for p in on_gpu] == [p[key] for p in read(tmp_path / "cpu" / "predictions.json")]
        if task == "vqa":
            direct = vqa_accuracy(
                load_vqa_results(tmp_path / "cuda" / "predictions.json"), load_vqa_annotations(world.vqa_annotations)
            )
            assert gpu["metrics"]["overall"] == direct.overall
    else:
        for name in gpu["files"]:
            if name.endswith(".npy"):
                np.testing.assert_allclose(
                    np.load(tmp_path / "cuda" / name), np.load(tmp_path / "cpu" / name), atol=1e-3
                )


def test_bundled_model_names_work_as_model(capsys, tmp_path, world):
    rc, stdout, _ = run(
        capsys, "classification", "--model", "shapes-blip2", "--data", world.root, "--template", "a {}",
        "--output", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0 and "top1" in stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model"].endswith("shapes-blip2")
    rc, _, stderr = run(capsys, "vqa", "--model", "no-such-model", "--data", world.root)
    assert rc == 2 and "not a model name" in stderr and "shapes-blip2" in stderr
