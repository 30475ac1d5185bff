"""The /api endpoints: validate, call the engine, serialise. No search or model logic lives here."""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

from clipforge.index import Hit
from clipforge.index.ingest import remote_inputs
from clipforge.index.rank import Ranking
from clipforge.media.video import Sampling
from clipforge.zeroshot import load_templates

from .bodies import BadRequest, b64decode, decode_image, read_body
from .engine import Engine, frame_of
from .schemas import (
    HARD_MAX_K,
    MAX_TEXT_CHARS,
    AddRequest,
    AddResponse,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HitOut,
    InfoResponse,
    ModerateRequest,
    ModerateResponse,
    RemoveResponse,
    SearchRequest,
    SearchResponse,
    request_body,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 504)
}
router = APIRouter()


def engine(request: Request) -> Engine:
    return request.app.state.engine


def hit_out(h: Hit) -> HitOut:
    """A hit as the API shows it. A moment of a video is named by its video's file name, links the video and
    its time, and leaves the video's server path out of its metadata."""
    frame = frame_of(h)
    source = frame[0] if frame else h.path
    image = bool(h.path) and frame is None
    return HitOut(
        id=h.id,
        score=h.score,
        relevance=h.relevance,
        name=Path(source).name if source else None,
        caption=h.caption,
        metadata={k: v for k, v in h.metadata.items() if k != "video"} if frame else h.metadata,
        image_url=f"/api/images/{h.id}" if image else None,
        thumb_url=f"/api/thumbs/{h.id}" if h.path else None,
        video_url=f"/api/videos/{h.id}" if frame else None,
        t=frame[1] if frame else None,
    )


def check_page_limit(eng: Engine, k: int, offset: int) -> None:
    """k + offset within this server's max_k (index.types.check_k only checks that k is a positive int)."""
    if k + offset > eng.config.max_k:
        raise BadRequest(f"k + offset = {k + offset} exceeds this server's limit of {eng.config.max_k}")


async def one_image(
    eng: Engine, b64: str | None, files: list[bytes], id: int | None, field: str
) -> np.ndarray:
    """The vector of the single image a request names: an upload, a base64 field, or a stored item's id."""
    given = [x for x in (b64, files or None, id) if x is not None]
    if len(given) != 1 or len(files) > 1:
        raise BadRequest(f"send exactly one image: an upload, '{field}' as base64, or 'id' of a stored item")
    if id is not None:
        return await eng.vector_of(id)
    data = files[0] if files else b64decode(b64 or "", field)
    img, _ = await decode_image(data, field, eng.config.max_pixels)
    return (await eng.embed_images([img]))[0]


def raw_vector(values: list[float], dim: int, field: str) -> np.ndarray:
    """A query vector (D,) sent as numbers: the model's dimension, each finite in float32."""
    if len(values) != dim:
        raise BadRequest(f"'{field}' must have {dim} numbers, got {len(values)}")
    v = np.asarray(values, np.float64)
    if not (np.abs(v) <= np.finfo(np.float32).max).all():
        raise BadRequest(f"'{field}' holds a number that is not finite in float32")
    return v.astype(np.float32)


def _text_list(value: str | list[str] | None, what: str, limit: int = 256) -> list[str] | None:
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else value
    if not texts or any(not t.strip() for t in texts):
        raise BadRequest(f"'{what}' must be non-empty text")
    if len(texts) > limit:
        raise BadRequest(f"'{what}' has {len(texts)} texts; this server takes at most {limit}")
    return texts


async def run_search(eng: Engine, req: SearchRequest, files: list[bytes]) -> SearchResponse:
    t0 = time.perf_counter()
    check_page_limit(eng, req.k, req.offset)
    images = []
    for i, data in enumerate(files + ([b64decode(req.image, "image")] if req.image else [])):
        img, _ = await decode_image(data, f"image {i}", eng.config.max_pixels)
        images.append(img)
    vectors = []
    if req.like is not None:
        vectors.append(await eng.vector_of(req.like))
    if req.vector is not None:
        vectors.append(raw_vector(req.vector, eng.dim, "vector"))
    texts = _text_list(req.text, "text", eng.config.max_texts)
    if not (texts or images or vectors):
        raise BadRequest("a search needs 'text', an image, 'like' (an item id) or 'vector'")
    if req.mode == "keyword" and not texts:
        raise BadRequest("mode 'keyword' needs 'text'")
    hits = await eng.search(
        texts=texts,
        images=images,
        vectors=vectors,
        weights=(req.weights[0], req.weights[1]),
        negatives=_text_list(req.negative, "negative", eng.config.max_texts),
        negative_weight=req.negative_weight,
        k=req.k + req.offset,
        ranking=Ranking(req.mode, req.min_relevance, req.sort),
        path_prefix=req.path_prefix,
        added_after=req.added_after,
        added_before=req.added_before,
        long=req.long,
        after=req.after,
        before=req.before,
        camera=req.camera,
        modality=req.modality,
    )
    page = [hit_out(h) for h in hits[req.offset :]]
    return SearchResponse(results=page, offset=req.offset, k=req.k, took_ms=1000 * (time.perf_counter() - t0))


