"""SMS, Telegram, recipients and fallback through the API, against the SMS.ru and Bot API
stand-in (a real HTTP server on loopback) and the test SMTP server."""

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import BOOKING, drain
from tests.providers import Outbox, Reply, provider_settings
from tests.smtpd import ScriptedHandler
from worker import Worker

CODE = "Код подтверждения: 482913. Никому его не сообщайте."
MEMBER = {
    "external_id": "user-42",
    "email": "Ivan.Petrov@Example.COM",
    "phone": "8 (916) 123-45-67",
    "telegram_chat_id": 123456789,
    "locale": "ru-RU",
}
BLOCKED = {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}
NO_NUMBER = {
    "status": "ERROR",
    "status_code": 207,
    "status_text": "На этот номер нельзя отправлять сообщения",
}


@pytest.fixture
def client(make_client: Callable[..., TestClient], outbox: Outbox) -> TestClient:
    return make_client(**provider_settings(outbox))


@pytest.fixture
def worker(make_worker: Callable[..., Worker], outbox: Outbox) -> Worker:
    return make_worker(**provider_settings(outbox), fallback_after_attempts=2)


def sms_requests(outbox: Outbox) -> list[dict[str, Any]]:
    return [r.fields for r in outbox.requests if r.api == "sms"]


def telegram_requests(outbox: Outbox) -> list[dict[str, Any]]:
    return [r.fields for r in outbox.requests if r.api == "telegram"]


def test_an_sms_is_sent_to_the_normalised_number(client: TestClient, outbox: Outbox) -> None:
    response = client.post("/notify/sms", json={"phone": "8 (916) 123-45-67", "text": CODE})

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["channel"], body["recipient"], body["status"]) == ("sms", "+79161234567", "sent")
    [attempt] = body["delivery_attempts"]
    assert (attempt["channel"], attempt["outcome"], attempt["code"]) == ("sms", "sent", 100)
    assert attempt["provider_message_id"]
    assert attempt["smtp_code"] is None
    [sent] = sms_requests(outbox)
    assert (sent["to"], sent["msg"]) == ("79161234567", CODE)


def test_a_cyrillic_sms_counts_70_characters_per_segment(
    client: TestClient, outbox: Outbox
) -> None:
    one = client.post("/notify/sms", json={"phone": "+79161234567", "text": "Ж" * 70}).json()
    two = client.post("/notify/sms", json={"phone": "+79161234567", "text": "Ж" * 71}).json()
    latin = client.post("/notify/sms", json={"phone": "+79161234567", "text": "a" * 160}).json()

    assert one["delivery_attempts"][0]["segments"] == 1
    assert two["delivery_attempts"][0]["segments"] == 2
    assert latin["delivery_attempts"][0]["segments"] == 1


@pytest.mark.parametrize("phone", ["12345", "+7 916 123", "not a number", "+1 555 0100"])
def test_an_invalid_phone_number_is_a_422(client: TestClient, phone: str) -> None:
    response = client.post("/notify/sms", json={"phone": phone, "text": CODE})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "phone"]


@pytest.mark.parametrize("chat_id", [0, "0", "-0", "0123", "@news", "@1news", "news", True])
def test_a_chat_id_no_chat_can_have_is_a_422(
    client: TestClient, outbox: Outbox, chat_id: object
) -> None:
    response = client.post("/notify/telegram", json={"chat_id": chat_id, "text": "Привет"})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "chat_id"]
    assert not outbox.requests


def test_a_telegram_message_is_sent_without_parse_mode_unless_asked(
    client: TestClient, outbox: Outbox
) -> None:
    plain = client.post("/notify/telegram", json={"chat_id": 123456789, "text": "Привет"})
    html = client.post(
        "/notify/telegram",
        json={"chat_id": "123456789", "text": "<b>Привет</b>", "parse_mode": "HTML"},
    )

    assert (plain.status_code, html.status_code) == (201, 201), plain.text
    assert plain.json()["recipient"] == "123456789"
    first, second = telegram_requests(outbox)
    assert "parse_mode" not in first
    assert second["parse_mode"] == "HTML"


