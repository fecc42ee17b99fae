"""SMS through SMS.ru (https://sms.ru/api/send), and how many parts a text is billed as.

`SMSRu.send` POSTs one message to `/sms/send` with `json=1` and reads the JSON reply: a
top-level `status`/`status_code` for the request as a whole (authorization, funds, the
sender name), one entry per number under `sms` (`status_code` with `sms_id`, or with
`status_text`), and the `balance` left. Everything httpx raises, and every refusal, becomes
an error of `channels.base`. Its code is SMS.ru's `status_code` (the HTTP status when the
reply has none) and its text is SMS.ru's `status_text`. The api_id appears in neither:
httpx's own messages are never reused.

How SMS.ru's codes are classified, and why:

    code      meaning                                    error
    200       wrong api_id                               PermanentDeliveryError
    201       not enough money on the account            PermanentDeliveryError (1)
    202       wrong number, or no route to it            PermanentDeliveryError
    203       no message text                            PermanentDeliveryError
    204       sender name not approved                   PermanentDeliveryError
    205       message too long (over 8 parts)            PermanentDeliveryError
    206       the account's daily limit reached          PermanentDeliveryError (2)
    207       messages to this number are not allowed    PermanentDeliveryError
    208       bad `time` parameter                       PermanentDeliveryError
    209       number in the account's stop list          RecipientUnreachable (3)
    210-214   wrong method, encoding, too many numbers,  PermanentDeliveryError
              a foreign number on a Russia-only account
    215       number in SMS.ru's spam stop list          RecipientUnreachable (3)
    216       forbidden word in the text                 PermanentDeliveryError
    220       service temporarily unavailable            TransientDeliveryError
    230       daily limit of messages to this number     PermanentDeliveryError (2)
    231       same text to this number: minute limit     TransientDeliveryError, retry_after 60
    232       same text to this number: daily limit      PermanentDeliveryError (4)
    233       too many codes to this number, short time  TransientDeliveryError
    300-302   bad token/password, unconfirmed account    PermanentDeliveryError
    5xx       SMS.ru's server error and short-term       TransientDeliveryError
              anti-abuse limits
    other     anything else SMS.ru refuses               PermanentDeliveryError

    HTTP 429 and 5xx: TransientDeliveryError (Retry-After honoured); another non-2xx status
    (a wrong SMS_RU_URL): PermanentDeliveryError; a refused, reset, dropped or timed-out
    connection: ConnectionLostError; a reply that is not JSON: TransientDeliveryError.

(1) Only an operator topping the account up ends it: retries would fail the same way and
    hide the cause, so the message fails at once and its text says the balance is short.
(2) Daily limits lift tomorrow (or when raised in the account), after our retries have
    given up; a notification a day late is worse than a failure the caller sees now.
(3) The number refuses SMS from us until it leaves the list: later sends skip it.
(4) The recipient already got this very text today.
"""

import logging
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from channels.base import (
    DeliveryError,
    Message,
    PermanentDeliveryError,
    Receipt,
    RecipientUnreachable,
    TransientDeliveryError,
)
from channels.http import HTTPSender, retry_after_header
from config import Settings
from models import SuppressionReason

logger = logging.getLogger(__name__)

ACCEPTED = 100  # SMS.ru's "request done" / "message accepted"

# GSM 03.38 (3GPP TS 23.038) default alphabet, in code order 0x00-0x7F; 0x1B is the escape
# to the extension table, not a character. Checked against the Unicode names of the
# ETSI table (unicode.org MAPPINGS/ETSI/GSM0338.TXT, C-cedilla capital as in the standard).
_GSM7_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_BASIC = frozenset(_GSM7_TABLE) - {"\x1b"}
# The extension table: each is sent as ESC + one septet, so it counts twice.
GSM7_EXTENSION = frozenset("\x0c^{}\\[~]|€")

# Septets (GSM-7) or UTF-16 code units (UCS-2) in one SMS, and per part of a longer one
# (the rest carries the concatenation header).
_GSM7_SINGLE, _GSM7_PART = 160, 153
_UCS2_SINGLE, _UCS2_PART = 70, 67


def sms_segments(text: str) -> tuple[str, int]:
    """The encoding of `text` ("gsm7" or "ucs2") and the number of SMS it is sent as."""
    if all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text):
        weights = [2 if char in GSM7_EXTENSION else 1 for char in text]
        return "gsm7", _parts(weights, _GSM7_SINGLE, _GSM7_PART)
    # Characters outside the Basic Multilingual Plane (most emoji) are surrogate pairs.
    weights = [2 if ord(char) > 0xFFFF else 1 for char in text]
    return "ucs2", _parts(weights, _UCS2_SINGLE, _UCS2_PART)


def _parts(weights: list[int], single: int, part: int) -> int:
    total = sum(weights)
    if total <= single:
        return 1
    # Phones never split an escape sequence or a surrogate pair across parts: a pair that
    # would straddle the boundary moves whole to the next part.
    parts, used = 1, 0
    for weight in weights:
        if used + weight > part:
            parts, used = parts + 1, 0
        used += weight
    return parts


# How each SMS.ru refusal is classified; codes not listed go by `classify_status`'s rule.
_TRANSIENT = {220, 231, 233}
_RECIPIENT_REFUSES = {209, 215}
# Seconds to wait, where SMS.ru's code names the window.
_RETRY_AFTER = {231: 60.0}


