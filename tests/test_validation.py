"""Bad input is a 422 naming the field, and nothing is stored or sent."""

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import Notification
from tests.conftest import BOOKING
from tests.smtpd import ScriptedHandler


def stored_count(db: sessionmaker[Session]) -> int:
    with db() as session:
        return session.scalar(select(func.count()).select_from(Notification)) or 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("subject", "Booking confirmed\r\nBcc: everyone@example.com"),
        ("subject", "Booking confirmed\nBcc: everyone@example.com"),
        ("subject", "Booking\rconfirmed"),
        ("subject", "Tab\tinside"),
        ("subject", "Null\x00byte"),
        ("subject", "C1 control\x85here"),
        ("subject", "Line\u2028separator"),
        ("subject", "Paragraph\u2029separator"),
        ("email", "ivan@example.com\r\nBcc: everyone@example.com"),
        ("email", "ivan@example.com\nBcc: everyone@example.com"),
        ("email", "ivan@example.com, boss@example.com"),
    ],
)
def test_header_injection_is_refused_and_nothing_sent(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    field: str,
    value: str,
) -> None:
    response = client.post("/notify/email", json={**BOOKING, field: value})

    assert response.status_code == 422
    assert [error["loc"] for error in response.json()["detail"]] == [["body", field]]
    assert smtp.received == []
    assert stored_count(db) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "x", "text": "y"}, "email"),
        ({**BOOKING, "email": "not-an-address"}, "email"),
        ({**BOOKING, "email": "ivan@"}, "email"),
        ({**BOOKING, "email": 42}, "email"),
        ({**BOOKING, "subject": ""}, "subject"),
        ({**BOOKING, "subject": "   "}, "subject"),
        ({**BOOKING, "subject": "Б" * 999}, "subject"),
        ({"email": BOOKING["email"], "text": "y"}, "subject"),
        ({**BOOKING, "text": ""}, "text"),
        ({**BOOKING, "text": " \n "}, "text"),
        ({**BOOKING, "text": "x" * 100_001}, "text"),
        ({**BOOKING, "text": "bell\x07"}, "text"),
        ({**BOOKING, "text": None}, "text"),
    ],
)
def test_invalid_field_is_named_in_the_422(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    body: dict[str, Any],
    field: str,
) -> None:
    response = client.post("/notify/email", json=body)

    assert response.status_code == 422
    assert ["body", field] in [error["loc"] for error in response.json()["detail"]]
    assert smtp.received == []
    assert stored_count(db) == 0


def test_limits_are_inclusive(client: TestClient, smtp: ScriptedHandler) -> None:
    body = {**BOOKING, "subject": "Б" * 998, "text": "т" * 100_000}

    response = client.post("/notify/email", json=body)

    assert response.status_code == 201, response.text
    assert smtp.received[0].message["Subject"] == body["subject"]


def test_malformed_json_is_a_422(client: TestClient, smtp: ScriptedHandler) -> None:
    response = client.post(
        "/notify/email", content=b'{"email": ', headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert smtp.received == []
