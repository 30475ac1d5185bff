"""`clipforge serve COLLECTION`: the web page and HTTP API over one collection (see docs/service.md)."""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a collection: search web page and HTTP API",
        description="Serve a collection over HTTP. Writes are enabled only when $CLIPFORGE_TOKEN is set.",
    )
    p.add_argument("collection", help="collection folder (made by `clipforge index`)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own model and index")
    p.add_argument("--model", "-m", default=None, help="checkpoint (default: the one the collection records)")
    p.add_argument("--vocab", default=None, help="vocabulary file, for checkpoints that carry none")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--towers",
        choices=["both", "text"],
        default="both",
        help="text: a query-only service that keeps the text tower alone in memory (text, 'like' and vector "
        "queries; image uploads answer 400)",
    )
    p.add_argument("--policy", default=None, help="moderation policy file (YAML or JSON) for /api/moderate")
    p.add_argument(
        "--cors", action="append", default=[], metavar="ORIGIN", help="allow this origin (repeatable)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header names NAME (repeatable; '*': any); by default only the "
        "bound address, localhost, 127.0.0.1 and [::1], which stops DNS-rebinding pages",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default: 10)")
    p.add_argument("--max-k", type=int, default=1000, help="most results one request may ask for")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request is abandoned (504)")
    p.set_defaults(
        run=lambda a: serve(
            collection=Path(a.collection),
            host=a.host,
            port=a.port,
            workers=a.workers,
            model=a.model,
            vocab=a.vocab,
            device=a.device,
            towers=a.towers,
            policy=Path(a.policy) if a.policy else None,
            cors=tuple(a.cors),
            allow_hosts=tuple(a.allow_host),
            max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
            max_k=a.max_k,
            timeout_s=a.timeout,
        )
    )


def serve(
    collection: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    model: str | None = None,
    vocab: str | None = None,
    device: str = "cpu",
    towers: str = "both",
    policy: Path | None = None,
    cors: tuple[str, ...] = (),
    allow_hosts: tuple[str, ...] = (),
    max_upload_bytes: int = 10 * 1024 * 1024,
    max_k: int = 1000,
    timeout_s: float = 30.0,
) -> int:
    try:
        import uvicorn

        from clipforge.serve.app import create_app
        from clipforge.serve.config import ServeConfig
    except ImportError as e:
        raise ImportError(
            f"`clipforge serve` needs the serve extra: pip install 'clipforge[serve]' ({e})"
        ) from e
    from clipforge.index import Collection

    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if policy is not None and not policy.is_file():
        raise FileNotFoundError(f"policy file {policy} does not exist")
    Collection.open(collection, readonly=True).close()  # a bad folder fails here, once, not in each worker
    config = ServeConfig(
        collection=collection.absolute(),
        model=model,
        vocab=vocab,
        device=device,
        towers=towers,
        policy=policy.absolute() if policy else None,
        cors_origins=cors,
        allowed_hosts=(host, *allow_hosts),
        max_upload_bytes=max_upload_bytes,
        max_k=max_k,
        request_timeout_s=timeout_s,
    ).with_env_token()
    writes = "enabled (bearer token)" if config.token else "disabled (set CLIPFORGE_TOKEN to enable)"
    print(
        f"clipforge serve: http://{host}:{port}/ — {collection}, {workers} worker(s), writes {writes}",
        file=sys.stderr,
    )
    if host in ("0.0.0.0", "::") and not allow_hosts:
        print(
            "clipforge serve: only requests addressed to localhost are answered; name this machine as other "
            "clients address it with --allow-host NAME",
            file=sys.stderr,
        )
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
    else:
        _run_workers(functools.partial(create_app, config), host, port, workers)
    return 0


def _run_workers(app_factory: Callable[[], Any], host: str, port: int, workers: int) -> None:
    """uvicorn's multi-process supervisor over one socket, each worker building its app with `app_factory`.

    `uvicorn.run` takes only an import string when it starts workers, which would leave the settings to travel
    through the environment. Its Config is pickled to each worker, though, so a picklable factory carries them
    explicitly (the token included, which therefore never sits in an environment variable)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(
        app_factory, factory=True, host=host, port=port, workers=workers, log_level="warning"
    )
    # Each worker builds its own Server in recent uvicorn; older versions take the target to run instead.
    target = (
        {"target": uvicorn.Server(config).run}
        if "target" in inspect.signature(Multiprocess).parameters
        else {}
    )
    sock = config.bind_socket()
    try:
        Multiprocess(config, sockets=[sock], **target).run()
    finally:
        sock.close()
