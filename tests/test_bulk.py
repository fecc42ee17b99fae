"""POST /notify/bulk: one call queues a batch; invalid items are reported, not fatal."""

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

import crud
from schemas import MAX_BULK_RECIPIENTS
from tests.conftest import BOOKING, drain_in_parallel
from tests.smtpd import ScriptedHandler
from worker import Worker

CLOSURE = {
    "subject": "Зона «Open space» закрыта 26 ноября",
    "text": "Зона «Open space» закрыта на уборку 26 ноября с 18:00 до 20:00.",
}


@pytest.fixture
def queue_client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(worker_in_api=False)


def bulk(emails: list[str], **extra: Any) -> dict[str, Any]:
    return {"emails": emails, **CLOSURE, **extra}


def test_invalid_and_repeated_addresses_are_reported_and_the_rest_queued(
    queue_client: TestClient, smtp: ScriptedHandler
) -> None:
    emails = [
        "anna@example.com",
        "not-an-address",
        "Boris@Example.COM",
        "anna@example.com",
        "eve@example.com\r\nBcc: all@example.com",
        "boris@example.com",
    ]

    response = queue_client.post("/notify/bulk", json=bulk(emails))

    assert response.status_code == 202
    body = response.json()
    batch = body["batch"]
    assert (batch["requested"], batch["accepted"]) == (6, 2)
    assert batch["counts"]["queued"] == 2
    assert batch["subject"] == CLOSURE["subject"]
    rejected = {r["index"]: r["error"] for r in body["rejected"]}
    assert sorted(rejected) == [1, 3, 4, 5]
    assert rejected[3] == "duplicate of item 0"
    assert rejected[5] == "duplicate of item 2"  # the same mailbox in other letter case
    assert smtp.received == []

    history = queue_client.get("/notifications", params={"batch_id": batch["id"]}).json()
    assert sorted(n["recipient"] for n in history["data"]) == [
        "Boris@example.com",
        "anna@example.com",
    ]
    assert {n["batch_id"] for n in history["data"]} == {batch["id"]}


def test_a_batch_without_one_valid_address_is_a_422(queue_client: TestClient) -> None:
    response = queue_client.post("/notify/bulk", json=bulk(["nope", "also nope"]))

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [r["index"] for r in detail["rejected"]] == [0, 1]


@pytest.mark.parametrize(
    "body",
    [
        bulk([]),
        bulk(["a@example.com"] * (MAX_BULK_RECIPIENTS + 1)),
        bulk(["a@example.com"], subject="Line\nbreak"),
        {"emails": ["a@example.com"], "text": "no subject"},
    ],
    ids=["empty", "too-many", "subject-injection", "no-subject"],
)
def test_a_malformed_bulk_request_is_a_422(queue_client: TestClient, body: dict[str, Any]) -> None:
    assert queue_client.post("/notify/bulk", json=body).status_code == 422


def test_an_unknown_batch_is_a_404(queue_client: TestClient) -> None:
    assert queue_client.get("/batches/999").status_code == 404


def test_a_repeated_bulk_request_with_its_key_queues_nothing_more(
    queue_client: TestClient,
) -> None:
    headers = {"Idempotency-Key": "mailing-2026-11-26"}
    first = queue_client.post("/notify/bulk", json=bulk(["a@example.com", "x"]), headers=headers)
    again = queue_client.post("/notify/bulk", json=bulk(["a@example.com", "x"]), headers=headers)

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    history = queue_client.get("/notifications").json()["data"]
    assert len(history) == 1


@pytest.mark.slow
def test_ten_thousand_recipients_are_stored_in_a_few_statements_and_all_delivered(
    queue_client: TestClient,
    smtp: ScriptedHandler,
    make_worker: Callable[..., Worker],
) -> None:
    emails = [f"member{i}@example.com" for i in range(10_000)]
    engine: Engine = queue_client.app.state.session_factory.kw["bind"]  # type: ignore[attr-defined]
    inserts: list[str] = []

    def count_inserts(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO notifications"):
            inserts.append(statement)

    event.listen(engine, "before_cursor_execute", count_inserts)
    try:
        response = queue_client.post("/notify/bulk", json=bulk(emails))
    finally:
        event.remove(engine, "before_cursor_execute", count_inserts)

    assert response.status_code == 202
    batch = response.json()["batch"]
    assert batch["accepted"] == 10_000
    # One INSERT … SELECT FROM unnest per 2,000 rows, not one per row.
    assert len(inserts) == math.ceil(10_000 / crud.BATCH_INSERT_ROWS) == 5

    drain_in_parallel([make_worker(worker_batch_size=500) for _ in range(2)], timeout=300)

    delivered = Counter(r.message_id for r in smtp.received)
    assert len(delivered) == 10_000
    assert max(delivered.values()) == 1
    assert {r.rcpt_tos[0] for r in smtp.received} == set(emails)
    counts = queue_client.get(f"/batches/{batch['id']}").json()["counts"]
    assert counts == {
        "queued": 0,
        "sending": 0,
        "sent": 10_000,
        "failed": 0,
        "cancelled": 0,
        "suppressed": 0,
    }


def test_a_single_send_is_not_part_of_a_batch(queue_client: TestClient) -> None:
    sent = queue_client.post("/notify/email", json=BOOKING).json()

    assert sent["batch_id"] is None
