"""The SMS.ru and Telegram channels against the development stand-in over loopback: real
HTTP, real keep-alive connections, faults made by the server's own replies."""

import json
import logging
import time
import traceback
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from channels.base import (
    ConnectionLostError,
    DeliveryError,
    Message,
    PermanentDeliveryError,
    RecipientUnreachable,
    TransientDeliveryError,
)
from channels.sms_ru import SMSRu, sms_segments
from channels.telegram import MAX_TEXT, TelegramBot
from config import Settings
from tests.providers import (
    API_ID,
    NUMBER,
    TIMEOUT,
    TOKEN,
    Outbox,
    Reply,
    bot_api_error,
    sms_accepted,
    sms_refusal,
    sms_request_refusal,
    start_outbox,
)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    """The stand-in, expecting API_ID and TOKEN."""
    with start_outbox(tmp_path / "outbox", api_id=API_ID, token=TOKEN) as outbox:
        yield outbox


@pytest.fixture
def sms(outbox: Outbox) -> Iterator[SMSRu]:
    channel = SMSRu(base_url=outbox.url, api_id=API_ID, timeout=TIMEOUT, pool_size=2)
    yield channel
    channel.close()


@pytest.fixture
def bot(outbox: Outbox) -> Iterator[TelegramBot]:
    channel = TelegramBot(base_url=outbox.url, token=TOKEN, timeout=TIMEOUT, pool_size=2)
    yield channel
    channel.close()


def saved(outbox: Outbox, kind: str) -> list[dict[str, Any]]:
    """The messages the stand-in wrote under `kind`, oldest first."""
    paths = sorted((outbox.directory / kind).glob("*.json"))
    return [json.loads(path.read_text()) for path in paths]


def refused(channel: SMSRu | TelegramBot, message: Message) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        channel.send(message)
    return caught.value


# SMS.ru


def test_sms_is_accepted_and_saved(sms: SMSRu, outbox: Outbox) -> None:
    receipt = sms.send(Message(NUMBER, "Переговорная «Байкал» ваша с 10:00"))

    [record] = saved(outbox, "sms")
    assert receipt.code == 100
    assert receipt.provider_message_id == record["sms_id"]
    assert receipt.segments == 1
    assert receipt.cost is None
    assert record["to"] == "79161234567"
    assert record["text"] == "Переговорная «Байкал» ваша с 10:00"
    assert record["from"] is None
    # The number goes without '+'; no sender name unless one is set.
    [request] = outbox.requests
    assert request.api == "sms"
    assert request.fields == {
        "to": "79161234567",
        "msg": "Переговорная «Байкал» ваша с 10:00",
        "json": "1",
    }


def test_sms_sender_name_is_sent_when_set(outbox: Outbox) -> None:
    with_sender = SMSRu(base_url=outbox.url, api_id=API_ID, sender="Coworking", timeout=TIMEOUT)
    try:
        with_sender.send(Message(NUMBER, "Hello"))
    finally:
        with_sender.close()

    assert outbox.requests[0].fields["from"] == "Coworking"
    assert saved(outbox, "sms")[0]["from"] == "Coworking"


def test_sms_parts_and_cost_come_from_the_reply(sms: SMSRu, outbox: Outbox) -> None:
    outbox.plan(sms_accepted({"sms": 3, "cost": 7.35}))

    receipt = sms.send(Message(NUMBER, "short"))

    assert receipt.provider_message_id == "000123-10000001"
    assert receipt.segments == 3
    assert receipt.cost == Decimal("7.35")


def test_sms_parts_are_counted_when_the_reply_has_none(sms: SMSRu) -> None:
    assert sms.send(Message(NUMBER, "я" * 71)).segments == 2


def test_sms_connections_are_kept_alive(sms: SMSRu, outbox: Outbox) -> None:
    for n in range(5):
        sms.send(Message(NUMBER, f"message {n}"))

    assert len(saved(outbox, "sms")) == 5
    assert len({request.peer for request in outbox.requests}) == 1


def test_sms_wrong_api_id_is_permanent(outbox: Outbox) -> None:
    wrong = SMSRu(base_url=outbox.url, api_id="not-the-api-id", timeout=TIMEOUT)
    try:
        error = refused(wrong, Message(NUMBER, "Hello"))
    finally:
        wrong.close()

    assert type(error) is PermanentDeliveryError
    assert error.code == 200
    assert str(error) == "200 Неправильный api_id"
    assert not saved(outbox, "sms")


