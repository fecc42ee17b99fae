"""Replies of SMS.ru and the Bot API for the development stand-in to give in tests."""

from typing import Any

from devoutbox import Reply

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
