"""What every channel implements, and the errors it raises.

A channel sends one message to one address and returns what the provider said about it
(`Receipt`). Everything a provider's client raises (smtplib, httpx, sockets, TLS) is
converted in the channel's own module, so the rest of the service only sees:

    DeliveryError                   the message was not handed over
    ├── TransientDeliveryError      worth retrying: SMTP 4xx, HTTP 429/5xx, outages;
    │   │                           `retry_after` when the provider asked for a wait
    │   └── ConnectionLostError     refused/reset/timed-out connections, the server
    │                               hanging up (SMTP 421, a dropped HTTP connection)
    └── PermanentDeliveryError      retrying cannot help: SMTP 5xx, failed
        │                           authentication, a bad number, no funds, a bad token
        └── RecipientUnreachable    this address refuses this channel for good (a
                                    Telegram user blocked the bot, a chat that does not
                                    exist, an SMS stop list, an unknown mailbox): it is
                                    suppressed (`reason`) until an operator lifts it

Every error carries the provider's `code` (an SMTP reply code, an SMS.ru `status_code`, a
Bot API `error_code`) and text; a provider's text passes a channel's `Scrubber` first, so
none of our secrets it may echo goes any further.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, TypeVar
from urllib.parse import unquote

from models import SuppressionReason


class DeliveryError(Exception):
    """The message was not accepted by the provider."""

    def __init__(
        self, message: str, *, code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        # Seconds the provider asked us to wait before trying again, if it said.
        self.retry_after = retry_after

    def __str__(self) -> str:
        text = super().__str__()
        return f"{self.code} {text}" if self.code else text


class TransientDeliveryError(DeliveryError):
    """A failure that may pass: try again later."""


class ConnectionLostError(TransientDeliveryError):
    """The connection broke or could not be made: a fresh one may work."""


class PermanentDeliveryError(DeliveryError):
    """A failure that will not pass by retrying."""


class RecipientUnreachable(PermanentDeliveryError):
    """The address refuses this channel for good (blocked bot, no such chat or mailbox):
    a suppression with `reason` is added for it."""

    def __init__(self, message: str, *, reason: SuppressionReason, code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class File:
    """A file attached to an e-mail."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """One message for one address on one channel."""

    address: str  # e-mail address, E.164 phone number, Telegram chat id
    text: str
    subject: str | None = None  # e-mail only
    html: str | None = None  # e-mail only: an HTML alternative to `text`
    message_id: str | None = None  # e-mail: the Message-ID header
    sensitive: bool = False  # a code or reset link: never logged, never cached
    parse_mode: str | None = None  # Telegram only, when the caller asked for it
    attachments: tuple[File, ...] = ()  # e-mail only
    # E-mail only: the one-click unsubscribe URL (RFC 8058 headers; the link is in the
    # text already), and the envelope sender that brings bounces back (VERP).
    unsubscribe_url: str | None = None
    envelope_from: str | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the provider said about an accepted message."""

    code: int | None = None  # the provider's success code (SMTP 250, SMS.ru 100)
    provider_message_id: str | None = None  # SMS.ru sms_id, Telegram message_id
    segments: int | None = None  # SMS parts billed
    cost: Decimal | None = None  # what the provider charged, when its reply says


class Sender(Protocol):
    """A channel: sends one message, or raises a `DeliveryError`."""

    @property
    def pool_size(self) -> int:
        """Messages it can send at once (its connection pool)."""
        ...

    def send(self, message: Message) -> Receipt:
        """Hand `message` to the provider; its receipt, or a `DeliveryError`."""
        ...

    def close(self) -> None:
        """Close pooled connections."""
        ...


E = TypeVar("E", bound=DeliveryError)


class Scrubber:
    """Takes our secrets out of a provider's text: each secret in any letter case, also
    percent-encoded, and any run of `fragment` or more of its characters (an echo cut
    short), replaced by `[secret]`."""

    MARK = "[secret]"

    def __init__(self, secrets: Iterable[str], *, fragment: int = 12) -> None:
        self._secrets = tuple({secret.lower() for secret in secrets if secret})
        self.fragment = fragment

    def __call__(self, text: str) -> str:
        """`text` without our secrets (`text` itself when it holds none)."""
        if not self._secrets:
            return text
        for candidate in (text, unquote(text)) if "%" in text else (text,):
            spans = self._spans(candidate.lower())
            if spans:
                return self._marked(candidate, spans)
        return text

    def error(self, error: E) -> E:
        """`error` with its text scrubbed: the same error if it held no secret."""
        text = Exception.__str__(error)
        clean = self(text)
        if clean == text:
            return error
        return type(error)(clean, code=error.code, retry_after=error.retry_after)

    def _spans(self, lowered: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for secret in self._secrets:
            size = min(self.fragment, len(secret))
            start = 0
            while start + size <= len(lowered):
                if lowered[start : start + size] not in secret:
                    start += 1
                    continue
                end = start + size
                # As far as it goes on in the secret.
                while end < len(lowered) and lowered[start : end + 1] in secret:
                    end += 1
                spans.append((start, end))
                start = end
        return spans

    def _marked(self, text: str, spans: list[tuple[int, int]]) -> str:
        parts: list[str] = []
        position = 0
        for start, end in sorted(spans):
            if end <= position:
                continue
            parts.append(text[position : max(start, position)])
            parts.append(self.MARK)
            position = end
        parts.append(text[position:])
        return "".join(parts)
