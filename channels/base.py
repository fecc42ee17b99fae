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
                                    exist): later sends skip it until the address changes

Every error carries the provider's `code` (an SMTP reply code, an SMS.ru `status_code`, a
Bot API `error_code`) and text.
"""

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol


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
    """The address refuses this channel until it is changed (blocked bot, no such chat)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message for one address on one channel."""

    address: str  # e-mail address, E.164 phone number, Telegram chat id
    text: str
    subject: str | None = None  # e-mail only
    message_id: str | None = None  # e-mail: the Message-ID header
    sensitive: bool = False  # a code or reset link: never logged, never cached
    parse_mode: str | None = None  # Telegram only, when the caller asked for it


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
