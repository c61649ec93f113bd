"""Request and response bodies of the HTTP API (pydantic models; they also document the OpenAPI schema).

Images travel either as multipart file uploads (field ``image``, or ``images`` repeated) or, in a JSON body,
as base64 strings (``data:image/...;base64,`` prefixes are accepted). Unknown fields are refused, so a typo
is a 422 with its name rather than a silently ignored option.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class ServerSettings:
    """Limits and batching of a server.

    Attributes:
        max_batch: most requests run together in one forward pass.
        max_wait_ms: how long the first request of a batch waits for others to join.
        max_upload_bytes: largest request body.
        max_pixels: largest image (width * height), checked from the header before decoding.
        max_new_tokens: generation length limit (requests asking more are refused; requests that ask
            nothing get the task's default capped at this).
        max_beams: beam width limit.
        max_items: most images / texts / labels in one request.
        max_text_chars: longest prompt, question, label or text.
        timeout_s: a request still waiting or running after this long gets a 504.
        max_queue: requests waiting at once; beyond it new ones get a 503.
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_000_000
    max_new_tokens: int = 128
    max_beams: int = 8
    max_items: int = 64
    max_text_chars: int = 2000
    timeout_s: float = 60.0
    max_queue: int = 1024


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Generation(_Request):
    num_beams: int | None = Field(None, ge=1, description="beam width (default: the task's reference setting)")
    max_new_tokens: int | None = Field(None, ge=1, description="length limit of the generated text")


class CaptionRequest(_Generation):
    image: str | None = Field(None, description="base64 image (JSON); or upload a file field 'image'")
    prompt: str | None = Field(None, description="text the caption continues (LLM models)")


class VQARequest(_Generation):
    image: str | None = Field(None, description="base64 image (JSON); or upload a file field 'image'")
    question: str = Field(..., min_length=1)


class InstructRequest(_Generation):
    image: str | None = Field(None, description="base64 image (JSON); or upload a file field 'image'")
    prompt: str = Field(..., min_length=1, description="the instruction")


class ClassifyRequest(_Request):
    image: str | None = Field(None, description="base64 image (JSON); or upload a file field 'image'")
    labels: list[str] = Field(..., min_length=1, description="class names (multipart: comma-separated or repeated)")
    template: str = Field("a photo of {}.", description="prompt with {} for the label")
    top_k: int | None = Field(None, ge=1, description="keep the best k labels")


class RetrieveRequest(_Request):
    images: list[str] | None = Field(None, description="base64 images (JSON); or upload file fields 'images'")
    texts: list[str] = Field(..., min_length=1, description="texts (multipart: repeated or one per line)")
    k: int = Field(5, ge=1, description="matches per query")


class ITMRequest(_Request):
    image: str | None = Field(None, description="base64 image (JSON); or upload a file field 'image'")
    texts: list[str] = Field(..., min_length=1, description="texts to match against the image")


class EmbedRequest(_Request):
    images: list[str] | None = Field(None, description="base64 images (JSON); or upload file fields 'images'")
    texts: list[str] | None = Field(None, description="texts (multipart: repeated or one per line)")


class LabelScore(BaseModel):
    label: str
    score: float


class CaptionResponse(BaseModel):
    model: str
    caption: str


class VQAResponse(BaseModel):
    model: str
    question: str
    answer: str


class InstructResponse(BaseModel):
    model: str
    response: str


class ClassifyResponse(BaseModel):
    model: str
    labels: list[LabelScore]


class TextMatch(BaseModel):
    index: int
    text: str
    score: float


class ImageMatch(BaseModel):
    index: int
    score: float


class RetrieveResponse(BaseModel):
    model: str
    image_to_text: list[list[TextMatch]]
    text_to_image: list[list[ImageMatch]]


class ITMResponse(BaseModel):
    model: str
    scores: list[float] = Field(..., description="match probability of the image with each text")


class EmbedResponse(BaseModel):
    model: str
    image_embeddings: list[list[list[float]]] = Field(
        ..., description="per image, Q x E L2-normalised query embeddings"
    )
    text_embeddings: list[list[float]] = Field(..., description="per text, an E L2-normalised embedding")
    similarity: str = "max over the image's queries of the dot product with the text embedding"


class ErrorResponse(BaseModel):
    error: str = Field(..., description="what was wrong")
    type: str = Field(..., description="error class")
    status: int


class ModelCard(BaseModel):
    id: str
    arch: str
    tasks: list[str]
    device: str
    dtype: str


class ModelsResponse(BaseModel):
    data: list[ModelCard]
    limits: dict[str, int | float]
