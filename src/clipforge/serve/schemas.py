"""Request and response bodies of the HTTP API (pydantic). Flat models only: the endpoints that also take
multipart uploads publish these schemas inline in the OpenAPI document, where nested `$defs` would dangle."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from clipforge.long_text import LongText

HARD_MAX_K = 10_000  # the schema's bound; the configured max_k (default 1000) is checked per request
# The one bound on every text a request carries (queries, captions, labels, templates, paths, names): a CLIP
# text tower reads 77 tokens, so 2,000 characters is generous, while a megabyte of text costs seconds of
# tokenizer time on the encoder's single thread and stalls every other request behind it.
MAX_TEXT_CHARS = 2000
# The schema's bound on a list of texts; the configured max_texts (default 256) is checked per request.
HARD_MAX_ITEMS = 10_000

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Texts = Annotated[list[Text], Field(max_length=HARD_MAX_ITEMS)]


# How a text past the model's context length is read (clipforge.long_text).
Long = Field("truncate", description="texts past the context: truncate, chunk or interpolate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchRequest(_Strict):
    text: Text | Texts | None = Field(None, description="query text; several texts are averaged")
    image: str | None = Field(None, description="query image, base64 (a data: URL prefix is accepted)")
    like: int | None = Field(None, description="id of a stored item: 'more like this'")
    vector: list[float] | None = Field(None, description="a raw query vector of the collection's dimension")
    weights: list[float] = Field([1.0, 1.0], min_length=2, max_length=2, description="[text, image] weights")
    negative: Text | Texts | None = Field(None, description="text to steer away from")
    long: LongText = Long
    negative_weight: float = Field(0.5, ge=0.0, le=10.0)
    k: int = Field(20, ge=1, le=HARD_MAX_K, description="results per page")
    offset: int = Field(0, ge=0, le=HARD_MAX_K, description="skip this many results (paging)")
    path_prefix: Text | None = Field(None, description="only items whose file path starts with this")
    added_after: float | None = Field(None, description="only items added after this Unix time")
    added_before: float | None = Field(None, description="only items added before this Unix time")
    mode: Literal["vector", "keyword", "hybrid"] | None = Field(
        None, description="vector, keyword (BM25 on names, captions, metadata) or hybrid (default with text)"
    )
    min_relevance: float | None = Field(
        None, ge=0.0, le=1.0, description="drop hits whose relevance is below this (none: the plain top k)"
    )
    sort: Literal["relevance", "date"] = Field(
        "relevance", description="order of the hits (date: newest first)"
    )
    after: Text | float | None = Field(
        None, description="only items dated after this (ISO 8601 or Unix time): taken_at, else when added"
    )
    before: Text | float | None = Field(None, description="only items dated before this")
    camera: Text | None = Field(None, description="only items whose camera metadata contains this")
    modality: Literal["image", "text"] | None = Field(
        None, description="only items with an image, or only captions (image-to-text search)"
    )


class HitOut(BaseModel):
    id: int
    score: float
    relevance: float | None = Field(None, description="calibrated estimate (0-1) that the hit is relevant")
    name: str | None = Field(None, description="file name (never the server path)")
    caption: str | None = None
    metadata: dict[str, Any] = {}
    image_url: str | None = None
    thumb_url: str | None = None
    video_url: str | None = Field(None, description="the video file of a moment of a video")
    t: float | None = Field(None, description="a moment of a video: its time in the video, in seconds")


class SearchResponse(BaseModel):
    results: list[HitOut]
    offset: int
    k: int
    took_ms: float


class ClassifyRequest(_Strict):
    image: str | None = Field(None, description="image, base64")
    id: int | None = Field(None, description="classify a stored item instead of an uploaded image")
    labels: Texts = Field(..., min_length=1, description="class names, e.g. ['a dog', 'a cat']")
    templates: Texts | None = Field(None, description="prompt templates with '{}' for the label")
    top_k: int | None = Field(None, ge=1, description="return only the k most probable labels")


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    predictions: list[LabelScore]
    took_ms: float


class ModerateRequest(_Strict):
    image: str | None = Field(None, description="image, base64")
    id: int | None = Field(None, description="check a stored item instead of an uploaded image")


class CategoryScore(BaseModel):
    name: str
    score: float
    decision: str
    fired: list[str]


class ModerateResponse(BaseModel):
    decision: str = Field(..., description="allow, review or block")
    categories: list[CategoryScore]


class EmbedRequest(_Strict):
    texts: Texts = Field([], description="texts to embed")
    long: LongText = Long
    images: list[str] = Field([], description="images to embed, base64")


class EmbedResponse(BaseModel):
    model: str
    dim: int
    texts: list[list[float]]
    images: list[list[float]]


class AddRequest(_Strict):
    paths: Texts = Field([], description="image files or folders on the server")
    texts: Texts = Field([], description="captions to store as text items")
    images: list[str] = Field([], description="uploaded images, base64; saved under <collection>/uploads")
    video_interval: float | None = Field(None, description="seconds between a video's sampled frames (5)")
    video_max_frames: int | None = Field(None, description="frames per video at most (120)")


class AddResponse(BaseModel):
    ids: list[int]
    added: int
    updated: int
    unchanged: int
    failed: list[list[str]]


class RemoveResponse(BaseModel):
    removed: int


class InfoResponse(BaseModel):
    status: str
    items: int
    model: str
    dim: int
    index: str
    writes_enabled: bool
    moderation: bool


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


class KnnRequest(BaseModel):
    """clip-retrieval's /knn-service body. Unknown fields are ignored, as its back end does."""

    model_config = ConfigDict(extra="ignore")
    text: Text | None = None
    image: str | None = None
    image_url: Text | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=HARD_MAX_K)
    num_result_ids: int | None = Field(None, ge=1, le=HARD_MAX_K)
    indice_name: Text | None = None
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    use_mclip: bool = False
    aesthetic_score: int | Text | None = None
    aesthetic_weight: float | Text | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int] = Field(..., max_length=HARD_MAX_K)
    indice_name: Text | None = None


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema, for an `openapi_extra` request body."""
    return model.model_json_schema()


def request_body(model: type[BaseModel], multipart: bool) -> dict:
    """OpenAPI requestBody for an endpoint that reads JSON (and, if `multipart`, a form with a file `image`)."""
    content: dict[str, Any] = {"application/json": {"schema": inline_schema(model)}}
    if multipart:
        props = {name: {"type": "string"} for name in model.model_fields if name not in ("image", "images")}
        props["image"] = {"type": "string", "format": "binary"}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": props}}
    return {"requestBody": {"required": True, "content": content}}
