"""Telegram messages through the Bot API's `sendMessage` (https://core.telegram.org/bots/api).

The bot token is part of every request's URL (`/bot<token>/sendMessage`), so neither the
URL nor anything httpx says about a request is ever logged or put in an error: httpx's
own request log is turned down to warnings below, and every error is written here.

A reply is `{"ok": true, "result": <Message>}` or `{"ok": false, "error_code": N,
"description": "...", "parameters": {...}}`. Errors become those of `channels.base`, with
Telegram's `error_code` (the HTTP status when there is no JSON) and `description`:

    429 Too Many Requests             TransientDeliveryError, retry_after from
                                      `parameters.retry_after` (or Retry-After)
    5xx, a reply that is not JSON     TransientDeliveryError
    timeouts, refused, reset or       ConnectionLostError
    dropped connections
    403 Forbidden (bot blocked by     RecipientUnreachable: the chat refuses this bot
    the user, user deactivated, bot   until someone there changes that
    kicked, not a member, ...)
    400 chat not found, user not      RecipientUnreachable: the chat id leads nowhere
    found, group upgraded to a        (the new id of an upgraded group is in the text)
    supergroup
    401 Unauthorized, 404 Not Found   PermanentDeliveryError: the token (or the URL) is
                                      wrong
    other 4xx (bad markup, ...)       PermanentDeliveryError
"""

import logging
import re
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
# httpx logs every request's full URL at INFO ("HTTP Request: POST https://.../bot<token>/
# sendMessage"): that line would put the bot token in the logs.
logging.getLogger("httpx").setLevel(logging.WARNING)

# Characters of a message's text, after entities parsing (the Bot API's limit).
MAX_TEXT = 4096

# 400 descriptions that mean the chat id itself leads nowhere.
_NO_SUCH_CHAT = (
    "chat not found",
    "user not found",
    "peer_id_invalid",
    "group chat was upgraded",
)
_NUMERIC_CHAT_ID = re.compile(r"-?[0-9]+")


class TelegramBot(HTTPSender):
    """Sends Telegram messages as one bot over one pooled httpx client."""

    def __init__(
        self,
        *,
        base_url: str = "https://api.telegram.org",
        token: str,
        timeout: float = 10.0,
        pool_size: int = 8,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not token or "/" in token:
            raise ValueError("the bot token is empty or malformed")
        super().__init__(
            base_url, timeout=timeout, pool_size=pool_size, secrets=[token], transport=transport
        )
        # The only place the token is kept, but for the forms `reply` scrubs.
        self._send_path = f"/bot{token}/sendMessage"

    @classmethod
    def from_settings(cls, settings: Settings, *, base_url: str | None = None) -> "TelegramBot":
        """The bot TELEGRAM_* settings describe; `base_url` points it elsewhere."""
        if settings.telegram_bot_token is None:
            raise ValueError("TELEGRAM_BOT_TOKEN is not set")
        return cls(
            base_url=base_url or settings.telegram_api_url,
            token=settings.telegram_bot_token.get_secret_value(),
            timeout=settings.channel_timeout,
            pool_size=settings.channel_pool_size,
        )

    def __repr__(self) -> str:
        return f"TelegramBot(base_url={self.base_url!r})"

    def send(self, message: Message) -> Receipt:
        """Send `message` to its chat; its receipt, or a `DeliveryError`."""
        # With a parse mode the limit applies to the text without its markup, which only
        # Telegram knows: such a text is left to Telegram's own "message is too long".
        if message.parse_mode is None and len(message.text) > MAX_TEXT:
            raise PermanentDeliveryError(
                f"the text has {len(message.text)} characters; Telegram takes at most {MAX_TEXT}"
            )
        payload: dict[str, Any] = {"chat_id": _chat_id(message.address), "text": message.text}
        if message.parse_mode is not None:
            payload["parse_mode"] = message.parse_mode
        response = self._post(self._send_path, json=payload)
        # `result` is the message we sent, and only its message_id is read.
        return _receipt(response, self.reply(response, ours={"result"}))


def _chat_id(address: str) -> int | str:
    """A numeric chat id (negative for groups) as a number; `@channelname` as it is."""
    if _NUMERIC_CHAT_ID.fullmatch(address):
        return int(address)
    if address.startswith("@") and len(address) > 1:
        return address
    raise PermanentDeliveryError("the address is neither a chat id nor an @username")


def _receipt(response: httpx.Response, reply: dict[str, Any] | None) -> Receipt:
    if reply is None:
        status = response.status_code
        # A proxy's error page, a reply cut short: worth another try. A 3xx or 4xx page
        # instead means TELEGRAM_API_URL does not lead to the Bot API.
        error_type: type[DeliveryError] = TransientDeliveryError
        if 300 <= status < 500 and status != 429:
            error_type = PermanentDeliveryError
        code = None if response.is_success else status
        raise error_type(f"the Bot API answered HTTP {status} without JSON", code=code)
    if reply.get("ok") is True and response.is_success:
        result = reply.get("result")
        message_id = result.get("message_id") if isinstance(result, dict) else None
        logger.debug("Telegram accepted message_id=%s", message_id)
        # Sent, whatever else the reply lacks: trying again would send it twice.
        return Receipt(provider_message_id=str(message_id) if message_id is not None else None)
    raise classify_error(response, reply)


def classify_error(response: httpx.Response, reply: dict[str, Any]) -> DeliveryError:
    """Our error for a Bot API reply with `"ok": false` (see the module's table)."""
    code = reply.get("error_code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = response.status_code
    description = reply.get("description")
    if not isinstance(description, str) or not description:
        description = f"the Bot API answered HTTP {response.status_code}"
    parameters = reply.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    if code == 429 or response.status_code == 429:
        wait = parameters.get("retry_after")
        retry_after = float(wait) if isinstance(wait, int | float) else retry_after_header(response)
        return TransientDeliveryError(description, code=code, retry_after=retry_after)
    if code >= 500 or response.status_code >= 500:
        wait_for = retry_after_header(response)
        return TransientDeliveryError(description, code=code, retry_after=wait_for)
    if code == 403:
        return RecipientUnreachable(
            description, code=code, reason=SuppressionReason.TELEGRAM_BLOCKED
        )
    if code == 400 and any(words in description.lower() for words in _NO_SUCH_CHAT):
        new_id = parameters.get("migrate_to_chat_id")
        if new_id is not None:
            description = f"{description} (the new chat id is {new_id})"
        return RecipientUnreachable(
            description, code=code, reason=SuppressionReason.TELEGRAM_BLOCKED
        )
    if code == 401:
        return PermanentDeliveryError(f"{description}: the bot token was refused", code=code)
    if code == 404:
        # What the Bot API says to a malformed token, and any server to a wrong URL.
        return PermanentDeliveryError(
            f"{description}: the bot token or TELEGRAM_API_URL is wrong", code=code
        )
    return PermanentDeliveryError(description, code=code)
