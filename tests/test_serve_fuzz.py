"""Fuzz every operation of the service's OpenAPI schema with schemathesis: whatever it sends, no 5xx.

Bounded (a few examples per operation, well under a minute). Writes stay disabled (no token), so the fuzzer
meets the 403 path of /api/index/* and cannot add server files to the collection.
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from test_serve_api import ShapeEncoder, build_collection, make_config  # noqa: E402

from clipforge.serve import create_app  # noqa: E402

MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    col, _ = build_collection(tmp, n=24)
    app = create_app(make_config(col, tmp, max_upload_bytes=200_000), encoder=ShapeEncoder())
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    app.state.engine.close()


def _check(case) -> None:
    response = case.call()
    where = f"{case.method} {case.formatted_path}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert "error" in response.json(), f"{where}: {response.text[:300]}"  # every refusal is a JSON error


def test_no_server_errors(api_schema):
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
