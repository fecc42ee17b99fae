"""One lifecycle: the same attempts, sent in the request or by a worker, leave the same rows
(`delivery.Deliverer.attempt` and `lifecycle.next_state` on both paths)."""

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from lifecycle import Transition
from models import DeliveryAttempt, Notification, Suppression, utcnow
from tests.conftest import BOOKING, drain
from tests.providers import Outbox, Reply, provider_settings
from tests.smtpd import ScriptedHandler
from worker import Worker

REFUSED = "550 5.7.1 Refused by policy"
TRY_LATER = "451 4.3.0 Try again later"
NO_NUMBER = {"status": "ERROR", "status_code": 207, "status_text": "Нельзя отправлять"}
BLOCKED = {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}
# What differs between two notifications by nature (ids, times, message ids), or by path
# without being state (the lease holder's name, how many writes the row has seen).
NOT_STATE = {
    "id",
    "created_at",
    "updated_at",
    "sent_at",
    "next_attempt_at",
    "leased_by",
    "lease_expires_at",
    "message_id",
    "version",
}
ATTEMPT_NOT_STATE = {"id", "notification_id", "started_at", "finished_at", "provider_message_id"}


def providers(outbox: Outbox) -> dict[str, Any]:
    # One attempt per channel in the request, as a worker makes one per claim.
    return provider_settings(outbox) | {"retry_attempts": 1}


def rows(db: sessionmaker[Session], notification_id: int) -> dict[str, Any]:
    """The notification's columns and its attempts', without what is not state."""
    with db() as session:
        notification = session.get(Notification, notification_id)
        assert notification is not None
        columns = {
            c.key: getattr(notification, c.key)
            for c in Notification.__table__.c
            if c.key not in NOT_STATE
        }
        attempts = session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.notification_id == notification_id)
            .order_by(DeliveryAttempt.number)
        )
        columns["attempts_stored"] = [
            {
                c.key: getattr(a, c.key)
                for c in DeliveryAttempt.__table__.c
                if c.key not in ATTEMPT_NOT_STATE
            }
            for a in attempts
        ]
    return columns


def script(smtp: ScriptedHandler, outbox: Outbox, smtp_replies: list[str], replies: list[Reply]):
    smtp.rcpt_replies.extend(smtp_replies)
    outbox.plan(*replies)


# The SMTP server's and the providers' replies, and what the request answers.
SCENARIOS = {
    "sent at once": ([], [], 201),
    "refused, then sent by SMS": ([REFUSED], [], 201),
    "refused on every channel": (
        [REFUSED],
        [Reply.json(200, NO_NUMBER), Reply.json(403, BLOCKED)],
        502,
    ),
    "a transient failure, left to the queue's backoff": ([TRY_LATER], [], 202),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_request_and_the_worker_leave_the_same_rows(
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
    outbox: Outbox,
    db: sessionmaker[Session],
    scenario: str,
) -> None:
    smtp_replies, provider_replies, answered = SCENARIOS[scenario]
    # A transient failure's retry is not due within the test.
    backoff = {"queue_retry_initial_wait": 600, "queue_retry_max_wait": 3600}
    client = make_client(**providers(outbox), **backoff, worker_in_api=False)
    worker = make_worker(**providers(outbox), **backoff)
    body = {
        "recipient": {"email": BOOKING["email"], "phone": "+79161234567", "telegram_chat_id": 42},
        "channels": ["email", "sms", "telegram"],
        "subject": BOOKING["subject"],
        "text": BOOKING["text"],
    }

    script(smtp, outbox, smtp_replies, provider_replies)
    in_request = client.post("/notify", json=body)
    assert in_request.status_code == answered, in_request.text
    # Before any worker runs: what the request alone left.
    sync_rows = rows(db, in_request.json()["id"])
    # The first send's refusals for good suppressed its addresses: the second must meet
    # the same replies.
    with db() as session:
        session.execute(delete(Suppression))
        session.commit()
    script(smtp, outbox, smtp_replies, provider_replies)
    queued = client.post("/notify", json=body, headers={"Prefer": "respond-async"})
    assert queued.status_code == 202, queued.text
    drain(worker)

    worker_rows = rows(db, queued.json()["id"])
    assert sync_rows == worker_rows
    assert sync_rows["attempts_stored"], "nothing was attempted"


def test_every_stored_outcome_cancel_and_resend_is_announced_to_the_hooks(
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
) -> None:
    client = make_client(worker_in_api=False)
    worker = make_worker()
    heard: list[tuple[int, str | None, bool]] = []

    def hook(transitions: Sequence[Transition]) -> None:
        heard.extend((t.notification_id, t.status, t.attempt is not None) for t in transitions)

    client.app.state.deliverer.hooks.append(hook)  # type: ignore[attr-defined]
    worker.deliverer.hooks.append(hook)
    sent = client.post("/notify/email", json=BOOKING).json()["id"]
    smtp.rcpt_replies.append(REFUSED)
    failed = client.post("/notify/email", json=BOOKING).json()["id"]
    client.post(f"/notifications/{failed}/retry")
    queued = client.post("/notify/email", json=BOOKING, headers={"Prefer": "respond-async"})
    drain(worker)
    tomorrow = (utcnow() + timedelta(days=1)).isoformat()
    later = client.post("/notify/email", json=BOOKING | {"send_at": tomorrow})
    client.post(f"/notifications/{later.json()['id']}/cancel")

    assert heard == [
        (sent, "sent", True),
        # The refusal is stored with its attempt first (a quick retry could follow), then
        # the state it leaves.
        (failed, None, True),
        (failed, "failed", False),
        (failed, "sending", False),
        (failed, "sent", True),
        (queued.json()["id"], "sent", True),
        (later.json()["id"], "cancelled", False),
    ]
