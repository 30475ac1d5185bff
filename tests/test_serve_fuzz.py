"""Fuzz the service: whatever a client sends, never a 5xx, never a traceback, always a prompt answer.

Two parts, each bounded (the file runs well under a minute):
- schemathesis drives every operation of the OpenAPI schema with bodies that follow it;
- hand-written Hypothesis strategies send what no schema describes, to every endpoint: JSON bodies with the
  endpoint's own fields holding wrong types, NaN, huge numbers, over-long and huge strings and nesting up to
  100,000 levels; raw bytes; multipart uploads of random bytes; random query strings and path ids; and odd
  Host, Content-Type and Authorization headers.
Writes are enabled with a token here so their bodies are parsed too; no generated body names `paths` (files on
the server), so the fuzzer cannot walk the disk.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.routing import Mount  # noqa: E402
from test_serve_api import ShapeEncoder, build_collection, make_config, shape_png  # noqa: E402

from clipforge.serve import create_app  # noqa: E402
from clipforge.serve.schemas import (  # noqa: E402
    AddRequest,
    ClassifyRequest,
    EmbedRequest,
    KnnRequest,
    MetadataRequest,
    ModerateRequest,
    SearchRequest,
)

MAX_EXAMPLES = 12  # per schemathesis operation
EXAMPLES_PER_ENDPOINT = 25
SECONDS_PER_REQUEST = 10.0  # generous: a loaded two-core machine; a stall shows up as tens of seconds
TOKEN = "fuzz-token"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_ENDPOINT,
    deadline=None,  # timing is asserted per request below, where a slow answer is the finding
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


class ErrorLog(logging.Handler):
    """Collects the service's error log: an unhandled exception is logged there with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    col, _ = build_collection(tmp, n=24)
    config = make_config(col, tmp, token=TOKEN, max_upload_bytes=400_000)  # room for 100,000 nested arrays
    app = create_app(config, encoder=ShapeEncoder())
    errors = ErrorLog()
    logger = logging.getLogger("clipforge.serve")
    logger.addHandler(errors)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client, errors
    logger.removeHandler(errors)


# ------------------------------------------------------------------------------------- schemathesis
def _check(case) -> None:
    response = case.call()
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert "error" in response.json(), f"{where}: {response.text[:300]}"  # every refusal is a JSON error


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    # An app of its own: schemathesis runs the app's lifespan, whose end closes the engine.
    tmp = tmp_path_factory.mktemp("schema")
    col, _ = build_collection(tmp, n=24)
    app = create_app(make_config(col, tmp, max_upload_bytes=200_000), encoder=ShapeEncoder())
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.engine.close()


def test_no_server_errors_from_the_schema(api_schema):
    # Operations are driven one by one with Hypothesis directly (schemathesis' pytest plugin does not run
    # under this pytest); a failure names the operation and the response.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    for op in operations:
        run = given(case=op.as_strategy())(_check)
        settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        )(run)()


# ------------------------------------------------------------------------------------------ strategies
PNG = shape_png("red", "circle")
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
huge_text = st.sampled_from([1999, 2000, 2001, 50_000, 300_000]).map(lambda n: "a" * n)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20), huge_text)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
b64_images = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.just(base64.b64encode(PNG).decode()),
    st.just("data:image/png;base64," + base64.b64encode(PNG).decode()),
)
field_values = st.one_of(
    json_values, b64_images, st.lists(b64_images, max_size=3), st.lists(printable, max_size=4)
)

# Each endpoint's own field names, so that bodies reach its validation and its handler, not only the parser.
FIELDS = {
    "/api/search": list(SearchRequest.model_fields),
    "/api/classify": list(ClassifyRequest.model_fields),
    "/api/moderate": list(ModerateRequest.model_fields),
    "/api/embed": list(EmbedRequest.model_fields),
    "/api/index/add": [f for f in AddRequest.model_fields if f != "paths"],
    "/knn-service": list(KnnRequest.model_fields),
    "/metadata": list(MetadataRequest.model_fields),
}


def objects(fields: list[str]) -> st.SearchStrategy[dict]:
    keys = st.sampled_from(fields) | st.text(max_size=8).filter(lambda k: k != "paths")
    return st.dictionaries(keys, field_values, max_size=5)


def deep(depth: int, wrap: bool) -> bytes:
    body = b"[" * depth + b"]" * depth
    return b'{"text": ' + body + b"}" if wrap else body


# Bodies that broke the service (deep nesting: a 500) or would stall it with a real model (huge texts), sent
# to every endpoint on every run: Hypothesis explores simple values first and may not reach them in budget.
KNOWN_BAD = [
    {"content": deep(100_000, wrap=False)},
    {"content": deep(100_000, wrap=True)},
    {"content": deep(1000, wrap=True)},
    {"content": ("[" * 50_000 + "]" * 50_000).encode("utf-16")},  # brackets the byte scan cannot see
    {"content": b'{"text": NaN, "k": Infinity, "vector": [-Infinity]}'},
    {"content": b'{"k": 1e999, "like": 123456789012345678901234567890, "id": -1}'},
    {"content": b'{"text": "' + b"a" * 300_000 + b'"}'},
    {"content": b"\xff\xfe\x00{"},
    {"data": {"labels": "[" * 20_000 + "]" * 20_000}, "files": {"image": ("x", b"\x89PNG\r\n\x1a\n")}},
]


