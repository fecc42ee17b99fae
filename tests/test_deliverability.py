"""Deliverability: DKIM signatures checked by dkimpy and by opendkim, one-click
unsubscribe (RFC 8058), the suppression list at acceptance and at send time, and bounces
and complaints brought back to the inbound listener by smtplib."""

import hashlib
import os
import re
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import dkim
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

import cli
import crud
import inbound
import signing
from config import Settings
from models import Channel
from signing import DkimMisconfigured, DkimSigner, new_key
from suppression import Tokens, folded
from tests.conftest import BOOKING, drain
from tests.providers import Outbox, provider_settings
from tests.smtpd import Received, ScriptedHandler
from worker import Worker

DOMAIN = "coworking.test"
BOUNCES = "bounces.coworking.test"
MARKETING = {
    "email": "Ivan.Petrov+news@Example.com",
    "subject": "Новое в «Точке»: переговорная «Байкал»",
    "text": "Открылась переговорная «Байкал» на 8 мест.",
    "category": "marketing",
}


@pytest.fixture(scope="module")
def key() -> bytes:
    return new_key()


@pytest.fixture
def signer(key: bytes) -> DkimSigner:
    return DkimSigner(domain=DOMAIN, selector="notify", private_key=key)


@pytest.fixture
def signed_client(make_client: Callable[..., TestClient], key: bytes) -> TestClient:
    return make_client(
        dkim_domain=DOMAIN,
        dkim_private_key=SecretStr(key.decode()),
        public_base_url="https://notify.coworking.test",
        bounce_domain=BOUNCES,
    )


def unsubscribe_path(received: Received) -> str:
    """The one-click URL's path, as a mail client reads it off the raw header (one line,
    no encoded words)."""
    found = re.search(
        rb"\r\nList-Unsubscribe: <(https://notify\.coworking\.test/unsubscribe/[\w.-]+)>\r\n",
        received.raw,
    )
    assert found, received.raw[:600]
    return urlsplit(found[1].decode()).path


def opendkim(message: bytes, signer: DkimSigner, tmp_path: Path) -> str:
    """opendkim's verdict on `message`, the key given as a test key file (no DNS)."""
    binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not Path(binary).exists():
        if os.environ.get("CI"):
            pytest.fail("opendkim is not installed: `make test` installs it")
        pytest.skip("opendkim is not installed (make test installs it)")
    keys = tmp_path / "keys"
    keys.write_text(f"{signer.dns_name()} {signer.dns_record()}\n")
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    done = subprocess.run(
        [binary, "-x", str(conf), "-t", "-"],
        input=message if message.endswith(b"\n") else message + b"\r\n",
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout.decode()


def test_a_received_message_verifies_with_dkimpy_and_opendkim_and_not_once_changed(
    signed_client: TestClient, smtp: ScriptedHandler, signer: DkimSigner, tmp_path: Path
) -> None:
    assert signed_client.post("/notify/email", json=MARKETING).status_code == 201
    [received] = smtp.received
    raw = received.raw
    dns = signer.resolver()

    assert raw.startswith(b"DKIM-Signature: ")
    assert dkim.verify(raw, dnsfunc=dns)
    assert "succeeded" in opendkim(raw, signer, tmp_path)
    tags = dict(
        t.strip().split("=", 1)
        for t in re.sub(r"\s+", "", received.message["DKIM-Signature"]).split(";")
        if t
    )
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "rsa-sha256",
        "relaxed/relaxed",
        DOMAIN,
        "notify",
    )
    signed = tags["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id", "mime-version", "content-type"):
        assert name in signed
    assert {"list-unsubscribe", "list-unsubscribe-post", "reply-to"} <= set(signed)

    subject = raw.index(b"\r\nSubject: ") + len(b"\r\nSubject: ")
    one_byte_subject = raw[:subject] + bytes([raw[subject] ^ 1]) + raw[subject + 1 :]
    body = raw.index(b"\r\n\r\n") + 10
    one_byte_body = raw[:body] + bytes([raw[body] ^ 1]) + raw[body + 1 :]
    for changed in (one_byte_subject, one_byte_body):
        assert not dkim.verify(changed, dnsfunc=dns)
        assert "failed" in opendkim(changed, signer, tmp_path)


