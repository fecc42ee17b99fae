"""How much a caller may do: moving-window rate limits on requests and recipients.

Rate limits are moving windows (the `limits` library's moving-window log): a request is
let through only if fewer than the limit were let through in the window that ends now,
so no window boundary lets a second burst through and the first refusal comes at the
limit exactly, however many requests race (the check and the hit are one atomic step
in the storage). Requests per key per minute; messages per recipient per hour, where a
recipient is the address folded to lower case without its sub-address (`+tag`), so
`Ivan+1@example.org` and `ivan@example.org` share one count. RATE_LIMIT_STORAGE says
where the windows live: `memory://` (one process) or `redis://…` (every process and
replica shares them).
"""

import math
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from anyio import to_thread
from fastapi import HTTPException, status
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter

from config import Settings
from models import ApiKey

RECIPIENT_LIMITED = "rate limit: too many messages to this address this hour"


def too_many(detail: str, retry_after: float) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def recipient_subject(address: str, channel: str = "email") -> str:
    """The one rate-limit count an address belongs to: per channel, and for e-mail with
    letter case and `+tag` folded (phone numbers and chat ids come normalised)."""
    if channel != "email":
        return f"{channel}:{address}"
    local, _, domain = address.lower().rpartition("@")
    return f"{local.partition('+')[0]}@{domain}"


class RateLimiter:
    """Moving-window limits on requests per key and messages per recipient."""

    def __init__(self, storage_uri: str, *, prefix: str = "notify") -> None:
        # wrap_exceptions: a storage outage raises limits.errors.StorageError (a 503).
        self.storage = storage_from_string(storage_uri, key_prefix=prefix, wrap_exceptions=True)
        self.strategy = MovingWindowRateLimiter(self.storage)
        # The per-key count of a request runs on the event loop, without a thread: on
        # Redis through an asyncio client and the library's own moving-window script (the
        # same keys and the same atomic step as `strategy.hit`); in memory it is instant.
        self._async: aioredis.Redis | None = None
        self._redis: RedisStorage | None = None
        # Keys revoked lately, when the storage is memory (one process): id → until.
        self._revoked: dict[int, float] = {}
        # Plain Redis only: a cluster would need its own client.
        if isinstance(self.storage, RedisStorage) and type(self.storage) is RedisStorage:
            self._redis = self.storage
            self._async = aioredis.Redis.from_url(storage_uri)
            self._acquire = self._async.register_script(RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW)

    async def admit(self, api_key: ApiKey, limit: int) -> tuple[bool, float | None]:
        """Whether `api_key` was revoked lately (see `mark_revoked`), and, counting this
        request in its per-minute window, None if within it or the seconds until one more
        would be let through. One round trip to Redis, on the event loop."""
        item = RateLimitItemPerMinute(limit)
        subject = f"key:{api_key.id}"
        if self._async is None or self._redis is None:
            if self._revoked.get(api_key.id, 0.0) > time.monotonic():
                return True, None
            if isinstance(self.storage, MemoryStorage):
                return False, self.hit(item, subject)  # in memory: no I/O
            # Another storage (a Redis cluster or sentinel): blocking, so in a thread.
            return False, await to_thread.run_sync(self.hit, item, subject)
        try:
            async with self._async.pipeline(transaction=False) as pipe:
                pipe.exists(self._revoked_key(self._redis, api_key.id))
                await self._acquire(
                    keys=[self._redis.prefixed_key(item.key_for(subject))],
                    args=[time.time(), item.amount, item.get_expiry(), 1],
                    client=pipe,
                )
                revoked, acquired = await pipe.execute()
        except aioredis.RedisError as exc:
            raise StorageError(exc) from exc
        if revoked:
            return True, None
        if acquired:
            return False, None
        # Refused (rare): how long until one more would pass, read in a thread.
        stats = await to_thread.run_sync(self.strategy.get_window_stats, item, subject)
        return False, max(0.0, stats.reset_time - time.time())

    def mark_revoked(self, key_id: int, *, seconds: float) -> None:
        """Tell every process sharing this storage that a key is revoked, for `seconds`
        (longer than any process caches a key)."""
        if self._redis is None:
            self._revoked[key_id] = time.monotonic() + seconds
            return
        # A redis.Redis client; the library types it as a narrower protocol.
        connection: Any = self._redis.get_connection()
        try:
            connection.set(self._revoked_key(self._redis, key_id), 1, ex=max(1, math.ceil(seconds)))
        except self._redis.base_exceptions as exc:
            raise StorageError(exc) from exc

    @staticmethod
    def _revoked_key(storage: RedisStorage, key_id: int) -> str:
        return storage.prefixed_key(f"revoked:{key_id}")

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()

    def hit(self, item: RateLimitItem, subject: str) -> float | None:
        """Count one hit on `subject`; None if let through, else seconds until one would be."""
        if self.strategy.hit(item, subject):
            return None
        stats = self.strategy.get_window_stats(item, subject)
        return max(0.0, stats.reset_time - time.time())

    def take_recipients(
        self, addresses: Sequence[str], limit: int, channel: str = "email"
    ) -> tuple[list[bool], float]:
        """Count a message for each address on `channel` (an address given twice counts
        twice); whether each was let through, and the longest wait of the others."""
        item = RateLimitItemPerHour(limit)
        subjects = [f"rcpt:{recipient_subject(address, channel)}" for address in addresses]
        # Plain Redis only: a cluster pipeline does not load the script on its nodes.
        if type(self.storage) is RedisStorage and len(subjects) > 1:
            granted = self._acquire_pipelined(item, subjects)
        else:
            granted = [self.strategy.hit(item, subject) for subject in subjects]
        wait = 0.0
        for subject in {s for s, ok in zip(subjects, granted, strict=True) if not ok}:
            stats = self.strategy.get_window_stats(item, subject)
            wait = max(wait, stats.reset_time - time.time())
        return granted, wait

    def _acquire_pipelined(self, item: RateLimitItem, subjects: Sequence[str]) -> list[bool]:
        """`strategy.hit` for many subjects in one round trip: the library's own atomic
        moving-window script, once per subject, sent as one Redis pipeline (a bulk of
        10,000 would otherwise wait on 10,000 round trips)."""
        storage = self.storage
        assert isinstance(storage, RedisStorage)
        try:
            # A redis.Redis client; the library types it as a narrower protocol.
            pipe = storage.get_connection().pipeline(transaction=False)  # type: ignore[attr-defined]
            for subject in subjects:
                storage.lua_acquire_moving_window(
                    keys=[storage.prefixed_key(item.key_for(subject))],
                    args=[time.time(), item.amount, item.get_expiry(), 1],
                    client=pipe,
                )
            return [bool(acquired) for acquired in pipe.execute()]
        except storage.base_exceptions as exc:
            raise StorageError(exc) from exc


def take_recipients(
    *,
    limiter: RateLimiter,
    settings: Settings,
    caller: ApiKey,
    recipients: Sequence[str],
    channel: str = "email",
) -> tuple[list[bool], int, float]:
    """Count a message for each address on `channel` in the hour that ends now; whether
    each was within the limit, the limit, and the seconds until a refused one would be
    let through."""
    limit = caller.recipient_hourly_limit or settings.rate_limit_per_recipient_per_hour
    allowed, retry_after = limiter.take_recipients(recipients, limit, channel)
    return allowed, limit, retry_after
