"""STARTTLS, implicit TLS and AUTH against real TLS servers with a test CA."""

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import BOOKING, SMTP_PASSWORD, SMTP_USER
from tests.smtpd import Credentials, ScriptedHandler, start_server
from tests.test_provider_secrets import assert_no_secret

TLS = tuple[ssl.SSLContext, Path]


@pytest.fixture
def starttls_server(tls: TLS, credentials: Credentials) -> Iterator[ScriptedHandler]:
    handler = ScriptedHandler()
    controller = start_server(handler, credentials=credentials, starttls=tls[0])
    yield handler
    controller.stop()


@pytest.fixture
def implicit_tls_server(tls: TLS, credentials: Credentials) -> Iterator[ScriptedHandler]:
    handler = ScriptedHandler()
    controller = start_server(handler, credentials=credentials, implicit_tls=tls[0])
    yield handler
    controller.stop()


def secure_client(
    make_client: Callable[..., TestClient], server: ScriptedHandler, tls: TLS, **changes: object
) -> TestClient:
    settings: dict[str, object] = {
        "smtp_port": server.port,
        "smtp_user": SMTP_USER,
        "smtp_password": SMTP_PASSWORD,
        "smtp_ca_file": tls[1],
    }
    return make_client(**(settings | changes))


def test_starttls_with_auth_delivers(
    starttls_server: ScriptedHandler, make_client: Callable[..., TestClient], tls: TLS
) -> None:
    client = secure_client(make_client, starttls_server, tls, smtp_security="starttls")

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201, response.text
    [received] = starttls_server.received
    assert received.login == SMTP_USER.encode()
    assert received.message["Subject"] == BOOKING["subject"]


def test_implicit_tls_with_auth_delivers(
    implicit_tls_server: ScriptedHandler, make_client: Callable[..., TestClient], tls: TLS
) -> None:
    client = secure_client(make_client, implicit_tls_server, tls, smtp_security="ssl")

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201, response.text
    [received] = implicit_tls_server.received
    assert received.login == SMTP_USER.encode()


def test_wrong_password_is_a_permanent_535_and_never_echoed(
    starttls_server: ScriptedHandler,
    make_client: Callable[..., TestClient],
    tls: TLS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-password-Zx81"
    client = secure_client(
        make_client, starttls_server, tls, smtp_security="starttls", smtp_password=wrong
    )

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 502
    body = response.json()
    assert body["attempts"] == 1
    assert body["error_message"].startswith("535 ")
    assert body["delivery_attempts"][0]["outcome"] == "permanent_error"
    assert starttls_server.received == []
    assert wrong not in response.text
    assert wrong not in caplog.text


def test_untrusted_certificate_is_refused_without_retrying(
    starttls_server: ScriptedHandler, make_client: Callable[..., TestClient], tls: TLS
) -> None:
    client = secure_client(make_client, starttls_server, tls, smtp_security="starttls")
    untrusted = secure_client(
        make_client, starttls_server, tls, smtp_security="starttls", smtp_ca_file=None
    )

    response = untrusted.post("/notify/email", json=BOOKING)

    assert response.status_code == 502
    body = response.json()
    assert body["attempts"] == 1
    assert "certificate" in body["error_message"]
    assert starttls_server.received == []
    # The same server is fine for a client that trusts its CA.
    assert client.post("/notify/email", json=BOOKING).status_code == 201


def test_verification_can_be_switched_off_for_development(
    implicit_tls_server: ScriptedHandler, make_client: Callable[..., TestClient], tls: TLS
) -> None:
    client = secure_client(
        make_client,
        implicit_tls_server,
        tls,
        smtp_security="ssl",
        smtp_ca_file=None,
        smtp_verify_tls=False,
    )

    assert client.post("/notify/email", json=BOOKING).status_code == 201


def test_starttls_required_but_not_offered_is_permanent(
    smtp: ScriptedHandler, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(smtp_security="starttls")

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 502
    assert response.json()["attempts"] == 1
    assert "STARTTLS" in response.json()["error_message"]
    assert smtp.received == []


def test_a_reply_echoing_the_password_has_it_scrubbed_everywhere(
    starttls_server: ScriptedHandler,
    make_client: Callable[..., TestClient],
    tls: TLS,
    db: sessionmaker[Session],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = secure_client(make_client, starttls_server, tls, smtp_security="starttls")
    starttls_server.rcpt_replies.append(
        f"550 5.7.1 refused: AUTH PLAIN {SMTP_USER} {SMTP_PASSWORD.upper()}"
    )

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 502, response.text
    assert "[secret]" in response.json()["error_message"]
    texts = [response.text, client.get(f"/notifications/{response.json()['id']}").text]
    with db() as session:
        texts.append(repr(session.execute(text("SELECT * FROM delivery_attempts")).all()))
    texts += [record.getMessage() for record in caplog.records]
    assert_no_secret(texts, (SMTP_PASSWORD,))