def test_openssl_signs_the_same_bytes_as_dkimpy_own_rsa(signer: DkimSigner, key: bytes) -> None:
    hashed = dkim.HashThrough(hashlib.sha256(b"a canonicalised header block"))
    private = dkim.crypto.parse_pem_private_key(key)

    assert signing.openssl_sign(hashed, private) == bytes(
        signing._pure_python_sign(hashed, private)
    )


def test_start_up_refuses_a_key_it_cannot_verify_or_a_from_domain_that_does_not_align(
    make_client: Callable[..., TestClient], key: bytes, tmp_path: Path
) -> None:
    signer = DkimSigner(domain=DOMAIN, selector="notify", private_key=key)
    signer.check(f"Coworking <noreply@{DOMAIN}>")
    signer.check("Coworking <noreply@mail.coworking.test>")
    with pytest.raises(DkimMisconfigured, match="does not align"):
        signer.check("Coworking <noreply@elsewhere.test>")
    with pytest.raises(DkimMisconfigured, match="PEM"):
        DkimSigner(domain=DOMAIN, selector="notify", private_key=b"not a key")
    with pytest.raises(DkimMisconfigured, match="does not align"):
        make_client(dkim_domain="elsewhere.test", dkim_private_key=SecretStr(key.decode())).get(
            "/healthz"
        )


