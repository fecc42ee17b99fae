"""Bad input is a 422 naming the field, and nothing is stored or sent."""

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import Notification
from schemas import plain_address, validated_address
from tests.conftest import BOOKING
from tests.smtpd import ScriptedHandler, start_server


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


CONTROL = "must not contain control characters"


def json_operations(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every operation that takes a JSON body, from the OpenAPI."""
    spec = client.get("/openapi.json").json()
    return [
        (method, path)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]


@pytest.mark.parametrize(
    ("content", "content_type", "reason"),
    [
        (b'{"text": "\xff\xfe"}', "application/json", "not valid UTF-8"),
        ('{"text": "Привет"}'.encode("cp1251"), "application/json", "not valid UTF-8"),
        (
            b'{"text": "x"}',
            "application/json; charset=latin-1",
            "JSON must be UTF-8, not charset latin-1",
        ),
        (b"[" * 1000 + b"]" * 1000, "application/json", "nested deeper than 32 levels"),
        (b'{"text": "a\\u0000b"}', "application/json", CONTROL),
        (b'{"a\\u001bb": 1}', "application/json", CONTROL),
        (
            '{"text": "a\u0085b"}'.encode(),
            "application/json",
            "must not contain control characters",
        ),
        (b'{"text": ' + b"1" * 5000 + b"}", "application/json", "digits"),
        (b'{"text": NaN}', "application/json", "NaN is not a JSON value"),
        # Was read in time quadratic in its length (minutes for this one) on the event loop.
        (b'"' + b'\\"' * 100_000 + b"[" * 33, "application/json", "Unterminated string"),
    ],
    ids=[
        "bad-utf8",
        "cp1251",
        "latin-1",
        "deep",
        "nul",
        "escape-in-key",
        "raw-c1",
        "long-integer",
        "nan",
        "unterminated-with-brackets",
    ],
)
def test_a_body_that_cannot_be_read_is_a_documented_422_on_every_operation(
    client: TestClient,
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
    content: bytes,
    content_type: str,
    reason: str,
) -> None:
    spec = client.get("/openapi.json").json()
    operations = json_operations(client)
    assert len(operations) >= 8

    for method, path in operations:
        url = path.replace("{external_id}", "user-1").replace("{key_id}", "1")
        url = url.replace("{notification_id}", "1").replace("{batch_id}", "1")
        response = client.request(
            method, url, content=content, headers={"content-type": content_type}
        )

        assert response.status_code == 422, (method, path, response.text)
        (error,) = response.json()["detail"]
        assert error["type"] in ("json_invalid", "string_control")
        assert reason in error["msg"], (path, error)
        if error["type"] == "string_control":  # the field is named
            assert error["loc"] in (["body", "text"], ["body", "a\x1bb"]), error
        assert "422" in spec["paths"][path][method]["responses"]
    assert smtp.received == []
    assert stored_count(db) == 0


def test_escaped_tabs_and_line_breaks_are_content(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    # The last is an escaped backslash, then the letters u0000.
    text = b'"a\\u0009b\\u000a\\r\\nc\\\\u0000"'
    body = b'{"email": "ivan@example.com", "subject": "s", "text": ' + text + b"}"

    response = client.post(
        "/notify/email", content=body, headers={"content-type": "application/json; charset=UTF-8"}
    )

    assert response.status_code == 201, response.text
    assert smtp.received[0].message.get_content().splitlines() == ["a\tb", "", "c\\u0000"]


@pytest.mark.parametrize("item", ["a\u0000b", "a b", "x" * 129, "", "ivan/../x"])
def test_bulk_recipients_are_validated_like_every_external_id(
    client: TestClient, db: sessionmaker[Session], item: str
) -> None:
    response = client.post(
        "/notify/bulk", json={"recipients": ["user-1", item], "subject": "s", "text": "t"}
    )

    assert response.status_code == 422, response.text
    assert ["body", "recipients", 1] in [error["loc"] for error in response.json()["detail"]]
    assert stored_count(db) == 0


@pytest.mark.parametrize(
    "value", ["0.5", "1700000000", "yesterday", "2026-11-25", "25.11.2026 10:00"]
)
def test_history_times_are_iso_8601_datetimes_only(client: TestClient, value: str) -> None:
    for name in ("created_from", "created_to"):
        response = client.get("/notifications", params={name: value})

        assert response.status_code == 422, (name, value, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", name]


@pytest.mark.parametrize(
    ("local", "status"),
    [("a" * 64, 201), ("a" * 65, 422), ("я" * 32, 201), ("я" * 32 + "a", 422)],
    ids=["64-ascii", "65-ascii", "64-octets-utf8", "65-octets-utf8"],
)
def test_a_local_part_holds_at_most_64_octets(
    make_client: Callable[..., TestClient], local: str, status: int
) -> None:
    # A relay that takes SMTPUTF8, for the Cyrillic ones.
    international = ScriptedHandler()
    start_server(international, smtputf8=True)
    try:
        response = make_client(smtp_port=international.port).post(
            "/notify/email", json={**BOOKING, "email": f"{local}@example.com"}
        )
    finally:
        international.stop()

    assert response.status_code == status, response.text
    if status == 422:
        assert "64 octets" in response.json()["detail"][0]["msg"]
        assert international.received == []
    else:
        assert international.received[0].rcpt_tos == [f"{local}@example.com"]


ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-."
DOMAINS = [
    "example.com",
    "EXAMPLE.COM",
    "sub.Example.org",
    "a.b",
    "localhost",
    "a.test",
    "a.local",
    "x.invalid",
    "a.onion",
    "1.2.3.4",
    "a.123",
    "a-.com",
    "-a.com",
    "a--b.com",
    "xn--80ak6aa92e.com",
    "xn--bad.com",
    "a..com",
    ".a.com",
    "a.com.",
    "a" * 63 + ".com",
    "a" * 64 + ".com",
    ("a" * 60 + ".") * 4 + "com",
]


@settings(max_examples=3000, derandomize=True, database=None, deadline=None)
@given(
    local=st.text(alphabet=ATEXT, max_size=70),
    domain=st.sampled_from(DOMAINS) | st.from_regex(r"[A-Za-z0-9.-]{1,30}", fullmatch=True),
)
def test_the_plain_address_shortcut_agrees_with_email_validator(local: str, domain: str) -> None:
    value = f"{local}@{domain}"
    try:
        expected: str | None = validated_address(value)
    except ValueError:
        expected = None

    # The shortcut may leave an address to email-validator; it never answers otherwise.
    assert plain_address(value) in (None, expected)


def test_the_plain_address_shortcut_takes_the_usual_addresses() -> None:
    assert plain_address("Ivan.Petrov+booking@Example.COM") == "Ivan.Petrov+booking@example.com"
    assert plain_address("иван@example.com") is None
