"""Schemathesis against the service's own OpenAPI schema, with PostgreSQL, SMTP and the
SMS.ru and Bot API stand-in behind it (so fuzzed SMS and Telegram sends are really made).

Every operation is fuzzed with a valid admin key and without one: no response may be a
5xx, every response must match the schema (status code, headers, body), and without a key
nothing but the health checks and a recipient's unsubscribe link answers anything but
401, whatever the body.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Err

from tests.conftest import AUTH
from tests.providers import start_outbox

EXAMPLES_PER_OPERATION = 100
# Without a key every request but the health checks is refused by the key check, which reads
# nothing but the Authorization header: 40 per strategy (1,082 requests) run the same lines
# and branches of the service, and get the same status from each operation, as 100 do
# (measured with coverage.py).
EXAMPLES_WITHOUT_KEY = 40
OPEN = ("/healthz", "/readyz", "/unsubscribe/{token}")
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


@pytest.mark.slow
@pytest.mark.parametrize("authorized", [True, False], ids=["with-key", "without-key"])
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(
    make_client: Callable[..., TestClient], authorized: bool, tmp_path: Path
) -> None:
    outbox = start_outbox(tmp_path / "outbox")
    client = make_client(
        worker_in_api=False,
        max_body_bytes=64 * 1024,
        sms_ru_url=outbox.url,
        sms_ru_api_id="fuzz-api-id",
        telegram_api_url=outbox.url,
        telegram_bot_token="123456:fuzz-token",
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    headers = dict(AUTH) if authorized else {"Authorization": "Bearer ntf_unknown"}
    examples = EXAMPLES_PER_OPERATION if authorized else EXAMPLES_WITHOUT_KEY
    made = 0

    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()

        # Generated cases, then the schema's own examples (valid numbers and chat ids, which
        # random strings almost never are), so sends reach the providers too.
        strategies = [operation.as_strategy(), *operation.get_strategies_from_examples()]
        raw = operation.definition.raw
        if authorized and (raw.get("requestBody") or raw.get("parameters")):
            # Bodies and parameters that break the schema: each must get a documented 4xx.
            strategies.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
        for strategy in strategies:

            @given(case=strategy)
            @settings(
                max_examples=examples,
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

    outbox.stop()
    assert made >= 1000, made
    if authorized:  # the fuzzed sends got as far as the providers
        assert {request.api for request in outbox.requests} == {"sms", "telegram"}