def test_a_telegram_text_over_4096_characters_is_a_422(client: TestClient) -> None:
    response = client.post("/notify/telegram", json={"chat_id": 1, "text": "я" * 4097})
    asked = client.post(
        "/notify",
        json={"recipient": {"telegram_chat_id": 1}, "channels": ["telegram"], "text": "я" * 4097},
    )

    bulk = client.post(
        "/notify/bulk",
        json={"recipients": ["user-1"], "channels": ["telegram", "email"], "text": "я" * 4097},
    )

    assert (response.status_code, asked.status_code, bulk.status_code) == (422, 422, 422)
    for refused in (response, asked, bulk):
        assert refused.json()["detail"][0]["loc"] == ["body", "text"]


def test_a_long_text_skips_telegram_in_an_order_the_caller_did_not_give(
    client: TestClient, smtp: ScriptedHandler, outbox: Outbox
) -> None:
    client.post("/recipients", json={**MEMBER, "channels": ["telegram", "email"]})
    letter = {"subject": "Правила коворкинга", "text": "Правило. " * 600}

    response = client.post("/notify", json={"recipient": {"external_id": "user-42"}, **letter})

    assert response.status_code == 201, response.text
    assert response.json()["skipped"] == [{"channel": "telegram", "reason": "text too long"}]
    assert response.json()["channel"] == "email"
    assert not telegram_requests(outbox)


def test_a_channel_without_settings_is_a_422_naming_it(
    make_client: Callable[..., TestClient],
) -> None:
    # SMTP_HOST is set (production): no stand-ins, and no SMS or Telegram settings.
    client = make_client()

    sms = client.post("/notify/sms", json={"phone": "+79161234567", "text": CODE})
    generic = client.post(
        "/notify",
        json={"recipient": {"telegram_chat_id": 5}, "channels": ["telegram"], "text": "Привет"},
    )

    assert (sms.status_code, generic.status_code) == (422, 422)
    assert "sms channel is not configured" in sms.json()["detail"][0]["msg"]
    assert "telegram channel is not configured" in generic.json()["detail"][0]["msg"]


def test_an_order_the_caller_did_not_give_skips_channels_without_settings(
    make_client: Callable[..., TestClient], smtp: ScriptedHandler
) -> None:
    # E-mail only, as compose runs without SMS_RU_API_ID and TELEGRAM_BOT_TOKEN: the default
    # order (email,sms,telegram) and a stored recipient's own order still work.
    client = make_client()
    client.post("/recipients", json={**MEMBER, "channels": ["telegram", "sms", "email"]})
    letter = {"subject": BOOKING["subject"], "text": BOOKING["text"]}

    default = client.post(
        "/notify",
        json={"recipient": {"phone": "+79161234567", "email": "anna@example.com"}, **letter},
    )
    own = client.post("/notify", json={"recipient": {"external_id": "user-42"}, **letter})

    assert (default.status_code, own.status_code) == (201, 201), default.text
    assert default.json()["skipped"] == [
        {"channel": "sms", "reason": "not configured"},
        {"channel": "telegram", "reason": "not configured"},
    ]
    assert [s["channel"] for s in own.json()["skipped"]] == ["telegram", "sms"]
    assert own.json()["channel"] == "email"
    assert len(smtp.received) == 2


def test_recipients_are_upserted_read_changed_and_erased(client: TestClient) -> None:
    created = client.post("/recipients", json=MEMBER)
    replaced = client.post("/recipients", json={**MEMBER, "channels": ["telegram", "email"]})

    assert (created.status_code, replaced.status_code) == (201, 200), created.text
    stored = client.get("/recipients/user-42").json()
    assert stored["email"] == "Ivan.Petrov@example.com"
    assert stored["phone"] == "+79161234567"
    assert stored["telegram_chat_id"] == "123456789"
    assert stored["channels"] == ["telegram", "email"]

    changed = client.patch("/recipients/user-42", json={"phone": None, "locale": "en"})
    assert changed.status_code == 200
    assert (changed.json()["phone"], changed.json()["locale"]) == (None, "en")
    assert changed.json()["email"] == "Ivan.Petrov@example.com"

    sent = client.post("/notify", json={"recipient": {"external_id": "user-42"}, "text": "Hi"})
    assert sent.status_code == 201, sent.text
    assert client.delete("/recipients/user-42").status_code == 204
    assert client.get("/recipients/user-42").status_code == 404
    assert client.patch("/recipients/user-42", json={}).status_code == 404
    # The history stays.
    assert client.get(f"/notifications/{sent.json()['id']}").json()["status"] == "sent"


