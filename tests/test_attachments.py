"""Attachments: uploaded (multipart/form-data) or inline, stored once per SHA-256, sent as
multipart/mixed over the real SMTP server, left out (and said so) on SMS, limited in size
and type, and expired when nothing refers to them."""

import base64
import hashlib
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any, cast

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

import crud
from attachments import Attachments, sanitised_filename
from config import Settings
from models import Attachment, AttachmentBlob, Notification, NotificationAttachment
from tests.conftest import BOOKING, Clock, booking_draft, drain
from tests.providers import Outbox, provider_settings
from tests.smtpd import ScriptedHandler
from worker import Worker

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PDF_NAME = "Счёт № 5 за ноябрь — переговорная «Байкал».pdf"
CSV = "дата;зал\n25.11.2026;Байкал\n".encode()
HTML_TEMPLATE = {
    "key": "invoice",
    "variables": [{"name": "room", "example": "Байкал"}],
    "content": {
        "ru": {
            "subject": "Счёт за «{{ room }}»",
            "text": "Счёт за переговорную «{{ room }}» во вложении.",
            "html": "<p>Счёт за переговорную <b>«{{ room }}»</b> во вложении.</p>",
        }
    },
}


def upload(client: TestClient, data: bytes, name: str, content_type: str) -> Any:
    return client.post("/attachments", files={"file": (name, data, content_type)})


def uploaded(client: TestClient, data: bytes = PDF, name: str = PDF_NAME) -> dict[str, Any]:
    response = upload(client, data, name, "application/pdf")
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def inline(data: bytes, name: str, content_type: str) -> dict[str, str]:
    encoded = base64.b64encode(data).decode()
    return {"filename": name, "content_type": content_type, "content": encoded}


def count(db: sessionmaker[Session], entity: Any) -> int:
    with db() as session:
        return int(session.scalar(select(func.count()).select_from(entity)) or 0)


