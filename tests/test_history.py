"""GET /notifications: filters, newest first, keyset pages without duplicates or gaps."""

import threading
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from models import Channel, Notification, NotificationStatus

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def add(db: sessionmaker[Session], **fields: Any) -> Notification:
    """Store a notification directly, as the service would have after a send."""
    values: dict[str, Any] = {
        "channel": Channel.EMAIL,
        "recipient": "anna@example.com",
        "subject": "Напоминание о бронировании",
        "text": "Через час начинается ваша бронь.",
        "status": NotificationStatus.SENT,
        "attempts": 1,
        "created_at": T0,
    }
    notification = Notification(**(values | fields))
    with db() as session:
        session.add(notification)
        session.commit()
    return notification


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


def walk(client: TestClient, limit: int, **params: Any) -> list[int]:
    """Every id, following next_cursor to the end."""
    seen: list[int] = []
    cursor = None
    while True:
        page = client.get("/notifications", params={**params, "limit": limit, "cursor": cursor})
        seen += ids(page)
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return seen


def test_newest_first_with_id_breaking_ties(client: TestClient, db: sessionmaker[Session]) -> None:
    old = add(db, created_at=T0)
    tie_a = add(db, created_at=T0 + timedelta(hours=1))
    tie_b = add(db, created_at=T0 + timedelta(hours=1))
    new = add(db, created_at=T0 + timedelta(hours=2))

    assert ids(client.get("/notifications")) == [new.id, tie_b.id, tie_a.id, old.id]


def test_filters(client: TestClient, db: sessionmaker[Session]) -> None:
    anna_sent = add(db, recipient="anna@example.com", created_at=T0)
    anna_failed = add(
        db, recipient="anna@example.com", status=NotificationStatus.FAILED, created_at=T0
    )
    boris_sent = add(db, recipient="boris@example.com", created_at=T0 + timedelta(days=1))
    boris_late = add(db, recipient="boris@example.com", created_at=T0 + timedelta(days=2))

    assert ids(client.get("/notifications", params={"recipient": "anna@example.com"})) == [
        anna_failed.id,
        anna_sent.id,
    ]
    assert ids(client.get("/notifications", params={"recipient": "anna@EXAMPLE.com"})) == [
        anna_failed.id,
        anna_sent.id,
    ]
    assert ids(client.get("/notifications", params={"status": "failed"})) == [anna_failed.id]
    window = {"created_from": "2026-11-02T09:00:00Z", "created_to": "2026-11-03T09:00:00+00:00"}
    assert ids(client.get("/notifications", params=window)) == [boris_sent.id]
    assert ids(client.get("/notifications", params={"created_from": "2026-11-03T09:00:00"})) == [
        boris_late.id
    ]
    both = {"recipient": "boris@example.com", "created_to": "2026-11-03T09:00:00Z"}
    assert ids(client.get("/notifications", params=both)) == [boris_sent.id]


def test_pages_cover_everything_once(client: TestClient, db: sessionmaker[Session]) -> None:
    stored = [add(db, created_at=T0 + timedelta(minutes=i % 5)) for i in range(23)]
    expected = [n.id for n in sorted(stored, key=lambda n: (n.created_at, n.id), reverse=True)]

    assert walk(client, limit=5) == expected
    assert walk(client, limit=23) == expected
    assert walk(client, limit=200) == expected


def test_paging_keeps_the_filter(client: TestClient, db: sessionmaker[Session]) -> None:
    wanted = [
        add(db, status=NotificationStatus.FAILED, created_at=T0 + timedelta(minutes=i)).id
        for i in range(7)
    ]
    for i in range(7):
        add(db, created_at=T0 + timedelta(minutes=i))

    assert walk(client, limit=3, status="failed") == wanted[::-1]


def test_no_duplicates_or_gaps_while_new_rows_arrive(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    before = [add(db, created_at=T0 + timedelta(seconds=i)).id for i in range(60)]
    stop = threading.Event()
    arrived: list[int] = []
    clock = count(1)

    def keep_inserting() -> None:
        while not stop.is_set():
            arrived.append(
                add(db, created_at=datetime.now(UTC) + timedelta(seconds=next(clock))).id
            )

    writer = threading.Thread(target=keep_inserting)
    writer.start()
    try:
        cursor = None
        seen: list[int] = []
        first = True
        while first or cursor is not None:
            first = False
            page = client.get("/notifications", params={"limit": 7, "cursor": cursor})
            seen += ids(page)
            cursor = page.json()["next_cursor"]
    finally:
        stop.set()
        writer.join()

    assert arrived, "the writer never got a row in"
    assert len(seen) == len(set(seen)), "a row was returned twice"
    older = [i for i in seen if i in set(before)]
    assert older == before[::-1], "a row that existed before paging started was skipped"


def test_detail_and_unknown_id(client: TestClient, db: sessionmaker[Session]) -> None:
    stored = add(db)

    assert client.get(f"/notifications/{stored.id}").json()["delivery_attempts"] == []
    assert client.get("/notifications/999999").status_code == 404
    assert client.get("/notifications/abc").status_code == 422


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"status": "delivered"},
        {"cursor": "not-a-cursor"},
        {"cursor": "WzEsIDJd"},
        # {"created_at": "2026-11-01T09:00:00", "id": 5}: no offset
        {"cursor": "eyJjcmVhdGVkX2F0IjoiMjAyNi0xMS0wMVQwOTowMDowMCIsImlkIjo1fQ"},
        {"created_from": "yesterday"},
        {"unknown": "1"},
    ],
)
def test_bad_query_is_a_422(client: TestClient, params: dict[str, Any]) -> None:
    response = client.get("/notifications", params=params)

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"