@pytest.mark.parametrize(
    "reply",
    [
        sms_request_refusal(201, "Не хватает средств на лицевом счету", balance=0.4),
        sms_refusal(201, "Не хватает средств на лицевом счету", balance=0.4),
    ],
    ids=["request", "number"],
)
def test_sms_insufficient_funds_is_permanent_and_says_so(
    sms: SMSRu, outbox: Outbox, reply: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    outbox.plan(reply)

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is PermanentDeliveryError
    assert error.code == 201
    assert "insufficient funds on the SMS.ru account (balance 0.4)" in str(error)
    assert "Не хватает средств" in str(error)
    # Operators watching the logs see it too, as an error.
    [logged] = [r for r in caplog.records if "insufficient funds" in r.getMessage()]
    assert logged.levelname == "ERROR"


def test_sms_number_the_provider_rejects_is_permanent(sms: SMSRu, outbox: Outbox) -> None:
    # Seven digits pass our E.164 check; the stand-in, like SMS.ru, finds no such number.
    error = refused(sms, Message("+1234567", "Hello"))

    assert type(error) is PermanentDeliveryError
    assert error.code == 202
    assert not saved(outbox, "sms")


@pytest.mark.parametrize(
    ("code", "text", "expected", "retry_after"),
    [
        (202, "Неправильно указан номер телефона получателя", PermanentDeliveryError, None),
        (207, "На этот номер нет маршрута для доставки сообщений", PermanentDeliveryError, None),
        (209, "Вы добавили этот номер в стоп-лист", RecipientUnreachable, None),
        (215, "Этот номер находится в стоп-листе SMS.RU", RecipientUnreachable, None),
        (230, "Превышен общий лимит сообщений на номер в день", PermanentDeliveryError, None),
        (231, "Превышен лимит одинаковых сообщений в минуту", TransientDeliveryError, 60.0),
        (232, "Превышен лимит одинаковых сообщений в день", PermanentDeliveryError, None),
        (233, "Превышен лимит отправки повторных сообщений с кодом", TransientDeliveryError, None),
    ],
)
def test_sms_refusals_of_the_number(
    sms: SMSRu,
    outbox: Outbox,
    code: int,
    text: str,
    expected: type[DeliveryError],
    retry_after: float | None,
) -> None:
    outbox.plan(sms_refusal(code, text))

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is expected
    assert error.code == code
    assert str(error) == f"{code} {text}"
    assert error.retry_after == retry_after


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        (204, "Имя отправителя не согласовано с администрацией", PermanentDeliveryError),
        (206, "Будет превышен или уже превышен дневной лимит", PermanentDeliveryError),
        (220, "Сервис временно недоступен, попробуйте чуть позже", TransientDeliveryError),
        (300, "Неправильный token", PermanentDeliveryError),
        (301, "Неправильный api_id, либо логин/пароль", PermanentDeliveryError),
        (500, "Ошибка на сервере. Повторите запрос", TransientDeliveryError),
    ],
)
def test_sms_refusals_of_the_request(
    sms: SMSRu, outbox: Outbox, code: int, text: str, expected: type[DeliveryError]
) -> None:
    outbox.plan(sms_request_refusal(code, text))

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is expected
    assert (error.code, str(error)) == (code, f"{code} {text}")


@pytest.mark.parametrize("status", [500, 503])
def test_sms_http_server_errors_are_transient(sms: SMSRu, outbox: Outbox, status: int) -> None:
    outbox.plan(Reply.raw(status, b"<html><body>Service Unavailable</body></html>"))

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is TransientDeliveryError
    assert error.code == status


def test_sms_http_429_is_transient_with_its_retry_after(sms: SMSRu, outbox: Outbox) -> None:
    outbox.plan(Reply(429, b"slow down", "text/plain"))
    error = refused(sms, Message(NUMBER, "Hello"))
    assert type(error) is TransientDeliveryError
    assert (error.code, error.retry_after) == (429, None)


