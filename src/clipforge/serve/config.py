"""The service's settings: one frozen dataclass that the CLI fills from flags and the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # Host header names every server accepts
TOKEN_ENV = "CLIPFORGE_TOKEN"  # bearer token for writes; unset = writes disabled


@dataclass(frozen=True)
class ServeConfig:
    collection: Path
    model: str | None = None  # checkpoint to load; None: the one the collection records
    vocab: str | None = None
    device: str = "cpu"
    # "text": a query-only service holding the text tower alone; requests that need images answer 400.
    towers: str = "both"
    policy: Path | None = None  # moderation policy file; None: /api/moderate answers 404
    token: str | None = None  # writes need "Authorization: Bearer <token>"; None disables them
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    # Host header names accepted besides LOCAL_HOSTS (`clipforge serve` adds the address it binds); "*": any.
    # Other names are refused, so a DNS-rebinding page cannot read a local server through the browser.
    allowed_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 10 * 1024 * 1024  # whole request body
    max_pixels: int = 40_000_000  # decompression-bomb guard, checked from the image header
    max_k: int = 1000
    max_texts: int = 256  # per /api/embed or /api/classify request
    max_images: int = 16
    request_timeout_s: float = 30.0
    batch_size: int = 32  # micro-batching of concurrent encoder calls
    batch_wait_ms: float = 3.0
    thumb_size: int = 256
    thumb_dir: Path | None = None  # None: <cache_dir>/thumbs/<collection hash>
    title: str = "clipforge"

    def __post_init__(self) -> None:
        checks = {
            "max_upload_bytes": self.max_upload_bytes,
            "max_pixels": self.max_pixels,
            "max_k": self.max_k,
            "max_texts": self.max_texts,
            "max_images": self.max_images,
            "batch_size": self.batch_size,
            "thumb_size": self.thumb_size,
        }
        for name, value in checks.items():
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.towers not in ("both", "text"):
            raise ValueError(f"towers must be 'both' or 'text', got {self.towers!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        self.host_names()  # a malformed --allow-host fails at start, with its name

    def host_names(self) -> frozenset[str] | None:
        """The Host header names to accept, as `host_name` reads them; None: any."""
        if "*" in self.allowed_hosts:
            return None
        names = set()
        for h in (*LOCAL_HOSTS, *self.allowed_hosts):
            bare_ipv6 = h.count(":") > 1 and not h.startswith("[")
            name = h.strip().lower() if bare_ipv6 else host_name(h)
            if not name:
                raise ValueError(f"allowed host {h!r} is not a host name (NAME, NAME:PORT or [IPv6])")
            names.add(name)
        return frozenset(names)

    def with_env_token(self) -> ServeConfig:
        """The token from $CLIPFORGE_TOKEN unless one is set already (an empty variable counts as unset)."""
        return self if self.token else replace(self, token=os.environ.get(TOKEN_ENV) or None)


def host_name(header: str) -> str | None:
    """A Host header's name without the port, lowercased, IPv6 without brackets; None when malformed.
    (Starlette's TrustedHostMiddleware cuts at the first colon, which breaks "[::1]:8000".)"""
    v = header.strip().lower()
    if v.startswith("["):
        name, closed, port = v[1:].partition("]")
        ok = closed and (not port or (port[0] == ":" and port[1:].isdigit()))
    else:
        name, colon, port = v.partition(":")
        ok = not colon or port.isdigit()
    return name if ok and name else None


def default_thumb_dir(collection: Path) -> Path:
    import hashlib

    from clipforge.paths import cache_dir

    digest = hashlib.sha256(str(Path(collection).absolute()).encode()).hexdigest()[:16]
    return cache_dir() / "thumbs" / digest
