"""How much a caller may do: moving-window rate limits on requests and recipients.

Rate limits are moving windows (the `limits` library's moving-window log): a request is
let through only if fewer than the limit were let through in the window that ends now,
so no window boundary lets a second burst through and the first refusal comes at the
limit exactly, however many requests race (the check and the hit are one atomic step
in the storage). Requests per key per minute; messages per recipient per hour, where a
recipient is the address folded to lower case without its sub-address (`+tag`), so
`Ivan+1@example.org` and `ivan@example.org` share one count. RATE_LIMIT_STORAGE says
where the windows live: `memory://` (one process) or `redis://…` (every process and
replica shares them). In memory, `MemoryWindowStorage` keeps them.
"""

import bisect
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from anyio import to_thread
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import (
    MovingWindowSupport,
    RedisStorage,
    Storage,
    StorageTypes,
    storage_from_string,
)
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import NoScriptError

from config import Settings
from models import ApiKey
from suppression import folded

RECIPIENT_LIMITED = "rate limit: too many messages to this address this hour"
# The 503 of a request the rate-limit storage did not answer.
STORAGE_UNAVAILABLE = "rate-limit storage unavailable, try again later"


KEY_REFUSED = "invalid or revoked API key"

# The library's moving-window acquire script, unchanged, run once per key: a bulk's
# recipients in one EVALSHA per ACQUIRE_CHUNK of them (each answer 1 or 0; Lua's false
# would end the array). Atomic per script, as the library's is per key; a chunk keeps Redis
# busy for about a millisecond.
ACQUIRE_MANY = f"""
local function acquire(KEYS, ARGV)
{RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW.decode()}
end
local granted = {{}}
for i = 1, #KEYS do
    granted[i] = acquire({{KEYS[i]}}, ARGV) and 1 or 0
end
return granted
"""
ACQUIRE_MANY_SHA = hashlib.sha1(ACQUIRE_MANY.encode()).hexdigest()
ACQUIRE_CHUNK = 500


class KeyRevoked(Exception):
    """The caller's key was revoked through another process (`mark_revoked`): a 401."""

    def __init__(self, key_id: int) -> None:
        super().__init__(KEY_REFUSED)
        self.key_id = key_id


def key_window(key_id: int, limit: int) -> tuple[RateLimitItem, str]:
    """The per-minute window a key's requests are counted in, and its subject."""
    return RateLimitItemPerMinute(limit), f"key:{key_id}"


def key_limit_reached(limit: int, retry_after: float) -> "TooMany":
    return TooMany(f"more than {limit} requests per minute for this API key", retry_after)


@dataclass
class KeyCount:
    """A request's count against its key's per-minute `limit`, left by the key check
    (`auth.RequireApiKey`) to the send, which makes it with its recipients' counts in one
    round trip (`RateLimiter.take_recipients`); what is left uncounted when the request
    ends, the key check counts then."""

    api_key: ApiKey
    limit: int
    done: bool = False

    @property
    def window(self) -> tuple[RateLimitItem, str]:
        return key_window(self.api_key.id, self.limit)

    def settle(self, revoked: bool, retry_after: float | None) -> None:
        """The count's answer: `KeyRevoked`, or the key's `TooMany`, unless let through."""
        if revoked:
            raise KeyRevoked(self.api_key.id)
        if retry_after is not None:
            raise key_limit_reached(self.limit, retry_after)


