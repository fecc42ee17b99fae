"""A provider's error text that echoes our request never carries our secrets on: not into
a response, the history, the database or a log line."""

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tests.providers import (
    API_ID,
    TOKEN,
    Outbox,
    Reply,
    bot_api_error,
    sms_request_refusal,
    start_outbox,
)

SECRETS = (API_ID, TOKEN, TOKEN.partition(":")[2])


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with start_outbox(tmp_path / "outbox", api_id=API_ID, token=TOKEN) as outbox:
        yield outbox


@pytest.fixture
def client(make_client: Callable[..., TestClient], outbox: Outbox) -> TestClient:
    return make_client(
        sms_ru_url=outbox.url,
        sms_ru_api_id=API_ID,
        telegram_api_url=outbox.url,
        telegram_bot_token=TOKEN,
        channel_timeout=2.0,
    )


def echoes() -> list[tuple[str, dict[str, object], list[Reply]]]:
    """A request per channel, and a refusal that repeats the request back, in each form a
    server might write it (a transient one as often as it is tried)."""
    form = f"api_id={quote_plus(API_ID)}&to=79161234567&msg=Hello&json=1"
    return [
        (
            "/notify/sms",
            {"phone": "+79161234567", "text": "Hello"},
            [sms_request_refusal(202, f"Неправильно указан запрос: {form} (api_id {API_ID})")],
        ),
        (
            "/notify/telegram",
            {"chat_id": "42", "text": "Hello"},
            [
                bot_api_error(
                    400, f"Bad Request: POST /bot{TOKEN}/sendMessage (/bot{quote(TOKEN)}/) failed"
                )
            ],
        ),
        (
            "/notify/sms",
            {"phone": "+79161234567", "text": "Hello"},
            [sms_request_refusal(202, f"bad request for API_ID={API_ID.upper()}")],
        ),
        (
            "/notify/telegram",
            {"chat_id": "42", "text": "Hello"},
            # Lower-case percent-encoding; and an echo cut short.
            [bot_api_error(400, f"Bad Request: /bot{quote(TOKEN, safe='').lower()}/x")],
        ),
        (
            "/notify/telegram",
            {"chat_id": "42", "text": "Hello"},
            [bot_api_error(400, f"Bad Request: POST /bot{TOKEN[:24]}…")],
        ),
        (
            "/notify/telegram",
            {"chat_id": "42", "text": "Hello"},
            [
                Reply.json(
                    502,
                    {"ok": False, "error_code": 502, "description": f"upstream {TOKEN} timeout"},
                )
            ]
            * 3,
        ),
    ]


def test_a_provider_echoing_our_secrets_has_them_scrubbed_everywhere(
    client: TestClient,
    outbox: Outbox,
    db: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    for path, body, refusals in echoes():
        outbox.plan(*refusals)

        response = client.post(path, json=body)

        assert response.status_code in (202, 502), response.text
        assert "[secret]" in response.text
        texts.append(response.text)
        history = client.get(f"/notifications/{response.json()['id']}")
        texts.append(history.text)
    with db() as session:
        for table in ("notifications", "delivery_attempts"):
            rows = session.execute(text(f"SELECT * FROM {table}")).all()
            texts.append(repr(rows))
    texts += [record.getMessage() for record in caplog.records]

    assert any("[secret]" in t for t in texts[-len(caplog.records) :])  # logged, scrubbed
    assert_no_secret(texts, SECRETS)


def assert_no_secret(texts: list[str], secrets: tuple[str, ...]) -> None:
    """No secret in `texts`, in any letter case or encoding, nor 12 characters of one."""
    lowered = [text.lower() for text in texts]
    for secret in secrets:
        for form in (secret, quote(secret, safe="")):
            assert not [t for t in lowered if form.lower() in t], secret
        pieces = {secret[i : i + 12].lower() for i in range(len(secret) - 11)}
        assert not [t for t in lowered for piece in pieces if piece in t], secret