def test_sms_wrong_url_is_permanent(outbox: Outbox) -> None:
    misplaced = SMSRu(base_url=f"{outbox.url}/nowhere", api_id=API_ID, timeout=TIMEOUT)
    try:
        error = refused(misplaced, Message(NUMBER, "Hello"))
    finally:
        misplaced.close()

    assert type(error) is PermanentDeliveryError
    assert error.code == 404


def test_sms_reply_that_is_not_json_is_transient(sms: SMSRu, outbox: Outbox) -> None:
    outbox.plan(Reply.raw(200, b"100\n000000-10000000\nbalance=4122.56"))

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is TransientDeliveryError
    assert error.code is None


def test_sms_reply_without_the_number_is_transient(sms: SMSRu, outbox: Outbox) -> None:
    outbox.plan(Reply.json(200, {"status": "OK", "status_code": 100, "sms": {}, "balance": 1}))

    assert type(refused(sms, Message(NUMBER, "Hello"))) is TransientDeliveryError


def test_sms_timeout_is_a_lost_connection(sms: SMSRu, outbox: Outbox) -> None:
    outbox.plan(Reply.slow(TIMEOUT * 3))
    started = time.monotonic()

    error = refused(sms, Message(NUMBER, "Hello"))

    assert type(error) is ConnectionLostError
    assert time.monotonic() - started < TIMEOUT * 2.5
    # The next message goes on a fresh connection.
    assert sms.send(Message(NUMBER, "again")).code == 100


def test_sms_dropped_connection_is_lost(sms: SMSRu, outbox: Outbox) -> None:
    sms.send(Message(NUMBER, "opens the kept-alive connection"))
    outbox.plan(Reply.hang_up())

    assert type(refused(sms, Message(NUMBER, "Hello"))) is ConnectionLostError
    assert sms.send(Message(NUMBER, "again")).code == 100


def test_sms_refused_connection_is_lost(tmp_path: Path) -> None:
    with start_outbox(tmp_path) as stopped:
        url = stopped.url
    channel = SMSRu(base_url=url, api_id=API_ID, timeout=TIMEOUT)
    try:
        assert type(refused(channel, Message(NUMBER, "Hello"))) is ConnectionLostError
    finally:
        channel.close()


def test_sms_address_that_is_not_a_phone_number_is_not_sent(sms: SMSRu, outbox: Outbox) -> None:
    error = refused(sms, Message("ivan@example.com", "Hello"))

    assert type(error) is PermanentDeliveryError
    assert not outbox.requests


def test_sms_from_settings(outbox: Outbox) -> None:
    settings = Settings(
        _env_file=None,
        sms_ru_api_id=API_ID,
        sms_ru_url=outbox.url,
        sms_from="Coworking",
        channel_timeout=TIMEOUT,
        channel_pool_size=3,
    )
    channel = SMSRu.from_settings(settings)
    try:
        assert channel.pool_size == 3
        assert channel.send(Message(NUMBER, "Hello")).code == 100
    finally:
        channel.close()
    assert outbox.requests[0].fields["from"] == "Coworking"
    with pytest.raises(ValueError, match="SMS_RU_API_ID"):
        SMSRu.from_settings(Settings(_env_file=None))


# SMS parts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("gsm7", 1)),
        ("a" * 160, ("gsm7", 1)),
        ("a" * 161, ("gsm7", 2)),
        ("a" * 306, ("gsm7", 2)),
        ("a" * 307, ("gsm7", 3)),
        # The basic table beyond ASCII: one septet each.
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà" * 4, ("gsm7", 2)),
        ("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà" * 3, ("gsm7", 1)),
        # The extension table: two septets each.
        ("€" * 80, ("gsm7", 1)),
        ("€" * 81, ("gsm7", 2)),
        ("a" * 159 + "[", ("gsm7", 2)),
        ("{}[]~|^\\\f" + "a" * 142, ("gsm7", 1)),
        # An escape sequence never straddles two parts: 306 septets, yet three parts.
        ("a" * 152 + "€" + "a" * 152, ("gsm7", 3)),
        ("я" * 70, ("ucs2", 1)),
        ("я" * 71, ("ucs2", 2)),
        ("я" * 134, ("ucs2", 2)),
        ("я" * 135, ("ucs2", 3)),
        # One character outside GSM-7 makes the whole text UCS-2.
        ("a" * 69 + "ç", ("ucs2", 1)),
        ("a" * 70 + "я", ("ucs2", 2)),
        # Emoji are surrogate pairs: two UTF-16 code units each.
        ("😀" * 35, ("ucs2", 1)),
        ("😀" * 36, ("ucs2", 2)),
        ("a" * 69 + "😀", ("ucs2", 2)),
        ("a" * 66 + "😀" + "a" * 66, ("ucs2", 3)),
    ],
)
def test_sms_segments(text: str, expected: tuple[str, int]) -> None:
    assert sms_segments(text) == expected


