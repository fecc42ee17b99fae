"""Who is calling, what they may do, and how much: API keys, scopes and rate limits.

Scopes:
    send   POST /notify/email, POST /notify/bulk
    read   GET /notifications…, GET /batches/…
    admin  resend, cancel, and managing keys (/keys)

A key is `ntf_` and 43 URL-safe characters (256 random bits). Only its SHA-256 is stored:
the key carries enough entropy that a slow password hash would add nothing, and lookup by
hash lets the check be one indexed query; the found hash is compared in constant time.

Rate limits are moving windows (the `limits` library's moving-window log): a request is
let through only if fewer than the limit were let through in the window that ends now,
so no window boundary lets a second burst through and the first refusal comes at the
limit exactly, however many requests race (the check and the hit are one atomic step
in the storage). Requests per key per minute; messages per recipient per hour, where a
recipient is the address folded to lower case without its sub-address (`+tag`), so
`Ivan+1@example.org` and `ivan@example.org` share one count. RATE_LIMIT_STORAGE says
where the windows live: `memory://` (one process) or `redis://…` (every process and
replica shares them).

Command line (the service's settings and database):
    python security.py create NAME --scopes send,read [--recipient-hourly-limit N]
    python security.py list
    python security.py revoke NAME
"""

import argparse
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
from anyio import to_thread
from fastapi import Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from limits import RateLimitItem, RateLimitItemPerHour, RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, RedisStorage, storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as Scope_

import crud
from config import Settings
from db import DATABASE_UNAVAILABLE
from models import ApiKey

logger = logging.getLogger(__name__)

KEY_PREFIX = "ntf_"
RECIPIENT_LIMITED = "rate limit: too many messages to this address this hour"
# last_used_at is written at most this often per key.
TOUCH_EVERY = timedelta(seconds=60)


class Scope(StrEnum):
    SEND = "send"
    READ = "read"
    ADMIN = "admin"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4]


