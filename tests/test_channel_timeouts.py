"""A provider that accepts the connection and never answers (SMTP, SMS.ru, the Bot API)
costs a synchronous send its channel timeout per try, then an honest answer: the message is
queued for later (202) with the attempt's reason recorded, never a 5xx or a false 201."""

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import BOOKING
from tests.faults import StallingListener

TIMEOUT = 0.5
TRIES = 2
# The tries' timeouts, with room for a busy machine; without timeouts the send would wait
# until the listener hangs up.
PROMPT = TRIES * TIMEOUT + 2.5
HANG_UP_AFTER = 20.0


@pytest.fixture
def stalled() -> Iterator[StallingListener]:
    listener = StallingListener(hang_up_after=HANG_UP_AFTER)
    yield listener
    listener.close()


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/notify/email", BOOKING, "timed out"),
        ("/notify/sms", {"phone": "+79161234567", "text": "Код 4711"}, "no reply in time"),
        ("/notify/telegram", {"chat_id": "42", "text": "Код 4711"}, "no reply in time"),
    ],
    ids=["smtp", "sms.ru", "bot-api"],
)
def test_a_stalled_provider_is_a_prompt_202_with_the_reason_recorded(
    make_client: Callable[..., TestClient],
    stalled: StallingListener,
    path: str,
    body: dict[str, Any],
    reason: str,
) -> None:
    url = f"http://127.0.0.1:{stalled.port}"
    client = make_client(
        worker_in_api=False,
        retry_attempts=TRIES,
        smtp_port=stalled.port,
        smtp_timeout=TIMEOUT,
        sms_ru_url=url,
        sms_ru_api_id="stalled-api-id",
        telegram_api_url=url,
        telegram_bot_token="123456:stalled-token",
        channel_timeout=TIMEOUT,
    )

    started = time.monotonic()
    response = client.post(path, json=body)
    took = time.monotonic() - started

    assert took < PROMPT, took
    assert response.status_code == 202, response.text
    notification = client.get(f"/notifications/{response.json()['id']}").json()
    assert notification["status"] == "queued"
    attempts = notification["delivery_attempts"]
    assert [a["outcome"] for a in attempts] == ["transient_error"] * TRIES
    assert all(reason in (a["error"] or "") for a in attempts), attempts