def test_a_recipient_needs_the_recipients_scope_or_admin(client: TestClient) -> None:
    keys = {
        scopes: client.post("/keys", json={"name": f"k-{scopes}", "scopes": scopes.split(",")})
        for scopes in ("send", "recipients", "admin")
    }

    def post_as(scopes: str) -> int:
        key = keys[scopes].json()["key"]
        headers = {"Authorization": f"Bearer {key}"}
        return client.post("/recipients", json=MEMBER, headers=headers).status_code

    assert post_as("send") == 403
    assert post_as("recipients") == 201
    assert post_as("admin") == 200


def test_fallback_goes_sms_then_email_then_telegram(
    client: TestClient, outbox: Outbox, smtp: ScriptedHandler
) -> None:
    client.post("/recipients", json=MEMBER)
    outbox.plan(Reply.json(200, NO_NUMBER))
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")

    response = client.post(
        "/notify",
        json={
            "recipient": {"external_id": "user-42"},
            "channels": ["sms", "email", "telegram"],
            "subject": "Код подтверждения",
            "text": CODE,
            "sensitive": True,
        },
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["channel"], body["recipient"]) == ("sent", "telegram", "123456789")
    assert body["channels"] == ["sms", "email", "telegram"]
    assert [(a["channel"], a["outcome"], a["code"]) for a in body["delivery_attempts"]] == [
        ("sms", "permanent_error", 207),
        ("email", "permanent_error", 550),
        ("telegram", "sent", None),
    ]
    assert [(c["channel"], c["status"]) for c in body["channel_outcomes"]] == [
        ("sms", "failed"),
        ("email", "failed"),
        ("telegram", "sent"),
    ]
    assert body["text"] is None
    [telegram] = telegram_requests(outbox)
    assert telegram["text"] == CODE


def test_every_channel_failing_is_a_502_with_each_reason(
    client: TestClient, outbox: Outbox, smtp: ScriptedHandler
) -> None:
    outbox.plan(Reply.json(200, NO_NUMBER), Reply.json(403, BLOCKED))
    smtp.rcpt_replies.append("550 5.7.1 Refused by policy")
    contacts = {"email": "a@example.com", "phone": "+79161234567", "telegram_chat_id": "77"}

    response = client.post(
        "/notify",
        json={
            "recipient": contacts,
            "channels": ["sms", "telegram", "email"],
            "subject": "S",
            "text": "T",
        },
    )

    assert response.status_code == 502
    body = response.json()
    assert body["status"] == "failed"
    assert "Refused by policy" in body["error_message"]
    assert [(c["channel"], c["status"]) for c in body["channel_outcomes"]] == [
        ("sms", "failed"),
        ("telegram", "failed"),
        ("email", "failed"),
    ]


def test_channels_without_an_address_are_skipped_and_listed(
    client: TestClient, outbox: Outbox
) -> None:
    response = client.post(
        "/notify",
        json={
            "recipient": {"phone": "+79161234567"},
            "channels": ["email", "telegram", "sms"],
            "text": CODE,
        },
    )

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["channel"], body["channels"]) == ("sms", ["sms"])
    assert body["skipped"] == [
        {"channel": "email", "reason": "no address"},
        {"channel": "telegram", "reason": "no address"},
    ]
    nobody = client.post(
        "/notify",
        json={"recipient": {"phone": "+79161234567"}, "channels": ["email"], "text": CODE},
    )
    assert nobody.status_code == 422
    assert "no channel" in nobody.json()["detail"][0]["msg"]