def issue_key(
    *,
    session: Session,
    name: str,
    scopes: Sequence[str],
    requests_per_minute: int | None = None,
    recipient_hourly_limit: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; the stored record and the key itself, which is shown only now."""
    key = new_key()
    record = crud.create_api_key(
        session=session,
        name=name,
        key_hash=hash_key(key),
        prefix=display_prefix(key),
        scopes=scopes,
        requests_per_minute=requests_per_minute,
        recipient_hourly_limit=recipient_hourly_limit,
    )
    return record, key


def ensure_development_key(*, session: Session, path: Path) -> None:
    """Keep a working key, with every scope, in `path` (development only)."""
    if path.exists():
        key = path.read_text().strip()
        if crud.find_api_key(session=session, key_hash=hash_key(key)):
            return
    existing = crud.get_api_key_by_name(session=session, name="development")
    if existing is not None and existing.revoked_at is not None:
        logger.warning("the development API key is revoked; create one: python security.py")
        return
    key = new_key()
    if existing is None:
        crud.create_api_key(
            session=session,
            name="development",
            key_hash=hash_key(key),
            prefix=display_prefix(key),
            scopes=list(Scope),
        )
    else:
        crud.replace_api_key_hash(
            session=session, api_key=existing, key_hash=hash_key(key), prefix=display_prefix(key)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    logger.warning("development API key written to %s (send it as Authorization: Bearer)", path)


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413 before anything reads it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self.detail)
            return message

        await self.app(scope, counted, send)

    @property
    def detail(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

    async def _refuse(self, scope: Scope_, receive: Receive, send: Send) -> None:
        response = JSONResponse({"detail": self.detail}, status_code=413)
        await response(scope, receive, send)


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer ntf_…`.",
)


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


def too_many(detail: str, retry_after: float) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def recipient_subject(address: str) -> str:
    """The one rate-limit count an address belongs to: letter case and `+tag` folded."""
    local, _, domain = address.lower().rpartition("@")
    return f"{local.partition('+')[0]}@{domain}"


class KeyCache:
    """Valid keys found lately, by hash, for `ttl` seconds: a request with a cached key is
    admitted without a database round trip or a thread hop. A key revoked through this
    process is forgotten at once; one revoked elsewhere (another process or replica, the
    command line) is seen through `RateLimiter.admit` on its next request (Redis), or, with
    the in-memory rate-limit storage (one process), when its entry expires."""

    MAX_KEYS = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._keys: dict[str, tuple[ApiKey, float]] = {}

    def get(self, key_hash: str) -> ApiKey | None:
        found = self._keys.get(key_hash)
        if found is None or found[1] <= time.monotonic():
            return None
        return found[0]

    def put(self, key_hash: str, api_key: ApiKey) -> None:
        if self.ttl <= 0:
            return
        if len(self._keys) >= self.MAX_KEYS:
            self._keys.clear()
        self._keys[key_hash] = (api_key, time.monotonic() + self.ttl)

    def forget(self, key_id: int) -> None:
        for key_hash, (api_key, _) in list(self._keys.items()):
            if api_key.id == key_id:
                self._keys.pop(key_hash, None)


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

    def take_recipients(self, addresses: Sequence[str], limit: int) -> tuple[set[str], float]:
        """Count a message for each address; those let through, and the longest wait of
        the others."""
        item = RateLimitItemPerHour(limit)
        subjects = [f"rcpt:{recipient_subject(address)}" for address in addresses]
        # Plain Redis only: a cluster pipeline does not load the script on its nodes.
        if type(self.storage) is RedisStorage and len(subjects) > 1:
            granted = self._acquire_pipelined(item, subjects)
        else:
            granted = [self.strategy.hit(item, subject) for subject in subjects]
        allowed = {a for a, ok in zip(addresses, granted, strict=True) if ok}
        wait = 0.0
        for subject in {s for s, ok in zip(subjects, granted, strict=True) if not ok}:
            stats = self.strategy.get_window_stats(item, subject)
            wait = max(wait, stats.reset_time - time.time())
        return allowed, wait

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


def identify(*, session: Session, key_hash: str) -> ApiKey | None:
    """The stored, unrevoked key with this hash, or None."""
    api_key = crud.find_api_key(session=session, key_hash=key_hash)
    if api_key is None or not hmac.compare_digest(api_key.key_hash, key_hash):
        return None
    return api_key


class RequireApiKey:
    """ASGI middleware: a request without a valid key is a 401 before its body is read,
    and one over its key's request rate a 429.

    FastAPI parses and validates a body before any dependency runs, so without this an
    anonymous caller would get 422s (and make the server parse megabytes). A key seen
    lately comes from `KeyCache`, and its count and revocation check are one async Redis
    round trip, so a request reaches its route without a thread hop; an unknown key is
    looked up in a thread. The key is handed to `authenticate` (scopes) in the request
    state.
    """

    def __init__(self, app: ASGIApp, *, protected: Sequence[BaseRoute]) -> None:
        self.app = app
        # Any other path is open: health, documentation, and unknown paths (a 404).
        self.protected = protected

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(
            route.matches(scope)[0] != Match.NONE for route in self.protected
        ):
            await self.app(scope, receive, send)
            return
        scheme, _, credentials = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            await self._refuse(scope, receive, send, "an API key is required: Bearer <key>")
            return
        state = scope["app"].state
        settings: Settings = state.settings
        cache: KeyCache = state.key_cache
        limiter: RateLimiter = state.limiter
        presented = hash_key(credentials.strip())
        try:
            api_key = bootstrap_key(settings, presented) or cache.get(presented)
            if api_key is None:
                # Not seen lately: the database says, in a thread.
                api_key = await to_thread.run_sync(self._identify, state, presented)
                if api_key is None:
                    await self._refuse(scope, receive, send, "invalid or revoked API key")
                    return
                cache.put(presented, api_key)
            limit = api_key.requests_per_minute or settings.rate_limit_requests_per_minute
            revoked, retry_after = await limiter.admit(api_key, limit)
        except (*DATABASE_UNAVAILABLE, StorageError):
            logger.exception("storage unavailable while checking an API key")
            response = JSONResponse(
                {"detail": "database unavailable, try again later"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
            await response(scope, receive, send)
            return
        if revoked:
            cache.forget(api_key.id)
            await self._refuse(scope, receive, send, "invalid or revoked API key")
            return
        if retry_after is not None:
            refused = too_many(
                f"more than {limit} requests per minute for this API key", retry_after
            )
            await JSONResponse(
                {"detail": refused.detail}, status_code=refused.status_code, headers=refused.headers
            )(scope, receive, send)
            return
        if api_key.id and crud.api_key_touch_due(api_key, every=TOUCH_EVERY):
            await self._touch(state, api_key)
        scope.setdefault("state", {})["api_key"] = api_key
        await self.app(scope, receive, send)

    @staticmethod
    def _identify(state: Any, key_hash: str) -> ApiKey | None:
        with state.read_session_factory() as session:
            return identify(session=session, key_hash=key_hash)

    @staticmethod
    async def _touch(state: Any, api_key: ApiKey) -> None:
        """Record the key's use (at most once a minute per key and process); bookkeeping,
        so a database error here does not fail the request."""

        def touch() -> None:
            with state.session_factory() as session:
                crud.touch_api_key(session=session, api_key=api_key)

        try:
            await to_thread.run_sync(touch)
        except DATABASE_UNAVAILABLE as exc:
            logger.warning("could not record the use of key %d: %s", api_key.id, exc)

    @staticmethod
    async def _refuse(scope: Scope_, receive: Receive, send: Send, detail: str) -> None:
        response = JSONResponse(
            {"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
        await response(scope, receive, send)


async def authenticate(
    security_scopes: SecurityScopes,
    request: Request,
    # For the OpenAPI security scheme; RequireApiKey has checked the key already.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The caller's key (found by RequireApiKey), if it holds the scopes."""
    api_key: ApiKey | None = getattr(request.state, "api_key", None)
    if api_key is None:
        raise unauthorized("an API key is required: Authorization: Bearer <key>")
    granted = set(api_key.scopes.split())
    missing = [scope for scope in security_scopes.scopes if scope not in granted]
    if missing:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, f"this API key lacks the scope: {', '.join(missing)}"
        )
    return api_key


