"""POST /notify/email: what arrives at the SMTP server and what is stored."""

from collections.abc import Callable
from email.utils import parsedate_to_datetime

from fastapi.testclient import TestClient

from tests.conftest import BOOKING
from tests.smtpd import ScriptedHandler, start_server


def test_cyrillic_subject_and_body_arrive_intact(client: TestClient, smtp: ScriptedHandler) -> None:
    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201, response.text
    [received] = smtp.received
    assert received.rcpt_tos == [BOOKING["email"]]
    assert received.mail_from == "noreply@coworking.test"
    raw_headers = received.raw.split(b"\r\n\r\n", 1)[0]
    assert raw_headers.isascii(), "headers must be 7-bit: RFC 2047 encoded words"
    assert b"Subject: =?utf-8?" in raw_headers
    message = received.message
    assert message["Subject"] == BOOKING["subject"]
    assert message["From"] == "Coworking <noreply@coworking.test>"
    assert message["To"] == BOOKING["email"]
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert received.raw.isascii(), "7-bit on the wire: the server need not offer 8BITMIME"
    # Text lines travel as CRLF (RFC 5322 section 2.3).
    assert message.get_content().replace("\r\n", "\n") == BOOKING["text"]
    assert parsedate_to_datetime(message["Date"]).tzinfo is not None
    assert message["Message-ID"] == response.json()["message_id"]


def test_sent_notification_is_recorded_with_its_attempt(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    created = client.post("/notify/email", json=BOOKING).json()

    stored = client.get(f"/notifications/{created['id']}").json()
    assert stored["status"] == "sent"
    assert stored["channel"] == "email"
    assert stored["recipient"] == BOOKING["email"]
    assert stored["subject"] == BOOKING["subject"]
    assert stored["text"] == BOOKING["text"]
    assert stored["attempts"] == 1
    assert stored["error_message"] is None
    assert stored["sent_at"] is not None
    [attempt] = stored["delivery_attempts"]
    assert attempt["number"] == 1
    assert attempt["outcome"] == "sent"
    assert attempt["started_at"] <= attempt["finished_at"]


def test_every_message_gets_its_own_message_id(client: TestClient, smtp: ScriptedHandler) -> None:
    for _ in range(3):
        assert client.post("/notify/email", json=BOOKING).status_code == 201

    ids = {received.message["Message-ID"] for received in smtp.received}
    assert len(ids) == 3
    assert all(mid.startswith("<") and mid.endswith("@coworking.test>") for mid in ids)


def test_notification_is_stored_as_sending_before_the_smtp_conversation(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    import threading

    smtp.gate = threading.Event()
    result: dict[str, int] = {}
    sender = threading.Thread(
        target=lambda: result.update(status=client.post("/notify/email", json=BOOKING).status_code)
    )
    sender.start()
    try:
        assert smtp.data_started.wait(5), "the message never reached DATA"
        [in_flight] = client.get("/notifications").json()["data"]
        assert in_flight["status"] == "sending"
        assert in_flight["attempts"] == 0
    finally:
        smtp.gate.set()
        sender.join(10)
    assert result["status"] == 201
    assert client.get(f"/notifications/{in_flight['id']}").json()["status"] == "sent"


def test_a_sent_attempt_records_the_servers_250(client: TestClient, smtp: ScriptedHandler) -> None:
    created = client.post("/notify/email", json=BOOKING).json()

    [attempt] = created["delivery_attempts"]
    assert (attempt["outcome"], attempt["smtp_code"]) == ("sent", 250)
    stored = client.get(f"/notifications/{created['id']}").json()
    assert stored["delivery_attempts"][0]["smtp_code"] == 250


def test_an_ascii_idn_address_goes_out_as_given(client: TestClient, smtp: ScriptedHandler) -> None:
    # The test server does not offer SMTPUTF8, like many relays.
    address = "ivan@xn--e1afmkfd.xn--p1ai"

    response = client.post("/notify/email", json={**BOOKING, "email": address})

    assert response.status_code == 201, response.text
    assert response.json()["recipient"] == address
    assert smtp.received[0].rcpt_tos == [address]
    history = client.get("/notifications", params={"recipient": address}).json()["data"]
    assert [n["id"] for n in history] == [response.json()["id"]]


def test_a_non_ascii_address_needs_a_relay_with_smtputf8(
    make_client: Callable[..., TestClient],
) -> None:
    address = "иван@пример.рф"
    plain = ScriptedHandler()
    start_server(plain)
    international = ScriptedHandler()
    start_server(international, smtputf8=True)
    try:
        refused = make_client(smtp_port=plain.port).post(
            "/notify/email", json={**BOOKING, "email": address}
        )
        accepted = make_client(smtp_port=international.port).post(
            "/notify/email", json={**BOOKING, "email": address}
        )
    finally:
        plain.stop()
        international.stop()

    assert refused.status_code == 502
    assert refused.json()["attempts"] == 1, "a permanent failure: not retried"
    assert "SMTPUTF8" in refused.json()["error_message"]
    assert plain.received == []
    assert accepted.status_code == 201, accepted.text
    assert international.received[0].rcpt_tos == [address]
