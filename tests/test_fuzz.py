"""Schemathesis against the service's own OpenAPI schema, with PostgreSQL and SMTP behind it.

Every operation is fuzzed with a valid admin key and without one: no response may be a
5xx, every response must match the schema (status code, headers, body), and without a key
nothing but the health checks answers anything but 401, whatever the body.
"""

from collections.abc import Callable

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.core.result import Err

from tests.conftest import AUTH

EXAMPLES_PER_OPERATION = 100
OPEN = ("/healthz", "/readyz")
# What the service promises: never a 5xx, and answers as documented. (Not that every
# schema-valid body is accepted: a subject with control characters passes the JSON
# schema but is refused by validation, by design.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.mark.parametrize("authorized", [True, False], ids=["with-key", "without-key"])
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(
    make_client: Callable[..., TestClient], authorized: bool
) -> None:
    client = make_client(worker_in_api=False, max_body_bytes=64 * 1024)
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    headers = dict(AUTH) if authorized else {"Authorization": "Bearer ntf_unknown"}
    made = 0

    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case: schemathesis.Case) -> None:
            nonlocal made
            made += 1
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            if not authorized and case.operation.path not in OPEN:
                assert response.status_code == 401, response.status_code

        fuzz()

    assert made >= 1000, made