def test_the_dkim_record_command_prints_the_public_half(
    key: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dkim.pem"
    path.write_bytes(key)
    monkeypatch.setenv("DKIM_DOMAIN", DOMAIN)
    monkeypatch.setenv("DKIM_PRIVATE_KEY", str(path))
    monkeypatch.setenv("DATABASE_URL", "sqlite://")

    cli.main(["dkim", "record"])

    name, value = capsys.readouterr().out.splitlines()
    record = DkimSigner(domain=DOMAIN, selector="notify", private_key=key).dns_record()
    assert name == f"notify._domainkey.{DOMAIN}. IN TXT"
    assert "".join(re.findall(r'"([^"]*)"', value)) == record
    assert record.startswith("v=DKIM1; k=rsa; p=MIIB")


def test_marketing_mail_carries_one_click_unsubscribe_and_a_visible_link(
    signed_client: TestClient, smtp: ScriptedHandler
) -> None:
    signed_client.post("/notify/email", json=MARKETING)
    transactional = signed_client.post("/notify/email", json=BOOKING)
    [marketing, booking] = smtp.received

    assert marketing.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    path = unsubscribe_path(marketing)
    text = marketing.message.get_body(("plain",))
    assert (
        text is not None
        and f"Отписаться от этих писем: https://notify.coworking.test{path}" in (text.get_content())
    )
    assert "List-Unsubscribe" not in booking.message
    assert transactional.json()["category"] == "transactional"
    # VERP: each message's bounces come back to an address naming it.
    assert re.fullmatch(r"bounces\+\d+-[0-9a-f]{16}@bounces\.coworking\.test", marketing.mail_from)


def test_one_click_unsubscribes_with_any_body_and_a_get_never_does(
    signed_client: TestClient, smtp: ScriptedHandler
) -> None:
    for n in range(3):
        signed_client.post("/notify/email", json=MARKETING | {"email": f"member{n}@example.com"})
    form, empty, multipart = (unsubscribe_path(r) for r in smtp.received)
    anonymous = {"Authorization": ""}

    page = signed_client.get(form, headers=anonymous)
    assert page.status_code == 200 and '<form method="post">' in page.text
    assert signed_client.get("/suppressions").json()["data"] == []

    rfc8058 = signed_client.post(form, data={"List-Unsubscribe": "One-Click"}, headers=anonymous)
    assert rfc8058.status_code == 200
    assert signed_client.post(empty, headers=anonymous).status_code == 200
    assert (
        signed_client.post(
            multipart, files={"List-Unsubscribe": (None, "One-Click")}, headers=anonymous
        ).status_code
        == 200
    )
    assert signed_client.post(form, data={"List-Unsubscribe": "One-Click"}).status_code == 200

    rows = signed_client.get("/suppressions", params={"reason": "unsubscribe"}).json()["data"]
    assert sorted((r["address"], r["scope"]) for r in rows) == [
        ("member0@example.com", "marketing"),
        ("member1@example.com", "marketing"),
        ("member2@example.com", "marketing"),
    ]
    forged = signed_client.post(form[:-3] + "AAA", headers=anonymous)
    assert forged.status_code == 404
    assert "member0" not in forged.text


def test_an_unsubscribed_address_gets_no_marketing_but_still_its_bookings(
    signed_client: TestClient, smtp: ScriptedHandler
) -> None:
    signed_client.post("/notify/email", json=MARKETING)
    signed_client.post(unsubscribe_path(smtp.received[0]))

    # The same mailbox in another letter case, with another +tag.
    again = signed_client.post(
        "/notify/email", json=MARKETING | {"email": "ivan.petrov@example.com"}
    )
    booking = signed_client.post("/notify/email", json=BOOKING)

    assert again.status_code == 202
    assert (again.json()["status"], again.json()["error_message"]) == (
        "suppressed",
        "suppressed: unsubscribe",
    )
    assert again.json()["attempts"] == 0
    assert booking.status_code == 201
    assert len(smtp.received) == 2


def test_a_suppression_added_while_a_notification_waits_stops_it_at_send_time(
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
) -> None:
    client = make_client(worker_in_api=False)
    queued = client.post("/notify/email", json=BOOKING, headers={"Prefer": "respond-async"}).json()
    added = client.post(
        "/suppressions",
        json={"channel": "email", "address": BOOKING["email"].upper(), "detail": "asked by phone"},
    )
    assert added.status_code == 201
    assert (
        client.post(
            "/suppressions", json={"channel": "email", "address": BOOKING["email"]}
        ).status_code
        == 200
    )

    drain(make_worker())

    found = client.get(f"/notifications/{queued['id']}").json()
    assert (found["status"], found["error_message"]) == ("suppressed", "suppressed: manual")
    assert [(a["outcome"], a["error"]) for a in found["delivery_attempts"]] == [
        ("suppressed", "suppressed: manual")
    ]
    assert found["channel_outcomes"][0]["status"] == "suppressed"
    assert smtp.received == []


def test_fallback_moves_past_a_channel_suppressed_while_queued(
    make_client: Callable[..., TestClient],
    make_worker: Callable[..., Worker],
    smtp: ScriptedHandler,
    outbox: Outbox,
) -> None:
    sms = provider_settings(outbox)
    client = make_client(worker_in_api=False, **sms)
    queued = client.post(
        "/notify",
        json={
            "recipient": {"email": BOOKING["email"], "phone": "+79161234567"},
            "channels": ["email", "sms"],
            "subject": BOOKING["subject"],
            "text": BOOKING["text"],
        },
        headers={"Prefer": "respond-async"},
    ).json()
    client.post("/suppressions", json={"channel": "email", "address": BOOKING["email"]})

    drain(make_worker(**sms))

    found = client.get(f"/notifications/{queued['id']}").json()
    assert (found["status"], found["channel"]) == ("sent", "sms")
    assert [(a["channel"], a["outcome"]) for a in found["delivery_attempts"]] == [
        ("email", "suppressed"),
        ("sms", "sent"),
    ]
    assert smtp.received == []


@pytest.mark.parametrize(
    ("reply", "suppressed"),
    [
        ("550 5.1.1 <ivan.petrov@example.com>: Recipient address rejected: User unknown", True),
        ("553 5.1.3 <ivan.petrov@example.com>: Bad recipient address syntax", True),
        ("550 No such user here", True),
        ("550 relay not permitted", False),
        ("553 5.1.8 <bounces@coworking.test>: Sender address rejected", False),
        ("552 5.2.2 Mailbox full", False),
        ("550 5.7.1 Message refused by policy", False),
    ],
)
def test_a_rejected_mailbox_is_suppressed_but_a_full_one_is_not(
    client: TestClient, smtp: ScriptedHandler, reply: str, suppressed: bool
) -> None:
    smtp.rcpt_replies.append(reply)
    assert client.post("/notify/email", json=BOOKING).status_code == 502

    rows = client.get("/suppressions").json()["data"]
    assert [(r["reason"], r["address"]) for r in rows] == (
        [("hard_bounce", "ivan.petrov@example.com")] if suppressed else []
    )
    assert client.post("/notify/email", json=BOOKING).json()["status"] == (
        "suppressed" if suppressed else "sent"
    )


def test_a_refusal_after_the_recipient_was_accepted_suppresses_nothing(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    # Said to DATA, the same words are not about the mailbox (a filter, a relay).
    smtp.data_replies.append("550 5.1.1 Message refused")
    assert client.post("/notify/email", json=BOOKING).status_code == 502

    assert client.get("/suppressions").json()["data"] == []


def test_a_bulk_counts_its_suppressed_recipients_apart(client: TestClient) -> None:
    client.post("/suppressions", json={"channel": "email", "address": "b@example.com"})
    response = client.post(
        "/notify/bulk",
        json={
            "emails": ["a@example.com", "B+list@example.com", "not an address"],
            "subject": "Новости",
            "text": "Текст",
        },
    )

    body = response.json()
    assert response.status_code == 202
    assert body["batch"]["accepted"] == 1
    assert [(r["index"], r["error"]) for r in body["suppressed"]] == [(1, "suppressed: manual")]
    assert [r["index"] for r in body["rejected"]] == [2]


@pytest.fixture
def listener(settings: Settings, db: sessionmaker[Session]) -> Iterator[tuple[int, Tokens]]:
    """The inbound listener on a free port, for the VERP addresses of BOUNCES."""
    changed = settings.model_copy(update={"bounce_domain": BOUNCES})
    tokens = Tokens.from_settings(changed)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = inbound.start_listener(changed, session_factory=db, tokens=tokens, port=port)
    yield port, tokens
    controller.stop()


def deliver_report(port: int, to: str, report: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("", [to], report)
        return smtp.noop()


DSN = """\
From: MAILER-DAEMON@mx.example.com (Mail Delivery System)
To: {verp}
Subject: Undelivered Mail Returned to Sender
Date: Thu, 03 Dec 2026 14:00:00 +0000
Message-Id: <20261203140000.ABC123@mx.example.com>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="ABC123.1764770400/mx.example.com"

--ABC123.1764770400/mx.example.com
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.com.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<ivan.petrov@example.com>: host mx.example.com[192.0.2.1] said: 550 5.1.1
    <ivan.petrov@example.com>: Recipient address rejected: User unknown

--ABC123.1764770400/mx.example.com
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.com
X-Postfix-Queue-ID: ABC123
Arrival-Date: Thu, 03 Dec 2026 13:59:59 +0000

Final-Recipient: rfc822; ivan.petrov@example.com
Original-Recipient: rfc822;ivan.petrov@example.com
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.com
Diagnostic-Code: smtp; 550 {status} <ivan.petrov@example.com>: Recipient
    address rejected: User unknown

--ABC123.1764770400/mx.example.com
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <{verp}>
From: Coworking <noreply@coworking.test>
To: ivan.petrov@example.com
Subject: Booking confirmed

--ABC123.1764770400/mx.example.com--
"""

ARF = """\
From: feedback@fbl.example.net
To: abuse@coworking.test
Subject: Email Feedback Report
Date: Thu, 03 Dec 2026 15:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report;
\tboundary="part1_13d.2e68ed54_boundary"

--part1_13d.2e68ed54_boundary
Content-Type: text/plain; charset="US-ASCII"

This is an email abuse report for an email message received from IP 192.0.2.10.

--part1_13d.2e68ed54_boundary
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1
Original-Mail-From: <{verp}>
Original-Rcpt-To: <ivan.petrov@example.com>
Arrival-Date: Thu, 03 Dec 2026 14:59:00 +0000
Source-IP: 192.0.2.10

--part1_13d.2e68ed54_boundary
Content-Type: text/rfc822-headers

From: Coworking <noreply@coworking.test>
To: ivan.petrov@example.com
Subject: Booking confirmed

--part1_13d.2e68ed54_boundary--
"""


def as_wire(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def test_a_dsn_marks_the_attempt_bounced_and_suppresses_once(
    make_client: Callable[..., TestClient],
    smtp: ScriptedHandler,
    listener: tuple[int, Tokens],
) -> None:
    port, tokens = listener
    client = make_client(bounce_domain=BOUNCES)
    sent = client.post("/notify/email", json=BOOKING).json()
    verp = smtp.received[0].mail_from
    assert tokens.read_bounce(verp) == sent["id"]

    # RFC 3464 lets a comment follow the status code.
    report = as_wire(DSN.format(verp=verp, action="failed", status="5.1.1 (user unknown)"))
    deliver_report(port, verp, report)
    deliver_report(port, verp, report)  # a repeat
    delayed = as_wire(DSN.format(verp=verp, action="delayed", status="4.4.1"))
    deliver_report(port, verp, delayed)
    # A feedback report that is no complaint changes nothing.
    not_spam = as_wire(
        ARF.format(verp=verp).replace("Feedback-Type: abuse", "Feedback-Type: not-spam")
    )
    deliver_report(port, "abuse@coworking.test", not_spam)

    found = client.get(f"/notifications/{sent['id']}").json()
    [attempt] = found["delivery_attempts"]
    assert (attempt["outcome"], attempt["code"]) == ("bounced", 550)
    assert attempt["error"].startswith("5.1.1 smtp; 550 5.1.1 (user unknown) <ivan.petrov@")
    [row] = client.get("/suppressions").json()["data"]
    assert (row["reason"], row["address"], row["notification_id"]) == (
        "hard_bounce",
        "ivan.petrov@example.com",
        sent["id"],
    )
    reports = client.get("/inbound-reports").json()
    assert [r["status"] for r in reports["data"]] == ["ignored", "ignored", "ignored", "matched"]
    assert reports["counts"] == {"matched": 1, "ignored": 3}


def test_an_arf_complaint_marks_the_attempt_and_suppresses_the_address(
    make_client: Callable[..., TestClient],
    smtp: ScriptedHandler,
    listener: tuple[int, Tokens],
) -> None:
    port, _ = listener
    client = make_client(bounce_domain=BOUNCES)
    sent = client.post("/notify/email", json=BOOKING).json()
    verp = smtp.received[0].mail_from

    # A feedback loop writes to its own address: the report names us inside.
    deliver_report(port, "abuse@coworking.test", as_wire(ARF.format(verp=verp)))

    found = client.get(f"/notifications/{sent['id']}").json()
    assert found["delivery_attempts"][0]["outcome"] == "complained"
    [row] = client.get("/suppressions").json()["data"]
    assert (row["reason"], row["scope"]) == ("complaint", "all")
    assert client.post("/notify/email", json=BOOKING).json()["status"] == "suppressed"


def test_a_report_the_listener_cannot_read_is_kept_for_an_operator(
    client: TestClient, listener: tuple[int, Tokens], db: sessionmaker[Session]
) -> None:
    port, tokens = listener
    junk = b"From: someone@example.net\r\nSubject: out of office\r\n\r\nI am away.\r\n"
    unknown = as_wire(
        DSN.format(verp=f"bounces+1-{'0' * 16}@{BOUNCES}", action="failed", status="5.1.1")
    )
    deliver_report(port, f"bounces+7-deadbeef@{BOUNCES}", junk)
    deliver_report(port, f"bounces+1-{'0' * 16}@{BOUNCES}", unknown)

    reports = client.get("/inbound-reports").json()
    assert reports["counts"] == {"unparseable": 1, "unmatched": 1}
    unmatched, unparseable = reports["data"]
    assert (unparseable["status"], unparseable["size"]) == ("unparseable", len(junk))
    assert "not a report" in unparseable["detail"]
    assert unmatched["status"] == "unmatched"
    only = client.get("/inbound-reports", params={"status": "unparseable"}).json()["data"]
    assert [r["id"] for r in only] == [unparseable["id"]]
    assert client.get("/suppressions").json()["data"] == []


def test_addresses_fold_as_one_mailbox() -> None:
    assert folded(Channel.EMAIL, "Ivan.Petrov+news@Example.COM") == "ivan.petrov@example.com"
    assert folded(Channel.EMAIL, "info@пример.рф") == folded(
        Channel.EMAIL, "info@xn--e1afmkfd.xn--p1ai"
    )
    assert folded(Channel.SMS, "+79161234567") == "+79161234567"


def test_tokens_name_what_they_were_made_for_and_nothing_else() -> None:
    tokens = Tokens(b"k" * 32, base_url="https://n.test/", bounce_domain=BOUNCES)
    other = Tokens(b"j" * 32, base_url="https://n.test/", bounce_domain=BOUNCES)
    token = tokens.unsubscribe_token(Channel.EMAIL, "A+x@Example.com", "marketing")

    found = tokens.read_unsubscribe(token)
    assert found is not None and (found.address, found.scope) == ("a@example.com", "marketing")
    assert other.read_unsubscribe(token) is None
    verp = tokens.bounce_address(42)
    assert verp is not None and tokens.read_bounce(verp.upper()) == 42
    assert other.read_bounce(verp) is None
    assert tokens.read_bounce(f"bounces+43-{verp.split('-')[1]}") is None
    # Odd local parts are not ours, never an error.
    for odd in ("bounces+²-00@b.test", "bounces+42-ключ@b.test", "bounces@b.test", "@"):
        assert tokens.read_bounce(odd) is None


def test_a_transactional_template_that_opts_in_offers_unsubscribe_from_itself_alone(
    signed_client: TestClient, smtp: ScriptedHandler
) -> None:
    created = signed_client.post(
        "/templates",
        json={
            "key": "room_reminder",
            "unsubscribe": True,
            "variables": [],
            "content": {"ru": {"subject": "Напоминание о брони", "text": "Бронь через час."}},
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["unsubscribe"] is True
    reminder = {"email": BOOKING["email"], "template": "room_reminder"}
    signed_client.post("/notify/email", json=reminder)
    signed_client.post(unsubscribe_path(smtp.received[0]))

    again = signed_client.post("/notify/email", json=reminder).json()
    booking = signed_client.post("/notify/email", json=BOOKING).json()

    [row] = signed_client.get("/suppressions").json()["data"]
    assert row["scope"] == "category:room_reminder"
    assert (again["status"], again["category"]) == ("suppressed", "transactional")
    assert booking["status"] == "sent"
    assert "List-Unsubscribe" not in smtp.received[-1].message


def test_an_expired_suppression_lifts_and_a_new_one_replaces_it(client: TestClient) -> None:
    past = "2026-01-01T00:00:00+00:00"
    expired = {"channel": "email", "address": BOOKING["email"], "expires_at": past}
    assert client.post("/suppressions", json=expired).status_code == 201

    assert client.post("/notify/email", json=BOOKING).json()["status"] == "sent"
    again = client.post("/suppressions", json={"channel": "email", "address": BOOKING["email"]})
    assert (again.status_code, again.json()["expires_at"]) == (201, None)
    assert client.post("/notify/email", json=BOOKING).json()["status"] == "suppressed"


def test_old_inbound_reports_are_forgotten(
    client: TestClient, listener: tuple[int, Tokens], db: sessionmaker[Session]
) -> None:
    port, _ = listener
    deliver_report(port, f"bounces+7-deadbeef@{BOUNCES}", b"Subject: hi\r\n\r\nhello\r\n")
    [kept] = client.get("/inbound-reports").json()["data"]
    received = datetime.fromisoformat(kept["received_at"])

    with db() as session:
        assert crud.forget_reports(session=session, before=received) == 0
        assert crud.forget_reports(session=session, before=received + timedelta(seconds=1)) == 1
    assert client.get("/inbound-reports").json()["data"] == []