@router.get("/api/search", response_model=SearchResponse, responses=ERRORS, tags=["search"])
async def search_get(
    request: Request,
    q: str = Query(..., min_length=1, max_length=MAX_TEXT_CHARS, description="query text"),
    k: int = Query(20, ge=1, le=HARD_MAX_K),
    offset: int = Query(0, ge=0, le=HARD_MAX_K),
    mode: Literal["vector", "keyword", "hybrid"] | None = Query(None),
    min_relevance: float | None = Query(None, ge=0.0, le=1.0),
    sort: Literal["relevance", "date"] = Query("relevance"),
) -> SearchResponse:
    """Text search. `k` results from `offset` on (paging); mode, min_relevance and sort as in POST."""
    req = SearchRequest(text=q, k=k, offset=offset, mode=mode, min_relevance=min_relevance, sort=sort)
    return await run_search(engine(request), req, [])


@router.post(
    "/api/search",
    response_model=SearchResponse,
    responses=ERRORS,
    tags=["search"],
    openapi_extra=request_body(SearchRequest, multipart=True),
)
async def search_post(request: Request) -> SearchResponse:
    """Search by any mix of text, image (base64 or an upload), a stored item ('more like this') and a raw
    vector, minus negative text, with filters."""
    eng = engine(request)
    req, files = await read_body(request, SearchRequest, eng.config.max_images)
    return await run_search(eng, req, files)


@router.post(
    "/api/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    tags=["zero-shot"],
    openapi_extra=request_body(ClassifyRequest, multipart=True),
)
async def classify(request: Request) -> ClassifyResponse:
    """Zero-shot classification of one image against the labels given."""
    t0 = time.perf_counter()
    eng = engine(request)
    req, files = await read_body(request, ClassifyRequest, 1)
    labels = [x.strip() for x in req.labels]
    templates = load_templates(req.templates or "simple")
    for t in templates:
        try:
            t.format("x")
        except (KeyError, IndexError, ValueError):
            raise BadRequest(f"template {t!r} may hold only one '{{}}' and no other braces") from None
    if any(not x for x in labels) or len(set(labels)) != len(labels):
        raise BadRequest("labels must be distinct, non-empty strings")
    if any(not t.strip() for t in templates):
        raise BadRequest("templates must be non-empty strings")
    if len(labels) * len(templates) > eng.config.max_texts:
        raise BadRequest(
            f"{len(labels)} labels x {len(templates)} templates exceed this server's limit of "
            f"{eng.config.max_texts} prompts"
        )
    vec = await one_image(eng, req.image, files, req.id, "image")
    probs = await eng.classify(vec, labels, templates)
    order = np.argsort(-probs, kind="stable")[: req.top_k or len(labels)]
    preds = [{"label": labels[i], "probability": float(probs[i])} for i in order]
    return ClassifyResponse(predictions=preds, took_ms=1000 * (time.perf_counter() - t0))


@router.post(
    "/api/moderate",
    response_model=ModerateResponse,
    responses=ERRORS,
    tags=["zero-shot"],
    openapi_extra=request_body(ModerateRequest, multipart=True),
)
async def moderate(request: Request) -> ModerateResponse:
    """Check one image against the server's moderation policy: a decision (allow / review / block) and the
    score of each category."""
    eng = engine(request)
    if eng.policy is None:
        raise HTTPException(404, "no moderation policy is configured (start the server with --policy FILE)")
    req, files = await read_body(request, ModerateRequest, 1)
    return ModerateResponse(**await eng.moderate(await one_image(eng, req.image, files, req.id, "image")))


@router.post(
    "/api/embed",
    response_model=EmbedResponse,
    responses=ERRORS,
    tags=["embed"],
    openapi_extra=request_body(EmbedRequest, multipart=True),
)
async def embed(request: Request) -> EmbedResponse:
    """Texts and/or images -> L2-normalised vectors of the collection's model."""
    eng = engine(request)
    req, files = await read_body(request, EmbedRequest, eng.config.max_images)
    if not req.texts and not (files or req.images):
        raise BadRequest("send at least one of 'texts' or 'images'")
    if len(req.texts) > eng.config.max_texts or len(files) + len(req.images) > eng.config.max_images:
        raise BadRequest(
            f"at most {eng.config.max_texts} texts and {eng.config.max_images} images per request"
        )
    blobs = files + [b64decode(s, f"images[{i}]") for i, s in enumerate(req.images)]
    texts = _text_list(req.texts, "texts") if req.texts else []
    imgs = [(await decode_image(b, f"image {i}", eng.config.max_pixels))[0] for i, b in enumerate(blobs)]
    tv = await eng.embed_texts(texts, req.long) if texts else np.zeros((0, eng.dim), np.float32)
    iv = await eng.embed_images(imgs)
    return EmbedResponse(
        model=str(eng.identity.get("model", "?")), dim=eng.dim, texts=tv.tolist(), images=iv.tolist()
    )


