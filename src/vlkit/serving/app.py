"""The HTTP server: one endpoint per task, dynamic batching, limits, JSON errors and the web page.

Endpoints (``/docs`` and ``/openapi.json`` describe them)::

    GET  /                 the web page (upload or drop an image: caption, questions, classification)
    GET  /healthz          liveness, the model's tasks and batching counters
    GET  /v1/models        the served model and the server's limits
    POST /v1/caption       image [, prompt, num_beams, max_new_tokens]        -> caption
    POST /v1/vqa           image, question [, num_beams, max_new_tokens]      -> answer
    POST /v1/instruct      image, prompt [, num_beams, max_new_tokens]        -> response
    POST /v1/classify      image, labels [, template, top_k]                  -> labels with scores
    POST /v1/retrieve      images, texts [, k]                                -> rankings both ways
    POST /v1/itm           image, texts                                       -> match probabilities
    POST /v1/embed         images and/or texts                                -> embeddings

Every POST takes ``multipart/form-data`` (files ``image`` / ``images``, other fields as form fields; list
fields repeated, or ``labels`` comma-separated and ``texts`` one per line) or ``application/json`` (images
base64). Every bad input is a 4xx with a JSON body ``{"error", "type", "status"}``: 400 bad input (malformed
JSON or multipart, a non-image, truncated or oversized image, a task the model lacks), 413 body too large,
415 other content types, 422 fields that do not validate or exceed a limit, 503 queue full, 504 timeout.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Hashable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlkit.api import Pipeline, UnsupportedTaskError
from vlkit.data.images import load_image
from vlkit.errors import VlkitError
from vlkit.serving import schemas
from vlkit.serving.batching import MicroBatcher, Overloaded
from vlkit.serving.schemas import ServerSettings

log = logging.getLogger("vlkit.serving")

# Which pipeline task each endpoint needs.
ENDPOINT_TASKS = {
    "caption": "caption",
    "vqa": "answer",
    "instruct": "instruct",
    "classify": "classify",
    "retrieve": "retrieve",
    "itm": "itm",
    "embed": "embed",
}


class ApiError(VlkitError):
    """An input problem with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or type(self).__name__


class PayloadTooLarge(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than this server's limit of {limit:,} bytes", "PayloadTooLarge")


class BodyLimit:
    """ASGI middleware refusing bodies above ``max_bytes``: from Content-Length before anything is read, and
    while streaming for chunked uploads (the endpoint's read then raises :class:`PayloadTooLarge`)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error_response(PayloadTooLarge(self.max_bytes))
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class CatchAll:
    """ASGI middleware turning an unexpected exception into a 500 JSON response. Unlike an exception handler
    for ``Exception`` (which Starlette runs and then re-raises, so uvicorn drops the connection), the error
    stops here: the client gets its answer and its keep-alive connection stays usable."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:
            log.exception("internal error on %s", scope.get("path"))
            if started:  # too late for a JSON answer: let the server close the connection
                raise
            message = f"internal error ({type(err).__name__}: {err})"
            await _error_response(ApiError(500, message, "InternalError"))(scope, receive, send)


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse({"error": str(err), "type": err.kind, "status": err.status}, status_code=err.status)


# ----------------------------------------------------------------------------------------------------------
# Running batches


def run_batch(pipe: Pipeline, key: Hashable, payloads: list[Any]) -> list[Any]:
    """Run one batch of items of the same key through the pipeline (on the batcher's worker thread)."""
    task, options = key[0], dict(key[1])
    if task == "caption":
        return pipe.caption(payloads, **options)
    if task == "answer":
        return pipe.answer([p[0] for p in payloads], [p[1] for p in payloads], **options)
    if task == "instruct":
        return pipe.instruct([p[0] for p in payloads], [p[1] for p in payloads], **options)
    if task == "classify":
        labels = list(options.pop("labels"))
        return pipe.classify(payloads, labels, **options)
    if task == "itm":
        return pipe.itm([p[0] for p in payloads], [p[1] for p in payloads])
    if task == "embed_images":
        return [row.tolist() for row in pipe.embed_images(payloads)]
    if task == "embed_texts":
        return [row.tolist() for row in pipe.embed_texts(payloads)]
    if task == "retrieve":  # every request has its own gallery: one call each
        return [pipe.retrieve(images, texts, k=k) for images, texts, k in payloads]
    raise VlkitError(f"unknown batch task {task!r}")


def _key(task: str, **options: Any) -> Hashable:
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items() if v is not None))
    return (task, frozen)