def test_email_without_a_subject_is_left_out(client: TestClient) -> None:
    only_email = client.post(
        "/notify", json={"recipient": {"email": "a@example.com"}, "text": "Без темы"}
    )
    with_sms = client.post(
        "/notify",
        json={"recipient": {"email": "a@example.com", "phone": "+79161234567"}, "text": "Т"},
    )

    assert only_email.status_code == 422
    assert "email: no subject" in only_email.json()["detail"][0]["msg"]
    assert with_sms.status_code == 201
    assert with_sms.json()["skipped"] == [
        {"channel": "email", "reason": "no subject"},
        {"channel": "telegram", "reason": "no address"},
    ]


def test_an_unknown_recipient_is_a_422(client: TestClient) -> None:
    response = client.post("/notify", json={"recipient": {"external_id": "ghost"}, "text": "T"})

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "recipient", "external_id"]


def test_a_blocked_chat_is_suppressed_and_skipped_until_an_operator_lifts_it(
    client: TestClient, outbox: Outbox
) -> None:
    client.post("/recipients", json={**MEMBER, "channels": ["telegram", "sms"]})
    outbox.plan(Reply.json(403, BLOCKED))
    member = {"recipient": {"external_id": "user-42"}, "text": CODE}

    first = client.post("/notify", json=member).json()
    assert (first["status"], first["channel"]) == ("sent", "sms")
    [row] = client.get("/suppressions", params={"channel": "telegram"}).json()["data"]
    assert (row["address"], row["reason"], row["scope"]) == (
        str(MEMBER["telegram_chat_id"]),
        "telegram_blocked",
        "all",
    )
    assert row["notification_id"] == first["id"] and "blocked" in row["detail"]

    second = client.post("/notify", json=member).json()
    assert (second["channel"], second["channels"]) == ("sms", ["sms"])
    assert second["skipped"] == [{"channel": "telegram", "reason": "suppressed: telegram_blocked"}]
    assert len(telegram_requests(outbox)) == 1

    # Updating the recipient with the same chat changes nothing; lifting the suppression does.
    client.patch("/recipients/user-42", json={"locale": "ru"})
    assert client.post("/notify", json=member).json()["channel"] == "sms"
    assert client.delete(f"/suppressions/{row['id']}").status_code == 204
    third = client.post("/notify", json=member).json()
    assert (third["channel"], third["status"]) == ("telegram", "sent")


def test_a_worker_falls_back_once_a_channel_runs_out_of_retries(
    client: TestClient, worker: Worker, outbox: Outbox, smtp: ScriptedHandler
) -> None:
    down = {"status": "ERROR", "status_code": 220, "status_text": "Сервис временно недоступен"}
    outbox.plan(Reply.json(200, down), Reply.json(200, down))
    queued = client.post(
        "/notify",
        json={
            "recipient": {"phone": "+79161234567", "email": "a@example.com"},
            "channels": ["sms", "email"],
            "subject": "Напоминание",
            "text": "Бронь в 10:00",
        },
        headers={"Prefer": "respond-async"},
    )
    assert queued.status_code == 202

    drain(worker)

    body = client.get(f"/notifications/{queued.json()['id']}").json()
    assert (body["status"], body["channel"]) == ("sent", "email")
    assert [(a["channel"], a["outcome"]) for a in body["delivery_attempts"]] == [
        ("sms", "transient_error"),
        ("sms", "transient_error"),
        ("email", "sent"),
    ]
    assert len(smtp.received) == 1
    assert (
        client.get("/notifications", params={"channel": "email"}).json()["data"][0]["id"]
        == (body["id"])
    )
    assert client.get("/notifications", params={"channel": "sms"}).json()["data"] == []


def test_telegram_retry_after_is_honoured_by_the_queue(
    client: TestClient, worker: Worker, outbox: Outbox
) -> None:
    limited = {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 120",
        "parameters": {"retry_after": 120},
    }
    outbox.plan(Reply.json(429, limited))
    queued = client.post(
        "/notify/telegram",
        json={"chat_id": 5, "text": "Напоминание"},
        headers={"Prefer": "respond-async"},
    ).json()

    drain(worker)

    body = client.get(f"/notifications/{queued['id']}").json()
    assert body["status"] == "queued"
    assert body["delivery_attempts"][0]["code"] == 429
    waited = datetime.fromisoformat(body["next_attempt_at"]) - datetime.fromisoformat(
        body["updated_at"]
    )
    assert waited.total_seconds() >= 119