@router.get("/api/images/{id}", responses=ERRORS, tags=["items"], response_class=FileResponse)
async def image(request: Request, id: int) -> FileResponse:
    """The original image file of a stored item (by id only: paths never come from the request)."""
    return FileResponse(await engine(request).image_file(id), headers={"Cache-Control": "max-age=3600"})


@router.get("/api/videos/{id}", responses=ERRORS, tags=["items"], response_class=FileResponse)
async def video(request: Request, id: int) -> FileResponse:
    """The video file of a stored moment of a video (by id only, as images), with byte ranges, so a page's
    video element can seek to the moment."""
    return FileResponse(await engine(request).video_file(id), headers={"Cache-Control": "max-age=3600"})


@router.get("/api/thumbs/{id}", responses=ERRORS, tags=["items"], response_class=FileResponse)
async def thumb(request: Request, id: int) -> FileResponse:
    """A JPEG thumbnail of a stored item, made on first request and cached on disk."""
    path = await engine(request).thumbnail(id)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})


@router.get("/api/items/{id}", response_model=HitOut, responses=ERRORS, tags=["items"])
async def item(request: Request, id: int) -> HitOut:
    """A stored item's caption, metadata and links."""
    return hit_out(await engine(request).get(id))


async def info(request: Request) -> InfoResponse:
    eng = engine(request)
    stats = eng.info()
    return InfoResponse(
        status="ok",
        items=stats["items"],
        model=str(eng.identity.get("model", "?")),
        dim=eng.dim,
        index=stats["index"],
        writes_enabled=eng.config.token is not None,
        moderation=eng.policy is not None,
    )


router.add_api_route("/healthz", info, methods=["GET"], response_model=InfoResponse, tags=["service"])
router.add_api_route("/api/info", info, methods=["GET"], response_model=InfoResponse, tags=["service"])


# ---- writes ---------------------------------------------------------------------------------------------
def require_token(request: Request) -> None:
    token = engine(request).config.token
    if token is None:
        raise HTTPException(403, "writes are disabled on this server: set CLIPFORGE_TOKEN before starting it")
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPException(401, "a valid 'Authorization: Bearer <token>' header is required for writes")


WRITE_ERRORS = {
    **ERRORS,
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
}


@router.post(
    "/api/index/add",
    response_model=AddResponse,
    responses=WRITE_ERRORS,
    tags=["writes"],
    dependencies=[Depends(require_token)],
    openapi_extra=request_body(AddRequest, multipart=False),
)
async def index_add(request: Request) -> AddResponse:
    """Add image and video files or folders on the server, uploaded images (base64) and captions; videos
    are sampled as `Collection.add` samples them (video_interval, video_max_frames). Needs the token."""
    eng = engine(request)
    req, _ = await read_body(request, AddRequest, 0)
    sampling = {"video_interval": req.video_interval, "video_max_frames": req.video_max_frames}
    Sampling.of(
        req.video_interval, req.video_max_frames
    )  # a bad value is a 400 (SamplingError) before anything is written
    if not (req.paths or req.texts or req.images):
        raise BadRequest("send at least one of 'paths', 'texts' or 'images'")
    if len(req.images) > eng.config.max_images or max(len(req.texts), len(req.paths)) > eng.config.max_texts:
        raise BadRequest(
            f"at most {eng.config.max_images} images, {eng.config.max_texts} texts and "
            f"{eng.config.max_texts} paths per request"
        )
    if remote := remote_inputs(req.paths):
        # A URL would be fetched and a pipe: command run: 'paths' name files on this server, nothing else.
        raise BadRequest(f"'paths' must name files on this server, not URLs or commands: {remote[0]!r}")
    if req.texts:
        _text_list(req.texts, "texts", eng.config.max_texts)
    uploads = []
    for i, s in enumerate(req.images):
        data = b64decode(s, f"images[{i}]")
        _, fmt = await decode_image(data, f"images[{i}]", eng.config.max_pixels)  # refuse non-images now
        uploads.append((data, fmt))
    return AddResponse(**await eng.add(req.paths, req.texts, uploads, **sampling))


@router.delete(
    "/api/index/{id}",
    response_model=RemoveResponse,
    responses=WRITE_ERRORS,
    tags=["writes"],
    dependencies=[Depends(require_token)],
)
async def index_remove(request: Request, id: int) -> RemoveResponse:
    """Remove one item by id. Needs the token."""
    return RemoveResponse(removed=await engine(request).remove(id))
