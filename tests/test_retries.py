"""Failures come from the SMTP server's real replies; only transient ones are retried."""

from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from tests.conftest import BOOKING
from tests.smtpd import DROP, ScriptedHandler, free_port


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        ("451 4.3.0 Mailbox temporarily unavailable", 451),
        ("421 4.3.2 Service shutting down", 421),
        ("452 4.3.1 Insufficient system storage", 452),
        (DROP, None),
    ],
)
def test_transient_failure_then_success_records_two_attempts(
    client: TestClient, smtp: ScriptedHandler, reply: str, code: int | None
) -> None:
    smtp.data_replies.append(reply)

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "sent"
    assert body["attempts"] == 2
    assert body["error_message"] is None
    first, second = body["delivery_attempts"]
    assert (first["number"], first["outcome"], first["smtp_code"]) == (1, "transient_error", code)
    assert first["error"]
    assert (second["number"], second["outcome"]) == (2, "sent")
    assert len(smtp.received) == 1


def test_transient_failure_on_rcpt_is_retried(client: TestClient, smtp: ScriptedHandler) -> None:
    smtp.rcpt_replies.append("450 4.2.0 Greylisted, try again later")

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201
    assert [a["smtp_code"] for a in response.json()["delivery_attempts"]] == [450, 250]


@pytest.mark.parametrize(
    ("replies", "where"),
    [
        ("550 5.1.1 <ivan.petrov@example.com>: Recipient address rejected", "rcpt"),
        ("553 5.1.3 Mailbox name not allowed", "rcpt"),
        ("554 5.7.1 Message rejected as spam", "data"),
    ],
)
def test_permanent_failure_is_tried_once_and_fails(
    client: TestClient, smtp: ScriptedHandler, replies: str, where: str
) -> None:
    queue = smtp.rcpt_replies if where == "rcpt" else smtp.data_replies
    queue.append(replies)
    code = int(replies[:3])

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 502
    body = response.json()
    assert body["status"] == "failed"
    assert body["attempts"] == 1
    assert body["error_message"].startswith(f"{code} ")
    [attempt] = body["delivery_attempts"]
    assert (attempt["outcome"], attempt["smtp_code"]) == ("permanent_error", code)
    assert smtp.received == []
    assert client.get(f"/notifications/{body['id']}").json()["status"] == "failed"


def test_transient_failures_outlasting_the_quick_retries_go_to_the_queue(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    smtp.data_replies.extend(["451 4.3.0 first", "451 4.3.0 second", "452 4.3.1 third"])

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["attempts"]) == ("queued", 3)
    assert body["error_message"] == "452 4.3.1 third"
    assert datetime.fromisoformat(body["next_attempt_at"]) > datetime.now(UTC)
    assert [a["smtp_code"] for a in body["delivery_attempts"]] == [451, 451, 452]
    assert smtp.received == []
    assert client.get(f"/notifications/{body['id']}").json()["status"] == "queued"


def test_transient_failures_fail_with_the_last_error_when_no_attempts_are_left(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(retry_attempts=3, queue_max_attempts=3)
    smtp.data_replies.extend(["451 4.3.0 first", "451 4.3.0 second", "452 4.3.1 third"])

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 502
    body = response.json()
    assert (body["status"], body["attempts"]) == ("failed", 3)
    assert body["error_message"] == "452 4.3.1 third"
    assert body["next_attempt_at"] is None


def test_unreachable_smtp_server_queues_with_every_attempt_recorded(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(smtp_port=free_port(), retry_attempts=4)

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["attempts"] == 4
    assert "ConnectionRefusedError" in body["error_message"]
    assert {a["outcome"] for a in body["delivery_attempts"]} == {"transient_error"}
    assert [a["number"] for a in body["delivery_attempts"]] == [1, 2, 3, 4]


def test_retrying_stops_when_the_time_budget_is_spent(
    make_client: Callable[..., TestClient],
) -> None:
    # The first wait (2 s) would end past the budget (1 s), so only one attempt is made.
    client = make_client(
        smtp_port=free_port(),
        retry_attempts=10,
        retry_initial_wait=2,
        retry_max_wait=2,
        retry_max_time=1,
    )

    body = client.post("/notify/email", json=BOOKING).json()

    assert (body["status"], body["attempts"]) == ("queued", 1)


@pytest.mark.parametrize("quit_reply", ["421 4.3.2 Going down", "554 5.3.0 Odd"])
def test_a_failed_quit_after_acceptance_is_still_sent_once(
    client: TestClient, smtp: ScriptedHandler, quit_reply: str
) -> None:
    smtp.quit_reply = quit_reply

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201
    assert response.json()["attempts"] == 1
    assert len(smtp.received) == 1