class TooMany(Exception):
    """A rate limit is reached: a 429 whose Retry-After is `retry_after`, rounded up."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def recipient_subject(address: str, channel: str = "email") -> str:
    """The one rate-limit count an address belongs to: per channel, the address folded as
    suppressions fold it (`suppression.folded`)."""
    if channel != "email":
        return f"{channel}:{address}"
    return folded(channel, address)


class RateLimiter:
    """Moving-window limits on requests per key and messages per recipient."""

    def __init__(
        self,
        storage_uri: str,
        *,
        prefix: str = "notify",
        connect_timeout: float | None = None,
        socket_timeout: float | None = None,
    ) -> None:
        """Limits kept in `storage_uri`; on Redis, each connection and each answer waited
        for at most `connect_timeout` and `socket_timeout` seconds (None: for ever)."""
        scheme = urlsplit(storage_uri).scheme
        timeouts = {"socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout}
        # Only Redis clients take these; the library passes them to `redis.from_url`.
        options = {
            name: value
            for name, value in timeouts.items()
            if value is not None and scheme.startswith(("redis", "valkey"))
        }
        if scheme == "memory":
            self.storage: StorageTypes = MemoryWindowStorage()
        else:
            # wrap_exceptions: a storage outage raises limits.errors.StorageError (a 503).
            self.storage = storage_from_string(
                storage_uri, key_prefix=prefix, wrap_exceptions=True, **options
            )
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
            self._async = aioredis.Redis.from_url(
                storage_uri, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout
            )
            self._acquire = self._async.register_script(RedisStorage.SCRIPT_ACQUIRE_MOVING_WINDOW)

    async def admit(self, api_key: ApiKey, limit: int) -> tuple[bool, float | None]:
        """Whether `api_key` was revoked lately (see `mark_revoked`), and, counting this
        request in its per-minute window, None if within it or the seconds until one more
        would be let through. One round trip to Redis, on the event loop."""
        if self._async is None or self._redis is None:
            if isinstance(self.storage, MemoryWindowStorage):
                return self._admit_here(api_key, limit)  # in memory: no I/O
            # Another storage (a Redis cluster or sentinel): blocking, so in a thread.
            return await to_thread.run_sync(self._admit_here, api_key, limit)
        item, subject = key_window(api_key.id, limit)
        window = self._redis.prefixed_key(item.key_for(subject))
        try:
            for loaded in (True, False):
                async with self._async.pipeline(transaction=False) as pipe:
                    pipe.exists(self._revoked_key(self._redis, api_key.id))
                    # EVALSHA itself, as in `_acquire_pipelined`: no SCRIPT EXISTS first.
                    pipe.evalsha(
                        self._acquire.sha, 1, window, time.time(), item.amount, item.get_expiry(), 1
                    )
                    try:
                        revoked, acquired = await pipe.execute()
                        break
                    except NoScriptError:
                        if not loaded:
                            raise
                await self._async.script_load(self._acquire.script)
        except aioredis.RedisError as exc:
            raise StorageError(exc) from exc
        if revoked:
            return True, None
        if acquired:
            return False, None
        # Refused (rare): how long until one more would pass, read in a thread.
        stats = await to_thread.run_sync(self.strategy.get_window_stats, item, subject)
        return False, max(0.0, stats.reset_time - time.time())

    def _admit_here(self, api_key: ApiKey, limit: int) -> tuple[bool, float | None]:
        """`admit` without the asyncio Redis client: the revocations this process keeps
        (memory) and a blocking count."""
        if self._revoked.get(api_key.id, 0.0) > time.monotonic():
            return True, None
        return False, self.hit(*key_window(api_key.id, limit))

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
        self,
        addresses: Sequence[str],
        limit: int,
        channel: str = "email",
        *,
        key: KeyCount | None = None,
    ) -> tuple[list[bool], float]:
        """Count a message for each address on `channel` (an address given twice counts
        twice); whether each was let through, and the longest wait of the others. With
        `key` not yet counted, the request is counted against its key first, in the same
        round trip: `KeyRevoked` or the key's `TooMany`, and no address counted, if it
        is not let through."""
        item = RateLimitItemPerHour(limit)
        subjects = [f"rcpt:{recipient_subject(address, channel)}" for address in addresses]
        if key is not None and key.done:
            key = None
        # Plain Redis only: a cluster pipeline does not load the script on its nodes.
        if type(self.storage) is RedisStorage and (len(subjects) > 1 or key is not None):
            granted = self._acquire_pipelined(item, subjects, key)
        else:
            if key is not None:
                key.done = True
                key.settle(*self._admit_here(key.api_key, key.limit))
            granted = [self.strategy.hit(item, subject) for subject in subjects]
        wait = 0.0
        for subject in {s for s, ok in zip(subjects, granted, strict=True) if not ok}:
            stats = self.strategy.get_window_stats(item, subject)
            wait = max(wait, stats.reset_time - time.time())
        return granted, wait

    def _acquire_pipelined(
        self, item: RateLimitItem, subjects: Sequence[str], key: KeyCount | None = None
    ) -> list[bool]:
        """`strategy.hit` for many subjects in one round trip: the library's own atomic
        moving-window script, run for up to `ACQUIRE_CHUNK` subjects per EVALSHA by
        `ACQUIRE_MANY` and the chunks sent as one Redis pipeline (a bulk of 10,000 would
        otherwise wait on 10,000 round trips, or Redis parse 10,000 commands). With `key`,
        its revocation mark and per-minute window go first in the same pipeline; if the key
        is not let through, the subjects' hits are taken back (`_take_back`)."""
        storage = self.storage
        assert isinstance(storage, RedisStorage)
        # The hit's time, in sixteenths of a second: a number every formatting of it (Lua's
        # %.14g, Redis's, Python's) writes alike, so `_take_back` finds it by value.
        at = math.floor(time.time() * 16) / 16
        keys = [storage.prefixed_key(item.key_for(subject)) for subject in subjects]
        one = storage.lua_acquire_moving_window
        # (command, arguments) in the pipeline's order. EVALSHA itself: a Script object in
        # a pipeline costs a SCRIPT EXISTS round trip first, every time.
        commands: list[tuple[str, tuple[Any, ...]]] = []
        if key is not None:
            key.done = True
            window, subject = key.window
            key_name = storage.prefixed_key(window.key_for(subject))
            commands.append(("exists", (self._revoked_key(storage, key.api_key.id),)))
            commands.append(
                ("evalsha", (one.sha, 1, key_name, at, window.amount, window.get_expiry(), 1))
            )
        for start in range(0, len(keys), ACQUIRE_CHUNK):
            chunk = keys[start : start + ACQUIRE_CHUNK]
            commands.append(
                (
                    "evalsha",
                    (ACQUIRE_MANY_SHA, len(chunk), *chunk, at, item.amount, item.get_expiry(), 1),
                )
            )
        # A redis.Redis client; the library types it as a narrower protocol.
        client: Any = storage.get_connection()
        try:
            answers = _pipelined(client, commands)
            # Redis lost a script (a restart, or ours is new to it): a command that found
            # its script missing counted nothing, the others did. Only those go again.
            missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
            if missing:
                client.script_load(one.script)
                client.script_load(ACQUIRE_MANY)
                again = _pipelined(client, [commands[i] for i in missing])
                for i, answer in zip(missing, again, strict=True):
                    answers[i] = answer
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
        except storage.base_exceptions as exc:
            raise StorageError(exc) from exc
        if key is not None:
            revoked, key_granted = bool(answers[0]), bool(answers[1])
            answers = answers[2:]
        granted = [bool(answer) for chunk in answers for answer in chunk]
        if key is None:
            return granted
        if revoked or not key_granted:
            self._take_back(item, [s for s, ok in zip(subjects, granted, strict=True) if ok], at)
            key_item, key_subject = key.window
            if key_granted:
                self._take_back(key_item, [key_subject], at)
            if revoked:
                raise KeyRevoked(key.api_key.id)
            stats = self.strategy.get_window_stats(key_item, key_subject)
            key.settle(False, max(0.0, stats.reset_time - time.time()))
        return granted

    def _take_back(self, item: RateLimitItem, subjects: Sequence[str], at: float) -> None:
        """Remove one hit made at `at` from each subject's window (a request that was not
        let through after all): the moving window is a list of hit times."""
        if not subjects:
            return
        storage = self.storage
        assert isinstance(storage, RedisStorage)
        try:
            pipe = storage.get_connection().pipeline(transaction=False)  # type: ignore[attr-defined]
            for subject in subjects:
                pipe.lrem(storage.prefixed_key(item.key_for(subject)), 1, f"{at:.14g}")
            pipe.execute()
        except storage.base_exceptions as exc:
            raise StorageError(exc) from exc


