"""The FastAPI application: wiring only. Endpoints live in api.py (clipforge's own) and compat.py
(clip-retrieval's); the work is done by engine.Engine and the library below it.

    create_app(config, encoder=None)  one process's app; the model and collection load here, once
                                      (`clipforge serve --workers N` calls it in each worker process)
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from clipforge.index.types import EncoderLike
from clipforge.model.tower import TowerNotLoadedError

from . import api, compat
from .config import ServeConfig
from .engine import Engine, NotFound
from .guard import Guard
from .metrics import Metrics

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("clipforge.serve")


def load_encoder(config: ServeConfig, identity: dict) -> EncoderLike:
    """The checkpoint named by --model, else the one recorded in the collection when it was built."""
    from clipforge.checkpoint import resolve
    from clipforge.encoder import Encoder

    name = config.model or identity.get("model") or "default"
    enc = Encoder.load(resolve(name), vocab=config.vocab, device=config.device)
    enc.name = str(identity.get("model") or name) if config.model is None else enc.name
    if config.towers != "both":
        # A collection knows its model by a digest of all the weights: taken before the image tower goes.
        _ = enc.identity  # a cached property: computed now, kept after
        enc.model.keep_towers(config.towers)
    return enc


def _error(status: int, message: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _place(loc: tuple | list) -> list:
    """The path to a failing value. Past the field name, pydantic names the union alternative it tried
    (`constrained-str`, `list[constrained-str]`): that is no place in the request, so it is left out."""
    parts = list(loc)
    head = parts[:2] if parts[:1] in (["body"], ["query"], ["path"]) else parts[:1]
    rest = parts[len(head) :]
    return head + [x for x in rest if not (isinstance(x, str) and not x.isidentifier())]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [
            {"loc": _place(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        # A field that takes a text or a list of texts fails once per alternative; the error that got
        # furthest into the value says what is wrong (a wrong-type complaint about the other form does not).
        best = min(errs, key=lambda e: (e["type"].endswith("_type"), -len(e["loc"])), default=None)
        best = best or {"loc": [], "msg": "invalid request"}
        where = ".".join(str(x) for x in best["loc"] if x != "body") or "request"
        return _error(422, f"invalid request: {where}: {best['msg']}", errs)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc.args[0] if exc.args else exc))

    @app.exception_handler(TowerNotLoadedError)
    async def tower_not_loaded(_: Request, exc: TowerNotLoadedError) -> JSONResponse:
        return _error(400, f"this service holds the text tower only (serve --towers text): {exc}")

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError) -> JSONResponse:
        # Library errors about the input (ImageError, ModelMismatchError, ...) are the client's to fix.
        from clipforge.index import CollectionError

        if isinstance(exc, CollectionError) and "another process" in str(exc):
            return _error(409, f"{exc}; retry the write later")
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")


def create_app(config: ServeConfig, encoder: EncoderLike | None = None) -> FastAPI:
    """The app for one process. Pass `encoder` to serve with a model already in memory (tests do)."""
    if encoder is None:
        from clipforge.index import Collection

        with Collection.open(config.collection, readonly=True) as c:
            identity = dict(c.identity)
        encoder = load_encoder(config, identity)
    eng = Engine(config, encoder)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        eng.close()

    app = FastAPI(
        title=f"{config.title} search service",
        version=_version(),
        description="Search a clipforge collection by text or image; zero-shot classify; embed.",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN; this server stays offline
        redoc_url=None,
    )
    app.state.engine = eng
    app.state.metrics = metrics = Metrics()
    _install_error_handlers(app)
    app.include_router(api.router)
    app.include_router(compat.router)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    async def metrics_endpoint() -> PlainTextResponse:
        stats = eng.info()
        gauges = {"clipforge_collection_items": ("Items in the collection.", float(stats["items"]))}
        text = metrics.render(
            gauges,
            lambda: {"text": len(eng.text_batcher.batch_sizes), "image": len(eng.image_batcher.batch_sizes)},
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(
        Guard,
        max_body=config.max_upload_bytes,
        timeout_s=config.request_timeout_s,
        metrics=metrics,
        hosts=config.host_names(),
    )
    return app


def _version() -> str:
    from clipforge import __version__

    return str(__version__)
