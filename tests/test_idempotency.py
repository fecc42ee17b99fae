"""Idempotency-Key: a repeated request answers what the first one did and sends nothing again."""

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

import idempotency
from models import IdempotencyKey, Notification, utcnow
from tests.conftest import BOOKING, Clock
from tests.smtpd import ScriptedHandler


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def notification_count(db: sessionmaker[Session]) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(Notification)) or 0


def test_a_repeat_returns_the_original_and_sends_nothing(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    first = client.post("/notify/email", json=BOOKING, headers=key("booking-42-created"))
    again = client.post("/notify/email", json=BOOKING, headers=key("booking-42-created"))

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "sent"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(smtp.received) == 1
    assert notification_count(db) == 1


def test_a_repeat_of_a_failed_send_is_the_same_502(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")

    first = client.post("/notify/email", json=BOOKING, headers=key("k-550"))
    again = client.post("/notify/email", json=BOOKING, headers=key("k-550"))

    assert (first.status_code, again.status_code) == (502, 502)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["attempts"] == 1


def test_a_repeat_of_a_queued_request_is_a_202(client: TestClient) -> None:
    async_key = {"Prefer": "respond-async", **key("k-async")}
    first = client.post("/notify/email", json=BOOKING, headers=async_key)
    again = client.post("/notify/email", json=BOOKING, headers=async_key)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["id"] == first.json()["id"]


@pytest.mark.parametrize(
    ("changed", "headers"),
    [
        ({"text": "Другой текст"}, {}),
        ({"email": "someone.else@example.com"}, {}),
        ({}, {"Prefer": "respond-async"}),
    ],
    ids=["text", "recipient", "queued"],
)
def test_the_same_key_with_another_request_is_a_422(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    changed: dict[str, str],
    headers: dict[str, str],
) -> None:
    client.post("/notify/email", json=BOOKING, headers=key("k-reused"))

    response = client.post(
        "/notify/email", json=BOOKING | changed, headers=headers | key("k-reused")
    )

    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()["detail"]
    assert len(smtp.received) == 1
    assert notification_count(db) == 1


def test_a_key_is_not_shared_between_endpoints(client: TestClient) -> None:
    client.post("/notify/email", json=BOOKING, headers=key("k-endpoint"))
    bulk = {"emails": [BOOKING["email"]], "subject": BOOKING["subject"], "text": BOOKING["text"]}

    assert client.post("/notify/bulk", json=bulk, headers=key("k-endpoint")).status_code == 422


@pytest.mark.parametrize("bad", [b"", b"has space", b"x" * 256, "ключ".encode()])
def test_a_malformed_key_is_a_422(
    client: TestClient, db: sessionmaker[Session], bad: bytes
) -> None:
    response = client.post("/notify/email", json=BOOKING, headers={b"Idempotency-Key": bad})

    assert response.status_code == 422
    assert notification_count(db) == 0


def test_fifty_simultaneous_requests_with_one_key_send_one_email(
    client: TestClient, smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    start = threading.Barrier(50)

    def post(_: int) -> httpx.Response:
        start.wait()
        return client.post("/notify/email", json=BOOKING, headers=key("k-stampede"))

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(post, range(50)))

    assert Counter(r.status_code for r in responses) == {201: 50}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 49
    assert len(smtp.received) == 1
    assert notification_count(db) == 1


def test_a_repeat_while_the_first_is_still_sending_is_a_409_then_the_original(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(idempotency_wait=0.2)
    smtp.gate = threading.Event()
    first: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: first.append(
            client.post("/notify/email", json=BOOKING, headers=key("k-slow"))
        )
    )
    sender.start()
    assert smtp.data_started.wait(5)

    during = client.post("/notify/email", json=BOOKING, headers=key("k-slow"))
    smtp.gate.set()
    sender.join(10)
    after = client.post("/notify/email", json=BOOKING, headers=key("k-slow"))

    assert during.status_code == 409
    assert during.headers["retry-after"] == "1"
    assert (first[0].status_code, after.status_code) == (201, 201)
    assert after.json()["id"] == first[0].json()["id"]
    assert len(smtp.received) == 1


def test_an_expired_key_is_free_again(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, db: sessionmaker[Session]
) -> None:
    client = make_client(idempotency_key_ttl=0.2)
    clock = Clock()
    # The deliverer's clock: what it stores and what it finds expired go by it.
    client.app.state.deliverer.now = clock  # type: ignore[attr-defined]
    first = client.post("/notify/email", json=BOOKING, headers=key("k-ttl"))
    clock.advance(0.3)

    again = client.post("/notify/email", json=BOOKING, headers=key("k-ttl"))

    assert again.status_code == 201
    assert again.json()["id"] != first.json()["id"]
    assert len(smtp.received) == 2


def test_expired_keys_are_purged_and_live_ones_kept(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    client.post("/notify/email", json=BOOKING, headers=key("k-live"))
    client.post("/notify/email", json=BOOKING, headers=key("k-old"))
    with db() as session:
        old = session.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "k-old")).one()
        old.expires_at = utcnow() - timedelta(seconds=1)
        session.commit()

        assert idempotency.purge_expired(session=session) == 1
        assert session.scalars(select(IdempotencyKey.key)).all() == ["k-live"]


def test_a_repeat_waiting_for_its_first_request_holds_no_synchronous_slot(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(sync_send_limit=2)
    smtp.gate = threading.Event()
    answers: dict[str, httpx.Response] = {}

    def post(name: str, body: dict[str, object], headers: dict[str, str]) -> None:
        answers[name] = client.post("/notify/email", json=body, headers=headers)

    def start(*args: object) -> threading.Thread:
        thread = threading.Thread(target=post, args=args)
        thread.start()
        return thread

    deliverer = client.app.state.deliverer  # type: ignore[attr-defined]
    waiting, wait = threading.Event(), deliverer.sleep

    def poll(seconds: float) -> None:  # the repeat's wait for the first one's answer
        waiting.set()
        wait(seconds)

    deliverer.sleep = poll
    threads = [start("first", BOOKING, key("k-slot"))]
    assert smtp.wait_data(1, 5)
    threads.append(start("repeat", BOOKING, key("k-slot")))
    assert waiting.wait(5), "the repeat never waited for the first one's answer"
    threads.append(start("other", {**BOOKING, "email": "anna@example.com"}, {}))
    assert smtp.wait_data(2, 5), "the other send found no synchronous slot"
    smtp.gate.set()
    for thread in threads:
        thread.join(15)

    assert answers["first"].status_code == 201
    assert answers["repeat"].status_code == 201
    assert answers["repeat"].headers["idempotent-replayed"] == "true"
    # The second slot was free for another send: sent now, not queued.
    assert answers["other"].status_code == 201
    assert len(smtp.received) == 2