def too_many_requests(retry_after: int) -> Reply:
    return Reply.json(
        429,
        {
            "ok": False,
            "error_code": 429,
            "description": f"Too Many Requests: retry after {retry_after}",
            "parameters": {"retry_after": retry_after},
        },
    )


def test_a_long_retry_after_hands_a_synchronous_send_to_the_queue_at_once(
    client: TestClient, outbox: Outbox
) -> None:
    outbox.plan(too_many_requests(120))

    response = client.post("/notify/telegram", json={"chat_id": 5, "text": "Напоминание"})

    assert response.status_code == 202
    body = response.json()
    # No quick retry within the two minutes Telegram asked for.
    assert len(telegram_requests(outbox)) == 1
    waited = datetime.fromisoformat(body["next_attempt_at"]) - datetime.fromisoformat(
        body["updated_at"]
    )
    assert waited.total_seconds() >= 119


def test_a_short_retry_after_is_waited_out_by_the_quick_retries(
    make_client: Callable[..., TestClient], outbox: Outbox
) -> None:
    client = make_client(**provider_settings(outbox), retry_max_wait=5)
    outbox.plan(too_many_requests(1))

    started = time.monotonic()
    response = client.post("/notify/telegram", json={"chat_id": 5, "text": "Напоминание"})

    assert response.status_code == 201
    assert [a["code"] for a in response.json()["delivery_attempts"]] == [429, None]
    assert len(telegram_requests(outbox)) == 2
    # The quick retries wait 0 s here; the second try came after the second asked for.
    assert time.monotonic() - started >= 1.0