# Telegram


def test_telegram_message_is_sent_and_saved(bot: TelegramBot, outbox: Outbox) -> None:
    receipt = bot.send(Message("123456789", "Ваша бронь подтверждена"))

    [record] = saved(outbox, "telegram")
    assert receipt.provider_message_id == str(record["message_id"])
    assert record["chat_id"] == 123456789
    assert record["text"] == "Ваша бронь подтверждена"
    [request] = outbox.requests
    # No parse_mode unless the message has one; a numeric chat id goes as a number.
    assert request.fields == {"chat_id": 123456789, "text": "Ваша бронь подтверждена"}


def test_telegram_parse_mode_is_sent_when_set(bot: TelegramBot, outbox: Outbox) -> None:
    bot.send(Message("-1001234567890", "<b>Зал</b> свободен", parse_mode="HTML"))

    assert outbox.requests[0].fields == {
        "chat_id": -1001234567890,
        "text": "<b>Зал</b> свободен",
        "parse_mode": "HTML",
    }
    assert saved(outbox, "telegram")[0]["parse_mode"] == "HTML"


def test_telegram_channel_username_is_sent_as_it_is(bot: TelegramBot, outbox: Outbox) -> None:
    bot.send(Message("@coworking_news", "Open space closes at 18:00"))

    assert outbox.requests[0].fields["chat_id"] == "@coworking_news"


def test_telegram_429_carries_retry_after(bot: TelegramBot, outbox: Outbox) -> None:
    outbox.plan(bot_api_error(429, "Too Many Requests: retry after 17", retry_after=17))

    error = refused(bot, Message("42", "Hello"))

    assert type(error) is TransientDeliveryError
    assert error.code == 429
    assert error.retry_after == 17
    assert str(error) == "429 Too Many Requests: retry after 17"


@pytest.mark.parametrize(
    "description",
    [
        "Forbidden: bot was blocked by the user",
        "Forbidden: user is deactivated",
        "Forbidden: bot was kicked from the group chat",
    ],
)
def test_telegram_chat_refusing_the_bot_is_unreachable(
    bot: TelegramBot, outbox: Outbox, description: str
) -> None:
    outbox.plan(bot_api_error(403, description))

    error = refused(bot, Message("42", "Hello"))

    assert type(error) is RecipientUnreachable
    assert (error.code, str(error)) == (403, f"403 {description}")


def test_telegram_chat_not_found_is_unreachable(bot: TelegramBot, outbox: Outbox) -> None:
    outbox.plan(bot_api_error(400, "Bad Request: chat not found"))
    assert type(refused(bot, Message("42", "Hello"))) is RecipientUnreachable
    # The stand-in itself finds no chat with id 0.
    error = refused(bot, Message("0", "Hello"))
    assert type(error) is RecipientUnreachable
    assert str(error) == "400 Bad Request: chat not found"


def test_telegram_other_bad_request_is_permanent(bot: TelegramBot, outbox: Outbox) -> None:
    outbox.plan(bot_api_error(400, "Bad Request: can't parse entities: unclosed tag"))

    error = refused(bot, Message("42", "<b>Hello", parse_mode="HTML"))

    assert type(error) is PermanentDeliveryError
    assert error.code == 400


def test_telegram_empty_text_is_refused_by_the_api(bot: TelegramBot) -> None:
    error = refused(bot, Message("42", ""))

    assert type(error) is PermanentDeliveryError
    assert str(error) == "400 Bad Request: message text is empty"


def test_telegram_wrong_token_is_permanent(outbox: Outbox) -> None:
    wrong = TelegramBot(base_url=outbox.url, token="987654321:wrong-token", timeout=TIMEOUT)
    try:
        error = refused(wrong, Message("42", "Hello"))
    finally:
        wrong.close()

    assert type(error) is PermanentDeliveryError
    assert error.code == 401
    assert not saved(outbox, "telegram")


