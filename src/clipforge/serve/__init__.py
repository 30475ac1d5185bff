"""The search service: a FastAPI app over one collection and one model, with a one-page web UI.

    from clipforge.serve import ServeConfig, create_app
    app = create_app(ServeConfig(collection=Path("photos.col")))   # then run it with uvicorn

Needs the `serve` extra (fastapi, uvicorn, python-multipart); `import clipforge` never imports this package.
"""

from .app import create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
