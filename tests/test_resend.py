"""POST /notifications/{id}/retry: failed ones are sent again, sent ones are refused."""

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

import crud
import lifecycle
from models import utcnow
from tests.conftest import BOOKING
from tests.smtpd import ScriptedHandler


def failed_notification(client: TestClient, smtp: ScriptedHandler) -> dict[str, Any]:
    smtp.rcpt_replies.append("550 5.2.1 Mailbox disabled")
    response = client.post("/notify/email", json=BOOKING)
    assert response.status_code == 502
    return response.json()


def test_resend_of_a_failed_notification_adds_attempts_to_it(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    failed = failed_notification(client, smtp)

    response = client.post(f"/notifications/{failed['id']}/retry")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == failed["id"]
    assert body["status"] == "sent"
    assert body["attempts"] == 2
    assert body["error_message"] is None
    assert [(a["number"], a["outcome"]) for a in body["delivery_attempts"]] == [
        (1, "permanent_error"),
        (2, "sent"),
    ]
    [received] = smtp.received
    assert received.message["Message-ID"] == failed["message_id"]


def test_resend_that_fails_again_is_a_502(client: TestClient, smtp: ScriptedHandler) -> None:
    failed = failed_notification(client, smtp)
    smtp.data_replies.append("554 5.7.1 Still rejected")

    response = client.post(f"/notifications/{failed['id']}/retry")

    assert response.status_code == 502
    assert response.json()["status"] == "failed"
    assert response.json()["error_message"] == "554 5.7.1 Still rejected"
    assert response.json()["attempts"] == 2


def test_a_resend_gets_the_background_retries_of_a_new_notification(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(retry_attempts=1, queue_max_attempts=2)
    failed = failed_notification(client, smtp)  # one attempt, refused for good
    smtp.rcpt_replies.append("451 4.3.0 Try again later")

    response = client.post(f"/notifications/{failed['id']}/retry")

    # One of its two attempts is left after the transient failure: the queue goes on.
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"


def test_resend_of_a_sent_notification_is_a_409(client: TestClient, smtp: ScriptedHandler) -> None:
    sent = client.post("/notify/email", json=BOOKING).json()

    response = client.post(f"/notifications/{sent['id']}/retry")

    assert response.status_code == 409
    assert len(smtp.received) == 1
    assert client.get(f"/notifications/{sent['id']}").json()["attempts"] == 1


def test_resend_of_an_unknown_notification_is_a_404(client: TestClient) -> None:
    assert client.post("/notifications/424242/retry").status_code == 404


def test_simultaneous_resends_send_once(client: TestClient, smtp: ScriptedHandler) -> None:
    failed = failed_notification(client, smtp)
    smtp.gate = threading.Event()
    codes: list[int] = []

    def resend() -> None:
        codes.append(client.post(f"/notifications/{failed['id']}/retry").status_code)

    first = threading.Thread(target=resend)
    first.start()
    assert smtp.data_started.wait(5)
    resend()  # while the first resend is inside the SMTP conversation
    smtp.gate.set()
    first.join(10)

    assert sorted(codes) == [200, 409]
    assert len(smtp.received) == 1


def test_concurrent_claims_for_resend_have_one_winner(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    failed = failed_notification(client, smtp)
    barrier = threading.Barrier(8)
    wins: list[bool] = []

    def claim() -> None:
        with db() as session:
            notification = crud.get_notification(session=session, notification_id=failed["id"])
            assert notification is not None
            barrier.wait(5)
            resend = lifecycle.resent(
                notification, at=utcnow(), holder="api:test", lease=timedelta(seconds=60)
            )
            wins.append(crud.change(session=session, notification=notification, transition=resend))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert sorted(wins) == [False] * 7 + [True]