def take_recipients(
    *,
    limiter: RateLimiter,
    settings: Settings,
    caller: ApiKey,
    recipients: Sequence[str],
    channel: str = "email",
    key: KeyCount | None = None,
) -> tuple[list[bool], int, float]:
    """Count a message for each address on `channel` in the hour that ends now; whether
    each was within the limit, the limit, and the seconds until a refused one would be
    let through."""
    limit = caller.recipient_hourly_limit or settings.rate_limit_per_recipient_per_hour
    allowed, retry_after = limiter.take_recipients(recipients, limit, channel, key=key)
    return allowed, limit, retry_after


def _pipelined(client: Any, commands: Sequence[tuple[str, tuple[Any, ...]]]) -> list[Any]:
    """The answers of `commands` sent as one pipeline; a command's error is its answer
    (every command of a pipeline runs, whichever fails)."""
    pipe = client.pipeline(transaction=False)
    for name, args in commands:
        getattr(pipe, name)(*args)
    answers: list[Any] = pipe.execute(raise_on_error=False)
    return answers


class MemoryWindowStorage(Storage, MovingWindowSupport):
    """Moving windows in this process's memory (`memory://`), with the answers of the
    library's MemoryStorage and a cost per call that stays flat however many keys come
    and go.

    MemoryStorage expires keys on a thread that walks every key every 10 ms. Here a key's
    hits are trimmed when the key is used, and each call drops up to `sweep` keys whose
    window has passed: keys are kept per window length in the order of their last hit,
    which is the order they expire in, so the expired ones are first. Only moving windows
    (all RateLimiter counts); the fixed-window methods raise NotImplementedError.
    """

    # Built by RateLimiter; `memory://` stays registered to the library's MemoryStorage.
    STORAGE_SCHEME = None

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        *,
        clock: Callable[[], float] = time.time,
        sweep: int = 4,
        **options: float | str | bool,
    ) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.clock = clock
        self.sweep = sweep
        # Window length → key → its hits' times, oldest first, keys by their last hit.
        # A key never holds more than its limit: an older hit cannot matter any more.
        self._hits: dict[int, OrderedDict[str, list[float]]] = {}
        # One lock for every key: a call holds it for microseconds (sync routes run in
        # threads, the per-key count on the event loop).
        self._lock = threading.Lock()

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def key_count(self) -> int:
        """How many keys are kept (expired ones included, until swept)."""
        with self._lock:
            return sum(len(keys) for keys in self._hits.values())

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Count `amount` hits on `key` if the window of `expiry` seconds that ends now
        holds at most `limit` with them (a hit exactly `expiry` ago is still in it)."""
        if amount > limit:
            return False
        with self._lock:
            now = self.clock()
            self._sweep(now)
            keys = self._hits.setdefault(expiry, OrderedDict())
            times = keys.get(key)
            if times is None:
                times = keys[key] = []
            else:
                del times[: bisect.bisect_left(times, now - expiry)]
                # A clock stepped back must not unsort the hits (bisect relies on it).
                now = max(now, times[-1]) if times else now
            if len(times) + amount > limit:
                return False
            times.extend([now] * amount)
            keys.move_to_end(key)
            return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """The time of the oldest hit in the window of `expiry` seconds that ends now
        (now, if none) and how many hits it holds (one exactly `expiry` ago is not
        counted, as MemoryStorage does not)."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            keys = self._hits.get(expiry)
            times = keys.get(key, []) if keys is not None else []
            first = bisect.bisect_right(times, now - expiry)
            if first == len(times):
                return now, 0
            return times[first], len(times) - first

    def _sweep(self, now: float) -> None:
        """Drop up to `sweep` keys whose last hit is out of their window."""
        budget = self.sweep
        for expiry, keys in self._hits.items():
            while budget and keys:
                times = keys[next(iter(keys))]
                if times and times[-1] >= now - expiry:
                    break
                keys.popitem(last=False)
                budget -= 1

    def check(self) -> bool:
        return True

    def reset(self) -> int | None:
        with self._lock:
            count = sum(len(keys) for keys in self._hits.values())
            self._hits.clear()
        return count

    def clear(self, key: str) -> None:
        with self._lock:
            for keys in self._hits.values():
                keys.pop(key, None)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        raise NotImplementedError("MemoryWindowStorage keeps moving windows only")

    def get(self, key: str) -> int:
        raise NotImplementedError("MemoryWindowStorage keeps moving windows only")

    def get_expiry(self, key: str) -> float:
        raise NotImplementedError("MemoryWindowStorage keeps moving windows only")