def bodies(fields: list[str]) -> st.SearchStrategy[dict]:
    """httpx keyword arguments for one request body."""
    as_json = objects(fields).map(lambda o: {"content": json.dumps(o, allow_nan=True).encode()})
    return st.one_of(
        as_json,
        as_json,
        json_values.map(lambda v: {"content": json.dumps(v, allow_nan=True).encode()}),
        st.binary(max_size=300).map(lambda b: {"content": b}),
        st.builds(deep, st.sampled_from([1, 31, 32, 33, 1000, 100_000]), st.booleans()).map(
            lambda b: {"content": b}
        ),
        st.sampled_from(KNOWN_BAD),
        st.builds(
            lambda upload, form: {"files": {"image": ("x", upload)}, "data": form},
            st.binary(max_size=200) | st.just(PNG),
            st.dictionaries(st.sampled_from(fields), printable | huge_text, max_size=3),
        ),
    )


headers = st.fixed_dictionaries(
    {},
    optional={
        "Host": st.sampled_from(["testserver", "localhost:8000", "[::1]", "attacker.example", "a:b:c"])
        | printable,
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x"]
        )
        | printable,
        "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer nope", "Basic x"]) | printable,
    },
)
long_param = st.sampled_from([1999, 2000, 2001, 10_000]).map(lambda n: "a" * n)  # clients cap URLs near 64 kB
queries = st.dictionaries(
    st.sampled_from(["q", "k", "offset"]) | printable, printable | long_param | numbers.map(str), max_size=4
)
ids = st.one_of(
    st.integers(-5, 60).map(str),
    st.sampled_from([str(2**63), str(10**40), "-0", "1.5", "..%2F..%2Fetc%2Fpasswd"]),
    printable.map(lambda s: quote(s, safe="")),
)

# Every route of the app: (method, path with {id} for a path parameter); the coverage test below keeps this
# list in step with the app.
GETS = ["/api/search", "/healthz", "/api/info", "/metrics", "/", "/indices-list", "/openapi.json"]
BY_ID = [
    ("GET", "/api/images/{id}"),
    ("GET", "/api/thumbs/{id}"),
    ("GET", "/api/videos/{id}"),
    ("GET", "/api/items/{id}"),
    ("DELETE", "/api/index/{id}"),
]
ENDPOINTS = [("GET", p) for p in GETS] + BY_ID + [("POST", p) for p in FIELDS] + [("GET", "/static/{id}")]


def _assert_sane(r, where: str, took: float, errors: ErrorLog) -> None:
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:300]}"
    assert "Traceback" not in r.text, f"{where}: {r.text[:300]}"
    assert not errors.records, f"{where}: logged {errors.records[0].getMessage()}"
    assert took < SECONDS_PER_REQUEST, f"{where}: took {took:.1f} s"
    if r.status_code >= 400:
        assert "error" in r.json(), f"{where}: {r.text[:300]}"  # every refusal is a JSON error


def _routes(routes: list) -> set[tuple[str, str]]:
    """(method, path) of every route, looking inside included routers; a mount counts as one GET."""
    out: set[tuple[str, str]] = set()
    for r in routes:
        if hasattr(r, "original_router"):
            out |= _routes(r.original_router.routes)
        elif isinstance(r, Mount):
            out.add(("GET", r.path + "/{id}"))
        else:
            out |= {(m, r.path) for m in r.methods or () if m != "HEAD"}
    return out


def test_fuzz_list_covers_every_route(fuzz_app):
    app, _, _ = fuzz_app
    routes = _routes(app.routes) - {("GET", "/docs/oauth2-redirect")}  # FastAPI's, though /docs is off
    assert len(routes) >= 18 and routes <= set(ENDPOINTS), sorted(routes - set(ENDPOINTS))


@pytest.mark.parametrize("path", list(FIELDS))
def test_known_bad_bodies_on_every_endpoint(fuzz_app, path):
    _, client, errors = fuzz_app
    for body in KNOWN_BAD:
        errors.records.clear()
        t0 = time.monotonic()
        r = client.post(path, headers={"Authorization": f"Bearer {TOKEN}"}, **body)
        _assert_sane(r, f"POST {path} {str(body)[:100]}", time.monotonic() - t0, errors)
        assert 400 <= r.status_code < 500


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_whatever_arrives_no_5xx_no_traceback_prompt(fuzz_app, method, path):
    _, client, errors = fuzz_app
    body = bodies(FIELDS.get(path, list(SearchRequest.model_fields))) if method == "POST" else st.just({})

    @FUZZ_SETTINGS
    @given(body=body, headers=headers, query=queries, id=ids)
    def run(body: dict, headers: dict, query: dict, id: str) -> None:
        url = path.replace("{id}", id)
        errors.records.clear()  # only this request's errors count
        t0 = time.monotonic()
        r = client.request(method, url, params=query, headers=headers, **body)
        _assert_sane(r, f"{method} {url} {headers} {str(body)[:200]}", time.monotonic() - t0, errors)

    run()