@pytest.mark.parametrize(
    "reply",
    [
        Reply.raw(502, b"<html><center>502 Bad Gateway</center></html>"),
        bot_api_error(500, "Internal Server Error"),
        Reply.raw(200, b"<html>not the Bot API</html>"),
    ],
    ids=["502-html", "500-json", "200-not-json"],
)
def test_telegram_server_trouble_is_transient(
    bot: TelegramBot, outbox: Outbox, reply: Reply
) -> None:
    outbox.plan(reply)

    assert type(refused(bot, Message("42", "Hello"))) is TransientDeliveryError


def test_telegram_timeout_is_a_lost_connection(bot: TelegramBot, outbox: Outbox) -> None:
    outbox.plan(Reply.slow(TIMEOUT * 3))
    started = time.monotonic()

    assert type(refused(bot, Message("42", "Hello"))) is ConnectionLostError
    assert time.monotonic() - started < TIMEOUT * 2.5


def test_telegram_dropped_connection_is_lost(bot: TelegramBot, outbox: Outbox) -> None:
    bot.send(Message("42", "opens the kept-alive connection"))
    outbox.plan(Reply.hang_up())

    assert type(refused(bot, Message("42", "Hello"))) is ConnectionLostError
    assert bot.send(Message("42", "again")).provider_message_id is not None


def test_telegram_text_over_the_limit_is_refused_before_sending(
    bot: TelegramBot, outbox: Outbox
) -> None:
    error = refused(bot, Message("42", "a" * (MAX_TEXT + 1)))

    assert type(error) is PermanentDeliveryError
    assert not outbox.requests
    assert bot.send(Message("42", "a" * MAX_TEXT)).provider_message_id is not None


def test_telegram_address_that_is_no_chat_is_not_sent(bot: TelegramBot, outbox: Outbox) -> None:
    assert type(refused(bot, Message("+79161234567", "Hello"))) is PermanentDeliveryError
    assert not outbox.requests


def test_telegram_from_settings(outbox: Outbox) -> None:
    settings = Settings(
        _env_file=None,
        telegram_bot_token=TOKEN,
        telegram_api_url=outbox.url,
        channel_timeout=TIMEOUT,
    )
    channel = TelegramBot.from_settings(settings)
    try:
        assert channel.send(Message("42", "Hello")).provider_message_id is not None
    finally:
        channel.close()
    with pytest.raises(ValueError, match="TELEGRAM_BOT_TOKEN"):
        TelegramBot.from_settings(Settings(_env_file=None))


# Secrets


def test_api_id_and_token_are_never_logged_nor_in_errors(
    sms: SMSRu, bot: TelegramBot, outbox: Outbox, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    faults = [
        Reply.hang_up(),
        Reply.slow(TIMEOUT * 2),
        Reply.raw(502, b"Bad Gateway"),
        Reply.raw(200, b"not json"),
        None,  # the normal answer
    ]
    errors: list[DeliveryError] = []
    for channel, address in ((sms, NUMBER), (bot, "42")):
        for fault in faults:
            if fault is not None:
                outbox.plan(fault)
            try:
                channel.send(Message(address, "Hello"))
            except DeliveryError as exc:
                errors.append(exc)
    for wrong in (
        SMSRu(base_url=outbox.url, api_id=API_ID + "-old", timeout=TIMEOUT),
        TelegramBot(base_url=outbox.url, token=TOKEN + "-old", timeout=TIMEOUT),
    ):
        try:
            wrong.send(Message(NUMBER if isinstance(wrong, SMSRu) else "42", "Hello"))
        except DeliveryError as exc:
            errors.append(exc)
        finally:
            wrong.close()

    assert len(errors) == 10
    # The whole chain, as a logged traceback would show it, httpx's exceptions included.
    texts = ["".join(traceback.format_exception(error)) for error in errors]
    texts += [repr(sms), repr(bot), caplog.text]
    texts += [record.getMessage() for record in caplog.records]
    texts += [path.read_text() for path in outbox.directory.rglob("*.json")]
    assert any("HTTP" in record.getMessage() for record in caplog.records)  # there were lines
    for secret in (API_ID, TOKEN, TOKEN.partition(":")[2]):
        assert not [text for text in texts if secret in text]
