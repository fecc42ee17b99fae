"""The development stand-in (devoutbox.py) scripted for tests: `Outbox.plan` queues
`Reply`s, each answering one coming request to either API in place of the normal answer,
and `Outbox.requests` keeps what arrived (never the api_id or token); plus the replies of
SMS.ru and the Bot API the tests give.

    outbox.plan(Reply.json(200, {"status": "ERROR", "status_code": 220, "status_text": "..."}))
    outbox.plan(Reply.slow(1.0))     # the normal answer (message saved), a second late
    outbox.plan(Reply.hang_up())     # the connection closes, no answer at all
"""

import json
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import devoutbox
from devoutbox import Received


@dataclass(frozen=True, slots=True)
class Reply:
    """A planned answer to one request, in place of the stand-in's normal one."""

    status: int | None = None  # None: the normal answer (the message is accepted)
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    delay: float = 0.0  # seconds before answering; beyond the client's timeout, a timeout
    drop: bool = False  # close the connection without answering

    @classmethod
    def json(cls, status: int, body: object, *, delay: float = 0.0) -> "Reply":
        """`status` with `body` as JSON."""
        return cls(status, json.dumps(body, ensure_ascii=False).encode(), delay=delay)

    @classmethod
    def raw(
        cls, status: int, body: bytes, *, content_type: str = "text/html", delay: float = 0.0
    ) -> "Reply":
        """`status` with `body` as it is: a proxy's error page, a reply that is not JSON."""
        return cls(status, body, content_type=content_type, delay=delay)

    @classmethod
    def slow(cls, delay: float) -> "Reply":
        """The normal answer, `delay` seconds late."""
        return cls(delay=delay)

    @classmethod
    def hang_up(cls, *, delay: float = 0.0) -> "Reply":
        """Read the request, then close the connection without a word."""
        return cls(delay=delay, drop=True)


class Outbox(devoutbox.Outbox):
    """The stand-in, with planned replies and the requests it got."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", **keys: str | None) -> None:
        super().__init__(directory, host, **keys)
        self.requests: deque[Received] = deque(maxlen=10_000)
        self._planned: deque[Reply] = deque()
        self._plan_lock = threading.Lock()

    def plan(self, *replies: Reply) -> None:
        """Answer the next requests with `replies`, one each, in order."""
        with self._plan_lock:
            self._planned.extend(replies)

    def _arrived(self, received: Received) -> Reply | None:
        with self._plan_lock:
            self.requests.append(received)
            return self._planned.popleft() if self._planned else None


def provider_settings(outbox: Outbox) -> dict[str, Any]:
    """Settings that point SMS.ru and the Bot API at `outbox`."""
    return {
        "sms_ru_url": outbox.url,
        "sms_ru_api_id": "test-api-id-0123",
        "telegram_api_url": outbox.url,
        "telegram_bot_token": "123456:test-bot-token",
        "channel_timeout": 2.0,
    }


def start_outbox(
    directory: Path,
    host: str = "127.0.0.1",
    *,
    api_id: str | None = None,
    token: str | None = None,
) -> Outbox:
    """A scripted stand-in on a free local port; `.stop()` ends it."""
    outbox = Outbox(directory, host, api_id=api_id, token=token)
    outbox.start()
    return outbox


# Secrets the tests look for wherever they must not be.
API_ID = "F2D79B58-A5A2-2F9E-91C8-73D12CE2E102"
TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
# Client timeouts: long enough for loopback, short enough for a fast suite.
TIMEOUT = 0.2
NUMBER = "+79161234567"


def sms_refusal(code: int, text: str, *, number: str = NUMBER, balance: float = 120.5) -> Reply:
    """SMS.ru taking the request but refusing the number."""
    entry = {"status": "ERROR", "status_code": code, "status_text": text}
    return Reply.json(
        200,
        {
            "status": "OK",
            "status_code": 100,
            "sms": {number.removeprefix("+"): entry},
            "balance": balance,
        },
    )


def sms_request_refusal(code: int, text: str, **extra: Any) -> Reply:
    """SMS.ru refusing the whole request (authorization, funds, the sender name)."""
    return Reply.json(200, {"status": "ERROR", "status_code": code, "status_text": text} | extra)


def sms_accepted(entry: dict[str, Any], *, number: str = NUMBER) -> Reply:
    """SMS.ru accepting the number, its entry carrying `entry`'s fields."""
    accepted = {"status": "OK", "status_code": 100, "sms_id": "000123-10000001"} | entry
    return Reply.json(
        200,
        {
            "status": "OK",
            "status_code": 100,
            "sms": {number.removeprefix("+"): accepted},
            "balance": 99.5,
        },
    )


def bot_api_error(code: int, description: str, *, retry_after: int | None = None) -> Reply:
    """A Bot API error reply, its HTTP status equal to its `error_code` as Telegram's are."""
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return Reply.json(code, body)
