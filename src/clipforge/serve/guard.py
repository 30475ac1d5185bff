"""One ASGI middleware for the checks every request shares: the Host header, body size, time, and the metrics
around them.

Written against raw ASGI (not BaseHTTPMiddleware) so that an oversized body is refused while it streams in,
before the whole of it sits in memory, and so that a timed-out request still gets a JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.exceptions import HTTPException

from .config import host_name
from .metrics import Metrics

Scope = dict[str, Any]


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the body streams in: an HTTPException, so it is a 413 at any depth."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


def _json_response(status: int, error: str) -> tuple[dict, dict]:
    body = json.dumps({"error": error}).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body}


class Guard:
    def __init__(
        self,
        app: Any,
        *,
        max_body: int,
        timeout_s: float,
        metrics: Metrics,
        hosts: frozenset[str] | None,
    ) -> None:
        self.app, self.max_body, self.timeout_s, self.metrics = app, max_body, timeout_s, metrics
        self.hosts = hosts  # accepted Host names (see host_name); None: any

    def _host_error(self, headers: dict[bytes, bytes]) -> str | None:
        if self.hosts is None:
            return None
        header = headers.get(b"host", b"").decode("latin-1")
        if host_name(header) in self.hosts:
            return None
        shown = header[:100] or "(none)"
        return (
            f"Host {shown!r} is not served here; start the server with --allow-host NAME to accept another "
            "name for it"
        )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = {"started": False, "status": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"], state["status"] = True, int(message["status"])
            await send(message)

        async def refuse(status: int, error: str) -> None:
            if not state["started"]:
                for m in _json_response(status, error):
                    await send_wrapper(m)

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        limit = f"the request body exceeds the limit of {self.max_body} bytes"
        try:
            if (bad_host := self._host_error(headers)) is not None:
                await refuse(400, bad_host)  # before anything else: a rebinding page learns nothing more
            elif declared is not None and declared.isdigit() and int(declared) > self.max_body:
                await refuse(413, limit)
            else:
                await asyncio.wait_for(self.app(scope, self._counting(receive), send_wrapper), self.timeout_s)
        except BodyTooLarge:
            await refuse(413, limit)
        except (asyncio.TimeoutError, TimeoutError):
            await refuse(504, f"the request took longer than {self.timeout_s:g} s and was abandoned")
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope.get("method", "?"), name, state["status"], time.perf_counter() - t0)

    def _counting(self, receive: Any) -> Any:
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return wrapped
