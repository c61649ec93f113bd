"""vlkit.load / Pipeline / vlkit.models: tasks per model kind, every input kind, results equal to the building
blocks they wrap, batches equal one-by-one calls, and clear errors."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from surfaces_fixtures import one_intraop_thread, png_bytes, shape_image

import vlkit
from vlkit import api
from vlkit.errors import DataError, ImageError
from vlkit.evaluation.features import itc_scores, itm_scores
from vlkit.evaluation.retrieval import compute_sim_matrix
from vlkit.evaluation.zeroshot import classify as zs_classify
from vlkit.generation import GenerationError
from vlkit.models.qformer_decoding import caption_qformer
from vlkit.processors import blip_caption
from vlkit.prompting import answer as llm_answer
from vlkit.prompting import caption as llm_caption
from vlkit.prompting import generate_text


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_intraop_thread():
        yield


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dirs):
    return tiny_model_dirs


@pytest.fixture(scope="module")
def image_files(shape_images):
    return shape_images


@pytest.fixture(scope="module")
def pipes(model_dirs):
    return {kind: vlkit.load(folder) for kind, folder in model_dirs.items()}


def test_tasks_follow_the_model(pipes):
    assert pipes["blip2"].tasks == ("caption", "answer", "classify", "retrieve", "itm", "embed")
    assert pipes["stage1"].tasks == ("caption", "classify", "retrieve", "itm", "embed")
    assert pipes["instructblip"].tasks == ("caption", "answer", "instruct")
    assert pipes["vlmo"].tasks == ("answer",)
    assert pipes["instructblip"].arch == "instructblip" and pipes["vlmo"].arch == "vlmo"


@pytest.mark.parametrize(
    "kind, call, missing",
    [
        ("vlmo", lambda p, img: p.caption(img), "caption"),
        ("stage1", lambda p, img: p.answer(img, "what?"), "answer"),
        ("blip2", lambda p, img: p.instruct(img, "describe"), "instruct"),
        ("instructblip", lambda p, img: p.classify(img, ["a", "b"]), "classify"),
        ("vlmo", lambda p, img: p.embed_texts("a"), "embed"),
    ],
)
def test_unsupported_task_lists_what_the_model_can_do(pipes, image_files, kind, call, missing):
    with pytest.raises(api.UnsupportedTaskError) as err:
        call(pipes[kind], image_files[0])
    message = str(err.value)
    assert f"cannot do {missing}" in message
    assert "it can do: " + ", ".join(pipes[kind].tasks) in message


def test_missing_tokenizer_says_why(model_dirs, tmp_path):
    folder = tmp_path / "no-tok"
    shutil.copytree(model_dirs["stage1"], folder)
    shutil.rmtree(folder / "qformer_tokenizer")
    pipe = vlkit.load(folder)  # its 128-id Q-Former cannot take bert-base-uncased either
    assert pipe.tasks == ()
    with pytest.raises(api.UnsupportedTaskError, match="no Q-Former tokenizer"):
        pipe.classify(shape_image(), ["a"])
    folder = tmp_path / "no-llm-tok"
    shutil.copytree(model_dirs["blip2"], folder)
    shutil.rmtree(folder / "llm_tokenizer")
    pipe = vlkit.load(folder)
    assert pipe.tasks == ("caption", "classify", "retrieve", "itm", "embed")  # the Q-Former still captions
    with pytest.raises(api.UnsupportedTaskError, match="no LLM tokenizer"):
        pipe.answer(shape_image(), "what?")


def test_every_image_kind_gives_the_same_result(pipes, image_files):
    pipe = pipes["stage1"]
    path = image_files[1]
    expected = pipe.caption(path)
    pil = Image.open(path)
    kinds = [path, str(path), path.resolve().as_uri(), path.read_bytes(), io.BytesIO(path.read_bytes()), pil]
    for image in kinds:
        assert pipe.caption(image) == expected
    assert pipe.caption([path, path.read_bytes()]) == [expected, expected]


def test_bad_images_raise_image_errors(pipes, image_files, model_dirs):
    pipe = pipes["stage1"]
    data = image_files[0].read_bytes()
    with pytest.raises(ImageError, match="truncated"):
        pipe.caption(data[: len(data) // 2])
    with pytest.raises(ImageError, match="not a recognised image"):
        pipe.caption(b"hello")
    with pytest.raises(ImageError, match="remote URLs"):
        pipe.caption("https://example.com/cat.png")
    with pytest.raises(ImageError, match="no such image"):
        pipe.caption("/no/such/file.png")
    small = vlkit.load(model_dirs["stage1"], max_pixels=100)
    with pytest.raises(ImageError, match="above the limit"):
        small.caption(shape_image(size=11))
    with pytest.raises(DataError, match="no images"):
        pipe.caption([])


def test_llm_caption_and_answer_equal_the_prompting_helpers(pipes, image_files):
    pipe = pipes["blip2"]
    pixels = pipe.pixels(image_files)
    assert pipe.caption(image_files) == llm_caption(pipe.model, pipe.processor, pixels)
    assert pipe.caption(image_files, prompt="a photo of", num_beams=2, max_new_tokens=6) == llm_caption(
        pipe.model, pipe.processor, pixels, prompt="a photo of", num_beams=2, max_new_tokens=6
    )
    questions = ["what color is it?", "how many shapes?", "what?", "is it round?"]
    assert pipe.answer(image_files, questions) == llm_answer(pipe.model, pipe.processor, pixels, questions)


def test_batches_equal_one_by_one_calls(pipes, image_files):
    for kind in ("blip2", "instructblip", "stage1"):
        pipe = pipes[kind]
        batched = pipe.caption(image_files, max_new_tokens=8)
        assert batched == [pipe.caption(image, max_new_tokens=8) for image in image_files]
        assert len(set(batched)) > 1, "the fixture should caption different images differently"
    questions = ["what color is the shape?", "how many?", "what shape is in the picture here?", "is it red?"]
    for kind in ("blip2", "instructblip", "vlmo"):
        pipe = pipes[kind]
        batched = pipe.answer(image_files, questions)
        assert batched == [pipe.answer(i, q) for i, q in zip(image_files, questions)]
    pipe = pipes["instructblip"]
    prompts = ["describe it.", "what is unusual about this image? answer briefly.", "list the colors.", "hi"]
    batched = pipe.instruct(image_files, prompts, max_new_tokens=8)
    assert batched == [pipe.instruct(i, p, max_new_tokens=8) for i, p in zip(image_files, prompts)]
    pipe = pipes["stage1"]
    labels = ["red circle", "blue square", "green triangle"]
    batched = pipe.classify(image_files, labels)
    for row, image in zip(batched, image_files):
        alone = pipe.classify(image, labels)
        assert [e["label"] for e in row] == [e["label"] for e in alone]
        torch.testing.assert_close([e["score"] for e in row], [e["score"] for e in alone], rtol=1e-5, atol=1e-6)


def test_single_inputs_give_single_results_and_pairs_broadcast(pipes, image_files):
    pipe = pipes["blip2"]
    one = pipe.answer(image_files[0], "what color?")
    assert isinstance(one, str)
    many = pipe.answer(image_files[0], ["what color?", "what shape?"])
    assert many == [one, pipe.answer(image_files[0], "what shape?")]
    assert pipe.answer(image_files[:2], "what color?") == [one, pipe.answer(image_files[1], "what color?")]
    with pytest.raises(DataError, match="3 images but 2 questions"):
        pipe.answer(image_files[:3], ["a?", "b?"])
    assert isinstance(pipe.caption(image_files[0]), str)
    assert isinstance(pipe.classify(image_files[0], ["a", "b"])[0], dict)
    assert isinstance(pipe.itm(image_files[0], "a red circle"), float)


def test_generation_settings(pipes, image_files):
    pipe = pipes["blip2"]
    groups = pipe.caption(image_files[:2], num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    assert groups[0][0] == pipe.caption(image_files[0], num_beams=3, max_new_tokens=5)
    with pytest.raises(DataError, match="unknown generation setting"):
        pipe.caption(image_files[0], beams=3)
    limit = pipe.model.config.lm.hf_config["max_position_embeddings"]
    with pytest.raises(DataError, match=f"exceeds the LLM's {limit} positions"):
        pipe.caption(image_files[0], max_new_tokens=limit)
    long = " ".join(["describe the picture"] * 100)  # InstructBLIP does not cut the LLM prompt
    with pytest.raises(DataError, match="tokens \\+ 4 query tokens \\+ 5 new tokens exceeds"):
        pipes["instructblip"].instruct(image_files[0], long, max_new_tokens=5)
    with pytest.raises(GenerationError):
        pipe.caption(image_files[0], num_beams=0)
    assert pipe.generation_defaults("caption").num_beams == 5
    assert pipe.generation_defaults("answer").max_new_tokens == 10


def test_qformer_caption_equals_caption_qformer(pipes, image_files):
    for kind in ("stage1", "blip2"):
        pipe = pipes[kind]
        pixels = pipe.pixels(image_files)
        expected = caption_qformer(pipe.model, pipe.qformer_tokenizer, pixels)
        decoder = "auto" if kind == "stage1" else "qformer"
        assert pipe.caption(image_files, decoder=decoder) == expected
    with pytest.raises(api.UnsupportedTaskError, match="no qformer caption decoder"):
        pipes["instructblip"].caption(image_files[0], decoder="qformer")
    with pytest.raises(DataError, match="takes no prompt"):
        pipes["stage1"].caption(image_files[0], prompt="a photo of")


def test_instruct_equals_generate_text(pipes, image_files):
    pipe = pipes["instructblip"]
    pixels = pipe.pixels(image_files[:2])
    prompts = ["describe the image.", "what is it?"]
    config = pipe.processor.generation_config("instruct", max_new_tokens=7)
    expected = generate_text(pipe.model, pipe.processor, pixels, prompts, config)
    assert pipe.instruct(image_files[:2], prompts, max_new_tokens=7) == expected
    assert pipe.caption(image_files[0]) == llm_caption(pipe.model, pipe.processor, pixels[:1])[0]


def test_vlmo_answers_with_its_classifier(pipes, image_files):
    pipe = pipes["vlmo"]
    questions = ["what color is the shape?", "how many shapes are there?"]
    ids, mask = pipe.text_tokenizer(questions)
    assert ids.shape == (2, pipe.model.config.max_text_len)
    with torch.no_grad():
        logits = pipe.model.vqa_logits(ids, mask, pipe.pixels(image_files[:2]))
    expected = [pipe.vqa_vocab.answers[i] for i in logits.argmax(-1).tolist()]
    assert pipe.answer(image_files[:2], questions) == expected
    with pytest.raises(DataError, match="generation settings do not apply"):
        pipe.answer(image_files[0], "what?", num_beams=2)


def test_classify_itm_retrieve_embed_equal_the_evaluation_functions(pipes, image_files):
    pipe = pipes["stage1"]
    pixels = pipe.pixels(image_files)
    labels = ["red circle", "blue square", "green triangle", "yellow circle"]
    assert pipe.classify(image_files, labels) == zs_classify(pipe.model, pipe.qformer_tokenizer, pixels, labels)
    assert pipe.classify(image_files, "red circle, blue square", top_k=1) == zs_classify(
        pipe.model, pipe.qformer_tokenizer, pixels, ["red circle", "blue square"], top_k=1
    )
    texts = ["a red circle", "a blue square", "a green triangle"]
    scores = pipe.itm(image_files[:3], texts)
    torch.testing.assert_close(torch.tensor(scores), itm_scores(pipe.model, pipe.qformer_tokenizer, pixels[:3], texts))

    result = pipe.retrieve(image_files, texts, k=2)
    sims = compute_sim_matrix(
        pipe.model, pipe.qformer_tokenizer, pixels, texts, k_test=2, text_processor=blip_caption, progress=False
    )
    for i, row in enumerate(result["image_to_text"]):
        assert [m["index"] for m in row] == sims.i2t[i].topk(2).indices.tolist()
        assert [m["text"] for m in row] == [texts[m["index"]] for m in row]
    for t, row in enumerate(result["text_to_image"]):
        assert [m["index"] for m in row] == sims.t2i[t].topk(2).indices.tolist()
        assert row[0]["score"] == pytest.approx(sims.t2i[t].max().item())

    image_embeds, text_embeds = pipe.embed_images(image_files), pipe.embed_texts(texts)
    assert image_embeds.shape == (4, pipe.model.config.num_query_tokens, pipe.model.config.embed_dim)
    torch.testing.assert_close(image_embeds.norm(dim=-1), torch.ones(4, image_embeds.shape[1]))
    cos = torch.einsum("qe,e->q", image_embeds[0], text_embeds[1]).max()
    torch.testing.assert_close(cos, itc_scores(pipe.model, pipe.qformer_tokenizer, pixels[:1], [texts[1]])[0])
    assert pipe.embed_texts("a red circle").shape == (pipe.model.config.embed_dim,)
    with pytest.raises(DataError, match="k must be >= 1"):
        pipe.retrieve(image_files, texts, k=0)


def test_bfloat16_pipeline_runs(model_dirs, image_files):
    pipe = vlkit.load(model_dirs["stage1"], dtype="bfloat16")
    assert pipe.dtype == torch.bfloat16
    result = pipe.classify(image_files[:2], ["red circle", "blue square"])
    assert len(result) == 2 and abs(sum(e["score"] for e in result[0]) - 1) < 1e-3
    with pytest.raises(vlkit.api.ConfigError, match="unknown dtype"):
        vlkit.load(model_dirs["stage1"], dtype="float8")


# ----------------------------------------------------------------------------------------------- names


def test_bundled_names_load_from_the_package_assets(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(api, "ASSETS_DIR", tmp_path)
    with pytest.raises(api.ModelNotFoundError, match="bundled model but this installation has no"):
        vlkit.load("shapes-blip2")
    shutil.copytree(model_dirs["blip2"], tmp_path / "shapes-blip2")
    pipe = vlkit.load("shapes-blip2")
    assert pipe.name == "shapes-blip2" and pipe.supports("classify")
    listed = {m.name: m for m in vlkit.models()}
    assert listed["shapes-blip2"].available and listed["shapes-blip2"].needs == "bundled"
    assert listed["shapes-blip2"].tasks == pipe.tasks
    assert not listed["shapes-vlmo"].available


def test_real_size_presets_say_how_to_convert(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "ASSETS_DIR", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(api.ModelNotFoundError) as err:
        vlkit.load("blip2-opt2.7b-pretrain")
    message = str(err.value)
    assert "vlkit convert blip2_pretrained_opt2.7b.pth OUT --vision eva_vit_g.pth" in message
    assert "--llm path/to/facebook/opt-2.7b --preset blip2-opt2.7b-pretrain" in message
    assert "Salesforce/blip2-opt-2.7b" in message
    with pytest.raises(api.ModelNotFoundError, match="without published weights"):
        vlkit.load("tiny-blip2-eva")
    with pytest.raises(api.ModelNotFoundError, match="no such file or folder, and not a model name.*shapes-blip2"):
        vlkit.load("no-such-model")


def test_models_lists_bundled_and_zoo_names_with_their_tasks():
    from vlkit import zoo

    listed = {m.name: m for m in vlkit.models()}
    assert set(api.BUNDLED) | set(zoo.MODELS) == set(listed)
    assert list(listed)[: len(api.BUNDLED)] == list(api.BUNDLED)
    assert listed["blip2-vitg-pretrain"].tasks == ("caption", "classify", "retrieve", "itm", "embed")
    assert listed["blip2-opt2.7b-pretrain"].tasks == ("caption", "answer")
    assert listed["instructblip-vicuna7b"].tasks == ("caption", "answer", "instruct")
    assert "eva_vit_g.pth" in listed["blip2-vitg-pretrain"].needs
    assert listed["shapes-vlmo"].tasks == ("answer",)


def test_import_vlkit_is_light(subprocess_env):
    code = (
        "import sys, vlkit; heavy = [m for m in ('torch', 'transformers', 'fastapi') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(vlkit.load) and callable(vlkit.models); "
        "assert 'torch' in sys.modules; import vlkit.models.blip2; "
        "assert vlkit.models()[0].name == 'shapes-blip2'; print(vlkit.Pipeline.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Pipeline"


def test_pipeline_wraps_a_model_in_memory(model_dirs):
    loaded = vlkit.load(model_dirs["stage1"])
    pipe = vlkit.Pipeline(loaded.model, qformer_tokenizer=loaded.qformer_tokenizer, name="mine")
    assert pipe.tasks == loaded.tasks and "mine" in repr(pipe)
    with pytest.raises(vlkit.api.ConfigError, match="needs a Blip2"):
        vlkit.Pipeline(torch.nn.Linear(2, 2))
    assert png_bytes(shape_image())[:4] == b"\x89PNG"
