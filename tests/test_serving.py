"""The HTTP server: every endpoint (multipart and JSON) against the Python API, batched results equal to
unbatched ones, every bad input a 4xx JSON with its reason while the server keeps serving, and the batcher."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import pytest
import torch
from surfaces_fixtures import one_intraop_thread, png_bytes, shape_image

import vlkit
from vlkit.serving.app import BackgroundServer
from vlkit.serving.batching import MicroBatcher, Overloaded
from vlkit.serving.schemas import ServerSettings

SETTINGS = ServerSettings(
    max_batch=8, max_wait_ms=20, max_upload_bytes=300_000, max_pixels=64 * 64, max_items=6, max_text_chars=200
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_intraop_thread():
        yield


@pytest.fixture(scope="module")
def pipes(tiny_model_dirs):
    return {kind: vlkit.load(folder) for kind, folder in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def images(shape_images):
    return [p.read_bytes() for p in shape_images]


@pytest.fixture(scope="module")
def server(pipes):
    with BackgroundServer(pipes["blip2"], SETTINGS) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------------------ endpoints


def test_health_models_page_and_openapi(client, pipes):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["tasks"] == list(pipes["blip2"].tasks)
    card = client.get("/v1/models").json()
    assert card["data"][0]["tasks"] == list(pipes["blip2"].tasks) and card["data"][0]["arch"] == "blip2"
    assert card["limits"]["max_batch"] == 8 and card["limits"]["max_pixels"] == 64 * 64
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="caption"' in page.text and "/v1/classify" in page.text
    schema = client.get("/openapi.json").json()
    for endpoint in ("caption", "vqa", "instruct", "classify", "retrieve", "itm", "embed"):
        body = schema["paths"][f"/v1/{endpoint}"]["post"]["requestBody"]["content"]
        assert set(body) == {"application/json", "multipart/form-data"}
    caption_form = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert caption_form["schema"]["properties"]["image"] == {"type": "string", "format": "binary"}
    assert schema["paths"]["/v1/caption"]["post"]["responses"]["200"]


def test_every_endpoint_multipart_and_json_equals_the_api(client, pipes, images):
    pipe = pipes["blip2"]
    image = images[0]
    expected = pipe.caption(image)
    assert client.post("/v1/caption", files={"image": image}).json()["caption"] == expected
    assert client.post("/v1/caption", json={"image": b64(image)}).json()["caption"] == expected
    data_url = "data:image/png;base64," + b64(image)
    got = client.post(
        "/v1/caption", json={"image": data_url, "prompt": "a photo of", "num_beams": 2, "max_new_tokens": 5}
    )
    assert got.json()["caption"] == pipe.caption(image, prompt="a photo of", num_beams=2, max_new_tokens=5)

    got = client.post("/v1/vqa", files={"image": image}, data={"question": "what color?"}).json()
    assert got == {"model": pipe.name, "question": "what color?", "answer": pipe.answer(image, "what color?")}
    assert client.post("/v1/vqa", json={"image": b64(image), "question": "what color?"}).json() == got

    labels = ["red circle", "blue square", "dog"]
    got = client.post("/v1/classify", files={"image": image}, data={"labels": "red circle, blue square,dog"}).json()
    assert got["labels"] == pipe.classify(image, labels)
    repeated = client.post("/v1/classify", files={"image": image}, data={"labels": labels, "top_k": "1"}).json()
    assert repeated["labels"] == pipe.classify(image, labels, top_k=1)
    as_json = client.post("/v1/classify", json={"image": b64(image), "labels": labels, "template": "a {}"}).json()
    assert as_json["labels"] == pipe.classify(image, labels, "a {}")

    texts = ["a red circle", "a blue square"]
    files = [("images", data) for data in images[:3]]
    got = client.post("/v1/retrieve", files=files, data={"texts": "a red circle\na blue square", "k": "2"}).json()
    expected = pipe.retrieve(images[:3], texts, k=2)
    assert got["image_to_text"] == expected["image_to_text"] and got["text_to_image"] == expected["text_to_image"]
    got = client.post("/v1/retrieve", json={"images": [b64(d) for d in images[:3]], "texts": texts, "k": 2}).json()
    assert got["text_to_image"] == expected["text_to_image"]

    got = client.post("/v1/itm", files={"image": image}, data={"texts": texts}).json()
    assert got["scores"] == pytest.approx(pipe.itm(image, texts), rel=1e-5)

    got = client.post("/v1/embed", json={"images": [b64(images[1])], "texts": ["a red circle"]}).json()
    torch.testing.assert_close(torch.tensor(got["image_embeddings"]), pipe.embed_images([images[1]]))
    torch.testing.assert_close(torch.tensor(got["text_embeddings"]), pipe.embed_texts(["a red circle"]))
    got = client.post("/v1/embed", files={"texts": (None, "a\nb")}).json()
    assert len(got["text_embeddings"]) == 2 and got["image_embeddings"] == []


def test_instructblip_and_vlmo_endpoints(pipes, images):
    with BackgroundServer(pipes["instructblip"], SETTINGS) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        got = c.post("/v1/instruct", files={"image": images[0]}, data={"prompt": "describe it.", "max_new_tokens": "6"})
        assert got.json()["response"] == pipes["instructblip"].instruct(images[0], "describe it.", max_new_tokens=6)
        # the default length is the task's (256 for instruct) capped at the server's max_new_tokens
        got = c.post("/v1/instruct", json={"image": b64(images[1]), "prompt": "what?"}).json()["response"]
        assert got == pipes["instructblip"].instruct(images[1], "what?", max_new_tokens=SETTINGS.max_new_tokens)
        got = c.post("/v1/caption", files={"image": images[2]}).json()["caption"]
        assert got == pipes["instructblip"].caption(images[2])
        bad = c.post("/v1/classify", files={"image": images[0]}, data={"labels": "a,b"})
        assert bad.status_code == 400 and "cannot do classify" in bad.json()["error"]
    with BackgroundServer(pipes["vlmo"], SETTINGS) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        got = c.post("/v1/vqa", files={"image": images[3]}, data={"question": "how many shapes are there?"}).json()
        assert got["answer"] == pipes["vlmo"].answer(images[3], "how many shapes are there?")
        bad = c.post("/v1/vqa", json={"image": b64(images[0]), "question": "what?", "num_beams": 3})
        assert bad.status_code == 422 and "classifier" in bad.json()["error"]
        bad = c.post("/v1/caption", files={"image": images[0]})
        assert bad.status_code == 400 and "it can do: answer" in bad.json()["error"]


# ------------------------------------------------------------------------------------------------ batching


async def _gather(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, **kw) for path, kw in requests))


def test_concurrent_requests_are_batched_with_results_equal_to_unbatched(server, pipes, images):
    pipe = pipes["blip2"]
    before = server.app.state.batcher.stats.as_dict()
    questions = ["what color is it?", "how many shapes are in this picture?", "what?", "is the shape round or not?"]
    labels = "red circle,blue square,green triangle"
    requests = []
    for i, image in enumerate(images * 2):
        requests.append(("/v1/caption", {"files": {"image": image}, "data": {"max_new_tokens": "12"}}))
        requests.append(("/v1/vqa", {"files": {"image": image}, "data": {"question": questions[i % 4]}}))
        requests.append(("/v1/classify", {"files": {"image": image}, "data": {"labels": labels}}))
    responses = asyncio.run(_gather(server.url, requests))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    for i, image in enumerate(images * 2):
        caption, answer, classes = (r.json() for r in responses[3 * i : 3 * i + 3])
        assert caption["caption"] == pipe.caption(image, max_new_tokens=12)
        assert answer["answer"] == pipe.answer(image, questions[i % 4])
        alone = pipe.classify(image, labels.split(","))
        assert [e["label"] for e in classes["labels"]] == [e["label"] for e in alone]
        assert [e["score"] for e in classes["labels"]] == pytest.approx([e["score"] for e in alone], abs=1e-6)
    after = server.app.state.batcher.stats.as_dict()
    assert after["items"] - before["items"] == len(requests)
    assert after["batches"] - before["batches"] < len(requests), "no two requests shared a batch"
    assert after["largest_batch"] > 1 and after["largest_batch"] <= SETTINGS.max_batch


# ------------------------------------------------------------------------------------------------ bad input


def _bad_inputs(image: bytes) -> list[tuple[str, str, dict, int, str]]:
    big = png_bytes(shape_image(size=100))  # 10,000 pixels > 64 * 64
    as_json = {"content-type": "application/json"}
    multipart = {"content-type": "multipart/form-data; boundary=xx"}

    def up(**fields: str) -> dict:  # a multipart upload of the good image with form fields
        return {"files": {"image": image}, "data": fields}

    def js(**fields) -> dict:
        return {"json": {"image": b64(image), **fields}}

    return [
        ("malformed JSON", "/v1/caption", {"content": b'{"image": ', "headers": as_json}, 400, "malformed JSON"),
        ("JSON not an object", "/v1/caption", {"json": [1, 2]}, 400, "must be an object"),
        ("not an image", "/v1/caption", {"files": {"image": b"GIF89a but not really"}}, 400, "image: "),
        ("empty upload", "/v1/caption", {"files": {"image": b""}}, 400, "not a recognised image"),
        ("truncated image", "/v1/caption", {"files": {"image": image[: len(image) // 2]}}, 400, "truncated"),
        ("too many pixels", "/v1/caption", {"files": {"image": big}}, 400, "above the limit of 4,096"),
        ("bad base64", "/v1/caption", {"json": {"image": "!!!not base64!!!"}}, 400, "not valid base64"),
        ("no image", "/v1/caption", {"json": {}}, 400, "no image"),
        ("two images", "/v1/caption", {"files": [("image", image), ("image", image)]}, 422, "expected one image"),
        ("body too large", "/v1/caption", {"files": {"image": b"x" * 400_000}}, 413, "larger than this server's"),
        ("chunked too large", "/v1/caption", {"content": (b"x" * 50_000 for _ in range(10)), "headers": as_json},
         413, "larger than"),
        ("content type", "/v1/caption", {"content": b"hi", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported content type"),
        ("no content type", "/v1/caption", {"content": b"hello"}, 415, "unsupported content type"),
        ("cut multipart", "/v1/caption", {"content": b"--xx\r\nbroken", "headers": multipart}, 400, "no image"),
        ("no boundary", "/v1/caption", {"content": b"--xx", "headers": {"content-type": "multipart/form-data"}}, 400,
         "malformed multipart"),
        ("unknown field", "/v1/caption", js(temperature=2), 422, "temperature: Extra inputs"),
        ("wrong type", "/v1/caption", up(num_beams="many"), 422, "num_beams"),
        ("too many tokens", "/v1/caption", up(max_new_tokens="500"), 422, "max_new_tokens 500 is above"),
        ("too many beams", "/v1/caption", up(num_beams="20"), 422, "num_beams 20 is above"),
        ("zero beams", "/v1/caption", up(num_beams="0"), 422, "num_beams"),
        ("file in a text field", "/v1/caption", {"files": {"image": image, "prompt": image}}, 422,
         "unexpected file field 'prompt'"),
        ("long prompt", "/v1/caption", up(prompt="x" * 300), 422, "above the limit of 200"),
        ("no question", "/v1/vqa", up(), 422, "question: Field required"),
        ("empty question", "/v1/vqa", up(question=""), 422, "question"),
        ("no labels", "/v1/classify", up(), 422, "labels: Field required"),
        ("template", "/v1/classify", up(labels="a,b", template="x"), 422, "template needs"),
        ("duplicate labels", "/v1/classify", js(labels=["a", "a"]), 422, "distinct"),
        ("too many labels", "/v1/classify", js(labels=list("abcdefgh")), 422, "8 items is above"),
        ("too many files", "/v1/retrieve", {"files": [("images", image)] * 7, "data": {"texts": "a"}}, 400,
         "malformed multipart"),
        ("too many images", "/v1/retrieve", {"json": {"images": [b64(image)] * 7, "texts": ["a"]}}, 422,
         "7 images is above"),
        ("no gallery", "/v1/retrieve", {"json": {"texts": ["a"]}}, 400, "no images"),
        ("k zero", "/v1/retrieve", {"json": {"images": [b64(image)], "texts": ["a"], "k": 0}}, 422, "k: Input"),
        ("nothing to embed", "/v1/embed", {"json": {}}, 400, "nothing to embed"),
        ("task the model lacks", "/v1/instruct", up(prompt="hi"), 400, "cannot do instruct"),
    ]  # fmt: skip


def test_every_bad_input_is_a_4xx_json_and_the_server_keeps_serving(client, images, pipes):
    good = pipes["blip2"].classify(images[1], ["red circle", "blue square"])
    cases = _bad_inputs(images[0])
    for name, path, kwargs, status, message in cases:
        response = client.post(path, **kwargs)
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert set(body) == {"error", "type", "status"} and body["status"] == status, name
        assert message in body["error"], (name, body)
        after = client.post("/v1/classify", files={"image": images[1]}, data={"labels": "red circle,blue square"})
        assert after.status_code == 200 and after.json()["labels"] == good, name
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/caption", 405), ("DELETE", "/healthz", 405)):
        response = client.request(method, path)
        assert response.status_code == status and response.json()["status"] == status
    assert client.get("/healthz").json()["status"] == "ok"


def test_request_timeout_is_a_504_and_the_server_recovers(tiny_model_dirs, images):
    pipe = vlkit.load(tiny_model_dirs["stage1"])
    slow_caption = pipe.caption

    def caption(*args, **kwargs):
        time.sleep(0.5)
        return slow_caption(*args, **kwargs)

    pipe.caption = caption
    settings = ServerSettings(timeout_s=0.2, max_wait_ms=0)
    with BackgroundServer(pipe, settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        response = c.post("/v1/caption", files={"image": images[0]})
        assert response.status_code == 504 and "longer than 0.2 s" in response.json()["error"]
        time.sleep(0.5)  # a batch that already runs cannot be interrupted: let the worker finish it
        ok = c.post("/v1/classify", files={"image": images[0]}, data={"labels": "a,b"})
        assert ok.status_code == 200


def test_internal_errors_are_500_json_and_the_server_keeps_serving(tiny_model_dirs, images):
    pipe = vlkit.load(tiny_model_dirs["stage1"])

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    pipe.embed_texts = broken
    with BackgroundServer(pipe, ServerSettings()) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        response = c.post("/v1/embed", json={"texts": ["a"]})
        assert response.status_code == 500 and response.json() == {
            "error": "internal error (RuntimeError: boom)",
            "type": "InternalError",
            "status": 500,
        }
        assert c.post("/v1/caption", files={"image": images[0]}).status_code == 200


# ------------------------------------------------------------------------------------------------ batcher


def _batcher_run(calls: list):
    def run(key, payloads):
        calls.append((key, list(payloads)))
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [f"{key}:{p}" for p in payloads]

    return run


def test_batcher_groups_by_key_up_to_max_batch():
    calls: list = []

    async def main():
        batcher = MicroBatcher(_batcher_run(calls), max_batch=4, max_wait_ms=50)
        await batcher.start()
        jobs = [batcher.submit("a" if i % 3 else "b", i) for i in range(11)]
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return results, batcher.stats

    results, stats = asyncio.run(main())
    assert results == [f"{'a' if i % 3 else 'b'}:{i}" for i in range(11)]
    assert all(len(payloads) <= 4 for _, payloads in calls)
    assert all(all((p % 3 != 0) == (key == "a") for p in payloads) for key, payloads in calls)
    assert sorted(p for _, payloads in calls for p in payloads) == list(range(11))
    assert stats.items == 11 and stats.largest == 4 and stats.batches == len(calls) == 3  # a: 7 = 4 + 3, b: 4


def test_batcher_waits_at_most_max_wait_and_isolates_failures():
    calls: list = []

    async def main():
        batcher = MicroBatcher(_batcher_run(calls), max_batch=8, max_wait_ms=30)
        await batcher.start()
        start = time.monotonic()
        alone = await batcher.submit("k", "x")
        waited = time.monotonic() - start
        jobs = [batcher.submit("k", p) for p in ("1", "bad", "2")]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return alone, waited, results, batcher.stats

    alone, waited, results, stats = asyncio.run(main())
    assert alone == "k:x" and 0.025 <= waited < 1.0
    assert results[0] == "k:1" and results[2] == "k:2" and isinstance(results[1], ValueError)
    assert calls[1] == ("k", ["1", "bad", "2"]) and stats.retried == 1  # then one by one


def test_batcher_refuses_beyond_its_queue_and_drops_abandoned_items():
    calls: list = []

    async def main():
        batcher = MicroBatcher(_batcher_run(calls), max_batch=2, max_wait_ms=100, max_queue=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", 1))
        second = asyncio.ensure_future(batcher.submit("k", 2))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit("k", 3)
        second.cancel()  # its client gave up before the batch ran
        result = await first
        await batcher.stop()
        return result, batcher.stats

    result, stats = asyncio.run(main())
    assert result == "k:1" and calls == [("k", [1])] and stats.dropped == 1
    with pytest.raises(Exception, match="must be >= 1"):
        MicroBatcher(lambda k, p: p, max_batch=0)


def test_vlkit_serve_command_serves_until_interrupted(tiny_model_dirs, pipes, images, subprocess_env):
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "vlkit", "serve", str(tiny_model_dirs["stage1"]), "--port", str(port)]
    argv += ["--max-batch", "4", "--log-level", "warning", "--device", "cpu"]
    proc = subprocess.Popen(argv, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(url + "/healthz", timeout=5).json()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"vlkit serve did not come up: {proc.communicate()[1][-2000:]}")
                time.sleep(0.2)
        assert health["tasks"] == list(pipes["stage1"].tasks)
        assert httpx.get(url + "/v1/models").json()["limits"]["max_batch"] == 4
        got = httpx.post(url + "/v1/caption", files={"image": images[2]}, timeout=60).json()
        assert got["caption"] == pipes["stage1"].caption(images[2])
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"serving {tiny_model_dirs['stage1']} (caption, classify, retrieve, itm, embed) on {url}/" in out
