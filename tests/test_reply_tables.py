"""The providers' reply tables, through `httpx.MockTransport` (the channel's whole reading
of a reply, in microseconds); the loopback stand-ins test the same channels end to end."""

import json
from collections.abc import Callable

import httpx
import pytest

from channels.base import (
    ConnectionLostError,
    DeliveryError,
    Message,
    PermanentDeliveryError,
    RecipientUnreachable,
    TransientDeliveryError,
)
from channels.sms_ru import SMSRu
from channels.telegram import TelegramBot

API_ID = "B8C7D6E5-0000-1111-2222-333344445555"
TOKEN = "123456:AAH-secret-bot-token-for-the-tests"
NUMBER = "+79161234567"


def replying(status: int, body: object) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=json.dumps(body).encode())

    return handler


def sms_ru(handler: Callable[[httpx.Request], httpx.Response]) -> SMSRu:
    return SMSRu(base_url="https://sms.test", api_id=API_ID, transport=httpx.MockTransport(handler))


def bot(handler: Callable[[httpx.Request], httpx.Response]) -> TelegramBot:
    return TelegramBot(
        base_url="https://bot.test", token=TOKEN, transport=httpx.MockTransport(handler)
    )


def refusal(channel: SMSRu | TelegramBot, address: str) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        channel.send(Message(address=address, text="Код: 123456"))
    return caught.value


def sms_entry(code: int, text: str = "") -> dict[str, object]:
    return {
        "status": "OK",
        "status_code": 100,
        "sms": {NUMBER[1:]: {"status": "ERROR", "status_code": code, "status_text": text}},
        "balance": 4.5,
    }


@pytest.mark.parametrize(
    ("code", "error", "retry_after"),
    [
        (202, PermanentDeliveryError, None),
        (207, PermanentDeliveryError, None),
        (209, RecipientUnreachable, None),
        (215, RecipientUnreachable, None),
        (220, TransientDeliveryError, None),
        (230, PermanentDeliveryError, None),
        (231, TransientDeliveryError, 60),
        (232, PermanentDeliveryError, None),
        (233, TransientDeliveryError, None),
        (500, TransientDeliveryError, None),
        (299, PermanentDeliveryError, None),
    ],
)
def test_sms_ru_number_codes_are_classified_as_documented(
    code: int, error: type[DeliveryError], retry_after: float | None
) -> None:
    failure = refusal(sms_ru(replying(200, sms_entry(code, "refused"))), NUMBER)

    assert type(failure) is error
    assert failure.code == code
    assert failure.retry_after == retry_after


def test_sms_ru_funds_fail_at_once_saying_the_balance() -> None:
    reply = {"status": "ERROR", "status_code": 201, "status_text": "no money", "balance": 0.3}

    failure = refusal(sms_ru(replying(200, reply)), NUMBER)

    assert type(failure) is PermanentDeliveryError
    assert "insufficient funds" in str(failure)
    assert "0.3" in str(failure)


@pytest.mark.parametrize(
    ("status", "error"),
    [(429, TransientDeliveryError), (503, TransientDeliveryError), (404, PermanentDeliveryError)],
)
def test_sms_ru_http_statuses_are_classified(status: int, error: type[DeliveryError]) -> None:
    failure = refusal(sms_ru(replying(status, {})), NUMBER)

    assert type(failure) is error


def test_sms_ru_accepts_with_its_id_parts_and_cost() -> None:
    accepted = {
        "status": "OK",
        "status_code": 100,
        "sms": {NUMBER[1:]: {"status": "OK", "status_code": 100, "sms_id": "000-1", "cost": "2.5"}},
        "balance": 40,
    }

    receipt = sms_ru(replying(200, accepted)).send(Message(address=NUMBER, text="Код: 123456"))

    assert (receipt.code, receipt.provider_message_id, str(receipt.cost)) == (100, "000-1", "2.5")
    assert receipt.segments == 1


def test_sms_ru_echoing_the_api_id_is_scrubbed() -> None:
    failure = refusal(sms_ru(replying(200, sms_entry(299, f"bad api_id {API_ID}"))), NUMBER)

    assert API_ID not in str(failure)
    assert API_ID.lower() not in str(failure).lower()


def test_a_dropped_connection_is_connection_lost() -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected", request=request)

    assert isinstance(refusal(sms_ru(drop), NUMBER), ConnectionLostError)
    assert isinstance(refusal(bot(drop), "1234"), ConnectionLostError)


@pytest.mark.parametrize(
    ("status", "description", "error"),
    [
        (403, "Forbidden: bot was blocked by the user", RecipientUnreachable),
        (400, "Bad Request: chat not found", RecipientUnreachable),
        (400, "Bad Request: message text is empty", PermanentDeliveryError),
        (502, "Bad Gateway", TransientDeliveryError),
    ],
)
def test_bot_api_errors_are_classified(
    status: int, description: str, error: type[DeliveryError]
) -> None:
    reply = {"ok": False, "error_code": status, "description": description}

    failure = refusal(bot(replying(status, reply)), "1234")

    assert type(failure) is error
    assert failure.code == status


def test_bot_api_retry_after_is_read_from_the_reply() -> None:
    reply = {
        "ok": False,
        "error_code": 429,
        "description": "Too Many Requests: retry after 7",
        "parameters": {"retry_after": 7},
    }

    failure = refusal(bot(replying(429, reply)), "1234")

    assert isinstance(failure, TransientDeliveryError)
    assert failure.retry_after == 7


def test_bot_api_echoing_the_token_is_scrubbed() -> None:
    reply = {"ok": False, "error_code": 400, "description": f"Bad Request: token {TOKEN}"}

    failure = refusal(bot(replying(400, reply)), "1234")

    assert TOKEN not in str(failure)
    assert TOKEN.split(":")[1] not in str(failure)