# ----------------------------------------------------------------------------------------------------------
# Request parsing

_LIST_FIELDS = {"labels", "texts", "images"}


async def _read(request: Request, model: type[BaseModel], settings: ServerSettings) -> tuple[Any, list[bytes]]:
    """Parse a JSON or multipart body into ``model`` and the encoded images it carries."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"malformed JSON body: {err}", "MalformedJSON") from err
        if not isinstance(data, dict):
            raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}", "MalformedJSON")
        parsed = _validate(model, data)
        images = [_b64(value, name) for name, value in _image_fields(parsed)]
        return parsed, images
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_items, max_fields=4 * settings.max_items + 16)
        except PayloadTooLarge:
            raise
        except Exception as err:  # python-multipart / starlette parse errors
            raise ApiError(400, f"malformed multipart body: {err}", "MalformedMultipart") from err
        try:
            data, images = await _form_fields(form)
        finally:
            await form.close()  # uploads are spooled to temporary files
        parsed = _validate(model, data)
        images += [_b64(value, name) for name, value in _image_fields(parsed)]
        return parsed, images
    raise ApiError(
        415,
        f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data or application/json",
        "UnsupportedMediaType",
    )


async def _form_fields(form: Any) -> tuple[dict[str, Any], list[bytes]]:
    """Form fields (list fields as lists) and the bytes of the uploaded images, in upload order."""
    data: dict[str, Any] = {}
    images: list[bytes] = []
    for name in dict.fromkeys(form.keys()):
        values = form.getlist(name)
        files = [v for v in values if hasattr(v, "read")]
        if files:
            if name not in ("image", "images"):
                raise ApiError(
                    422, f"unexpected file field {name!r}; images go in 'image' or 'images'", "ValidationError"
                )
            images += [await f.read() for f in files]
        elif name in _LIST_FIELDS:
            data[name] = _split_list(name, [str(v) for v in values])
        elif len(values) > 1:
            raise ApiError(422, f"field {name!r} given {len(values)} times", "ValidationError")
        else:
            data[name] = values[0]
    return data, images


def _split_list(name: str, values: list[str]) -> list[str]:
    if len(values) != 1:
        return values
    if name == "labels":
        return [v.strip() for v in values[0].split(",") if v.strip()]
    if name == "texts":
        return [v.strip() for v in values[0].splitlines() if v.strip()]
    return values


def _validate(model: type[BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())
        raise ApiError(422, problems, "ValidationError") from err


def _image_fields(parsed: Any) -> list[tuple[str, str]]:
    out = []
    for name in ("image", "images"):
        value = getattr(parsed, name, None)
        if isinstance(value, str):
            out.append((name, value))
        elif isinstance(value, list):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return out


def _b64(value: str, name: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, f"{name}: not valid base64 ({err})", "MalformedImage") from err


async def _decode(images: list[bytes], settings: ServerSettings, *, exactly_one: bool) -> list[Any]:
    if exactly_one and len(images) != 1:
        raise ApiError(
            400 if not images else 422,
            "no image: upload a file field 'image' or send a base64 'image' JSON field"
            if not images
            else f"expected one image, got {len(images)}",
            "MissingInput" if not images else "ValidationError",
        )
    if not images:
        raise ApiError(400, "no images: upload file fields 'images' or send base64 'images' in JSON", "MissingInput")
    if len(images) > settings.max_items:
        raise ApiError(
            422, f"{len(images)} images is above this server's limit of {settings.max_items}", "LimitExceeded"
        )
    names = ["image"] if exactly_one else [f"images[{i}]" for i in range(len(images))]

    def decode_all() -> list[Any]:
        return [load_image(data, max_pixels=settings.max_pixels, name=n) for data, n in zip(images, names)]

    return await run_in_threadpool(decode_all)


def _check_texts(settings: ServerSettings, **fields: Any) -> None:
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(values) > settings.max_items:
            raise ApiError(
                422,
                f"{name}: {len(values)} items is above this server's limit of {settings.max_items}",
                "LimitExceeded",
            )
        for v in values:
            if v is not None and len(v) > settings.max_text_chars:
                raise ApiError(
                    422, f"{name}: {len(v)} characters is above the limit of {settings.max_text_chars}", "LimitExceeded"
                )


def _generation(pipe: Pipeline, task: str, req: Any, settings: ServerSettings) -> dict[str, Any]:
    if req.max_new_tokens is not None and req.max_new_tokens > settings.max_new_tokens:
        raise ApiError(
            422,
            f"max_new_tokens {req.max_new_tokens} is above this server's limit of {settings.max_new_tokens}",
            "LimitExceeded",
        )
    if req.num_beams is not None and req.num_beams > settings.max_beams:
        raise ApiError(
            422, f"num_beams {req.num_beams} is above this server's limit of {settings.max_beams}", "LimitExceeded"
        )
    if pipe.arch == "vlmo":  # a classifier: nothing to decode
        if req.max_new_tokens is not None or req.num_beams is not None:
            raise ApiError(
                422,
                "this model answers with a classifier: num_beams and max_new_tokens do not apply",
                "ValidationError",
            )
        return {}
    max_new = req.max_new_tokens
    if max_new is None:
        max_new = min(pipe.generation_defaults(task).max_new_tokens, settings.max_new_tokens)
    return {"num_beams": req.num_beams, "max_new_tokens": max_new}


# ----------------------------------------------------------------------------------------------------------
# The app


def create_app(pipe: Pipeline, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving ``pipe``.

    Args:
        pipe: the loaded pipeline (``vlkit.load(...)``).
        settings: limits and batching (defaults: :class:`~vlkit.serving.schemas.ServerSettings`).
    """
    settings = settings or ServerSettings()
    batcher = MicroBatcher(
        lambda key, payloads: run_batch(pipe, key, payloads),
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="vlkit",
        version=_version(),
        description=f"vlkit serving {pipe.name}: tasks {', '.join(pipe.tasks)}",
        lifespan=lifespan,
    )
    app.state.pipeline = pipe
    app.state.settings = settings
    app.state.batcher = batcher
    app.add_middleware(CatchAll)  # added first: innermost, around the routes and their exception handlers
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    _install_error_handlers(app)

    async def run(items: list[tuple[Hashable, Any]]) -> list[Any]:
        jobs = [batcher.submit(key, payload) for key, payload in items]
        try:
            return await asyncio.wait_for(asyncio.gather(*jobs), settings.timeout_s)
        except asyncio.TimeoutError as err:
            raise ApiError(504, f"the request took longer than {settings.timeout_s:g} s", "Timeout") from err

    def require(endpoint: str) -> None:
        try:
            pipe.require(ENDPOINT_TASKS[endpoint])
        except UnsupportedTaskError as err:
            raise ApiError(400, str(err), "UnsupportedTask") from err

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        page = resources.files("vlkit.serving").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": pipe.name, "tasks": list(pipe.tasks), "batching": batcher.stats.as_dict()}

    @app.get("/v1/models", response_model=schemas.ModelsResponse)
    async def list_models() -> dict[str, Any]:
        card = {
            "id": pipe.name,
            "arch": pipe.arch,
            "tasks": list(pipe.tasks),
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""),
        }
        limits = {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_new_tokens": settings.max_new_tokens,
            "max_beams": settings.max_beams,
            "max_items": settings.max_items,
            "max_text_chars": settings.max_text_chars,
            "timeout_s": settings.timeout_s,
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
        }
        return {"data": [card], "limits": limits}

    @app.post("/v1/caption", response_model=schemas.CaptionResponse, openapi_extra=_body(schemas.CaptionRequest))
    async def caption(request: Request) -> dict[str, Any]:
        require("caption")
        req, raw = await _read(request, schemas.CaptionRequest, settings)
        _check_texts(settings, prompt=req.prompt)
        gen = _generation(pipe, "caption", req, settings)
        (image,) = await _decode(raw, settings, exactly_one=True)
        (text,) = await run([(_key("caption", prompt=req.prompt, **gen), image)])
        return {"model": pipe.name, "caption": text}

    @app.post("/v1/vqa", response_model=schemas.VQAResponse, openapi_extra=_body(schemas.VQARequest))
    async def vqa(request: Request) -> dict[str, Any]:
        require("vqa")
        req, raw = await _read(request, schemas.VQARequest, settings)
        _check_texts(settings, question=req.question)
        gen = _generation(pipe, "answer", req, settings)
        (image,) = await _decode(raw, settings, exactly_one=True)
        (answer,) = await run([(_key("answer", **gen), (image, req.question))])
        return {"model": pipe.name, "question": req.question, "answer": answer}

    @app.post("/v1/instruct", response_model=schemas.InstructResponse, openapi_extra=_body(schemas.InstructRequest))
    async def instruct(request: Request) -> dict[str, Any]:
        require("instruct")
        req, raw = await _read(request, schemas.InstructRequest, settings)
        _check_texts(settings, prompt=req.prompt)
        gen = _generation(pipe, "instruct", req, settings)
        (image,) = await _decode(raw, settings, exactly_one=True)
        (response,) = await run([(_key("instruct", **gen), (image, req.prompt))])
        return {"model": pipe.name, "response": response}

    @app.post("/v1/classify", response_model=schemas.ClassifyResponse, openapi_extra=_body(schemas.ClassifyRequest))
    async def classify(request: Request) -> dict[str, Any]:
        require("classify")
        req, raw = await _read(request, schemas.ClassifyRequest, settings)
        _check_texts(settings, labels=req.labels, template=req.template)
        if "{}" not in req.template:
            raise ApiError(422, f"template needs a '{{}}' for the label, got {req.template!r}", "ValidationError")
        if len(set(req.labels)) != len(req.labels) or not all(label.strip() for label in req.labels):
            raise ApiError(422, "labels must be distinct, non-empty strings", "ValidationError")
        (image,) = await _decode(raw, settings, exactly_one=True)
        key = _key("classify", labels=req.labels, hypothesis_template=req.template, top_k=req.top_k)
        (labels,) = await run([(key, image)])
        return {"model": pipe.name, "labels": labels}

    @app.post("/v1/retrieve", response_model=schemas.RetrieveResponse, openapi_extra=_body(schemas.RetrieveRequest))
    async def retrieve(request: Request) -> dict[str, Any]:
        require("retrieve")
        req, raw = await _read(request, schemas.RetrieveRequest, settings)
        _check_texts(settings, texts=req.texts)
        images = await _decode(raw, settings, exactly_one=False)
        (result,) = await run([(_key("retrieve"), (images, req.texts, req.k))])
        return {"model": pipe.name, **result}

    @app.post("/v1/itm", response_model=schemas.ITMResponse, openapi_extra=_body(schemas.ITMRequest))
    async def itm(request: Request) -> dict[str, Any]:
        require("itm")
        req, raw = await _read(request, schemas.ITMRequest, settings)
        _check_texts(settings, texts=req.texts)
        (image,) = await _decode(raw, settings, exactly_one=True)
        scores = await run([(_key("itm"), (image, text)) for text in req.texts])
        return {"model": pipe.name, "scores": scores}

    @app.post("/v1/embed", response_model=schemas.EmbedResponse, openapi_extra=_body(schemas.EmbedRequest))
    async def embed(request: Request) -> dict[str, Any]:
        require("embed")
        req, raw = await _read(request, schemas.EmbedRequest, settings)
        texts = req.texts or []
        _check_texts(settings, texts=texts)
        if not raw and not texts:
            raise ApiError(400, "nothing to embed: send images and/or texts", "MissingInput")
        images = await _decode(raw, settings, exactly_one=False) if raw else []
        items = [(_key("embed_images"), image) for image in images] + [(_key("embed_texts"), t) for t in texts]
        out = await run(items)
        return {"model": pipe.name, "image_embeddings": out[: len(images)], "text_embeddings": out[len(images) :]}

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, err: Overloaded) -> JSONResponse:
        return _error_response(ApiError(503, str(err), "Overloaded"))

    @app.exception_handler(VlkitError)
    async def bad_input(request: Request, err: VlkitError) -> JSONResponse:
        # ImageError, DataError, GenerationError, ...: the input cannot work with this model.
        return _error_response(ApiError(400, str(err), type(err).__name__))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error_response(ApiError(err.status_code, str(err.detail), "HTTPError"))


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of an endpoint that takes JSON (base64 images) or multipart (file uploads)."""
    schema = model.model_json_schema()
    form = json.loads(json.dumps(schema))
    for name in ("image", "images"):
        if name in form.get("properties", {}):
            binary = {"type": "string", "format": "binary"}
            form["properties"][name] = binary if name == "image" else {"type": "array", "items": binary}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}},
        }
    }


def _version() -> str:
    from vlkit import __version__

    return __version__


# ----------------------------------------------------------------------------------------------------------
# Running


def serve(
    pipe: Pipeline,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServerSettings | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``pipe`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(pipe, settings), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """A uvicorn server on a background thread, bound before it starts (port 0 = a free port): for tests,
    benchmarks and notebooks.

    Use as a context manager; ``url`` is the base URL.
    """

    def __init__(
        self, pipe: Pipeline, settings: ServerSettings | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.app = create_app(pipe, settings)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread: Any = None

    def __enter__(self) -> BackgroundServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise VlkitError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
