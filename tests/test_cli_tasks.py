"""The task commands (vlkit caption / vqa / instruct / classify / retrieve / embed / models / serve): tables for
people, --json equal to the Python API, one-line errors with exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from surfaces_fixtures import one_intraop_thread

import vlkit
from vlkit import api
from vlkit.cli import main


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_intraop_thread():
        yield


@pytest.fixture(scope="module")
def dirs(tiny_model_dirs):
    return {kind: str(folder) for kind, folder in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def images(shape_images):
    return [str(p) for p in shape_images]


@pytest.fixture(scope="module")
def pipes(dirs):
    return {kind: vlkit.load(folder) for kind, folder in dirs.items()}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_caption_table_and_json(capsys, dirs, images, pipes):
    expected = pipes["stage1"].caption(images)
    code, out, _ = run(capsys, "caption", *images, "--model", dirs["stage1"])
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["image", "caption"] and set(lines[1]) == {"-", " "}
    assert len(lines) == 2 + len(images)
    for line, caption in zip(lines[2:], expected):
        assert line.rstrip().endswith(caption)
    payload = run_json(
        capsys, "caption", *images, "--model", dirs["blip2"], "--num-beams", "2", "--max-new-tokens", "6"
    )
    assert payload == [
        {"image": i, "caption": c}
        for i, c in zip(images, pipes["blip2"].caption(images, num_beams=2, max_new_tokens=6))
    ]
    folder = str(Path(images[0]).parent)
    assert [p["image"] for p in run_json(capsys, "caption", folder, "--model", dirs["stage1"])] == sorted(images)
    payload = run_json(capsys, "caption", images[0], "--model", dirs["blip2"], "--decoder", "qformer")
    assert payload[0]["caption"] == pipes["blip2"].caption(images[0], decoder="qformer")


def test_vqa_asks_every_question_about_every_image(capsys, dirs, images, pipes):
    questions = ["what color is the shape?", "how many shapes are there?"]
    payload = run_json(
        capsys, "vqa", *images[:2], "-q", questions[0], "--question", questions[1], "--model", dirs["vlmo"]
    )
    pairs = [(i, q) for i in images[:2] for q in questions]
    answers = pipes["vlmo"].answer([i for i, _ in pairs], [q for _, q in pairs])
    assert payload == [{"image": i, "question": q, "answer": a} for (i, q), a in zip(pairs, answers)]
    code, out, _ = run(
        capsys, "vqa", images[0], "--question", "what?", "--model", dirs["blip2"], "--max-new-tokens", "4"
    )
    assert code == 0 and out.splitlines()[0].split() == ["image", "question", "answer"]
    assert pipes["blip2"].answer(images[0], "what?", max_new_tokens=4) in out


def test_instruct_accepts_the_seed_spelling(capsys, dirs, images, pipes):
    expected = pipes["instructblip"].instruct(images[0], "describe the image.", max_new_tokens=6)
    for spelling in (["--img_path", images[0]], [images[0]], ["--img-path", images[0]]):
        payload = run_json(
            capsys, "instruct", *spelling, "--prompt", "describe the image.", "--model", dirs["instructblip"],
            "--max-new-tokens", "6",
        )  # fmt: skip
        assert payload == [{"image": images[0], "prompt": "describe the image.", "response": expected}]
    argv = ["instruct", "--img_path", images[0], "-p", "hi", "--model", dirs["instructblip"], "--max-new-tokens", "4"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.splitlines()[0].split() == ["image", "response"]
    code, _, err = run(capsys, *argv[:-2])  # InstructBLIP's 256 new tokens do not fit the tiny LLaMA's positions
    assert code == 2 and "exceeds the LLM's 256 positions" in err


def test_classify(capsys, dirs, images, pipes):
    labels = ["red circle", "blue square", "green triangle"]
    payload = run_json(
        capsys, "classify", *images[:2], "--labels", ",".join(labels), "--model", dirs["stage1"], "--top", "2"
    )
    expected = pipes["stage1"].classify(images[:2], labels, top_k=2)
    assert payload == [{"image": i, "labels": r} for i, r in zip(images[:2], expected)]
    code, out, _ = run(
        capsys, "classify", images[0], "-l", "cat,dog", "--template", "a {} here", "--model", dirs["stage1"]
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["image", "rank", "label", "score"] and len(lines) == 4
    best = pipes["stage1"].classify(images[0], ["cat", "dog"], "a {} here")[0]
    assert best["label"] in lines[2] and f"{best['score']:.4f}" in lines[2]


def test_retrieve_over_a_folder_and_a_text_file(capsys, dirs, images, pipes, tmp_path):
    texts = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    folder = str(Path(images[0]).parent)
    payload = run_json(capsys, "retrieve", "--images", folder, "--texts", str(tmp_path / "texts.txt"), "--top", "2",
                       "--model", dirs["stage1"])  # fmt: skip
    result = pipes["stage1"].retrieve(sorted(images), texts, k=2)
    assert [m["image"] for m in payload["text_to_image"][1]["matches"]] == [
        sorted(images)[m["index"]] for m in result["text_to_image"][1]
    ]
    assert [m["text"] for m in payload["image_to_text"][0]["matches"]] == [
        m["text"] for m in result["image_to_text"][0]
    ]
    code, out, _ = run(capsys, "retrieve", "--images", *images[:2], "--text", "a red circle", "--model", dirs["stage1"],
                       "--direction", "text-to-image")  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["direction", "query", "rank", "match", "score"] and len(lines) == 4


def test_embed_prints_and_saves(capsys, dirs, images, pipes, tmp_path):
    out_file = tmp_path / "e.safetensors"
    code, out, _ = run(
        capsys, "embed", *images[:2], "--text", "a red circle", "--model", dirs["stage1"], "--out", str(out_file)
    )
    assert code == 0 and out.splitlines()[0].split()[:3] == ["kind", "input", "shape"] and "wrote" in out
    saved = load_file(out_file)
    torch.testing.assert_close(saved["image_embeds"], pipes["stage1"].embed_images(images[:2]))
    torch.testing.assert_close(saved["text_embeds"], pipes["stage1"].embed_texts(["a red circle"]))
    payload = run_json(capsys, "embed", "--text", "a", "--model", dirs["stage1"])
    assert payload["images"] == [] and len(payload["texts"][0]["embedding"]) == pipes["stage1"].model.config.embed_dim


def test_models_lists_names(capsys, tmp_path, monkeypatch, dirs):
    monkeypatch.setattr(api, "ASSETS_DIR", tmp_path)
    shutil.copytree(dirs["vlmo"], tmp_path / "shapes-vlmo")
    payload = run_json(capsys, "models")
    names = [m["name"] for m in payload]
    assert names[:3] == ["shapes-blip2", "shapes-instructblip", "shapes-vlmo"] and "blip2-vitg-pretrain" in names
    assert [m["name"] for m in run_json(capsys, "models", "--available")] == ["shapes-vlmo"]
    code, out, _ = run(capsys, "models")
    assert code == 0 and out.splitlines()[0].split() == ["name", "arch", "tasks", "available", "needs"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "/no/such.png", "--model", "{stage1}"], "/no/such.png: no such image file"),
        (["caption", "{image}", "--model", "/no/model"], "/no/model: no such file or folder, and not a model name"),
        (["vqa", "{image}", "-q", "what?", "--model", "{stage1}"], "cannot do answer"),
        (["classify", "{image}", "--model", "{stage1}"], "the following arguments are required: --labels"),
        (["classify", "{image}", "--labels", "a,a", "--model", "{stage1}"], "duplicates"),
        (["classify", "{image}", "--labels", "a", "--top", "0", "--model", "{stage1}"], "--top must be >= 1"),
        (["caption", "{image}", "--num-beams", "0", "--model", "{stage1}"], "num_beams must be >= 1"),
        (["caption", "{image}", "--model", "{stage1}", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["caption", "{image}", "--model", "{stage1}", "--device", "cuda:7"], "cuda"),
        (["instruct", "--prompt", "hi", "--model", "{instructblip}"], "no images given"),
        (["retrieve", "--images", "{image}", "--model", "{stage1}"], "give texts with --texts FILE or --text"),
        (["embed", "--model", "{stage1}"], "give images and/or texts"),
        (["embed", "--text", "a", "--out", "x.npy", "--model", "{stage1}"], "must end in .safetensors"),
        (["caption", "{image}"], "shapes-blip2 is a bundled model but this installation has no"),
        (["instruct", "{image}", "--prompt", "x"], "shapes-instructblip is a bundled model"),
        (["caption", "{image}", "--model", "blip2-vitg-pretrain"], "vlkit convert blip2_pretrained.pth OUT"),
        (["serve", "--max-batch", "0", "--model", "{stage1}"], "--max-batch must be >= 1"),
        (["serve", "a", "--model", "b"], "two models given"),
    ],
)
def test_errors_are_one_line_with_exit_status_2(capsys, dirs, images, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(api, "ASSETS_DIR", tmp_path)  # no bundled models, whatever is installed
    monkeypatch.chdir(tmp_path)
    argv = [a.format(image=images[0], **dirs) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkit: error: "), err
    assert message in lines[0]


def test_control_characters_stay_on_one_row():
    from vlkit.commands.common import printable

    assert printable("a\nb\x18c\u00e9") == "a\\nb\\x18c\u00e9"