def classify_status(code: int, text: str, *, balance: object | None = None) -> DeliveryError:
    """Our error for an SMS.ru `status_code` other than 100 (see the module's table)."""
    error_type: type[DeliveryError]
    if code in _TRANSIENT or 500 <= code < 600:
        error_type = TransientDeliveryError
    elif code in _RECIPIENT_REFUSES:
        reason = SuppressionReason.SMS_STOPLIST
        return RecipientUnreachable(text or "refused by SMS.ru", code=code, reason=reason)
    else:
        error_type = PermanentDeliveryError
    if code == 201:
        # Operators must see at once that the account needs money, whatever SMS.ru wrote.
        left = f" (balance {balance})" if balance is not None else ""
        text = f"insufficient funds on the SMS.ru account{left}: {text or 'top it up'}"
        logger.error("SMS.ru: %s; every SMS fails until the account is topped up", text)
    return error_type(text or "refused by SMS.ru", code=code, retry_after=_RETRY_AFTER.get(code))


class SMSRu(HTTPSender):
    """Sends SMS through SMS.ru's HTTP API over one pooled httpx client."""

    def __init__(
        self,
        *,
        base_url: str = "https://sms.ru",
        api_id: str,
        sender: str | None = None,
        timeout: float = 10.0,
        pool_size: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not api_id:
            raise ValueError("api_id is empty")
        super().__init__(
            base_url, timeout=timeout, pool_size=pool_size, secrets=[api_id], transport=transport
        )
        self.sender = sender or None
        self._api_id = api_id

    @classmethod
    def from_settings(cls, settings: Settings, *, base_url: str | None = None) -> "SMSRu":
        """The channel SMS_RU_* settings describe; `base_url` points it elsewhere."""
        if settings.sms_ru_api_id is None:
            raise ValueError("SMS_RU_API_ID is not set")
        return cls(
            base_url=base_url or settings.sms_ru_url,
            api_id=settings.sms_ru_api_id.get_secret_value(),
            sender=settings.sms_from,
            timeout=settings.channel_timeout,
            pool_size=settings.channel_pool_size,
        )

    def __repr__(self) -> str:
        return f"SMSRu(base_url={self.base_url!r}, sender={self.sender!r})"

    def send(self, message: Message) -> Receipt:
        """Hand `message` (to an E.164 number) to SMS.ru; its receipt, or a `DeliveryError`."""
        number = _digits(message.address)
        form = {"api_id": self._api_id, "to": number, "msg": message.text, "json": "1"}
        if self.sender:
            form["from"] = self.sender
        response = self._post("/sms/send", data=form)
        return self._receipt(response, number, message.text)

    def _receipt(self, response: httpx.Response, number: str, text: str) -> Receipt:
        reply = self.reply(response)
        if not response.is_success:
            raise _http_error(response, reply)
        if reply is None:
            raise TransientDeliveryError(
                f"SMS.ru answered HTTP {response.status_code} without JSON"
            )
        balance = reply.get("balance")
        code = _int(reply.get("status_code"))
        if code != ACCEPTED:
            raise _refusal(reply, code, balance)
        entries = reply.get("sms")
        entry = _entry(entries, number) if isinstance(entries, dict) else None
        if entry is None:
            # Accepted or not, SMS.ru did not say: the same as no answer.
            raise TransientDeliveryError("SMS.ru's reply has no entry for the number")
        entry_code = _int(entry.get("status_code"))
        if entry_code != ACCEPTED:
            raise _refusal(entry, entry_code, balance)
        sms_id = entry.get("sms_id")
        parts = _int(entry.get("sms"))
        receipt = Receipt(
            code=ACCEPTED,
            provider_message_id=str(sms_id) if sms_id is not None else None,
            segments=parts if parts is not None and parts > 0 else sms_segments(text)[1],
            cost=_decimal(entry.get("cost")),
        )
        logger.debug(
            "SMS.ru accepted sms_id=%s (%s parts, balance %s)",
            receipt.provider_message_id,
            receipt.segments,
            balance,
        )
        return receipt


def _refusal(part: dict[str, Any], code: int | None, balance: object) -> DeliveryError:
    text = part.get("status_text")
    text = text if isinstance(text, str) else ""
    if code is None:
        return TransientDeliveryError("SMS.ru's reply has no status code")
    return classify_status(code, text, balance=balance)


def _entry(entries: dict[str, Any], number: str) -> dict[str, Any] | None:
    entry = entries.get(number)
    # One number per request: its entry, even if SMS.ru wrote the number its own way.
    if entry is None and len(entries) == 1:
        entry = next(iter(entries.values()))
    return entry if isinstance(entry, dict) else None


_E164 = re.compile(r"\+?[1-9][0-9]{6,14}")


def _digits(address: str) -> str:
    """SMS.ru wants international numbers as digits, without the '+'."""
    if not _E164.fullmatch(address):
        # Not echoed: a phone number is personal data, and errors are stored.
        raise PermanentDeliveryError("the address is not an E.164 phone number")
    return address.removeprefix("+")


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _decimal(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        # Through str: a float reply (0.5) must not become 0.5000000000000000277...
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _http_error(response: httpx.Response, reply: dict[str, Any] | None) -> DeliveryError:
    """Our error for an HTTP status other than 2xx (429 and 5xx may pass)."""
    status = response.status_code
    code = _int(reply.get("status_code")) if reply else None
    text = reply.get("status_text") if reply else None
    if not isinstance(text, str) or not text:
        # The standard phrase, not the server's: that is the provider's text too.
        text = f"SMS.ru answered HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
    error_type: type[DeliveryError]
    if status == 429 or status >= 500:
        error_type = TransientDeliveryError
    else:
        # 3xx (redirects are not followed) and 4xx: the URL or the request is wrong.
        error_type = PermanentDeliveryError
    return error_type(text, code=code or status, retry_after=retry_after_header(response))
