"""clip-retrieval back-end endpoints, so its `ClipClient` and front end can query a clipforge server.

    GET  /indices-list  -> ["<name>"]                   the collection's folder name
    POST /knn-service   {text | image (base64) | embedding_input, modality, num_images, ...}
                        -> [{"id", "similarity", "url", "caption", ...metadata}]  (+ "video_url")
    POST /metadata      {"ids": [...], "indice_name"} -> [{"id", "metadata": {"url", "caption", ...}}]

Bodies are read as JSON whatever the content type (its client sends none). Differences, documented in
docs/service.md: `image_url` is refused (this server fetches nothing), `deduplicate` drops exact duplicates
(same content hash), and the safety, violence, aesthetic and mclip options are accepted and ignored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from clipforge.index import Hit
from clipforge.index.rank import Ranking

from .api import ERRORS, check_page_limit, engine, hit_out, raw_vector
from .bodies import BadRequest, b64decode, decode_image, json_object, validate
from .schemas import KnnRequest, MetadataRequest, inline_schema

router = APIRouter(tags=["clip-retrieval"])


def index_name(request: Request) -> str:
    return engine(request).config.collection.absolute().name or "clipforge"


def _check_index(request: Request, name: str | None) -> None:
    if name is not None and name != index_name(request):
        raise BadRequest(f"unknown indice_name {name!r}; this server has [{index_name(request)!r}]")


def _metadata(request: Request, h: Hit) -> dict:
    """The links and metadata `hit_out` gives, as absolute URLs: `url` is an image (a video moment's: its
    frame, the thumbnail), and a moment adds `video_url`, opened at the moment (`#t=`), and `t`."""
    out = hit_out(h)
    base = str(request.base_url).rstrip("/")
    meta = {k: v for k, v in out.metadata.items() if k not in ("id", "similarity")}
    if image := out.image_url or out.thumb_url:
        meta["url"] = base + image
    if out.video_url:
        meta["video_url"] = f"{base}{out.video_url}#t={out.t}"
    if h.caption is not None:
        meta["caption"] = h.caption
    return meta


@router.get("/indices-list", response_model=list[str])
async def indices_list(request: Request) -> list[str]:
    return [index_name(request)]


@router.post(
    "/knn-service",
    responses=ERRORS,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": inline_schema(KnnRequest)}}}},
)
async def knn_service(request: Request) -> list[dict]:
    eng = engine(request)
    req = validate(KnnRequest, json_object(await request.body()))
    _check_index(request, req.indice_name)
    if req.image_url:
        raise BadRequest("this server fetches no URLs: send the image as base64 in 'image'")
    n = req.num_result_ids or req.num_images
    check_page_limit(eng, n, 0)
    texts, images, vectors = None, [], []
    if req.text:
        texts = [req.text]
    elif req.image:
        images = [(await decode_image(b64decode(req.image, "image"), "image", eng.config.max_pixels))[0]]
    elif req.embedding_input is not None:
        vectors = [raw_vector(req.embedding_input, eng.dim, "embedding_input")]
    else:
        raise BadRequest("must fill one of text, image and embedding_input")
    hits = await eng.search(
        texts=texts,
        images=images,
        vectors=vectors,
        weights=(1.0, 1.0),
        negatives=None,
        negative_weight=0.0,
        k=n,
        ranking=Ranking(mode="vector"),  # clip-retrieval's semantics: plain nearest neighbours
        modality=req.modality,  # filtered in the search, so num_images are found whatever the mix
    )
    if req.deduplicate:
        seen: set[str] = set()
        kept = []
        for h in hits:
            if h.sha256 is None or h.sha256 not in seen:
                kept.append(h)
            seen.add(h.sha256 or "")
        hits = kept
    return [{**_metadata(request, h), "id": h.id, "similarity": h.score} for h in hits[: req.num_images]]


@router.post(
    "/metadata",
    responses=ERRORS,
    openapi_extra={
        "requestBody": {"content": {"application/json": {"schema": inline_schema(MetadataRequest)}}}
    },
)
async def metadata(request: Request) -> list[dict]:
    eng = engine(request)
    req = validate(MetadataRequest, json_object(await request.body()))
    _check_index(request, req.indice_name)
    out = []
    for i in req.ids:
        try:
            out.append({"id": i, "metadata": _metadata(request, await eng.get(i))})
        except LookupError:
            continue  # unknown ids are left out
    return out
