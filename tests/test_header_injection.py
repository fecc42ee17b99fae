"""No caller can add a header to the mail we send: not with raw line breaks, and not with
RFC 2047 encoded words that decode to them (CVE-2024-6923, which the interpreter this suite
runs on may or may not carry the fix for: our own check must hold either way)."""

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from email import message_from_bytes, policy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailer import MessageRenderer, _flattened, build_message
from tests.conftest import drain
from tests.smtpd import ScriptedHandler
from worker import Worker

SENDER = "Coworking <noreply@coworking.test>"


def b_word(text: str) -> str:
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


# Each would add a header, or a body of the caller's choosing, if decoded while folded.
SMUGGLING_SUBJECTS = [
    "=?utf-8?q?Invoice=0D=0AReply-To:_attacker@evil.example?=",
    "=?utf-8?q?Invoice=0D=0AFrom:_ceo@evil.example?=",
    "=?utf-8?q?Hi=0D=0AContent-Type:_text/html=0D=0A=0D=0A<a_href=3Dx>click</a>?=",
    "Invoice " + b_word("\r\nReply-To: attacker@evil.example"),
    b_word("Invoice\nBcc: all@example.com"),
    # Decoded once, it is an encoded word again.
    b_word("=?utf-8?q?x=0D=0AReply-To:_attacker@evil.example?="),
    "=?x-unknown?q?a=00b?=",
    "=?utf-8?q?a=E2=80=A8Reply-To:_x@evil.example?=",
    # A "?" inside the text: decode_header still reads it as one word.
    "=?utf-8?q?a?b=0D=0AReply-To:_x@evil.example?=",
]
SMUGGLING_ADDRESSES = [
    "=?utf-8?q?a=0D=0ABcc:_x?=@example.com",
    "=?utf-8?q?ivan?=@example.com",
    "ivan@=?utf-8?q?example.com?=",
    "=?utf-8?q?a?b=0D=0ABcc=3A_x?=@example.com",
]
# Harmless, but a reader would take it for an encoded word: it must arrive as written.
LOOKS_ENCODED = "=?utf-8?q?Invoice_=E2=84=96_5?= for =?utf-8?b?0JHQsNC50LrQsNC7?="


def assert_one_clean_message(raw: bytes) -> None:
    """Exactly the headers we write, each once, and our own body."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = [
        line.split(b":", 1)[0].lower()
        for line in head.split(b"\r\n")
        if line and not line[:1].isspace()
    ]
    assert sorted(names) == sorted(
        [
            b"from",
            b"to",
            b"subject",
            b"date",
            b"message-id",
            b"content-type",
            b"content-transfer-encoding",
            b"mime-version",
        ]
    ), head
    message = message_from_bytes(raw, policy=policy.default)
    assert message.get_content_type() == "text/plain"
    assert message["Message-ID"]
    assert "Reply-To" not in message and "Bcc" not in message


@pytest.mark.parametrize("subject", [*SMUGGLING_SUBJECTS, LOOKS_ENCODED * 4, "=?= " + "x" * 80])
def test_the_renderer_never_decodes_a_subject_into_headers(subject: str) -> None:
    # Below the validation: even a subject let through would go out as one header.
    date = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    fast = MessageRenderer(SENDER).render(
        recipient="ivan@example.com",
        subject=subject,
        text="x",
        message_id="<1@coworking.test>",
        date=date,
    )
    slow = _flattened(
        build_message(
            sender=SENDER,
            recipient="ivan@example.com",
            subject=subject,
            text="x",
            message_id="<1@x.test>",
            date=date,
        )
    )
    for raw in (fast.data, slow.data):
        assert_one_clean_message(raw)
        # Longer lines would be refolded by the email package, decoding them on the way.
        assert max(map(len, raw.split(b"\r\n\r\n")[0].split(b"\r\n"))) <= 78
        assert message_from_bytes(raw, policy=policy.default)["Subject"] == subject
    assert fast.data.replace(b"<1@coworking.test>", b"<1@x.test>") == slow.data


def post_each_path(
    client: TestClient, *, subject: str | None = None, email: str = "ivan@example.com"
) -> dict[str, Any]:
    """The same message through every way in that sends e-mail; each response."""
    message: dict[str, Any] = {"text": "Ваш код: 4711"}
    if subject is not None:
        message["subject"] = subject
    return {
        "sync": client.post("/notify/email", json={**message, "email": email}),
        "queued": client.post(
            "/notify/email",
            json={**message, "email": email},
            headers={"Prefer": "respond-async"},
        ),
        "bulk": client.post("/notify/bulk", json={**message, "emails": [email]}),
        "notify": client.post(
            "/notify", json={**message, "recipient": {"email": email}, "channels": ["email"]}
        ),
    }


@pytest.mark.parametrize("subject", SMUGGLING_SUBJECTS)
def test_a_subject_that_decodes_to_a_line_break_is_a_422_on_every_path(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, subject: str
) -> None:
    client = make_client(worker_in_api=False)

    responses = post_each_path(client, subject=subject)

    for path, response in responses.items():
        assert response.status_code == 422, (path, response.text)
        (error,) = response.json()["detail"]
        assert error["loc"][-1] == "subject", path
        assert "control characters" in error["msg"], path
    assert smtp.received == []


@pytest.mark.parametrize("email", SMUGGLING_ADDRESSES)
def test_an_encoded_word_in_an_address_is_refused_at_the_door(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler, email: str
) -> None:
    client = make_client(worker_in_api=False)

    responses = post_each_path(client, subject="Код", email=email)

    bulk = responses.pop("bulk")
    assert bulk.status_code == 422 or bulk.json()["batch"]["accepted"] == 0, bulk.text
    if bulk.status_code != 422:
        assert "encoded word" in bulk.json()["rejected"][0]["error"]
    for path, response in responses.items():
        assert response.status_code == 422, (path, response.text)
        assert "encoded word" in response.json()["detail"][0]["msg"], path
    stored = client.post("/recipients", json={"external_id": "u-1", "email": email})
    assert stored.status_code == 422
    assert smtp.received == []


def test_a_subject_that_only_looks_encoded_arrives_as_written_on_every_path(
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
) -> None:
    client = make_client(worker_in_api=False)

    responses = post_each_path(client, subject=LOOKS_ENCODED)
    drain(make_worker())

    assert [r.status_code for r in responses.values()] == [201, 202, 202, 201]
    assert len(smtp.received) == 4
    for received in smtp.received:
        assert_one_clean_message(received.raw)
        assert received.message["Subject"] == LOOKS_ENCODED
        # Ours, written whole as UTF-8 words: nothing of the caller's reaches the wire.
        assert b"Invoice" not in received.raw.split(b"\r\n\r\n")[0]


def test_the_sender_setting_is_checked_too() -> None:
    from pydantic import ValidationError

    from config import Settings

    with pytest.raises(ValidationError, match="control characters"):
        Settings(_env_file=None, email_from="=?utf-8?q?Co=0D=0ABcc:_x@evil.example?= <a@b.test>")
