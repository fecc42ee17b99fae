"""Pooled SMTP connections: reused, bounded, checked, replaced when broken, closed at the end."""

import logging
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from config import Settings
from mailer import SMTPMailer, TransientDeliveryError, build_message
from main import create_app
from models import utcnow
from tests.conftest import AUTH, BOOKING
from tests.faults import wait_for
from tests.smtpd import ScriptedHandler


@pytest.fixture
def make_mailer(smtp: ScriptedHandler) -> Iterator[Callable[..., SMTPMailer]]:
    mailers: list[SMTPMailer] = []

    def make(**options: Any) -> SMTPMailer:
        mailers.append(SMTPMailer(host="127.0.0.1", port=smtp.port, **options))
        return mailers[-1]

    yield make
    for mailer in mailers:
        mailer.close()


def message(n: int = 0) -> EmailMessage:
    return build_message(
        sender="noreply@coworking.test",
        recipient=f"member{n}@example.com",
        subject="Напоминание о бронировании",
        text="Через час начинается ваша бронь.",
        message_id=f"<pool-{n}@coworking.test>",
        date=utcnow(),
    )


def test_consecutive_messages_share_one_connection(
    make_mailer: Callable[..., SMTPMailer], smtp: ScriptedHandler
) -> None:
    mailer = make_mailer(pool_size=4)

    for n in range(5):
        mailer.send(message(n))

    assert len(smtp.received) == 5
    assert len({r.peer for r in smtp.received}) == 1


def test_no_more_connections_than_the_pool_size(
    make_mailer: Callable[..., SMTPMailer], smtp: ScriptedHandler
) -> None:
    mailer = make_mailer(pool_size=2)
    smtp.gate = threading.Event()
    senders = [threading.Thread(target=mailer.send, args=(message(n),)) for n in range(6)]
    for sender in senders:
        sender.start()
    # All six try to get a connection: two are in DATA, four wait for one.
    assert smtp.wait_data(2, 5)
    wait_for(lambda: mailer.waiting == 4, 5, "four sends to wait for a connection")
    smtp.gate.set()
    for sender in senders:
        sender.join(10)

    assert len(smtp.received) == 6
    assert len({r.peer for r in smtp.received}) == 2


def test_waiting_too_long_for_a_connection_is_a_transient_failure(
    make_mailer: Callable[..., SMTPMailer], smtp: ScriptedHandler
) -> None:
    mailer = make_mailer(pool_size=1, pool_timeout=0.3)
    smtp.gate = threading.Event()
    first = threading.Thread(target=mailer.send, args=(message(1),))
    first.start()
    assert smtp.data_started.wait(5)

    with pytest.raises(TransientDeliveryError, match="busy"):
        mailer.send(message(2))
    smtp.gate.set()
    first.join(10)


@pytest.mark.parametrize(
    ("check_idle_after", "failed_on_the_dead_one"),
    [(0.0, False), (60.0, True)],
    ids=["noop-check", "no-check"],
)
def test_a_connection_dropped_while_idle_is_replaced_without_a_failure(
    make_mailer: Callable[..., SMTPMailer],
    smtp: ScriptedHandler,
    caplog: pytest.LogCaptureFixture,
    check_idle_after: float,
    failed_on_the_dead_one: bool,
) -> None:
    # With the NOOP check the dead connection is noticed before sending; without it the
    # send fails on it and goes again on a fresh connection.
    caplog.set_level(logging.INFO, logger="mailer")
    mailer = make_mailer(check_idle_after=check_idle_after)
    mailer.send(message(1))
    smtp.go_down()
    smtp.come_back()

    mailer.send(message(2))

    assert len(smtp.received) == 2
    assert smtp.received[0].peer != smtp.received[1].peer
    assert ("reused SMTP connection failed" in caplog.text) is failed_on_the_dead_one


def test_a_421_on_a_reused_connection_is_retried_once_on_a_fresh_one(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    client.post("/notify/email", json=BOOKING)
    smtp.data_replies.append("421 4.3.2 Too many messages on this connection")

    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201
    assert [a["outcome"] for a in response.json()["delivery_attempts"]] == ["sent"]
    assert len(smtp.received) == 2
    assert smtp.received[0].peer != smtp.received[1].peer


def test_a_refusal_on_a_reused_connection_is_not_retried_and_the_connection_is_kept(
    client: TestClient, smtp: ScriptedHandler
) -> None:
    client.post("/notify/email", json=BOOKING)
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")

    refused = client.post("/notify/email", json=BOOKING)
    client.post("/notify/email", json=BOOKING)

    assert refused.status_code == 502
    assert refused.json()["attempts"] == 1
    assert len(smtp.received) == 2
    assert len({r.peer for r in smtp.received}) == 1


def test_a_fresh_connection_that_fails_counts_as_an_attempt(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    client = make_client(retry_attempts=1)
    client.post("/notify/email", json=BOOKING)
    smtp.go_down()

    response = client.post("/notify/email", json=BOOKING)

    body = response.json()
    assert (response.status_code, body["status"], body["attempts"]) == (202, "queued", 1)
    assert "ConnectionRefusedError" in body["error_message"]


def test_without_reuse_every_message_has_its_own_connection(
    make_mailer: Callable[..., SMTPMailer], smtp: ScriptedHandler
) -> None:
    mailer = make_mailer(max_idle=0)

    mailer.send(message(1))
    mailer.send(message(2))

    assert smtp.received[0].peer != smtp.received[1].peer
    assert smtp.quits == 2


def test_idle_connections_say_quit_at_shutdown(
    settings: Settings, db: sessionmaker[Session], smtp: ScriptedHandler
) -> None:
    with TestClient(create_app(settings), headers=AUTH) as client:
        client.post("/notify/email", json=BOOKING)
        assert smtp.quits == 0

    assert smtp.quits == 1
