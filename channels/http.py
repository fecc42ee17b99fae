"""What the HTTP channels (SMS.ru, the Bot API) share: one pooled httpx client per
provider, httpx's errors and a reply's Retry-After in the terms of `channels.base`, and the
reply's JSON with our secrets scrubbed out of it.

A provider's error text may echo the request (SMS.ru's `status_text`, the Bot API's
`description`), and with it the api_id or the bot token. Every reply is read through
`HTTPSender.reply`, whose `Scrubber` replaces each secret the channel holds (in any case,
percent-encoded, or cut short) before anything stores, logs or returns a word of it.
"""

import json
from collections.abc import Collection, Iterable
from typing import Any

import httpx

from channels.base import (
    ConnectionLostError,
    DeliveryError,
    PermanentDeliveryError,
    Scrubber,
    TransientDeliveryError,
)


class HTTPSender:
    """A channel over one provider's HTTP API: up to `pool_size` connections to `base_url`
    kept open for reuse, and what httpx raises turned into our errors. `transport`
    replaces the network (`httpx.MockTransport` in tests of a reply table)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        pool_size: int,
        secrets: Iterable[str] = (),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self.scrub = Scrubber(secrets)
        self.timeout = timeout
        self.pool_size = pool_size
        self._client = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
            transport=transport,
        )

    def _post(self, path: str, **request: Any) -> httpx.Response:
        """POST to `path`; a `DeliveryError` if no reply came."""
        try:
            return self._client.post(path, **request)
        except httpx.HTTPError as exc:
            # from None: httpx's exception (with the URL) stays out of logged tracebacks.
            raise converted(exc, self.pool_size) from None

    def reply(
        self, response: httpx.Response, *, ours: Collection[str] = ()
    ) -> dict[str, Any] | None:
        """The reply's JSON object, every secret of ours scrubbed from it but for the
        members named in `ours` (what we sent, echoed back: the Bot API's `result`, up to
        4,096 characters that scrubbing would cost a millisecond); None if it is not one."""
        reply = json_object(response.content)
        if reply is None:
            return None
        kept = {key: reply.pop(key) for key in ours if key in reply}
        return scrubbed(reply, self.scrub) | kept

    def close(self) -> None:
        """Close pooled connections."""
        self._client.close()


def scrubbed(value: Any, scrub: Scrubber) -> Any:
    """`value` (a parsed JSON value) with `scrub` applied to every string in it."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(key): scrubbed(item, scrub) for key, item in value.items()}
    if isinstance(value, list):
        return [scrubbed(item, scrub) for item in value]
    return value


def converted(exc: httpx.HTTPError, pool_size: int) -> DeliveryError:
    """Our error for what httpx raised, in our own words: httpx's texts may carry the
    request's URL and form, and with them the bot token or the api_id."""
    name = type(exc).__name__
    if isinstance(exc, httpx.PoolTimeout):
        return TransientDeliveryError(f"all {pool_size} connections stayed busy ({name})")
    if isinstance(exc, httpx.TimeoutException):
        return ConnectionLostError(f"no reply in time ({name})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return ConnectionLostError(f"the connection broke off without a valid reply ({name})")
    if isinstance(exc, httpx.NetworkError | httpx.ProxyError):
        return ConnectionLostError(f"connection failed ({name})")
    if isinstance(exc, httpx.DecodingError):
        return TransientDeliveryError(f"the reply could not be decoded ({name})")
    # A wrong URL or scheme, a request httpx refuses to make: configuration.
    return PermanentDeliveryError(f"the request could not be made ({name})")


def retry_after_header(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header given in seconds (the HTTP-date form is ignored)."""
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def json_object(content: bytes) -> dict[str, Any] | None:
    """The reply's JSON object; None if it is not one."""
    try:
        reply = json.loads(content)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None