def test_recipients_sharing_a_number_count_a_message_each_in_bulk(
    make_client: Callable[..., TestClient], outbox: Outbox
) -> None:
    client = make_client(**provider_settings(outbox), rate_limit_per_recipient_per_hour=1)
    for twin in ("twin-1", "twin-2"):
        client.post("/recipients", json={"external_id": twin, "phone": "+79161234567"})

    response = client.post(
        "/notify/bulk", json={"recipients": ["twin-1", "twin-2"], "channels": ["sms"], "text": CODE}
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["batch"]["accepted"] == 1
    assert [(r["index"], r["external_id"]) for r in body["rejected"]] == [(1, "twin-2")]


def test_a_refusal_suppresses_the_address_it_was_sent_to_not_the_recipients_new_one(
    client: TestClient, worker: Worker, outbox: Outbox
) -> None:
    client.post("/recipients", json={"external_id": "user-7", "telegram_chat_id": 5})
    queued = client.post(
        "/notify",
        json={"recipient": {"external_id": "user-7"}, "text": "Привет"},
        headers={"Prefer": "respond-async"},
    )
    # A new chat before the worker gets to it; the old one has blocked the bot.
    client.patch("/recipients/user-7", json={"telegram_chat_id": 6})
    outbox.plan(Reply.json(403, BLOCKED))

    drain(worker)

    assert client.get(f"/notifications/{queued.json()['id']}").json()["status"] == "failed"
    rows = client.get("/suppressions", params={"channel": "telegram"}).json()["data"]
    assert [r["address"] for r in rows] == ["5"]
    again = client.post("/notify", json={"recipient": {"external_id": "user-7"}, "text": "Привет"})
    assert (again.json()["recipient"], again.json()["status"]) == ("6", "sent")


def test_history_finds_a_chat_id_that_also_reads_as_a_phone_number(
    client: TestClient, outbox: Outbox
) -> None:
    chat = client.post("/notify/telegram", json={"chat_id": 4951234567, "text": "Привет"})
    sms = client.post("/notify/sms", json={"phone": "4951234567", "text": "Привет"})

    def found(**query: str) -> list[int]:
        page = client.get("/notifications", params={"recipient": "4951234567", **query})
        return [n["id"] for n in page.json()["data"]]

    assert sms.json()["recipient"] == "+74951234567"
    assert found() == [sms.json()["id"], chat.json()["id"]]
    assert found(channel="telegram") == [chat.json()["id"]]
    assert found(channel="sms") == [sms.json()["id"]]
    # Paged one by one, the two forms still come newest first, each once.
    first = client.get("/notifications", params={"recipient": "4951234567", "limit": 1}).json()
    second = client.get(
        "/notifications",
        params={"recipient": "4951234567", "limit": 1, "cursor": first["next_cursor"]},
    ).json()
    assert [n["id"] for n in first["data"] + second["data"]] == found()
    assert second["next_cursor"] is None


def test_a_request_leaves_the_next_channel_to_the_queue_after_transient_failures(
    client: TestClient, smtp: ScriptedHandler, outbox: Outbox
) -> None:
    # Three quick retries, as many as FALLBACK_AFTER_ATTEMPTS: e-mail is done with.
    smtp.rcpt_replies.extend(["451 4.3.0 Try again later"] * 3)

    response = client.post(
        "/notify",
        json={
            "recipient": {"email": "ivan.petrov@example.com", "phone": "+79161234567"},
            "channels": ["email", "sms"],
            "subject": "Напоминание",
            "text": "Бронь через час.",
        },
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["status"], body["channel"]) == ("queued", "sms")
    assert [a["outcome"] for a in body["delivery_attempts"]] == ["transient_error"] * 3
    assert not sms_requests(outbox), "the request did not wait on another channel"


def test_idempotency_and_rate_limits_hold_on_the_new_endpoints(
    make_client: Callable[..., TestClient], outbox: Outbox
) -> None:
    client = make_client(**provider_settings(outbox), rate_limit_per_recipient_per_hour=1)
    key = {"Idempotency-Key": "sms-1"}
    sms = {"phone": "+79161234567", "text": CODE}

    first = client.post("/notify/sms", json=sms, headers=key)
    again = client.post("/notify/sms", json=sms, headers=key)
    limited = client.post("/notify/sms", json=sms)
    # Counted per channel: the same person on Telegram has a count of its own.
    telegram = client.post("/notify/telegram", json={"chat_id": 79161234567, "text": CODE})

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert limited.status_code == 429
    assert telegram.status_code == 201
    assert len(sms_requests(outbox)) == 1


def test_a_bulk_reaches_stored_recipients_on_their_channels(
    client: TestClient, worker: Worker, outbox: Outbox, smtp: ScriptedHandler
) -> None:
    client.post("/recipients", json={**MEMBER, "channels": ["telegram"]})
    client.post("/recipients", json={"external_id": "user-7", "phone": "+79031234567"})
    client.post("/recipients", json={"external_id": "user-8", "email": "m@example.com"})

    response = client.post(
        "/notify/bulk",
        json={
            "recipients": ["user-42", "user-7", "ghost", "user-8", "user-7"],
            "channels": ["sms", "telegram"],
            "text": "Зона «Open space» закрыта с 18:00",
        },
    )

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["batch"]["accepted"] == 2
    assert [(r["index"], r["external_id"]) for r in body["rejected"]] == [
        (2, "ghost"),
        (3, "user-8"),
        (4, "user-7"),
    ]
    drain(worker)
    page = client.get("/notifications", params={"batch_id": body["batch"]["id"]}).json()["data"]
    assert sorted((n["channel"], n["status"]) for n in page) == [("sms", "sent"), ("sms", "sent")]
    assert sorted(r["to"] for r in sms_requests(outbox)) == ["79031234567", "79161234567"]
    assert smtp.received == []


def test_email_endpoint_is_unchanged(client: TestClient, smtp: ScriptedHandler) -> None:
    response = client.post("/notify/email", json=BOOKING)

    assert response.status_code == 201
    body = response.json()
    assert (body["channel"], body["channels"], body["skipped"]) == ("email", ["email"], None)
    assert body["delivery_attempts"][0]["smtp_code"] == 250