def announce_revocation(
    *, limiter: RateLimiter, cache: KeyCache | None, settings: Settings, key_id: int
) -> None:
    """After a key is revoked in the database: forget it here, and tell the processes that
    cached it (through the rate-limit storage, for longer than they cache it)."""
    if cache is not None:
        cache.forget(key_id)
    limiter.mark_revoked(key_id, seconds=2 * settings.api_key_cache_ttl + 60)


def bootstrap_key(settings: Settings, presented: str) -> ApiKey | None:
    """BOOTSTRAP_API_KEY, checked against the settings alone: it has every scope, is not
    stored, and is revoked by removing it from the environment."""
    if settings.bootstrap_api_key is None:
        return None
    key_hash = hash_key(settings.bootstrap_api_key.get_secret_value())
    if not hmac.compare_digest(key_hash, presented):
        return None
    return ApiKey(id=0, name="bootstrap", key_hash=key_hash, scopes=" ".join(Scope))


def take_recipients(
    *, limiter: RateLimiter, settings: Settings, caller: ApiKey, recipients: Sequence[str]
) -> tuple[set[str], int, float]:
    """Count a message for each address in the hour that ends now; the addresses within
    the limit, the limit, and the seconds until a refused one would be let through."""
    limit = caller.recipient_hourly_limit or settings.rate_limit_per_recipient_per_hour
    allowed, retry_after = limiter.take_recipients(recipients, limit)
    return allowed, limit, retry_after


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def main(argv: Sequence[str] | None = None) -> None:
    """Manage API keys from the command line."""
    from db import make_engine, make_session_factory, run_migrations

    parser = argparse.ArgumentParser(prog="python security.py", description="Manage API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument(
        "--scopes", default="send", help="comma-separated: send, read, admin (default: send)"
    )
    create.add_argument("--requests-per-minute", type=positive)
    create.add_argument("--recipient-hourly-limit", type=positive)
    commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = commands.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")
    args = parser.parse_args(argv)

    settings = Settings()
    engine = make_engine(settings)
    if settings.auto_migrate:
        run_migrations(engine)
    with make_session_factory(engine)() as session:
        if args.command == "create":
            try:
                scopes = [Scope(s.strip()) for s in args.scopes.split(",") if s.strip()]
            except ValueError as exc:
                parser.error(str(exc))
            if crud.get_api_key_by_name(session=session, name=args.name):
                parser.error(f"a key named {args.name!r} exists")
            _, key = issue_key(
                session=session,
                name=args.name,
                scopes=scopes,
                requests_per_minute=args.requests_per_minute,
                recipient_hourly_limit=args.recipient_hourly_limit,
            )
            print(key)
        elif args.command == "list":
            for record in crud.list_api_keys(session=session):
                state = "revoked" if record.revoked_at else "active"
                print(f"{record.name}\t{record.prefix}…\t{record.scopes}\t{state}")
        else:
            found = crud.get_api_key_by_name(session=session, name=args.name)
            if found is None:
                parser.error(f"no key named {args.name!r}")
            crud.revoke_api_key(session=session, api_key=found)
            limiter = RateLimiter(settings.rate_limit_storage, prefix=settings.rate_limit_prefix)
            announce_revocation(limiter=limiter, cache=None, settings=settings, key_id=found.id)
            print(f"revoked {args.name}")
    engine.dispose()


if __name__ == "__main__":
    main()