def test_an_upload_is_hashed_and_its_bytes_stored_once(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    first = uploaded(client)
    again = uploaded(client, name="копия.pdf")

    assert first["sha256"] == again["sha256"] == hashlib.sha256(PDF).hexdigest()
    assert (first["filename"], first["size"]) == (PDF_NAME, len(PDF))
    assert first["id"] != again["id"]
    assert count(db, AttachmentBlob) == 1
    assert client.get(f"/attachments/{first['id']}").json()["filename"] == PDF_NAME
    assert client.get("/attachments/999999").status_code == 404


def test_an_html_mail_with_two_attachments_arrives_as_one_mime_tree(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    assert client.post("/templates", json=HTML_TEMPLATE).status_code == 201
    pdf = uploaded(client)
    response = client.post(
        "/notify/email",
        json={
            "email": "ivan@example.com",
            "template": "invoice",
            "data": {"room": "Байкал"},
            "attachments": [{"id": pdf["id"]}, inline(CSV, "бронь.csv", "text/csv")],
        },
    )

    assert response.status_code == 201, response.text
    assert [a["filename"] for a in response.json()["attachments"]] == [PDF_NAME, "бронь.csv"]
    [received] = smtp.received
    message = received.message
    assert message.get_content_type() == "multipart/mixed"
    body, *files = message.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert [(f.get_content_type(), f.get_filename()) for f in files] == [
        ("application/pdf", PDF_NAME),
        ("text/csv", "бронь.csv"),
    ]
    payloads = [cast(bytes, f.get_payload(decode=True)) for f in files]
    assert [hashlib.sha256(p).hexdigest() for p in payloads] == [
        hashlib.sha256(PDF).hexdigest(),
        hashlib.sha256(CSV).hexdigest(),
    ]
    # RFC 2231: the Cyrillic name as encoded parameters, not raw UTF-8 in the header.
    assert b"filename*0*=utf-8''%D0%A1%D1%87" in received.raw
    assert received.raw.isascii()


def test_a_queued_mail_with_an_attachment_is_sent_by_the_worker(
    client: TestClient,
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
) -> None:
    pdf = uploaded(client)
    response = client.post(
        "/notify/email",
        json={**BOOKING, "attachments": [{"id": pdf["id"]}]},
        headers={"Prefer": "respond-async"},
    )
    assert response.status_code == 202

    drain(make_worker())

    [received] = smtp.received
    [file] = list(received.message.iter_attachments())
    assert file.get_payload(decode=True) == PDF
    assert count(db, NotificationAttachment) == 1


def test_a_bulk_shares_its_attachment_with_every_recipient(
    client: TestClient,
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
    db: sessionmaker[Session],
) -> None:
    pdf = uploaded(client)
    emails = [f"member{i}@example.com" for i in range(3)]
    response = client.post(
        "/notify/bulk",
        json={"subject": "Счёт", "text": "Во вложении.", "emails": emails, "attachments": [pdf]},
    )
    assert response.status_code == 422  # a full description is not a reference
    response = client.post(
        "/notify/bulk",
        json={
            "subject": "Счёт",
            "text": "Во вложении.",
            "emails": emails,
            "attachments": [{"id": pdf["id"]}],
        },
    )
    assert response.status_code == 202, response.text

    drain(make_worker())

    assert sorted(r.rcpt_tos[0] for r in smtp.received) == emails
    for received in smtp.received:
        [file] = list(received.message.iter_attachments())
        assert file.get_filename() == PDF_NAME
    assert count(db, NotificationAttachment) == 3


def test_a_type_not_allowed_is_a_415_and_nothing_is_stored(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    assert upload(client, b"MZ\x90\x00", "setup.exe", "application/x-msdownload").status_code == 415
    response = client.post(
        "/notify/email",
        json={**BOOKING, "attachments": [inline(b"<svg/>", "a.svg", "image/svg+xml")]},
    )

    assert response.status_code == 415
    assert "image/svg+xml" in response.json()["detail"]
    assert (count(db, Attachment), count(db, Notification)) == (0, 0)


def test_too_big_is_a_413_for_an_upload_and_for_a_message(
    make_client: Callable[..., TestClient], db: sessionmaker[Session]
) -> None:
    client = make_client(attachment_max_message_bytes=64 * 1024)
    assert upload(client, b"x" * 200_000, "big.pdf", "application/pdf").status_code == 413
    assert upload(client, b"x" * 50_000, "under.pdf", "application/pdf").status_code == 413
    half = uploaded(client, b"y" * 30_000, "half.pdf")
    other = uploaded(client, b"z" * 30_000, "other.pdf")

    response = client.post(
        "/notify/email",
        json={**BOOKING, "attachments": [{"id": half["id"]}, {"id": other["id"]}]},
    )

    assert response.status_code == 413
    assert "ATTACHMENT_MAX_MESSAGE_BYTES" in response.json()["detail"]
    stored = count(db, Attachment)
    inline_too = client.post(
        "/notify/email",
        json={
            **BOOKING,
            "attachments": [{"id": half["id"]}, inline(b"w" * 30_000, "w.pdf", "application/pdf")],
        },
    )
    assert inline_too.status_code == 413
    assert (count(db, Notification), count(db, Attachment)) == (0, stored)


def test_an_unknown_attachment_is_a_422_naming_it(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    response = client.post("/notify/email", json={**BOOKING, "attachments": [{"id": 424242}]})

    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "attachments", "0"]
    assert count(db, Notification) == 0


def test_a_sensitive_send_refuses_attachments_and_stores_nothing(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    pdf = uploaded(client)
    body = {"email": "ivan@example.com", "subject": "Код", "text": "Код: 482913"}

    response = client.post(
        "/notify/email", json={**body, "sensitive": True, "attachments": [{"id": pdf["id"]}]}
    )

    assert response.status_code == 422
    assert "sensitive" in response.json()["detail"][0]["msg"]
    assert count(db, Notification) == 0


def test_an_attachment_that_expired_before_the_insert_is_a_422_and_nothing_is_stored(
    client: TestClient, db: sessionmaker[Session]
) -> None:
    # What the request resolved, then expired before its notification was inserted.
    draft = replace(
        booking_draft(),
        attachments=[{"id": 987654, "filename": "a.pdf", "content_type": "application/pdf"}],
    )
    with db() as session, pytest.raises(crud.AttachmentGone):
        crud.create_notification(
            session=session, draft=draft, message_id=None, queued=True, lease=timedelta(1)
        )

    assert count(db, Notification) == 0


def test_bad_base64_is_a_422(client: TestClient) -> None:
    bad = {"filename": "a.pdf", "content_type": "application/pdf", "content": "не base64"}

    response = client.post("/notify/email", json={**BOOKING, "attachments": [bad]})

    assert response.status_code == 422


def test_an_sms_only_send_refuses_attachments_and_a_fallback_says_it_left_them_out(
    make_client: Callable[..., TestClient], outbox: Outbox, smtp: ScriptedHandler
) -> None:
    client = make_client(**provider_settings(outbox))
    pdf = uploaded(client)
    refused = client.post(
        "/notify/sms",
        json={"phone": "+79161234567", "text": "Счёт", "attachments": [{"id": pdf["id"]}]},
    )
    assert refused.status_code == 422
    assert "e-mail only" in refused.text
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")

    response = client.post(
        "/notify",
        json={
            "recipient": {"email": "gone@example.com", "phone": "+79161234567"},
            "channels": ["email", "sms"],
            "subject": "Счёт",
            "text": "Счёт за переговорную.",
            "attachments": [{"id": pdf["id"]}],
        },
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["channel"] == "sms" and body["status"] == "sent"
    email, sms = body["channel_outcomes"]
    assert email["left_out"] is None
    assert sms["left_out"] == f"1 attachment(s), e-mail only: {PDF_NAME}"
    assert [r.api for r in outbox.requests] == ["sms"]


def test_a_552_for_a_message_with_attachments_is_permanent(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    pdf = uploaded(client)
    smtp.data_replies.append("552 5.3.4 Message size exceeds fixed limit")

    response = client.post("/notify/email", json={**BOOKING, "attachments": [{"id": pdf["id"]}]})

    assert response.status_code == 502
    body = response.json()
    assert (body["status"], body["attempts"]) == ("failed", 1)
    assert body["delivery_attempts"][0]["code"] == 552


def test_an_attachment_nothing_refers_to_expires_and_its_bytes_with_it(
    client: TestClient, settings: Settings, db: sessionmaker[Session]
) -> None:
    kept = uploaded(client)
    sent = client.post("/notify/email", json={**BOOKING, "attachments": [{"id": kept["id"]}]})
    assert sent.status_code == 201
    uploaded(client, name="та же копия.pdf")  # the same bytes: the blob is shared
    lonely = uploaded(client, b"%PDF-1.4 lonely", "one.pdf")
    clock = Clock()
    attachments = Attachments(settings, now=clock)

    with db() as session:
        assert attachments.expire(session=session) == 0
        clock.advance(settings.attachment_retention + 1)
        assert attachments.expire(session=session) == 2
        left = session.scalars(select(Attachment.id)).all()
        blobs = session.scalars(select(AttachmentBlob.sha256)).all()

    assert left == [kept["id"]]
    assert blobs == [kept["sha256"]]
    assert lonely["sha256"] not in blobs
    assert timedelta(seconds=settings.attachment_retention) == timedelta(days=7)


@pytest.mark.parametrize(
    ("given", "sent"),
    [
        ("../../etc/Счёт.pdf", "Счёт.pdf"),
        ("C:\\Users\\ivan\\бронь.csv", "бронь.csv"),
        ("evil\r\nBcc: x@y.z.pdf", "evilBcc: x@y.z.pdf"),
        ("...", "attachment"),
        ("й" * 300 + ".pdf", "й" * 251 + ".pdf"),
        ("и\u0306.txt", "й.txt"),
    ],
)
def test_file_names_are_sanitised(given: str, sent: str) -> None:
    assert sanitised_filename(given) == sent
